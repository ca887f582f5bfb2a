# Host-side helpers of the VM lanes, sourced by run.sh (amd64) and arm64.sh.
# Each script sets $OUT (where the guest writes results.txt, DONE and its
# timestamps) and its own `log`.

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

# Best of 3 of a pure-Python loop, in ms: a CPU-bound reference timed on
# the host and again in the guest (see bench_env).
BENCH_REF_PY='
import time
best = None
for _ in range(3):
    t = time.perf_counter()
    x = 0
    for i in range(1000000):
        x += i * i
    ms = (time.perf_counter() - t) * 1000
    best = ms if best is None else min(best, ms)
print("%.1f" % best)
'

# The guest.env lines steps/bench.sh needs for its figures (the guest has no
# view of the host): the commit, the host's load, the reference loop's time
# here (its ratio to the guest's is the emulation's slowdown, reported
# beside the guest's absolute times), and the bench knobs that are set.
bench_env() {
    printf 'BMSGW_COMMIT=%q\n' "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    printf 'BMSGW_HOST_LOADAVG=%q\n' "$(cut -d' ' -f1-3 /proc/loadavg)"
    printf 'BMSGW_BENCH_REF_PY=%q\n' "$BENCH_REF_PY"
    printf 'BMSGW_HOST_REF_MS=%q\n' "$(python3 -c "$BENCH_REF_PY")"
    local b
    for b in BMSGW_BENCH_READY_RUNS BMSGW_BENCH_REPS BMSGW_BENCH_GEN_SECS; do
        [ -z "${!b:-}" ] || printf '%s=%q\n' "$b" "${!b}"
    done
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Copies the VM console through, noting (host clock) when the guest script
# starts and ends, which gives the boot time.
watch_console() {
    local line
    while IFS= read -r line; do
        printf '%s\n' "$line"
        case $line in
        *BMSGW_GUEST_START*) [ -e "$OUT/.t_guest_start" ] || now >"$OUT/.t_guest_start" ;;
        *BMSGW_GUEST_DONE*) now >"$OUT/.t_guest_done" ;;
        esac
    done
}

# lane_verdict LANE RUNNER RC T_VM T_END HOST_TIMINGS T_START
# Prints the guest's results, a timings line (HOST_TIMINGS, e.g.
# "install 1.0s, build 2.0s,", then the VM's own parts) and
# "LANE: N passed, M failed"; exits 1 when a step failed or the VM run
# itself went wrong (RUNNER's exit RC: 124 is the lane's timeout).
lane_verdict() {
    local lane=$1 runner=$2 rc=$3 t_vm=$4 t_end=$5 host=$6 t_start=$7
    local passed=0 failed=0 problem=""
    if [ -f "$OUT/results.txt" ]; then
        passed=$(grep -c '^PASS ' "$OUT/results.txt" || true)
        failed=$(grep -c '^FAIL ' "$OUT/results.txt" || true)
    fi
    if [ "$rc" -eq 124 ]; then
        problem="the VM run timed out after ${LANE_TIMEOUT}s"
    elif [ ! -f "$OUT/results.txt" ]; then
        problem="the VM produced no results ($runner exit $rc; see $OUT/console.log)"
    elif [ ! -f "$OUT/DONE" ]; then
        problem="the guest script did not finish ($runner exit $rc; see $OUT/console.log)"
    elif [ "$passed" -eq 0 ]; then
        problem="no step passed"
    fi

    echo
    echo "==== $lane results ($OUT) ===="
    [ -f "$OUT/results.txt" ] && cat "$OUT/results.txt"
    local boot="?" steps="?"
    [ -f "$OUT/.t_guest_start" ] && boot=$(elapsed "$t_vm" "$(cat "$OUT/.t_guest_start")")
    [ -f "$OUT/.t_guest_start" ] && [ -f "$OUT/.t_guest_done" ] &&
        steps=$(elapsed "$(cat "$OUT/.t_guest_start")" "$(cat "$OUT/.t_guest_done")")
    echo "timings: $host VM boot ${boot}s, guest steps ${steps}s," \
        "VM total $(elapsed "$t_vm" "$t_end")s, lane total $(elapsed "$t_start" "$t_end")s"
    echo "$lane: $passed passed, $failed failed"
    if [ -n "$problem" ]; then
        echo "$lane: FAILED: $problem"
        exit 1
    fi
    [ "$failed" -eq 0 ] || exit 1
}
