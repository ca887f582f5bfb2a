//! Field deviations (docs/interop.md) through the gateway: the daemon
//! (`bmsgw run`'s code) in bridge mode between two in-process buses, with a
//! peer that deviates on one side ([`bmsgw::sim::deviant`]) and a simulator
//! on the other. The gateway meets each side with its own profile
//! (`[interop] bms`, `pile`): with `field` the session completes, what
//! crosses is the standard's form, and the deviations are counted in
//! `bmsgw status`; with `strict` the session fails and its result names the
//! deviation.

use std::time::Duration;

use bmsgw::gbt27930::session::{Outcome, Summary};
use bmsgw::interop::{Deviation, Profile};
use bmsgw::service::config::InteropConfig;
use bmsgw::service::status::Status;
use bmsgw::sim::SimError;
use bmsgw::sim::attack::rig::{Rig, RigOptions};
use bmsgw::sim::deviant::{self, Quirk};
use bmsgw::sim::{bms, pile};

async fn rig(bms: Profile, pile: Profile, require_pile_auth: bool) -> Rig {
    Rig::start(RigOptions {
        interop: InteropConfig { bms, pile },
        require_pile_auth,
        ..RigOptions::default()
    })
    .await
    .expect("rig")
}

/// A deviant BMS on the BMS bus, the genuine pile (authentication
/// required, `pile_profile`) on the inlet.
async fn deviant_bms_session(
    rig: &Rig,
    quirks: &[Quirk],
    pile_profile: Profile,
) -> (
    Option<Outcome>,
    Result<Summary, SimError>,
    pile::PileSimOptions,
) {
    let (mut b, mut p) = (rig.bms_bus.node(), rig.pile_bus.node());
    let mut peer = deviant::bms(quirks);
    let mut opts = rig.genuine_pile().expect("pile");
    opts.profile = pile_profile;
    opts.duration = Some(Duration::from_secs(2));
    let kept = opts.clone();
    let (pile, bms) = tokio::join!(
        pile::run(&mut p, opts, std::future::pending()),
        deviant::run(
            &mut b,
            &mut peer,
            tokio::time::sleep(Duration::from_secs(30))
        ),
    );
    (bms, pile, kept)
}

/// A deviant charger on the inlet, `sim bms` (`bms_profile`) on the BMS bus.
async fn deviant_charger_session(
    rig: &Rig,
    quirks: &[Quirk],
    bms_profile: Profile,
) -> (
    Option<Outcome>,
    Result<Summary, SimError>,
    bms::BmsSimOptions,
) {
    let (mut b, mut p) = (rig.bms_bus.node(), rig.pile_bus.node());
    let mut peer = deviant::charger(quirks, Duration::from_secs(2));
    let mut opts = rig.bms_options();
    opts.profile = bms_profile;
    let kept = opts.clone();
    let (bms, charger) = tokio::join!(
        bms::run(&mut b, opts, std::future::pending()),
        deviant::run(
            &mut p,
            &mut peer,
            tokio::time::sleep(Duration::from_secs(30))
        ),
    );
    (charger, bms, kept)
}

async fn status(rig: &Rig) -> Status {
    // The session's end reaches `status` with the next turn of the loop.
    tokio::time::sleep(Duration::from_millis(100)).await;
    rig.status().await.expect("status answers")
}

fn completed(o: &Option<Outcome>) -> bool {
    matches!(o, Some(Outcome::Completed(_)))
}

#[tokio::test(start_paused = true)]
async fn a_bms_with_every_deviation_charges_through_the_gateway_and_is_counted() {
    let rig = rig(Profile::Field, Profile::Field, true).await;
    let (bms, pile, _) = deviant_bms_session(&rig, &Quirk::BMS, Profile::Field).await;
    assert!(completed(&bms), "deviant BMS: {bms:?}");
    assert!(pile.is_ok(), "pile: {pile:?}");
    let s = status(&rig).await;
    for d in Quirk::BMS.into_iter().filter_map(Quirk::deviation) {
        assert!(
            s.deviations.bms.accepted.get(d) > 0,
            "{d}: {:?}",
            s.deviations
        );
    }
    assert!(s.deviations.pile.accepted.is_empty(), "{:?}", s.deviations);
    let last = s.last_session.expect("a last session");
    assert_eq!(last.result.as_deref(), Some("completed"));
    let fw = s.firewall.expect("bridge counters");
    assert!(fw["bcp_replayed"].as_u64() >= Some(1), "{fw}");
    assert_eq!(fw["refused"].as_u64(), Some(0), "{fw}");
    rig.stop().await.expect("clean stop");
}

