use super::*;
use crate::auth::RootKey;
use crate::auth::rng::StreamRng;
use crate::gateway::vehicle_auth::Authenticated;

const NOW: u32 = 1_760_000_000;
const PILE: Address = Address(0x56);

const TIMEOUT: Duration = Duration::from_secs(2);

fn orch() -> Orchestrator {
    Orchestrator::new(
        VehicleId::parse("veh-a").expect("valid id"),
        CredentialPolicy {
            want_vouchers: 4,
            request_timeout: TIMEOUT,
        },
    )
}

fn t(ms: u64) -> Timestamp {
    Timestamp::from_millis(ms)
}

fn credential(voucher: bool) -> Credential {
    Credential::issue(
        &RootKey::from_bytes([7; 32]),
        0,
        1,
        [1; 16],
        NOW - 10,
        NOW + 600,
        0,
        voucher,
        &mut StreamRng::new(1),
    )
}

fn request() -> ObserverEvent {
    ObserverEvent::ChargeRequest {
        charger_number: 1,
        region_code: *b"310",
        pile: PILE,
    }
}

fn actions(o: &mut Orchestrator) -> Vec<Action> {
    std::iter::from_fn(|| o.poll_action()).collect()
}

fn ended(result: EndResult, energy: Option<u32>) -> ObserverEvent {
    ObserverEvent::Ended(SessionEnd {
        result,
        energy_wh: energy,
        charging_minutes: None,
        final_soc_percent: None,
        phase_reached: Phase::Statistics,
    })
}

fn notices(o: &mut Orchestrator) -> Vec<Notice> {
    std::iter::from_fn(|| o.poll_notice()).collect()
}

/// The charge request at `at_ms`, expecting the cloud to be asked: the
/// session id.
fn asked(o: &mut Orchestrator, at_ms: u64, rng: &mut StreamRng) -> u64 {
    o.on_observer(request(), t(at_ms), NOW, rng);
    let acts = actions(o);
    match acts.last() {
        Some(Action::AskCloud { session, .. }) => *session,
        _ => panic!("expected the cloud to be asked, got {acts:?}"),
    }
}

/// Expects a voucher to be spent for `session`: its draft basis.
fn spending(o: &mut Orchestrator, session: u64) -> DraftBasis {
    let acts = actions(o);
    match acts.iter().find_map(|a| match a {
        Action::SpendVoucher { session: s, draft } if *s == session => Some(draft.clone()),
        _ => None,
    }) {
        Some(draft) => draft,
        None => panic!("expected a voucher spend for session {session}, got {acts:?}"),
    }
}

fn granted(vouchers: usize) -> CloudAnswer {
    CloudAnswer::Granted {
        credential: credential(false),
        vouchers: (0..vouchers).map(|_| credential(true)).collect(),
        elapsed: Duration::from_millis(40),
        refused: 0,
    }
}

fn no_record(acts: &[Action]) -> bool {
    !acts.iter().any(|a| matches!(a, Action::Record { .. }))
}

