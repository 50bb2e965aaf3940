#!/usr/bin/env bash
# A release from one checkout: static (musl) binaries for x86_64 and aarch64, their SHA-256
# checksums, and the container image for both architectures joined into one multi-arch
# manifest. Checks each binary's architecture and static linking (`file`) and the size budget
# (binary <= 6 MiB, image <= 6.5 MiB: MB as docs/BENCH.md's binary target takes it).
# docs/DEPLOY.md#release-builds has more.
#
#   scripts/release.sh                 # binaries, SHA256SUMS and the image
#   scripts/release.sh --no-image      # binaries and SHA256SUMS only (no podman needed)
#
# Writes to dist/ (GDA_DIST):
#   godoxy-agent-VERSION-x86_64-unknown-linux-musl
#   godoxy-agent-VERSION-aarch64-unknown-linux-musl
#   SHA256SUMS                         (sha256sum -c SHA256SUMS checks them)
# and, with the image, into podman's local storage:
#   GDA_IMAGE-amd64, GDA_IMAGE-arm64   one image per architecture (FROM scratch, the Dockerfile
#                                      with its builder stage replaced by the binary's folder)
#   GDA_IMAGE                          the manifest list of both (default
#                                      localhost/godoxy-agent:VERSION); publish it with
#     podman manifest push --all --format v2s2 localhost/godoxy-agent:VERSION docker://REGISTRY/godoxy-agent:VERSION
#
# The aarch64 C parts (ring) are compiled and the binary linked by Debian's
# gcc-aarch64-linux-gnu. It needs no aarch64 musl: rustc's musl targets bring their own musl
# (libc.a and the start files, "self-contained" linking) and ring's C needs only the compiler's
# own headers. It is one apt package from the same Debian as the rest of CI, where
# cargo-zigbuild would add a cargo install (a build on every clean CI machine) and a second
# toolchain from PyPI (ziglang).
#
# Needs root only to install what is missing (Debian: gcc-aarch64-linux-gnu, musl-tools, file,
# podman; rustup: the two musl targets). CARGO_TARGET_DIR is honoured. GDA_BIN_BUDGET and
# GDA_IMAGE_BUDGET (bytes) override the budget. GDA_SIZE_BUDGET=report prints a binary or image
# over budget as an "OVER BUDGET:" line instead of failing (CI uses it while the budget is not
# met without slowing UDP tunnels: docs/DEPLOY.md#size).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
IMAGE_TOO=1
for arg in "$@"; do
  case "$arg" in
    --no-image) IMAGE_TOO=0 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "release.sh: unknown argument '$arg' (see --help)" >&2; exit 2 ;;
  esac
done

TARGETS=(x86_64-unknown-linux-musl aarch64-unknown-linux-musl)
BIN_BUDGET="${GDA_BIN_BUDGET:-6291456}"     # 6 MiB
IMAGE_BUDGET="${GDA_IMAGE_BUDGET:-6815744}" # 6.5 MiB
DIST="${GDA_DIST:-$ROOT/dist}"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
VERSION=$(cargo pkgid -p godoxy-agent)
VERSION="${VERSION##*[#@]}"
[[ "$VERSION" =~ ^[0-9]+\.[0-9]+\.[0-9]+ ]] || { echo "release.sh: no version from cargo pkgid: '$VERSION'" >&2; exit 1; }
IMAGE="${GDA_IMAGE:-localhost/godoxy-agent:$VERSION}"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$ROOT/scripts/containers.conf}"

failures=0
over=0
pass() { echo "PASS: $*"; }
# A size over budget: a failure, or with GDA_SIZE_BUDGET=report a line of its own.
over_budget() {
  if [ "${GDA_SIZE_BUDGET:-enforce}" = report ]; then
    echo "OVER BUDGET: $*"; over=$((over + 1))
  else
    fail "$*"
  fi
}
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }
die() { echo "FAIL: $*"; exit 1; }
mb() { awk "BEGIN {printf \"%.2f MB, %.2f MiB\", $1 / 1000000, $1 / 1048576}"; }

# ---------------------------------------------------------------------------------------------
echo "== prerequisites"
need=()
pairs=(aarch64-linux-gnu-gcc:gcc-aarch64-linux-gnu musl-gcc:musl-tools file:file)
[ "$IMAGE_TOO" = 1 ] && pairs+=(podman:podman runc:runc)
for pair in "${pairs[@]}"; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
if [ "${#need[@]}" -gt 0 ]; then
  [ "$(id -u)" = 0 ] || die "missing ${need[*]}: install them (apt-get install ${need[*]}) or run as root"
  echo "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  timeout 300 apt-get update -qq
  timeout 600 apt-get install -y -qq "${need[@]}" >/dev/null
fi
for t in "${TARGETS[@]}"; do
  rustup target list --installed | grep -qx "$t" || timeout 300 rustup target add "$t"
done

# ---------------------------------------------------------------------------------------------
# The aarch64 toolchain: Debian's cross gcc compiles ring's C and links (see the top).
export CC_aarch64_unknown_linux_musl=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_musl=aarch64-linux-gnu-ar
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER=aarch64-linux-gnu-gcc