/// What the gateway forwards is the standard's form: a strict pile behind
/// it charges a BMS that counts current positive, sends BCP only early,
/// a BEM before any CCS was due and BCS in one frame, and reads CTS bytes
/// 4–5 as an interval. The pile sees none of it.
#[tokio::test(start_paused = true)]
async fn a_strict_pile_behind_the_gateway_sees_no_deviation_of_the_bms() {
    let rig = rig(Profile::Field, Profile::Strict, true).await;
    let quirks = [
        Quirk::CtsIntervalReader,
        Quirk::BcpOnceEarly,
        Quirk::EarlyBemCcs,
        Quirk::PositiveCurrent,
        Quirk::BcsSingleFrame,
    ];
    let (bms, pile, opts) = deviant_bms_session(&rig, &quirks, Profile::Strict).await;
    assert!(completed(&bms), "deviant BMS: {bms:?}");
    assert!(pile.is_ok(), "strict pile: {pile:?}");
    let pile_saw = opts.deviations.get();
    assert!(
        pile_saw.accepted.is_empty() && pile_saw.refused.is_empty(),
        "{pile_saw}"
    );
    let s = status(&rig).await;
    for d in quirks.into_iter().filter_map(Quirk::deviation) {
        assert!(
            s.deviations.bms.accepted.get(d) > 0,
            "{d}: {:?}",
            s.deviations
        );
    }
    rig.stop().await.expect("clean stop");
}

#[tokio::test(start_paused = true)]
async fn a_strict_gateway_refuses_a_bms_deviation_and_names_it() {
    let rig = rig(Profile::Strict, Profile::Field, true).await;
    let (bms, pile, _) = deviant_bms_session(&rig, &[Quirk::PositiveCurrent], Profile::Field).await;
    assert!(!completed(&bms), "deviant BMS charged: {bms:?}");
    assert!(pile.is_err(), "pile charged: {pile:?}");
    let s = status(&rig).await;
    assert!(
        s.deviations.bms.refused.get(Deviation::PositiveCurrent) > 0,
        "{:?}",
        s.deviations
    );
    let result = s.last_session.and_then(|l| l.result).unwrap_or_default();
    assert!(result.contains("positive-current"), "{result}");
    let fw = s.firewall.expect("bridge counters");
    assert!(fw["refused"].as_u64() >= Some(1), "{fw}");
    rig.stop().await.expect("clean stop");
}

/// The pile side: a charger that puts an interval and no PGN in its CTS
/// and counts current positive charges a strict BMS through the gateway.
/// (The deviant charger does not authenticate, so the gate is off here.)
#[tokio::test(start_paused = true)]
async fn a_charger_with_every_deviation_charges_a_strict_bms_through_the_gateway() {
    let rig = rig(Profile::Field, Profile::Field, false).await;
    let (charger, bms, opts) =
        deviant_charger_session(&rig, &Quirk::CHARGER, Profile::Strict).await;
    assert!(completed(&charger), "deviant charger: {charger:?}");
    assert!(bms.is_ok(), "strict BMS: {bms:?}");
    let bms_saw = opts.deviations.get();
    assert!(
        bms_saw.accepted.is_empty() && bms_saw.refused.is_empty(),
        "{bms_saw}"
    );
    let s = status(&rig).await;
    for d in Quirk::CHARGER.into_iter().filter_map(Quirk::deviation) {
        assert!(
            s.deviations.pile.accepted.get(d) > 0,
            "{d}: {:?}",
            s.deviations
        );
    }
    rig.stop().await.expect("clean stop");
}

#[tokio::test(start_paused = true)]
async fn a_strict_gateway_refuses_a_pile_deviation_and_names_it() {
    for quirk in [Quirk::PositiveCurrent, Quirk::CtsWithoutPgn] {
        let rig = rig(Profile::Field, Profile::Strict, false).await;
        let (charger, bms, _) = deviant_charger_session(&rig, &[quirk], Profile::Field).await;
        assert!(
            !completed(&charger) && bms.is_err(),
            "{quirk:?}: {charger:?} {bms:?}"
        );
        let s = status(&rig).await;
        let d = quirk.deviation().expect("a wire deviation");
        assert!(
            s.deviations.pile.refused.get(d) > 0,
            "{quirk:?}: {:?}",
            s.deviations
        );
        let result = s.last_session.and_then(|l| l.result).unwrap_or_default();
        assert!(result.contains(d.name()), "{quirk:?}: {result}");
        rig.stop().await.expect("clean stop");
    }
}