#[test]
fn online_session_asks_journals_authenticates_and_records() {
    let mut o = orch();
    let mut rng = StreamRng::new(9);
    o.on_observer(ObserverEvent::Started, t(0), NOW, &mut rng);
    assert!(matches!(actions(&mut o)[..], [Action::CloseGate]));
    o.on_observer(request(), t(250), NOW, &mut rng);
    // Repeats of CRM(0x00) do not ask again.
    o.on_observer(request(), t(500), NOW, &mut rng);
    let ask = actions(&mut o);
    let [Action::AskCloud { session, params }] = &ask[..] else {
        panic!("expected one request, got {ask:?}");
    };
    assert_eq!(params.charger_number, 1);
    assert_eq!(params.want_vouchers, 4);
    assert_eq!(o.poll_timeout(), Some(t(250) + TIMEOUT));
    let cred = credential(false);
    let ticket_id = cred.ticket_id();
    o.on_cloud(
        *session,
        CloudAnswer::Granted {
            credential: cred,
            vouchers: vec![credential(true), credential(true)],
            elapsed: Duration::from_millis(40),
            refused: 0,
        },
        t(300),
        NOW + 1,
    );
    assert_eq!(o.poll_timeout(), None, "answered: no deadline left");
    let next = actions(&mut o);
    // The grant's vouchers are kept; the credential waits for the draft to
    // be durable.
    let [
        Action::StoreVouchers { vouchers },
        Action::Journal { draft },
    ] = &next[..]
    else {
        panic!("expected the vouchers and the journal, got {next:?}");
    };
    assert_eq!(vouchers.len(), 2);
    o.on_journaled(&[0xEE; 16]);
    assert!(actions(&mut o).is_empty(), "another draft's commit");
    o.on_journaled(&draft.record_id);
    let next = actions(&mut o);
    let [Action::StartAuth { pile, .. }] = &next[..] else {
        panic!("expected auth after the commit, got {next:?}");
    };
    assert_eq!(*pile, PILE);
    o.on_journaled(&draft.record_id);
    assert!(
        actions(&mut o).is_empty(),
        "the credential is presented once"
    );
    assert!(matches!(draft.result, SessionResult::Failed { .. }));
    o.on_auth(
        AuthOutcome::Accepted(Authenticated {
            charger_number: 1,
            pile_address: PILE,
        }),
        t(400),
    );
    assert!(matches!(actions(&mut o)[..], [Action::OpenGate]));
    o.on_observer(ObserverEvent::Recognized, t(420), NOW + 1, &mut rng);
    assert_eq!(
        o.current().and_then(|v| v.request_to_recognized),
        Some(Duration::from_millis(170))
    );
    o.on_observer(
        ended(EndResult::Completed, Some(1200)),
        t(9000),
        NOW + 9,
        &mut rng,
    );
    let end = actions(&mut o);
    let [Action::Record { record }, Action::CloseGate] = &end[..] else {
        panic!("expected record then close, got {end:?}");
    };
    assert_eq!(
        record.record_id, draft.record_id,
        "draft and record share the id"
    );
    assert_eq!(record.credential.kind, CredentialKind::Online);
    assert_eq!(record.credential.ticket_id, ticket_id);
    assert_eq!(record.energy_wh, 1200);
    assert_eq!(record.result, SessionResult::Completed);
    assert!(o.current().is_none());
    assert_eq!(o.last_result(), Some("completed"));
}

/// Cloud first: a voucher only once the request timeout has passed, and
/// the late request is cancelled.
#[test]
fn a_voucher_is_used_when_the_cloud_does_not_answer_in_time() {
    let mut o = orch();
    let mut rng = StreamRng::new(9);
    let session = asked(&mut o, 1000, &mut rng);
    // A forged answer is refused by the shell's exchange; the wait goes on.
    o.on_cloud(
        session,
        CloudAnswer::Refused("bad signature".into()),
        t(1500),
        NOW,
    );
    assert!(actions(&mut o).is_empty());
    o.handle_timeout(t(1000) + (TIMEOUT - Duration::from_millis(1)));
    assert!(actions(&mut o).is_empty(), "not before the timeout");
    o.handle_timeout(t(1000) + TIMEOUT);
    let acts = actions(&mut o);
    assert!(
        matches!(acts.first(), Some(Action::CancelCloud { session: s, timed_out: true }) if *s == session),
        "{acts:?}"
    );
    let [_, Action::SpendVoucher { draft, .. }] = &acts[..] else {
        panic!("expected cancel then spend, got {acts:?}");
    };
    assert_eq!(draft.charger_number, 1);
    // The voucher comes spent with its draft: presented at once.
    o.on_voucher(session, VoucherAnswer::Taken(credential(true)), NOW + 2);
    assert!(matches!(actions(&mut o)[..], [Action::StartAuth { .. }]));
    let n = notices(&mut o);
    assert!(
        n.iter().any(|n| matches!(n, Notice::Credential { kind: CredentialKind::Voucher, detail, refused: 1, .. }
            if detail.contains("no valid answer within 2s (1 answer(s) refused, last: bad signature)"))),
        "{n:?}"
    );
    assert_eq!(
        o.current().and_then(|v| v.credential),
        Some(CredentialKind::Voucher)
    );
}

