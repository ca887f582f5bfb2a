//! Writes the seed corpora, `corpus/<target>/`, from the project's own
//! encoders and state machines: a whole GB/T session on one bus and through
//! the bridge, a vehicle–pile handshake, sealed cloud answers and pushes,
//! the example configuration. Deterministic: the same bytes every run.
//!
//! Each seed is checked here to reach the deep path it is for (the session
//! completes, the handshake is accepted, the grant is granted), so a change
//! in the product that silently made a seed shallow fails this program.
//!
//! `cargo run --manifest-path fuzz/Cargo.toml -p make-seeds [OUT_DIR]`

use std::path::{Path, PathBuf};
use std::time::Duration;

use bmsgw::auth::{AuthMessage, PileAuthEvent, VehicleAuthEvent};
use bmsgw::can::CanFrame;
use bmsgw::can::candump::{Direction, LogEntry, LogRecord, format_line, format_record};
use bmsgw::can::{CanId, ExtendedId, StandardId};
use bmsgw::cloud::envelope::seal;
use bmsgw::cloud::exchange::{ExchangeEvent, ExchangeParams, IdentityExchange, open_push};
use bmsgw::cloud::messages::{
    Approval, CredentialKind, Denied, DenyReason, Event, IdentityGrant, IdentityRequest,
    OwnerApproval, Payload, PendingApproval, Push, Request, Response, Revocation, SessionRecord,
    SessionResult, UsedCredential, Voucher, VoucherBatch,
};
use bmsgw::cloud::ticket_file::TicketFile;
use bmsgw::cloud::topics;
use bmsgw::gateway::bridge::Bridge;
use bmsgw::gateway::firewall::{FirewallConfig, Side};
use bmsgw::gbt27930::bms::{Bms, BmsConfig};
use bmsgw::gbt27930::charger::{Charger, ChargerConfig};
use bmsgw::gbt27930::node::{Node, NodeEvent};
use bmsgw::gbt27930::session::{Role, SessionEvent};
use bmsgw::gbt27930::{Message, MessageKind};
use bmsgw::j1939::{Address, J1939Message, TpConfig, Transport};
use bmsgw::time::Timestamp;
use bmsgw_fuzz::{
    AuthOp, CHARGER, FixedRng, FrameOp, T0, UNIX_NOW, VEHICLE_ID, cloud_world, credential, dt_ms,
    pile_auth, vehicle_auth, write_auth_op, write_frame_op,
};

const BMS: Address = Address(0xF4);
const PILE: Address = Address(0x56);
const GATEWAY: Address = Address(0x8A);

struct Out(PathBuf);

