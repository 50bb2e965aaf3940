#!/usr/bin/env bash
# Builds the container image without any image registry and tests it for real with podman:
#   1. a static musl binary built on this host, handed to the Dockerfile as its `builder`
#      stage (podman build --build-context builder=DIR), final stage FROM scratch; the image's
#      user, HEALTHCHECK and GoDoxy labels (proxy.exclude, proxy.#1.healthcheck.disable);
#   2. a Docker engine (podman's Docker API, scripts/docker-engine.sh) whose socket is
#      root:<docker gid> 0660 as Docker makes it, holding one container;
#   3. `podman run` with published TCP+UDP ports, only GoDoxy's variables (AGENT_NAME,
#      AGENT_PORT, AGENT_CA_CERT, AGENT_SSL_CERT from `certs init`'s godoxy.env, RUNTIME,
#      DOCKER_SOCKET), the engine's socket mounted read-only at /var/run/docker.sock and its
#      group added (--group-add): /godoxy/agent/info over mTLS (curl), a TCP tunnel (python3
#      ssl) and a UDP tunnel (openssl s_client -dtls1_2) to echo servers on this host, the
#      Docker API through the agent (/_ping, /containers/json, a refused POST), check-config
#      in the container, the image's HEALTHCHECK, the user it runs as, and a clean exit 0 on
#      SIGTERM;
#   4. the same through compose.yaml with podman-compose (host networking, like GoDoxy; the
#      socket and its group from .env: DOCKER_SOCKET, DOCKER_GID).
# Prints PASS/FAIL lines and exits non-zero on any failure. Cleans up what it made.
# Needs root (rootful podman). Installs podman, runc, musl-tools, openssl, curl, python3 and
# podman-compose when missing, and the rustup musl target.
#
# Environment: GDA_PORT (podman run, default 18890), GDA_COMPOSE_PORT (18891),
# GDA_ECHO_PORT (18900), GDA_DOCKER_GID (the docker group's number when the host has none:
# 61240), KEEP=1 keeps the work folder. CARGO_TARGET_DIR is honoured.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PORT="${GDA_PORT:-18890}"
CPORT="${GDA_COMPOSE_PORT:-18891}"
ECHO_PORT="${GDA_ECHO_PORT:-18900}"
TARGET=x86_64-unknown-linux-musl
IMAGE="localhost/godoxy-agent:container-test-$$"
CTR="godoxy-agent-test-$$"
PROJECT="gdatest$$"
WORK="$(mktemp -d /tmp/godoxy-container-test.XXXXXX)"
ENGINE="$WORK/engine"
# The docker group: the host's when it has one, else a number that stands in for it.
DOCKER_GID=$(getent group docker | cut -d: -f3 || true)
DOCKER_GID="${DOCKER_GID:-${GDA_DOCKER_GID:-61240}}"
export CONTAINERS_CONF="$ROOT/scripts/containers.conf"
PODMAN=(timeout 120 podman --runtime runc)

failures=0
pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }
step() { echo; echo "== $*"; }
die() { echo "FAIL: $*"; exit 1; }

