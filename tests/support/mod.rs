//! Shared harness for the tests in `tests/`: include it with `mod support;`.
//!
//! - [`mosquitto`]: a real mosquitto broker started on 127.0.0.1 with the
//!   dev PKI (mutual TLS 1.3, identity = certificate CN, the generated ACL),
//!   or a printed `SKIPPED` notice when mosquitto is not installed.
//! - [`mqtt`]: raw rumqttc v5 clients over mutual TLS, for tests that check
//!   the broker itself rather than `cloud::link`.
//! - [`notice`]: a line that shows in `cargo test` output even though the
//!   test harness captures the test's own output.
//!
//! Each test binary uses a different part of it.
#![allow(dead_code)]

pub mod mosquitto;
pub mod mqtt;

use std::io::Write;

/// Print `line` to the terminal at once, also when libtest captures
/// output: libtest captures `print!`/`eprint!`, not writes to the stderr
/// handle itself.
pub fn notice(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
    let _ = err.flush();
}

/// The running test's name (libtest names each test's thread after it).
pub fn test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("<unnamed test>")
        .to_owned()
}
