//! A mosquitto broker for one test, on a free port of 127.0.0.1.
//!
//! ```ignore
//! let tmp = tempfile::tempdir().unwrap();
//! let pki = DevPki::generate(&DevPkiOptions::new(tmp.path())).unwrap();
//! let Some(mut broker) = support::mosquitto::Mosquitto::start(&pki) else {
//!     return; // mosquitto not installed: a SKIPPED notice was printed
//! };
//! // connect to broker.host():broker.port() with a PKI client certificate
//! broker.kill();      // SIGKILL, like a crash
//! broker.restart();   // same port, same config
//! ```
//!
//! It runs the shipped production config (`config/mosquitto/mosquitto.conf`)
//! with only its paths and listener replaced: a client certificate from the
//! PKI's CA is required, its CN is the user name and the client id
//! (`use_identity_as_username`, `use_username_as_clientid`), TLS 1.3 only,
//! and the dynamic-security plugin applies a copy of the PKI's
//! `dynamic-security.json`; anonymous clients are refused.
//! Persistence is on, in the broker's temp dir, so [`Mosquitto::stop`]
//! (SIGTERM) keeps sessions across a restart while [`Mosquitto::kill`]
//! loses what was not yet saved. The broker's log (stderr, all log types)
//! goes to a file whose content failure messages include.
//!
//! Without mosquitto, [`Mosquitto::start`] prints
//! `SKIPPED: mosquitto not installed (apt-get install mosquitto) — <test>`
//! and returns `None`, unless `BMSGW_REQUIRE_MOSQUITTO=1` (set by `.ci/run`)
//! makes that a failure. `BMSGW_MOSQUITTO=/path/to/mosquitto` picks another
//! binary.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bmsgw::sim::pki::DevPki;

const START_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(10);
/// Set to 1 to fail, rather than skip, when mosquitto is missing.
pub const REQUIRE_ENV: &str = "BMSGW_REQUIRE_MOSQUITTO";

/// A mosquitto process. Dropping it kills it.
pub struct Mosquitto {
    binary: PathBuf,
    port: u16,
    dir: tempfile::TempDir,
    conf: PathBuf,
    log: PathBuf,
    dynsec: PathBuf,
    child: Option<Child>,
}

impl Mosquitto {
    /// The mosquitto binary (see [`bmsgw::sim::mosquitto::find_binary`]).
    pub fn binary() -> Option<PathBuf> {
        bmsgw::sim::mosquitto::find_binary()
    }

    /// Start mosquitto for `pki` and wait until it accepts connections, or
    /// print a SKIPPED notice and return `None` when it is not installed.
    /// Panics (failing the test) with the broker's log if it does not start.
    pub fn start(pki: &DevPki) -> Option<Mosquitto> {
        Mosquitto::start_with(pki, &pki.mosquitto_dynsec)
    }

    /// [`start`](Self::start) with another dynamic-security file (copied:
    /// the plugin may rewrite its file).
    pub fn start_with(pki: &DevPki, dynsec: &Path) -> Option<Mosquitto> {
        let Some(binary) = Mosquitto::binary() else {
            let line = format!(
                "SKIPPED: mosquitto not installed (apt-get install mosquitto) — {}",
                super::test_name()
            );
            if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
                panic!("{line}, and {REQUIRE_ENV}=1 requires it");
            }
            super::notice(&line);
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("bmsgw-mosquitto-")
            .tempdir()
            .expect("a temp dir for mosquitto");
        let mut broker = Mosquitto {
            binary,
            port: 0,
            conf: dir.path().join("mosquitto.conf"),
            log: dir.path().join("mosquitto.log"),
            dynsec: dir.path().join("dynamic-security.json"),
            dir,
            child: None,
        };
        std::fs::copy(dynsec, &broker.dynsec).expect("copy the dynamic-security file");
        // The port is free when picked but may be taken before mosquitto
        // binds it: pick another then.
        for _ in 0..3 {
            broker.port = free_port();
            broker.write_config(pki);
            match broker.spawn() {
                Ok(()) => return Some(broker),
                Err(log) if log.contains("Address already in use") => continue,
                Err(log) => panic!("mosquitto did not start:\n{log}"),
            }
        }
        panic!("mosquitto found no free port:\n{}", broker.log());
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The host to connect to; the broker certificate names it.
    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    /// The broker's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its configuration file (for failure messages).
    pub fn config_path(&self) -> &Path {
        &self.conf
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Graceful stop (SIGTERM): mosquitto saves its state and exits.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id().to_string();
            let _ = Command::new("kill").args(["-TERM", &pid]).status();
            let _ = child.wait();
        }
    }

    /// Crash (SIGKILL): connections drop without a DISCONNECT, unsaved state
    /// is lost.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start again on the same port with the same configuration (after
    /// [`stop`](Self::stop) or [`kill`](Self::kill); a running broker is
    /// stopped first). Panics with the log if it does not come back.
    pub fn restart(&mut self) {
        self.stop();
        if let Err(log) = self.spawn() {
            panic!("mosquitto did not restart on port {}:\n{log}", self.port);
        }
    }

    fn write_config(&self, pki: &DevPki) {
        let data = self.dir.path().join("data");
        std::fs::create_dir_all(&data).expect("the broker's data dir");
        let shipped = bmsgw::sim::mosquitto::SHIPPED_CONF;
        let conf =
            bmsgw::sim::mosquitto::shipped_config(shipped, pki, &self.dynsec, &data, self.port)
                .unwrap_or_else(|e| panic!("the shipped file changed shape ({e}):\n{shipped}"));
        let conf = format!(
            "# bmsgw test broker (tests/support/mosquitto.rs): the shipped config\n\
             {conf}\
             log_dest stderr\n\
             log_type all\n\
             connection_messages true\n"
        );
        std::fs::write(&self.conf, conf).expect("write mosquitto.conf");
    }

    /// Spawn the process and wait until the port accepts; Err(log) if it
    /// exits or does not accept in time.
    fn spawn(&mut self) -> Result<(), String> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the mosquitto log");
        let log2 = log.try_clone().expect("clone the log handle");
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.binary.display()))?;
        self.child = Some(child);
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let start = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!("exited with {status}; log:\n{}", self.log()));
            }
            // A bare TCP connection, closed at once (mosquitto logs a
            // failed TLS handshake for it).
            if TcpStream::connect_timeout(&addr, POLL).is_ok() {
                return Ok(());
            }
            if start.elapsed() > START_TIMEOUT {
                self.kill();
                return Err(format!(
                    "port {} not accepting after {START_TIMEOUT:?}; log:\n{}",
                    self.port,
                    self.log()
                ));
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}