/// Asked while the link was usable (lost just now, reconnecting at once),
/// the session stops waiting when the reconnect fails: a voucher at once,
/// not at the timeout. While the owner is asked, it waits on.
#[test]
fn a_link_found_down_while_waiting_means_a_voucher_at_once() {
    let mut o = orch();
    let mut rng = StreamRng::new(11);
    let session = asked(&mut o, 1000, &mut rng);
    o.on_cloud_link(CloudLink::Usable);
    assert!(actions(&mut o).is_empty());
    o.on_cloud_link(CloudLink::Down("backoff".into()));
    let acts = actions(&mut o);
    assert!(
        matches!(acts.first(), Some(Action::CancelCloud { session: s, timed_out: false }) if *s == session),
        "{acts:?}"
    );
    let [_, Action::SpendVoucher { .. }] = &acts[..] else {
        panic!("expected cancel then spend, got {acts:?}");
    };
    o.on_voucher(session, VoucherAnswer::Taken(credential(true)), NOW + 1);
    let n = notices(&mut o);
    assert!(
        n.iter().any(
            |n| matches!(n, Notice::Credential { kind: CredentialKind::Voucher, detail, .. }
            if detail.contains("cloud link is backoff"))
        ),
        "{n:?}"
    );
    // Another down report later changes nothing.
    let _ = actions(&mut o);
    o.on_cloud_link(CloudLink::Down("backoff".into()));
    assert!(actions(&mut o).is_empty());

    // Awaiting the owner's approval: the link going down is no reason to
    // spend a voucher the owner did not approve.
    let mut o = orch();
    let session = asked(&mut o, 1000, &mut rng);
    o.on_cloud(
        session,
        CloudAnswer::Pending { deadline: NOW + 60 },
        t(1100),
        NOW,
    );
    let _ = actions(&mut o);
    o.on_cloud_link(CloudLink::Down("backoff".into()));
    assert!(actions(&mut o).is_empty());
}

/// A link known down (in backoff) or disabled is not asked: the BMS waits
/// only 5 s for CRM(0xAA).
#[test]
fn a_link_known_down_or_disabled_means_a_voucher_at_once() {
    for (link, why) in [
        (CloudLink::Down("backoff".into()), "cloud link is backoff"),
        (CloudLink::Disabled, "cloud link disabled"),
    ] {
        let mut o = orch();
        let mut rng = StreamRng::new(9);
        o.on_cloud_link(link);
        o.on_observer(request(), t(0), NOW, &mut rng);
        let acts = actions(&mut o);
        assert!(
            !acts.iter().any(|a| matches!(a, Action::AskCloud { .. })),
            "{acts:?}"
        );
        let Some(Action::SpendVoucher { session, .. }) = acts.last() else {
            panic!("expected a spend, got {acts:?}");
        };
        o.on_voucher(*session, VoucherAnswer::None, NOW);
        let n = notices(&mut o);
        assert!(
            n.iter().any(|n| matches!(n, Notice::NoCredential { reason }
                if reason.contains(why) && reason.contains("no voucher for charger 1"))),
            "{n:?}"
        );
        // Back up: the next session asks the cloud again.
        o.on_observer(ended(EndResult::PileRestarted, None), t(100), NOW, &mut rng);
        let _ = actions(&mut o);
        o.on_cloud_link(CloudLink::Usable);
        asked(&mut o, 200, &mut rng);
    }
}

/// A request that fails (the link dropped, the broker refused) falls back
/// at once, without waiting for the timeout.
#[test]
fn a_failed_request_falls_back_to_a_voucher_at_once() {
    let mut o = orch();
    let mut rng = StreamRng::new(9);
    let session = asked(&mut o, 0, &mut rng);
    o.on_cloud(
        session,
        CloudAnswer::Failed("link stopped".into()),
        t(10),
        NOW,
    );
    spending(&mut o, session);
    assert_eq!(o.poll_timeout(), None);
}

/// A denial is the cloud's decision: a voucher would bypass it.
#[test]
fn a_denial_is_final() {
    let mut o = orch();
    let mut rng = StreamRng::new(9);
    let session = asked(&mut o, 0, &mut rng);
    o.on_cloud(
        session,
        CloudAnswer::Denied("the cloud denied the grant (revoked): gone".into()),
        t(10),
        NOW,
    );
    assert!(actions(&mut o).is_empty(), "no voucher after a denial");
    o.handle_timeout(t(10) + TIMEOUT * 3);
    assert!(actions(&mut o).is_empty(), "and none at the old deadline");
    o.on_observer(
        ended(EndResult::BmsError("CRM timeout".into()), None),
        t(6000),
        NOW + 6,
        &mut rng,
    );
    let end = actions(&mut o);
    assert!(no_record(&end), "{end:?}");
    assert!(
        o.last_result().is_some_and(|r| r.contains("revoked")),
        "{:?}",
        o.last_result()
    );
}

