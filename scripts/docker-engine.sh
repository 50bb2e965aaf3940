#!/usr/bin/env bash
# A Docker-compatible engine for integration tests: Debian's podman serving the Docker Engine
# API on a unix socket, with its own storage under DIR and a tiny local image built without
# any registry (FROM scratch + Debian's static busybox).
#
#   scripts/docker-engine.sh start DIR    install what is missing, start (or reuse) the service
#                                         on DIR/docker.sock, build the test image if missing;
#                                         prints the socket path (the only line on stdout)
#   scripts/docker-engine.sh stop DIR     remove every container/pod/volume/network of DIR,
#                                         stop the service, unmount what podman left under DIR
#                                         (the image stays cached in DIR for the next start)
#   scripts/docker-engine.sh purge DIR    stop, then delete DIR's storage, state and config
#   scripts/docker-engine.sh status DIR   exit 0 and print the socket path if it answers
#   scripts/docker-engine.sh env DIR      print `export DOCKER_HOST=unix://DIR/docker.sock`
#   scripts/docker-engine.sh podman DIR ARGS...   run podman CLI against DIR's storage
#
# Files in DIR: docker.sock, podman.pid, podman.log, containers.conf, storage.conf, and the
# folders storage/ (images, containers), run/ and tmp/ (runtime state, event log), net.d/.
# Nothing outside DIR is configured: the machine's default podman storage is not touched.
# Needs root (rootful podman: runc, cgroupfs, overlay, CNI bridge networking).
#
# Environment: GDE_IMAGE (default localhost/godoxy-test:latest), GDE_START_TIMEOUT (seconds
# to wait for the socket, default 60), GDE_LOCK_TIMEOUT (seconds to wait for another
# start/stop on the same DIR, default 900).
#
# The image: /bin/busybox with a symlink per applet (sh, sleep, echo, httpd, ...), /etc/passwd,
# /etc/group, /tmp. Its default command prints "tick" every second and exits 0 on SIGTERM.
# A `sh` run as PID 1 ignores SIGTERM unless it traps it: use
#   sh -c 'trap "exit 0" TERM; while true; do echo tick; sleep 1; done'
# or `docker run --init` (catatonit).
#
# Differences from Docker seen with podman 4.3.1 (Debian 12), Api-Version 1.41:
# - a container created through the Docker API without --stop-timeout gets StopTimeout 0, so
#   a plain `docker stop` sends SIGKILL at once (exit 137): give `docker run --stop-timeout N`
#   or `docker stop -t N` for a graceful stop (exit 0);
# - events come from a polled file: 0-250 ms behind; `docker stop` yields die + cleanup
#   (no "stop" action), `docker kill` yields kill + die, `docker start` init + start;
# - the default network is called "podman" (10.88.0.0/16), not "bridge".
set -euo pipefail

IMAGE="${GDE_IMAGE:-localhost/godoxy-test:latest}"
START_TIMEOUT="${GDE_START_TIMEOUT:-60}"
LOCK_TIMEOUT="${GDE_LOCK_TIMEOUT:-900}"

die() { echo "docker-engine: error: $*" >&2; exit 1; }
say() { echo "docker-engine: $*" >&2; }

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}

