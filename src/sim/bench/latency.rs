//! `bmsgw bench latency`: end-to-end authorization latency against the
//! bus-time lower bound.
//!
//! It builds the demo's world (dev PKI, embedded TLS broker on loopback,
//! the reference cloud, the gateway daemon `run_on` in bridge mode), but on
//! in-process buses with the precise 250 kbit/s timing model
//! ([`VirtualBus::with_precise_timing`]), and plays whole sessions one
//! after another: the BMS simulator on the BMS's bus, the pile simulator
//! (authentication required) on the pile's bus. Monitors on both buses
//! record every frame; [`critical_path::analyse`] takes the latency (the
//! pile's first CRM(0x00) to its CRM(0xAA)) and the session's bus-time
//! lower bound from them.
//!
//! - **online**: the broker is up, so the gateway asks the cloud for a
//!   ticket over MQTT/TLS for every session;
//! - **offline**: the broker is stopped, so the gateway uses a voucher from
//!   its wallet (filled beforehand through the control socket, as
//!   `bmsgw ticket import` does).
//!
//! Everything shares one thread, as in `bmsgw demo` and `bmsgw run`; the
//! figures include the simulators' and the cloud's work on that thread.

use std::io::Write;
use std::time::{Duration, Instant};

use super::BenchError;
use super::critical_path::{self, Addresses, Authorization, Seen};
use crate::auth::{AUTH_PGN, SystemRng};
use crate::can::virtual_bus::VirtualBus;
use crate::can::{BusEvent, CanBus};
use crate::cloud::messages::MAX_VOUCHERS;
use crate::cloud::topics::VehicleId;
use crate::gateway::throttle::ThrottleConfig;
use crate::j1939::Pgn;
use crate::sim::bms::{self, BmsSimOptions};
use crate::sim::cloud::CloudConfig;
use crate::sim::demo::world::{BusSet, Vehicle, World};
use crate::sim::demo::{DEMO_CHARGER, DemoError, GBT_BITRATE};
use crate::sim::pile;

/// Which way the gateway gets its credential.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Path {
    /// A ticket from the cloud, through the broker.
    Online,
    /// A voucher from the wallet, the broker down.
    Offline,
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Path::Online => "online",
            Path::Offline => "offline",
        })
    }
}

#[derive(Clone, Debug)]
pub struct LatencyOptions {
    /// Sessions measured per path.
    pub sessions: usize,
    /// In this order (offline after online reuses nothing but the world).
    pub paths: Vec<Path>,
}

impl Default for LatencyOptions {
    fn default() -> Self {
        LatencyOptions {
            sessions: 1000,
            paths: vec![Path::Online, Path::Offline],
        }
    }
}

/// One path's figures. Times in milliseconds.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PathReport {
    pub path: Path,
    /// Sessions measured (that reached CRM(0xAA) and could be analysed).
    pub sessions: usize,
    /// Sessions that failed, and the first few reasons.
    pub failed: usize,
    pub errors: Vec<String>,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub min_ms: f64,
    /// The bus-time lower bound: median over the sessions, and its range
    /// (it varies with the payloads' stuff bits).
    pub bound_ms: f64,
    pub bound_min_ms: f64,
    pub bound_max_ms: f64,
    /// The authentication and identification chains (medians).
    pub auth_chain_ms: f64,
    pub identification_chain_ms: f64,
    /// Frames counted in the bound (median).
    pub frames_on_path: usize,
    pub ratio_p50: f64,
    pub ratio_p99: f64,
    pub ratio_max: f64,
    /// Wall time of the whole path.
    pub wall_s: f64,
}

