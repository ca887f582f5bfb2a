//! Logging setup shared by every subcommand.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Log to stderr. `RUST_LOG` wins over `default_level` when set, so an
/// integrator can raise one module's level without a rebuild.
///
/// Under systemd, stderr is connected to the journal (`JOURNAL_STREAM` is
/// set), which stamps every line itself: the timestamp is left out there.
pub fn init(default_level: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not in logs and captures.
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    // A second call (tests) keeps the first subscriber.
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        let _ = builder.without_time().try_init();
    } else {
        let _ = builder.try_init();
    }
}

/// Error chains flattened to one line: "outer: inner: root", so that a log
/// line or `status` names the root cause (an OS error such as ENOSPC), not
/// only the operation that failed.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
        src = cause.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_names_the_root_cause_once() {
        let io = std::io::Error::from_raw_os_error(28);
        let e = crate::store::StoreError::OpenFile {
            path: "/var/lib/bmsgw/state.redb".into(),
            source: io,
        };
        let text = chain(&e);
        assert!(
            text.starts_with("store /var/lib/bmsgw/state.redb"),
            "{text}"
        );
        assert!(
            text.ends_with("No space left on device (os error 28)"),
            "{text}"
        );
    }
}
