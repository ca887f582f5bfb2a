//! Talking to systemd (`Type=notify`): readiness, a status line, stopping,
//! and watchdog pings, through the `sd-notify` crate.
//!
//! Everything is a no-op when `NOTIFY_SOCKET` is unset (started by hand, in
//! tests, under another supervisor). A notification that cannot be sent is
//! logged and otherwise ignored: the daemon can do nothing better about it,
//! and systemd acts on the silence (start timeout, watchdog) by itself.
//!
//! The watchdog: with `WatchdogSec=` systemd sets `WATCHDOG_USEC`; the
//! daemon should [`ping`](Systemd::ping) every
//! [`watchdog_interval`](Systemd::watchdog_interval) (half of it, as
//! `sd_watchdog_enabled(3)` recommends) from its main loop, and only while
//! that loop is healthy, so that a hung daemon is restarted.

use std::time::Duration;

use sd_notify::NotifyState;
use tracing::warn;

/// The daemon's handle on the service manager, read once from the
/// environment at start.
#[derive(Clone, Debug, Default)]
pub struct Systemd {
    /// The watchdog timeout systemd set (`WATCHDOG_USEC`), if any.
    watchdog: Option<Duration>,
    /// `NOTIFY_SOCKET` was set: there is someone to notify.
    notify: bool,
}

impl Systemd {
    /// Read `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`.
    pub fn from_env() -> Systemd {
        let notify = std::env::var_os("NOTIFY_SOCKET").is_some();
        Systemd {
            // The watchdog needs the notify socket to be pinged through.
            watchdog: if notify {
                sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
            } else {
                None
            },
            notify,
        }
    }

    /// Whether notifications go anywhere.
    pub fn is_enabled(&self) -> bool {
        self.notify
    }

    /// `READY=1`: start-up is finished (CAN and the store are up).
    pub fn ready(&self) {
        self.send("READY", &[NotifyState::Ready]);
    }

    /// `STATUS=…`: one line `systemctl status` shows. Line breaks and other
    /// control characters become spaces (a newline would start another
    /// notification field).
    pub fn status(&self, text: &str) {
        if !self.notify {
            return;
        }
        let line: String = text
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        self.send("STATUS", &[NotifyState::Status(&line)]);
    }

    /// `STOPPING=1`: shutting down (SIGTERM received).
    pub fn stopping(&self) {
        self.send("STOPPING", &[NotifyState::Stopping]);
    }

    /// How often to [`ping`](Self::ping): half the watchdog timeout; `None`
    /// when systemd runs no watchdog for this process.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|d| d / 2)
    }

    /// `WATCHDOG=1`: the main loop is alive. A no-op without a watchdog.
    pub fn ping(&self) {
        if self.watchdog.is_some() {
            self.send("WATCHDOG", &[NotifyState::Watchdog]);
        }
    }

    fn send(&self, what: &str, state: &[NotifyState<'_>]) {
        if !self.notify {
            return;
        }
        if let Err(e) = sd_notify::notify(state) {
            warn!(notification = what, error = %e, "cannot notify systemd");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;
    use std::process::Command;

    /// Set for the child process [`child_notifies`] runs in.
    const CHILD_ENV: &str = "BMSGW_TEST_SYSTEMD_CHILD";

    /// Changing the environment is `unsafe` in edition 2024 and sd-notify
    /// reads it, so the notifying side runs in a child process of this test
    /// binary, started with `NOTIFY_SOCKET` pointing at a socket we hold.
    #[test]
    fn notifications_reach_the_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind");
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let exe = std::env::current_exe().expect("test binary");
        let out = Command::new(exe)
            .args([
                "--exact",
                "service::systemd::tests::child_notifies",
                "--ignored",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, "1")
            .env("NOTIFY_SOCKET", &path)
            .env("WATCHDOG_USEC", "10000000")
            .env_remove("WATCHDOG_PID")
            .output()
            .expect("child runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "child failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut got = Vec::new();
        let mut buf = [0u8; 512];
        for _ in 0..4 {
            let n = socket.recv(&mut buf).expect("a notification");
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        assert_eq!(
            got,
            [
                "STATUS=starting: CAN up store open\n",
                "READY=1\n",
                "WATCHDOG=1\n",
                "STOPPING=1\n"
            ]
        );
    }

    #[test]
    #[ignore = "runs as a child process of notifications_reach_the_socket"]
    fn child_notifies() {
        if std::env::var_os(CHILD_ENV).is_none() {
            return;
        }
        let sd = Systemd::from_env();
        assert!(sd.is_enabled());
        assert_eq!(sd.watchdog_interval(), Some(Duration::from_secs(5)));
        sd.status("starting: CAN up\nstore open");
        sd.ready();
        sd.ping();
        sd.stopping();
    }

    #[test]
    fn without_systemd_everything_is_a_no_op() {
        let sd = Systemd::default();
        assert!(!sd.is_enabled());
        assert_eq!(sd.watchdog_interval(), None);
        // Nothing to send to; these must simply return.
        sd.ready();
        sd.status("x");
        sd.ping();
        sd.stopping();
    }
}
