//! The cloud link end to end: the vehicle's identity client against the
//! reference identity service (`sim::cloud::run`) through real brokers (the
//! embedded rumqttd, and mosquitto with TLS 1.3, mutual TLS and the ACL),
//! with an attacker holding broker access but not the cloud's key.

use crate::link_support;
use crate::support;

use std::sync::Arc;
use std::time::Duration;

use bmsgw::auth::{Credential, RootKey, SystemRng, VoucherWallet};
use bmsgw::cloud::client::{FetchError, IdentityClient};
use bmsgw::cloud::envelope::{self, KeyPair, PublicKey};
use bmsgw::cloud::exchange::{ExchangeParams, VehicleKeys};
use bmsgw::cloud::link::{Incoming, Link, LinkConfig, LinkState};
use bmsgw::cloud::messages::{
    CredentialKind, DenyReason, IdentityGrant, OwnerApproval, Payload, Response, SessionRecord,
    SessionResult, UsedCredential,
};
use bmsgw::cloud::outbox::{OutboxPublisher, enqueue_record};
use bmsgw::cloud::topics::VehicleId;
use bmsgw::sim::broker::EmbeddedBroker;
use bmsgw::sim::cloud::CloudConfig;
use bmsgw::sim::cloud::run::{CloudMonitor, run};
use bmsgw::sim::pki::{DevPki, DevPkiOptions};
use bmsgw::store::{OutboxPolicy, Store};
use link_support::{DEADLINE, connected, eventually, next, record_states};
use support::mosquitto::Mosquitto;
use tokio::sync::{Notify, oneshot};

const CHARGER: u32 = 1;

fn pki_with(approval_required: &[&str]) -> (tempfile::TempDir, DevPki) {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = DevPki::generate(&DevPkiOptions {
        approval_required: approval_required.iter().map(|s| s.to_string()).collect(),
        ..DevPkiOptions::new(dir.path().join("pki"))
    })
    .expect("dev PKI");
    (dir, pki)
}

fn params() -> ExchangeParams {
    ExchangeParams {
        charger_number: CHARGER,
        region_code: *b"310",
        want_vouchers: 2,
    }
}