ECHO_PID=""
COMPOSE_UP=""
ENGINE_UP=""
cleanup() {
  set +e
  if [ -n "$COMPOSE_UP" ]; then
    (cd "$WORK/compose" && timeout 90 podman-compose -p "$PROJECT" down -t 5 >/dev/null 2>&1)
  fi
  "${PODMAN[@]}" rm -f -t 5 "$CTR" >/dev/null 2>&1
  "${PODMAN[@]}" rmi -f "$IMAGE" >/dev/null 2>&1
  [ -n "$ECHO_PID" ] && kill "$ECHO_PID" 2>/dev/null
  if [ -n "$ENGINE_UP" ]; then
    timeout 120 "$ROOT/scripts/docker-engine.sh" stop "$ENGINE" >>"$WORK/engine.log" 2>&1 ||
      echo "cleanup: scripts/docker-engine.sh stop $ENGINE failed (see $WORK/engine.log)"
  fi
  if [ "${KEEP:-}" = 1 ]; then echo "work folder kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# ---------------------------------------------------------------------------------------------
step "prerequisites"
[ "$(id -u)" = 0 ] || die "run as root (rootful podman)"
need=()
for pair in podman:podman runc:runc musl-gcc:musl-tools openssl:openssl curl:curl \
            python3:python3 iptables:iptables; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
# Rootful bridge networking needs the CNI plugins (a dependency of Debian's podman).
[ -e /usr/lib/cni/bridge ] || need+=(containernetworking-plugins)
if [ "${#need[@]}" -gt 0 ]; then
  echo "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  timeout 300 apt-get update -qq
  timeout 600 apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! command -v podman-compose >/dev/null 2>&1; then
  echo "installing podman-compose (pip)"
  timeout 300 python3 -m pip install -q podman-compose
  hash -r
fi
command -v podman-compose >/dev/null 2>&1 || die "podman-compose not on PATH after pip install"
# The ports must be free: another program there would answer in the agents' place.
busy=$(ss -Hltnup "( sport = :$PORT or sport = :$CPORT or sport = :$ECHO_PORT )" 2>/dev/null |
         awk '{print $1, $5, $7}' || true)
[ -z "$busy" ] || die "port(s) in use (choose others with GDA_PORT, GDA_COMPOSE_PORT, GDA_ECHO_PORT): $(tr '\n' ';' <<<"$busy")"
rustup target list --installed | grep -qx "$TARGET" || timeout 300 rustup target add "$TARGET"
echo "podman $(podman --version | awk '{print $3}'), $(runc --version | head -1)," \
     "podman-compose $(podman-compose --version 2>/dev/null | awk '/podman-compose/ {print $3}')"

# ---------------------------------------------------------------------------------------------
step "static musl binary"
start=$SECONDS
(cd "$ROOT" && timeout 900 cargo build --release --locked --bin godoxy-agent --target "$TARGET") ||
  die "cargo build --release --target $TARGET"
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/$TARGET/release/godoxy-agent"
[ -x "$BIN" ] || die "no binary at $BIN"
echo "built in $((SECONDS - start))s: $BIN ($(stat -c %s "$BIN") bytes)"
if readelf -d "$BIN" 2>/dev/null | grep -q NEEDED; then
  fail "binary has dynamic dependencies: $(readelf -d "$BIN" | grep NEEDED | tr -s ' ')"
else
  pass "binary is static (no NEEDED entries)"
fi
HAS_HEALTH=0
"$BIN" health --help >/dev/null 2>&1 && HAS_HEALTH=1

# ---------------------------------------------------------------------------------------------
step "image (final stage FROM scratch, builder stage replaced by a local folder)"
mkdir -p "$WORK/ctx"
cp "$BIN" "$WORK/ctx/godoxy-agent"
install -d -m 0700 "$WORK/ctx/state"
# --format docker: the OCI image format has no HEALTHCHECK. --layers=false: no cached
# intermediate images left behind.
if "${PODMAN[@]}" build --format docker --layers=false --build-context builder="$WORK/ctx" \
     -t "$IMAGE" -f "$ROOT/Dockerfile" "$ROOT" >"$WORK/build.log" 2>&1; then
  pass "podman build --build-context builder=DIR (nothing pulled)"
else
  cat "$WORK/build.log"; die "podman build"
fi
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
echo "image size: $size bytes ($(awk "BEGIN {printf \"%.1f\", $size / 1048576}") MiB)"
user=$(podman image inspect --format '{{.Config.User}}' "$IMAGE")
hc=$(podman image inspect --format '{{json .Config.Healthcheck}}' "$IMAGE")
[ "$user" = "65532:65532" ] && pass "image USER is $user" || fail "image USER is '$user'"
case "$hc" in *health*) pass "image has a HEALTHCHECK: $hc" ;; *) fail "no HEALTHCHECK: $hc" ;; esac
labels=$(podman image inspect --format \
  'proxy.exclude={{index .Config.Labels "proxy.exclude"}} proxy.#1.healthcheck.disable={{index .Config.Labels "proxy.#1.healthcheck.disable"}}' \
  "$IMAGE")
if [ "$labels" = "proxy.exclude=1 proxy.#1.healthcheck.disable=true" ]; then
  pass "image labels for GoDoxy: $labels"
else
  fail "image labels: '$labels'"
fi

