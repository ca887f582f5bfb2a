//! J1939-21 transport (RTS/CTS, EndOfMsgAck, BAM, Abort, timers) fed frame
//! sequences, as the charger's node at 0x56 that may also be sending; and
//! the passive monitor of `bmsgw decode` on the same bus.
#![no_main]

use std::time::Duration;

use bmsgw::j1939::{Address, J1939Message, MAX_TP_LEN, Monitor, Pgn, TpConfig, TpEvent, Transport};
use bmsgw_fuzz::{Cursor, FrameOp, T0, read_frame_op, run_timers};
use libfuzzer_sys::fuzz_target;

const LOCAL: Address = Address(0x56);

fuzz_target!(|data: &[u8]| {
    let config = TpConfig::gbt27930();
    let mut tp = Transport::new(config.clone(), LOCAL);
    let mut monitor = Monitor::new(16);
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
            &mut tp,
            now,
            Transport::poll_timeout,
            Transport::handle_timeout,
        );
        run_timers(
            &mut monitor,
            now,
            Monitor::poll_timeout,
            Monitor::handle_timeout,
        );
        match op {
            FrameOp::Frame { frame, .. } => {
                tp.handle_frame(&frame, now);
                monitor.handle_frame(&frame, now);
            }
            FrameOp::Advance { .. } => {}
            FrameOp::Send {
                pgn,
                destination,
                len,
            } => {
                let Ok(pgn) = Pgn::new(pgn) else { continue };
                // Past the limit too, to see it refused cleanly.
                let len = usize::from(len) % (MAX_TP_LEN + 16);
                let msg = J1939Message {
                    priority: config.priority,
                    pgn,
                    source: LOCAL,
                    destination: Address(destination),
                    data: (0..len).map(|i| i as u8).collect(),
                };
                let _ = tp.send(msg, now);
            }
        }
        // The limits hold after every input.
        assert!(tp.session_count() <= config.max_sessions);
        assert!(tp.buffered_bytes() <= config.max_buffered_bytes);
        assert!(monitor.session_count() <= 16);
        while tp.poll_transmit().is_some() {}
        while let Some(ev) = tp.poll_event() {
            if let TpEvent::Received(m) = ev {
                assert!(m.data.len() <= MAX_TP_LEN);
                assert!(m.destination == LOCAL || m.destination.is_global());
            }
        }
        while monitor.poll_event().is_some() {}
    }
    monitor.finish();
    while monitor.poll_event().is_some() {}
});
