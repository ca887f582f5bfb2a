//! `bmsgw bench cloud`: grants per second of the reference cloud identity
//! service with 1 and with 2 instances on one shared subscription, through
//! a real mosquitto, and the ratio between them.
//!
//! Every run starts from nothing, so no run inherits another's sessions:
//! - a fresh **mosquitto** with the shipped `config/mosquitto/mosquitto.conf`
//!   (TLS 1.3 only, mutual TLS, CN as username, the ACL, persistence), only
//!   its paths and port replaced, as `tests/broker/mosquitto_example.rs` does. A
//!   broker that outlived a run would keep the old instances' persistent
//!   `$share/…` sessions and go on handing requests to them while they are
//!   gone;
//! - K **`bmsgw sim cloud`** processes (this very binary), each its own
//!   client id on the shared subscription, as they are deployed. The bench
//!   waits until the broker's log shows each one's SUBSCRIBE to the shared
//!   request filter;
//! - V **vehicle links** ([`Link`], configured as the daemon configures its
//!   own), one TLS connection and certificate per vehicle, because the ACL
//!   lets a vehicle publish only its own requests.
//!
//! The load generator shares the machine's cores with mosquitto and the
//! instances, so it is kept cheap inside the timed window: all N requests
//! are sealed ([`IdentityExchange::start`]) before the clock starts; inside
//! the window `in_flight` workers publish them with
//! [`Link::request_stream`] and keep the first answer to each (matched by
//! correlation data, as the daemon's client does); after the clock stops
//! every answer is opened and checked by the vehicle's own rules
//! ([`IdentityExchange::on_response`]). One answer that is not a valid grant
//! fails the run: a denial (a stale or refused request) must not count as
//! throughput. The requests are unique, so the cloud's repeat cache never
//! answers one; `in_flight` stays within what an instance's incoming
//! channel buffers, so no request is dropped on the way in.
//!
//! The window runs from the first publish to the last answer. With the
//! window the bench records the CPU time that mosquitto, each instance and
//! the generator used in it (`/proc/PID/stat`), and the machine's busy and
//! niced time (`/proc/stat`): when 2 instances do not reach 1.8 times the
//! grants of 1, these say who held the cores. The kernel counts CPU time
//! in 10 ms ticks, so runs shorter than about half a second (a few
//! thousand requests) make these figures, and the ceilings, coarse.
//!
//! Each instance count is measured `repeats` times, the counts interleaved
//! (1, 2, 1, 2, …) so that a change in background load hits both; the
//! figure is the median run, and the best is reported beside it.
//!
//! What the generator must respect in the service: a request's time may
//! be at most `max_request_age_s` (30 s in the dev `cloud.toml`) from the
//! cloud's when it is handled, so sealing ahead bounds a run to well under
//! that (a stale request is denied, which fails the run); a repeated
//! request id gets the cached answer, so every request is sealed fresh.
//! The service has no per-vehicle rate limit to stay under.
//!
//! Why 2 instances are not 2 times 1 on a small machine: an instance is one
//! serial loop on a current-thread runtime (HPKE open, ticket, HPKE seal,
//! TLS), so it can use one core at most, while mosquitto and the generator
//! need CPU for every grant too. From the CPU per grant measured in each
//! count's runs the bench prints that count's ceiling (see
//! [`CpuPerGrant`]): on 2 cores, with an instance at ~230 µs a grant and
//! mosquitto plus the generator at ~50-75 µs, 2 instances can reach about
//! 1.6 times 1.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::auth::SystemRng;
use crate::cloud::envelope::{KeyError, KeyPair, PublicKey};
use crate::cloud::exchange::{
    ExchangeEvent, ExchangeParams, IdentityExchange, OutgoingRequest, VehicleKeys,
};
use crate::cloud::link::{Incoming, Link, LinkConfig, LinkError, LinkState, QoS};
use crate::cloud::tls::TlsFiles;
use crate::cloud::topics::{self, VehicleId};
use crate::sim::cloud::{CloudConfig, ConfigError};
use crate::sim::mosquitto::{self, BINARY_ENV, SHIPPED_CONF as SHIPPED_MOSQUITTO_CONF};
use crate::sim::pki::{DevPki, DevPkiOptions, PkiError};
use crate::time::unix_now;

/// The pile every request names.
const CHARGER: u32 = 1;
/// An instance's incoming channel (`LinkConfig::incoming_capacity`):
/// more requests in flight than this could be dropped on the way in.
const MAX_IN_FLIGHT: usize = 256;
/// How long one request may wait for its answer before the run fails.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long mosquitto, an instance's SUBSCRIBE, or a vehicle's connection
/// may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(10);
/// The kernel reports process times in USER_HZ ticks, 100 per second on
/// Linux.
const USER_HZ: f64 = 100.0;

