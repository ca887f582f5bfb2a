//! The cloud link against a real mosquitto (TLS 1.3 only, mutual TLS, CN
//! as user name and client id, the dev PKI's dynamic-security ACLs),
//! started by `tests/support`: request and response, the broker killed in
//! the middle of a request and restarted, a graceful restart that keeps the
//! sessions, and the ACL's refusal reaching the caller. Without mosquitto each test prints a SKIPPED notice and
//! returns.

use crate::link_support;
use crate::support;

use bmsgw::cloud::link::{Incoming, Link, LinkError, LinkState, PubAckReason};
use link_support::*;
use std::time::Duration;
use support::mosquitto::Mosquitto;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_response_through_mosquitto() {
    let (_dir, pki) = pki();
    let Some(b) = Mosquitto::start(&pki) else {
        return;
    };
    let (cloud, cloud_rx) = Link::start(cloud(&pki, 1, b.host(), b.port())).unwrap();
    let _responder = echo_responder(cloud.clone(), cloud_rx);
    let (veh, _veh_rx) = Link::start(vehicle(&pki, "veh-a", b.host(), b.port())).unwrap();
    connected(&cloud).await;
    connected(&veh).await;

    for n in 1..=10u8 {
        let answer = veh
            .request(
                &req_topic("veh-a"),
                &resp_topic("veh-a"),
                correlation(n),
                vec![n; 32],
                DEADLINE,
            )
            .await
            .unwrap_or_else(|e| panic!("request {n}: {e}\n{}", b.log()));
        assert_eq!(answer.correlation, Some(correlation(n)));
        assert_eq!(&answer.payload[3..], &[n; 32][..]);
    }
    let c = veh.counters();
    assert_eq!((c.requests, c.responses, c.connects), (10, 10, 1));
    assert_eq!(cloud.counters().incoming, 10);
    veh.shutdown().await;
    cloud.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_killed_in_the_middle_of_a_request() {
    let (_dir, pki) = pki();
    let Some(mut b) = Mosquitto::start(&pki) else {
        return;
    };
    // The cloud reconnects quickly; the vehicle waits at least 2 s, so the
    // cloud has subscribed again before the vehicle re-publishes.
    let mut cloud_config = cloud(&pki, 1, b.host(), b.port());
    cloud_config.backoff_min = Duration::from_millis(10);
    cloud_config.backoff_max = Duration::from_millis(40);
    let (cloud, mut cloud_rx) = Link::start(cloud_config).unwrap();
    let mut veh_config = vehicle(&pki, "veh-a", b.host(), b.port());
    veh_config.backoff_min = Duration::from_secs(2);
    veh_config.backoff_max = Duration::from_secs(4);
    let (veh, mut veh_rx) = Link::start(veh_config).unwrap();
    connected(&cloud).await;
    connected(&veh).await;
    let states = record_states(&veh);

    let request = tokio::spawn({
        let veh = veh.clone();
        async move {
            veh.request(
                &req_topic("veh-a"),
                &resp_topic("veh-a"),
                correlation(42),
                b"grant please".to_vec(),
                DEADLINE,
            )
            .await
        }
    });
    let first = next(&mut cloud_rx).await;
    assert_eq!(first.correlation, Some(correlation(42)));
    // SIGKILL: the sessions (never saved) are lost with the process.
    tokio::task::block_in_place(|| b.kill());
    wait_state(&veh, "Backoff", |s| matches!(s, LinkState::Backoff { .. })).await;
    tokio::task::block_in_place(|| b.restart());

    let second = next(&mut cloud_rx).await;
    assert_eq!(second.correlation, Some(correlation(42)));
    assert_eq!(second.payload, b"grant please");
    cloud.reply(&second, b"granted".to_vec()).await.unwrap();
    cloud
        .reply(&first, b"granted again".to_vec())
        .await
        .unwrap();
    let answer = tokio::time::timeout(DEADLINE, request)
        .await
        .unwrap()
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}\n{}", b.log()));
    assert_eq!(answer.payload, b"granted");
    let marker = Incoming {
        correlation: None,
        ..second
    };
    cloud.reply(&marker, b"marker".to_vec()).await.unwrap();
    assert_eq!(next(&mut veh_rx).await.payload, b"marker");

    let c = veh.counters();
    assert_eq!((c.requests, c.responses, c.duplicate_responses), (1, 1, 1));
    assert!(c.connects >= 2 && c.connection_errors >= 1, "{c:?}");
    assert!(c.resubscribes >= 2, "{c:?}");
    let seen = states.borrow().clone();
    let backoff = seen
        .iter()
        .position(|s| matches!(s, LinkState::Backoff { attempt: 1, .. }))
        .unwrap_or_else(|| panic!("no Backoff in {seen:?}"));
    assert!(
        seen[backoff..].contains(&LinkState::Connected),
        "not Connected again after the Backoff: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_restart_keeps_the_sessions() {
    let (_dir, pki) = pki();
    let Some(mut b) = Mosquitto::start(&pki) else {
        return;
    };
    let (cloud, mut cloud_rx) = Link::start(cloud(&pki, 1, b.host(), b.port())).unwrap();
    let (veh, mut veh_rx) = Link::start(vehicle(&pki, "veh-a", b.host(), b.port())).unwrap();
    connected(&cloud).await;
    connected(&veh).await;

    let request = tokio::spawn({
        let veh = veh.clone();
        async move {
            veh.request(
                &req_topic("veh-a"),
                &resp_topic("veh-a"),
                correlation(5),
                b"q".to_vec(),
                DEADLINE,
            )
            .await
        }
    });
    let held = next(&mut cloud_rx).await;
    // The request's PUBACK is in: the broker owns it now.
    eventually("the request's PUBACK", || veh.counters().pubacks >= 1).await;
    // SIGTERM: mosquitto saves sessions and subscriptions.
    tokio::task::block_in_place(|| b.stop());
    wait_state(&veh, "Backoff", |s| matches!(s, LinkState::Backoff { .. })).await;
    tokio::task::block_in_place(|| b.restart());
    connected(&cloud).await;
    // The broker kept the vehicle's request delivered and its subscription:
    // the answer reaches the vehicle through its session, whenever it is
    // back.
    cloud.reply(&held, b"kept".to_vec()).await.unwrap();
    let answer = tokio::time::timeout(DEADLINE, request)
        .await
        .unwrap()
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}\n{}", b.log()));
    assert_eq!(answer.payload, b"kept");
    connected(&veh).await;

    // Not published again (the session kept it); subscribed again after
    // each CONNACK all the same (see the next test).
    let marker = Incoming {
        correlation: None,
        ..held.clone()
    };
    cloud.reply(&marker, b"marker".to_vec()).await.unwrap();
    assert_eq!(next(&mut veh_rx).await.payload, b"marker");
    assert!(cloud_rx.try_recv().is_err(), "the request came twice");
    let c = veh.counters();
    assert_eq!((c.requests, c.responses, c.duplicate_responses), (1, 1, 0));
    assert!(c.connects >= 2, "{c:?}");
    assert_eq!(c.resubscribes, c.connects, "{c:?}");
    let k = cloud.counters();
    assert_eq!(k.resubscribes, k.connects, "{k:?}");
}

