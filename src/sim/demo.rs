//! `bmsgw demo`: the BMS simulator against the pile simulator, with a third
//! node listening and printing the decoded timeline as it happens.
//!
//! By default everything runs on the in-process bus with the 250 kbit/s
//! timing model, so the demo needs nothing installed. `--can IF` runs the
//! same three nodes on a SocketCAN interface instead.

use std::future::Future;
use std::io::Write;
use std::time::Duration;

use super::SimError;
use super::bms::{self, BmsSimOptions};
use super::pile::{self, PileSimOptions};
use crate::can::socketcan::{SocketCanBus, SocketCanOptions};
use crate::can::virtual_bus::VirtualBus;
use crate::can::{BusEvent, CanBus};
use crate::gbt27930::session::Summary;
use crate::gbt27930::timeline::{Timeline, TimelineOptions};
use crate::gbt27930::{ChargerNumber, RegionCode};
use crate::time::Clock;

/// GB/T 27930's bit rate.
pub const GBT_BITRATE: u32 = 250_000;

#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Run on this SocketCAN interface instead of the in-process bus.
    pub can: Option<String>,
    pub bms: BmsSimOptions,
    pub pile: PileSimOptions,
    /// Print every message rather than only changes.
    pub all_messages: bool,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            can: None,
            bms: BmsSimOptions {
                soc_start: 62.0,
                soc_end: 65.0,
                current: 120.0,
                duration: Duration::from_secs(3),
                charger_wait: Some(Duration::from_secs(10)),
                ..BmsSimOptions::default()
            },
            pile: PileSimOptions {
                charger_number: ChargerNumber(20_261_121),
                region_code: RegionCode(*b"310"),
                ..PileSimOptions::default()
            },
            all_messages: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("BMS simulator: {0}")]
    Bms(#[source] SimError),
    #[error("pile simulator: {0}")]
    Pile(#[source] SimError),
    #[error(transparent)]
    Bus(#[from] crate::can::BusError),
    #[error("the session did not go through every phase: saw {0}")]
    Phases(String),
    #[error("writing output failed: {0}")]
    Output(#[from] std::io::Error),
}

/// What the demo shows at the end.
#[derive(Debug)]
pub struct DemoReport {
    pub bms: Summary,
    pub pile: Summary,
    pub frames_seen: usize,
}

/// Run the demo, printing to `out`.
pub async fn run(
    opts: DemoOptions,
    out: &mut (impl Write + Send),
    shutdown: impl Future<Output = ()> + Send,
) -> Result<DemoReport, DemoError> {
    match &opts.can {
        None => {
            let bus = VirtualBus::with_timing(GBT_BITRATE);
            writeln!(
                out,
                "bmsgw demo: BMS simulator ({}) and pile simulator ({}) on the in-process bus, {} kbit/s timing model",
                opts.bms.address,
                opts.pile.address,
                GBT_BITRATE / 1000
            )?;
            let report = play(bus.node(), bus.node(), bus.node(), &opts, out, shutdown).await?;
            let stats = bus.stats();
            writeln!(
                out,
                "bus: {} frames, busy {:.3} s",
                stats.frames_transmitted,
                stats.busy_time.as_secs_f64()
            )?;
            Ok(report)
        }
        Some(iface) => {
            let open = || SocketCanBus::open(iface, SocketCanOptions::default());
            writeln!(
                out,
                "bmsgw demo: BMS simulator and pile simulator on SocketCAN {iface}"
            )?;
            play(open()?, open()?, open()?, &opts, out, shutdown).await
        }
    }
}

async fn play<B: CanBus>(
    mut bms_bus: B,
    mut pile_bus: B,
    mut monitor_bus: B,
    opts: &DemoOptions,
    out: &mut (impl Write + Send),
    shutdown: impl Future<Output = ()> + Send,
) -> Result<DemoReport, DemoError> {
    let clock = Clock::new();
    let mut timeline = Timeline::new(TimelineOptions {
        changes_only: !opts.all_messages,
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel::<()>();
    let sims = async {
        let result = tokio::join!(
            bms::run(&mut bms_bus, opts.bms.clone(), stopped(stop_rx.clone())),
            pile::run(&mut pile_bus, opts.pile.clone(), stopped(stop_rx.clone())),
        );
        let _ = done_tx.send(());
        result
    };
    let mut frames_seen = 0usize;
    let mut write_error = None;
    let mut print = |lines: Vec<String>, out: &mut (dyn Write + Send)| {
        for line in lines {
            if let Err(e) = writeln!(out, "{line}") {
                write_error.get_or_insert(e);
            }
        }
    };
    let monitor = async {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut shutdown_seen = false;
        loop {
            tokio::select! {
                ev = monitor_bus.recv() => {
                    if let Ok(BusEvent::Frame(frame)) = ev {
                        frames_seen += 1;
                        let now = Duration::from_micros(clock.now().as_micros());
                        print(timeline.feed(now, &frame), out);
                    }
                }
                () = &mut shutdown, if !shutdown_seen => {
                    shutdown_seen = true;
                    let _ = stop_tx.send(true);
                }
                _ = &mut done_rx => break,
            }
        }
        // Frames already on their way to the monitor when the sims finished.
        while let Ok(Ok(BusEvent::Frame(frame))) =
            tokio::time::timeout(Duration::from_millis(20), monitor_bus.recv()).await
        {
            frames_seen += 1;
            let now = Duration::from_micros(clock.now().as_micros());
            print(timeline.feed(now, &frame), out);
        }
        for line in timeline.summary() {
            writeln!(out, "{line}")?;
        }
        Ok::<_, std::io::Error>(timeline)
    };
    let ((bms_result, pile_result), timeline) = tokio::join!(sims, monitor);
    if let Some(e) = write_error {
        return Err(e.into());
    }
    let timeline = timeline?;
    let bms = bms_result.map_err(DemoError::Bms)?;
    let pile = pile_result.map_err(DemoError::Pile)?;
    use crate::gbt27930::session::Phase::*;
    let expected = [
        Handshake,
        Recognition,
        Configuration,
        Charging,
        Stopping,
        Statistics,
    ];
    if timeline.phases() != expected {
        let seen: Vec<String> = timeline.phases().iter().map(|p| p.to_string()).collect();
        return Err(DemoError::Phases(seen.join(" -> ")));
    }
    writeln!(
        out,
        "BMS: session completed, final SOC {}%, {:.1} kWh reported by the pile",
        bms.final_soc_percent,
        f32::from(bms.energy_decikwh) / 10.0
    )?;
    writeln!(
        out,
        "pile: session completed, {:.1} kWh delivered",
        f32::from(pile.energy_decikwh) / 10.0
    )?;
    Ok(DemoReport {
        bms,
        pile,
        frames_seen,
    })
}
