# shellcheck shell=bash
# Attack suite on real SocketCAN (sourced by tests/vcan/guest.sh after its
# own steps; vcan0/vcan1 up, nothing running). docs/security-tests.md quotes
# the figures this prints.
#
# attack-flood: the daemon (`bmsgw run`, bridge mode, vcan0 = BMS side,
# vcan1 = pile side, the cloud online through mosquitto as daemon-start sets
# it up) takes 60 s of seeded junk from `bmsgw sim flood` on vcan1, paced to
# 100% load of a 250 kbit/s bus, while candump records vcan0. Then:
#   - nothing but charger messages from the pile's address (0x56), or TP the
#     bridge's own transport cut, reached vcan0, and those decode;
#   - the daemon runs and answers, its memory stayed bounded (VmHWM);
#   - a legitimate authenticated session completes afterwards.
# Greppable lines: "attack-flood: flooder ...", "attack-flood: vcan0 ...",
# "attack-flood: memory ...", "attack-flood: firewall ...".

ATTACK_FLOOD_SECS=${BMSGW_ATTACK_FLOOD_SECS:-60}
# Growth of the daemon's peak RSS over the flood that counts as unbounded: a
# leak of 64 bytes per junk frame (120k frames) would exceed it; the
# bridge's own state is fixed-size (TpConfig::gbt27930).
ATTACK_HWM_GROWTH_MAX_KIB=8192
# Least bus load the flooder must reach for the step to mean anything.
ATTACK_MIN_LOAD=90

