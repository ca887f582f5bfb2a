//! Attack suite, whole sessions: captured sessions replayed on both sides of
//! the gateway, and a pile that claims not to support authentication
//! (downgrade). The daemon runs in bridge mode between two in-process buses
//! with the 250 kbit/s timing model, on tokio's paused clock
//! (`sim::attack::rig`). Results are tabled in docs/security-tests.md.
#![cfg(feature = "sim")]

use bmsgw::sim::attack::rig::{Rig, RigOptions};

/// The control: without an attacker, a session through the rig completes
/// on a voucher. Every attack test below differs from this one only by its
/// attacker.
#[tokio::test(start_paused = true)]
async fn without_an_attacker_a_session_completes() {
    let rig = Rig::start(RigOptions::default()).await.expect("rig");
    let (bms, pile) = rig.session(rig.genuine_pile().expect("pile")).await;
    assert!(bms.is_ok(), "BMS: {bms:?}");
    assert!(pile.is_ok(), "pile: {pile:?}");
    rig.stop().await.expect("clean stop");
}
