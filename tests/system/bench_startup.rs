//! `bmsgw bench startup` keeps working: the binary starts itself as the
//! daemon twice, gets READY=1 through NOTIFY_SOCKET each time, stops it
//! with SIGTERM (clean exit required) and prints its figures. The time
//! itself is measured, not asserted (docs/performance.md).

#[test]
fn bench_startup_reaches_ready_and_stops_cleanly() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bmsgw"))
        .args(["bench", "startup", "--runs", "2"])
        .output()
        .expect("bmsgw runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with("startup runs=2 "))
        .unwrap_or_else(|| panic!("no figures line: {stdout}"));
    for field in ["first_ms=", "median_ms=", "max_ms="] {
        assert!(line.contains(field), "{line}");
    }
}
