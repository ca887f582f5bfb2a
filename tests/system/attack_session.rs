//! Attack suite, whole sessions: captured sessions replayed on both sides of
//! the gateway, and a pile that claims not to support authentication
//! (downgrade). The daemon runs in bridge mode between two in-process buses
//! with the 250 kbit/s timing model, on tokio's paused clock
//! (`sim::attack::rig`). Results are tabled in docs/security-tests.md.

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

use bmsgw::can::CanFrame;
use bmsgw::gbt27930::{CHARGER_ADDRESS, MessageKind};
use bmsgw::j1939::J1939Id;
use bmsgw::sim::SimError;
use bmsgw::sim::attack::rig::{Recorder, replay};

type Capture = Vec<(tokio::time::Instant, CanFrame)>;

fn source(f: &CanFrame) -> Option<u8> {
    J1939Id::from_can_id(f.id()).ok().map(|id| id.source.0)
}

fn is_crm_aa(f: &CanFrame) -> bool {
    J1939Id::from_can_id(f.id()).is_ok_and(|id| id.pgn == MessageKind::Crm.pgn())
        && f.data().first() == Some(&0xAA)
}

/// A genuine session, recorded on both buses.
async fn captured_session(rig: &Rig) -> (Capture, Capture) {
    let bms_rec = Recorder::start(&rig.bms_bus);
    let pile_rec = Recorder::start(&rig.pile_bus);
    let (bms, pile) = rig.session(rig.genuine_pile().expect("pile")).await;
    assert!(bms.is_ok() && pile.is_ok(), "{bms:?} {pile:?}");
    let (bms_side, lost_b) = bms_rec.finish().await;
    let (pile_side, lost_p) = pile_rec.finish().await;
    assert_eq!((lost_b, lost_p), (0, 0));
    assert!(pile_side.iter().any(|(_, f)| is_crm_aa(f)));
    (bms_side, pile_side)
}

/// The vehicle's half of a captured session (the BMS's messages the bridge
/// forwarded, the gateway's AuthRequest and AuthConfirm) played back to the
/// genuine pile with the gateway gone: the pile refuses the ticket as
/// replayed and never offers CRM(0xAA).
#[tokio::test(start_paused = true)]
async fn the_vehicle_side_of_a_captured_session_replayed_to_the_pile_is_refused() {
    let mut rig = Rig::start(RigOptions::default()).await.expect("rig");
    let (_, pile_side) = captured_session(&rig).await;
    rig.stop_daemon().await.expect("daemon stops");
    let vehicle_half: Capture = pile_side
        .into_iter()
        .filter(|(_, f)| source(f) != Some(CHARGER_ADDRESS))
        .collect();
    assert!(vehicle_half.len() > 50, "{}", vehicle_half.len());
    let watch = Recorder::start(&rig.pile_bus);
    let mut attacker = rig.pile_bus.node();
    let mut pile_node = rig.pile_bus.node();
    let pile = rig.genuine_pile().expect("pile");
    let (pile_result, sent) = tokio::join!(
        bmsgw::sim::pile::run(&mut pile_node, pile, std::future::pending()),
        async {
            // The pile's first CHM is what the recording starts from.
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            replay(&mut attacker, &vehicle_half).await
        },
    );
    let (seen, _) = watch.finish().await;
    assert_eq!(sent, vehicle_half.len() as u64);
    match pile_result {
        Err(SimError::Unauthenticated {
            last_rejection: Some(code),
            ..
        }) => assert_eq!(code, bmsgw::auth::ResultCode::Replayed),
        other => panic!("the pile took the replay: {other:?}"),
    }
    let offered = seen
        .iter()
        .filter(|(_, f)| source(f) == Some(CHARGER_ADDRESS) && is_crm_aa(f))
        .count();
    assert_eq!(offered, 0, "the pile offered CRM(0xAA)");
}

