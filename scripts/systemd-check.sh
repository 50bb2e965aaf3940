#!/usr/bin/env bash
# Checks systemd/godoxy-agent.service as far as a machine without systemd as PID 1 allows:
#   1. `systemd-analyze verify` on the unit (needs the ExecStart binary: the release build is
#      put at /usr/local/bin/godoxy-agent for the check when nothing is there, and removed
#      again afterwards);
#   2. `systemd-analyze security --offline=true`: prints the exposure figure, fails above
#      2.0;
#   3. the agent as the unit runs it: an unprivileged uid with no capabilities and
#      no_new_privs (setpriv), `run --config <credentials dir>/config.toml` where the
#      credentials folder is laid out as LoadCredential= makes it (0500 folder, 0400 files
#      owned by the service user) from a 0600 root-only /etc/godoxy-agent; a notify socket
#      (NOTIFY_SOCKET, WATCHDOG_USEC) records READY=1, WATCHDOG=1 and STOPPING=1; mTLS /info,
#      a TCP tunnel and the TCP and UDP probes work; SIGTERM exits 0;
#      the Docker API relay: a Docker engine (podman's Docker API, scripts/docker-engine.sh)
#      whose socket is root:<docker gid> 0660 as Docker makes it; the agent runs with that
#      group as its one supplementary group (SupplementaryGroups=docker) and /_ping and
#      /containers/json answer 200 through it; check-config as the service user says whether
#      the socket answers, with and without the group;
#   4. with strace available (installed when missing): every system call that run made is
#      allowed by the unit's SystemCallFilter= (@system-service minus @privileged @resources);
#   5. the unit as shipped under a real systemd (PID 1 in a podman container): sandbox,
#      tunnels, watchdog, stop, and the relay to the engine's socket mounted at
#      /run/docker.sock through SupplementaryGroups=docker under ProtectSystem=strict and
#      PrivateUsers=yes; then rootful podman's own socket (podman.socket with a SocketGroup=
#      drop-in), and what a missing group does to a unit.
# Needs root. Prints PASS/FAIL lines; exits non-zero on any failure.
# Environment: GDA_SYSTEMD_PORT (default 18892), GDA_ECHO_PORT (18901), GDA_DOCKER_GID (the
# docker group's number when the host has none: 61240), GDA_SKIP_BOOT=1 skips stage 5,
# KEEP=1 keeps files.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
UNIT="$ROOT/systemd/godoxy-agent.service"
PORT="${GDA_SYSTEMD_PORT:-18892}"
ECHO_PORT="${GDA_ECHO_PORT:-18901}"
MAX_EXPOSURE=2.0
SERVICE_UID=61234     # stands in for the DynamicUser= uid
# The docker group: the host's when it has one, else a number that stands in for it.
DOCKER_GID=$(getent group docker | cut -d: -f3 || true)
DOCKER_GID="${DOCKER_GID:-${GDA_DOCKER_GID:-61240}}"
WORK="$(mktemp -d /tmp/godoxy-systemd-check.XXXXXX)"
ENGINE="$WORK/engine"

failures=0
pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }
step() { echo; echo "== $*"; }
die() { echo "FAIL: $*"; exit 1; }

