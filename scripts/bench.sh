#!/usr/bin/env bash
# Benchmark the agent against stunnel4, socat and direct connections on 127.0.0.1, and its
# Docker API relay against the engine's socket.
# The setup the benchmark (the workspace member bench/) does not do itself: installs socat,
# stunnel4 and nginx when missing, raises the open-files limit (the memory section holds 1000 tunnels:
# 2000+ fds here and in the agent), builds the agent and the bench in release mode, starts a
# Docker-compatible test engine (scripts/docker-engine.sh, root; only when the docker section
# runs and no --docker-socket is given) and stops it again at the end, then runs the bench on
# that agent with the given arguments, e.g.:
#   scripts/bench.sh --out bench.json
#   scripts/bench.sh --quick --only tcp,rtt
#   scripts/bench.sh --only docker --out bench-docker.json
#   scripts/bench.sh --only proxy --out bench-proxy.json
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v socat >/dev/null || need+=(socat)
command -v stunnel4 >/dev/null || command -v stunnel >/dev/null || need+=(stunnel4)
# nginx: the proxy section's origin and the reverse proxy the agent's HTTP routes are compared
# with (Debian's package also starts its own service on port 80; the bench does not use it).
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
if ((${#need[@]})); then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y "${need[@]}" || { $sudo apt-get update && $sudo apt-get install -y "${need[@]}"; }
fi

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cargo build --release -p godoxy-agent -p godoxy-agent-bench
target="${CARGO_TARGET_DIR:-target}"

# The docker section runs unless --only leaves it out; it needs an engine's socket.
only=() socket_given=0 prev=""
for arg in "$@"; do
  case "$arg" in
    --docker-socket | --docker-socket=*) socket_given=1 ;;
    --only=*) only+=("${arg#--only=}") ;;
    *) [ "$prev" = --only ] && only+=("$arg") ;;
  esac
  prev=$arg
done
docker=1
if ((${#only[@]})); then
  docker=0
  for list in "${only[@]}"; do
    case ",$list," in *,docker,*) docker=1 ;; esac
  done
fi

extra=()
if [ "$docker" = 1 ] && [ "$socket_given" = 0 ]; then
  engine_dir="$target/bench-engine"
  if socket=$(bash scripts/docker-engine.sh start "$engine_dir"); then
    trap 'echo "bench.sh: stopping the Docker test engine" >&2
          bash scripts/docker-engine.sh stop "$engine_dir" >/dev/null 2>&1 || true' EXIT
    extra=(--docker-socket "$socket")
  else
    # The bench reports the docker section as failed (no --docker-socket) and runs the rest.
    echo "bench.sh: the Docker test engine did not start (see above): no docker section" >&2
  fi
fi

status=0
"$target/release/bench" --agent "$target/release/godoxy-agent" "${extra[@]}" "$@" || status=$?
exit "$status"
