//! The async shell around a sans-IO [`Node`]: moves frames between the bus
//! and the node and sleeps until the node's next deadline.

use std::future::Future;
use std::sync::{Arc, Mutex};

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
    /// The pile required authentication and no vehicle passed it.
    #[error("vehicle not authenticated ({}); session {outcome}", .last_rejection.map_or("no AuthRequest received".to_string(), |c| format!("last refusal: {c}")))]
    Unauthenticated {
        last_rejection: Option<crate::auth::ResultCode>,
        outcome: Outcome,
    },
    #[error("setup: {0}")]
    Setup(String),
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

/// Where a simulator leaves its peer's deviations when its session ends,
/// however it ends: shared with whoever started it.
#[derive(Clone, Debug, Default)]
pub struct DeviationLog(Arc<Mutex<crate::interop::SideDeviations>>);

impl DeviationLog {
    pub fn get(&self) -> crate::interop::SideDeviations {
        self.0.lock().map(|d| d.clone()).unwrap_or_default()
    }

    pub(crate) fn set(&self, d: &crate::interop::SideDeviations) {
        if let Ok(mut mine) = self.0.lock() {
            *mine = d.clone();
        }
    }
}

/// What a simulator adds around its node: a model that moves with time,
/// and handling for messages the node does not own (authentication).
pub trait Hooks<R> {
    /// Before each timer-driven step of the node.
    fn on_tick(&mut self, _node: &mut Node<R>, _now: Timestamp) {}

    /// For every event the node reports, before the driver logs it.
    fn on_event(&mut self, _node: &mut Node<R>, _event: &NodeEvent, _now: Timestamp) {}

    /// The earliest time the hooks need a tick of their own.
    fn poll_timeout(&self) -> Option<Timestamp> {
        None
    }
}

/// No hooks.
pub struct NoHooks;

impl<R> Hooks<R> for NoHooks {}

/// Hooks that only tick.
pub struct OnTick<F>(pub F);

impl<R, F: FnMut(&mut Node<R>, Timestamp)> Hooks<R> for OnTick<F> {
    fn on_tick(&mut self, node: &mut Node<R>, now: Timestamp) {
        (self.0)(node, now)
    }
}

/// Run `node` on `bus` until its session finishes or `shutdown` completes.
pub async fn run_node<B, R>(
    bus: &mut B,
    node: &mut Node<R>,
    clock: &Clock,
    hooks: &mut impl Hooks<R>,
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
            hooks.on_event(node, &ev, clock.now());
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
                NodeEvent::Other(m) => trace!(pgn = %m.pgn, source = %m.source, "non-GB/T message"),
                NodeEvent::Deviation {
                    deviation,
                    refused: false,
                    detail,
                } => info!(%deviation, "peer deviation accepted: {detail}"),
                NodeEvent::Deviation {
                    deviation,
                    refused: true,
                    detail,
                } => warn!(%deviation, "peer deviation refused: {detail}"),
                NodeEvent::Refused(fault) => warn!(%fault, "peer message refused"),
            }
        }
        // Hooks may have queued frames while handling events.
        if let Some(frame) = node.poll_transmit() {
            if let Err(e) = bus.send(&frame).await {
                warn!(error = %e, %frame, "send failed");
            }
            continue;
        }
        let deadline = [node.poll_timeout(), hooks.poll_timeout()]
            .into_iter()
            .flatten()
            .min();
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
            () = clock.sleep_until(deadline) => {
                let now = clock.now();
                hooks.on_tick(node, now);
                node.handle_timeout(now);
            }
        }
    }
}
