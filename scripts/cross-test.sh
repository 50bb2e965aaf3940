#!/usr/bin/env bash
# Proves the aarch64 release works, under emulation (Debian's qemu-user-static), on 127.0.0.1:
#   1. scripts/release.sh into a work folder: both static binaries, SHA256SUMS, both images and
#      the multi-arch manifest, with its `file` checks; the size budget enforced;
#   2. `file` on each binary: the right architecture, statically linked;
#   3. the aarch64 binary run by qemu-aarch64-static: --version, `certs init`, `check-config`,
#      and a live agent that the x86_64 binary, as the client, reaches: `probe --all`, a TCP
#      and a UDP echo through tunnels (`forward`), the agent's `health`, exit 0 on SIGTERM;
#   4. the arm64 image: where the kernel lets binfmt_misc be registered, the manifest list's
#      arm64 entry is that image, `podman run --arch arm64` of it and its HEALTHCHECK (`podman
#      healthcheck run`), plus `probe --all` through the published ports; where it does not, the image's
#      binary is extracted and run under qemu directly with the image's health command. A NOTE
#      line says which was possible.
# Prints PASS/FAIL lines and exits non-zero on any failure. Cleans up what it made (images,
# containers, processes; the binfmt entry if it enabled it). Needs root. Installs
# qemu-user-static, binfmt-support, file, python3 and what scripts/release.sh needs, when
# missing.
#
# Environment: GDA_CROSS_PORT (the emulated agent, default 18893), GDA_CROSS_CPORT (the arm64
# container, 18894), GDA_CROSS_ECHO_PORT (echo servers, 18902), GDA_CROSS_FWD_PORT (the
# forwards, this and the next, 18903), GDA_CROSS_NO_BINFMT=1 (take the direct-qemu path for the
# image even where binfmt works), KEEP=1 keeps the work folder. CARGO_TARGET_DIR is honoured.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PORT="${GDA_CROSS_PORT:-18893}"
CPORT="${GDA_CROSS_CPORT:-18894}"
ECHO_PORT="${GDA_CROSS_ECHO_PORT:-18902}"
FWD_TCP="${GDA_CROSS_FWD_PORT:-18903}"
FWD_UDP=$((FWD_TCP + 1))
WORK="$(mktemp -d /tmp/godoxy-cross-test.XXXXXX)"
IMAGE="localhost/godoxy-agent-cross-test:$$"
CTR="godoxy-agent-cross-test-$$"
export CONTAINERS_CONF="$ROOT/scripts/containers.conf"
PODMAN=(timeout 120 podman --runtime runc)
T0=$SECONDS

failures=0
pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }
step() { echo; echo "== $* (at $((SECONDS - T0))s)"; }
die() { echo "FAIL: $*"; exit 1; }

