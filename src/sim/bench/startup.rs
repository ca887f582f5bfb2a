//! `bmsgw bench startup`: the time from starting `bmsgw` to its READY=1,
//! on this machine, for a daemon that restarts on its existing store.
//!
//! The VM lane times the real ECU build on real vcan, but under software
//! emulation (seconds, mostly the emulation). This host has no SocketCAN,
//! so here the parent starts this very binary as a child,
//! `bmsgw bench startup-child --config F`, which does what `bmsgw run`
//! does (the same config load, logging, keys, store, control socket, cloud
//! link started after READY, `service::daemon::run_on`) on two in-process
//! buses instead of two SocketCAN sockets: the one step left out is
//! opening two CAN sockets (two `socket`/`bind` system calls). The child
//! gets `NOTIFY_SOCKET` pointing at a datagram socket the parent listens
//! on, as systemd would set it; the time runs from just before the parent
//! spawns the child to the READY=1 datagram, so it includes `exec`, the
//! dynamic loader and the runtime's start. The child is the default build
//! (with the simulators), larger than the ECU build, so it is if anything
//! slower to load.
//!
//! The first run creates the store and the wallet key (a first start);
//! the figure is over the later runs, which restart on that store as a
//! daemon restarted by systemd does. Each run ends with SIGTERM and must
//! exit cleanly.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::net::UnixDatagram;

use super::BenchError;
use crate::service::config::CanInterfaces;
use crate::sim::pki::{DevPki, DevPkiOptions, GatewayTomlOptions};

/// Longest a start may take before the run counts as failed.
const READY_WITHIN: Duration = Duration::from_secs(20);

#[derive(Clone, Debug)]
pub struct StartupOptions {
    /// Starts to time (the first is the first start and reported apart).
    pub runs: usize,
    /// The binary to start (this one).
    pub binary: PathBuf,
}

#[derive(Clone, Debug, Serialize)]
pub struct StartupReport {
    /// The first start (store and wallet key created), ms.
    pub first_ms: f64,
    /// Every later start, ms, in order.
    pub restarts_ms: Vec<f64>,
    pub median_ms: f64,
    pub max_ms: f64,
}

fn failed(what: &str, e: &dyn std::fmt::Display) -> BenchError {
    BenchError::Failed(format!("{what}: {e}"))
}

/// Write the child's config into `dir`; returns its path.
pub fn prepare(dir: &Path) -> Result<PathBuf, BenchError> {
    let pki = DevPki::generate(&DevPkiOptions::new(dir.join("pki")))
        .map_err(|e| failed("dev PKI", &e))?;
    let state = dir.join("state");
    pki.write_gateway_toml(
        "veh-a",
        &GatewayTomlOptions {
            // Nothing listens there; the link connects after READY anyway.
            broker_port: 1,
            can: CanInterfaces::Bridge {
                bms: "bench-bms".into(),
                pile: "bench-pile".into(),
            },
            state_dir: state.clone(),
            control_socket: state.join("control.sock"),
            request_timeout: Duration::from_secs(2),
        },
    )
    .map_err(|e| failed("gateway config", &e))
}

/// Start the child once; the time to its READY=1.
async fn one_start(
    binary: &Path,
    config: &Path,
    notify: &UnixDatagram,
    notify_path: &Path,
) -> Result<Duration, BenchError> {
    let started = Instant::now();
    let child = Command::new(binary)
        .args(["bench", "startup-child", "--config"])
        .arg(config)
        .env("NOTIFY_SOCKET", notify_path)
        .env_remove("WATCHDOG_USEC")
        .stdin(Stdio::null())
        // Its log would bury the figures; a failed start is reported with
        // its exit status (run `bmsgw run` on the config to see why).
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| failed(&format!("starting {}", binary.display()), &e))?;
    let mut child = Reaped(child);
    let mut buf = [0u8; 4096];
    let ready = tokio::time::timeout(READY_WITHIN, async {
        loop {
            let n = notify.recv(&mut buf).await?;
            // STATUS= lines come first; READY=1 may share a datagram.
            if buf[..n].split(|b| *b == b'\n').any(|l| l == b"READY=1") {
                return Ok::<_, std::io::Error>(started.elapsed());
            }
        }
    })
    .await;
    let took = match ready {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return Err(failed("notify socket", &e)),
        Err(_) => {
            let status = child.0.try_wait().ok().flatten();
            return Err(BenchError::Failed(format!(
                "no READY=1 within {READY_WITHIN:?} (child: {})",
                status.map_or("still running".into(), |s| s.to_string())
            )));
        }
    };
    let pid = child.0.id();
    let killed = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .map_err(|e| failed("kill -TERM", &e))?;
    if !killed.success() {
        return Err(BenchError::Failed(format!("kill -TERM {pid}: {killed}")));
    }
    let status = child.exit_within(Duration::from_secs(10)).await?;
    if !status.success() {
        return Err(BenchError::Failed(format!(
            "the child did not stop cleanly on SIGTERM: {status}"
        )));
    }
    Ok(took)
}

/// The child, killed (SIGKILL) if a run fails before it stopped.
struct Reaped(Child);

impl Reaped {
    async fn exit_within(&mut self, limit: Duration) -> Result<ExitStatus, BenchError> {
        let give_up = Instant::now() + limit;
        loop {
            match self.0.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) if Instant::now() < give_up => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Ok(None) => {
                    return Err(BenchError::Failed(
                        "the child did not stop on SIGTERM".into(),
                    ));
                }
                Err(e) => return Err(failed("waiting for the child", &e)),
            }
        }
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub async fn run(
    opts: &StartupOptions,
    out: &mut dyn std::io::Write,
) -> Result<StartupReport, BenchError> {
    if opts.runs < 2 {
        return Err(BenchError::Failed(
            "at least 2 runs: the first is a first start".into(),
        ));
    }
    let dir = tempfile::tempdir().map_err(|e| failed("temp dir", &e))?;
    let config = prepare(dir.path())?;
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).map_err(|e| failed("notify socket", &e))?;
    let mut times = Vec::with_capacity(opts.runs);
    for _ in 0..opts.runs {
        times.push(one_start(&opts.binary, &config, &notify, &notify_path).await?);
    }
    let first_ms = ms(times[0]);
    let restarts_ms: Vec<f64> = times[1..].iter().map(|d| ms(*d)).collect();
    let mut sorted = restarts_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let median_ms = sorted[sorted.len() / 2];
    let max_ms = sorted.last().copied().unwrap_or(0.0);
    let report = StartupReport {
        first_ms,
        restarts_ms,
        median_ms,
        max_ms,
    };
    writeln!(
        out,
        "startup runs={} first_ms={:.1} median_ms={:.1} max_ms={:.1} target_ms=50 {}",
        opts.runs,
        report.first_ms,
        report.median_ms,
        report.max_ms,
        if report.max_ms <= 50.0 {
            "met"
        } else {
            "missed"
        }
    )?;
    Ok(report)
}