/// While the owner is asked, the wait runs to the owner's deadline; no
/// answer by then is a refusal, not a reason to spend a voucher.
#[test]
fn owner_approval_extends_the_wait_and_its_timeout_is_a_refusal() {
    let mut o = orch();
    let mut rng = StreamRng::new(9);
    let session = asked(&mut o, 0, &mut rng);
    o.on_cloud(
        session,
        CloudAnswer::Pending { deadline: NOW + 60 },
        t(100),
        NOW,
    );
    assert!(o.awaiting_approval());
    let n = notices(&mut o);
    assert!(
        n.contains(&Notice::AwaitingApproval { deadline: NOW + 60 }),
        "{n:?}"
    );
    let deadline = t(100) + Duration::from_secs(60) + TIMEOUT;
    assert_eq!(o.poll_timeout(), Some(deadline));
    o.handle_timeout(t(0) + TIMEOUT);
    assert!(
        actions(&mut o).is_empty(),
        "the first timeout no longer applies"
    );
    o.handle_timeout(deadline);
    let acts = actions(&mut o);
    assert!(
        matches!(acts[..], [Action::CancelCloud { .. }]),
        "cancelled, and no voucher: {acts:?}"
    );
    assert!(!o.awaiting_approval());
    assert!(
        notices(&mut o)
            .iter()
            .any(|n| matches!(n, Notice::NoCredential { reason }
            if reason.contains("did not approve in time"))),
    );

    // Approved in time: the grant is used as any other.
    let mut o = orch();
    let session = asked(&mut o, 0, &mut rng);
    o.on_cloud(
        session,
        CloudAnswer::Pending { deadline: NOW + 60 },
        t(100),
        NOW,
    );
    o.on_cloud(session, granted(0), t(30_000), NOW + 30);
    assert!(!o.awaiting_approval());
    assert!(matches!(actions(&mut o)[..], [Action::Journal { .. }]));
}

/// Stop while waiting for the cloud: the request is cancelled, nothing is
/// spent and nothing is recorded, whether the session ends or the gateway
/// stops.
#[test]
fn a_stop_while_waiting_for_the_cloud_spends_and_records_nothing() {
    for shutdown in [false, true] {
        let mut o = orch();
        let mut rng = StreamRng::new(9);
        let session = asked(&mut o, 0, &mut rng);
        if shutdown {
            o.on_shutdown(NOW + 1);
        } else {
            o.on_observer(
                ended(EndResult::Silence(Duration::from_secs(10)), None),
                t(900),
                NOW + 1,
                &mut rng,
            );
        }
        let acts = actions(&mut o);
        assert!(
            acts.iter().any(|a| matches!(a, Action::CancelCloud { session: s, timed_out: false } if *s == session)),
            "{acts:?}"
        );
        assert!(no_record(&acts), "{acts:?}");
        assert!(
            !acts
                .iter()
                .any(|a| matches!(a, Action::SpendVoucher { .. }))
        );
        assert_eq!(o.poll_timeout(), None);
        // An answer that still comes is dropped; its vouchers are kept.
        o.on_cloud(session, granted(1), t(1000), NOW + 2);
        let late = actions(&mut o);
        assert!(
            matches!(late[..], [Action::StoreVouchers { .. }]),
            "{late:?}"
        );
    }
}

/// A grant that comes after the fallback began: the ticket is not used
/// (the session has its voucher), its vouchers are.
#[test]
fn a_grant_after_the_fallback_keeps_its_vouchers_only() {
    let mut o = orch();
    let mut rng = StreamRng::new(9);
    let session = asked(&mut o, 0, &mut rng);
    o.handle_timeout(t(0) + TIMEOUT);
    spending(&mut o, session);
    o.on_cloud(session, granted(3), t(2100), NOW + 2);
    let acts = actions(&mut o);
    let [Action::StoreVouchers { vouchers }] = &acts[..] else {
        panic!("expected only the vouchers kept, got {acts:?}");
    };
    assert_eq!(vouchers.len(), 3);
    o.on_voucher(session, VoucherAnswer::Taken(credential(true)), NOW + 2);
    assert!(matches!(actions(&mut o)[..], [Action::StartAuth { .. }]));
}

