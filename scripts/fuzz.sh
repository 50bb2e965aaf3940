#!/usr/bin/env bash
# Runs each cargo-fuzz target in fuzz/ for a bounded time and reports executions and crashes.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]     (default: 60 s each, every target)
#
# Needs the nightly toolchain and cargo-fuzz (.ci/run installs both). Targets are built first,
# so SECONDS is fuzzing time. Each target starts from fuzz/corpus/TARGET (kept between runs,
# not committed) plus the committed seeds. Exits non-zero when a target crashed (the input is
# in fuzz/artifacts/TARGET/; docs/FUZZING.md says how to reproduce and minimise it) or did not
# run.
#
# FUZZ_SANITIZER (default none): the targets look for panics in safe Rust, which bounds and
# overflow checks (cargo-fuzz builds with debug assertions) already turn into crashes;
# AddressSanitizer makes the DTLS targets' P-256 arithmetic ~30x slower for no extra finding.
# Set it to `address` to fuzz with it anyway.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds="${1:-60}"
shift || true
if [ "$#" -gt 0 ]; then
  targets=("$@")
else
  targets=(header config http_headers dtls_preauth dtls_raw dtls_records)
fi
sanitizer="${FUZZ_SANITIZER:-none}"

echo "building ${targets[*]} (sanitizer: $sanitizer)"
for target in "${targets[@]}"; do
  cargo +nightly fuzz build -s "$sanitizer" "$target"
done

mkdir -p target/fuzz-logs
failed=0
printf '%-14s %12s %8s %8s\n' target executions crashes seconds
for target in "${targets[@]}"; do
  seeds="seeds/$target"
  # dtls_raw feeds the same datagrams as dtls_preauth, without the check in front.
  [ "$target" = dtls_raw ] && seeds=seeds/dtls_preauth
  mkdir -p "corpus/$target" "artifacts/$target"
  before=$(find "artifacts/$target" -type f | wc -l)
  log="target/fuzz-logs/$target.log"
  started=$(date +%s)
  status=0
  cargo +nightly fuzz run -s "$sanitizer" "$target" "corpus/$target" "$seeds" -- \
    -max_total_time="$seconds" -timeout=60 -print_final_stats=1 >"$log" 2>&1 || status=$?
  took=$(($(date +%s) - started))
  # The final stats when libFuzzer finished normally, else its last progress line.
  executions=$(awk '/stat::number_of_executed_units/ {print $2}' "$log" | tail -n 1)
  if [ -z "$executions" ]; then
    executions=$(grep -oE '^#[0-9]+' "$log" | tail -n 1 | tr -d '#' || true)
  fi
  crashes=$(($(find "artifacts/$target" -type f | wc -l) - before))
  printf '%-14s %12s %8s %8s\n' "$target" "${executions:-?}" "$crashes" "$took"
  if [ "$status" -ne 0 ] || [ "$crashes" -ne 0 ]; then
    failed=1
    echo "  $target failed (exit $status): see fuzz/$log" >&2
    grep -m 3 -E 'panicked at|ERROR:|SUMMARY' "$log" | sed 's/^/    /' >&2 || true
  fi
done
exit "$failed"
