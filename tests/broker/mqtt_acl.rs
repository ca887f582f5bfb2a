//! mosquitto as shipped (`config/mosquitto/mosquitto.conf`), with the dev
//! PKI's dynamic-security file, confines each vehicle and owner app to its
//! own topics, over mutual TLS 1.3 only: a SUBSCRIBE outside them is refused
//! at SUBACK, a publish outside them is refused in its PUBACK and dropped,
//! and a certificate can only ever be its own CN's client (no takeover of
//! another vehicle's or the cloud's client id).
//!
//! "Not delivered" is shown without waiting for a silence: after the
//! forbidden message, the same sender sends an allowed marker that the same
//! receiver is subscribed to; mosquitto handles one client's publishes in
//! order, so had the forbidden one been delivered, it would have arrived
//! first.
//!
//! Skipped, with a printed notice, when mosquitto is not installed.

use crate::support;

use std::process::{Command, Stdio};
use std::sync::Arc;

use bmsgw::sim::pki::{DevPki, DevPkiOptions};
use rumqttc::v5::mqttbytes::v5::{PubAckReason, PublishProperties, SubscribeReasonCode};
use support::mosquitto::Mosquitto;
use support::mqtt::{RawClient, topic};

const CLOUD_SHARE: &str = "$share/bmsgw-cloud-req/bmsgw/v1/+/identity/req";

struct Setup {
    _tmp: tempfile::TempDir,
    pki: DevPki,
    broker: Mosquitto,
}

fn setup() -> Option<Setup> {
    let tmp = tempfile::tempdir().unwrap();
    let pki = DevPki::generate(&DevPkiOptions::new(tmp.path().join("pki"))).unwrap();
    let broker = Mosquitto::start(&pki)?;
    Some(Setup {
        _tmp: tmp,
        pki,
        broker,
    })
}

impl Setup {
    fn tls(&self, cert: &std::path::Path, key: &std::path::Path) -> Arc<rustls::ClientConfig> {
        self.pki.tls_client_config(cert, key).unwrap()
    }

    /// Cloud instance `n` (its own certificate, CN `bmsgw-cloud-{n}`).
    async fn cloud(&self, n: u32) -> RawClient {
        let c = self.pki.cloud_instance(n);
        let tls = self.tls(&c.cert, &c.key);
        self.connect(&c.identity, tls).await
    }

    /// Vehicle `cert_of`'s certificate, asking for client id `client_id`.
    async fn impostor(&self, cert_of: &str, client_id: &str) -> RawClient {
        let f = self.pki.vehicle(cert_of);
        let tls = self.tls(&f.cert, &f.key);
        self.connect(client_id, tls).await
    }

    async fn vehicle(&self, id: &str) -> RawClient {
        let f = self.pki.vehicle(id);
        let tls = self.tls(&f.cert, &f.key);
        self.connect(id, tls).await
    }

    async fn owner(&self, id: &str) -> RawClient {
        let f = self.pki.owner(id);
        let tls = self.tls(&f.cert, &f.key);
        self.connect(&format!("owner-{id}"), tls).await
    }

    async fn connect(&self, client_id: &str, tls: Arc<rustls::ClientConfig>) -> RawClient {
        match RawClient::connect(self.broker.host(), self.broker.port(), client_id, tls).await {
            Ok(c) => c,
            Err(e) => panic!("{client_id} cannot connect: {e:?}\n{}", self.broker.log()),
        }
    }
}

