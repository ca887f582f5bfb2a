//! Stopping on SIGTERM or SIGINT.
//!
//! The handlers must be in place before the daemon says READY=1. tokio
//! installs a handler when `signal()` is called, and an `async fn` that
//! calls it runs only when first polled; `bmsgw run` first polls its
//! shutdown future in its main loop, after READY. A SIGTERM in that window
//! (`systemctl stop` right after a start, a supervisor's quick restart)
//! took the default action and killed the daemon without its clean
//! shutdown (session ended and queued, control socket removed).
//! [`terminate`] installs both handlers when it is called, not when polled.

use std::future::Future;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::warn;

/// Completes on the first SIGTERM or SIGINT delivered after this call.
///
/// Call it inside the tokio runtime, before the service reports ready. A
/// handler that cannot be installed leaves that signal its default action
/// (which ends the process), and says so in the log.
pub fn terminate() -> impl Future<Output = ()> + Send + 'static {
    let term = install(SignalKind::terminate(), "SIGTERM");
    let int = install(SignalKind::interrupt(), "SIGINT");
    async move {
        tokio::select! {
            () = first(term) => {}
            () = first(int) => {}
        }
    }
}

fn install(kind: SignalKind, name: &'static str) -> Option<Signal> {
    match signal(kind) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(signal = name, error = %e, "cannot install a handler; the signal keeps its default action");
            None
        }
    }
}

async fn first(signal: Option<Signal>) {
    if let Some(mut s) = signal
        && s.recv().await.is_some()
    {
        return;
    }
    // No handler, or `recv` gave `None` (the runtime's signal driver is
    // gone): nothing will ever arrive.
    std::future::pending().await
}
