#!/usr/bin/env bash
# origins.sh [DIR]: the HTTP proxy and health tests' origins (tests/peers/), started by hand
# to try an agent's /godoxy/agent/proxy/http and /godoxy/agent/health with curl: nginx (http,
# https and h2c ports, CA and certificates in DIR, JSON access log DIR/access.log) and the
# Python HTTP, WebSocket and gRPC origins, all on 127.0.0.1. Prints where each one listens,
# then runs until interrupted and stops them all. DIR defaults to a new temporary folder.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-$(mktemp -d)}
mkdir -p "$dir/tmp" "$dir/files"
dir=$(cd "$dir" && pwd)
python=$(bash "$root/tests/peers/venv.sh" "$root/target/tmp/peers-venv")
bash "$root/tests/peers/origin-certs.sh" "$dir"
echo "a small file" >"$dir/files/small.txt"

read -r http https h2c < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
sed -e "s|@DIR@|$dir|g" -e "s|@HTTP@|$http|g" -e "s|@HTTPS@|$https|g" -e "s|@H2C@|$h2c|g" \
  "$root/tests/peers/nginx.conf" >"$dir/nginx.conf"

pids=()
stop() {
  trap - EXIT INT TERM
  kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap stop EXIT INT TERM
nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" >"$dir/nginx.out" 2>&1 &
pids+=($!)
declare -A addr
for peer in http_origin ws_echo grpc_origin; do
  "$python" "$root/tests/peers/$peer.py" >"$dir/$peer.out" 2>"$dir/$peer.err" &
  pids+=($!)
  for _ in $(seq 100); do
    line=$(head -n1 "$dir/$peer.out")
    [ -n "$line" ] && break
    sleep 0.1
  done
  addr[$peer]=${line#listening }
done

cat <<INFO
folder        $dir
nginx         http 127.0.0.1:$http   https 127.0.0.1:$https (CA $dir/ca.pem)   h2c 127.0.0.1:$h2c
http_origin   ${addr[http_origin]}   (/headers /sha256 /early /sleep?ms=N /drip /hop)
ws_echo       ${addr[ws_echo]}
grpc_origin   ${addr[grpc_origin]}   (h2c; pkg.Svc/Echo, pkg.Svc/Fail)

Through an agent on 127.0.0.1:8890 with a client certificate set in ./certs, for example:
  curl --cacert certs/ca.pem --cert certs/client.pem --key certs/client.key \\
    --resolve godoxy.agent:8890:127.0.0.1 \\
    -H 'X-Proxy-Host: 127.0.0.1:$http' -H 'X-Proxy-Scheme: http' -H 'X-Proxy-Config: e30=' \\
    https://godoxy.agent:8890/godoxy/agent/proxy/http/hello
Ctrl-C stops them all.
INFO
wait