# vm_kib PID FIELD: a field of /proc/PID/status in KiB.
vm_kib() { awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status" 2>/dev/null; }

step_attack_flood() { own_daemon attack-daemon attack_flood_body; }

attack_flood_body() {
    local pid cap=$D/flood-vcan0.log flood_out=$D/flood.out
    pid=$(pid_of daemon)
    local hwm0 rss0
    hwm0=$(vm_kib "$pid" VmHWM)
    rss0=$(vm_kib "$pid" VmRSS)
    echo "daemon pid $pid before the flood: VmRSS ${rss0} KiB, VmHWM ${hwm0} KiB"
    echo "firewall before: $(status_json | jq -c '.firewall')"
    local J_PILE_IN='.can[] | select(.role == "pile") | .frames_in' fin0 fin1
    fin0=$(st "$J_PILE_IN")

    start_capture "$cap" || return 1
    echo "--- bmsgw sim flood --can vcan1 --seconds $ATTACK_FLOOD_SECS"
    "$BMSGW_BIN" sim flood --can vcan1 --seconds "$ATTACK_FLOOD_SECS" --seed 24301 \
        --bitrate 250000 >"$flood_out" 2>&1 &
    local flood=$!
    # Halfway through, the daemon still answers on its control socket.
    sleep $((ATTACK_FLOOD_SECS / 2))
    local rss_mid mid_ok=1
    rss_mid=$(vm_kib "$pid" VmRSS)
    status_json >/dev/null || mid_ok=0
    echo "mid-flood: VmRSS ${rss_mid} KiB, status answered: $mid_ok"
    local rc_flood=0
    wait_bounded "$flood" $((ATTACK_FLOOD_SECS + 60)) || rc_flood=$?
    stop_capture
    cat "$flood_out"
    [ "$rc_flood" -eq 0 ] || { echo "sim flood exited $rc_flood: $(tail -n 1 "$flood_out")" >"$REASON_FILE"; return 1; }

    fin1=$(st "$J_PILE_IN")
    local hwm1 rss1
    hwm1=$(vm_kib "$pid" VmHWM)
    rss1=$(vm_kib "$pid" VmRSS)
    local summary load
    summary=$(grep '^sim flood: ' "$flood_out")
    load=$(sed -nE 's/.* load=([0-9.]+)%.*/\1/p' <<<"$summary")
    echo "attack-flood: flooder ${summary#sim flood: }"
    # What the daemon read of it (the rest was lost in the kernel's socket
    # buffer before the daemon could read it). Reported, not asserted: a
    # flood may cost frames; it must not cost the bridge its limits.
    local sent
    sent=$(sed -nE 's/.* frames=([0-9]+) .*/\1/p' <<<"$summary")
    echo "attack-flood: daemon read $((fin1 - fin0)) of ${sent:-?} frames on vcan1 during the flood"

    # What reached the BMS side: every frame but candump's start markers.
    local onbms=$D/flood-vcan0.frames
    grep -v ' vcan0 7FF#00$' "$cap" >"$onbms"
    # Allowed: 29-bit id, EDP and DP 0, a charger message's PF or TP.CM/TP.DT,
    # source 0x56 (GB/T 27930's charger PGNs: CHM 26, CRM 01, CTS 07, CML
    # 08, CRO 0A, CCS 12, CST 1A, CSD 1D, CEM 1F).
    local junk
    junk=$(awk '{
        split($3, a, "#"); id = a[1]
        if (length(id) != 8) { print; next }
        top = substr(id, 1, 2); pf = substr(id, 3, 2); sa = substr(id, 7, 2)
        # EDP and DP are the two low bits of the top byte.
        if (sa != "56" || index("048C", substr(top, 2, 1)) == 0) { print; next }
        if (index("26 01 07 08 0A 12 1A 1D 1F EC EB", pf) == 0) { print; next }
    }' "$onbms")
    local n_bms n_junk n_cml
    n_bms=$(wc -l <"$onbms")
    n_junk=$(grep -c . <<<"$junk" || true)
    n_cml=$(awk '{ split($3, a, "#"); if (substr(a[1], 3, 2) == "08") n++ } END { print n + 0 }' "$onbms")
    # The frames that passed the id check must decode as GB/T messages.
    local decoded=$D/flood-vcan0.decoded n_malformed
    "$BMSGW_BIN" decode "$onbms" >"$decoded" 2>&1 || true
    n_malformed=$(grep -c 'MALFORMED' "$decoded" || true)
    echo "attack-flood: vcan0 frames=$n_bms junk=$n_junk cml=$n_cml malformed=$n_malformed"
    [ "$n_junk" -eq 0 ] || {
        echo "junk on vcan0:"; head -n 20 <<<"$junk"
        echo "$n_junk junk frames reached vcan0 (BMS side), e.g. $(head -n 1 <<<"$junk")" >"$REASON_FILE"
        return 1
    }
    [ "$n_malformed" -eq 0 ] || {
        grep MALFORMED "$decoded" | head -n 20
        echo "$n_malformed frames on vcan0 do not decode" >"$REASON_FILE"
        return 1
    }
    # The valid CMLs in the flood pass at most at the rate limit (100/s + 20).
    [ "$n_cml" -le $((100 * ATTACK_FLOOD_SECS + 20)) ] || {
        echo "$n_cml CML on vcan0 in ${ATTACK_FLOOD_SECS}s: over the rate limit" >"$REASON_FILE"
        return 1
    }

    running daemon || { echo "the daemon died in the flood (exit $(cat "$D/daemon.rc" 2>/dev/null))" >"$REASON_FILE"; return 1; }
    local fw
    fw=$(status_json | jq -c '.firewall') && [ -n "$fw" ] || { echo "the daemon does not answer after the flood" >"$REASON_FILE"; return 1; }
    echo "attack-flood: firewall $fw"
    echo "attack-flood: memory daemon VmHWM before=${hwm0}KiB after=${hwm1}KiB VmRSS before=${rss0}KiB mid=${rss_mid}KiB after=${rss1}KiB"
    [ "$mid_ok" -eq 1 ] || { echo "the daemon did not answer its control socket mid-flood" >"$REASON_FILE"; return 1; }
    [ $((hwm1 - hwm0)) -le "$ATTACK_HWM_GROWTH_MAX_KIB" ] || {
        echo "the daemon's VmHWM grew by $((hwm1 - hwm0)) KiB in the flood (limit $ATTACK_HWM_GROWTH_MAX_KIB)" >"$REASON_FILE"
        return 1
    }
    # Bridge load within TpConfig::gbt27930 (8 sessions, 4 x 1785 bytes per side).
    local peak_s peak_b
    peak_s=$(jq -r '.peak_tp_sessions // 0' <<<"$fw")
    peak_b=$(jq -r '.peak_tp_buffered_bytes // 0' <<<"$fw")
    [ "$peak_s" -le 16 ] && [ "$peak_b" -le $((8 * 1785)) ] || {
        echo "bridge load over its limits: peak_tp_sessions $peak_s, peak_tp_buffered_bytes $peak_b" >"$REASON_FILE"
        return 1
    }
    awk -v l="$load" -v m="$ATTACK_MIN_LOAD" 'BEGIN { exit !(l + 0 >= m) }' || {
        echo "the flooder reached only ${load:-?}% load (want >= ${ATTACK_MIN_LOAD}%): the guest is too slow for this step to mean anything" >"$REASON_FILE"
        return 1
    }
    wait_for "the daemon's cloud link (connected after the flood)" 60 st_true '.cloud.state == "connected"' || return 1

    # Afterwards, a legitimate authenticated session completes, online.
    local t0
    t0=$(date +%s)
    session after-flood || return 1
    wait_for "the daemon's last_session to show this session" 30 last_session_since "$t0" || return 1
    local result
    result=$(st '.last_session.result')
    [ "$result" = completed ] || { echo "session after the flood: last_session.result '$result'" >"$REASON_FILE"; return 1; }
    echo "attack-flood: session after the flood completed ($(st '.last_session.credential'))"
    show_status
}

step attack-flood step_attack_flood