PIDS=()
BINFMT_ENABLED_HERE=""
IMAGES_MADE=""
cleanup() {
  set +e
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  "${PODMAN[@]}" rm -f -t 5 "$CTR" >/dev/null 2>&1
  if [ -n "$IMAGES_MADE" ]; then
    "${PODMAN[@]}" manifest rm "$IMAGE" >/dev/null 2>&1
    "${PODMAN[@]}" rmi -f "$IMAGE-amd64" "$IMAGE-arm64" >/dev/null 2>&1
  fi
  [ -n "$BINFMT_ENABLED_HERE" ] && update-binfmts --disable qemu-aarch64 >/dev/null 2>&1
  if [ "${KEEP:-}" = 1 ]; then echo "work folder kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# Waits (bounded) until a TCP port on 127.0.0.1 accepts.
wait_port() {
  local i
  for i in $(seq 1 150); do
    if timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; then return 0; fi
    sleep 0.2
  done
  return 1
}
# Waits (bounded) until file $1 holds the text $2.
wait_log() {
  local i
  for i in $(seq 1 150); do
    grep -q "$2" "$1" 2>/dev/null && return 0
    sleep 0.2
  done
  return 1
}

# ---------------------------------------------------------------------------------------------
step "prerequisites"
[ "$(id -u)" = 0 ] || die "run as root (binfmt_misc, rootful podman)"
need=()
for pair in qemu-aarch64-static:qemu-user-static update-binfmts:binfmt-support file:file \
            python3:python3 openssl:openssl podman:podman runc:runc; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
[ -e /usr/lib/cni/bridge ] || need+=(containernetworking-plugins)
if [ "${#need[@]}" -gt 0 ]; then
  echo "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  timeout 300 apt-get update -qq
  timeout 600 apt-get install -y -qq "${need[@]}" >/dev/null
fi
QEMU=$(command -v qemu-aarch64-static)
echo "$($QEMU --version | head -1), podman $(podman --version | awk '{print $3}')"
busy=$(ss -Hltnup "( sport = :$PORT or sport = :$CPORT or sport = :$ECHO_PORT or sport = :$FWD_TCP or sport = :$FWD_UDP )" 2>/dev/null |
         awk '{print $1, $5, $7}' || true)
[ -z "$busy" ] || die "port(s) in use (choose others with GDA_CROSS_*PORT): $(tr '\n' ';' <<<"$busy")"

# ---------------------------------------------------------------------------------------------
step "scripts/release.sh: both binaries, checksums, images and the manifest"
IMAGES_MADE=1
set +e
# The size budget is enforced (docs/DEPLOY.md#size): a binary or image over it fails release.sh.
GDA_DIST="$WORK/dist" GDA_IMAGE="$IMAGE" "$ROOT/scripts/release.sh" 2>&1 |
  tee "$WORK/release.log"
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" = 0 ]; then
  pass "scripts/release.sh: $(tail -1 "$WORK/release.log")"
else
  fail "scripts/release.sh exited $rc: $(grep -c '^FAIL' "$WORK/release.log") failed check(s) above"
fi
X86=$(ls "$WORK"/dist/godoxy-agent-*-x86_64-unknown-linux-musl 2>/dev/null | head -1)
ARM=$(ls "$WORK"/dist/godoxy-agent-*-aarch64-unknown-linux-musl 2>/dev/null | head -1)
[ -x "$X86" ] && [ -x "$ARM" ] || die "release.sh made no binaries"
VERSION=$(basename "$X86" | sed 's/^godoxy-agent-\(.*\)-x86_64-unknown-linux-musl$/\1/')

# ---------------------------------------------------------------------------------------------
step "file: architecture and static linking"
for pair in "$X86:x86-64" "$ARM:ARM aarch64"; do
  bin=${pair%%:*} want=${pair#*:} desc=$(file -b "${pair%%:*}")
  if [[ "$desc" == *"$want"* ]] && [[ "$desc" =~ static(-pie)?\ linked|statically\ linked ]]; then
    pass "file $(basename "$bin"): $desc"
  else
    fail "file $(basename "$bin"): want $want, static: $desc"
  fi
done
if readelf -d "$ARM" 2>/dev/null | grep -q NEEDED; then
  fail "aarch64 binary has NEEDED entries: $(readelf -d "$ARM" | grep NEEDED | tr -s ' ')"
else
  pass "aarch64 binary: no NEEDED entries (no shared libraries)"
fi

# ---------------------------------------------------------------------------------------------
step "the aarch64 binary under $QEMU"
ARMQ=("$QEMU" "$ARM")
out=$("${ARMQ[@]}" --version 2>&1) || true
[ "$out" = "godoxy-agent $VERSION" ] && pass "aarch64 --version: $out" || fail "aarch64 --version: '$out'"

C="$WORK/certs"
if out=$("${ARMQ[@]}" certs init --out "$C" 2>&1) && [ -s "$C/ca.pem" ] && [ -s "$C/server.key" ] &&
   [ -s "$C/client.pem" ] && [ -s "$C/godoxy.env" ] &&
   vout=$(openssl verify -CAfile "$C/ca.pem" "$C/server.pem" "$C/client.pem" 2>&1); then
  pass "aarch64 certs init: $(ls "$C" | tr '\n' ' '); openssl verify: $(tr '\n' ' ' <<<"$vout")"
else
  fail "aarch64 certs init: $out ${vout:-}"
fi

mkdir -p "$WORK/agent"
cat >"$WORK/agent/config.toml" <<EOF
name = "cross-test-aarch64"
[listen]
tcp = "127.0.0.1:$PORT"
udp = "127.0.0.1:$PORT"
[tls]
ca = "$C/ca.pem"
cert = "$C/server.pem"
key = "$C/server.key"
[docker]
socket = "$WORK/no-docker.sock"
EOF
if out=$("${ARMQ[@]}" check-config --config "$WORK/agent/config.toml" 2>"$WORK/check.err") &&
   grep -q "^name = \"cross-test-aarch64\"" <<<"$out" && grep -q "tcp = \"127.0.0.1:$PORT\"" <<<"$out"; then
  pass "aarch64 check-config: exit 0, $(grep -c . <<<"$out") lines of effective configuration"
else
  fail "aarch64 check-config: $out $(cat "$WORK/check.err")"
fi

# Echo servers for the tunnels' far end (this host, 127.0.0.1).
cat >"$WORK/echo.py" <<'PY'
import socket, sys, threading, time
port, lifetime = int(sys.argv[1]), float(sys.argv[2])
def tcp_conn(c):
    with c:
        c.settimeout(30)
        try:
            while (d := c.recv(65536)):
                c.sendall(d)
        except OSError:
            pass
def tcp_loop(s):
    while True:
        c, _ = s.accept()
        threading.Thread(target=tcp_conn, args=(c,), daemon=True).start()
def udp_loop(u):
    while True:
        d, a = u.recvfrom(65536)
        u.sendto(d, a)
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port)); s.listen(64)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("127.0.0.1", port))
threading.Thread(target=tcp_loop, args=(s,), daemon=True).start()
threading.Thread(target=udp_loop, args=(u,), daemon=True).start()
print("echo ready", flush=True)
time.sleep(lifetime)
PY
timeout 900 python3 "$WORK/echo.py" "$ECHO_PORT" 890 >"$WORK/echo.log" 2>&1 &
PIDS+=($!)
wait_log "$WORK/echo.log" ready || die "echo servers: $(cat "$WORK/echo.log")"