/// mosquitto 2.0.11 keeps a persistent session over a graceful restart
/// (Session Present = 1) and its plain subscriptions, but not its shared
/// ones: without subscribing again after every CONNACK, the cloud's
/// `$share/...` subscription is gone and the broker answers the vehicle's
/// events with "no matching subscribers".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_subscription_survives_a_graceful_restart() {
    let (_dir, pki) = pki();
    let Some(mut b) = Mosquitto::start(&pki) else {
        return;
    };
    let mut config = cloud(&pki, 1, b.host(), b.port());
    config.subscriptions = vec![(
        bmsgw::cloud::topics::CLOUD_EVENTS_FILTER.into(),
        bmsgw::cloud::link::QoS::AtLeastOnce,
    )];
    let (cloud, mut cloud_rx) = Link::start(config).unwrap();
    let (veh, _veh_rx) = Link::start(vehicle(&pki, "veh-a", b.host(), b.port())).unwrap();
    connected(&cloud).await;
    connected(&veh).await;
    let sent = veh
        .publish_acked(&events_topic("veh-a"), b"one".to_vec(), None)
        .await;
    assert_eq!(sent.unwrap(), PubAckReason::Success);
    assert_eq!(next(&mut cloud_rx).await.payload, b"one");

    tokio::task::block_in_place(|| b.stop());
    wait_state(&veh, "Backoff", |s| matches!(s, LinkState::Backoff { .. })).await;
    tokio::task::block_in_place(|| b.restart());
    connected(&cloud).await;
    connected(&veh).await;
    // The link does not wait for the SUBACK when the session was kept, so
    // the first publishes may still find no subscriber; the broker drops
    // those. One gets through within the deadline.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let sent = veh
            .publish_acked(&events_topic("veh-a"), b"two".to_vec(), None)
            .await
            .unwrap();
        if sent == PubAckReason::Success {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the cloud's shared subscription never came back:\n{}",
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(next(&mut cloud_rx).await.payload, b"two");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_acl_refusal_reaches_the_caller() {
    let (_dir, pki) = pki();
    let Some(b) = Mosquitto::start(&pki) else {
        return;
    };
    let (veh, _veh_rx) = Link::start(vehicle(&pki, "veh-a", b.host(), b.port())).unwrap();
    connected(&veh).await;
    // Its own events topic: accepted.
    veh.publish_confirmed(&events_topic("veh-a"), b"ok".to_vec(), None)
        .await
        .unwrap();
    // Another vehicle's: the PUBACK carries "not authorized".
    let r = veh
        .publish_confirmed(&events_topic("veh-b"), b"spoof".to_vec(), None)
        .await;
    assert!(
        matches!(
            r,
            Err(LinkError::Refused {
                reason: PubAckReason::NotAuthorized,
                ..
            })
        ),
        "{r:?}"
    );
    let r = veh
        .request(
            &req_topic("veh-b"),
            &resp_topic("veh-a"),
            correlation(1),
            b"q".to_vec(),
            DEADLINE,
        )
        .await;
    assert!(matches!(r, Err(LinkError::Refused { .. })), "{r:?}");
    // The link itself is fine.
    assert_eq!(veh.state(), LinkState::Connected);
    veh.publish_confirmed(&events_topic("veh-a"), b"ok".to_vec(), None)
        .await
        .unwrap();
}
