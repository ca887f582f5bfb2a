#!/usr/bin/env bash
# Run every fuzz target (or the ones named) for SECONDS each and print a
# summary table: executions, speed, coverage, corpus and crashes per target.
#
#   fuzz/run.sh [--smoke] [SECONDS] [TARGET...]
#
# --smoke: 5 s per target (what CI runs). SECONDS defaults to 60.
# Builds once with cargo-fuzz on the stable toolchain (RUSTC_BOOTSTRAP=1,
# see fuzz/README.md), then runs the libFuzzer binaries one after another.
# New corpus entries go to fuzz/work/corpus/<target>/ (not committed), the
# committed seeds in fuzz/corpus/<target>/ are read only. A crash leaves its
# input in fuzz/artifacts/<target>/ and makes the script exit 1.
#
# Environment: FUZZ_SANITIZER=none|address (default none: bmsgw forbids
# unsafe code, and without ASan the targets run about twice as fast);
# FUZZ_RSS_MB (default 2048), the memory limit of one target.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=60
targets=()
for arg in "$@"; do
    case "$arg" in
        --smoke) seconds=5 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        ''|*[!0-9]*) targets+=("$arg") ;;
        *) seconds=$arg ;;
    esac
done
sanitizer=${FUZZ_SANITIZER:-none}
rss_mb=${FUZZ_RSS_MB:-2048}

command -v cargo-fuzz >/dev/null || {
    echo "cargo-fuzz is not installed: cargo install cargo-fuzz --locked" >&2
    exit 2
}
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi

# cargo-fuzz passes nightly-only flags (-Zsanitizer, and -Cpasses=sancov-module
# among unstable options); RUSTC_BOOTSTRAP lets the stable compiler take them.
export RUSTC_BOOTSTRAP=1
start=$(date +%s)
# All targets in one cargo invocation: the crate is instrumented once.
cargo fuzz build -s "$sanitizer"
built=$(( $(date +%s) - start ))
bindir=fuzz/target/x86_64-unknown-linux-gnu/release

logdir=fuzz/work/logs
mkdir -p "$logdir"
rows=()
failed=0
for t in "${targets[@]}"; do
    bin=$bindir/$t
    [ -x "$bin" ] || { echo "no binary $bin (build failed?)" >&2; exit 2; }
    mkdir -p "fuzz/work/corpus/$t" "fuzz/artifacts/$t" "fuzz/corpus/$t"
    before=$(find "fuzz/artifacts/$t" -type f | sort)
    log=$logdir/$t.log
    echo "--- $t: ${seconds}s"
    set +e
    "$bin" "fuzz/work/corpus/$t" "fuzz/corpus/$t" \
        -max_total_time="$seconds" -print_final_stats=1 \
        -rss_limit_mb="$rss_mb" -timeout=10 \
        -artifact_prefix="fuzz/artifacts/$t/" >"$log" 2>&1
    rc=$?
    set -e
    stat() { awk -v k="stat::$1:" '$1 == k { print $2 }' "$log" | tail -n 1; }
    execs=$(stat number_of_executed_units)
    rate=$(stat average_exec_per_sec)
    rss=$(stat peak_rss_mb)
    cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -n 1 | awk '{ print $2 }')
    corp=$(grep -oE 'corp: [0-9]+' "$log" | tail -n 1 | awk '{ print $2 }')
    new=$(comm -13 <(printf '%s\n' "$before") <(find "fuzz/artifacts/$t" -type f | sort) | sed '/^$/d')
    crashes=$(printf '%s' "$new" | grep -c . || true)
    if [ "$rc" -ne 0 ] && [ "$crashes" -eq 0 ]; then crashes="?(rc=$rc)"; fi
    if [ "$rc" -ne 0 ] || [ -n "$new" ]; then
        failed=1
        grep -m1 -E 'panicked at|ERROR: libFuzzer|SUMMARY' "$log" | sed 's/^/    /' || true
        printf '%s\n' "$new" | sed '/^$/d; s/^/    artifact: /'
    fi
    rows+=("$t ${seconds} ${execs:-0} ${rate:-0} ${cov:-?} ${corp:-?} ${rss:-?} $crashes")
done

echo
echo "fuzz summary (build ${built}s, sanitizer $sanitizer; logs in $logdir)"
{
    echo "target seconds execs execs/s cov corpus rss_mb crashes"
    printf '%s\n' "${rows[@]}"
} | if command -v column >/dev/null; then column -t; else cat; fi
total_execs=$(printf '%s\n' "${rows[@]}" | awk '{ s += $3 } END { print s + 0 }')
echo "total: ${#targets[@]} targets, $total_execs execs, $(( $(date +%s) - start ))s"
if [ "$failed" -ne 0 ]; then
    echo "FUZZ FAILED: a target crashed; see the artifacts above (reproduce: fuzz/README.md)"
    exit 1
fi
