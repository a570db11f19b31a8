#!/usr/bin/env bash
# The long fuzz campaign of issue 13: every target (or those named) until 10^7
# executions or its time cap, at idle priority, one after the other, with a table
# of executions, exec/s, coverage and crashes at the end.
#
#   fuzz/campaign.sh                      # every target, 3600 s cap each
#   CAP=600 fuzz/campaign.sh blk_request  # one target, 10 min cap
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`) and the nightly toolchain, as the
# README says. New inputs go to target/fuzz-campaign/<target>; crashes to
# fuzz/artifacts/<target>/ (add each to the corpus once its bug is fixed). Logs in
# target/fuzz-campaign/<target>.log.
set -uo pipefail
cd "$(dirname "$0")"
CAP=${CAP:-3600}
RUNS=${RUNS:-10000000}
out=../target/fuzz-campaign
mkdir -p "$out"
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  for f in fuzz_targets/*.rs; do targets+=("$(basename "$f" .rs)"); done
fi
summary="$out/summary.txt"
printf '%-20s %12s %8s %6s %8s %s\n' target executions exec/s cov crashes seconds > "$summary"
for t in "${targets[@]}"; do
  mkdir -p "$out/$t"
  echo "fuzz campaign: $t (up to $RUNS runs or ${CAP}s) started $(date -u +%H:%M:%S)" >&2
  start=$(date +%s)
  nice -n 19 cargo +nightly fuzz run -O "$t" "$out/$t" "corpus/$t" -- \
    -runs="$RUNS" -max_total_time="$CAP" -print_final_stats=1 > "$out/$t.log" 2>&1
  secs=$(( $(date +%s) - start ))
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$out/$t.log" | grep -o '[0-9]*$' | tail -1)
  rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$out/$t.log" | grep -o '[0-9]*$' | tail -1)
  cov=$(grep -o 'cov: [0-9]*' "$out/$t.log" | tail -1 | grep -o '[0-9]*')
  crashes=$(ls "artifacts/$t" 2>/dev/null | grep -c '^crash-' || true)
  printf '%-20s %12s %8s %6s %8s %s\n' "$t" "${execs:-?}" "${rate:-?}" "${cov:-?}" "$crashes" "$secs" >> "$summary"
done
cat "$summary"