/// The pile's half of a captured session (its CHM, CRM(0x00) and CRM(0xAA),
/// AuthChallenge, AuthResult Accepted, CML, CCS...) played back to the
/// vehicle by a device at the inlet: the gateway finds the replayed
/// challenge does not answer its fresh handshake, and the BMS never sees
/// CRM(0xAA) and never charges.
#[tokio::test(start_paused = true)]
async fn the_pile_side_of_a_captured_session_replayed_to_the_vehicle_is_refused() {
    let rig = Rig::start(RigOptions::default()).await.expect("rig");
    let (_, pile_side) = captured_session(&rig).await;
    let pile_half: Capture = pile_side
        .into_iter()
        .filter(|(_, f)| source(f) == Some(CHARGER_ADDRESS))
        .collect();
    assert!(pile_half.iter().any(|(_, f)| is_crm_aa(f)));
    let held_before = rig.firewall_counter("crm_held").await;
    let bms_watch = Recorder::start(&rig.bms_bus);
    let mut attacker = rig.pile_bus.node();
    let mut bms_node = rig.bms_bus.node();
    let (bms_result, _) = tokio::join!(
        bmsgw::sim::bms::run(&mut bms_node, rig.bms_options(), std::future::pending()),
        replay(&mut attacker, &pile_half),
    );
    let (bms_seen, _) = bms_watch.finish().await;
    assert!(
        bms_result.is_err(),
        "the BMS charged on a replay: {bms_result:?}"
    );
    let aa = bms_seen
        .iter()
        .filter(|(_, f)| source(f) == Some(CHARGER_ADDRESS) && is_crm_aa(f))
        .count();
    assert_eq!(aa, 0, "CRM(0xAA) reached the BMS");
    assert!(rig.firewall_counter("crm_held").await > held_before);
    // Regression: the gateway recorded this as a completed session (the
    // observer followed the replayed pile alone through to CSD).
    let last = rig
        .status()
        .await
        .and_then(|s| s.last_session)
        .expect("the replay was seen as a session");
    assert_eq!(last.id, "2", "{last:?}");
    assert!(!last.pile_authenticated, "{last:?}");
    assert_eq!(last.phase, "recognition", "{last:?}");
    let result = last.result.unwrap_or_default();
    assert!(result.starts_with("failed"), "{result}");
    println!("replayed pile half: the gateway recorded {result:?}");
    rig.stop().await.expect("clean stop");
}

/// Downgrade: a pile that does not take part in authentication (it ignores
/// AuthRequest and offers CRM(0xAA) at once). With the default policy
/// (`require_pile_auth = true`) the BMS never gets past recognition.
#[tokio::test(start_paused = true)]
async fn a_pile_without_authentication_is_refused_by_default() {
    let rig = Rig::start(RigOptions::default()).await.expect("rig");
    assert!(rig.config().session.require_pile_auth, "the default");
    let bms_watch = Recorder::start(&rig.bms_bus);
    let (bms, pile) = rig.session(rig.pile_without_auth()).await;
    let (bms_seen, _) = bms_watch.finish().await;
    assert!(bms.is_err(), "BMS charged: {bms:?}");
    assert!(pile.is_err(), "pile: {pile:?}");
    assert!(
        !bms_seen
            .iter()
            .any(|(_, f)| source(f) == Some(CHARGER_ADDRESS) && is_crm_aa(f))
    );
    assert!(rig.firewall_counter("crm_held").await > 0);
    let last = rig.status().await.and_then(|s| s.last_session);
    println!("downgrade, default policy: {last:?}");
    rig.stop().await.expect("clean stop");
}

/// Downgrade with the policy that allows it (`require_pile_auth = false`,
/// for fleets that must charge at legacy piles): the same pile charges.
/// The policy decides, not the pile.
#[tokio::test(start_paused = true)]
async fn a_pile_without_authentication_charges_only_when_the_policy_allows() {
    let rig = Rig::start(RigOptions {
        require_pile_auth: false,
        ..RigOptions::default()
    })
    .await
    .expect("rig");
    let (bms, pile) = rig.session(rig.pile_without_auth()).await;
    assert!(bms.is_ok(), "BMS: {bms:?}");
    assert!(pile.is_ok(), "pile: {pile:?}");
    assert_eq!(rig.firewall_counter("crm_held").await, 0);
    rig.stop().await.expect("clean stop");
}