#[tokio::test]
async fn a_vehicle_cannot_read_another_vehicles_responses() {
    let Some(s) = setup() else { return };
    let mut cloud = s.cloud(1).await;
    let mut a = s.vehicle("veh-a").await;
    let mut b = s.vehicle("veh-b").await;

    // A subscribes to B's responses three ways: each refused at SUBACK.
    for filter in [
        "bmsgw/v1/veh-b/identity/resp",
        "bmsgw/v1/+/identity/resp",
        "bmsgw/v1/#",
        "#",
    ] {
        let codes = a.subscribe(filter).await;
        assert_eq!(
            codes,
            [SubscribeReasonCode::NotAuthorized],
            "{filter}\n{}",
            s.broker.log()
        );
    }
    a.subscribe_ok("bmsgw/v1/veh-a/identity/resp").await;
    b.subscribe_ok("bmsgw/v1/veh-b/identity/resp").await;
    b.subscribe_ok("bmsgw/v1/veh-b/vouchers").await;

    let props = PublishProperties {
        correlation_data: Some(vec![7u8; 16].into()),
        ..Default::default()
    };
    let ack = cloud
        .publish("bmsgw/v1/veh-b/identity/resp", b"grant for B", Some(props))
        .await;
    assert_eq!(ack.reason, PubAckReason::Success);
    cloud
        .publish("bmsgw/v1/veh-b/vouchers", b"vouchers for B", None)
        .await;
    cloud
        .publish("bmsgw/v1/veh-a/identity/resp", b"marker for A", None)
        .await;

    // B gets its own messages, with the correlation data.
    let got = b.next_publish().await;
    assert_eq!(topic(&got), "bmsgw/v1/veh-b/identity/resp");
    assert_eq!(&got.payload[..], b"grant for B");
    let corr = got.properties.and_then(|p| p.correlation_data);
    assert_eq!(corr.as_deref(), Some(&[7u8; 16][..]));
    assert_eq!(&b.next_publish().await.payload[..], b"vouchers for B");

    // A's first delivery is its own marker: nothing of B's came before it.
    let got = a.next_publish().await;
    assert_eq!(
        (topic(&got).as_str(), &got.payload[..]),
        ("bmsgw/v1/veh-a/identity/resp", &b"marker for A"[..]),
        "vehicle A received another vehicle's message\n{}",
        s.broker.log()
    );
}

#[tokio::test]
async fn a_vehicle_cannot_publish_as_another_vehicle() {
    let Some(s) = setup() else { return };
    let mut cloud = s.cloud(1).await;
    // The cloud's shared subscription, and one that sees every approval.
    cloud.subscribe_ok(CLOUD_SHARE).await;
    cloud.subscribe_ok("bmsgw/v1/+/approval").await;
    cloud.subscribe_ok("bmsgw/v1/+/events").await;
    let mut a = s.vehicle("veh-a").await;

    // As B: a request, an event; and A approving its own request (only the
    // owner app may).
    for forbidden in [
        "bmsgw/v1/veh-b/identity/req",
        "bmsgw/v1/veh-b/events",
        "bmsgw/v1/veh-a/approval",
    ] {
        let ack = a.publish(forbidden, b"forged", None).await;
        // mosquitto 2.0 drops a denied publish and says so in the v5
        // PUBACK; the marker below shows it was really dropped.
        assert_eq!(ack.reason, PubAckReason::NotAuthorized, "{forbidden}");
    }
    let ack = a
        .publish("bmsgw/v1/veh-a/identity/req", b"marker", None)
        .await;
    assert_eq!(ack.reason, PubAckReason::Success);

    let got = cloud.next_publish().await;
    assert_eq!(
        (topic(&got).as_str(), &got.payload[..]),
        ("bmsgw/v1/veh-a/identity/req", &b"marker"[..]),
        "a forged publish reached the cloud\n{}",
        s.broker.log()
    );

    // A's own events do get through.
    a.publish("bmsgw/v1/veh-a/events", b"session record", None)
        .await;
    let got = cloud.next_publish().await;
    assert_eq!(topic(&got), "bmsgw/v1/veh-a/events");
}

#[tokio::test]
async fn an_owner_approves_only_their_own_vehicle() {
    let Some(s) = setup() else { return };
    let mut cloud = s.cloud(1).await;
    cloud.subscribe_ok("bmsgw/v1/#").await;
    let mut owner_a = s.owner("veh-a").await;

    for forbidden in [
        "bmsgw/v1/veh-b/approval",
        "bmsgw/v1/veh-a/identity/req",
        "bmsgw/v1/veh-a/identity/resp",
    ] {
        let ack = owner_a.publish(forbidden, b"forged", None).await;
        assert_eq!(ack.reason, PubAckReason::NotAuthorized, "{forbidden}");
    }
    owner_a
        .publish("bmsgw/v1/veh-a/approval", b"approve", None)
        .await;

    let got = cloud.next_publish().await;
    assert_eq!(
        (topic(&got).as_str(), &got.payload[..]),
        ("bmsgw/v1/veh-a/approval", &b"approve"[..]),
        "an owner app published outside its vehicle's approval topic\n{}",
        s.broker.log()
    );
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let Some(s) = setup() else { return };
    // Another CA, even one with the same name as ours.
    let other_tmp = tempfile::tempdir().unwrap();
    let other = DevPki::generate(&DevPkiOptions::new(other_tmp.path())).unwrap();
    let forged = other.vehicle("veh-a");
    let tls = bmsgw::sim::pki::tls_client_config(
        &s.pki.ca_cert,
        &forged.cert,
        &forged.key,
        &[&rustls::version::TLS13],
    )
    .unwrap();
    let refused = RawClient::connect(s.broker.host(), s.broker.port(), "veh-a", tls).await;
    assert!(refused.is_err(), "a foreign certificate was accepted");

    // The same identity from our own CA connects.
    s.vehicle("veh-a").await;
}

