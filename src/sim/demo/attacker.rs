//! The demo's attackers: someone with broker access who answers the
//! vehicle's requests with forged grants, and a node on the pile's bus that
//! replays captured messages and injects frames towards the BMS.

use std::time::Duration;

use tokio::sync::oneshot;

use crate::auth::{AUTH_PGN, SystemRng};
use crate::can::{BusEvent, CanBus, CanFrame};
use crate::cloud::envelope::{self, KeyPair, PublicKey};
use crate::cloud::link::{Link, LinkConfig, QoS};
use crate::cloud::tls::TlsFiles;
use crate::cloud::topics::{self, VehicleId};
use crate::gateway::vehicle_auth::{DEFAULT_VEHICLE_ADDRESS, auth_priority, crm00};
use crate::j1939::monitor::{Monitor, MonitorEvent};
use crate::j1939::tp::{J1939Message, TpConfig, Transport};
use crate::j1939::{Address, J1939Id, Pgn, Priority};
use crate::sim::pki::DevPki;
use crate::time::{Clock, Timestamp};

/// A client with a certificate from the same CA (here: another vehicle's
/// owner app) that answers `vehicle`'s identity requests with a grant
/// sealed under its own key instead of the cloud's. Returns a stop handle.
pub(super) async fn forge_grants(
    pki: &DevPki,
    host: &str,
    port: u16,
    vehicle: &str,
) -> Result<oneshot::Sender<()>, String> {
    let id = VehicleId::parse(vehicle).map_err(|e| e.to_string())?;
    let files = pki.owner("veh-b");
    let mut config = LinkConfig::new(
        host,
        port,
        "intruder",
        TlsFiles {
            ca: pki.ca_cert.clone(),
            cert: files.cert,
            key: files.key,
        },
    );
    config.subscriptions = vec![(topics::identity_req(&id), QoS::AtLeastOnce)];
    config.backoff_min = Duration::from_millis(100);
    config.backoff_max = Duration::from_millis(500);
    let victim = PublicKey::load(&pki.vehicle(vehicle).hpke_pub).map_err(|e| e.to_string())?;
    let (link, mut incoming) = Link::start(config).map_err(|e| e.to_string())?;
    let mut state = link.state_watch();
    tokio::time::timeout(
        Duration::from_secs(10),
        state.wait_for(|s| *s == crate::cloud::link::LinkState::Connected),
    )
    .await
    .map_err(|_| "the intruder could not connect".to_string())?
    .map_err(|e| e.to_string())?;
    let (stop, mut stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let forger = KeyPair::generate(&mut SystemRng);
        loop {
            tokio::select! {
                _ = &mut stopped => break,
                msg = incoming.recv() => {
                    let Some(request) = msg else { break };
                    let Some(response_topic) = request.response_topic.clone() else { continue };
                    let correlation = request.correlation.clone().unwrap_or_default();
                    let forged = envelope::seal(
                        &victim,
                        &forger,
                        &response_topic,
                        &correlation,
                        b"a grant that the cloud never issued",
                        &mut SystemRng,
                    );
                    if let Ok(payload) = forged {
                        let _ = link.reply(&request, payload).await;
                    }
                }
            }
        }
        link.shutdown().await;
    });
    Ok(stop)
}

/// The vehicle's AuthRequest, reassembled from frames captured on the
/// pile's bus.
pub(super) fn captured_auth_request(frames: &[CanFrame]) -> Option<Vec<u8>> {
    let mut monitor = Monitor::new(16);
    let mut found = None;
    for (i, frame) in frames.iter().enumerate() {
        monitor.handle_frame(frame, Timestamp::from_micros(i as u64 * 100));
        while let Some(ev) = monitor.poll_event() {
            if let MonitorEvent::Message(m) = ev
                && m.pgn.raw() == AUTH_PGN
                && m.source == Address(DEFAULT_VEHICLE_ADDRESS)
                && m.data.first() == Some(&(crate::auth::messages::MessageType::Request as u8))
            {
                found.get_or_insert(m.data);
            }
        }
    }
    found
}

/// On `bus`: wait for a pile's CRM(0x00), then send `request` to it from
/// the vehicle side's address, as a replay of an earlier session.
pub(super) async fn replay_auth_request<B: CanBus>(
    bus: &mut B,
    request: Vec<u8>,
    within: Duration,
) -> Result<(), String> {
    let clock = Clock::new();
    let me = Address(DEFAULT_VEHICLE_ADDRESS);
    let mut tp = Transport::new(TpConfig::gbt27930(), me);
    let give_up = tokio::time::Instant::now() + within;
    let mut sent = false;
    loop {
        while let Some(frame) = tp.poll_transmit() {
            bus.send(&frame).await.map_err(|e| e.to_string())?;
        }
        while let Some(ev) = tp.poll_event() {
            if matches!(ev, crate::j1939::tp::TpEvent::Sent { .. }) {
                return Ok(());
            }
        }
        let deadline = tp.poll_timeout();
        tokio::select! {
            ev = bus.recv() => {
                let Ok(BusEvent::Frame(frame)) = ev else { continue };
                let now = clock.now();
                if !sent && let Some((_, pile)) = crm00(&frame) {
                    sent = true;
                    tp.send(J1939Message {
                        priority: auth_priority(),
                        pgn: Pgn::from_const(AUTH_PGN),
                        source: me,
                        destination: pile,
                        data: request.clone(),
                    }, now).map_err(|e| e.to_string())?;
                }
                tp.handle_frame(&frame, now);
            }
            () = clock.sleep_until(deadline) => tp.handle_timeout(clock.now()),
            () = tokio::time::sleep_until(give_up) => {
                return Err(if sent { "the pile did not take the replay".into() } else { "no pile sent CRM(0x00)".into() });
            }
        }
    }
}

/// A frame with a J1939 identifier.
pub(super) fn frame(pgn: u32, source: u8, destination: u8, data: &[u8]) -> Option<CanFrame> {
    let id = J1939Id::new(
        Priority::new(6).ok()?,
        Pgn::new(pgn).ok()?,
        Address(source),
        Address(destination),
    );
    CanFrame::new(id.to_raw(), data).ok()
}