impl Out {
    fn put(&self, target: &str, name: &str, bytes: impl AsRef<[u8]>) {
        let dir = self.0.join(target);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
}

fn main() {
    let out = Out(std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../corpus")));
    let session = single_bus_session();
    tp_seeds(&out, &session);
    gbt_seeds(&out, &session);
    candump_seeds(&out, &session);
    bridge_seeds(&out);
    auth_seeds(&out);
    cloud_seeds(&out);
    config_seeds(&out);
    println!("seeds written under {}", out.0.display());
}

// --- GB/T on CAN ----------------------------------------------------------------

/// A frame on the bus: when, and who sent it.
struct Seen {
    at: Timestamp,
    from_charger: bool,
    frame: CanFrame,
}

struct Session {
    frames: Vec<Seen>,
    messages: Vec<Message>,
}

fn completed(node_events: &mut Vec<NodeEvent>, done: &mut bool, messages: &mut Vec<Message>) {
    for ev in node_events.drain(..) {
        match ev {
            NodeEvent::Session(SessionEvent::Finished(o)) => {
                assert!(o.is_completed(), "the seed session failed: {o:?}");
                *done = true;
            }
            NodeEvent::Received(m) => messages.push(m),
            _ => {}
        }
    }
}

/// The charger and the BMS nodes on one in-memory bus until both finish.
fn single_bus_session() -> Session {
    let mut charger = Node::new(
        Charger::new(ChargerConfig {
            max_charging_time: Some(Duration::from_secs(2)),
            ..ChargerConfig::default()
        }),
        PILE,
        BMS,
        TpConfig::gbt27930(),
    );
    let mut bms = Node::new(
        Bms::new(BmsConfig::default()),
        BMS,
        PILE,
        TpConfig::gbt27930(),
    );
    let mut now = Timestamp::ZERO;
    charger.role_mut().start(now);
    bms.role_mut().start(now);
    charger.handle_timeout(now);
    bms.handle_timeout(now);
    let (mut frames, mut messages) = (Vec::new(), Vec::new());
    let (mut charger_done, mut bms_done) = (false, false);
    let mut events = Vec::new();
    while !(charger_done && bms_done) {
        loop {
            let mut moved = false;
            while let Some(f) = charger.poll_transmit() {
                moved = true;
                bms.handle_frame(&f, now);
                frames.push(Seen {
                    at: now,
                    from_charger: true,
                    frame: f,
                });
            }
            while let Some(f) = bms.poll_transmit() {
                moved = true;
                charger.handle_frame(&f, now);
                frames.push(Seen {
                    at: now,
                    from_charger: false,
                    frame: f,
                });
            }
            if !moved {
                break;
            }
        }
        events.extend(std::iter::from_fn(|| charger.poll_event()));
        completed(&mut events, &mut charger_done, &mut messages);
        events.extend(std::iter::from_fn(|| bms.poll_event()));
        completed(&mut events, &mut bms_done, &mut messages);
        let Some(next) = [charger.poll_timeout(), bms.poll_timeout()]
            .into_iter()
            .flatten()
            .min()
        else {
            break;
        };
        assert!(
            next < Timestamp::from_millis(60_000),
            "the seed session did not end"
        );
        now = next.max(now);
        charger.handle_timeout(now);
        bms.handle_timeout(now);
    }
    assert!(charger_done && bms_done, "the seed session did not finish");
    Session { frames, messages }
}

fn frame_ops(frames: &[Seen], keep: impl Fn(&Seen) -> bool, side: impl Fn(&Seen) -> u8) -> Vec<u8> {
    let mut out = Vec::new();
    let mut last = Timestamp::ZERO;
    for s in frames.iter().filter(|s| keep(s)) {
        let mut gap = s.at.saturating_since(last);
        // Gaps over 255 ms go as an advance first.
        if gap > Duration::from_millis(255) {
            let ms = u16::try_from(gap.as_millis()).unwrap_or(u16::MAX);
            write_frame_op(&mut out, &FrameOp::Advance { ms });
            gap = gap.saturating_sub(Duration::from_millis(u64::from(ms)));
        }
        let op = FrameOp::Frame {
            dt_ms: dt_ms(gap),
            side: side(s),
            frame: s.frame,
        };
        write_frame_op(&mut out, &op);
        last = s.at;
    }
    out
}

fn tp_seeds(out: &Out, session: &Session) {
    // The whole bus as the charger's transport sees it (its own frames are
    // for the BMS and ignored), and the BMS's frames alone.
    out.put(
        "j1939_tp",
        "session-whole-bus",
        frame_ops(&session.frames, |_| true, |_| 0),
    );
    out.put(
        "j1939_tp",
        "session-from-bms",
        frame_ops(&session.frames, |s| !s.from_charger, |_| 0),
    );
    // Our transport sending: RTS/CTS to the BMS, and a BAM; the peer's
    // answers recorded from a real transport at the BMS's address.
    for (name, destination, len) in [
        ("send-rts-cts", BMS, 300u16),
        ("send-bam", Address::GLOBAL, 40),
    ] {
        let mut seed = Vec::new();
        let pgn = 0x0200;
        write_frame_op(
            &mut seed,
            &FrameOp::Send {
                pgn,
                destination: destination.0,
                len,
            },
        );
        let mut ours = Transport::new(TpConfig::gbt27930(), PILE);
        let mut peer = Transport::new(TpConfig::gbt27930(), BMS);
        let mut now = T0;
        let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
        let msg = J1939Message {
            priority: TpConfig::gbt27930().priority,
            pgn: bmsgw::j1939::Pgn::new(pgn).expect("BRM's PGN"),
            source: PILE,
            destination,
            data: data.clone(),
        };
        ours.send(msg, now)
            .expect("the transport takes the message");
        let mut last = now;
        let mut delivered = false;
        for _ in 0..1000 {
            loop {
                let mut moved = false;
                while let Some(f) = ours.poll_transmit() {
                    moved = true;
                    peer.handle_frame(&f, now);
                }
                while let Some(f) = peer.poll_transmit() {
                    moved = true;
                    ours.handle_frame(&f, now);
                    let gap = dt_ms(now.saturating_since(last));
                    write_frame_op(
                        &mut seed,
                        &FrameOp::Frame {
                            dt_ms: gap,
                            side: 0,
                            frame: f,
                        },
                    );
                    last = now;
                }
                if !moved {
                    break;
                }
            }
            while let Some(ev) = peer.poll_event() {
                if let bmsgw::j1939::TpEvent::Received(m) = ev {
                    delivered |= m.data == data;
                }
            }
            let Some(next) = [ours.poll_timeout(), peer.poll_timeout()]
                .into_iter()
                .flatten()
                .min()
            else {
                break;
            };
            if ours.session_count() == 0 {
                break;
            }
            now = next;
            // The BAM's gaps are timer-driven on our side: the harness
            // advances the same time before its next input.
            let ms = u16::try_from(now.saturating_since(last).as_millis()).unwrap_or(u16::MAX);
            write_frame_op(&mut seed, &FrameOp::Advance { ms });
            last = now;
            ours.handle_timeout(now);
            peer.handle_timeout(now);
        }
        assert!(delivered, "{name}: the peer did not receive the message");
        out.put("j1939_tp", name, seed);
    }
}

fn gbt_seeds(out: &Out, session: &Session) {
    let mut seen = std::collections::HashSet::new();
    for m in &session.messages {
        let kind = m.kind();
        let index = MessageKind::ALL
            .iter()
            .position(|k| *k == kind)
            .expect("every kind is in ALL");
        let mut seed = vec![index as u8];
        seed.extend_from_slice(&m.encode());
        if seen.insert(seed.clone()) {
            out.put(
                "gbt_decode",
                &format!("{}-{}", kind.name(), seen.len()),
                seed,
            );
        }
    }
    assert!(
        seen.len() >= 15,
        "the session used only {} distinct messages",
        seen.len()
    );
}

fn candump_seeds(out: &Out, session: &Session) {
    let epoch = Duration::from_secs(1_700_000_000);
    let log: String = session
        .frames
        .iter()
        .map(|s| {
            let t = epoch + Duration::from_micros(s.at.as_micros());
            format_line(t, "can0", &s.frame) + "\n"
        })
        .collect();
    out.put("candump", "session", &log);
    // The other entries a capture may hold, and candump -x marks.
    let id = CanId::Extended(ExtendedId::new(0x1826_F456).expect("29-bit id"));
    let std_id = CanId::Standard(StandardId::new(0x123).expect("11-bit id"));
    let entries = [
        LogEntry::Error {
            class: 0x4,
            data: vec![0, 0x10, 0, 0, 0, 0, 0, 0],
        },
        LogEntry::Remote { id, len: 3 },
        LogEntry::Fd {
            id: std_id,
            flags: 1,
            data: (0..12).collect(),
        },
        LogEntry::Xl {
            vcid: 1,
            priority: 0x242,
            flags: 0x80,
            sdt: 3,
            af: 0x1122_3344,
            data: vec![0xAB; 20],
        },
    ];
    let mut other = String::new();
    for (i, entry) in entries.into_iter().enumerate() {
        let direction = [
            None,
            Some(Direction::Received),
            Some(Direction::Transmitted),
        ][i % 3];
        let record = LogRecord {
            timestamp: epoch + Duration::from_millis(i as u64),
            interface: "vcan1".into(),
            entry,
            direction,
        };
        other.push_str(&format_record(&record));
        other.push('\n');
    }
    other.push_str("DROPCOUNT: 3\n\n");
    out.put("candump", "other-entries", &other);
    // The first 40 lines, cut mid-line: a capture that stopped.
    let cut: String = log.lines().take(40).collect::<Vec<_>>().join("\n");
    out.put("candump", "cut-off", &cut[..cut.len() - 5]);
}

/// The session again, through the bridge: the bridge's inputs, recorded.
fn bridge_seeds(out: &Out) {
    for (name, auth_at) in [
        ("session-authenticated", Some(0)),
        ("session-gated", Some(1500)),
        ("session-never-authenticated", None),
    ] {
        let mut charger = Node::new(
            Charger::new(ChargerConfig {
                max_charging_time: Some(Duration::from_secs(2)),
                ..ChargerConfig::default()
            }),
            PILE,
            BMS,
            TpConfig::gbt27930(),
        );
        let mut bms = Node::new(
            Bms::new(BmsConfig::default()),
            BMS,
            PILE,
            TpConfig::gbt27930(),
        );
        let mut bridge = Bridge::new(FirewallConfig::gbt27930(BMS, PILE, GATEWAY));
        let mut now = Timestamp::ZERO;
        let mut seed = Vec::new();
        let mut last = now;
        charger.role_mut().start(now);
        bms.role_mut().start(now);
        charger.handle_timeout(now);
        bms.handle_timeout(now);
        let mut authenticated = false;
        let record =
            |seed: &mut Vec<u8>, last: &mut Timestamp, now: Timestamp, side: u8, f: &CanFrame| {
                let mut gap = now.saturating_since(*last);
                if gap > Duration::from_millis(255) {
                    let ms = u16::try_from(gap.as_millis()).unwrap_or(u16::MAX);
                    write_frame_op(seed, &FrameOp::Advance { ms });
                    gap = Duration::ZERO;
                }
                write_frame_op(
                    seed,
                    &FrameOp::Frame {
                        dt_ms: dt_ms(gap),
                        side,
                        frame: *f,
                    },
                );
                *last = now;
            };
        while now < Timestamp::from_millis(20_000) {
            if let Some(at) = auth_at
                && !authenticated
                && now >= Timestamp::from_millis(at)
            {
                authenticated = true;
                let ms = u16::try_from(now.saturating_since(last).as_millis()).unwrap_or(u16::MAX);
                write_frame_op(&mut seed, &FrameOp::Advance { ms });
                write_frame_op(
                    &mut seed,
                    &FrameOp::Send {
                        pgn: 0,
                        destination: 1,
                        len: 0,
                    },
                );
                last = now;
                bridge.set_pile_authenticated(true, now);
            }
            loop {
                let mut moved = false;
                while let Some(f) = bms.poll_transmit() {
                    moved = true;
                    record(&mut seed, &mut last, now, 0, &f);
                    bridge.handle_frame(Side::Bms, &f, now);
                }
                while let Some(f) = charger.poll_transmit() {
                    moved = true;
                    record(&mut seed, &mut last, now, 1, &f);
                    bridge.handle_frame(Side::Pile, &f, now);
                }
                while let Some((side, f)) = bridge.poll_transmit() {
                    moved = true;
                    match side {
                        Side::Bms => bms.handle_frame(&f, now),
                        Side::Pile => charger.handle_frame(&f, now),
                    }
                }
                if !moved {
                    break;
                }
            }
            let finished =
                |e: &NodeEvent| matches!(e, NodeEvent::Session(SessionEvent::Finished(_)));
            let done = std::iter::from_fn(|| charger.poll_event())
                .filter(finished)
                .count()
                + std::iter::from_fn(|| bms.poll_event())
                    .filter(finished)
                    .count();
            if done > 0
                && charger.role().poll_timeout().is_none()
                && bms.role().poll_timeout().is_none()
            {
                break;
            }
            let Some(next) = [
                charger.poll_timeout(),
                bms.poll_timeout(),
                bridge.poll_timeout(),
            ]
            .into_iter()
            .flatten()
            .min() else {
                break;
            };
            now = next.max(now);
            charger.handle_timeout(now);
            bms.handle_timeout(now);
            bridge.handle_timeout(now);
        }
        let counters = bridge.counters();
        assert!(
            counters.forwarded_bms_to_pile > 10 && counters.forwarded_pile_to_bms > 10,
            "{name}: {counters:?}"
        );
        out.put("bridge", name, seed);
    }
}

// --- authentication -------------------------------------------------------------

fn auth_seeds(out: &Out) {
    let mut vehicle = vehicle_auth();
    let mut pile = pile_auth();
    let now = T0;
    vehicle.start(now);
    let (mut to_pile, mut to_vehicle) = (Vec::new(), Vec::new());
    loop {
        let mut moved = false;
        while let Some(m) = vehicle.poll_transmit() {
            moved = true;
            pile.handle_message(&m, now, UNIX_NOW);
            to_pile.push(m);
        }
        while let Some(m) = pile.poll_transmit() {
            moved = true;
            vehicle.handle_message(&m, now);
            to_vehicle.push(m);
        }
        if !moved {
            break;
        }
    }
    assert!(
        matches!(vehicle.poll_event(), Some(VehicleAuthEvent::Accepted)),
        "vehicle did not accept"
    );
    assert!(
        matches!(pile.poll_event(), Some(PileAuthEvent::Accepted(_))),
        "pile did not accept"
    );

    // The messages alone, and the bare ticket.
    for (i, m) in to_pile.iter().chain(&to_vehicle).enumerate() {
        let kind = AuthMessage::parse(m)
            .expect("own messages parse")
            .message_type();
        out.put("auth_messages", &format!("{i}-{kind:?}"), m);
    }
    out.put("auth_messages", "ticket", credential(false).ticket);
    out.put("auth_messages", "ticket-voucher", credential(true).ticket);

    let ops = |side: u8, msgs: &[Vec<u8>], extra: &[AuthOp<'_>]| {
        let mut seed = vec![side];
        for m in msgs {
            write_auth_op(&mut seed, &AuthOp::Message(m));
        }
        for op in extra {
            write_auth_op(&mut seed, op);
        }
        seed
    };
    out.put("auth_handshake", "pile-accepts", ops(0, &to_pile, &[]));
    // The same ticket again in a new GB/T session: the replay cache refuses.
    let mut replay = ops(0, &to_pile, &[AuthOp::Restart]);
    replay.extend_from_slice(&ops(0, &to_pile, &[])[1..]);
    out.put("auth_handshake", "pile-replay", replay);
    out.put(
        "auth_handshake",
        "pile-confirm-timeout",
        ops(0, &to_pile[..1], &[AuthOp::Advance { ms: 1500 }]),
    );
    out.put(
        "auth_handshake",
        "vehicle-accepts",
        ops(1, &to_vehicle, &[]),
    );
    out.put(
        "auth_handshake",
        "vehicle-result-timeout",
        ops(1, &to_vehicle[..1], &[AuthOp::Advance { ms: 1500 }]),
    );
}

// --- cloud ----------------------------------------------------------------------

fn cloud_seeds(out: &Out) {
    let world = cloud_world();
    let keys = &world.vehicle;
    let vehicle_id = keys.vehicle_id.clone();
    let cbor = |topic: u8, bytes: &[u8]| [&[topic][..], bytes].concat();

    // The request the harness starts, and its nonce (drawn right after the
    // request id from the same RNG, as `IdentityExchange::start` does).
    let params = ExchangeParams {
        charger_number: CHARGER,
        region_code: *b"310",
        want_vouchers: 2,
    };
    let (mut exchange, request) =
        IdentityExchange::start(params, keys, UNIX_NOW, &mut FixedRng::new(6));
    let mut ids = [[0u8; 16]; 2];
    let mut rng = FixedRng::new(6);
    for id in &mut ids {
        bmsgw::auth::Rng::fill(&mut rng, id);
    }
    let [request_id, nonce] = ids;
    assert_eq!(&request_id, exchange.request_id());

    let vouchers = VoucherBatch {
        vehicle_id: vehicle_id.clone(),
        batch_id: [0xB0; 16],
        issued_at: UNIX_NOW,
        vouchers: vec![Voucher::from_credential(&credential(true))],
    };
    let grant = Response::Grant(IdentityGrant::new(
        vehicle_id.clone(),
        nonce,
        &credential(false),
        Some(vouchers.clone()),
    ));
    let responses = [
        ("grant", grant.encode()),
        (
            "denied",
            Response::Denied(Denied {
                vehicle_id: vehicle_id.clone(),
                request_nonce: nonce,
                reason: DenyReason::UnknownPile,
                detail: "no such pile".into(),
            })
            .encode(),
        ),
        (
            "pending",
            Response::Pending(PendingApproval {
                vehicle_id: vehicle_id.clone(),
                request_nonce: nonce,
                deadline: UNIX_NOW + 60,
            })
            .encode(),
        ),
    ];
    let pushes = [
        ("vouchers", Push::Vouchers(vouchers).encode()),
        (
            "revocation",
            Push::Revocation(Revocation {
                vehicle_id: vehicle_id.clone(),
                seq: 3,
                issued_at: UNIX_NOW,
                ticket_ids: vec![[7; 12], [8; 12]],
            })
            .encode(),
        ),
    ];
    let identity = Request::Identity(IdentityRequest {
        vehicle_id: vehicle_id.clone(),
        charger_number: CHARGER,
        region_code: *b"310",
        request_id,
        nonce,
        time: UNIX_NOW,
        want_vouchers: 2,
    });
    out.put("cloud_cbor", "request", cbor(0, &identity.encode()));
    for (name, bytes) in &responses {
        out.put("cloud_cbor", &format!("response-{name}"), cbor(1, bytes));
    }
    for (name, bytes) in &pushes {
        out.put("cloud_cbor", &format!("push-{name}"), cbor(2, bytes));
    }
    let record = Event::SessionRecord(SessionRecord {
        record_id: [0x1D; 16],
        vehicle_id: vehicle_id.clone(),
        charger_number: CHARGER,
        credential: UsedCredential {
            kind: CredentialKind::Voucher,
            ticket_id: [9; 12],
        },
        energy_wh: 12_345,
        started_at: UNIX_NOW,
        stopped_at: UNIX_NOW + 600,
        result: SessionResult::Failed {
            reason: "BEM: CRM timeout".into(),
        },
        deviations: {
            let mut d = bmsgw::interop::LinkDeviations::default();
            d.pile.accepted.add(bmsgw::interop::Deviation::CtsPacketInterval);
            d.bms.refused.add(bmsgw::interop::Deviation::PositiveCurrent);
            d
        },
    });
    out.put("cloud_cbor", "event-record", cbor(3, &record.encode()));
    let approval = Approval::Owner(OwnerApproval {
        vehicle_id: vehicle_id.clone(),
        request_id,
        approve: true,
        time: UNIX_NOW,
    });
    out.put("cloud_cbor", "approval", cbor(4, &approval.encode()));

    // Envelopes, sealed as the harness seals (FixedRng 5).
    let seal_to = |topic: &str, corr: &[u8], plain: &[u8]| {
        seal(
            keys.own.public(),
            &world.cloud,
            topic,
            corr,
            plain,
            &mut FixedRng::new(5),
        )
        .expect("seals")
    };
    for (name, bytes) in &responses {
        let wire = seal_to(&request.response_topic, &request.correlation, bytes);
        out.put(
            "cloud_envelope",
            &format!("resp-{name}-sealed"),
            cbor(0, &wire),
        );
        out.put(
            "cloud_envelope",
            &format!("resp-{name}-plain"),
            cbor(1, bytes),
        );
    }
    // The sealed grant is accepted by the very exchange the harness runs.
    let wire = seal_to(
        &request.response_topic,
        &request.correlation,
        &responses[0].1,
    );
    match exchange.on_response(
        &request.response_topic,
        &request.correlation,
        &wire,
        UNIX_NOW,
    ) {
        Ok(ExchangeEvent::Granted(g)) => assert_eq!(g.vouchers.len(), 1),
        other => panic!("the grant seed is not granted: {other:?}"),
    }
    let vouchers_topic = topics::vouchers(&vehicle_id);
    for (name, bytes) in &pushes {
        let wire = seal_to(&vouchers_topic, &[], bytes);
        open_push(keys, &vouchers_topic, &wire).expect("the push seed opens");
        out.put(
            "cloud_envelope",
            &format!("push-{name}-sealed"),
            cbor(2, &wire),
        );
        out.put(
            "cloud_envelope",
            &format!("push-{name}-plain"),
            cbor(3, bytes),
        );
        let file = TicketFile::new(vehicle_id.clone(), vouchers_topic.clone(), wire)
            .expect("a ticket file");
        let json = file.to_json();
        out.put(
            "cloud_envelope",
            &format!("ticket-file-{name}"),
            cbor(4, json.as_bytes()),
        );
        // The control socket's import request carries the same file.
        let line = format!("{{\"request\":\"import_ticket\",\"ticket\":{json}}}\n");
        out.put("control", &format!("import-{name}"), line);
    }
    assert_eq!(VEHICLE_ID, vehicle_id.as_str());
    out.put("control", "status", "{\"request\":\"status\"}\n");
    out.put(
        "control",
        "unknown-field",
        "{\"request\":\"status\",\"x\":1}",
    );
    out.put("control", "not-json", "status please\n");
}

fn config_seeds(out: &Out) {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/bmsgw.toml");
    let text =
        std::fs::read_to_string(&example).unwrap_or_else(|e| panic!("{}: {e}", example.display()));
    bmsgw::service::config::Config::from_toml_str(&text, Path::new("/etc/bmsgw"))
        .expect("the example config is valid");
    out.put("config", "example", &text);
    out.put(
        "config",
        "example-env",
        format!("{text}\0BMSGW__CLOUD__HOST=mqtt.test\nBMSGW__VEHICLE__ID=007\nBMSGW__CAN__MODE=single-bus\nBMSGW__CAN__INTERFACE=vcan0\n"),
    );
}
