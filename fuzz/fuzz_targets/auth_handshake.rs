//! The authentication state machines fed message sequences: the pile
//! (Noise responder, ticket opening, replay cache) or the vehicle (Noise
//! initiator), then the secure channel once a side has accepted.
//!
//! The first byte picks the side (even: pile, odd: vehicle); the rest is a
//! sequence of `read_auth_op` steps. The party under test has fixed keys and
//! a fixed RNG, so the seeds (recorded from a real vehicle–pile run by
//! `make-seeds`) replay a whole accepted handshake.
#![no_main]

use std::collections::HashSet;
use std::time::Duration;

use bmsgw::auth::PileAuthEvent;
use bmsgw_fuzz::{AuthOp, Cursor, T0, UNIX_NOW, pile_auth, read_auth_op, vehicle_auth};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut c = Cursor::new(data);
    match c.u8() {
        Some(side) if side % 2 == 0 => pile(&mut c),
        Some(_) => vehicle(&mut c),
        None => {}
    }
});

fn pile(c: &mut Cursor<'_>) {
    let mut pile = pile_auth();
    let mut now = T0;
    // The security property: no ticket is accepted twice, whatever the
    // vehicle sends and however often the GB/T session restarts.
    let mut accepted = HashSet::new();
    while let Some(op) = read_auth_op(c) {
        match op {
            AuthOp::Message(m) => {
                if let Some(channel) = pile.channel() {
                    let _ = channel.open(m);
                }
                pile.handle_message(m, now, UNIX_NOW);
            }
            AuthOp::Advance { ms } => {
                now = now + Duration::from_millis(u64::from(ms));
                pile.handle_timeout(now);
            }
            AuthOp::Restart => pile.reset(),
        }
        while pile.poll_transmit().is_some() {}
        while let Some(ev) = pile.poll_event() {
            if let PileAuthEvent::Accepted(t) = ev {
                assert!(
                    accepted.insert(t.ticket_id),
                    "ticket {:02x?} accepted twice",
                    t.ticket_id
                );
            }
        }
    }
}

fn vehicle(c: &mut Cursor<'_>) {
    let mut vehicle = vehicle_auth();
    let mut now = T0;
    vehicle.start(now);
    // Outcomes of the current attempt: exactly one per attempt, never two.
    let mut outcomes = 0;
    while let Some(op) = read_auth_op(c) {
        match op {
            AuthOp::Message(m) => {
                if let Some(channel) = vehicle.channel() {
                    let _ = channel.open(m);
                }
                vehicle.handle_message(m, now);
            }
            AuthOp::Advance { ms } => {
                now = now + Duration::from_millis(u64::from(ms));
                vehicle.handle_timeout(now);
            }
            AuthOp::Restart => {
                vehicle = vehicle_auth();
                vehicle.start(now);
                outcomes = 0;
            }
        }
        while vehicle.poll_transmit().is_some() {}
        while let Some(ev) = vehicle.poll_event() {
            outcomes += 1;
            assert!(outcomes == 1, "a second outcome {ev:?} for one attempt");
            assert!(
                vehicle.is_finished(),
                "{ev:?} reported but the attempt goes on"
            );
        }
    }
}