/// A running cloud instance; dropping `stop` ends it.
struct Cloud {
    monitor: CloudMonitor,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Cloud {
    /// Cloud instance `n` (its own certificate and config file).
    async fn start(pki: &DevPki, port: u16, n: u32, tweak: impl FnOnce(&mut CloudConfig)) -> Cloud {
        let mut config =
            CloudConfig::load(&pki.cloud_instance(n).toml).expect("cloud.toml from pki dev loads");
        config.broker.port = port;
        let client_id = config.broker.client_id.clone();
        tweak(&mut config);
        let monitor = CloudMonitor::default();
        let (stop, stopped) = oneshot::channel::<()>();
        let m = monitor.clone();
        let task = tokio::spawn(async move {
            run(&config, m, async {
                let _ = stopped.await;
            })
            .await
            .expect("cloud service runs");
        });
        assert!(
            monitor.connected(DEADLINE).await,
            "cloud {client_id} never connected"
        );
        Cloud {
            monitor,
            stop: Some(stop),
            task,
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

fn vehicle_keys(pki: &DevPki, id: &str) -> VehicleKeys {
    VehicleKeys {
        vehicle_id: VehicleId::parse(id).expect("valid id"),
        own: KeyPair::load(&pki.vehicle(id).hpke_key).expect("vehicle HPKE key"),
        cloud: PublicKey::load(&pki.cloud_hpke_pub).expect("cloud public key"),
    }
}

async fn vehicle(
    pki: &DevPki,
    id: &str,
    port: u16,
    tweak: impl FnOnce(&mut LinkConfig),
) -> IdentityClient {
    let mut config = link_support::vehicle(pki, id, "127.0.0.1", port);
    tweak(&mut config);
    let (link, _incoming) = Link::start(config).expect("vehicle link");
    connected(&link).await;
    IdentityClient::new(link, vehicle_keys(pki, id))
}

/// A client with broker access and a cloud instance's rights there (cloud
/// instance 2's certificate: a compromised instance, or the broker itself
/// re-delivering) and its own X25519 key, but not the cloud's.
async fn intruder(
    pki: &DevPki,
    port: u16,
    watch: &[String],
) -> (Link, tokio::sync::mpsc::Receiver<Incoming>) {
    let mut config = link_support::cloud(pki, 2, "127.0.0.1", port);
    config.subscriptions = watch
        .iter()
        .map(|t| (t.clone(), bmsgw::cloud::link::QoS::AtLeastOnce))
        .collect();
    let (link, rx) = Link::start(config).expect("intruder link");
    connected(&link).await;
    (link, rx)
}

async fn fetch_ok(
    client: &IdentityClient,
    timeout: Duration,
) -> (
    bmsgw::cloud::exchange::Grant,
    bmsgw::cloud::client::FetchReport,
) {
    client
        .fetch(params(), timeout, &mut SystemRng)
        .await
        .unwrap_or_else(|(e, report)| panic!("fetch failed: {e} ({report:?})"))
}

fn check_grant(grant: &bmsgw::cloud::exchange::Grant) {
    assert_eq!(grant.credential.charger_number, CHARGER);
    assert!(!grant.credential.voucher);
    assert!(grant.credential.is_valid_at(bmsgw::time::unix_now()));
    assert_eq!(grant.vouchers.len(), 2, "want_vouchers = 2, cloud allows 4");
    assert!(
        grant
            .vouchers
            .iter()
            .all(|v| v.voucher && v.charger_number == CHARGER)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grant_through_rumqttd_lands_in_the_wallet() {
    let (_dir, pki) = pki_with(&[]);
    let broker = EmbeddedBroker::start(&pki).expect("embedded broker");
    let cloud = Cloud::start(&pki, broker.port(), 1, |_| {}).await;
    let client = vehicle(&pki, "veh-a", broker.port(), |_| {}).await;

    let (grant, report) = fetch_ok(&client, DEADLINE).await;
    check_grant(&grant);
    assert_eq!(report.refused, 0);
    // The pile can open the ticket with its own root key.
    let root = RootKey::from_bytes(
        *bmsgw::service::keyfile::load_key(&pki.pile_root_key(CHARGER)).expect("root key"),
    );
    let header = bmsgw::auth::TicketHeader::parse(&grant.credential.ticket).expect("ticket header");
    assert_eq!(header.charger_number, CHARGER);
    let keys = bmsgw::auth::PileKeys {
        root,
        charger_number: CHARGER,
        current_offset: header.key_offset,
        previous_offset: None,
    };
    let opened =
        bmsgw::auth::ticket::open(&keys, &grant.credential.ticket, bmsgw::time::unix_now(), 60);
    assert!(opened.is_ok(), "the pile opens the granted ticket");

    // Vouchers go to the durable wallet.
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path().join("state.redb")).expect("store");
    let mut wallet = store
        .wallet(zeroize::Zeroizing::new([7u8; 32]))
        .expect("wallet");
    for v in grant.vouchers.clone() {
        wallet.add(v).expect("voucher added");
    }
    assert_eq!(wallet.remaining_for(CHARGER, bmsgw::time::unix_now()), 2);
    assert_eq!(cloud.monitor.stats().granted, 1);
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grant_through_mosquitto() {
    let (_dir, pki) = pki_with(&[]);
    let Some(broker) = Mosquitto::start(&pki) else {
        return;
    };
    let cloud = Cloud::start(&pki, broker.port(), 1, |_| {}).await;
    let client = vehicle(&pki, "veh-a", broker.port(), |_| {}).await;
    let (grant, _) = fetch_ok(&client, DEADLINE).await;
    check_grant(&grant);
    assert_eq!(cloud.monitor.stats().granted, 1);
    cloud.stop().await;
}

/// Forge a grant the way an attacker with broker access can: a well-formed
/// grant sealed with the attacker's own key, on the vehicle's response
/// topic with the request's correlation data (visible in the request).
fn forged_grant(vehicle: &VehicleId, vehicle_pk: &PublicKey, topic: &str, corr: &[u8]) -> Vec<u8> {
    let attacker = KeyPair::generate(&mut SystemRng);
    let credential = Credential::issue(
        &RootKey::from_bytes([9; 32]),
        1,
        CHARGER,
        [0; 16],
        bmsgw::time::unix_now(),
        bmsgw::time::unix_now() + 600,
        0,
        false,
        &mut SystemRng,
    );
    let grant = Response::Grant(IdentityGrant::new(
        vehicle.clone(),
        [0; 16],
        &credential,
        None,
    ));
    envelope::seal(
        vehicle_pk,
        &attacker,
        topic,
        corr,
        &grant.encode(),
        &mut SystemRng,
    )
    .expect("seal")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_grant_from_a_client_without_the_cloud_key_is_refused() {
    let (_dir, pki) = pki_with(&[]);
    let broker = EmbeddedBroker::start(&pki).expect("embedded broker");
    let keys = vehicle_keys(&pki, "veh-a");
    let (attacker, mut seen) =
        intruder(&pki, broker.port(), &[link_support::req_topic("veh-a")]).await;
    let client = vehicle(&pki, "veh-a", broker.port(), |_| {}).await;

    let fetch = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .fetch(params(), Duration::from_secs(3), &mut SystemRng)
                .await
        })
    };
    let request = next(&mut seen).await;
    let corr = request
        .correlation
        .clone()
        .expect("requests carry correlation data");
    let resp = request
        .response_topic
        .clone()
        .expect("requests carry a response topic");
    let forged = forged_grant(&keys.vehicle_id, keys.own.public(), &resp, &corr);
    attacker
        .publish_confirmed(&resp, forged, Some(corr))
        .await
        .expect("broker takes it");

    let outcome = fetch.await.expect("fetch task");
    match outcome {
        Err((
            FetchError::Timeout {
                refused,
                last_refusal,
                ..
            },
            _,
        )) => {
            assert_eq!(refused, 1);
            assert!(last_refusal.unwrap_or_default().contains("refused"));
        }
        other => panic!("forged grant must be refused, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grant_for_another_vehicle_and_replayed_grant_are_refused() {
    let (_dir, pki) = pki_with(&[]);
    let broker = EmbeddedBroker::start(&pki).expect("embedded broker");
    let watch = [
        link_support::req_topic("veh-a"),
        link_support::resp_topic("veh-a"),
        link_support::resp_topic("veh-b"),
    ];
    let (attacker, mut seen) = intruder(&pki, broker.port(), &watch).await;
    let cloud = Cloud::start(&pki, broker.port(), 1, |_| {}).await;
    let veh_a = vehicle(&pki, "veh-a", broker.port(), |_| {}).await;
    let veh_b = vehicle(&pki, "veh-b", broker.port(), |_| {}).await;

    // Genuine grants, recorded by the attacker on their way.
    fetch_ok(&veh_a, DEADLINE).await;
    fetch_ok(&veh_b, DEADLINE).await;
    let mut old_a = None;
    let mut grant_b = None;
    while old_a.is_none() || grant_b.is_none() {
        let m = next(&mut seen).await;
        if m.topic == link_support::resp_topic("veh-a") {
            old_a = Some(m);
        } else if m.topic == link_support::resp_topic("veh-b") {
            grant_b = Some(m);
        }
    }
    let (old_a, grant_b) = (old_a.expect("seen"), grant_b.expect("seen"));
    cloud.stop().await;

    // veh-a asks again; the cloud is gone, the attacker answers with what
    // it recorded: veh-b's grant, veh-a's old grant under the new
    // correlation, and veh-a's old grant with its old correlation.
    let fetch = {
        let client = veh_a.clone();
        tokio::spawn(async move {
            client
                .fetch(params(), Duration::from_secs(4), &mut SystemRng)
                .await
        })
    };
    let request = loop {
        let m = next(&mut seen).await;
        if m.topic == link_support::req_topic("veh-a") && m.correlation != old_a.correlation {
            break m;
        }
    };
    let corr = request.correlation.clone().expect("correlation");
    let resp = link_support::resp_topic("veh-a");
    let late_before =
        veh_a.link().counters().late_responses + veh_a.link().counters().duplicate_responses;
    attacker
        .publish_confirmed(&resp, grant_b.payload.clone(), Some(corr.clone()))
        .await
        .expect("publish");
    attacker
        .publish_confirmed(&resp, old_a.payload.clone(), Some(corr))
        .await
        .expect("publish");
    attacker
        .publish_confirmed(&resp, old_a.payload.clone(), old_a.correlation.clone())
        .await
        .expect("publish");

    match fetch.await.expect("fetch task") {
        Err((FetchError::Timeout { refused, .. }, _)) => {
            assert_eq!(refused, 2, "both re-addressed grants refused")
        }
        other => panic!("re-addressed grants must be refused, got {other:?}"),
    }
    // The old grant under its old correlation never reached the exchange:
    // the link dropped it as an answer to a finished request.
    let c = veh_a.link().counters();
    assert_eq!(c.late_responses + c.duplicate_responses, late_before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_approval_granted() {
    let (_dir, pki) = pki_with(&["veh-b"]);
    let broker = EmbeddedBroker::start(&pki).expect("embedded broker");
    let cloud = Cloud::start(&pki, broker.port(), 1, |_| {}).await;
    let client = vehicle(&pki, "veh-b", broker.port(), |_| {}).await;
    let fetch = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .fetch(params(), Duration::from_secs(20), &mut SystemRng)
                .await
        })
    };
    // The owner's app learns the held request (from the OEM backend) and
    // approves it with the owner's key, over its own TLS identity.
    eventually("the cloud holds the request", || {
        !cloud.monitor.held_requests().is_empty()
    })
    .await;
    let (vehicle_id, request_id) = cloud.monitor.held_requests()[0].clone();
    let owner_files = pki.owner("veh-b");
    let owner_key = KeyPair::load(&owner_files.hpke_key).expect("owner key");
    let cloud_pk = PublicKey::load(&pki.cloud_hpke_pub).expect("cloud pk");
    let approval = OwnerApproval {
        vehicle_id,
        request_id,
        approve: true,
        time: bmsgw::time::unix_now(),
    };
    let sealed =
        bmsgw::sim::cloud::owner::seal_approval(&approval, &owner_key, &cloud_pk, &mut SystemRng)
            .expect("seal");
    let mut owner_cfg = link_support::vehicle(&pki, "veh-b", "127.0.0.1", broker.port());
    owner_cfg.client_id = "owner-veh-b".into();
    owner_cfg.tls.cert = owner_files.cert;
    owner_cfg.tls.key = owner_files.key;
    owner_cfg.subscriptions.clear();
    let (owner, _) = Link::start(owner_cfg).expect("owner link");
    connected(&owner).await;
    owner
        .publish_confirmed(&sealed.topic, sealed.payload, None)
        .await
        .expect("approval published");

    let (grant, report) = fetch
        .await
        .expect("fetch task")
        .unwrap_or_else(|(e, r)| panic!("{e} {r:?}"));
    assert!(
        report.pending_until.is_some(),
        "the vehicle saw PendingApproval first"
    );
    assert_eq!(grant.credential.charger_number, CHARGER);
    let stats = cloud.monitor.stats();
    assert_eq!((stats.pending, stats.granted), (1, 1));
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_approval_timing_out_is_a_denial() {
    let (_dir, pki) = pki_with(&["veh-b"]);
    let broker = EmbeddedBroker::start(&pki).expect("embedded broker");
    let cloud = Cloud::start(&pki, broker.port(), 1, |c| {
        c.settings.approval_deadline_s = 1
    })
    .await;
    let client = vehicle(&pki, "veh-b", broker.port(), |_| {}).await;
    match client
        .fetch(params(), Duration::from_secs(10), &mut SystemRng)
        .await
    {
        Err((FetchError::Denied { reason, .. }, report)) => {
            assert_eq!(reason, DenyReason::ApprovalTimeout);
            assert!(report.pending_until.is_some());
        }
        other => panic!("expected an approval-timeout denial, got {other:?}"),
    }
    assert_eq!(cloud.monitor.stats().denied, 1);
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_cloud_instances_share_the_load_and_answer_each_request_once() {
    let (_dir, pki) = pki_with(&[]);
    let broker = EmbeddedBroker::start(&pki).expect("embedded broker");
    let one = Cloud::start(&pki, broker.port(), 1, |_| {}).await;
    let two = Cloud::start(&pki, broker.port(), 2, |_| {}).await;
    let client = vehicle(&pki, "veh-a", broker.port(), |_| {}).await;
    const N: u64 = 20;
    for _ in 0..N {
        fetch_ok(&client, DEADLINE).await;
    }
    let (a, b) = (one.monitor.stats().granted, two.monitor.stats().granted);
    assert_eq!(a + b, N, "each request answered exactly once");
    assert!(a > 0 && b > 0, "both instances served requests ({a} + {b})");
    let c = client.link().counters();
    assert_eq!(
        (c.responses, c.duplicate_responses, c.late_responses),
        (N, 0, 0)
    );
    one.stop().await;
    two.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_mid_request_then_restarted_the_request_is_retried_and_answered() {
    let (_dir, pki) = pki_with(&[]);
    let Some(mut broker) = Mosquitto::start(&pki) else {
        return;
    };
    let port = broker.port();
    // Slow reconnects on the vehicle, so the cloud is back and subscribed
    // before the vehicle re-publishes its request.
    let client = vehicle(&pki, "veh-a", port, |c| {
        c.backoff_min = Duration::from_secs(3);
        c.backoff_max = Duration::from_secs(6);
    })
    .await;
    let states = record_states(client.link());
    let fetch = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .fetch(params(), Duration::from_secs(40), &mut SystemRng)
                .await
        })
    };
    // The request has reached the broker; nobody has answered it.
    eventually("the request was acknowledged", || {
        client.link().counters().pubacks >= 1
    })
    .await;
    broker.kill();
    broker.restart();
    let cloud = Cloud::start(&pki, port, 1, |_| {}).await;
    let (grant, _) = fetch
        .await
        .expect("fetch task")
        .unwrap_or_else(|(e, r)| panic!("{e} {r:?}\n{}", broker.log()));
    assert_eq!(grant.credential.charger_number, CHARGER);
    let seen = states.borrow().clone();
    assert!(
        seen.iter().any(|s| matches!(s, LinkState::Backoff { .. })),
        "went through backoff: {seen:?}"
    );
    assert_eq!(client.link().state(), LinkState::Connected);
    let c = client.link().counters();
    assert!(
        c.connects >= 2 && c.publishes >= 2,
        "reconnected and re-published: {c:?}"
    );

    // The broker delivers the answer once more: it is ignored.
    let (replayer, mut seen_resp) =
        intruder(&pki, port, &[link_support::resp_topic("veh-a")]).await;
    let before = client.link().counters();
    let second = tokio::spawn({
        let client = client.clone();
        async move { client.fetch(params(), DEADLINE, &mut SystemRng).await }
    });
    let answer = next(&mut seen_resp).await;
    second
        .await
        .expect("task")
        .unwrap_or_else(|(e, r)| panic!("{e} {r:?}"));
    replayer
        .publish_confirmed(
            &answer.topic,
            answer.payload.clone(),
            answer.correlation.clone(),
        )
        .await
        .expect("duplicate published");
    eventually("the duplicate was dropped", || {
        let c = client.link().counters();
        c.duplicate_responses + c.late_responses
            > before.duplicate_responses + before.late_responses
    })
    .await;
    assert_eq!(cloud.monitor.stats().granted, 2);
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_records_queued_while_the_broker_is_down_reach_the_cloud() {
    let (_dir, pki) = pki_with(&[]);
    let mut broker = EmbeddedBroker::start(&pki).expect("embedded broker");
    let cloud = Cloud::start(&pki, broker.port(), 1, |_| {}).await;
    // rumqttd keeps no sessions over a restart: the vehicle reconnects
    // slower than the cloud, so the cloud has re-subscribed before records
    // flow (a PUBACK means the broker has the message, not the cloud).
    let client = vehicle(&pki, "veh-a", broker.port(), |c| {
        c.backoff_min = Duration::from_secs(3);
        c.backoff_max = Duration::from_secs(6);
    })
    .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path().join("state.redb")).expect("store");
    let outbox = store.outbox(OutboxPolicy::default());
    let wake = Arc::new(Notify::new());

    broker.stop();
    let vehicle_id = VehicleId::parse("veh-a").expect("id");
    for n in 0..5u8 {
        let record = SessionRecord {
            record_id: [n; 16],
            vehicle_id: vehicle_id.clone(),
            charger_number: CHARGER,
            credential: UsedCredential {
                kind: CredentialKind::Voucher,
                ticket_id: [n; 12],
            },
            energy_wh: 1000 * u32::from(n),
            started_at: 1_760_000_000,
            stopped_at: 1_760_000_600,
            result: SessionResult::Completed,
            deviations: Default::default(),
        };
        enqueue_record(&outbox, &record, &wake)
            .await
            .expect("record committed");
    }
    let (stop, stopped) = oneshot::channel::<()>();
    let mut publisher = OutboxPublisher::new(outbox.clone(), client.clone(), wake.clone());
    let publishing = tokio::spawn(async move {
        publisher
            .run(async {
                let _ = stopped.await;
            })
            .await
    });
    assert_eq!(
        outbox.stats().expect("stats").records,
        5,
        "nothing leaves while the broker is down"
    );
    broker.restart().expect("broker back");
    let monitor = cloud.monitor.clone();
    eventually("the cloud has all five records", || {
        monitor.stats().records == 5
    })
    .await;
    eventually("the outbox is empty", || {
        outbox.stats().map(|s| s.records == 0).unwrap_or(false)
    })
    .await;
    let _ = stop.send(());
    let stats = publishing.await.expect("task").expect("publisher");
    assert_eq!(stats.published, 5);
    cloud.stop().await;
}

/// mosquitto acknowledges a publish nobody is subscribed to with "no
/// matching subscribers" and drops it: a record sent while the cloud is not
/// subscribed stays in the outbox and reaches the cloud once it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_nobody_is_subscribed_to_stays_queued_until_the_cloud_listens() {
    let (_dir, pki) = pki_with(&[]);
    let Some(broker) = Mosquitto::start(&pki) else {
        return;
    };
    let client = vehicle(&pki, "veh-a", broker.port(), |_| {}).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path().join("state.redb")).expect("store");
    let outbox = store.outbox(OutboxPolicy::default());
    let wake = Arc::new(Notify::new());
    let record = SessionRecord {
        record_id: [7; 16],
        vehicle_id: VehicleId::parse("veh-a").expect("id"),
        charger_number: CHARGER,
        credential: UsedCredential {
            kind: CredentialKind::Voucher,
            ticket_id: [7; 12],
        },
        energy_wh: 1234,
        started_at: 1_760_000_000,
        stopped_at: 1_760_000_600,
        result: SessionResult::Completed,
        deviations: Default::default(),
    };
    enqueue_record(&outbox, &record, &wake)
        .await
        .expect("record committed");
    let (stop, stopped) = oneshot::channel::<()>();
    let mut publisher = OutboxPublisher::new(outbox.clone(), client.clone(), wake.clone());
    let publishing = tokio::spawn(async move {
        let stats = publisher
            .run(async {
                let _ = stopped.await;
            })
            .await;
        (stats, publisher.stats())
    });
    // The broker takes the publish with no subscriber: the record stays.
    eventually("the broker's \"no matching subscribers\" PUBACK", || {
        broker.log().contains("rc16")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(outbox.stats().expect("stats").records, 1, "record dropped");

    let cloud = Cloud::start(&pki, broker.port(), 1, |_| {}).await;
    let monitor = cloud.monitor.clone();
    eventually("the cloud has the record", || monitor.stats().records == 1).await;
    eventually("the outbox is empty", || {
        outbox.stats().map(|s| s.records == 0).unwrap_or(false)
    })
    .await;
    let _ = stop.send(());
    let (run, stats) = publishing.await.expect("task");
    run.expect("publisher");
    assert_eq!(
        (stats.published, stats.unheard >= 1),
        (1, true),
        "{stats:?}"
    );
    cloud.stop().await;
}