/// What to measure.
#[derive(Clone, Debug)]
pub struct CloudOptions {
    /// Instance counts to measure, e.g. `[1, 2]`.
    pub instances: Vec<usize>,
    /// Requests per run, spread round robin over the vehicles.
    pub requests: usize,
    /// Vehicle links (each its own TLS connection and identity).
    pub vehicles: usize,
    /// Requests published and not yet answered, at most.
    pub in_flight: usize,
    /// Runs per instance count.
    pub repeats: usize,
    /// Vouchers each request asks for (the dev cloud gives at most 4); 0 is
    /// a plain online grant.
    pub want_vouchers: u16,
    /// The `bmsgw` binary the instances run (`std::env::current_exe`).
    pub instance_binary: PathBuf,
}

/// Why the bench could not measure.
#[derive(Debug, thiserror::Error)]
pub enum CloudBenchError {
    #[error("--{flag}: {problem}")]
    Option { flag: &'static str, problem: String },
    #[error(
        "mosquitto not found on PATH, in /usr/sbin or /usr/local/sbin \
         (apt-get install mosquitto, or set {BINARY_ENV}=/path/to/mosquitto)"
    )]
    NoMosquitto,
    #[error("config/mosquitto/mosquitto.conf changed shape: {0}")]
    ShippedConfig(#[from] mosquitto::ShapeError),
    #[error("dev PKI: {0}")]
    Pki(#[from] PkiError),
    #[error("cloud.toml: {0}")]
    CloudConfig(#[from] ConfigError),
    #[error("{path}: {source}")]
    Key {
        path: PathBuf,
        #[source]
        source: KeyError,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("mosquitto {problem}; its log ends:\n{log}")]
    Broker { problem: String, log: String },
    #[error("cloud instance {index} {problem}; its stderr ends:\n{log}")]
    Instance {
        index: usize,
        problem: String,
        log: String,
    },
    #[error("vehicle {vehicle}: {problem}")]
    Vehicle { vehicle: String, problem: String },
    #[error("vehicle {vehicle}: link: {source}")]
    Link {
        vehicle: String,
        // Boxed: a LinkError is large, and every Result here carries it.
        #[source]
        source: Box<LinkError>,
    },
    #[error("{failed} of {requests} requests got no valid grant; the first: {first}")]
    Replies {
        failed: usize,
        requests: usize,
        first: String,
    },
    #[error(
        "the instances say they granted {granted} in all ({per_instance:?}), \
         but {requests} requests were answered"
    )]
    Count {
        granted: u64,
        per_instance: Vec<u64>,
        requests: usize,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CloudBenchError {
    let what = what.into();
    move |source| CloudBenchError::Io { what, source }
}

/// CPU seconds used inside one run's window.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CpuUse {
    pub mosquitto_s: f64,
    /// One per instance.
    pub instances_s: Vec<f64>,
    /// The load generator (this process: vehicle links and workers).
    pub generator_s: f64,
    /// Every core's busy time, all processes (not niced).
    pub machine_busy_s: f64,
    /// Every core's time in niced processes (a background job).
    pub machine_niced_s: f64,
    /// Cores times the window: the most that could have been used.
    pub machine_capacity_s: f64,
}

/// One run: K instances, N requests.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RunReport {
    pub instances: usize,
    pub requests: usize,
    pub window_s: f64,
    pub grants_per_s: f64,
    /// Grants each instance issued (from its exit line).
    pub granted_per_instance: Vec<u64>,
    pub cpu: CpuUse,
}

/// All runs of one instance count.
#[derive(Clone, Debug, serde::Serialize)]
pub struct InstancesReport {
    pub instances: usize,
    /// The median run's grants per second (the figure).
    pub median_grants_per_s: f64,
    pub best_grants_per_s: f64,
    /// What one grant cost in CPU in these runs.
    pub cpu_per_grant: CpuPerGrant,
    /// The most these instances could serve on this machine's cores at
    /// those costs: an instance is one serial loop (one core at most), and
    /// mosquitto and the generator need their share of the same cores.
    pub ceiling_grants_per_s: f64,
    pub runs: Vec<RunReport>,
}

/// Everything, for `--json`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CloudReport {
    pub requests: usize,
    pub vehicles: usize,
    pub in_flight: usize,
    pub repeats: usize,
    pub want_vouchers: u16,
    pub cores: usize,
    /// `/proc/loadavg` before the first run.
    pub load_before: String,
    pub by_instances: Vec<InstancesReport>,
    /// Median grants/s of the largest instance count over that of the
    /// smallest (2 over 1 by default).
    pub ratio: Option<f64>,
    /// The target: 2 instances >= 1.8 x 1.
    pub target_met: Option<bool>,
    /// The same ratio of the CPU ceilings: what these cores allow.
    pub ceiling_ratio: Option<f64>,
}

