//! Fault suite (issue 6, deliverable 3): the broker is down at the moment
//! of the request, while the gateway still believes its link is up.
//!
//! The daemon (`run_on`, bridge mode, in-process 250 kbit/s buses) reaches
//! the embedded MQTT broker through a TCP relay in this test; the reference
//! cloud service is connected to the broker directly. A first session is
//! served online through the relay. Then the relay goes silent without
//! closing anything, as a broker that hangs or a network that drops every
//! packet would: the link has no reason to think it is down, so the next
//! request is sent and waits. The gateway must fall back to a voucher
//! within `cloud.request_timeout` plus the handshake, in time for the BMS
//! (which waits 5 s for CRM(0xAA)), and the session must complete.
//! Real clock: the link's timers are real.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::fault_support::{Ledger, Rig, no_faults};
use bmsgw::cloud::messages::CredentialKind;
use bmsgw::gateway::orchestrator::Notice;
use bmsgw::sim::bms::BmsSimOptions;
use bmsgw::sim::broker::EmbeddedBroker;
use bmsgw::sim::cloud::CloudConfig;
use bmsgw::sim::cloud::run::{CloudMonitor, run as run_cloud};
use bmsgw::sim::pile;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A TCP relay to `target` that can go silent: while `silent` is set it
/// keeps every connection open and forwards nothing.
async fn relay(listener: TcpListener, target: u16, silent: Arc<AtomicBool>) {
    while let Ok((inbound, _)) = listener.accept().await {
        let Ok(outbound) = TcpStream::connect(("127.0.0.1", target)).await else {
            continue;
        };
        let (ri, wi) = inbound.into_split();
        let (ro, wo) = outbound.into_split();
        tokio::spawn(pump(ri, wo, silent.clone()));
        tokio::spawn(pump(ro, wi, silent.clone()));
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    silent: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while silent.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

fn bms_opts() -> BmsSimOptions {
    BmsSimOptions {
        soc_start: 50.0,
        soc_end: 51.0,
        current: 150.0,
        duration: Duration::from_secs(1),
        ..BmsSimOptions::default()
    }
}

/// One session with the simulators; returns the gateway's notices of it:
/// (credential kind, request to CRM(0xAA), how it ended).
async fn session(rig: &mut Rig) -> (Option<CredentialKind>, Option<Duration>, Option<String>) {
    let (mut b, mut p) = (rig.bms.node(), rig.pile.node());
    let pile_opts = rig.pile_options();
    let never = std::future::pending::<()>;
    let (rb, rp) = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(
            bmsgw::sim::bms::run(&mut b, bms_opts(), never()),
            pile::run(&mut p, pile_opts, never()),
        )
    })
    .await
    .expect("the session hung");
    assert!(rb.is_ok() && rp.is_ok(), "bms {rb:?}, pile {rp:?}");
    let (mut kind, mut recognized, mut ended) = (None, None, None);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while ended.is_none() {
        match tokio::time::timeout_at(deadline, rig.notices.recv()).await {
            Ok(Some((_, Notice::Credential { kind: k, .. }))) => kind = Some(k),
            Ok(Some((_, Notice::Recognized { since_request }))) => recognized = since_request,
            Ok(Some((_, Notice::SessionEnded { result, .. }))) => ended = Some(result),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    (kind, recognized, ended)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_silent_at_the_request_falls_back_to_a_voucher_within_the_request_timeout() {
    let front = TcpListener::bind("127.0.0.1:0").await.expect("relay port");
    let front_port = front.local_addr().expect("address").port();
    let mut rig = Rig::new(Some(front_port));
    let request_timeout = rig.config.cloud.request_timeout;
    // Long enough that the link cannot notice the silence by itself before
    // the request times out.
    rig.config.cloud.keep_alive = Duration::from_secs(30);
    rig.add_vouchers(2);

    let mut broker = EmbeddedBroker::start(&rig.pki).expect("embedded broker");
    let silent = Arc::new(AtomicBool::new(false));
    let relay_task = tokio::spawn(relay(front, broker.port(), silent.clone()));

    let mut cloud_config = CloudConfig::load(&rig.pki.cloud_toml).expect("cloud config");
    cloud_config.broker.port = broker.port();
    let monitor = CloudMonitor::default();
    let (stop_cloud, cloud_stopped) = tokio::sync::oneshot::channel::<()>();
    let m = monitor.clone();
    let cloud = tokio::spawn(async move {
        run_cloud(&cloud_config, m, async {
            let _ = cloud_stopped.await;
        })
        .await
    });
    assert!(
        monitor.connected(Duration::from_secs(20)).await,
        "the cloud service did not connect"
    );

    rig.start_daemon(no_faults());
    // Online first, through the relay: the link is up and trusted.
    let mut first = (None, None, None);
    for _ in 0..3 {
        first = session(&mut rig).await;
        if first.0 == Some(CredentialKind::Online) {
            break;
        }
        // The link may still be connecting for the very first session.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(
        first.0,
        Some(CredentialKind::Online),
        "first session: {first:?}"
    );
    assert_eq!(
        first.2.as_deref(),
        Some("completed"),
        "first session: {first:?}"
    );

    // The broker goes silent; nothing is closed.
    silent.store(true, Ordering::SeqCst);
    let (kind, recognized, ended) = session(&mut rig).await;
    assert_eq!(
        kind,
        Some(CredentialKind::Voucher),
        "fell back to a voucher"
    );
    assert_eq!(ended.as_deref(), Some("completed"));
    let took = recognized.expect("CRM(0xAA) after the request");
    eprintln!(
        "broker silent: CRM(0xAA) {took:?} after the request (request timeout {request_timeout:?})"
    );
    // It did wait for the cloud (the link thought it was up) ...
    assert!(
        took >= request_timeout,
        "recognised after {took:?}, before the {request_timeout:?} request timeout: the link knew"
    );
    // ... and no longer than the timeout plus one handshake (the handshake
    // takes about 40 ms of bus time; 1.5 s leaves room for a loaded host).
    assert!(
        took <= request_timeout + Duration::from_millis(1500),
        "recognised after {took:?}; request timeout {request_timeout:?}"
    );

    rig.stop_daemon().await.expect("a clean stop");
    let ledger = rig.ledger();
    let spent = Ledger::voucher_tickets(&ledger.records);
    assert_eq!(
        spent.len(),
        1,
        "the voucher session's record is queued: {ledger:?}"
    );
    assert!(rig.issued.contains(&spent[0]), "{ledger:?}");

    let _ = stop_cloud.send(());
    let _ = cloud.await;
    relay_task.abort();
    broker.stop();
}