# ---------------------------------------------------------------------------------------------
step "certificates and test helpers"
"$BIN" certs init --out "$WORK/certs" >/dev/null
C="$WORK/certs"
# Only GoDoxy's variables, exactly as godoxy.env has them (CA cert;CA key, cert;key).
grep -E '^AGENT_(CA|SSL)_CERT=' "$C/godoxy.env" >"$WORK/agent.env"
# No client certificate goes into the container: `health` needs none.
# The GoDoxy version the agent reports in /info: its default, as check-config prints it.
GODOXY_VERSION=$(env -i "$(grep '^AGENT_CA_CERT=' "$WORK/agent.env")" \
                   "$(grep '^AGENT_SSL_CERT=' "$WORK/agent.env")" "$BIN" check-config 2>/dev/null |
                 sed -n 's/^godoxy_version = "\(.*\)"$/\1/p')
[ -n "$GODOXY_VERSION" ] || die "no godoxy_version in check-config's output"

cat >"$WORK/gda.py" <<'PY'
"""Echo servers, a TCP tunnel client and a DTLS record feeder for container-test.sh."""
import os, socket, ssl, struct, sys, threading, time, zlib

def header(host, port, flag=0):
    h, p = host.encode(), str(port).encode()
    b = (b"0.1.0\0\0\0" + bytes([len(h)]) + h.ljust(255, b"\0")
         + bytes([len(p)]) + p.ljust(5, b"\0") + bytes([flag]))
    assert len(b) == 271
    return b + struct.pack(">I", zlib.crc32(b) & 0xFFFFFFFF)

def echo(addrs, port, lifetime):
    """TCP and UDP echo on each address, for at most `lifetime` seconds."""
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
    for a in addrs:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((a, port)); s.listen(64)
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind((a, port))
        threading.Thread(target=tcp_loop, args=(s,), daemon=True).start()
        threading.Thread(target=udp_loop, args=(u,), daemon=True).start()
    print("echo ready", flush=True)
    time.sleep(lifetime)

