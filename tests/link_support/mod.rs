//! Helpers shared by the link tests (`tests/link_*.rs`): a dev PKI, link
//! configurations for a vehicle and the cloud, a responder, and waits on
//! link state with a deadline.
#![allow(dead_code)]

use std::time::Duration;

use bmsgw::cloud::link::{Incoming, Link, LinkConfig, LinkState, QoS};
use bmsgw::cloud::tls::TlsFiles;
use bmsgw::sim::pki::{DevPki, DevPkiOptions};
use tokio::sync::{mpsc, watch};

/// How long any single wait in these tests may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub fn pki() -> (tempfile::TempDir, DevPki) {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = DevPki::generate(&DevPkiOptions::new(dir.path().join("pki"))).expect("dev PKI");
    (dir, pki)
}

pub fn req_topic(id: &str) -> String {
    format!("bmsgw/v1/{id}/identity/req")
}

pub fn resp_topic(id: &str) -> String {
    format!("bmsgw/v1/{id}/identity/resp")
}

pub fn vouchers_topic(id: &str) -> String {
    format!("bmsgw/v1/{id}/vouchers")
}

pub fn events_topic(id: &str) -> String {
    format!("bmsgw/v1/{id}/events")
}

fn base(host: &str, port: u16, client_id: &str, tls: TlsFiles) -> LinkConfig {
    let mut c = LinkConfig::new(host, port, client_id, tls);
    c.keep_alive = Duration::from_secs(5);
    c.backoff_min = Duration::from_millis(50);
    c.backoff_max = Duration::from_millis(400);
    c
}

/// Vehicle `id`: subscribed to its answers and its vouchers.
pub fn vehicle(pki: &DevPki, id: &str, host: &str, port: u16) -> LinkConfig {
    let files = pki.vehicle(id);
    let mut c = base(
        host,
        port,
        id,
        TlsFiles {
            ca: pki.ca_cert.clone(),
            cert: files.cert,
            key: files.key,
        },
    );
    c.subscriptions = vec![
        (resp_topic(id), QoS::AtLeastOnce),
        (vouchers_topic(id), QoS::AtLeastOnce),
    ];
    c
}

/// Cloud instance `n` (its certificate; the client id is its CN): every
/// vehicle's requests and events.
pub fn cloud(pki: &DevPki, n: u32, host: &str, port: u16) -> LinkConfig {
    let files = pki.cloud_instance(n);
    let mut c = base(
        host,
        port,
        &files.identity,
        TlsFiles {
            ca: pki.ca_cert.clone(),
            cert: files.cert,
            key: files.key,
        },
    );
    c.subscriptions = vec![
        ("bmsgw/v1/+/identity/req".into(), QoS::AtLeastOnce),
        ("bmsgw/v1/+/events".into(), QoS::AtLeastOnce),
    ];
    c
}

/// Wait until the link's state satisfies `f`, or fail the test.
pub async fn wait_state(link: &Link, what: &str, f: impl Fn(&LinkState) -> bool) {
    let mut rx = link.state_watch();
    let r = tokio::time::timeout(DEADLINE, rx.wait_for(|s| f(s))).await;
    assert!(
        matches!(r, Ok(Ok(_))),
        "link never became {what}; now {:?}",
        link.state()
    );
}

pub async fn connected(link: &Link) {
    wait_state(link, "Connected", |s| *s == LinkState::Connected).await;
}

/// Receive the next message, or fail the test.
pub async fn next(rx: &mut mpsc::Receiver<Incoming>) -> Incoming {
    tokio::time::timeout(DEADLINE, rx.recv())
        .await
        .expect("a message within the deadline")
        .expect("the link is running")
}

/// A cloud that answers each request with `b"re:" + payload`.
pub fn echo_responder(link: Link, mut rx: mpsc::Receiver<Incoming>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            if msg.response_topic.is_some() {
                let mut answer = b"re:".to_vec();
                answer.extend_from_slice(&msg.payload);
                if let Err(e) = link.reply(&msg, answer).await {
                    eprintln!("responder: {e}");
                }
            }
        }
    })
}

/// Every state the link goes through from now on (a watch shows the latest
/// value; each state here lasts long enough to be seen: Backoff at least
/// `backoff_min`).
pub fn record_states(link: &Link) -> watch::Receiver<Vec<LinkState>> {
    let mut rx = link.state_watch();
    let (tx, out) = watch::channel(vec![*rx.borrow_and_update()]);
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let s = *rx.borrow_and_update();
            tx.send_modify(|v| v.push(s));
            if s == LinkState::Stopped {
                break;
            }
        }
    });
    out
}

pub fn correlation(n: u8) -> Vec<u8> {
    let mut c = [0u8; 16];
    c[0] = 0xC0;
    c[15] = n;
    c.to_vec()
}

/// Wait until `cond` holds (checked every 10 ms), or fail the test.
pub async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