#[tokio::test]
async fn a_tls12_only_client_is_refused() {
    let Some(s) = setup() else { return };
    // Our rustls is built without TLS 1.2, so an independent TLS stack plays
    // the old client: openssl s_client, offering only TLS 1.2.
    let handshake = |version: &str| {
        let v = s.pki.vehicle("veh-a");
        Command::new("openssl")
            .arg("s_client")
            .arg("-connect")
            .arg(format!("{}:{}", s.broker.host(), s.broker.port()))
            .arg(version)
            .arg("-CAfile")
            .arg(&s.pki.ca_cert)
            .arg("-cert")
            .arg(&v.cert)
            .arg("-key")
            .arg(&v.key)
            .stdin(Stdio::null())
            .output()
    };
    let tls12 = match handshake("-tls1_2") {
        Ok(out) => out,
        Err(e) => {
            support::notice(&format!(
                "SKIPPED: openssl not runnable ({e}; apt-get install openssl) — {}",
                support::test_name()
            ));
            return;
        }
    };
    let text = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    assert!(
        !tls12.status.success(),
        "TLS 1.2 handshake succeeded:\n{}",
        text(&tls12)
    );
    assert!(
        text(&tls12).contains("Cipher is (NONE)"),
        "no TLS 1.2 session expected:\n{}",
        text(&tls12)
    );
    // The same client with TLS 1.3 completes its handshake.
    let tls13 = handshake("-tls1_3").unwrap();
    assert!(
        tls13.status.success() && text(&tls13).contains("TLSv1.3"),
        "TLS 1.3 handshake failed:\n{}\n{}",
        text(&tls13),
        s.broker.log()
    );
}

#[tokio::test]
async fn the_harness_restarts_a_killed_broker_on_the_same_port() {
    let Some(mut s) = setup() else { return };
    let port = s.broker.port();
    let mut a = s.vehicle("veh-a").await;
    s.broker.kill();
    assert!(!s.broker.is_running());
    a.closed().await;
    s.broker.restart();
    assert_eq!(s.broker.port(), port);
    let mut cloud = s.cloud(1).await;
    cloud.subscribe_ok(CLOUD_SHARE).await;
    let mut a = s.vehicle("veh-a").await;
    a.publish("bmsgw/v1/veh-a/identity/req", b"after restart", None)
        .await;
    assert_eq!(&cloud.next_publish().await.payload[..], b"after restart");
}

/// Take-over: veh-a's certificate asks for veh-b's client id, then for a
/// cloud instance's. The broker takes the certificate's CN as the client id
/// (`use_username_as_clientid`), so the newcomer is veh-a: the real veh-b
/// and the real cloud stay connected and keep getting their messages, and
/// the impostor has none of their rights. (With the id taken from the
/// client, mosquitto closes the older connection: the victim is knocked off
/// and its session wiped.)
#[tokio::test]
async fn a_certificate_cannot_take_over_another_client_id() {
    let Some(s) = setup() else { return };
    let mut cloud = s.cloud(1).await;
    cloud.subscribe_ok(CLOUD_SHARE).await;
    let mut b = s.vehicle("veh-b").await;
    b.subscribe_ok("bmsgw/v1/veh-b/vouchers").await;

    // veh-a's certificate as veh-b, then as cloud instance 1.
    let mut as_b = s.impostor("veh-a", "veh-b").await;
    still_connected(&s, &mut cloud, &mut b).await;
    let ack = as_b
        .publish("bmsgw/v1/veh-b/identity/req", b"forged", None)
        .await;
    assert_eq!(ack.reason, PubAckReason::NotAuthorized);

    let mut as_cloud = s.impostor("veh-a", "bmsgw-cloud-1").await;
    still_connected(&s, &mut cloud, &mut b).await;
    assert_eq!(
        as_cloud.subscribe(CLOUD_SHARE).await,
        [SubscribeReasonCode::NotAuthorized]
    );
    let ack = as_cloud
        .publish("bmsgw/v1/veh-b/vouchers", b"forged push", None)
        .await;
    assert_eq!(ack.reason, PubAckReason::NotAuthorized);
    // Both impostors were veh-a: the second took over the first, which is
    // all a certificate can take over (its own CN's session).
    as_b.closed().await;
    let log = s.broker.log();
    assert!(
        !log.contains("Client veh-b already connected")
            && !log.contains("Client bmsgw-cloud-1 already connected"),
        "an impostor took over a client id:\n{log}"
    );
}