[ $# -ge 2 ] || usage
CMD=$1
D=$(realpath -m -- "$2")
shift 2
SOCK="$D/docker.sock"
PIDFILE="$D/podman.pid"
LOG="$D/podman.log"

# A unix socket path must fit sun_path (108 bytes with its NUL).
[ "${#SOCK}" -lt 108 ] || die "socket path too long for a unix socket (${#SOCK} bytes): $SOCK"

export CONTAINERS_CONF="$D/containers.conf"
export CONTAINERS_STORAGE_CONF="$D/storage.conf"
# Every podman call names DIR's roots explicitly too: conmon's exit command (podman
# container cleanup) is built from these flags.
PODMAN_FLAGS=(--root "$D/storage" --runroot "$D/run" --tmpdir "$D/tmp"
              --cgroup-manager cgroupfs --events-backend file --runtime runc
              --storage-driver overlay)
podman_() { timeout 120 podman "${PODMAN_FLAGS[@]}" "$@"; }

ping_ok() {
  [ -S "$SOCK" ] && [ "$(curl -s --max-time 3 --unix-socket "$SOCK" http://d/_ping 2>/dev/null)" = OK ]
}

service_pid() {
  local pid
  [ -f "$PIDFILE" ] || return 1
  pid=$(cat "$PIDFILE" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  # Alive, and still the podman we started (not a recycled pid).
  [ -r "/proc/$pid/cmdline" ] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "system service --time=0 unix://$SOCK" || return 1
  echo "$pid"
}

lock() {
  mkdir -p "$D"
  exec 9>"$D/.lock"
  flock -w "$LOCK_TIMEOUT" 9 || die "another start/stop holds $D/.lock for more than ${LOCK_TIMEOUT}s"
}

# (podman refuses to run, even --version, while CONTAINERS_CONF names a missing file.)
podman_major() {
  env -u CONTAINERS_CONF -u CONTAINERS_STORAGE_CONF podman --version 2>/dev/null |
    awk '{split($3, v, "."); print v[1] + 0}'
}

# ---------------------------------------------------------------------------------------------
install_missing() {
  [ "$(id -u)" = 0 ] || die "run as root (rootful podman)"
  local need=() pair
  for pair in podman:podman runc:runc curl:curl iptables:iptables flock:util-linux; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
  done
  [ -x /usr/libexec/podman/catatonit ] || [ -x /usr/bin/catatonit ] || need+=(catatonit)
  # The static busybox that goes into the image (busybox-static installs /bin/busybox).
  if ! { [ -x /bin/busybox ] && ! readelf -l /bin/busybox 2>/dev/null | grep -q INTERP; }; then
    need+=(busybox-static)
  fi
  if [ "${#need[@]}" -gt 0 ] || ! command -v docker >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    say "apt-get update"
    timeout 300 apt-get -o DPkg::Lock::Timeout=300 update -qq >&2 || die "apt-get update failed"
  fi
  if [ "${#need[@]}" -gt 0 ]; then
    say "installing: ${need[*]}"
    timeout 900 apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends \
      "${need[@]}" >&2 || die "apt-get install ${need[*]} failed"
  fi
  # Bridge networking: CNI plugins on podman 4 (Debian 12), netavark on podman 5.
  if [ "$(podman_major)" -ge 5 ]; then
    command -v netavark >/dev/null 2>&1 || [ -x /usr/lib/podman/netavark ] ||
      timeout 900 apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends \
        netavark aardvark-dns >&2 || die "apt-get install netavark failed"
  elif [ ! -e /usr/lib/cni/bridge ]; then
    timeout 900 apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends \
      containernetworking-plugins >&2 || die "apt-get install containernetworking-plugins failed"
  fi
  if ! command -v docker >/dev/null 2>&1; then
    if apt-cache show docker-cli >/dev/null 2>&1; then
      say "installing the docker client: docker-cli"
      timeout 900 apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends \
        docker-cli >&2 || die "apt-get install docker-cli failed"
    else
      # Debian 12 has no client-only package: take /usr/bin/docker out of docker.io without
      # installing the package (which would bring containerd and start a dockerd).
      say "installing the docker client from Debian's docker.io (client binary only)"
      local tmp
      tmp=$(mktemp -d)
      (cd "$tmp" && timeout 300 apt-get download docker.io >&2) ||
        { rm -rf "$tmp"; die "apt-get download docker.io failed"; }
      dpkg-deb -x "$tmp"/docker.io_*.deb "$tmp/x" || { rm -rf "$tmp"; die "dpkg-deb -x failed"; }
      install -m 0755 "$tmp/x/usr/bin/docker" /usr/local/bin/docker
      rm -rf "$tmp"
    fi
    hash -r
  fi
  command -v podman >/dev/null 2>&1 || die "podman not on PATH after install"
  command -v docker >/dev/null 2>&1 || die "docker client not on PATH after install"
  readelf -l /bin/busybox 2>/dev/null | grep -q INTERP && die "/bin/busybox is not static"
  return 0
}

write_config() {
  mkdir -p "$D/storage" "$D/run" "$D/tmp" "$D/net.d"
  local backend=cni
  [ "$(podman_major)" -ge 5 ] && backend=netavark
  cat >"$D/containers.conf" <<EOF
# Written by scripts/docker-engine.sh: podman for $D only.
[containers]
# podman's default nofile/nproc ulimits may exceed what this machine grants.
default_ulimits = []
# docker logs needs a log file (no journald here).
log_driver = "k8s-file"

[engine]
# No systemd as PID 1: manage cgroups directly; events to a file (no journald).
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "runc"
tmp_dir = "$D/tmp"
volume_path = "$D/storage/volumes"
static_dir = "$D/storage/libpod"

[network]
network_backend = "$backend"
network_config_dir = "$D/net.d"
EOF
  cat >"$D/storage.conf" <<EOF
# Written by scripts/docker-engine.sh.
[storage]
driver = "overlay"
graphroot = "$D/storage"
runroot = "$D/run"
EOF
}

build_image() {
  if podman_ image exists "$IMAGE" 2>/dev/null; then
    say "image $IMAGE present"
    return 0
  fi
  say "building $IMAGE (FROM scratch + static busybox, nothing pulled)"
  local ctx="$D/image-ctx" applet
  rm -rf "$ctx"
  mkdir -p "$ctx/rootfs/bin" "$ctx/rootfs/etc" "$ctx/rootfs/tmp" "$ctx/rootfs/root"
  chmod 1777 "$ctx/rootfs/tmp"
  cp /bin/busybox "$ctx/rootfs/bin/busybox"
  for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -s busybox "$ctx/rootfs/bin/$applet"
  done
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' \
    >"$ctx/rootfs/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' >"$ctx/rootfs/etc/group"
  cat >"$ctx/Containerfile" <<'EOF'
FROM scratch
COPY rootfs/ /
ENV PATH=/bin
LABEL org.opencontainers.image.title="godoxy-test" org.opencontainers.image.description="busybox-static test image built by scripts/docker-engine.sh"
CMD ["/bin/sh", "-c", "trap 'exit 0' TERM INT; while true; do echo tick; sleep 1; done"]
EOF
  podman_ build --pull=never --format docker --layers=false -t "$IMAGE" -f "$ctx/Containerfile" \
    "$ctx" >"$D/build.log" 2>&1 || { cat "$D/build.log" >&2; die "podman build $IMAGE failed (log: $D/build.log)"; }
  rm -rf "$ctx"
}

# Unmounts whatever podman left mounted under DIR (overlay's private bind of storage/overlay,
# container shm), deepest first, so that DIR can be deleted.
unmount_under() {
  local m
  awk -v d="$D/" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || say "could not unmount $m"
  done
}

# conmon processes that monitor something under DIR: after `docker exec`, podman 4 keeps the
# exec session's conmon for 300 s (--exit-delay), even once the container is gone.
conmon_pids() {
  local p
  for p in /proc/[0-9]*; do
    [ "$(cat "$p/comm" 2>/dev/null)" = conmon ] || continue
    tr '\0' ' ' <"$p/cmdline" 2>/dev/null | grep -qF -- " -b $D/storage/" && echo "${p#/proc/}"
  done
  return 0
}

# Ends the conmon processes of DIR that are left once all its containers are removed.
end_conmons() {
  local left
  left=$(conmon_pids | tr '\n' ' ')
  [ -n "$left" ] || return 0
  say "ending leftover conmon processes of $D: $left"
  # shellcheck disable=SC2086
  kill -TERM $left 2>/dev/null || true
  sleep 0.5
  left=$(conmon_pids | tr '\n' ' ')
  # shellcheck disable=SC2086
  [ -z "$left" ] || kill -KILL $left 2>/dev/null || true
}

# Removes every container, pod, volume and custom network of DIR (bounded).
remove_all() {
  command -v podman >/dev/null 2>&1 || return 0
  [ -d "$D/storage" ] || return 0
  podman_ pod rm -af -t 2 >/dev/null 2>&1 || true
  # A container whose conmon died with it (a session's processes ended) fails its first
  # removal ("timed out waiting for file .../exits/ID") but is marked exited: try again.
  local try
  for try in 1 2 3; do
    podman_ rm -af -t 2 >/dev/null 2>&1 && break
    [ "$try" = 3 ] && say "podman rm -af failed 3 times (see: $0 podman $D ps -a)"
  done
  podman_ volume prune -f >/dev/null 2>&1 || true
  podman_ network prune -f >/dev/null 2>&1 || true
}

# ---------------------------------------------------------------------------------------------
start() {
  lock
  install_missing
  write_config
  local pid i
  if pid=$(service_pid); then
    for ((i = 0; i < START_TIMEOUT * 5; i++)); do
      ping_ok && break
      sleep 0.2
    done
    ping_ok || die "podman (pid $pid) runs but $SOCK does not answer /_ping after ${START_TIMEOUT}s; see $LOG"
    say "reusing the running service (pid $pid)"
  else
    # No service of ours: leftovers from one that died (containers, a stale socket) go.
    rm -f "$SOCK" "$PIDFILE"
    remove_all
    end_conmons
    say "starting podman system service on $SOCK"
    {
      echo "=== $(date -Is) start"
      podman --version
    } >>"$LOG" 2>&1
    # setsid: its own session, so the caller's terminal or process group ending leaves it be.
    # 9>&-: the service must not inherit (and hold forever) the lock on DIR/.lock.
    setsid podman "${PODMAN_FLAGS[@]}" --log-level info \
      system service --time=0 "unix://$SOCK" </dev/null >>"$LOG" 2>&1 9>&- &
    pid=$!
    echo "$pid" >"$PIDFILE"
    for ((i = 0; i < START_TIMEOUT * 5; i++)); do
      ping_ok && break
      kill -0 "$pid" 2>/dev/null || { tail -20 "$LOG" >&2; die "podman system service exited; see $LOG"; }
      sleep 0.2
    done
    ping_ok || { tail -20 "$LOG" >&2; die "$SOCK does not answer /_ping after ${START_TIMEOUT}s; see $LOG"; }
    say "service up (pid $pid)"
  fi
  build_image
  echo "$SOCK"
}

stop() {
  [ -d "$D" ] || { say "$D does not exist: nothing to stop"; return 0; }
  lock
  local pid i
  remove_all
  if pid=$(service_pid); then
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
      say "podman (pid $pid) still running 10s after SIGTERM: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.5
    fi
    echo "=== $(date -Is) stopped" >>"$LOG"
    say "service stopped (pid $pid)"
  else
    say "no running service for $D"
  fi
  rm -f "$SOCK" "$PIDFILE"
  end_conmons
  unmount_under
}

purge() {
  stop
  rm -rf "$D/storage" "$D/run" "$D/tmp" "$D/net.d" "$D/image-ctx" "$D/containers.conf" \
    "$D/storage.conf" "$D/build.log"
  say "purged $D (podman.log kept)"
}

case "$CMD" in
  start) start ;;
  stop) stop ;;
  purge) purge ;;
  status)
    if ping_ok; then echo "$SOCK"; else say "not answering on $SOCK"; exit 1; fi ;;
  env) echo "export DOCKER_HOST=unix://$SOCK" ;;
  podman) exec podman "${PODMAN_FLAGS[@]}" "$@" ;;
  *) usage ;;
esac