# The live aarch64 agent.
"${ARMQ[@]}" run --config "$WORK/agent/config.toml" >"$WORK/agent.log" 2>&1 &
AGENT_PID=$!
PIDS+=("$AGENT_PID")
if wait_port "$PORT" && wait_log "$WORK/agent.log" 'agent listening'; then
  pass "aarch64 agent: $(grep -o 'agent listening.*' "$WORK/agent.log" | head -1)"
else
  cat "$WORK/agent.log"; die "the aarch64 agent did not start"
fi

if out=$(timeout 60 "$X86" probe --certs "$C" --server "127.0.0.1:$PORT" --all 2>&1); then
  pass "x86_64 probe --all against the aarch64 agent: $(tr '\n' ';' <<<"$out")"
else
  fail "x86_64 probe --all against the aarch64 agent: $out"
fi

"$X86" forward --certs "$C" --server "127.0.0.1:$PORT" --listen "127.0.0.1:$FWD_TCP" \
  --target "127.0.0.1:$ECHO_PORT" >"$WORK/fwd-tcp.log" 2>&1 &
FWD_PIDS=($!)
"$X86" forward --certs "$C" --server "127.0.0.1:$PORT" --listen "127.0.0.1:$FWD_UDP" \
  --target "127.0.0.1:$ECHO_PORT" --udp >"$WORK/fwd-udp.log" 2>&1 &
FWD_PIDS+=($!)
PIDS+=("${FWD_PIDS[@]}")
wait_log "$WORK/fwd-tcp.log" 'forwarding TCP' || fail "forward (TCP) did not start: $(cat "$WORK/fwd-tcp.log")"
wait_log "$WORK/fwd-udp.log" 'forwarding UDP' || fail "forward --udp did not start: $(cat "$WORK/fwd-udp.log")"
cat >"$WORK/client.py" <<'PY'
import os, socket, sys
proto, port = sys.argv[1], int(sys.argv[2])
payload = f"{proto}-through-aarch64-".encode() + os.urandom(8).hex().encode()
if proto == "tcp":
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            d = s.recv(65536)
            if not d:
                break
            got += d
else:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(10)
        got = b""
        for _ in range(3):  # the first datagram waits for the DTLS handshake; resend if lost
            s.sendto(payload, ("127.0.0.1", port))
            try:
                got = s.recv(65536)
                break
            except socket.timeout:
                continue
if got != payload:
    sys.exit(f"sent {payload!r}, got {got!r}")
print(f"{len(got)} bytes '{payload.decode()}' echoed")
PY
for proto in tcp udp; do
  [ "$proto" = tcp ] && lport=$FWD_TCP || lport=$FWD_UDP
  if out=$(timeout 60 python3 "$WORK/client.py" "$proto" "$lport" 2>&1); then
    pass "$proto echo: x86_64 forward -> aarch64 agent -> 127.0.0.1:$ECHO_PORT: $out"
  else
    fail "$proto echo through the aarch64 agent: $out"
  fi
