//! Field deviations (docs/interop.md) against the simulators, in process:
//! for each deviation a peer that shows it ([`bmsgw::sim::deviant`]), and
//! `sim pile` or `sim bms` with each profile. With `field` the session
//! completes and the deviation is counted; with `strict` it fails, and the
//! reason names the deviation. The gateway's side of the same is in
//! `tests/system/interop_gateway.rs`.
//!
//! Everything runs over the in-process bus with the 250 kbit/s timing model
//! on tokio's paused clock.

use std::time::Duration;

use bmsgw::auth::{Credential, MemoryReplayStore, PileAuthConfig, PileKeys, RootKey, SystemRng};
use bmsgw::can::virtual_bus::VirtualBus;
use bmsgw::gateway::vehicle_auth::{VehicleAuthOptions, authenticate};
use bmsgw::gbt27930::ChargerNumber;
use bmsgw::gbt27930::session::{Outcome, Summary};
use bmsgw::interop::{Profile, SideDeviations};
use bmsgw::sim::SimError;
use bmsgw::sim::bms::{self, BmsSimOptions};
use bmsgw::sim::deviant::{self, Quirk};
use bmsgw::sim::pile::{self, PileAuthSetup, PileSimOptions};
use bmsgw::time::unix_now;

const BITRATE: u32 = 250_000;

const CHARGER: u32 = 31;

fn root() -> RootKey {
    RootKey::from_bytes([0x24; 32])
}

/// A pile that requires authentication, as the field piles that matter
/// here do: CRM(0xAA) waits for the handshake, which is when a BMS that
/// sends BCP right after BRM sends it early.
fn pile_opts(profile: Profile) -> PileSimOptions {
    PileSimOptions {
        charger_number: ChargerNumber(CHARGER),
        duration: Some(Duration::from_secs(2)),
        profile,
        auth: Some(PileAuthSetup {
            keys: PileKeys {
                root: root(),
                charger_number: CHARGER,
                current_offset: 0,
                previous_offset: None,
            },
            config: PileAuthConfig::default(),
            replay: MemoryReplayStore::default(),
        }),
        ..PileSimOptions::default()
    }
}

fn credential() -> Credential {
    let now = unix_now();
    Credential::issue(
        &root(),
        0,
        CHARGER,
        [9; 16],
        now - 60,
        now + 600,
        0,
        false,
        &mut SystemRng,
    )
}

fn bms_opts(profile: Profile) -> BmsSimOptions {
    BmsSimOptions {
        soc_start: 50.0,
        soc_end: 51.0,
        current: 150.0,
        duration: Duration::from_secs(2),
        profile,
        ..BmsSimOptions::default()
    }
}

/// A deviant BMS against `sim pile`: the deviant's outcome, the pile's
/// result and what the pile counted.
async fn against_pile(
    quirks: &[Quirk],
    profile: Profile,
) -> (Option<Outcome>, Result<Summary, SimError>, SideDeviations) {
    let bus = VirtualBus::with_timing(BITRATE);
    let (mut b, mut p, mut v) = (bus.node(), bus.node(), bus.node());
    let mut peer = deviant::bms(quirks);
    let opts = pile_opts(profile);
    let log = opts.deviations.clone();
    let limit = || tokio::time::sleep(Duration::from_secs(30));
    let (pile, bms, _vehicle) = tokio::join!(
        pile::run(&mut p, opts, std::future::pending()),
        deviant::run(&mut b, &mut peer, limit()),
        authenticate(&mut v, credential(), VehicleAuthOptions::default(), limit()),
    );
    (bms, pile, log.get())
}

/// A deviant charger against `sim bms`.
async fn against_bms(
    quirks: &[Quirk],
    profile: Profile,
) -> (Option<Outcome>, Result<Summary, SimError>, SideDeviations) {
    let bus = VirtualBus::with_timing(BITRATE);
    let (mut b, mut p) = (bus.node(), bus.node());
    let mut peer = deviant::charger(quirks, Duration::from_secs(2));
    let opts = bms_opts(profile);
    let log = opts.deviations.clone();
    let (bms, charger) = tokio::join!(bms::run(&mut b, opts, std::future::pending()), async {
        deviant::run(
            &mut p,
            &mut peer,
            tokio::time::sleep(Duration::from_secs(30)),
        )
        .await
    });
    (charger, bms, log.get())
}

fn completed(o: &Option<Outcome>) -> bool {
    matches!(o, Some(Outcome::Completed(_)))
}