INSTALLED_BIN=""
AGENT_PID=""
ENGINE_UP=""
PIDS=()
cleanup() {
  set +e
  [ -n "$AGENT_PID" ] && kill -KILL "$AGENT_PID" 2>/dev/null
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  [ -n "$INSTALLED_BIN" ] && rm -f "$INSTALLED_BIN"
  [ -n "${BOOTED:-}" ] && timeout 60 podman rm -f -t 10 "$BOOT_CTR" >/dev/null 2>&1
  if [ -n "$ENGINE_UP" ]; then
    timeout 120 "$ROOT/scripts/docker-engine.sh" stop "$ENGINE" >>"$WORK/engine.log" 2>&1 ||
      echo "cleanup: scripts/docker-engine.sh stop $ENGINE failed (see $WORK/engine.log)"
  fi
  if [ "${KEEP:-}" = 1 ]; then echo "work folder kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || die "run as root"
need=()
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v setpriv >/dev/null 2>&1 || need+=(util-linux)
command -v strace >/dev/null 2>&1 || need+=(strace)
for c in curl python3; do command -v $c >/dev/null 2>&1 || need+=($c); done
if [ "${#need[@]}" -gt 0 ]; then
  echo "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  timeout 300 apt-get update -qq
  timeout 600 apt-get install -y -qq "${need[@]}" >/dev/null
fi
echo "$(systemd-analyze --version | head -1); PID 1 is '$(ps -o comm= -p 1)'"
# The ports must be free: another program there would answer in the agent's place.
busy=$(ss -Hltnup "( sport = :$PORT or sport = :$ECHO_PORT )" 2>/dev/null | awk '{print $1, $5, $7}' || true)
[ -z "$busy" ] || die "port(s) in use (choose others with GDA_SYSTEMD_PORT, GDA_ECHO_PORT): $(tr '\n' ';' <<<"$busy")"

step "release binary"
(cd "$ROOT" && timeout 900 cargo build --release --locked --bin godoxy-agent) >"$WORK/build.log" 2>&1 ||
  { tail -20 "$WORK/build.log"; die "cargo build --release"; }
tail -1 "$WORK/build.log"
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/godoxy-agent"
[ -x "$BIN" ] || die "no binary at $BIN"

# ---------------------------------------------------------------------------------------------
step "systemd-analyze verify"
EXEC=$(sed -n 's/^ExecStart=\([^ ]*\).*/\1/p' "$UNIT")
if [ ! -e "$EXEC" ]; then
  install -m 0755 "$BIN" "$EXEC"
  INSTALLED_BIN="$EXEC"
  echo "(installed $BIN as $EXEC for the check; removed at the end)"
fi
if out=$(systemd-analyze verify "$UNIT" 2>&1) && [ -z "$out" ]; then
  pass "systemd-analyze verify $(basename "$UNIT"): no findings"
else
  fail "systemd-analyze verify: ${out:-non-zero exit}"
fi

step "systemd-analyze security --offline=true"
systemd-analyze security --offline=true --no-pager "$UNIT" >"$WORK/security.txt" 2>&1 || true
grep -E '^✗' "$WORK/security.txt" | sed 's/  \+/  /g' || true
exposure=$(sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p' "$WORK/security.txt")
[ -n "$exposure" ] || { cat "$WORK/security.txt"; die "no exposure figure"; }
echo "exposure: $exposure (threshold $MAX_EXPOSURE)"
if awk -v e="$exposure" -v m="$MAX_EXPOSURE" 'BEGIN {exit !(e <= m)}'; then
  pass "security exposure $exposure <= $MAX_EXPOSURE ($(grep -o 'Overall.*' "$WORK/security.txt"))"
else
  fail "security exposure $exposure > $MAX_EXPOSURE"
fi

# ---------------------------------------------------------------------------------------------
step "a Docker engine for the relay (podman's Docker API: scripts/docker-engine.sh)"
t0=$SECONDS
ENGINE_UP=1
SOCK=$(timeout 900 "$ROOT/scripts/docker-engine.sh" start "$ENGINE" 2>>"$WORK/engine.log") ||
  { tail -20 "$WORK/engine.log"; die "scripts/docker-engine.sh start $ENGINE"; }
[ -S "$SOCK" ] || die "scripts/docker-engine.sh start printed '$SOCK', not a socket"
# As Docker makes its socket: root:docker 0660. Only the group grants the agent access.
chgrp "$DOCKER_GID" "$SOCK"
chmod 0660 "$SOCK"
# A container with a known name, for the list through the agent.
ENGINE_CTR="godoxy-systemd-check-$$"
timeout 60 "$ROOT/scripts/docker-engine.sh" podman "$ENGINE" create --name "$ENGINE_CTR" \
  --network none "${GDE_IMAGE:-localhost/godoxy-test:latest}" >/dev/null 2>>"$WORK/engine.log" ||
  { tail -5 "$WORK/engine.log"; die "creating a container in the engine"; }
echo "engine on $SOCK ($(stat -c '%U:%g %a' "$SOCK")) in $((SECONDS - t0))s, container $ENGINE_CTR"

# ---------------------------------------------------------------------------------------------
step "the agent as the unit runs it (unprivileged, config and certificates as credentials)"
# /etc/godoxy-agent as the install notes lay it out: root-only.
ETC="$WORK/etc/godoxy-agent"
mkdir -p "$ETC"
"$BIN" certs init --out "$WORK/certs" >/dev/null
install -m 0600 "$WORK/certs/ca.pem" "$WORK/certs/server.pem" "$WORK/certs/server.key" "$ETC/"
cat >"$ETC/config.toml" <<EOF
# The unit passes --config \$CREDENTIALS_DIRECTORY/config.toml; relative paths are taken from
# the config file's folder, so these name the credentials beside it.
name = "systemd-check"
[listen]
tcp = "127.0.0.1:$PORT"
udp = "127.0.0.1:$PORT"
[tls]
ca = "ca.pem"
cert = "server.pem"
key = "server.key"
[docker]
socket = "$SOCK"
EOF
chmod 0600 "$ETC/config.toml"
if out=$("$BIN" check-config --config "$ETC/config.toml" 2>&1); then
  pass "check-config as root on /etc/godoxy-agent/config.toml: relative names resolve beside it"
else
  fail "check-config: $out"
fi

# What LoadCredential= does: copies each file into a private folder owned by the service user.
CRED="$WORK/run/credentials/godoxy-agent.service"
mkdir -p "$CRED"
for f in $(sed -n 's/^LoadCredential=\([^:]*\):.*/\1/p' "$UNIT"); do
  install -m 0400 -o "$SERVICE_UID" -g "$SERVICE_UID" "$ETC/$f" "$CRED/$f"
done
chown "$SERVICE_UID:$SERVICE_UID" "$CRED"
chmod 0500 "$CRED"
chmod 0755 "$WORK" "$WORK/run" "$WORK/run/credentials"
echo "credentials: $(ls "$CRED" | tr '\n' ' ')"

# check-config as the service user, on the credentials: its stderr names the engine when the
# socket answers, or warns. With the docker group (SupplementaryGroups=docker), then without.
as_service() {
  { setpriv --reuid="$SERVICE_UID" --regid="$SERVICE_UID" "$1" --no-new-privs --inh-caps=-all \
      --bounding-set=-all env -i PATH=/usr/bin:/bin "$BIN" check-config --config "$CRED/config.toml" \
      >/dev/null; } 2>&1 || true
}
out=$(as_service --groups="$DOCKER_GID")
if grep -q "^docker: $SOCK answers: " <<<"$out"; then
  pass "check-config as the service user with the docker group: $(grep '^docker:' <<<"$out")"
else
  fail "check-config with the docker group: $out"
fi
out=$(as_service --clear-groups)
if grep -q "^warning: docker: .*Permission denied" <<<"$out"; then
  pass "check-config without the group: $(grep -o '^warning: docker: [^;]*' <<<"$out")"
else
  fail "check-config without the docker group should warn: $out"
fi

cat >"$WORK/helpers.py" <<'PY'
import os, socket, ssl, struct, sys, threading, time, zlib

def notify_listener(path, out, lifetime):
    """A NOTIFY_SOCKET: logs every sd_notify datagram with a timestamp."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path); os.chmod(path, 0o777); s.settimeout(0.5)
    end = time.time() + lifetime
    with open(out, "a") as f:
        print("ready", file=f, flush=True)
        while time.time() < end:
            try:
                d = s.recv(4096)
            except socket.timeout:
                continue
            f.write(f"{time.monotonic():.3f} {d.decode(errors='replace')!r}\n"); f.flush()

def echo(port, lifetime):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port)); s.listen(16)
    def conn(c):
        with c:
            while (d := c.recv(65536)):
                c.sendall(d)
    def loop():
        while True:
            c, _ = s.accept()
            threading.Thread(target=conn, args=(c,), daemon=True).start()
    threading.Thread(target=loop, daemon=True).start()
    time.sleep(lifetime)

def header(host, port):
    h, p = host.encode(), str(port).encode()
    b = (b"0.1.0\0\0\0" + bytes([len(h)]) + h.ljust(255, b"\0")
         + bytes([len(p)]) + p.ljust(5, b"\0") + b"\0")
    return b + struct.pack(">I", zlib.crc32(b) & 0xFFFFFFFF)

def hold(port, certs, dport, seconds):
    """Opens a tunnel and keeps it open (idle) for `seconds`, or until the agent closes it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(os.path.join(certs, "ca.pem"))
    ctx.load_cert_chain(os.path.join(certs, "client.pem"), os.path.join(certs, "client.key"))
    ctx.set_alpn_protocols(["godoxy-agent-stream/1"])
    with socket.create_connection(("127.0.0.1", port), timeout=seconds) as raw:
        with ctx.wrap_socket(raw, server_hostname="godoxy.agent") as s:
            s.sendall(header("localhost", dport))
            try:
                s.recv(1)
            except OSError:
                pass

def tcp(port, certs, dport):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(os.path.join(certs, "ca.pem"))
    ctx.load_cert_chain(os.path.join(certs, "client.pem"), os.path.join(certs, "client.key"))
    ctx.set_alpn_protocols(["godoxy-agent-stream/1"])
    payload = b"systemd-check-" + os.urandom(6).hex().encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="godoxy.agent") as s:
            s.sendall(header("localhost", dport) + payload)
            got = b""
            while len(got) < len(payload) and (d := s.recv(65536)):
                got += d
    if got != payload:
        sys.exit(f"sent {payload!r}, got {got!r}")
    print(f"{len(got)} bytes echoed by localhost:{dport}")

if __name__ == "__main__":
    c, a = sys.argv[1], sys.argv[2:]
    if c == "notify": notify_listener(a[0], a[1], float(a[2]))
    elif c == "echo": echo(int(a[0]), float(a[1]))
    elif c == "tcp": tcp(int(a[0]), a[1], int(a[2]))
    elif c == "hold": hold(int(a[0]), a[1], int(a[2]), float(a[3]))
PY

# The agent's own process: the one running $BIN (strace, when used, is its parent).
agent_pid() {
  local p
  for p in $(pgrep -f "godoxy-agent run --config $CRED" || true); do
    [ "$(readlink -f "/proc/$p/exe" 2>/dev/null)" = "$(readlink -f "$BIN")" ] && { echo "$p"; return; }
  done
}

NOTIFY="$WORK/notify.sock"
timeout 300 python3 "$WORK/helpers.py" notify "$NOTIFY" "$WORK/notify.log" 280 &
PIDS+=($!)
timeout 300 python3 "$WORK/helpers.py" echo "$ECHO_PORT" 280 &
PIDS+=($!)
for _ in $(seq 1 50); do [ -S "$NOTIFY" ] && grep -q ready "$WORK/notify.log" 2>/dev/null && break; sleep 0.1; done
[ -S "$NOTIFY" ] || die "notify listener"

STRACE=()
if command -v strace >/dev/null 2>&1 && strace -f -o /dev/null true 2>/dev/null; then
  STRACE=(strace -f -qq -o "$WORK/strace.log")
else
  echo "SKIP: strace unavailable or ptrace not permitted: system call filter not checked"
fi
# The unit's environment, as systemd would give it (no other variables): 2s watchdog so the
# pings show up quickly. The agent runs under setpriv, then (when present) strace.
"${STRACE[@]}" setpriv --reuid="$SERVICE_UID" --regid="$SERVICE_UID" --groups="$DOCKER_GID" \
  --no-new-privs --inh-caps=-all --bounding-set=-all \
  env -i PATH=/usr/bin:/bin RUST_LOG=info CREDENTIALS_DIRECTORY="$CRED" \
      NOTIFY_SOCKET="$NOTIFY" WATCHDOG_USEC=2000000 \
  "$BIN" run --config "$CRED/config.toml" >"$WORK/agent.log" 2>&1 &
AGENT_PID=$!

for _ in $(seq 1 100); do grep -q "READY=1" "$WORK/notify.log" && break; sleep 0.1; done
if grep -q "READY=1" "$WORK/notify.log"; then
  pass "READY=1 sent: $(grep -m1 READY=1 "$WORK/notify.log" | cut -d' ' -f2-)"
else
  fail "no READY=1 within 10s"; cat "$WORK/agent.log"
fi
APID=$(agent_pid)
[ -n "$APID" ] || die "agent process not found"
uid=$(awk '/^Uid:/ {print $2}' "/proc/$APID/status")
groups=$(awk '/^Groups:/ {print $2 $3}' "/proc/$APID/status")
caps=$(awk '/^CapEff:/ {print $2}' "/proc/$APID/status")
nnp=$(awk '/^NoNewPrivs:/ {print $2}' "/proc/$APID/status")
if [ "$uid" = "$SERVICE_UID" ] && [ "$groups" = "$DOCKER_GID" ] && [ "$caps" = 0000000000000000 ] &&
   [ "$nnp" = 1 ]; then
  pass "agent runs as uid $uid, groups $groups (docker), CapEff $caps, NoNewPrivs $nnp"
else
  fail "agent uid '$uid', groups '$groups', CapEff '$caps', NoNewPrivs '$nnp'"
fi

C="$WORK/certs"
if out=$(curl -sS --max-time 10 --cacert "$C/ca.pem" --cert "$C/client.pem" --key "$C/client.key" \
           --resolve "godoxy.agent:$PORT:127.0.0.1" "https://godoxy.agent:$PORT/godoxy/agent/info" 2>&1) &&
   grep -q '"name":"systemd-check"' <<<"$out"; then
  pass "/godoxy/agent/info over mTLS: $out"
else
  fail "/godoxy/agent/info: $out"
fi
if out=$(timeout 30 python3 "$WORK/helpers.py" tcp "$PORT" "$C" "$ECHO_PORT" 2>&1); then
  pass "TCP tunnel: $out"
else
  fail "TCP tunnel: $out"
fi
# The Docker API through the agent (mTLS), answered by the engine thanks to the group.
docker_api() {
  curl -sS --max-time 10 --cacert "$C/ca.pem" --cert "$C/client.pem" --key "$C/client.key" \
    --resolve "godoxy.agent:$PORT:127.0.0.1" -w '\n%{http_code}' "$@" 2>&1 || true
}
if grep -q "Docker API relay ready socket=$SOCK" "$WORK/agent.log"; then
  pass "start-up log: $(grep -o 'Docker API relay ready.*' "$WORK/agent.log")"
else
  fail "no 'Docker API relay ready' at start: $(grep -i docker "$WORK/agent.log")"
fi
out=$(docker_api "https://godoxy.agent:$PORT/_ping")
if [ "$(tail -1 <<<"$out")" = 200 ] && [ "$(head -1 <<<"$out")" = OK ]; then
  pass "Docker API through the agent: GET /_ping -> 200 OK"
else
  fail "GET /_ping through the agent: $(tr '\n' ' ' <<<"$out")"
fi
out=$(docker_api "https://godoxy.agent:$PORT/containers/json?all=1")
if [ "$(tail -1 <<<"$out")" = 200 ] && grep -q "\"/$ENGINE_CTR\"" <<<"$out"; then
  pass "Docker API through the agent: GET /containers/json?all=1 -> 200, lists $ENGINE_CTR"
else
  fail "GET /containers/json through the agent: $(head -c 300 <<<"$out")"
fi
out=$(docker_api -X POST -H 'Content-Type: application/json' -d '{}' \
        "https://godoxy.agent:$PORT/containers/create")
if [ "$(tail -1 <<<"$out")" = 403 ]; then
  pass "Docker API through the agent: POST /containers/create -> 403 (docker.access = godoxy)"
else
  fail "POST /containers/create through the agent should be refused: $(tr '\n' ' ' <<<"$out")"
fi
if "$BIN" probe --help >/dev/null 2>&1; then
  if out=$(timeout 30 "$BIN" probe --server "127.0.0.1:$PORT" --all --certs "$C" 2>&1); then
    pass "probe --all (TCP and UDP health probes): $(tr '\n' ' ' <<<"$out")"
  else
    fail "probe: $out"
  fi
else
  echo "SKIP: no probe command in this build"
fi

sleep 2.5   # a WATCHDOG_USEC of 2s: a ping every second
pings=$(grep -c "WATCHDOG=1" "$WORK/notify.log" || true)
[ "$pings" -ge 2 ] && pass "watchdog pings: $pings WATCHDOG=1 in the first seconds (WATCHDOG_USEC=2s)" \
  || fail "watchdog pings: $pings"

kill -TERM "$APID"
code=""
for _ in $(seq 1 150); do
  if ! kill -0 "$AGENT_PID" 2>/dev/null; then break; fi
  sleep 0.1
done
if kill -0 "$AGENT_PID" 2>/dev/null; then
  fail "agent still running 15s after SIGTERM"
else
  wait "$AGENT_PID" && code=0 || code=$?
  AGENT_PID=""
  if [ "$code" = 0 ] && grep -q "STOPPING=1" "$WORK/notify.log"; then
    pass "SIGTERM: STOPPING=1 sent, exit 0"
  else
    fail "SIGTERM: exit $code, STOPPING=1 $(grep -c STOPPING=1 "$WORK/notify.log") time(s)"
    tail -5 "$WORK/agent.log"
  fi
fi

# ---------------------------------------------------------------------------------------------
if [ -f "$WORK/strace.log" ]; then
  step "system calls against SystemCallFilter=@system-service ~@privileged @resources"
  # strace names the syscalls the agent (and setpriv/env before the exec) made.
  used=$(sed -n 's/^[0-9]\+ \+\([a-z_0-9]\+\)(.*/\1/p; s/^[0-9]\+ \+<\.\.\. \([a-z_0-9]\+\) resumed>.*/\1/p' \
           "$WORK/strace.log" | sort -u)
  # Syscall sets nest (@system-service holds @basic-io...): expand recursively.
  expand() {
    local item
    systemd-analyze syscall-filter --no-pager "$@" | sed -n 's/^    \([@a-z_0-9-]\+\)$/\1/p' |
      while read -r item; do
        case "$item" in @*) expand "$item" ;; *) echo "$item" ;; esac
      done
  }
  allowed=$(comm -23 <(expand @system-service | sort -u) <(expand @privileged @resources | sort -u))
  # Calls made before the agent's exec (setpriv dropping privileges, env) are not the agent's.
  agent_calls=$(awk '/execve\(".*godoxy-agent"/ {on=1} on' "$WORK/strace.log" |
                sed -n 's/^[0-9]\+ \+\([a-z_0-9]\+\)(.*/\1/p; s/^[0-9]\+ \+<\.\.\. \([a-z_0-9]\+\) resumed>.*/\1/p' | sort -u)
  denied=$(comm -23 <(echo "$agent_calls") <(echo "$allowed") | grep -v '^execve$' || true)
  echo "the agent made $(wc -l <<<"$agent_calls") distinct system calls"
  if [ -z "$denied" ]; then
    pass "every system call the agent made is allowed by the unit's filter"
  else
    fail "system calls the unit's filter would refuse (EPERM): $(tr '\n' ' ' <<<"$denied")"
  fi
