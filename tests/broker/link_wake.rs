//! Waking up (issue 16, deliverable 6) against the embedded rumqttd: a
//! request checks a quiet connection at once instead of trusting it until
//! keepalive; a connection that went dead without a FIN (the broker's FIN
//! lost while the car slept) is made again within the check's timeout; a
//! request cuts a reconnect delay short. A TCP relay between the link and
//! the broker plays the dead path: it keeps the socket open and forwards
//! nothing.

use crate::link_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bmsgw::cloud::link::{Link, LinkState};
use bmsgw::sim::broker::EmbeddedBroker;
use link_support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Forwards 127.0.0.1:<port> to the broker; while `dead` is set, it
/// forwards nothing in either direction and closes nothing.
struct Relay {
    port: u16,
    dead: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(to: (String, u16)) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let dead = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let dead = dead.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = TcpStream::connect((to.0.as_str(), to.1)).await else {
                        continue;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::spawn(pump(cr, sw, dead.clone()));
                    tokio::spawn(pump(sr, cw, dead.clone()));
                }
            }
        });
        Relay { port, dead, task }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    dead: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if dead.load(Ordering::SeqCst) {
            // A dead path: swallow, and keep both sockets open for ever.
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

async fn ask(veh: &Link, n: u8) -> Vec<u8> {
    veh.request(
        &req_topic("veh-a"),
        &resp_topic("veh-a"),
        correlation(n),
        vec![n],
        DEADLINE,
    )
    .await
    .expect("an answer")
    .payload
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_on_a_quiet_link_checks_it_and_a_dead_one_is_made_again_at_once() {
    let (_dir, pki) = pki();
    let b = EmbeddedBroker::start(&pki).expect("embedded broker");
    let (cloud, cloud_rx) = Link::start(cloud(&pki, 1, b.host(), b.port())).unwrap();
    let _responder = echo_responder(cloud.clone(), cloud_rx);
    let relay = Relay::start((b.host().to_owned(), b.port())).await;
    let mut config = vehicle(&pki, "veh-a", "127.0.0.1", relay.port);
    // Keepalive alone would find the dead path only after a minute.
    config.keep_alive = Duration::from_secs(60);
    config.wake_check_timeout = Duration::from_millis(300);
    let (veh, _veh_rx) = Link::start(config).unwrap();
    connected(&cloud).await;
    connected(&veh).await;

    // Quiet for longer than a request trusts: the request is checked too,
    // and the connection, alive, stays.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(ask(&veh, 1).await, b"re:\x01");
    let c = veh.counters();
    assert_eq!(
        (c.wake_checks, c.wake_reconnects, c.connects),
        (1, 0, 1),
        "{c:?}"
    );

    // The path dies without a FIN. The next request's check gets no
    // answer, so the link connects again (through the relay, alive again
    // for new connections) long before keepalive would have noticed.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    relay.dead.store(true, Ordering::SeqCst);
    let revive = {
        let dead = relay.dead.clone();
        let veh = veh.clone();
        tokio::spawn(async move {
            // New connections go through once the old one is given up.
            let mut rx = veh.state_watch();
            let _ = rx.wait_for(|s| *s != LinkState::Connected).await;
            dead.store(false, Ordering::SeqCst);
        })
    };
    let t0 = tokio::time::Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(20), ask(&veh, 2))
        .await
        .expect("answered long before keepalive (60 s) would find the dead path");
    assert_eq!(answer, b"re:\x02");
    revive.await.unwrap();
    let c = veh.counters();
    assert_eq!((c.wake_checks, c.wake_reconnects), (2, 1), "{c:?}");
    assert_eq!(c.connects, 2, "{c:?}");
    eprintln!("dead path: answered {:?} after the request", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_cuts_the_reconnect_delay_short() {
    let (_dir, pki) = pki();
    let mut b = EmbeddedBroker::start(&pki).expect("embedded broker");
    let mut cloud_config = cloud(&pki, 1, b.host(), b.port());
    cloud_config.backoff_min = Duration::from_millis(10);
    cloud_config.backoff_max = Duration::from_millis(40);
    let (cloud, cloud_rx) = Link::start(cloud_config).unwrap();
    let _responder = echo_responder(cloud.clone(), cloud_rx);
    let mut config = vehicle(&pki, "veh-a", b.host(), b.port());
    // Long enough that waiting it out would fail the test below.
    config.backoff_min = Duration::from_secs(40);
    config.backoff_max = Duration::from_secs(60);
    let (veh, _veh_rx) = Link::start(config).unwrap();
    connected(&cloud).await;
    connected(&veh).await;

    // The broker goes, with no request waiting: the link backs off for
    // 40 s or more. It comes back at once.
    tokio::task::block_in_place(|| b.stop());
    wait_state(&veh, "Backoff", |s| matches!(s, LinkState::Backoff { .. })).await;
    let LinkState::Backoff { delay, .. } = veh.state() else {
        panic!("not in Backoff: {:?}", veh.state());
    };
    assert!(delay >= Duration::from_secs(20), "{delay:?}");
    tokio::task::block_in_place(|| b.restart()).unwrap();
    connected(&cloud).await;

    // A charge request does not wait out the delay.
    let answer = tokio::time::timeout(Duration::from_secs(15), ask(&veh, 3))
        .await
        .expect("answered long before the 40 s delay would end");
    assert_eq!(answer, b"re:\x03");
    let c = veh.counters();
    assert!(c.wake_reconnects >= 1, "{c:?}");
}