mkdir -p "$DIST"
files=()
for t in "${TARGETS[@]}"; do
  echo "== $t"
  start=$SECONDS
  timeout 1800 cargo build --release --locked --bin godoxy-agent --target "$t" ||
    die "cargo build --release --target $t"
  name="godoxy-agent-$VERSION-$t"
  install -m 0755 "$TARGET_DIR/$t/release/godoxy-agent" "$DIST/$name"
  files+=("$name")
  size=$(stat -c %s "$DIST/$name")
  echo "built in $((SECONDS - start))s: dist/$name, $size bytes ($(mb "$size"))"
  desc=$(file -b "$DIST/$name")
  case "$t" in
    x86_64-*) want="x86-64" ;;
    aarch64-*) want="ARM aarch64" ;;
  esac
  if [[ "$desc" == *"$want"* ]] && [[ "$desc" =~ static(-pie)?\ linked|statically\ linked ]]; then
    pass "file: $name: $desc"
  else
    fail "file: $name: want $want and static linking: $desc"
  fi
  if [ "$size" -le "$BIN_BUDGET" ]; then
    pass "size: $name: $size bytes <= $BIN_BUDGET (6 MiB)"
  else
    over_budget "size: $name: $size bytes ($(mb "$size")) > the budget of $BIN_BUDGET (6 MiB)"
  fi
done
(cd "$DIST" && sha256sum "${files[@]}" >SHA256SUMS && sha256sum -c --quiet SHA256SUMS) ||
  die "SHA256SUMS"
echo "dist/SHA256SUMS:"
sed 's/^/  /' "$DIST/SHA256SUMS"

# ---------------------------------------------------------------------------------------------
if [ "$IMAGE_TOO" = 1 ]; then
  echo "== images and the multi-arch manifest $IMAGE"
  WORK="$(mktemp -d /tmp/godoxy-release.XXXXXX)"
  trap 'rm -rf "$WORK"' EXIT
  podman=(timeout 300 podman --runtime runc)
  # Replace an earlier manifest of the same name; its per-architecture images are rebuilt.
  "${podman[@]}" manifest exists "$IMAGE" 2>/dev/null && "${podman[@]}" manifest rm "$IMAGE" >/dev/null
  "${podman[@]}" manifest create "$IMAGE" >/dev/null || die "podman manifest create $IMAGE"
  for t in "${TARGETS[@]}"; do
    case "$t" in
      x86_64-*) arch=amd64 ;;
      aarch64-*) arch=arm64 ;;
    esac
    # The Dockerfile's registry-less path: the builder stage is this folder. Nothing runs in
    # the image while it is built (FROM scratch, COPY only), so no emulation is needed.
    ctx="$WORK/ctx-$arch"
    mkdir -p "$ctx"
    cp "$DIST/godoxy-agent-$VERSION-$t" "$ctx/godoxy-agent"
    install -d -m 0700 "$ctx/state"
    # --format docker: the OCI format has no HEALTHCHECK. --layers=false: no cached
    # intermediate images left behind.
    if "${podman[@]}" build --format docker --layers=false --platform "linux/$arch" \
         --build-context builder="$ctx" -t "$IMAGE-$arch" -f "$ROOT/Dockerfile" "$ROOT" \
         >"$WORK/build-$arch.log" 2>&1; then
      pass "image $IMAGE-$arch built (--platform linux/$arch, builder stage = the binary)"
    else
      cat "$WORK/build-$arch.log"; die "podman build $arch"
    fi
    got=$(podman image inspect --format '{{.Os}}/{{.Architecture}} {{.Config.User}}' "$IMAGE-$arch")
    [ "$got" = "linux/$arch 65532:65532" ] && pass "image $arch: $got" || fail "image $arch: '$got'"
    size=$(podman image inspect --format '{{.Size}}' "$IMAGE-$arch")
    if [ "$size" -le "$IMAGE_BUDGET" ]; then
      pass "size: image $arch: $size bytes ($(mb "$size")) <= $IMAGE_BUDGET (6.5 MiB)"
    else
      over_budget "size: image $arch: $size bytes ($(mb "$size")) > the budget of $IMAGE_BUDGET (6.5 MiB)"
    fi
    "${podman[@]}" manifest add "$IMAGE" "containers-storage:$IMAGE-$arch" >/dev/null ||
      die "podman manifest add $IMAGE $IMAGE-$arch"
  done
  platforms=$(podman manifest inspect "$IMAGE" |
    python3 -c 'import json,sys; print(" ".join(sorted(m["platform"]["os"]+"/"+m["platform"]["architecture"] for m in json.load(sys.stdin)["manifests"])))')
  if [ "$platforms" = "linux/amd64 linux/arm64" ]; then
    pass "manifest $IMAGE: $platforms"
  else
    fail "manifest $IMAGE: '$platforms'"
  fi
fi

echo
if [ "$failures" -eq 0 ]; then
  [ "$over" -eq 0 ] || echo "release $VERSION: $over size(s) OVER BUDGET (reported, not failed: GDA_SIZE_BUDGET=report)"
  echo "release $VERSION: all checks passed (dist: $DIST)"
else
  echo "release $VERSION: $failures check(s) FAILED"
  exit 1
fi