impl PathReport {
    fn from_sessions(
        path: Path,
        mut ok: Vec<Authorization>,
        errors: Vec<String>,
        wall: Duration,
    ) -> Self {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        ok.sort_by_key(|a| a.latency);
        let lat: Vec<Duration> = ok.iter().map(|a| a.latency).collect();
        let median_of = |mut v: Vec<Duration>| {
            v.sort();
            percentile(&v, 0.5)
        };
        let bounds: Vec<Duration> = ok.iter().map(|a| a.bound).collect();
        let bound = median_of(bounds.clone());
        let mut frames: Vec<usize> = ok.iter().map(|a| a.frames).collect();
        frames.sort_unstable();
        let ratio = |d: Duration| {
            if bound.is_zero() {
                0.0
            } else {
                d.as_secs_f64() / bound.as_secs_f64()
            }
        };
        PathReport {
            path,
            sessions: ok.len(),
            failed: errors.len(),
            errors: errors.into_iter().take(5).collect(),
            p50_ms: ms(percentile(&lat, 0.5)),
            p99_ms: ms(percentile(&lat, 0.99)),
            max_ms: ms(lat.last().copied().unwrap_or_default()),
            min_ms: ms(lat.first().copied().unwrap_or_default()),
            bound_ms: ms(bound),
            bound_min_ms: ms(bounds.iter().min().copied().unwrap_or_default()),
            bound_max_ms: ms(bounds.iter().max().copied().unwrap_or_default()),
            auth_chain_ms: ms(median_of(ok.iter().map(|a| a.auth_chain).collect())),
            identification_chain_ms: ms(median_of(
                ok.iter().map(|a| a.identification_chain).collect(),
            )),
            frames_on_path: frames.get(frames.len() / 2).copied().unwrap_or(0),
            ratio_p50: ratio(percentile(&lat, 0.5)),
            ratio_p99: ratio(percentile(&lat, 0.99)),
            ratio_max: ratio(lat.last().copied().unwrap_or_default()),
            wall_s: wall.as_secs_f64(),
        }
    }