def tcp_tunnel(server, port, certs, dhost, dport):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(os.path.join(certs, "ca.pem"))
    ctx.load_cert_chain(os.path.join(certs, "client.pem"), os.path.join(certs, "client.key"))
    ctx.set_alpn_protocols(["godoxy-agent-stream/1"])
    payload = b"tcp-through-tunnel-" + os.urandom(8).hex().encode()
    with socket.create_connection((server, port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="godoxy.agent") as s:
            if s.selected_alpn_protocol() != "godoxy-agent-stream/1":
                sys.exit(f"ALPN not negotiated: {s.selected_alpn_protocol()}")
            s.sendall(header(dhost, dport) + payload)  # payload right behind the header
            version = s.version()
            got = b""
            while len(got) < len(payload):
                d = s.recv(65536)
                if not d:
                    break
                got += d
    if got != payload:
        sys.exit(f"echo mismatch: sent {payload!r} got {got!r}")
    print(f"{len(got)} bytes echoed by {dhost}:{dport} ({version})")

def udp_feed(dhost, dport, payload):
    """stdin of `openssl s_client -dtls1_2`: each write becomes one DTLS record."""
    time.sleep(1.0)  # the handshake
    out = sys.stdout.buffer
    out.write(header(dhost, dport)); out.flush()
    time.sleep(0.3)
    out.write(payload.encode()); out.flush()
    time.sleep(1.5)

if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "echo":
        echo(args[0].split(","), int(args[1]), float(args[2]))
    elif cmd == "tcp":
        tcp_tunnel(args[0], int(args[1]), args[2], args[3], int(args[4]))
    elif cmd == "udpfeed":
        udp_feed(args[0], int(args[1]), args[2])
    else:
        sys.exit(f"unknown command {cmd}")
PY

# ---------------------------------------------------------------------------------------------
# The checks, run against an agent at $1:$2 whose tunnels should reach the echo servers as
# $3 (a name or address as the agent sees this host). $4: a label. $5: expected name.
check_agent() {
  local host=$1 port=$2 dest=$3 label=$4 name=$5 out payload
  if out=$(curl -sS --max-time 10 --cacert "$C/ca.pem" --cert "$C/client.pem" \
             --key "$C/client.key" --resolve "godoxy.agent:$port:$host" \
             "https://godoxy.agent:$port/godoxy/agent/info" 2>&1) &&
     [ "$out" = "{\"name\":\"$name\",\"runtime\":\"podman\",\"version\":\"$GODOXY_VERSION\"}" ]; then
    pass "$label: /godoxy/agent/info over mTLS: $out"
  else
    fail "$label: /godoxy/agent/info: $out"
  fi
  if out=$(curl -sS --max-time 10 --cacert "$C/ca.pem" --resolve "godoxy.agent:$port:$host" \
             "https://godoxy.agent:$port/godoxy/agent/info" 2>&1); then
    fail "$label: /info answered without a client certificate: $out"
  else
    pass "$label: no client certificate, no answer (curl: ${out##*: })"
  fi
  if out=$(timeout 30 python3 "$WORK/gda.py" tcp "$host" "$port" "$C" "$dest" "$ECHO_PORT" 2>&1)
  then pass "$label: TCP tunnel to $dest:$ECHO_PORT: $out"
  else fail "$label: TCP tunnel to $dest:$ECHO_PORT: $out"
  fi
  payload="udp-through-tunnel-$RANDOM$RANDOM"
  timeout 20 bash -c "python3 '$WORK/gda.py' udpfeed '$dest' '$ECHO_PORT' '$payload' |
      openssl s_client -quiet -no_ign_eof -dtls1_2 -cipher ECDHE-ECDSA-AES128-GCM-SHA256 \
        -connect '$host:$port' -cert '$C/client.pem' -key '$C/client.key' \
        -CAfile '$C/ca.pem' -servername godoxy.agent -verify_return_error" \
      >"$WORK/udp.out" 2>"$WORK/udp.err" || true
  if grep -q "$payload" "$WORK/udp.out"; then
    pass "$label: UDP tunnel (DTLS 1.2) to $dest:$ECHO_PORT: '$payload' echoed"
  else
    fail "$label: UDP tunnel to $dest:$ECHO_PORT: got '$(head -c 200 "$WORK/udp.out")'"
    tail -5 "$WORK/udp.err"
  fi
}

# The Docker API through an agent at $1:$2 (mTLS): answered by the engine, through the socket
# mounted in the container and the group added to it. $3: a label.
check_docker() {
  local host=$1 port=$2 label=$3 out
  api() {
    curl -sS --max-time 10 --cacert "$C/ca.pem" --cert "$C/client.pem" --key "$C/client.key" \
      --resolve "godoxy.agent:$port:$host" -w '\n%{http_code}' "$@" 2>&1 || true
  }
  out=$(api "https://godoxy.agent:$port/_ping")
  if [ "$(tail -1 <<<"$out")" = 200 ] && [ "$(head -1 <<<"$out")" = OK ]; then
    pass "$label: Docker API through the agent: GET /_ping -> 200 OK"
  else
    fail "$label: GET /_ping through the agent: $(tr '\n' ' ' <<<"$out")"
  fi
  out=$(api "https://godoxy.agent:$port/containers/json?all=1")
  if [ "$(tail -1 <<<"$out")" = 200 ] && grep -q "\"/$ENGINE_CTR\"" <<<"$out"; then
    pass "$label: Docker API through the agent: GET /containers/json?all=1 -> 200, lists $ENGINE_CTR"
  else
    fail "$label: GET /containers/json through the agent: $(head -c 300 <<<"$out")"
  fi
  out=$(api -X POST -H 'Content-Type: application/json' -d '{}' \
          "https://godoxy.agent:$port/containers/create")
  if [ "$(tail -1 <<<"$out")" = 403 ]; then
    pass "$label: Docker API through the agent: POST /containers/create -> 403 (docker.access = godoxy)"
  else
    fail "$label: POST /containers/create should be refused: $(tr '\n' ' ' <<<"$out")"
  fi
}

# Runs the container's health check once (podman healthcheck run) and reports.
check_health() {
  local ctr=$1 label=$2 out
  if [ "$HAS_HEALTH" != 1 ]; then
    fail "$label: HEALTHCHECK: this build has no 'health' command"
    return
  fi
  if out=$("${PODMAN[@]}" healthcheck run "$ctr" 2>&1); then
    pass "$label: HEALTHCHECK (podman healthcheck run): $(podman inspect --format \
      '{{.State.Health.Status}}' "$ctr" 2>/dev/null) / $(podman inspect --format \
      '{{with index .State.Health.Log 0}}{{.Output}}{{end}}' "$ctr" 2>/dev/null | tr '\n' ' ')"
  else
    fail "$label: HEALTHCHECK: $out $(podman inspect --format '{{json .State.Health}}' "$ctr")"
  fi
}

# Waits (bounded) for the agent's TLS port on $1:$2.
wait_port() {
  local i
  for i in $(seq 1 50); do
    if timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null; then return 0; fi
    sleep 0.2
  done
  return 1
}

# SIGTERM stop: exit code 0 and the agent's own shutdown lines.
check_stop() {
  local ctr=$1 label=$2 stop_cmd=$3 t0 code logs
  t0=$SECONDS
  eval "$stop_cmd" >/dev/null 2>&1 || true
  code=$(podman inspect --format '{{.State.ExitCode}} {{.State.Status}}' "$ctr" 2>&1)
  logs=$(podman logs "$ctr" 2>&1 | grep -v 'level=error' || true)
  if [ "$code" = "0 exited" ] && grep -q 'signal="\?SIGTERM' <<<"$logs" &&
     grep -q 'shutdown complete' <<<"$logs"; then
    pass "$label: SIGTERM stop: exit 0 after $((SECONDS - t0))s, 'shutdown complete' logged"
  else
    fail "$label: stop: state '$code'"; tail -5 <<<"$logs"
  fi
}

# ---------------------------------------------------------------------------------------------
step "a Docker engine for the relay (podman's Docker API: scripts/docker-engine.sh)"
t0=$SECONDS
ENGINE_UP=1
SOCK=$(timeout 900 "$ROOT/scripts/docker-engine.sh" start "$ENGINE" 2>>"$WORK/engine.log") ||
  { tail -20 "$WORK/engine.log"; die "scripts/docker-engine.sh start $ENGINE"; }
[ -S "$SOCK" ] || die "scripts/docker-engine.sh start printed '$SOCK', not a socket"
# As Docker makes its socket: root:docker 0660. Only the added group lets the agent in.
chgrp "$DOCKER_GID" "$SOCK"
chmod 0660 "$SOCK"
ENGINE_CTR="godoxy-container-test-$$"
timeout 60 "$ROOT/scripts/docker-engine.sh" podman "$ENGINE" create --name "$ENGINE_CTR" \
  --network none "${GDE_IMAGE:-localhost/godoxy-test:latest}" >/dev/null 2>>"$WORK/engine.log" ||
  { tail -5 "$WORK/engine.log"; die "creating a container in the engine"; }
echo "engine on $SOCK ($(stat -c '%U:%g %a' "$SOCK")) in $((SECONDS - t0))s, container $ENGINE_CTR"

# ---------------------------------------------------------------------------------------------
step "podman run: published ports $PORT/tcp+udp, GoDoxy variables only, the engine's socket"
# Agent port inside the container: GoDoxy's default 8890 (the image's HEALTHCHECK uses it);
# published on $PORT. The agent reaches this host as host.containers.internal (the bridge's
# gateway, an address of this host), which also exercises name resolution in the scratch image.
# --health-interval=disable: there is no systemd here to run podman's health-check timers;
# `podman healthcheck run` below runs the image's check by hand. The engine's socket goes
# where Docker's is, read-only (which does not stop connect()), with its group added.
"${PODMAN[@]}" run -d --name "$CTR" \
  -p "127.0.0.1:$PORT:8890/tcp" -p "127.0.0.1:$PORT:8890/udp" \
  --env-file "$WORK/agent.env" \
  -e AGENT_NAME=container-test -e AGENT_PORT=8890 -e RUNTIME=podman \
  -e DOCKER_SOCKET=/var/run/docker.sock \
  -v "$SOCK:/var/run/docker.sock:ro" --group-add "$DOCKER_GID" \
  --read-only --cap-drop ALL \
  --health-interval=disable --stop-timeout 30 \
  "$IMAGE" >/dev/null 2>"$WORK/run.err" || { cat "$WORK/run.err"; die "podman run"; }
wait_port 127.0.0.1 "$PORT" || { podman logs "$CTR"; die "agent port $PORT never opened"; }
GW=$(podman inspect --format '{{.NetworkSettings.Gateway}}' "$CTR")
[ -n "$GW" ] || die "no bridge gateway for $CTR"
echo "bridge gateway (this host, as host.containers.internal): $GW"
# Echo servers on this host: loopback (for the host-network compose run) and the gateway.
timeout 600 python3 "$WORK/gda.py" echo "127.0.0.1,$GW" "$ECHO_PORT" 590 >"$WORK/echo.log" 2>&1 &
ECHO_PID=$!
for _ in $(seq 1 50); do grep -q ready "$WORK/echo.log" && break; sleep 0.1; done
grep -q ready "$WORK/echo.log" || { cat "$WORK/echo.log"; die "echo servers"; }

# The port opens before the start-up lines are all written ("agent listening" is the last).
for _ in $(seq 1 50); do
  podman logs "$CTR" 2>&1 | grep -q 'agent listening' && break
  sleep 0.1
done
logs=$(podman logs "$CTR" 2>&1)
# A godoxy.env in GoDoxy's own form carries the CA key too: the agent drops it and warns.
ca_key=""
if grep -q '^AGENT_CA_CERT=.*;' "$WORK/agent.env"; then
  ca_key=" (CA key dropped with a warning)"
  grep -q "AGENT_CA_CERT carries the CA private key" <<<"$logs" || ca_key=" MISSING: CA key warning"
fi
if [[ "$ca_key" != *MISSING* ]] &&
   grep -q "Docker API relay ready socket=/var/run/docker.sock" <<<"$logs"; then
  pass "run: GoDoxy variables read$ca_key, $(grep -o 'Docker API relay ready.*' <<<"$logs")"
else
  fail "run: expected start-up lines missing$ca_key"; echo "$logs"
fi
ids=$(podman top "$CTR" huser hgroups 2>/dev/null | tail -1 | tr -s ' ' | sed 's/^ //')
if [ "${ids%% *}" = 65532 ] && grep -qw "$DOCKER_GID" <<<"${ids#* }"; then
  pass "run: agent process runs as uid 65532, groups ${ids#* }"
else
  fail "run: agent uid/groups '$ids' (want 65532, with $DOCKER_GID)"
fi
# check-config in the running container, as its user and with its group: the docker line.
out=$("${PODMAN[@]}" exec "$CTR" /godoxy-agent check-config 2>&1 >/dev/null || true)
if grep -q '^docker: /var/run/docker.sock answers: ' <<<"$out"; then
  pass "run: podman exec ... check-config: $(grep '^docker:' <<<"$out")"
else
  fail "run: check-config in the container: $out"
fi
check_agent 127.0.0.1 "$PORT" host.containers.internal run container-test
check_docker 127.0.0.1 "$PORT" run
check_health "$CTR" run
check_stop "$CTR" run "${PODMAN[*]} stop -t 30 $CTR"
"${PODMAN[@]}" rm -f "$CTR" >/dev/null 2>&1 || true

# ---------------------------------------------------------------------------------------------
step "podman-compose: compose.yaml as shipped, host networking, port $CPORT"
mkdir -p "$WORK/compose"
cp "$ROOT/compose.yaml" "$WORK/compose/compose.yaml"
{
  echo "GODOXY_AGENT_IMAGE=$IMAGE"
  echo "AGENT_NAME=compose-test"
  echo "AGENT_PORT=$CPORT"
  cat "$WORK/agent.env"
  echo "RUNTIME=podman"
  echo "DOCKER_SOCKET=$SOCK"
  echo "DOCKER_GID=$DOCKER_GID"
} >"$WORK/compose/.env"
COMPOSE_UP=1
if (cd "$WORK/compose" && timeout 120 podman-compose -p "$PROJECT" up -d --no-build) \
     >"$WORK/compose.log" 2>&1; then
  pass "compose: podman-compose up -d"
else
  cat "$WORK/compose.log"; fail "compose: podman-compose up"
fi
CCTR=$(podman ps -a --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}' | head -1)
if [ -n "$CCTR" ] && wait_port 127.0.0.1 "$CPORT"; then
  check_agent 127.0.0.1 "$CPORT" 127.0.0.1 compose compose-test
  check_docker 127.0.0.1 "$CPORT" compose
  check_health "$CCTR" compose
  check_stop "$CCTR" compose \
    "cd '$WORK/compose' && timeout 90 podman-compose -p '$PROJECT' stop"
else
  fail "compose: agent container '${CCTR:-none}' not listening on $CPORT"
  [ -n "$CCTR" ] && podman logs "$CCTR" 2>&1 | tail -20
fi

# ---------------------------------------------------------------------------------------------
echo
if [ "$failures" -eq 0 ]; then
  echo "container-test: all checks passed"
else
  echo "container-test: $failures check(s) FAILED"
  exit 1
fi
