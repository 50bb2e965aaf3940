#!/usr/bin/env bash
# Runs a command with extra /etc/hosts entries, without touching the machine's /etc/hosts:
#
#   scripts/with-hosts.sh NAME=IP [NAME=IP ...] -- cmd args...
#   scripts/with-hosts.sh godoxy.agent=127.0.0.1 -- \
#     docker --host tcp://godoxy.agent:8890 --tlsverify --tlscacert ca.pem \
#            --tlscert client.pem --tlskey client.key version
#
# How: a copy of /etc/hosts with the entries appended is bind-mounted over /etc/hosts inside
# a private mount namespace (unshare --mount, propagation private) that only the command and
# its children see; the namespace and the copy go away when the command ends. Works for any
# resolver that reads /etc/hosts: glibc's (nsswitch "hosts: files ...") and Go's pure
# resolver (the static docker CLI), which is what makes `docker --tlsverify` check the
# server certificate against NAME while connecting to IP (docker has no --resolve).
# As root: unshare -m. Otherwise: unshare -r -m (a user namespace where the caller is root;
# needs unprivileged user namespaces). Exits with the command's exit status.
set -euo pipefail

die() { echo "with-hosts: error: $*" >&2; exit 2; }

entries=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do
  case "$1" in
    *=*)
      name=${1%%=*} ip=${1#*=}
      [[ "$name" =~ ^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$ ]] || die "bad host name '$name'"
      [[ "$ip" =~ ^[0-9A-Fa-f.:]+$ ]] || die "bad address '$ip' for $name"
      entries+=("$ip $name")
      ;;
    *) die "expected NAME=IP or --, got '$1' (usage: $0 NAME=IP ... -- cmd args...)" ;;
  esac
  shift
done
[ $# -gt 0 ] || die "missing -- (usage: $0 NAME=IP ... -- cmd args...)"
shift
[ $# -gt 0 ] || die "no command after --"
[ "${#entries[@]}" -gt 0 ] || die "no NAME=IP given"
command -v unshare >/dev/null 2>&1 || die "unshare (util-linux) not found"

hosts=$(mktemp /tmp/with-hosts.XXXXXX)
trap 'rm -f "$hosts"' EXIT
{
  cat /etc/hosts 2>/dev/null || true
  echo "# added by with-hosts.sh"
  printf '%s\n' "${entries[@]}"
} >"$hosts"
chmod 0644 "$hosts"

userns=()
[ "$(id -u)" = 0 ] || userns=(--map-root-user)
set +e
# shellcheck disable=SC2016 # $1 and $@ are the inner shell's
unshare "${userns[@]}" --mount --propagation private -- \
  /bin/sh -c 'mount --bind "$1" /etc/hosts || { echo "with-hosts: error: mount --bind over /etc/hosts failed" >&2; exit 125; }
shift; exec "$@"' with-hosts "$hosts" "$@"
rc=$?
set -e
exit "$rc"
