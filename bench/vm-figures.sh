#!/usr/bin/env bash
# Turns the VM lane's benchmark results (tests/vcan/steps/bench.sh writes
# them as key=value lines to target/vcan-lane/bench.txt) into the rows and
# the notes of docs/performance.md.
#
# The figures need real CAN interfaces (the ECU daemon opens them before
# READY) and the kernel's can-gw, which only the VM lane has; the lane runs
# in CI on every push, while bench/run.sh takes an hour on the host. So the
# lane writes plain results and this script formats them: bench/run.sh
# calls it for the table, and --update puts a newer lane run into an
# existing doc without redoing the host's hour.
#
# usage: bench/vm-figures.sh ecu-rows [FILE]       the ECU build's table rows
#        bench/vm-figures.sh bridge-rows [FILE]    the bridge vs can-gw row
#        bench/vm-figures.sh notes [FILE]          the section that explains them
#        bench/vm-figures.sh --update DOC [FILE]   rewrites those rows and that
#                                                  section of DOC in place
# FILE defaults to target/vcan-lane/bench.txt; when it is missing the rows
# say so (the doc never shows stale or made-up figures).
set -euo pipefail
cd "$(dirname "$0")/.."

LANE_CMD="BMSGW_VCAN_ONLY='^bench' tests/vcan/run.sh"
SECTION="## The ECU build and the bridge against can-gw, in the VM lane"
# The first cell of every row this script owns, to find them in a doc.
ROW_PREFIXES=("| ECU build, start to READY" "| ECU build, RSS" "| Bridge vs can-gw")

mode=${1:-}
if [ "$mode" = --update ]; then
    DOC=${2:?usage: bench/vm-figures.sh --update DOC [FILE]}
    FILE=${3:-target/vcan-lane/bench.txt}
else
    FILE=${2:-target/vcan-lane/bench.txt}
fi

# get KEY: the value of KEY in FILE (empty when absent).
get() { sed -n "s/^$1=//p" "$FILE" 2>/dev/null | tail -n 1; }
mib() { awk -v k="$1" 'BEGIN { printf "%.2f", k / 1024 }'; }
div() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

have_ecu() { [ -f "$FILE" ] && [ -n "$(get ecu_hwm_after_session_kib)" ]; }
have_bridge() { [ -f "$FILE" ] && [ -n "$(get bridge_cangw_ratio)" ]; }

CMD="\`$LANE_CMD\` (tests/vcan/steps/bench.sh)"

ecu_rows() {
    local cmd=$CMD
    if have_ecu; then
        local med max first n idle sess hwm worst
        med=$(get ecu_ready_ms_median); max=$(get ecu_ready_ms_max)
        first=$(get ecu_ready_ms_first); n=$(get ecu_ready_runs)
        idle=$(get ecu_rss_idle_kib); sess=$(get ecu_rss_session_max_kib)
        hwm=$(get ecu_hwm_after_session_kib)
        worst=$(printf '%s\n' "$idle" "$sess" "$hwm" | sort -g | tail -n 1)
        local slow est=""
        slow=$(get tcg_slowdown)
        [ -z "$slow" ] || est=$(awk -v m="$med" -v s="$slow" 'BEGIN { printf "; estimate at host speed: %.0f ms (median / the emulation slowdown %sx of a CPU-bound reference)", m / s, s }')
        printf '| ECU build, start to READY, median / max (%s runs, VM lane, TCG) | <= 50 ms | %s / %s ms under TCG (first run, cold cache: %s ms)%s | median %s, max %s (under TCG) | %s, bench-ecu |\n' \
            "$n" "$med" "$max" "$first" "$est" "$(div "$med" 50)" "$(div "$max" 50)" "$cmd"
        printf '| ECU build, RSS idle (cloud connected) / during a session (max VmRSS) / VmHWM after it | <= 8 MiB | %s / %s / %s MiB | %s | %s, bench-ecu |\n' \
            "$(mib "$idle")" "$(mib "$sess")" "$(mib "$hwm")" "$(div "$worst" 8192)" "$cmd"
    else
        printf '| ECU build, start to READY | <= 50 ms | not measured: no VM lane results in %s | | %s |\n' "$FILE" "$cmd"
        printf '| ECU build, RSS idle / in a session | <= 8 MiB | not measured: no VM lane results in %s | | %s |\n' "$FILE" "$cmd"
    fi
}

bridge_rows() {
    local cmd=$CMD
    if have_bridge; then
        printf '| Bridge vs can-gw on vcan0 -> vcan1 (BCL frames, median of %s runs each, VM lane, TCG) | ratio | ours %s frames/s, can-gw %s frames/s | ours = %s x can-gw | %s, bench-bridge |\n' \
            "$(get bridge_reps)" "$(get bridge_fps_median)" "$(get cangw_fps_median)" "$(get bridge_cangw_ratio)" "$cmd"
    else
        printf '| Bridge vs can-gw on vcan0 -> vcan1 | ratio | not measured: no VM lane results in %s | | %s |\n' "$FILE" "$cmd"
    fi
}