done
# The forwards drain on SIGTERM (close_notify), so the agent ends both tunnels and logs them.
kill -TERM "${FWD_PIDS[@]}" 2>/dev/null || true
wait "${FWD_PIDS[@]}" 2>/dev/null || true
for proto in tcp udp; do
  if wait_log "$WORK/agent.log" "tunnel closed transport=$proto destination=127.0.0.1:$ECHO_PORT up_bytes="; then
    pass "aarch64 agent logged: $(grep -o "tunnel closed transport=$proto destination=127.0.0.1:$ECHO_PORT up_bytes=[0-9]* down_bytes=[0-9]*" "$WORK/agent.log" | head -1)"
  else
    fail "aarch64 agent: no 'tunnel closed transport=$proto ...' line"; grep 'tunnel closed' "$WORK/agent.log" | tail -3
  fi
done

# The image's health command, run by the aarch64 binary against the aarch64 agent.
if out=$(timeout 60 env AGENT_PORT="$PORT" "${ARMQ[@]}" health --config "$WORK/agent/config.toml" --timeout 10s 2>&1); then
  pass "aarch64 health against the aarch64 agent: $(tr '\n' ' ' <<<"$out")"
else
  fail "aarch64 health: $out"
fi

kill -TERM "$AGENT_PID"
code=0
timeout 30 tail --pid="$AGENT_PID" -f /dev/null || true
wait "$AGENT_PID" || code=$?
if [ "$code" = 0 ] && grep -q 'shutdown complete' "$WORK/agent.log"; then
  pass "aarch64 agent: SIGTERM -> exit 0, 'shutdown complete' logged"
else
  fail "aarch64 agent: SIGTERM -> exit $code"; tail -5 "$WORK/agent.log"
fi

