#!/usr/bin/env bash
# Benchmark the agent against stunnel4, socat and direct connections on 127.0.0.1.
# The setup the benchmark (the workspace member bench/) does not do itself: installs socat and
# stunnel4 when missing, raises the open-files limit (the memory section holds 1000 tunnels:
# 2000+ fds here and in the agent), builds the agent and the bench in release mode, then runs
# the bench on that agent with the given arguments, e.g.:
#   scripts/bench.sh --out bench.json
#   scripts/bench.sh --quick --only tcp,rtt
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v socat >/dev/null || need+=(socat)
command -v stunnel4 >/dev/null || command -v stunnel >/dev/null || need+=(stunnel4)
if ((${#need[@]})); then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y "${need[@]}" || { $sudo apt-get update && $sudo apt-get install -y "${need[@]}"; }
fi

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cargo build --release -p godoxy-agent -p godoxy-agent-bench
target="${CARGO_TARGET_DIR:-target}"
exec "$target/release/bench" --agent "$target/release/godoxy-agent" "$@"
