//! Regression test for `service::signals::terminate`: its handlers are
//! installed when it is called, not when its future is first polled.
//! `bmsgw run` first polls the future after READY=1, so with a lazily
//! installed handler a SIGTERM right after READY killed the daemon without
//! its clean shutdown (found by tests/vcan/steps/bench.sh, which stops the
//! daemon right after READY).
//!
//! Alone in its own test binary: it sends SIGTERM to its own process.

use std::time::Duration;

#[tokio::test]
async fn sigterm_before_the_first_poll_is_caught() {
    let stop = bmsgw::service::signals::terminate();
    // As a stop right after READY: the signal arrives before `stop` is
    // ever polled. Had no handler been installed yet, SIGTERM's default
    // action would end this test process here, and the test would fail.
    let status = std::process::Command::new("kill")
        .args(["-TERM", &std::process::id().to_string()])
        .status()
        .expect("kill(1) is on PATH");
    assert!(status.success(), "kill -TERM exited {status}");
    tokio::time::timeout(Duration::from_secs(10), stop)
        .await
        .expect("terminate() completes on a SIGTERM sent before its first poll");
}
