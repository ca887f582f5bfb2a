//! A full GB/T session with vehicle authentication, end to end on the
//! in-process bus with the 250 kbit/s timing model: the pile simulator with
//! authentication required, the BMS simulator, and the vehicle-side
//! authentication driver as a third node, each on its own bus node.

use std::time::Duration;

use bmsgw::auth::{
    Credential, MemoryReplayStore, PileAuthConfig, PileKeys, ResultCode, RootKey, SystemRng,
};
use bmsgw::can::virtual_bus::VirtualBus;
use bmsgw::gateway::vehicle_auth::{VehicleAuthError, VehicleAuthOptions, authenticate};
use bmsgw::gbt27930::ChargerNumber;
use bmsgw::gbt27930::session::{FailureReason, Outcome, Phase};
use bmsgw::sim::SimError;
use bmsgw::sim::bms::{self, BmsSimOptions};
use bmsgw::sim::pile::{self, PileAuthSetup, PileSimOptions};
use bmsgw::time::unix_now;

const CHARGER: u32 = 20_261_121;
const OFFSET: u16 = 7;

fn root() -> RootKey {
    RootKey::from_bytes([0x42; 32])
}

fn pile_opts(root: RootKey) -> PileSimOptions {
    PileSimOptions {
        charger_number: ChargerNumber(CHARGER),
        auth: Some(PileAuthSetup {
            keys: PileKeys {
                root,
                charger_number: CHARGER,
                current_offset: OFFSET,
                previous_offset: None,
            },
            config: PileAuthConfig::default(),
            replay: MemoryReplayStore::default(),
        }),
        ..PileSimOptions::default()
    }
}

fn bms_opts() -> BmsSimOptions {
    BmsSimOptions {
        soc_start: 70.0,
        soc_end: 71.0,
        duration: Duration::from_secs(2),
        ..BmsSimOptions::default()
    }
}

fn credential(charger: u32, not_before: u32, not_after: u32) -> Credential {
    Credential::issue(
        &root(),
        OFFSET,
        charger,
        [7; 16],
        not_before,
        not_after,
        0,
        false,
        &mut SystemRng,
    )
}

fn valid_credential() -> Credential {
    let now = unix_now();
    credential(CHARGER, now - 60, now + 600)
}

#[tokio::test(start_paused = true)]
async fn authenticated_session_completes() {
    let bus = VirtualBus::with_timing(250_000);
    let (mut b, mut p, mut v) = (bus.node(), bus.node(), bus.node());
    let never = std::future::pending::<()>;
    let (bms, pile, vehicle) = tokio::join!(
        bms::run(&mut b, bms_opts(), never()),
        pile::run(&mut p, pile_opts(root()), never()),
        authenticate(
            &mut v,
            valid_credential(),
            VehicleAuthOptions::default(),
            never()
        ),
    );
    let vehicle = vehicle.expect("vehicle authenticated");
    assert_eq!(vehicle.charger_number, CHARGER);
    assert_eq!(vehicle.pile_address.0, 0x56);
    bms.expect("BMS session completes");
    pile.expect("pile session completes");
}

#[tokio::test(start_paused = true)]
async fn without_a_vehicle_the_pile_never_sends_crm_aa() {
    let bus = VirtualBus::with_timing(250_000);
    let (mut b, mut p) = (bus.node(), bus.node());
    let never = std::future::pending::<()>;
    let (bms, pile) = tokio::join!(
        bms::run(&mut b, bms_opts(), never()),
        pile::run(&mut p, pile_opts(root()), never()),
    );
    // The BMS waits for CRM(0xAA) in recognition and times out.
    match bms {
        Err(SimError::Session(Outcome::Failed { phase, reason })) => {
            assert_eq!(phase, Phase::Recognition);
            assert_eq!(
                reason,
                FailureReason::Timeout {
                    waiting_for: bmsgw::gbt27930::MessageKind::Crm
                }
            );
        }
        other => panic!("BMS: {other:?}"),
    }
    match pile {
        Err(SimError::Unauthenticated { last_rejection, .. }) => assert_eq!(last_rejection, None),
        other => panic!("pile: {other:?}"),
    }
}

async fn refused(
    cred: Credential,
    pile_root: RootKey,
) -> (Result<(), VehicleAuthError>, Result<(), SimError>) {
    let bus = VirtualBus::with_timing(250_000);
    let (mut b, mut p, mut v) = (bus.node(), bus.node(), bus.node());
    let never = std::future::pending::<()>;
    let (_bms, pile, vehicle) = tokio::join!(
        bms::run(&mut b, bms_opts(), never()),
        pile::run(&mut p, pile_opts(pile_root), never()),
        authenticate(&mut v, cred, VehicleAuthOptions::default(), never()),
    );
    (vehicle.map(|_| ()), pile.map(|_| ()))
}

#[tokio::test(start_paused = true)]
async fn an_expired_ticket_is_refused_and_charging_never_starts() {
    let now = unix_now();
    let (vehicle, pile) = refused(credential(CHARGER, now - 7200, now - 3600), root()).await;
    assert!(
        matches!(
            vehicle,
            Err(VehicleAuthError::Rejected(ResultCode::Expired))
        ),
        "{vehicle:?}"
    );
    match pile {
        Err(SimError::Unauthenticated { last_rejection, .. }) => {
            assert_eq!(last_rejection, Some(ResultCode::Expired))
        }
        other => panic!("pile: {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_ticket_for_another_pile_is_not_even_sent() {
    let now = unix_now();
    let (vehicle, pile) = refused(credential(CHARGER + 1, now - 60, now + 600), root()).await;
    assert!(
        matches!(vehicle, Err(VehicleAuthError::WrongPile { expected, found }) if expected == CHARGER + 1 && found == CHARGER),
        "{vehicle:?}"
    );
    assert!(
        matches!(
            pile,
            Err(SimError::Unauthenticated {
                last_rejection: None,
                ..
            })
        ),
        "{pile:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_pile_without_the_root_key_cannot_open_the_ticket() {
    let (vehicle, pile) = refused(valid_credential(), RootKey::from_bytes([0x13; 32])).await;
    assert!(
        matches!(
            vehicle,
            Err(VehicleAuthError::Rejected(ResultCode::BadTicket))
        ),
        "{vehicle:?}"
    );
    assert!(
        matches!(
            pile,
            Err(SimError::Unauthenticated {
                last_rejection: Some(ResultCode::BadTicket),
                ..
            })
        ),
        "{pile:?}"
    );
}