#[tokio::test(start_paused = true)]
async fn each_bms_deviation_completes_with_field_and_is_counted() {
    for q in Quirk::BMS {
        let (peer, pile, seen) = against_pile(&[q], Profile::Field).await;
        assert!(pile.is_ok(), "{q:?}: pile: {pile:?}");
        assert!(completed(&peer), "{q:?}: deviant BMS: {peer:?}");
        let want: Vec<_> = q.deviation().into_iter().collect();
        let got: Vec<_> = seen.accepted.iter().map(|(d, _)| d).collect();
        assert_eq!(got, want, "{q:?}");
        assert!(seen.refused.is_empty(), "{q:?}: {seen}");
    }
}

#[tokio::test(start_paused = true)]
async fn each_bms_deviation_fails_with_strict_naming_it() {
    for q in Quirk::BMS {
        let Some(d) = q.deviation() else { continue };
        let (_, pile, seen) = against_pile(&[q], Profile::Strict).await;
        let err = pile.expect_err(&format!("{q:?}: strict pile completed"));
        let text = err.to_string();
        assert!(text.contains(d.name()), "{q:?}: {text}");
        assert!(seen.accepted.is_empty(), "{q:?}: {seen}");
        assert!(seen.refused.get(d) > 0, "{q:?}: {seen}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_bms_with_every_deviation_at_once_completes_with_field() {
    let (peer, pile, seen) = against_pile(&Quirk::BMS, Profile::Field).await;
    assert!(pile.is_ok(), "pile: {pile:?}");
    assert!(completed(&peer), "deviant BMS: {peer:?}");
    for d in Quirk::BMS.into_iter().filter_map(Quirk::deviation) {
        assert!(seen.accepted.get(d) > 0, "{d} not counted: {seen}");
    }
}

#[tokio::test(start_paused = true)]
async fn each_charger_deviation_completes_with_field_and_is_counted() {
    for q in Quirk::CHARGER {
        let (peer, bms, seen) = against_bms(&[q], Profile::Field).await;
        assert!(bms.is_ok(), "{q:?}: BMS: {bms:?}");
        assert!(completed(&peer), "{q:?}: deviant charger: {peer:?}");
        let want: Vec<_> = q.deviation().into_iter().collect();
        let got: Vec<_> = seen.accepted.iter().map(|(d, _)| d).collect();
        assert_eq!(got, want, "{q:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn each_charger_deviation_fails_with_strict_naming_it() {
    for q in Quirk::CHARGER {
        let Some(d) = q.deviation() else { continue };
        let (_, bms, seen) = against_bms(&[q], Profile::Strict).await;
        let err = bms.expect_err(&format!("{q:?}: strict BMS completed"));
        let text = err.to_string();
        assert!(text.contains(d.name()), "{q:?}: {text}");
        assert!(seen.refused.get(d) > 0, "{q:?}: {seen}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_charger_with_every_deviation_at_once_completes_with_field() {
    let (peer, bms, seen) = against_bms(&Quirk::CHARGER, Profile::Field).await;
    assert!(bms.is_ok(), "BMS: {bms:?}");
    assert!(completed(&peer), "deviant charger: {peer:?}");
    for d in Quirk::CHARGER.into_iter().filter_map(Quirk::deviation) {
        assert!(seen.accepted.get(d) > 0, "{d} not counted: {seen}");
    }
}

/// Why CTS bytes 4–5 go out as `00 00` (docs/interop.md): a BMS that reads
/// them as an interval completes with bmsgw's CTS (the tests above), and
/// stalls with J1939-21's `FF FF`, shown here with a charger that sends it.
#[tokio::test(start_paused = true)]
async fn a_bms_reading_an_interval_stalls_on_ff_ff_and_not_on_ours() {
    let bus = VirtualBus::with_timing(BITRATE);
    let (mut b, mut p) = (bus.node(), bus.node());
    let mut reader = deviant::bms(&[Quirk::CtsIntervalReader]);
    let mut standard =
        deviant::charger(&[Quirk::CtsPacketInterval(0xFFFF)], Duration::from_secs(2));
    let limit = || tokio::time::sleep(Duration::from_secs(30));
    let (bms, charger) = tokio::join!(
        deviant::run(&mut b, &mut reader, limit()),
        deviant::run(&mut p, &mut standard, limit()),
    );
    assert!(
        !completed(&bms) && !completed(&charger),
        "{bms:?} {charger:?}"
    );
    let text = format!("{charger:?}");
    assert!(
        text.contains("Brm"),
        "the charger should time out on BRM: {text}"
    );

    let (bms, pile, _) = against_pile(&[Quirk::CtsIntervalReader], Profile::Strict).await;
    assert!(completed(&bms) && pile.is_ok(), "{bms:?} {pile:?}");
}