/// Crash recovery rests on one rule: the pile never sees a credential whose
/// session has no durable draft. An online ticket waits for its journal; a
/// voucher's draft is in its spend's commit; a failed spend presents
/// nothing.
#[test]
fn no_credential_reaches_the_pile_before_its_draft_is_durable() {
    let mut rng = StreamRng::new(9);
    // Online: Journal first, StartAuth only on the commit.
    let mut o = orch();
    let session = asked(&mut o, 0, &mut rng);
    o.on_cloud(session, granted(0), t(50), NOW);
    let acts = actions(&mut o);
    assert!(matches!(acts[..], [Action::Journal { .. }]), "{acts:?}");
    o.on_auth(AuthOutcome::FakePile, t(60));
    assert!(
        actions(&mut o).is_empty(),
        "no handshake runs before the commit"
    );
    // Voucher: the spend is the commit.
    let mut o = orch();
    let session = asked(&mut o, 0, &mut rng);
    o.on_cloud(session, CloudAnswer::Failed("x".into()), t(10), NOW);
    spending(&mut o, session);
    o.on_voucher(session, VoucherAnswer::Failed("disk full".into()), NOW);
    assert!(
        actions(&mut o).is_empty(),
        "a failed spend presents nothing"
    );
    let n = notices(&mut o);
    assert!(
        n.iter()
            .any(|n| matches!(n, Notice::NoCredential { reason } if reason.contains("disk full"))),
        "{n:?}"
    );
    o.on_observer(
        ended(EndResult::BmsError("CRM timeout".into()), None),
        t(6000),
        NOW + 6,
        &mut rng,
    );
    assert!(no_record(&actions(&mut o)), "nothing was spent");
}

#[test]
fn a_session_without_credential_leaves_no_record() {
    let mut o = orch();
    let mut rng = StreamRng::new(9);
    let session = asked(&mut o, 0, &mut rng);
    o.on_cloud(session, CloudAnswer::Failed("no answer".into()), t(10), NOW);
    spending(&mut o, session);
    o.on_voucher(session, VoucherAnswer::None, NOW);
    assert!(actions(&mut o).is_empty());
    o.on_observer(
        ended(EndResult::BmsError("CRM timeout".into()), None),
        t(6000),
        NOW + 6,
        &mut rng,
    );
    let end = actions(&mut o);
    assert!(
        no_record(&end),
        "no credential was spent, so there is nothing to record: {end:?}"
    );
    assert!(notices(&mut o).iter().any(
        |n| matches!(n, Notice::SessionEnded { recorded: false, result, .. } if result.contains("no voucher"))
    ));
}

/// The session's record, with a voucher: the vehicle's path offline.
fn with_voucher(o: &mut Orchestrator, rng: &mut StreamRng) -> u64 {
    o.on_cloud_link(CloudLink::Down("backoff".into()));
    o.on_observer(request(), t(0), NOW, rng);
    let acts = actions(o);
    let Some(Action::SpendVoucher { session, .. }) = acts.last() else {
        panic!("expected a spend, got {acts:?}");
    };
    let session = *session;
    o.on_voucher(session, VoucherAnswer::Taken(credential(true)), NOW);
    let _ = actions(o);
    session
}

#[test]
fn a_refused_pile_is_the_reason_in_the_record_and_a_late_credential_is_dropped() {
    let mut o = orch();
    let mut rng = StreamRng::new(9);
    let session = with_voucher(&mut o, &mut rng);
    o.on_auth(AuthOutcome::FakePile, t(300));
    o.on_observer(
        ended(EndResult::BmsError("CRM(0xAA) timeout".into()), None),
        t(6000),
        NOW + 6,
        &mut rng,
    );
    let end = actions(&mut o);
    let Some(Action::Record { record }) = end.first() else {
        panic!("expected a record, got {end:?}");
    };
    assert_eq!(record.credential.kind, CredentialKind::Voucher);
    match &record.result {
        SessionResult::Failed { reason } => assert!(reason.contains("fake pile"), "{reason}"),
        other => panic!("expected a failure, got {other:?}"),
    }
    // A grant for the ended session changes nothing (no vouchers in it).
    o.on_cloud(session, granted(0), t(6100), NOW + 7);
    assert!(actions(&mut o).is_empty());
    assert!(o.current().is_none());
}