    /// One greppable line: `latency path=online sessions=1000 p50_ms=…`.
    pub fn line(&self) -> String {
        format!(
            "latency path={} sessions={} failed={} p50_ms={:.2} p99_ms={:.2} max_ms={:.2} \
             bound_ms={:.2} bound_range_ms={:.2}..{:.2} auth_chain_ms={:.2} \
             identification_chain_ms={:.2} frames_on_path={} ratio_p50={:.2} ratio_p99={:.2} \
             ratio_max={:.2} wall_s={:.1}",
            self.path,
            self.sessions,
            self.failed,
            self.p50_ms,
            self.p99_ms,
            self.max_ms,
            self.bound_ms,
            self.bound_min_ms,
            self.bound_max_ms,
            self.auth_chain_ms,
            self.identification_chain_ms,
            self.frames_on_path,
            self.ratio_p50,
            self.ratio_p99,
            self.ratio_max,
            self.wall_s,
        )
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct LatencyReport {
    pub bitrate: u32,
    pub paths: Vec<PathReport>,
}

/// How long the BMS simulator charges: the latency ends long before, so
/// the rest of the session is only kept short.
const CHARGING: Duration = Duration::from_millis(20);

/// Measure `opts.sessions` authorizations on each path; progress goes to
/// `out`.
pub async fn run(opts: &LatencyOptions, out: &mut impl Write) -> Result<LatencyReport, BenchError> {
    let mut sink = std::io::sink();
    let buses = BusSet::InProcess {
        bms: VirtualBus::with_precise_timing(GBT_BITRATE),
        pile: VirtualBus::with_precise_timing(GBT_BITRATE),
    };
    writeln!(
        out,
        "bench latency: {} session(s) per path, bridge mode, in-process buses at {} kbit/s (precise timing)",
        opts.sessions,
        GBT_BITRATE / 1000
    )?;
    let mut world = World::start(buses, false, &mut sink).await?;
    // Sessions back to back are what the gateway's credential throttle
    // exists to stop; the benchmark measures the path, not the throttle.
    world.config_mut(Vehicle::A).session.throttle = ThrottleConfig {
        burst: u32::MAX,
        refill: Duration::from_secs(1),
        max_unproven: u32::MAX,
        cooldown: Duration::ZERO,
    };
    let result = measure(&mut world, opts, out).await;
    world.stop().await;
    result
}

async fn measure<W: Write + Send>(
    world: &mut World<'_, W>,
    opts: &LatencyOptions,
    out: &mut impl Write,
) -> Result<LatencyReport, BenchError> {
    world.start_daemon(Vehicle::A).await?;
    let can = world.config(Vehicle::A).can.clone();
    let addrs = Addresses {
        bms: can.bms_address,
        pile: can.pile_address,
        gateway: can.address,
        auth_pgn: Pgn::from_const(AUTH_PGN),
    };
    let mut paths = Vec::new();
    for &path in &opts.paths {
        let connected = world
            .wait_status(Duration::from_secs(20), |s| s.cloud.state == "connected")
            .await;
        if path == Path::Offline {
            if connected.is_none() {
                world
                    .broker
                    .restart()
                    .map_err(|e| BenchError::Failed(format!("broker restart: {e}")))?;
            }
            fill_wallet(world, opts.sessions).await?;
            world.broker.stop();
            if world
                .wait_status(Duration::from_secs(15), |s| s.cloud.state != "connected")
                .await
                .is_none()
            {
                return Err(BenchError::Failed(
                    "the gateway never noticed the broker was gone".into(),
                ));
            }
        } else if connected.is_none() {
            return Err(BenchError::Failed(
                "the gateway never connected to the broker".into(),
            ));
        }
        let trace_sessions: usize = std::env::var("BMSGW_BENCH_TRACE")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let started = Instant::now();
        let (mut ok, mut errors) = (Vec::new(), Vec::new());
        for i in 0..opts.sessions {
            // BMSGW_BENCH_TRACE=N: both buses of each path's first N
            // sessions on stderr, to see where the time goes.
            let trace = i < trace_sessions;
            match one_session(world, addrs, trace).await {
                Ok(a) => ok.push(a),
                Err(e) => errors.push(format!("session {i}: {e}")),
            }
            if (i + 1) % 100 == 0 {
                writeln!(
                    out,
                    "  {path}: {} sessions, {} failed, {:.0} s",
                    i + 1,
                    errors.len(),
                    started.elapsed().as_secs_f64()
                )?;
            }
        }
        let report = PathReport::from_sessions(path, ok, errors, started.elapsed());
        writeln!(out, "{}", report.line())?;
        paths.push(report);
        if path == Path::Offline {
            world
                .broker
                .restart()
                .map_err(|e| BenchError::Failed(format!("broker restart: {e}")))?;
        }
    }
    Ok(LatencyReport {
        bitrate: GBT_BITRATE,
        paths,
    })
}

/// Make sure the wallet holds `sessions` vouchers for the demo's pile:
/// sealed by the cloud's own code and imported through the control socket.
async fn fill_wallet<W: Write + Send>(
    world: &mut World<'_, W>,
    sessions: usize,
) -> Result<(), BenchError> {
    let failed = |what: &str, e: &dyn std::fmt::Display| BenchError::Failed(format!("{what}: {e}"));
    let config =
        CloudConfig::load(&world.pki.cloud_toml).map_err(|e| failed("cloud config", &e))?;
    let vehicle = VehicleId::parse(Vehicle::A.id()).map_err(|e| failed("vehicle id", &e))?;
    let socket = world.config(Vehicle::A).control.socket.clone();
    loop {
        let status = world
            .status()
            .await
            .ok_or_else(|| BenchError::Failed("the gateway's control socket is silent".into()))?;
        let have = status
            .vouchers
            .iter()
            .find(|v| v.charger_number == DEMO_CHARGER)
            .map_or(0, |v| v.remaining);
        if have >= sessions {
            return Ok(());
        }
        let count = (sessions - have).min(MAX_VOUCHERS);
        let now_ms = u64::from(crate::time::unix_now()) * 1000;
        let ticket = crate::sim::cloud::issue::issue_vouchers(
            &config,
            &vehicle,
            DEMO_CHARGER,
            count,
            now_ms,
            &mut SystemRng,
        )
        .map_err(|e| failed("sealing vouchers", &e))?;
        crate::service::control::import_ticket(&socket, &ticket)
            .await
            .map_err(|e| failed("importing vouchers", &e))?;
    }
}

/// One whole session; the authorization measured from both buses.
async fn one_session<W: Write + Send>(
    world: &mut World<'_, W>,
    addrs: Addresses,
    trace: bool,
) -> Result<Authorization, String> {
    let node = |r: Result<_, DemoError>| r.map_err(|e| e.to_string());
    let mut bms_bus = node(world.buses.bms_node())?;
    let mut pile_bus = node(world.buses.pile_node())?;
    let mut bms_monitor = node(world.buses.bms_node())?;
    let mut pile_monitor = node(world.buses.pile_node())?;
    let bms_opts = BmsSimOptions {
        duration: CHARGING,
        ..world.bms_options()
    };
    let pile_opts = world.pile_options().map_err(|e| e.to_string())?;
    let origin = Instant::now();
    let (mut pile_seen, mut bms_seen) = (Vec::new(), Vec::new());
    let never = std::future::pending::<()>;
    let (bms, pile) = world
        .drive(async {
            let sims = async {
                tokio::join!(
                    bms::run(&mut bms_bus, bms_opts, never()),
                    pile::run(&mut pile_bus, pile_opts, never()),
                )
            };
            let record = async {
                loop {
                    tokio::select! {
                        ev = pile_monitor.recv() => if let Ok(BusEvent::Frame(frame)) = ev {
                            pile_seen.push(Seen { at: origin.elapsed(), frame });
                        },
                        ev = bms_monitor.recv() => if let Ok(BusEvent::Frame(frame)) = ev {
                            bms_seen.push(Seen { at: origin.elapsed(), frame });
                        },
                    }
                }
            };
            tokio::select! {
                r = sims => r,
                _ = record => unreachable!("the monitors' loop never ends"),
            }
        })
        .await;
    // The world's own capture is for the demo's checks; drop it.
    world.bms_seen.clear();
    world.pile_seen.clear();
    world.seen.clear();
    bms.map_err(|e| format!("BMS: {e}"))?;
    pile.map_err(|e| format!("pile: {e}"))?;
    if trace {
        print_trace(&pile_seen, &bms_seen);
    }
    critical_path::analyse(&pile_seen, &bms_seen, addrs, GBT_BITRATE).map_err(|e| e.to_string())
}

/// Both buses' frames up to the first CRM(0xAA), on one clock, to stderr.
fn print_trace(pile: &[Seen], bms: &[Seen]) {
    let mut all: Vec<(&str, &Seen)> = pile
        .iter()
        .map(|s| ("pile", s))
        .chain(bms.iter().map(|s| ("bms ", s)))
        .collect();
    all.sort_by_key(|(_, s)| s.at);
    let end = pile
        .iter()
        .find(|s| {
            crate::j1939::J1939Id::from_can_id(s.frame.id())
                .is_ok_and(|id| id.pgn == crate::gbt27930::MessageKind::Crm.pgn())
                && s.frame.data().first() == Some(&0xAA)
        })
        .map_or(Duration::MAX, |s| s.at);
    eprintln!("--- session");
    for (bus, s) in all.into_iter().take_while(|(_, s)| s.at <= end) {
        eprintln!("{:>10.3} ms  {bus}  {}", s.at.as_secs_f64() * 1e3, s.frame);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<Duration> = (1..=1000).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 0.5), Duration::from_millis(500));
        assert_eq!(percentile(&v, 0.99), Duration::from_millis(990));
        assert_eq!(percentile(&v, 1.0), Duration::from_millis(1000));
        assert_eq!(percentile(&v[..1], 0.99), Duration::from_millis(1));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
    }
}