/// CPU microseconds per grant, medians over runs.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CpuPerGrant {
    /// All instances together.
    pub instances_us: f64,
    pub mosquitto_us: f64,
    pub generator_us: f64,
}

impl CpuPerGrant {
    fn from_runs(runs: &[&RunReport]) -> CpuPerGrant {
        let per = |f: &dyn Fn(&RunReport) -> f64| {
            let v: Vec<f64> = runs
                .iter()
                .map(|r| f(r) * 1e6 / r.requests as f64)
                .collect();
            median(&v)
        };
        CpuPerGrant {
            instances_us: per(&|r| r.cpu.instances_s.iter().sum()),
            mosquitto_us: per(&|r| r.cpu.mosquitto_s),
            generator_us: per(&|r| r.cpu.generator_s),
        }
    }

    /// Grants/s that `instances` serial instances and everything else
    /// could reach on `cores` cores at these costs.
    fn ceiling(&self, instances: usize, cores: usize) -> f64 {
        let total = self.instances_us + self.mosquitto_us + self.generator_us;
        if self.instances_us <= 0.0 || total <= 0.0 {
            return 0.0;
        }
        let serial = instances as f64 * 1e6 / self.instances_us;
        let machine = cores as f64 * 1e6 / total;
        serial.min(machine)
    }
}

/// The ratio 2 instances must reach over 1.
pub const TARGET_RATIO: f64 = 1.8;

impl CloudOptions {
    fn check(&self) -> Result<(), CloudBenchError> {
        let bad = |flag, problem: &str| {
            Err(CloudBenchError::Option {
                flag,
                problem: problem.to_owned(),
            })
        };
        if self.instances.is_empty() || self.instances.iter().any(|&k| k == 0 || k > 16) {
            return bad("instances", "each count must be 1 to 16");
        }
        if self.requests == 0 {
            return bad("requests", "must be at least 1");
        }
        if self.vehicles == 0 || self.vehicles > 1000 {
            return bad("vehicles", "must be 1 to 1000");
        }
        if self.in_flight == 0 || self.in_flight > MAX_IN_FLIGHT {
            return bad(
                "in-flight",
                &format!(
                    "must be 1 to {MAX_IN_FLIGHT} (an instance buffers {MAX_IN_FLIGHT} requests; more could be dropped)"
                ),
            );
        }
        if self.repeats == 0 {
            return bad("repeats", "must be at least 1");
        }
        Ok(())
    }
}