fi

# ---------------------------------------------------------------------------------------------
# The unit under a real systemd: systemd as PID 1 in a podman container whose root is a scratch
# folder with this host's /usr mounted read-only (same systemd, same glibc, same tools; no image
# to pull) and its own network namespace (loopback only). Skipped with GDA_SKIP_BOOT=1.
boot_stage() {
  step "the unit under a real systemd (PID 1 in a podman container)"
  local need=() pairs p
  for p in podman:podman runc:runc; do
    command -v "${p%%:*}" >/dev/null 2>&1 || need+=("${p#*:}")
  done
  if [ "${#need[@]}" -gt 0 ]; then
    echo "installing: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    timeout 300 apt-get update -qq && timeout 600 apt-get install -y -qq "${need[@]}" >/dev/null
  fi
  export CONTAINERS_CONF="$ROOT/scripts/containers.conf"
  SYSROOT="$WORK/sysroot"
  BOOT_CTR="godoxy-systemd-check-$$"
  mkdir -p "$SYSROOT"/{proc,sys,dev,run,tmp,var/tmp,var/log,var/lib,root,usr} "$WORK/bin"
  for p in bin lib lib64 sbin; do ln -s "usr/$p" "$SYSROOT/$p"; done
  # This host's /etc without its password hashes and without the services it enables.
  cp -a /etc "$SYSROOT/"
  rm -f "$SYSROOT"/etc/{shadow,gshadow}* "$SYSROOT"/etc/systemd/system/multi-user.target.wants/*
  rm -rf "$SYSROOT/etc/godoxy-agent"
  # As on Debian: /var/run is /run. And a docker group, as a Docker host has one.
  ln -s ../run "$SYSROOT/var/run"
  grep -q '^docker:' "$SYSROOT/etc/group" || echo "docker:x:$DOCKER_GID:" >>"$SYSROOT/etc/group"
  cp "$BIN" "$WORK/bin/godoxy-agent"
  # Installed as the unit's header says: root-only /etc/godoxy-agent, the unit, enabled.
  install -d -m 0700 "$SYSROOT/etc/godoxy-agent"
  install -m 0600 "$WORK/certs/ca.pem" "$WORK/certs/server.pem" "$WORK/certs/server.key" \
    "$SYSROOT/etc/godoxy-agent/"
  printf 'name = "real-systemd"\n[tls]\nca = "ca.pem"\ncert = "server.pem"\nkey = "server.key"\n' \
    >"$SYSROOT/etc/godoxy-agent/config.toml"
  chmod 0600 "$SYSROOT/etc/godoxy-agent/config.toml"
  install -m 0644 "$UNIT" "$SYSROOT/etc/systemd/system/godoxy-agent.service"
  ln -s /etc/systemd/system/godoxy-agent.service \
    "$SYSROOT/etc/systemd/system/multi-user.target.wants/godoxy-agent.service"
  install -d -m 0700 "$SYSROOT/root/client"
  install -m 0600 "$WORK/certs/ca.pem" "$WORK/certs/client.pem" "$WORK/certs/client.key" \
    "$SYSROOT/root/client/"
  cp "$WORK/helpers.py" "$SYSROOT/root/helpers.py"

  # systemd makes / a shared mount at boot, but not inside a container; LoadCredential= needs
  # it (the credentials folder is mounted in a helper's namespace and must propagate back), so
  # the container does that first, then execs systemd as PID 1. The engine's socket (root,
  # group docker, 0660) is where Docker's is: /run/docker.sock, also /var/run/docker.sock.
  if ! timeout 120 podman --runtime runc run -d --name "$BOOT_CTR" --privileged --network none \
        --systemd=always -v /usr:/usr:ro -v "$WORK/bin:/usr/local/bin:ro" \
        -v "$SOCK:/run/docker.sock" \
        --rootfs "$SYSROOT" /bin/sh -c 'mount --make-rshared / && exec /sbin/init' \
        >"$WORK/boot.err" 2>&1; then
    echo "SKIP: cannot boot systemd in a container here: $(tail -1 "$WORK/boot.err")"
    return
  fi
  BOOTED=1
  in_ctr() { timeout 120 podman exec "$BOOT_CTR" sh -c "$1"; }
  local state="" i
  for i in $(seq 1 60); do
    state=$(in_ctr 'systemctl is-system-running' 2>/dev/null || true)
    case "$state" in running|degraded) break ;; esac
    sleep 1
  done
  echo "systemd in the container: $(in_ctr 'systemctl --version | head -1'), state '$state'"

  # The unit as shipped, LoadCredential= included. Should credentials not work in some
  # container (a root transient unit with LoadCredential= sees an empty folder when / is not
  # a shared mount), the unit is given its config by path instead and that is reported.
  wait_active() {
    local s i
    for i in $(seq 1 40); do
      s=$(in_ctr 'systemctl is-active godoxy-agent' 2>/dev/null || true)
      [ "$s" = active ] && return 0
      sleep 0.25
    done
    return 1
  }
  local creds_ok
  creds_ok=$(in_ctr 'systemd-run -q --wait --pipe -p LoadCredential=probe:/etc/hostname \
                       sh -c "test -s \$CREDENTIALS_DIRECTORY/probe && echo yes || echo no"' 2>/dev/null || true)
  if [ "$creds_ok" = yes ]; then
    if wait_active; then
      pass "systemd: unit started as shipped, config and certificates through LoadCredential="
    else
      fail "systemd: unit as shipped did not start"
      in_ctr 'journalctl -u godoxy-agent --no-pager -o cat -n 15'
      return
    fi
  else
    echo "SKIP: LoadCredential= does not work in this container (a root transient unit sees" \
         "an empty credentials folder); the unit runs with a drop-in giving it the config by path"
    in_ctr 'mkdir -p /etc/godoxy-agent-nocreds /etc/systemd/system/godoxy-agent.service.d &&
            install -m 0644 /etc/godoxy-agent/* /etc/godoxy-agent-nocreds/ &&
            printf "[Service]\nLoadCredential=\nExecStart=\nExecStart=/usr/local/bin/godoxy-agent run --config /etc/godoxy-agent-nocreds/config.toml\n" \
              >/etc/systemd/system/godoxy-agent.service.d/no-credentials.conf &&
            systemctl daemon-reload && systemctl reset-failed godoxy-agent; systemctl restart godoxy-agent' || true
    if wait_active; then
      pass "systemd: unit started (every setting as shipped but LoadCredential=/ExecStart=)"
    else
      fail "systemd: unit did not start"
      in_ctr 'journalctl -u godoxy-agent --no-pager -o cat -n 15'
      return
    fi
  fi

  local show pid status
  show=$(in_ctr 'systemctl show godoxy-agent -p Type -p StatusText -p NRestarts -p WatchdogUSec -p MainPID')
  echo "$show" | sed 's/^/  /'
  if grep -q '^StatusText=listening on' <<<"$show"; then
    pass "systemd: Type=notify start completed on READY=1 ($(sed -n 's/^StatusText=//p' <<<"$show"))"
  else
    fail "systemd: no READY status"
  fi
  pid=$(sed -n 's/^MainPID=//p' <<<"$show")
  status=$(in_ctr "grep -E '^(Uid|Groups|CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/$pid/status | tr -s '\t' ' ' | tr '\n' ' '")
  # Supplementary groups: the docker group, and the dynamic user's own (systemd adds it).
  local extra
  extra=$(in_ctr "awk '/^Gid:/ {g = \$2} /^Groups:/ {for (i = 2; i <= NF; i++) if (\$i != g) print \$i}' /proc/$pid/status" | tr '\n' ' ')
  if grep -q 'Uid: 0 ' <<<"$status" || ! grep -q 'CapEff: 0000000000000000' <<<"$status" ||
     ! grep -q 'NoNewPrivs: 1' <<<"$status" || ! grep -q 'Seccomp: 2' <<<"$status" ||
     [ "$extra" != "$DOCKER_GID " ]; then
    fail "systemd: sandbox not in force, or groups other than its own and docker ($extra): $status"
  else
    pass "systemd: dynamic user, its own group and docker ($DOCKER_GID), no capabilities, seccomp filter on: $status"
  fi
  local out
  if out=$(in_ctr 'curl -sS --max-time 10 --cacert /root/client/ca.pem --cert /root/client/client.pem \
                     --key /root/client/client.key --resolve godoxy.agent:8890:127.0.0.1 \
                     https://godoxy.agent:8890/godoxy/agent/info' 2>&1) &&
     grep -q '"name":"real-systemd"' <<<"$out"; then
    pass "systemd: /godoxy/agent/info over mTLS: $out"
  else
    fail "systemd: /info: $out"
  fi
  # The Docker API through the sandboxed agent (ProtectSystem=strict: /run is read-only;
  # PrivateUsers=yes; the group from SupplementaryGroups=docker).
  docker_in_ctr() {
    in_ctr "curl -sS --max-time ${2:-10} --cacert /root/client/ca.pem --cert /root/client/client.pem \
              --key /root/client/client.key --resolve godoxy.agent:8890:127.0.0.1 -w '\n%{http_code}' \
              'https://godoxy.agent:8890$1'" 2>&1 || true
  }
  if in_ctr 'journalctl -u godoxy-agent --no-pager -o cat' |
       grep -q 'Docker API relay ready socket=/var/run/docker.sock'; then
    pass "systemd: journal: $(in_ctr 'journalctl -u godoxy-agent --no-pager -o cat' |
                                grep -o 'Docker API relay ready.*' | tail -1)"
  else
    fail "systemd: no 'Docker API relay ready' in the journal:" \
         "$(in_ctr 'journalctl -u godoxy-agent --no-pager -o cat' | grep -i docker | tail -3)"
  fi
  out=$(docker_in_ctr /_ping)
  if [ "$(tail -1 <<<"$out")" = 200 ] && [ "$(head -1 <<<"$out")" = OK ]; then
    pass "systemd: Docker API through the unit (/run/docker.sock): GET /_ping -> 200 OK"
  else
    fail "systemd: GET /_ping through the unit: $(tr '\n' ' ' <<<"$out")"
  fi
  out=$(docker_in_ctr '/containers/json?all=1')
  if [ "$(tail -1 <<<"$out")" = 200 ] && grep -q "\"/$ENGINE_CTR\"" <<<"$out"; then
    pass "systemd: Docker API through the unit: GET /containers/json?all=1 -> 200, lists $ENGINE_CTR"
  else
    fail "systemd: GET /containers/json through the unit: $(head -c 300 <<<"$out")"
  fi
  out=$(in_ctr '/usr/local/bin/godoxy-agent check-config --config /etc/godoxy-agent/config.toml 2>&1 >/dev/null' || true)
  if grep -q '^docker: /var/run/docker.sock answers: ' <<<"$out"; then
    pass "systemd: check-config on /etc/godoxy-agent/config.toml: $(grep '^docker:' <<<"$out")"
  else
    fail "systemd: check-config's docker line: $out"
  fi
  in_ctr "(timeout 120 python3 /root/helpers.py echo $ECHO_PORT 110 >/dev/null 2>&1 &) ; sleep 0.5"
  if out=$(in_ctr "python3 /root/helpers.py tcp 8890 /root/client $ECHO_PORT" 2>&1); then
    pass "systemd: TCP tunnel through the sandboxed agent: $out"
  else
    fail "systemd: TCP tunnel: $out"
  fi
  if out=$(in_ctr '/usr/local/bin/godoxy-agent probe --server 127.0.0.1:8890 --all --certs /root/client' 2>&1); then
    pass "systemd: probe --all: $(tr '\n' ' ' <<<"$out")"
  else
    fail "systemd: probe: $out"
  fi

  # Watchdog: freeze the agent; systemd must kill it after WatchdogSec and restart it.
  local wd
  wd=$(sed -n 's/^WatchdogUSec=//p' <<<"$show")
  in_ctr "kill -STOP $pid"
  local restarted=""
  for i in $(seq 1 60); do
    sleep 1
    show=$(in_ctr 'systemctl show godoxy-agent -p NRestarts -p MainPID -p ActiveState')
    if grep -q '^NRestarts=1' <<<"$show" && grep -q '^ActiveState=active' <<<"$show" &&
       ! grep -q "^MainPID=$pid\$" <<<"$show"; then
      restarted=$i; break
    fi
  done
  if [ -n "$restarted" ] && in_ctr 'journalctl -u godoxy-agent --no-pager -o cat' | grep -q "Failed with result 'watchdog'"; then
    pass "systemd: frozen agent killed by the watchdog (WatchdogSec=$wd) and restarted ${restarted}s after SIGSTOP"
  else
    fail "systemd: watchdog restart not seen: $(tr '\n' ' ' <<<"$show")"
  fi

  # Stop with a tunnel still open: SIGTERM, the agent waits [stream] shutdown_grace (10s) for
  # it, closes it, exits 0, all inside TimeoutStopSec.
  wait_active || true
  in_ctr "(timeout 60 python3 /root/helpers.py hold 8890 /root/client $ECHO_PORT 50 >/dev/null 2>&1 &) ; sleep 1"
  local t0=$SECONDS
  in_ctr 'systemctl stop godoxy-agent' || true
  show=$(in_ctr 'systemctl show godoxy-agent -p ActiveState -p Result -p ExecMainCode -p ExecMainStatus')
  local took=$((SECONDS - t0))
  if grep -q '^ActiveState=inactive' <<<"$show" && grep -q '^Result=success' <<<"$show" &&
     grep -q '^ExecMainStatus=0' <<<"$show" &&
     in_ctr 'journalctl -u godoxy-agent --no-pager -o cat' | grep -q 'grace period over'; then
    pass "systemd: systemctl stop with a tunnel open: drained for the grace period, exit 0, result success, ${took}s"
  else
    fail "systemd: stop: $(tr '\n' ' ' <<<"$show") after ${took}s"
    in_ctr 'journalctl -u godoxy-agent --no-pager -o cat -n 8'
  fi
  local errors
  errors=$(in_ctr 'journalctl -u godoxy-agent --no-pager -o cat' | grep -E ' (ERROR|WARN) ' || true)
  if grep -q ' ERROR ' <<<"$errors"; then
    fail "systemd: the agent logged errors: $errors"
  else
    pass "systemd: no ERROR lines from the agent in the journal${errors:+ (warnings: $(wc -l <<<"$errors"))}"
    [ -n "$errors" ] && sed 's/^/  /' <<<"$errors" | head -5
  fi

  # Rootful podman's own socket, as docs/DEPLOY.md sets it up: podman.socket (from this
  # host's podman package) with a SocketGroup= drop-in; /run/podman, which podman's tmpfiles.d
  # makes root:root 0700, made passable for the group (0710 root:docker) by an override of
  # that file; the agent pointed at the socket by a drop-in. A socket already listening keeps
  # its old group until podman.socket is restarted (with podman.service stopped). The first
  # call starts podman.service through the socket.
  if in_ctr 'systemctl cat podman.socket && grep -q "^D! /run/podman 0700 root root$" /usr/lib/tmpfiles.d/podman.conf' \
       >/dev/null 2>&1; then
    in_ctr 'mkdir -p /etc/systemd/system/podman.socket.d /etc/systemd/system/godoxy-agent.service.d &&
            printf "[Socket]\nSocketGroup=docker\n" >/etc/systemd/system/podman.socket.d/group.conf &&
            sed "s|^D! /run/podman 0700 root root\$|D! /run/podman 0710 root docker|" \
              /usr/lib/tmpfiles.d/podman.conf >/etc/tmpfiles.d/podman.conf &&
            systemd-tmpfiles --create --boot /etc/tmpfiles.d/podman.conf &&
            printf "[Service]\nEnvironment=DOCKER_SOCKET=/run/podman/podman.sock RUNTIME=podman\n" \
              >/etc/systemd/system/godoxy-agent.service.d/podman.conf &&
            systemctl daemon-reload && systemctl stop podman.service podman.socket 2>/dev/null &&
            systemctl start podman.socket && systemctl start godoxy-agent' || true
    local mode
    mode=$(in_ctr 'stat -c "%U:%G %a" /run/podman /run/podman/podman.sock | tr "\n" " "' 2>&1 || true)
    if wait_active && [ "$mode" = "root:docker 710 root:docker 660 " ]; then
      out=$(docker_in_ctr /_ping 60)
      if [ "$(tail -1 <<<"$out")" = 200 ] && [ "$(head -1 <<<"$out")" = OK ]; then
        pass "systemd: podman.socket with SocketGroup=docker, /run/podman 0710 (${mode% }), DOCKER_SOCKET=/run/podman/podman.sock: GET /_ping through the unit -> 200 OK"
      else
        fail "systemd: podman socket: GET /_ping through the unit: $(tr '\n' ' ' <<<"$out")"
        in_ctr 'journalctl -u podman.service --no-pager -o cat -n 5' || true
      fi
      out=$(docker_in_ctr /version)
      if [ "$(tail -1 <<<"$out")" = 200 ] && grep -q '"Name":"Podman Engine"' <<<"$out"; then
        pass "systemd: GET /version through the unit: 200, Podman Engine"
      else
        fail "systemd: GET /version through the unit: $(head -c 300 <<<"$out")"
      fi
    else
      fail "systemd: podman.socket drop-in: folder and socket '$mode', agent $(in_ctr 'systemctl is-active godoxy-agent' || true)"
    fi
    in_ctr 'systemctl stop godoxy-agent podman.socket podman.service;
            rm -f /etc/systemd/system/godoxy-agent.service.d/podman.conf; systemctl daemon-reload' || true
  else
    echo "SKIP: no podman.socket unit, or podman's tmpfiles.d line for /run/podman differs: the podman socket set-up not tested"
  fi

  # SupplementaryGroups=docker on a host without that group: the unit does not start
  # (216/GROUP); a drop-in with an empty SupplementaryGroups= makes it start (tunnels only).
  in_ctr "sed -i '/^docker:/d' /etc/group && systemctl reset-failed godoxy-agent;
          systemctl start godoxy-agent" >/dev/null 2>&1 || true
  sleep 0.5
  show=$(in_ctr 'systemctl show godoxy-agent -p ActiveState -p ExecMainStatus' 2>&1 || true)
  if grep -q '^ExecMainStatus=216$' <<<"$show" && ! grep -q '^ActiveState=active' <<<"$show"; then
    pass "systemd: without a docker group the unit does not start: status=216/GROUP"
  else
    fail "systemd: without a docker group: $(tr '\n' ' ' <<<"$show")"
  fi
  in_ctr 'printf "[Service]\nSupplementaryGroups=\n" >/etc/systemd/system/godoxy-agent.service.d/no-docker.conf &&
          systemctl daemon-reload && systemctl reset-failed godoxy-agent; systemctl start godoxy-agent' || true
  if wait_active; then
    pass "systemd: with the drop-in SupplementaryGroups= (empty) it starts without the group"
  else
    fail "systemd: the SupplementaryGroups= drop-in did not help: $(in_ctr 'systemctl show godoxy-agent -p ActiveState -p ExecMainStatus' | tr '\n' ' ')"
  fi

  # godoxy.env as an EnvironmentFile=, parsed by this systemd: the quotes come off, the ';'
  # stays in the value, and the agent loads the certificates from the variables alone.
  install -m 0600 "$WORK/certs/godoxy.env" "$SYSROOT/root/godoxy.env"
  printf '[listen]\ntcp = "127.0.0.1:0"\nudp = ""\n[docker]\naccess = "off"\n[tls]\nca = "/none/ca.pem"\ncert = "/none/s.pem"\nkey = "/none/s.key"\n' \
    >"$SYSROOT/root/env-only.toml"
  local envfile_out first
  first=$(in_ctr 'systemd-run -q --wait --pipe -p EnvironmentFile=/root/godoxy.env \
                  sh -c "printf %s \"\$AGENT_SSL_CERT\" | cut -c1"' 2>&1 || true)
  envfile_out=$(in_ctr 'systemd-run -q --wait --pipe -p EnvironmentFile=/root/godoxy.env \
                  /usr/local/bin/godoxy-agent check-config --config /root/env-only.toml 2>&1' 2>&1 || true)
  if [ "$first" != '"' ] && grep -q 'cert = "<from $AGENT_SSL_CERT, elided>"' <<<"$envfile_out" \
     && grep -q 'ca = "<from $AGENT_CA_CERT, elided>"' <<<"$envfile_out"; then
    pass "systemd: godoxy.env as EnvironmentFile= (quotes removed by systemd): check-config loads both certificates from it"
  else
    fail "systemd: godoxy.env as EnvironmentFile=: first char '$first'; $(tail -3 <<<"$envfile_out" | tr '\n' ' ')"
  fi
}

BOOTED=""
if [ "${GDA_SKIP_BOOT:-}" = 1 ]; then
  echo; echo "SKIP: the real-systemd stage (GDA_SKIP_BOOT=1)"
else
  boot_stage
fi

echo
if [ "$failures" -eq 0 ]; then
  echo "systemd-check: all checks passed (exposure $exposure)"
else
  echo "systemd-check: $failures check(s) FAILED (exposure ${exposure:-?})"
  exit 1
fi
