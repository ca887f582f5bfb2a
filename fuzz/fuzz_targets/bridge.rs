//! The bridge and CAN firewall in bridge mode, fed frames from both buses:
//! the pile bus is untrusted, so what reaches the BMS bus is checked after
//! every input against the allowlist and the recognition gate.
#![no_main]

use std::time::Duration;

use bmsgw::gateway::bridge::Bridge;
use bmsgw::gateway::firewall::{FirewallConfig, Side};
use bmsgw::gbt27930::MessageKind;
use bmsgw::j1939::{Address, J1939Id};
use bmsgw_fuzz::{Cursor, FrameOp, T0, read_frame_op, run_timers};
use libfuzzer_sys::fuzz_target;

const BMS: Address = Address(0xF4);
const PILE: Address = Address(0x56);
const GATEWAY: Address = Address(0x8A);
const TP_CM: u32 = 0xEC00;
const TP_DT: u32 = 0xEB00;

fuzz_target!(|data: &[u8]| {
    let config = FirewallConfig::gbt27930(BMS, PILE, GATEWAY);
    let mut bridge = Bridge::new(config.clone());
    let crm = MessageKind::Crm.pgn();
    let mut now = T0;
    let mut c = Cursor::new(data);
    while let Some(op) = read_frame_op(&mut c) {
        let step = match &op {
            FrameOp::Frame { dt_ms, .. } => u64::from(*dt_ms),
            FrameOp::Advance { ms } => u64::from(*ms),
            FrameOp::Send { .. } => 0,
        };
        now = now + Duration::from_millis(step);
        run_timers(
            &mut bridge,
            now,
            Bridge::poll_timeout,
            Bridge::handle_timeout,
        );
        match op {
            FrameOp::Frame { side, frame, .. } => {
                let from = if side == 0 { Side::Bms } else { Side::Pile };
                bridge.handle_frame(from, &frame, now);
            }
            FrameOp::Advance { .. } => {}
            // The gateway's verdict on the pile flips.
            FrameOp::Send { destination, .. } => {
                bridge.set_pile_authenticated(destination % 2 == 1, now)
            }
        }
        let authenticated = bridge.pile_authenticated();
        while let Some((side, frame)) = bridge.poll_transmit() {
            let id = J1939Id::from_can_id(frame.id()).expect("the bridge sends J1939 ids");
            // Each bus only ever sees the node of the other side speak.
            let (speaker, allow) = match side {
                Side::Bms => (PILE, config.allowlist(Side::Pile)),
                Side::Pile => (BMS, config.allowlist(Side::Bms)),
            };
            assert_eq!(id.source, speaker, "{frame} sent on the {side} bus");
            let pgn = id.pgn.raw();
            assert!(
                pgn == TP_CM || pgn == TP_DT || allow.contains(&id.pgn),
                "{frame} on the {side} bus is not allowlisted"
            );
        }
        while let Some((from, msg)) = bridge.poll_message() {
            assert!(
                config.allowlist(from).contains(&msg.pgn),
                "{msg:?} forwarded"
            );
            assert_eq!(msg.source, config.address(from));
            // The recognition gate: no CRM(0xAA) reaches the BMS before the
            // pile has authenticated.
            if from == Side::Pile && msg.pgn == crm && !authenticated {
                assert_ne!(msg.data.first(), Some(&0xAA), "CRM(0xAA) passed the gate");
            }
        }
    }
});