notes() {
    echo "$SECTION"
    echo
    if ! [ -f "$FILE" ]; then
        echo "No VM lane results: run \`$LANE_CMD\`, then \`bench/vm-figures.sh --update docs/performance.md\`."
        return
    fi
    cat <<EOF
From the VM lane run of $(get lane_date) ($(get commit)): Debian kernel
$(get guest_kernel) under QEMU with TCG software emulation (no KVM), $(get guest_cpus)
guest CPUs; guest load average when the bench started $(get guest_load);
host load average before the VM booted $(get host_load_before_vm). Under TCG
the guest runs many times slower than the hardware, so its absolute times
(READY, frames/s) are upper bounds for the same code on real hardware, and
only the ratio between two things measured in the same guest run compares.
Memory does not depend on the emulation. The emulation's slowdown, from a
pure-Python loop timed on the host before the VM booted ($(get ref_ms_host) ms)
and in the guest ($(get ref_ms_guest) ms): $(get tcg_slowdown)x. Dividing a guest
time by it gives a rough estimate for the host's CPU, not a measurement:
system calls, page faults and I/O slow down differently from a loop.

- **Start to READY**: the ECU build (\`--no-default-features\`,
  $(get ecu_binary_bytes) bytes) runs \`bmsgw run\` with the lane's config
  (bridge mode on vcan0/vcan1, the cloud link to mosquitto with mutual TLS,
  the redb store and the control socket on a tmpfs) and \`NOTIFY_SOCKET\`
  on a datagram socket the step listens on; the time is from exec to the
  READY=1 datagram (sent once CAN and the store are up; the cloud link
  connects after READY). SIGTERM after each run. All runs, ms:
  $(get ecu_ready_ms_all).
- **RSS**: VmRSS from /proc/PID/status of the same daemon, sampled once a
  second for 5 s after its cloud link connected (idle), then every 0.2 s
  during one authenticated online session (the BMS and pile simulators of
  the default build on vcan0/vcan1); VmHWM is the peak since start.
- **Bridge vs can-gw**: \`cangen\` offers one frame, BCL (18 10 56 F4,
  A00FB80B02: from the BMS to the pile, 400 V, 100 A, allowed, decodes) on vcan0 as fast
  as it can for $(get bridge_gen_secs) s; the frames on vcan1 are vcan1's
  tx_packets (sysfs, no per-frame cost); frames/s is over the span from the
  first to the last forwarded frame. (a) our ECU daemon in bridge mode,
  with \`[firewall] rate_per_second\` and \`burst\` raised to 1 000 000: by
  default every allowed message is held to 100/s per (direction, PGN,
  source, destination), which would measure the limit, not the bridge; the
  bucket is still consulted per frame. (b) \`cangw -A -s vcan0 -d vcan1 -e\`
  (the kernel's can-gw; -e so that vcan1's sockets see its frames, as they
  see ours). Runs alternate, our daemon stopped during can-gw's. The
  generator, the forwarder and the counter share the guest's CPUs; can-gw
  forwards inside the generator's send path, so its rate is about the
  generator's.

\`\`\`
$(grep -E '^(bridge|cangw)_run_' "$FILE" | tr ',' ' ')
\`\`\`
EOF
}

case $mode in
ecu-rows) ecu_rows ;;
bridge-rows) bridge_rows ;;
notes) notes ;;
--update)
    [ -f "$DOC" ] || { echo "no $DOC" >&2; exit 1; }
    tmp_ecu=$(mktemp) tmp_bridge=$(mktemp) tmp_notes=$(mktemp)
    trap 'rm -f "$tmp_ecu" "$tmp_bridge" "$tmp_notes"' EXIT
    ecu_rows >"$tmp_ecu"
    bridge_rows >"$tmp_bridge"
    notes >"$tmp_notes"
    # Our rows replace the old ones where the first of each kind stood; our
    # section is dropped and written again at the end.
    awk -v ecu="$tmp_ecu" -v bridge="$tmp_bridge" -v notes="$tmp_notes" -v section="$SECTION" \
        -v p1="${ROW_PREFIXES[0]}" -v p2="${ROW_PREFIXES[1]}" -v p3="${ROW_PREFIXES[2]}" '
        function emit(f,   l) { while ((getline l < f) > 0) print l; close(f) }
        $0 == section { skip = 1; next }
        skip && /^## / { skip = 0 }
        skip { next }
        index($0, p1) == 1 || index($0, p2) == 1 { if (!e) { emit(ecu); e = 1 } blank = 0; next }
        index($0, p3) == 1 { if (!b) { emit(bridge); b = 1 } blank = 0; next }
        { print; blank = ($0 == "") }
        END { if (!blank) print ""; emit(notes) }
    ' "$DOC" >"$DOC.new"
    grep -qF "${ROW_PREFIXES[0]}" "$DOC.new" || { rm -f "$DOC.new"; echo "$DOC has no row to replace" >&2; exit 1; }
    mv "$DOC.new" "$DOC"
    echo "updated $DOC from $FILE"
    ;;
*)
    echo "usage: bench/vm-figures.sh ecu-rows|bridge-rows|notes [FILE] | --update DOC [FILE]" >&2
    exit 2
    ;;
esac