/// Measure; one line per run and a summary on `out`.
pub async fn run(opts: &CloudOptions, out: &mut dyn Write) -> Result<CloudReport, CloudBenchError> {
    opts.check()?;
    let mosquitto = mosquitto::find_binary().ok_or(CloudBenchError::NoMosquitto)?;
    let tmp = tempfile::Builder::new()
        .prefix("bmsgw-bench-cloud-")
        .tempdir()
        .map_err(io("a temp dir"))?;
    let vehicle_ids: Vec<String> = (0..opts.vehicles)
        .map(|i| format!("bench-{i:04}"))
        .collect();
    let pki = DevPki::generate(&DevPkiOptions {
        vehicles: vehicle_ids.clone(),
        // Owner approval would hold every grant for a person.
        approval_required: Vec::new(),
        chargers: vec![CHARGER],
        // One certificate per instance: the broker takes the CN as the
        // client id, so instances sharing one would knock each other off.
        cloud_instances: u32::try_from(opts.instances.iter().copied().max().unwrap_or(1))
            .unwrap_or(u32::MAX),
        ..DevPkiOptions::new(tmp.path().join("pki"))
    })?;
    let cloud_config = CloudConfig::load(&pki.cloud_toml)?;
    let expected_vouchers = opts
        .want_vouchers
        .min(cloud_config.settings.vouchers_per_grant);
    let cloud_public =
        PublicKey::load(&pki.cloud_hpke_pub).map_err(|source| CloudBenchError::Key {
            path: pki.cloud_hpke_pub.clone(),
            source,
        })?;
    let mut vehicles = Vec::with_capacity(vehicle_ids.len());
    for id in &vehicle_ids {
        let files = pki.vehicle(id);
        let own = KeyPair::load(&files.hpke_key).map_err(|source| CloudBenchError::Key {
            path: files.hpke_key.clone(),
            source,
        })?;
        let vehicle_id = VehicleId::parse(id).map_err(|e| CloudBenchError::Vehicle {
            vehicle: id.clone(),
            problem: e.to_string(),
        })?;
        vehicles.push(VehicleKeys {
            vehicle_id,
            own,
            cloud: cloud_public,
        });
    }

    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let load_before = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    let mut runs: Vec<RunReport> = Vec::new();
    let mut run_no = 0;
    for _ in 0..opts.repeats {
        for &k in &opts.instances {
            run_no += 1;
            let dir = tmp.path().join(format!("run-{run_no}"));
            std::fs::create_dir(&dir).map_err(io(format!("creating {}", dir.display())))?;
            let setup = RunSetup {
                mosquitto: &mosquitto,
                bmsgw: &opts.instance_binary,
                pki: &pki,
                dir: &dir,
                vehicles: &vehicles,
                expected_vouchers,
                cores,
            };
            let r = one_run(opts, k, &setup).await?;
            writeln!(out, "{}", run_line(&r)).map_err(io("writing the report"))?;
            runs.push(r);
        }
    }

    let mut by_instances = Vec::new();
    for &k in &opts.instances {
        if by_instances
            .iter()
            .any(|b: &InstancesReport| b.instances == k)
        {
            continue;
        }
        let mine: Vec<RunReport> = runs.iter().filter(|r| r.instances == k).cloned().collect();
        let rates: Vec<f64> = mine.iter().map(|r| r.grants_per_s).collect();
        let cpu_per_grant = CpuPerGrant::from_runs(&mine.iter().collect::<Vec<_>>());
        by_instances.push(InstancesReport {
            instances: k,
            median_grants_per_s: median(&rates),
            best_grants_per_s: rates.iter().copied().fold(0.0, f64::max),
            ceiling_grants_per_s: cpu_per_grant.ceiling(k, cores),
            cpu_per_grant,
            runs: mine,
        });
    }
    let lowest = by_instances.iter().min_by_key(|b| b.instances);
    let highest = by_instances.iter().max_by_key(|b| b.instances);
    let ratio_of = |f: fn(&InstancesReport) -> f64| match (lowest, highest) {
        (Some(lo), Some(hi)) if hi.instances > lo.instances && f(lo) > 0.0 => Some(f(hi) / f(lo)),
        _ => None,
    };
    let ratio = ratio_of(|b| b.median_grants_per_s);
    let ceiling_ratio = ratio_of(|b| b.ceiling_grants_per_s);
    let target_met = match (lowest, highest, ratio) {
        (Some(lo), Some(hi), Some(r)) if lo.instances == 1 && hi.instances == 2 => {
            Some(r >= TARGET_RATIO)
        }
        _ => None,
    };
    let report = CloudReport {
        requests: opts.requests,
        vehicles: opts.vehicles,
        in_flight: opts.in_flight,
        repeats: opts.repeats,
        want_vouchers: opts.want_vouchers,
        cores,
        load_before,
        by_instances,
        ratio,
        target_met,
        ceiling_ratio,
    };
    for b in &report.by_instances {
        let c = &b.cpu_per_grant;
        writeln!(
            out,
            "cloud instances={} runs={} median_grants_per_s={:.0} best_grants_per_s={:.0} \
             cpu_per_grant_us: instances={:.0} mosquitto={:.0} generator={:.0} \
             ceiling_on_{}_cores={:.0}",
            b.instances,
            b.runs.len(),
            b.median_grants_per_s,
            b.best_grants_per_s,
            c.instances_us,
            c.mosquitto_us,
            c.generator_us,
            report.cores,
            b.ceiling_grants_per_s
        )
        .map_err(io("writing the report"))?;
    }
    if let Some(r) = report.ratio {
        let met = match report.target_met {
            Some(true) => "met",
            Some(false) => "missed",
            None => "n/a",
        };
        let ceiling = report.ceiling_ratio.unwrap_or(0.0);
        writeln!(
            out,
            "cloud ratio={r:.2} ceiling_ratio={ceiling:.2} target={TARGET_RATIO} {met}"
        )
        .map_err(io("writing the report"))?;
    }
    Ok(report)
}

fn run_line(r: &RunReport) -> String {
    let mut line = format!(
        "cloud run instances={} requests={} window_s={:.3} grants_per_s={:.0} granted={:?} \
         cpu_s: mosquitto={:.2} instances=[",
        r.instances,
        r.requests,
        r.window_s,
        r.grants_per_s,
        r.granted_per_instance,
        r.cpu.mosquitto_s
    );
    for (i, s) in r.cpu.instances_s.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        let _ = write!(line, "{sep}{s:.2}");
    }
    let _ = write!(
        line,
        "] generator={:.2} machine_busy={:.2} niced={:.2} of {:.2}",
        r.cpu.generator_s, r.cpu.machine_busy_s, r.cpu.machine_niced_s, r.cpu.machine_capacity_s
    );
    line
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The shipped `mosquitto.conf` with its paths and port replaced, and
/// logging that shows SUBSCRIBEs (how the bench knows an instance listens).
/// Everything that shapes the traffic (TLS, ACL, persistence, queues) stays
/// as shipped.
pub fn broker_config(
    shipped: &str,
    pki: &DevPki,
    data_dir: &Path,
    port: u16,
) -> Result<String, CloudBenchError> {
    let conf = mosquitto::shipped_config(shipped, pki, &pki.mosquitto_dynsec, data_dir, port)?;
    let mut out: Vec<String> = conf.lines().map(String::from).collect();
    out.extend(
        [
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "log_type subscribe",
        ]
        .map(String::from),
    );
    Ok(out.join("\n") + "\n")
}