/// `b` and `cloud` are both still connected: a push reaches `b`, and a
/// request of `b` reaches `cloud`.
async fn still_connected(s: &Setup, cloud: &mut RawClient, b: &mut RawClient) {
    cloud
        .publish("bmsgw/v1/veh-b/vouchers", b"still there", None)
        .await;
    let got = b.next_publish().await;
    assert_eq!(
        &got.payload[..],
        b"still there",
        "veh-b lost its connection\n{}",
        s.broker.log()
    );
    let ack = b
        .publish("bmsgw/v1/veh-b/identity/req", b"request", None)
        .await;
    assert_eq!(ack.reason, PubAckReason::Success);
    assert_eq!(&cloud.next_publish().await.payload[..], b"request");
}

/// A vehicle cannot join the cloud's shared subscription (it would get a
/// share of every vehicle's requests and drop them, while their senders
/// get PUBACK 0x00) nor form a share group on its own topics: refused at
/// SUBACK, and every request reaches the cloud.
#[tokio::test]
async fn a_vehicle_cannot_join_the_clouds_shared_subscription() {
    let Some(s) = setup() else { return };
    let mut cloud = s.cloud(1).await;
    cloud.subscribe_ok(CLOUD_SHARE).await;
    let mut a = s.vehicle("veh-a").await;
    for filter in [
        CLOUD_SHARE,
        "$share/bmsgw-cloud-events/bmsgw/v1/+/events",
        "$share/mine/bmsgw/v1/veh-a/vouchers",
    ] {
        assert_eq!(
            a.subscribe(filter).await,
            [SubscribeReasonCode::NotAuthorized],
            "{filter}\n{}",
            s.broker.log()
        );
    }
    let mut b = s.vehicle("veh-b").await;
    for i in 0..4u8 {
        b.publish("bmsgw/v1/veh-b/identity/req", &[i], None).await;
    }
    for i in 0..4u8 {
        assert_eq!(&cloud.next_publish().await.payload[..], &[i]);
    }
}

/// Two cloud instances, each with its own certificate, share the request
/// group and both stay connected; each gets every approval (not shared).
#[tokio::test]
async fn two_cloud_instances_share_the_requests_and_both_stay() {
    let Some(s) = setup() else { return };
    let mut one = s.cloud(1).await;
    let mut two = s.cloud(2).await;
    for c in [&mut one, &mut two] {
        c.subscribe_ok(CLOUD_SHARE).await;
        c.subscribe_ok("bmsgw/v1/+/approval").await;
    }
    let mut b = s.vehicle("veh-b").await;
    for i in 0..4u8 {
        b.publish("bmsgw/v1/veh-b/identity/req", &[i], None).await;
    }
    let mut owner = s.owner("veh-b").await;
    owner
        .publish("bmsgw/v1/veh-b/approval", b"approve", None)
        .await;
    // Each instance: its share of the requests, then the approval.
    let mut requests = Vec::new();
    for c in [&mut one, &mut two] {
        loop {
            let got = c.next_publish().await;
            if topic(&got) == "bmsgw/v1/veh-b/approval" {
                break;
            }
            requests.push(got.payload[0]);
        }
    }
    requests.sort_unstable();
    assert_eq!(requests, [0, 1, 2, 3], "{}", s.broker.log());
}
