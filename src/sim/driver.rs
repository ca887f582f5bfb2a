//! The async shell around a sans-IO [`Node`]: moves frames between the bus
//! and the node and sleeps until the node's next deadline.

use std::future::Future;

use tracing::{debug, info, trace, warn};

use crate::can::{BusError, BusEvent, CanBus};
use crate::gbt27930::node::{Node, NodeEvent};
use crate::gbt27930::session::{Outcome, Role, SessionEvent, Summary};
use crate::time::{Clock, Timestamp};

/// Why a simulator did not finish its session as expected.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("session {0}")]
    Session(Outcome),
    #[error("session ended by shutdown in {phase}")]
    Shutdown {
        phase: crate::gbt27930::session::Phase,
    },
    #[error(transparent)]
    Bus(#[from] BusError),
}

impl SimError {
    /// A completed outcome is success; anything else is an error.
    pub fn check(outcome: Outcome) -> Result<Summary, SimError> {
        match outcome {
            Outcome::Completed(s) => Ok(s),
            other => Err(SimError::Session(other)),
        }
    }
}

/// Run `node` on `bus` until its session finishes or `shutdown` completes.
///
/// `on_tick` runs before each timer-driven step; simulators use it to move
/// their model (battery charge, stop conditions) forward in time.
pub async fn run_node<B, R>(
    bus: &mut B,
    node: &mut Node<R>,
    clock: &Clock,
    mut on_tick: impl FnMut(&mut Node<R>, Timestamp),
    shutdown: impl Future<Output = ()>,
) -> Result<Outcome, SimError>
where
    B: CanBus,
    R: Role,
{
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        while let Some(frame) = node.poll_transmit() {
            if let Err(e) = bus.send(&frame).await {
                // A lost frame is what a real bus does too; the protocol's
                // periods and timeouts recover or end the session.
                warn!(error = %e, %frame, "send failed");
            }
        }
        while let Some(ev) = node.poll_event() {
            match ev {
                NodeEvent::Session(SessionEvent::Finished(outcome)) => return Ok(outcome),
                NodeEvent::Session(SessionEvent::PhaseChanged(phase)) => info!(%phase, "phase"),
                NodeEvent::Received(m) => trace!(message = ?m.kind(), "received"),
                NodeEvent::Sent(m) => trace!(message = ?m.kind(), "sent"),
                NodeEvent::Malformed { pgn, error } => {
                    warn!(%pgn, %error, "malformed message from peer")
                }
                NodeEvent::TransportAborted(ev) => warn!(?ev, "transport aborted"),
                NodeEvent::Skipped(kind) => debug!(message = %kind, "skipped: transport busy"),
            }
        }
        let deadline = node.poll_timeout();
        tokio::select! {
            biased;
            () = &mut shutdown => {
                return Err(SimError::Shutdown { phase: node.role().phase() });
            }
            ev = bus.recv() => match ev? {
                BusEvent::Frame(frame) => node.handle_frame(&frame, clock.now()),
                BusEvent::Error(e) => warn!(error = ?e, "CAN error frame"),
                BusEvent::Link(state) => warn!(?state, "CAN link state changed"),
            },
            () = sleep_until(clock, deadline), if deadline.is_some() => {
                let now = clock.now();
                on_tick(node, now);
                node.handle_timeout(now);
            }
        }
    }
}

async fn sleep_until(clock: &Clock, deadline: Option<Timestamp>) {
    if let Some(t) = deadline {
        tokio::time::sleep_until(clock.instant_at(t)).await;
    }
}