/// The session's deviations go into its record, and a refusal by the
/// bridge is the reason, ahead of the error it caused.
#[test]
fn deviations_and_a_refusal_are_in_the_record() {
    use crate::interop::Deviation;
    let mut o = orch();
    let mut rng = StreamRng::new(10);
    with_voucher(&mut o, &mut rng);
    o.on_deviation(Side::Pile, Deviation::CtsWithoutPgn, false);
    o.on_deviation(Side::Bms, Deviation::PositiveCurrent, true);
    o.on_refusal(
        Side::Bms,
        "BCP: deviation positive-current refused by the strict profile",
    );
    o.on_refusal(Side::Pile, "a later one");
    o.on_observer(
        ended(EndResult::ChargerError("CEM timeout=BCP".into()), None),
        t(6000),
        NOW + 6,
        &mut rng,
    );
    let end = actions(&mut o);
    let Some(Action::Record { record }) = end.first() else {
        panic!("expected a record, got {end:?}");
    };
    assert_eq!(
        record
            .deviations
            .pile
            .accepted
            .get(Deviation::CtsWithoutPgn),
        1
    );
    assert_eq!(
        record
            .deviations
            .bms
            .refused
            .get(Deviation::PositiveCurrent),
        1
    );
    match &record.result {
        SessionResult::Failed { reason } => {
            assert!(reason.contains("refused the bms's message"), "{reason}");
            assert!(reason.contains("positive-current"), "{reason}");
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    // Between sessions nothing is counted.
    o.on_deviation(Side::Pile, Deviation::CtsWithoutPgn, false);
    assert!(o.current().is_none());
}

#[test]
fn a_voucher_journaled_with_its_spend_is_presented_at_once_under_the_same_record_id() {
    let mut o = orch();
    let mut rng = StreamRng::new(9);
    let session = asked(&mut o, 0, &mut rng);
    o.handle_timeout(t(0) + TIMEOUT);
    let basis = spending(&mut o, session);
    assert_eq!(basis.charger_number, 1);
    // What the shell journals with the spend is the orchestrator's own
    // draft: same id, same ticket, "interrupted".
    let cred = credential(true);
    let shell_draft = basis.draft(CredentialKind::Voucher, cred.ticket_id(), NOW + 1);
    assert!(matches!(shell_draft.result, SessionResult::Failed { .. }));
    o.on_voucher(session, VoucherAnswer::Taken(cred.clone()), NOW + 1);
    let next = actions(&mut o);
    let [Action::StartAuth { pile, .. }] = &next[..] else {
        panic!("expected auth at once, no second journal, got {next:?}");
    };
    assert_eq!(*pile, PILE);
    o.on_observer(
        ended(EndResult::Completed, Some(800)),
        t(9000),
        NOW + 9,
        &mut rng,
    );
    let end = actions(&mut o);
    let Some(Action::Record { record }) = end.first() else {
        panic!("expected a record, got {end:?}");
    };
    // The final record replaces the journaled draft (same id).
    assert_eq!(record.record_id, shell_draft.record_id);
    assert_eq!(record.credential.ticket_id, cred.ticket_id());
    assert_eq!(record.result, SessionResult::Completed);
}

#[test]
fn shutdown_mid_session_records_it_as_interrupted() {
    let mut o = orch();
    let mut rng = StreamRng::new(9);
    let session = asked(&mut o, 0, &mut rng);
    o.on_cloud(session, granted(0), t(10), NOW);
    let _ = actions(&mut o);
    o.on_shutdown(NOW + 3);
    let end = actions(&mut o);
    let Some(Action::Record { record }) = end.first() else {
        panic!("expected a record, got {end:?}");
    };
    let SessionResult::Failed { reason } = &record.result else {
        panic!("expected a failure, got {:?}", record.result);
    };
    assert!(
        reason.contains("interrupted in the handshake phase") && reason.contains("gateway stopped"),
        "{reason}"
    );
    assert_eq!(record.stopped_at, NOW + 3);
}

/// A fake pile restarting the session (or flipping its charger number)
/// gets a few credentials, then none: offline, each would be a voucher.
#[test]
fn a_pile_that_never_proves_its_key_stops_getting_credentials() {
    let mut o = orch().with_throttle(ThrottleConfig {
        burst: 10,
        refill: Duration::from_secs(1),
        max_unproven: 3,
        cooldown: Duration::from_secs(600),
    });
    o.on_cloud_link(CloudLink::Down("backoff".into()));
    let mut rng = StreamRng::new(9);
    let mut spent = 0;
    for attempt in 0..6u32 {
        let unix = NOW + attempt * 20;
        o.on_observer(
            ObserverEvent::ChargeRequest {
                charger_number: 1 + attempt,
                region_code: *b"310",
                pile: PILE,
            },
            t(u64::from(attempt) * 20_000),
            unix,
            &mut rng,
        );
        let spend = actions(&mut o).into_iter().find_map(|a| match a {
            Action::SpendVoucher { session, .. } => Some(session),
            _ => None,
        });
        if let Some(session) = spend {
            spent += 1;
            o.on_voucher(session, VoucherAnswer::Taken(credential(true)), unix);
            o.on_auth(AuthOutcome::FakePile, t(u64::from(attempt) * 20_000 + 100));
        } else {
            let notices = notices(&mut o);
            assert!(
                notices
                    .iter()
                    .any(|n| matches!(n, Notice::NoCredential { reason }
                    if reason.contains("never proved their key"))),
                "{notices:?}"
            );
        }
        o.on_observer(
            ended(EndResult::BmsError("CRM(0xAA) timeout".into()), None),
            t(u64::from(attempt) * 20_000 + 5_000),
            unix + 5,
            &mut rng,
        );
        let _ = actions(&mut o);
        while o.poll_notice().is_some() {}
    }
    assert_eq!(spent, 3, "three vouchers, then the cooldown");
}

#[test]
fn restarts_in_quick_succession_are_rate_limited() {
    let mut o = orch();
    let mut rng = StreamRng::new(9);
    let mut asked = 0;
    for attempt in 0..8u32 {
        o.on_observer(
            request(),
            t(u64::from(attempt) * 1000),
            NOW + attempt,
            &mut rng,
        );
        asked += actions(&mut o)
            .iter()
            .filter(|a| matches!(a, Action::AskCloud { .. }))
            .count();
        o.on_observer(
            ended(EndResult::PileRestarted, None),
            t(u64::from(attempt) * 1000 + 500),
            NOW + attempt,
            &mut rng,
        );
        let _ = actions(&mut o);
    }
    assert_eq!(asked, ThrottleConfig::default().burst as usize);
}

/// Regression (fault suite, 10% loss through the gateway): a session
/// ended while its voucher was being taken from the wallet; the voucher
/// was spent and no record said so. The same holds when the gateway stops
/// meanwhile.
#[test]
fn a_voucher_for_a_session_that_ended_waiting_for_it_is_recorded_as_unused() {
    for shutdown in [false, true] {
        let mut o = orch();
        let mut rng = StreamRng::new(9);
        let session = asked(&mut o, 0, &mut rng);
        o.handle_timeout(t(0) + TIMEOUT);
        spending(&mut o, session);
        if shutdown {
            o.on_shutdown(NOW + 5);
        } else {
            o.on_observer(
                ended(EndResult::BmsError("CRM(0xAA) timeout".into()), None),
                t(5000),
                NOW + 5,
                &mut rng,
            );
        }
        let end = actions(&mut o);
        assert!(no_record(&end), "nothing spent yet: {end:?}");
        let voucher = credential(true);
        let ticket_id = voucher.ticket_id();
        o.on_voucher(session, VoucherAnswer::Taken(voucher), NOW + 6);
        let late = actions(&mut o);
        let [Action::Record { record }] = &late[..] else {
            panic!("expected one record, got {late:?}");
        };
        assert_eq!(record.credential.kind, CredentialKind::Voucher);
        assert_eq!(record.credential.ticket_id, ticket_id);
        assert_eq!((record.started_at, record.stopped_at), (NOW, NOW + 5));
        assert!(
            matches!(&record.result, SessionResult::Failed { reason } if reason.contains("never shown to the pile")),
            "{record:?}"
        );
        // Only once.
        o.on_voucher(session, VoucherAnswer::Taken(credential(true)), NOW + 7);
        assert!(actions(&mut o).is_empty());
    }
    // No voucher after all: nothing to record.
    let mut o = orch();
    let mut rng = StreamRng::new(9);
    let session = asked(&mut o, 0, &mut rng);
    o.on_cloud(session, CloudAnswer::Failed("x".into()), t(5), NOW);
    spending(&mut o, session);
    o.on_observer(ended(EndResult::PileRestarted, None), t(100), NOW, &mut rng);
    let _ = actions(&mut o);
    o.on_voucher(session, VoucherAnswer::None, NOW + 1);
    assert!(actions(&mut o).is_empty());
}