# ---------------------------------------------------------------------------------------------
step "the arm64 image"
# binfmt_misc: mount it if it is not, and register Debian's qemu-aarch64 entry (flag F: the
# interpreter is opened now, so it works inside containers too). Some kernels or sandboxes
# refuse; then the image's binary runs under qemu directly.
binfmt=""
if [ "${GDA_CROSS_NO_BINFMT:-}" != 1 ]; then
  [ -e /proc/sys/fs/binfmt_misc/status ] ||
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc >/dev/null 2>&1 || true
  if [ -e /proc/sys/fs/binfmt_misc/status ] && [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 && BINFMT_ENABLED_HERE=1
  fi
  if grep -q '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null &&
     [ "$("$ARM" --version 2>/dev/null)" = "godoxy-agent $VERSION" ]; then
    binfmt=1
  fi
fi
IMGC="$IMAGE-arm64"
podman image exists "$IMGC" || die "no image $IMGC from release.sh"
if [ -n "$binfmt" ]; then
  echo "NOTE: binfmt_misc: qemu-aarch64 registered ($(sed -n 's/^flags: //p' /proc/sys/fs/binfmt_misc/qemu-aarch64) flags${BINFMT_ENABLED_HERE:+, enabled by this script}); the arm64 image runs under podman --arch arm64"
  # The manifest list's linux/arm64 entry must be the image run below. (podman 4.3 does not
  # pick another architecture's instance from a local list for `run --arch`, so the
  # per-architecture image is run; a registry pull picks it by the list.)
  list_digest=$(podman manifest inspect "$IMAGE" | python3 -c 'import json,sys
print(" ".join(m["digest"] for m in json.load(sys.stdin)["manifests"] if m["platform"]["architecture"] == "arm64"))')
  img_digest=$(podman image inspect --format '{{.Digest}}' "$IMGC")
  if [ -n "$list_digest" ] && [ "$list_digest" = "$img_digest" ]; then
    pass "manifest $IMAGE: linux/arm64 -> $list_digest, the image $IMGC"
  else
    fail "manifest $IMAGE: linux/arm64 -> '$list_digest', but $IMGC is $img_digest"
  fi
  grep -E '^AGENT_(CA|SSL)_CERT=' "$C/godoxy.env" >"$WORK/agent.env"
  if "${PODMAN[@]}" run -d --name "$CTR" --arch arm64 \
       -p "127.0.0.1:$CPORT:8890/tcp" -p "127.0.0.1:$CPORT:8890/udp" \
       --env-file "$WORK/agent.env" \
       -e AGENT_NAME=cross-test-arm64 -e AGENT_PORT=8890 \
       --read-only --cap-drop ALL --health-interval=disable \
       "$IMGC" >/dev/null 2>"$WORK/run.err"; then
    pass "podman run --arch arm64 $IMGC"
  else
    fail "podman run --arch arm64: $(cat "$WORK/run.err")"
  fi
  img_arch=$(podman image inspect --format '{{.Os}}/{{.Architecture}}' \
               "$(podman inspect --format '{{.Image}}' "$CTR" 2>/dev/null)" 2>/dev/null || true)
  [ "$img_arch" = linux/arm64 ] && pass "the container's image is $img_arch" ||
    fail "the container's image is '$img_arch'"
  if wait_port "$CPORT"; then
    # The same check the x86_64 image passes in scripts/container-test.sh.
    if out=$("${PODMAN[@]}" healthcheck run "$CTR" 2>&1); then
      pass "arm64 HEALTHCHECK (podman healthcheck run): $(podman inspect --format \
        '{{.State.Health.Status}}' "$CTR" 2>/dev/null) / $(podman inspect --format \
        '{{with index .State.Health.Log 0}}{{.Output}}{{end}}' "$CTR" 2>/dev/null | tr '\n' ' ')"
    else
      fail "arm64 HEALTHCHECK: $out $(podman inspect --format '{{json .State.Health}}' "$CTR")"
    fi
    if out=$(timeout 60 "$X86" probe --certs "$C" --server "127.0.0.1:$CPORT" --all 2>&1); then
      pass "x86_64 probe --all against the arm64 container: $(tr '\n' ';' <<<"$out")"
    else
      fail "x86_64 probe --all against the arm64 container: $out"
    fi
  else
    fail "arm64 container: port $CPORT never opened"; podman logs "$CTR" 2>&1 | tail -10
  fi
  "${PODMAN[@]}" stop -t 30 "$CTR" >/dev/null 2>&1 || true
  code=$(podman inspect --format '{{.State.ExitCode}}' "$CTR" 2>&1)
  [ "$code" = 0 ] && pass "arm64 container: stop -> exit 0" || fail "arm64 container: stop -> exit '$code'"
else
  echo "NOTE: binfmt_misc for qemu-aarch64 is not available here${GDA_CROSS_NO_BINFMT:+ (GDA_CROSS_NO_BINFMT=1)}; the image's binary is extracted and run under $QEMU directly"
  "${PODMAN[@]}" create --name "$CTR" --arch arm64 "$IMGC" >/dev/null || die "podman create $IMGC"
  "${PODMAN[@]}" cp "$CTR:/godoxy-agent" "$WORK/image-godoxy-agent" || die "podman cp from $IMGC"
  if cmp -s "$WORK/image-godoxy-agent" "$ARM"; then
    pass "the arm64 image's /godoxy-agent is the aarch64 release binary"
  else
    fail "the arm64 image's /godoxy-agent differs from $ARM"
  fi
  hc=$(podman image inspect --format '{{join .Config.Healthcheck.Test " "}}' "$IMGC")
  # The image's environment: GoDoxy's variables only, the default config path absent.
  envs=(env -i AGENT_NAME=cross-test-arm64 AGENT_PORT="$CPORT"
        "$(grep '^AGENT_CA_CERT=' "$C/godoxy.env")" "$(grep '^AGENT_SSL_CERT=' "$C/godoxy.env")")
  "${envs[@]}" "$QEMU" "$WORK/image-godoxy-agent" run >"$WORK/image-agent.log" 2>&1 &
  IPID=$!
  PIDS+=("$IPID")
  if wait_port "$CPORT" && wait_log "$WORK/image-agent.log" 'agent listening'; then
    # The HEALTHCHECK's command ("CMD-SHELL"-free exec form: CMD /godoxy-agent health ...).
    read -r -a hcmd <<<"${hc#CMD }"
    if out=$(timeout 60 "${envs[@]}" "$QEMU" "$WORK/image-godoxy-agent" "${hcmd[@]:1}" 2>&1); then
      pass "arm64 image's HEALTHCHECK command ($hc) under qemu: $(tr '\n' ' ' <<<"$out")"
    else
      fail "arm64 image's HEALTHCHECK command ($hc): $out"
    fi
  else
    fail "the image's binary did not start under qemu"; tail -10 "$WORK/image-agent.log"
  fi
  kill -TERM "$IPID" 2>/dev/null || true
  wait "$IPID" 2>/dev/null || true
fi

# ---------------------------------------------------------------------------------------------
echo
grep '^OVER BUDGET' "$WORK/release.log" | sed 's/^/NOTE: /' || true
echo "cross-test: $((SECONDS - T0))s in all"
if [ "$failures" -eq 0 ]; then
  echo "cross-test: all checks passed"
else
  echo "cross-test: $failures check(s) FAILED"
  exit 1
fi