/// What every run of one bench shares.
struct RunSetup<'a> {
    mosquitto: &'a Path,
    /// What the instances run.
    bmsgw: &'a Path,
    pki: &'a DevPki,
    dir: &'a Path,
    vehicles: &'a [VehicleKeys],
    expected_vouchers: u16,
    cores: usize,
}

/// A child process, killed on drop unless it was stopped.
struct Proc {
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// SIGTERM, and wait up to 10 s for the exit; SIGKILL after that.
    async fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        // std's Child can only SIGKILL; the services stop cleanly on SIGTERM.
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let give_up = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() > give_up {
                let _ = child.kill();
                return child.wait().ok();
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn spawn(
    program: &Path,
    args: &[&std::ffi::OsStr],
    stdout: &Path,
    stderr: &Path,
) -> Result<Proc, CloudBenchError> {
    let out =
        std::fs::File::create(stdout).map_err(io(format!("creating {}", stdout.display())))?;
    let err = if stdout == stderr {
        out.try_clone().map_err(io("cloning a log handle"))?
    } else {
        std::fs::File::create(stderr).map_err(io(format!("creating {}", stderr.display())))?
    };
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(io(format!("running {}", program.display())))?;
    Ok(Proc {
        child: Some(child),
        log: stderr.to_owned(),
    })
}

/// Start mosquitto on a free port and wait until it accepts connections.
async fn start_broker(setup: &RunSetup<'_>) -> Result<(Proc, u16), CloudBenchError> {
    let data = setup.dir.join("mosquitto-data");
    std::fs::create_dir(&data).map_err(io(format!("creating {}", data.display())))?;
    let conf = setup.dir.join("mosquitto.conf");
    let log = setup.dir.join("mosquitto.log");
    // The port is free when picked, but another process may take it before
    // mosquitto binds it: then pick another.
    for _ in 0..3 {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(io("finding a free port on 127.0.0.1"))?;
        let text = broker_config(SHIPPED_MOSQUITTO_CONF, setup.pki, &data, port)?;
        std::fs::write(&conf, text).map_err(io(format!("writing {}", conf.display())))?;
        let mut broker = spawn(
            setup.mosquitto,
            &["-c".as_ref(), conf.as_os_str()],
            &log,
            &log,
        )?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let give_up = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = broker.exited() {
                let tail = broker.log_tail();
                if tail.contains("Address already in use") {
                    break;
                }
                return Err(CloudBenchError::Broker {
                    problem: format!("exited with {status}"),
                    log: tail,
                });
            }
            // A bare TCP connection, closed at once (mosquitto logs a failed
            // TLS handshake for it).
            if TcpStream::connect_timeout(&addr, POLL).is_ok() {
                return Ok((broker, port));
            }
            if Instant::now() > give_up {
                return Err(CloudBenchError::Broker {
                    problem: format!("did not accept on port {port} within {START_TIMEOUT:?}"),
                    log: broker.log_tail(),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }
    Err(CloudBenchError::Broker {
        problem: "found no free port in 3 tries".into(),
        log: std::fs::read_to_string(&log).unwrap_or_default(),
    })
}

/// Instance `index`'s identity (certificate CN, and so its client id).
fn client_id(index: usize) -> String {
    crate::sim::pki::cloud_identity(u32::try_from(index + 1).unwrap_or(u32::MAX))
}

/// Start K instances and wait until the broker has each one's SUBSCRIBE to
/// the shared request filter.
async fn start_instances(
    setup: &RunSetup<'_>,
    k: usize,
    broker: &mut Proc,
) -> Result<Vec<Proc>, CloudBenchError> {
    let mut instances = Vec::with_capacity(k);
    for i in 0..k {
        let id = client_id(i);
        let stdout = setup.dir.join(format!("{id}.out"));
        let stderr = setup.dir.join(format!("{id}.log"));
        let toml = setup
            .pki
            .cloud_instance(u32::try_from(i + 1).unwrap_or(u32::MAX))
            .toml;
        let args: [&std::ffi::OsStr; 4] = [
            "sim".as_ref(),
            "cloud".as_ref(),
            "--config".as_ref(),
            toml.as_os_str(),
        ];
        instances.push(spawn(setup.bmsgw, &args, &stdout, &stderr)?);
    }
    // mosquitto logs a SUBSCRIBE as "<client id> <qos> <filter>".
    let wanted: Vec<String> = (0..k)
        .map(|i| format!("{} 1 {}", client_id(i), topics::cloud_filters()[0]))
        .collect();
    let give_up = Instant::now() + START_TIMEOUT;
    loop {
        let log = std::fs::read_to_string(&broker.log).unwrap_or_default();
        if wanted.iter().all(|w| log.contains(w.as_str())) {
            return Ok(instances);
        }
        for (index, p) in instances.iter_mut().enumerate() {
            if let Some(status) = p.exited() {
                return Err(CloudBenchError::Instance {
                    index,
                    problem: format!("exited with {status} before subscribing"),
                    log: p.log_tail(),
                });
            }
        }
        if let Some(status) = broker.exited() {
            return Err(CloudBenchError::Broker {
                problem: format!("exited with {status}"),
                log: broker.log_tail(),
            });
        }
        if Instant::now() > give_up {
            let missing: Vec<&String> = wanted
                .iter()
                .filter(|w| !log.contains(w.as_str()))
                .collect();
            return Err(CloudBenchError::Broker {
                problem: format!("logged no SUBSCRIBE {missing:?} within {START_TIMEOUT:?}"),
                log: broker.log_tail(),
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Connect every vehicle as the daemon connects (subscribed to its answers
/// and pushes) and wait until all are up.
async fn connect_vehicles(
    setup: &RunSetup<'_>,
    port: u16,
) -> Result<Vec<(Link, tokio::sync::mpsc::Receiver<Incoming>)>, CloudBenchError> {
    let mut links = Vec::with_capacity(setup.vehicles.len());
    for v in setup.vehicles {
        let id = &v.vehicle_id;
        let files = setup.pki.vehicle(id.as_str());
        let mut config = LinkConfig::new(
            "127.0.0.1",
            port,
            id.as_str(),
            TlsFiles {
                ca: setup.pki.ca_cert.clone(),
                cert: files.cert,
                key: files.key,
            },
        );
        config.subscriptions = vec![
            (topics::identity_resp(id), QoS::AtLeastOnce),
            (topics::vouchers(id), QoS::AtLeastOnce),
        ];
        let link = Link::start(config).map_err(|source| CloudBenchError::Link {
            vehicle: id.to_string(),
            source: Box::new(source),
        })?;
        links.push(link);
    }
    for ((link, _), v) in links.iter().zip(setup.vehicles) {
        let mut state = link.state_watch();
        let up = tokio::time::timeout(
            START_TIMEOUT,
            state.wait_for(|s| *s == LinkState::Connected),
        )
        .await;
        if !matches!(up, Ok(Ok(_))) {
            return Err(CloudBenchError::Vehicle {
                vehicle: v.vehicle_id.to_string(),
                problem: format!(
                    "not connected within {START_TIMEOUT:?} (state {:?})",
                    link.state()
                ),
            });
        }
    }
    Ok(links)
}

/// Process and machine CPU counters at one instant.
struct CpuSnapshot {
    /// utime + stime ticks per watched pid, in order.
    procs: Vec<u64>,
    /// (busy without nice, nice) ticks, all cores.
    machine: (u64, u64),
}

fn proc_ticks(pid: &str) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // The command name may hold spaces; the fields after it do not.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of proc(5) (utime, stime); `rest` starts at field 3.
    let get = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    get(11) + get(12)
}

fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let get = |i: usize| v.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal
    let busy = get(0) + get(2) + get(5) + get(6) + get(7);
    (busy, get(1))
}

fn snapshot(pids: &[String]) -> CpuSnapshot {
    CpuSnapshot {
        procs: pids.iter().map(|p| proc_ticks(p)).collect(),
        machine: machine_ticks(),
    }
}

fn seconds(ticks: u64) -> f64 {
    ticks as f64 / USER_HZ
}

/// One run with `k` instances.
async fn one_run(
    opts: &CloudOptions,
    k: usize,
    setup: &RunSetup<'_>,
) -> Result<RunReport, CloudBenchError> {
    let (mut broker, port) = start_broker(setup).await?;
    setup.pki.write_cloud_toml(port)?;
    let mut instances = start_instances(setup, k, &mut broker).await?;
    let links = connect_vehicles(setup, port).await?;

    // Seal everything before the clock starts: the request's time is
    // checked against the cloud's (max_request_age_s), so this is done per
    // run, just before it.
    let mut rng = SystemRng;
    let params = ExchangeParams {
        charger_number: CHARGER,
        region_code: *b"BJ1",
        want_vouchers: opts.want_vouchers,
    };
    let mut exchanges = Vec::with_capacity(opts.requests);
    let mut queue: VecDeque<(usize, usize, OutgoingRequest)> =
        VecDeque::with_capacity(opts.requests);
    for i in 0..opts.requests {
        let v = i % setup.vehicles.len();
        let (exchange, request) =
            IdentityExchange::start(params.clone(), &setup.vehicles[v], unix_now(), &mut rng);
        exchanges.push(exchange);
        queue.push_back((i, v, request));
    }
    let queue = Arc::new(Mutex::new(queue));
    let vehicle_links: Arc<Vec<Link>> = Arc::new(links.iter().map(|(l, _)| l.clone()).collect());

    let mut pids: Vec<String> = Vec::with_capacity(k + 2);
    pids.push(broker.pid().map(|p| p.to_string()).unwrap_or_default());
    pids.extend(
        instances
            .iter()
            .map(|p| p.pid().map(|p| p.to_string()).unwrap_or_default()),
    );
    pids.push("self".into());

    let before = snapshot(&pids);
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..opts.in_flight.min(opts.requests) {
        let queue = queue.clone();
        let links = vehicle_links.clone();
        workers.spawn(async move {
            let mut answers = Vec::new();
            loop {
                // Invariant: no worker panics while holding the lock.
                let next = queue.lock().expect("queue lock").pop_front();
                let Some((i, v, request)) = next else {
                    return answers;
                };
                answers.push((i, ask(&links[v], request).await));
            }
        });
    }
    let mut answers: Vec<Option<Result<Incoming, String>>> = vec![None; opts.requests];
    while let Some(done) = workers.join_next().await {
        let list = done.map_err(|e| CloudBenchError::Vehicle {
            vehicle: "worker".into(),
            problem: e.to_string(),
        })?;
        for (i, a) in list {
            if let Some(slot) = answers.get_mut(i) {
                *slot = Some(a);
            }
        }
    }
    let window = started.elapsed();
    let after = snapshot(&pids);

    // Outside the window: judge every answer as the vehicle would.
    let now = unix_now();
    let mut failed = 0;
    let mut first = None;
    for (i, (exchange, answer)) in exchanges.iter_mut().zip(&answers).enumerate() {
        let verdict = match answer {
            None => Err("no answer recorded".to_string()),
            Some(Err(e)) => Err(e.clone()),
            Some(Ok(a)) => {
                let correlation = a.correlation.as_deref().unwrap_or_default();
                match exchange.on_response(&a.topic, correlation, &a.payload, now) {
                    Ok(ExchangeEvent::Granted(g))
                        if g.vouchers.len() == usize::from(setup.expected_vouchers) =>
                    {
                        Ok(())
                    }
                    Ok(ExchangeEvent::Granted(g)) => Err(format!(
                        "a grant with {} vouchers, expected {}",
                        g.vouchers.len(),
                        setup.expected_vouchers
                    )),
                    Ok(other) => Err(format!("not a grant: {other:?}")),
                    Err(e) => Err(format!("refused: {e}")),
                }
            }
        };
        if let Err(e) = verdict {
            failed += 1;
            first.get_or_insert_with(|| format!("request {i}: {e}"));
        }
    }

    for (link, _) in &links {
        link.shutdown().await;
    }
    let mut granted = Vec::with_capacity(k);
    for (index, p) in instances.iter_mut().enumerate() {
        let status = p.terminate().await;
        let out = setup.dir.join(format!("{}.out", client_id(index)));
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        match exit_count(&text, "granted") {
            Some(n) if status.is_some_and(|s| s.success()) => granted.push(n),
            _ => {
                return Err(CloudBenchError::Instance {
                    index,
                    problem: format!(
                        "did not stop cleanly with its counts ({status:?}; stdout {text:?})"
                    ),
                    log: p.log_tail(),
                });
            }
        }
    }
    let _ = broker.terminate().await;
    if failed > 0 {
        return Err(CloudBenchError::Replies {
            failed,
            requests: opts.requests,
            first: first.unwrap_or_default(),
        });
    }
    let total: u64 = granted.iter().sum();
    if total != opts.requests as u64 {
        return Err(CloudBenchError::Count {
            granted: total,
            per_instance: granted,
            requests: opts.requests,
        });
    }

    let d = |i: usize| seconds(after.procs[i].saturating_sub(before.procs[i]));
    let window_s = window.as_secs_f64();
    Ok(RunReport {
        instances: k,
        requests: opts.requests,
        window_s,
        grants_per_s: opts.requests as f64 / window_s,
        granted_per_instance: granted,
        cpu: CpuUse {
            mosquitto_s: d(0),
            instances_s: (1..=k).map(d).collect(),
            generator_s: d(k + 1),
            machine_busy_s: seconds(after.machine.0.saturating_sub(before.machine.0)),
            machine_niced_s: seconds(after.machine.1.saturating_sub(before.machine.1)),
            machine_capacity_s: window_s * setup.cores as f64,
        },
    })
}

/// Publish one sealed request and wait for its first answer.
async fn ask(link: &Link, request: OutgoingRequest) -> Result<Incoming, String> {
    let mut answers = link
        .request_stream(
            &request.topic,
            &request.response_topic,
            request.correlation.to_vec(),
            request.payload,
        )
        .await
        .map_err(|e| format!("publish: {e}"))?;
    match tokio::time::timeout(ANSWER_TIMEOUT, answers.next()).await {
        Ok(Some(answer)) => Ok(answer),
        Ok(None) => Err("the vehicle's link stopped".into()),
        Err(_) => Err(format!("no answer within {ANSWER_TIMEOUT:?}")),
    }
}

/// `key=N` from the exit line of `bmsgw sim cloud`
/// (`sim cloud: stopped: granted=N …`).
pub fn exit_count(stdout: &str, key: &str) -> Option<u64> {
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with("sim cloud: stopped:"))?;
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_config_keeps_its_settings_and_gets_our_paths() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let pki = DevPki::layout(tmp.path(), vec!["v".into()], vec![1]);
        let conf = broker_config(SHIPPED_MOSQUITTO_CONF, &pki, Path::new("/data"), 4242)
            .expect("the shipped file has its six paths");
        for line in [
            "listener 4242 127.0.0.1",
            "tls_version tlsv1.3",
            "require_certificate true",
            "use_identity_as_username true",
            "use_username_as_clientid true",
            "persistence true",
            "persistence_location /data/",
            "max_queued_messages 10000",
            "log_type subscribe",
        ] {
            assert!(conf.lines().any(|l| l == line), "{line} missing:\n{conf}");
        }
        let dynsec = format!("plugin_opt_config_file {}", pki.mosquitto_dynsec.display());
        assert!(conf.lines().any(|l| l == dynsec), "{conf}");
        assert!(conf.lines().any(|l| l.starts_with("plugin ")), "{conf}");
        assert!(!conf.contains("/etc/mosquitto"), "{conf}");
    }

    #[test]
    fn the_shipped_broker_sends_small_packets_at_once() {
        // Regression: without it every request and every grant waited for
        // a delayed ACK, 44 ms per round trip instead of 0.4 ms
        // (`bmsgw bench cloud --in-flight 1 --vehicles 1 --instances 1`).
        assert!(
            SHIPPED_MOSQUITTO_CONF
                .lines()
                .any(|l| l.trim() == "set_tcp_nodelay true"),
            "config/mosquitto/mosquitto.conf must set set_tcp_nodelay true"
        );
    }

    #[test]
    fn ceilings_take_the_serial_loop_or_the_cores_whichever_binds() {
        let c = CpuPerGrant {
            instances_us: 250.0,
            mosquitto_us: 50.0,
            generator_us: 30.0,
        };
        // One instance: its loop binds (4000/s), not the 2 cores (6061/s).
        assert!((c.ceiling(1, 2) - 4000.0).abs() < 1.0);
        // Two: the cores bind, 2e6 / 330 us.
        assert!((c.ceiling(2, 2) - 6060.6).abs() < 1.0);
        assert!((c.ceiling(2, 4) - 8000.0).abs() < 1.0);
        assert_eq!(CpuPerGrant::default().ceiling(2, 2), 0.0);
    }

    #[test]
    fn a_config_of_another_shape_is_refused() {
        let tmp = tempfile::tempdir().expect("temp dir");
        let pki = DevPki::layout(tmp.path(), vec![], vec![]);
        let err = broker_config("listener 8883\n", &pki, Path::new("/d"), 1)
            .expect_err("five paths missing");
        assert!(err.to_string().contains("found 1"), "{err}");
    }

    #[test]
    fn exit_counts_are_read_from_the_last_exit_line() {
        let out = "noise\nsim cloud: stopped: granted=12 pending=0 denied=3\n";
        assert_eq!(exit_count(out, "granted"), Some(12));
        assert_eq!(exit_count(out, "denied"), Some(3));
        assert_eq!(exit_count(out, "records"), None);
        assert_eq!(exit_count("granted=5\n", "granted"), None);
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn options_outside_their_range_name_the_flag() {
        let good = CloudOptions {
            instances: vec![1, 2],
            requests: 10,
            vehicles: 2,
            in_flight: 8,
            repeats: 1,
            want_vouchers: 0,
            instance_binary: PathBuf::from("bmsgw"),
        };
        assert!(good.check().is_ok());
        for (opts, flag) in [
            (
                CloudOptions {
                    in_flight: 257,
                    ..good.clone()
                },
                "--in-flight",
            ),
            (
                CloudOptions {
                    instances: vec![0],
                    ..good.clone()
                },
                "--instances",
            ),
            (
                CloudOptions {
                    requests: 0,
                    ..good.clone()
                },
                "--requests",
            ),
        ] {
            let err = opts.check().expect_err(flag).to_string();
            assert!(err.starts_with(flag), "{err}");
        }
    }
}
