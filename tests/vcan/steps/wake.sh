# shellcheck shell=bash
# Waking up to charge (issue 16, deliverable 6), sourced by
# tests/vcan/guest.sh: a parked car's gateway is frozen long enough that the
# broker drops its connection, then resumed, and a charge request comes at
# once. The session must get its credential from the cloud (no voucher) and
# quickly.
#
#   daemon-wake   its own broker, cloud and daemon (keepalive 5 s, so
#                 mosquitto drops a frozen client after 7.5 s); an online
#                 session for vouchers; then WAKE_RUNS times: SIGSTOP the
#                 daemon until mosquitto reports the client's keepalive
#                 timeout, SIGCONT, start a session at once
#
# Each run prints "WAKE run=N credential=online|voucher grant_ms=M": M is
# the time from the charge request to the credential (the daemon's
# "credential for the session" log line). The step fails on a voucher, a
# failed session, or a spent voucher; the figure is reported, not judged.

WAKE_RUNS=${BMSGW_WAKE_RUNS:-3}

wake_body() {
    session wake-first || return 1
    wait_for "the first session's last_session" 30 st_true '(.session == null) and (.last_session.credential == "online")' || return 1
    local i pid v0 v1 t0 cred ms drops
    for i in $(seq 1 "$WAKE_RUNS"); do
        v0=$(st "$J_VOUCHERS") || return 1
        wait_for "the daemon's cloud link to be connected" 30 st_true '.cloud.state == "connected"' || return 1
        pid=$(cat "$D/daemon.pid")
        drops=$(cat "$D"/mosquitto-*.log | grep -c 'exceeded timeout' || true)
        echo "--- run $i: SIGSTOP $pid (vouchers $v0)"
        kill -STOP "$pid"
        wait_for "mosquitto to drop the frozen daemon" 60 wake_dropped_above "$drops" || {
            kill -CONT "$pid"
            return 1
        }
        echo "--- run $i: SIGCONT, charge request at once"
        kill -CONT "$pid"
        t0=$(date +%s)
        session "wake-$i" || return 1
        wait_for "the daemon's last_session to show this session" 30 last_session_since "$t0" || return 1
        cred=$(st '.last_session.credential')
        ms=$(grep 'credential for the session' "$D"/daemon-*.log | tail -n 1 | sed -nE 's/.*elapsed_ms=([0-9]+).*/\1/p')
        v1=$(st "$J_VOUCHERS")
        echo "WAKE run=$i credential=$cred grant_ms=${ms:-?} vouchers_before=$v0 vouchers_after=$v1"
        [ "$cred" = online ] || {
            echo "run $i: the session after the wake-up used credential '$cred' (want online)" >"$REASON_FILE"
            return 1
        }
        [ "$v1" -ge "$v0" ] || {
            echo "run $i: vouchers went from $v0 to $v1 with an online credential" >"$REASON_FILE"
            return 1
        }
    done
}
wake_dropped_above() { [ "$(cat "$D"/mosquitto-*.log | grep -c 'exceeded timeout')" -gt "$1" ]; }

step_daemon_wake() {
    D_KEEP_ALIVE=5s D_GW_EXTRA='' own_daemon wake-daemon wake_body
}

step daemon-wake step_daemon_wake
