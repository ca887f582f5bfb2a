//! The cloud link against the embedded rumqttd broker (mutual TLS on
//! 127.0.0.1): request and response, duplicate and late answers, timeouts,
//! PUBACK-confirmed publishes, a bounded incoming queue, and a broker
//! restart in the middle of a request.

use crate::link_support;

use std::time::Duration;

use bmsgw::cloud::link::{Link, LinkError, LinkState};
use bmsgw::sim::broker::EmbeddedBroker;
use link_support::*;
use tokio::sync::mpsc;

fn broker(pki: &bmsgw::sim::pki::DevPki) -> EmbeddedBroker {
    EmbeddedBroker::start(pki).expect("embedded broker")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_response_round_trip() {
    let (_dir, pki) = pki();
    let b = broker(&pki);
    let (cloud, cloud_rx) = Link::start(cloud(&pki, 1, b.host(), b.port())).unwrap();
    let _responder = echo_responder(cloud.clone(), cloud_rx);
    let (veh, _veh_rx) = Link::start(vehicle(&pki, "veh-a", b.host(), b.port())).unwrap();
    connected(&cloud).await;
    connected(&veh).await;

    let answer = veh
        .request(
            &req_topic("veh-a"),
            &resp_topic("veh-a"),
            correlation(1),
            b"hello".to_vec(),
            DEADLINE,
        )
        .await
        .unwrap();
    assert_eq!(answer.payload, b"re:hello");
    assert_eq!(answer.topic, resp_topic("veh-a"));
    assert_eq!(answer.correlation, Some(correlation(1)));

    // Many at once: each answer goes to its own request.
    let mut calls = Vec::new();
    for n in 2..34u8 {
        let veh = veh.clone();
        calls.push(tokio::spawn(async move {
            let r = veh
                .request(
                    &req_topic("veh-a"),
                    &resp_topic("veh-a"),
                    correlation(n),
                    vec![n; 100],
                    DEADLINE,
                )
                .await;
            (n, r)
        }));
    }
    for call in calls {
        let (n, r) = call.await.unwrap();
        let answer = r.unwrap();
        assert_eq!(answer.correlation, Some(correlation(n)));
        assert_eq!(&answer.payload[3..], &[n; 100][..]);
    }

    let c = veh.counters();
    assert_eq!((c.requests, c.responses), (33, 33));
    assert_eq!(c.connects, 1);
    assert_eq!(c.resubscribes, 1);
    assert!(c.publishes >= 33 && c.pubacks >= 33, "{c:?}");
    assert_eq!(
        (c.duplicate_responses, c.request_timeouts, c.incoming),
        (0, 0, 0)
    );
    assert_eq!(cloud.counters().incoming, 33);

    veh.shutdown().await;
    assert_eq!(veh.state(), LinkState::Stopped);
    let after = veh
        .request(
            &req_topic("veh-a"),
            &resp_topic("veh-a"),
            correlation(99),
            vec![],
            DEADLINE,
        )
        .await;
    assert!(matches!(after, Err(LinkError::Stopped)), "{after:?}");
    cloud.shutdown().await;
}

/// A cloud that answers each request twice, then sends an unsolicited
/// marker on the same response topic (so it arrives after both answers).
fn double_responder(link: Link, mut rx: mpsc::Receiver<bmsgw::cloud::link::Incoming>) {
    tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            link.reply(&msg, b"first".to_vec()).await.unwrap();
            link.reply(&msg, b"second".to_vec()).await.unwrap();
            let marker = bmsgw::cloud::link::Incoming {
                correlation: Some(b"marker".to_vec()),
                ..msg.clone()
            };
            link.reply(&marker, b"marker".to_vec()).await.unwrap();
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_answer_is_dropped_and_counted() {
    let (_dir, pki) = pki();
    let b = broker(&pki);
    let (cloud, cloud_rx) = Link::start(cloud(&pki, 1, b.host(), b.port())).unwrap();
    double_responder(cloud.clone(), cloud_rx);
    let (veh, mut veh_rx) = Link::start(vehicle(&pki, "veh-a", b.host(), b.port())).unwrap();
    connected(&cloud).await;
    connected(&veh).await;

    let answer = veh
        .request(
            &req_topic("veh-a"),
            &resp_topic("veh-a"),
            correlation(1),
            b"q".to_vec(),
            DEADLINE,
        )
        .await
        .unwrap();
    assert_eq!(answer.payload, b"first");
    // The marker comes after the second answer: by then it was handled.
    let marker = next(&mut veh_rx).await;
    assert_eq!(marker.payload, b"marker");
    assert!(
        veh_rx.try_recv().is_err(),
        "the second answer never reaches the app"
    );
    let c = veh.counters();
    assert_eq!((c.responses, c.duplicate_responses, c.incoming), (1, 1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_request_times_out_and_a_late_answer_is_dropped() {
    let (_dir, pki) = pki();
    let b = broker(&pki);
    let (cloud, mut cloud_rx) = Link::start(cloud(&pki, 1, b.host(), b.port())).unwrap();
    let (veh, mut veh_rx) = Link::start(vehicle(&pki, "veh-a", b.host(), b.port())).unwrap();
    connected(&cloud).await;
    connected(&veh).await;

    let r = veh
        .request(
            &req_topic("veh-a"),
            &resp_topic("veh-a"),
            correlation(7),
            b"q".to_vec(),
            Duration::from_millis(300),
        )
        .await;
    assert!(matches!(r, Err(LinkError::Timeout { .. })), "{r:?}");
    assert_eq!(veh.counters().request_timeouts, 1);

    // The cloud got it, and answers too late; then a marker.
    let request = next(&mut cloud_rx).await;
    assert_eq!(request.correlation, Some(correlation(7)));
    cloud.reply(&request, b"late".to_vec()).await.unwrap();
    let marker = bmsgw::cloud::link::Incoming {
        correlation: None,
        ..request
    };
    cloud.reply(&marker, b"marker".to_vec()).await.unwrap();
    assert_eq!(next(&mut veh_rx).await.payload, b"marker");
    let c = veh.counters();
    assert_eq!((c.late_responses, c.responses, c.incoming), (1, 0, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_confirmed_resolves_on_the_puback_even_across_a_broker_restart() {
    let (_dir, pki) = pki();
    let mut b = broker(&pki);
    let (cloud, mut cloud_rx) = Link::start(cloud(&pki, 1, b.host(), b.port())).unwrap();
    let (veh, _veh_rx) = Link::start(vehicle(&pki, "veh-a", b.host(), b.port())).unwrap();
    connected(&cloud).await;
    connected(&veh).await;

    veh.publish_confirmed(&events_topic("veh-a"), b"record-1".to_vec(), None)
        .await
        .unwrap();
    let got = next(&mut cloud_rx).await;
    assert_eq!(
        (got.topic.as_str(), &got.payload[..]),
        (events_topic("veh-a").as_str(), &b"record-1"[..])
    );
    assert_eq!(veh.counters().pubacks, 1);

    tokio::task::block_in_place(|| b.stop());
    wait_state(&veh, "Backoff", |s| matches!(s, LinkState::Backoff { .. })).await;
    let pending = tokio::spawn({
        let veh = veh.clone();
        async move {
            veh.publish_confirmed(&events_topic("veh-a"), b"record-2".to_vec(), None)
                .await
        }
    });
    // No broker, no PUBACK: it stays pending.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pending.is_finished(), "resolved without a PUBACK");

    tokio::task::block_in_place(|| b.restart()).unwrap();
    tokio::time::timeout(DEADLINE, pending)
        .await
        .expect("resolves after the reconnect")
        .unwrap()
        .unwrap();
    let c = veh.counters();
    assert_eq!(c.pubacks, 2);
    assert!(c.connects >= 2 && c.connection_errors >= 1, "{c:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_incoming_queue_drops_and_counts() {
    let (_dir, pki) = pki();
    let b = broker(&pki);
    let (cloud, cloud_rx) = Link::start(cloud(&pki, 1, b.host(), b.port())).unwrap();
    let _responder = echo_responder(cloud.clone(), cloud_rx);
    let mut config = vehicle(&pki, "veh-a", b.host(), b.port());
    config.incoming_capacity = 2;
    let (veh, mut veh_rx) = Link::start(config).unwrap();
    connected(&cloud).await;
    connected(&veh).await;

    for n in 0..5u8 {
        cloud
            .publish_confirmed(&vouchers_topic("veh-a"), vec![n], None)
            .await
            .unwrap();
    }
    // An answer on the same topic comes after the five pushes.
    let answer = veh
        .request(
            &req_topic("veh-a"),
            &vouchers_topic("veh-a"),
            correlation(1),
            b"sync".to_vec(),
            DEADLINE,
        )
        .await
        .unwrap();
    assert_eq!(answer.payload, b"re:sync");
    let c = veh.counters();
    assert_eq!((c.incoming, c.incoming_dropped), (2, 3));
    assert_eq!(veh_rx.try_recv().unwrap().payload, [0]);
    assert_eq!(veh_rx.try_recv().unwrap().payload, [1]);
    assert!(veh_rx.try_recv().is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_malformed_publishes_are_refused_locally() {
    let (_dir, pki) = pki();
    let mut config = vehicle(&pki, "veh-a", "127.0.0.1", 1);
    config.max_payload = 16;
    let (veh, _rx) = Link::start(config).unwrap();
    let r = veh
        .publish_confirmed(&events_topic("veh-a"), vec![0; 17], None)
        .await;
    assert!(
        matches!(
            r,
            Err(LinkError::PayloadTooLarge {
                size: 17,
                max: 16,
                ..
            })
        ),
        "{r:?}"
    );
    let r = veh
        .publish_confirmed("bmsgw/v1/+/events", vec![], None)
        .await;
    assert!(matches!(r, Err(LinkError::InvalidTopic { .. })), "{r:?}");
    let r = veh
        .reply(
            &bmsgw::cloud::link::Incoming {
                topic: "t".into(),
                payload: vec![],
                correlation: None,
                response_topic: None,
            },
            vec![],
        )
        .await;
    assert!(matches!(r, Err(LinkError::NoResponseTopic { .. })), "{r:?}");
    // Nothing listens on port 1: the link keeps backing off, paced.
    wait_state(&veh, "Backoff", |s| {
        matches!(s, LinkState::Backoff { attempt: 2.., .. })
    })
    .await;
    veh.shutdown().await;
    assert_eq!(veh.state(), LinkState::Stopped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_restarts_in_the_middle_of_a_request() {
    let (_dir, pki) = pki();
    let mut b = broker(&pki);
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
    // The cloud has the request but has not answered: kill the broker.
    let first = next(&mut cloud_rx).await;
    assert_eq!(first.correlation, Some(correlation(42)));
    tokio::task::block_in_place(|| b.stop());
    // With a request waiting, the first reconnect goes at once and fails;
    // the broker comes back during the second delay (2 s or more).
    wait_state(
        &veh,
        "Backoff after a failed reconnect",
        |s| matches!(s, LinkState::Backoff { attempt, .. } if *attempt >= 2),
    )
    .await;
    tokio::task::block_in_place(|| b.restart()).unwrap();

    // The broker lost the session: the vehicle publishes the request again,
    // with the same correlation.
    let second = next(&mut cloud_rx).await;
    assert_eq!(second.correlation, Some(correlation(42)));
    assert_eq!(second.payload, b"grant please");
    // Both deliveries are answered; the vehicle takes one.
    cloud.reply(&second, b"granted".to_vec()).await.unwrap();
    cloud
        .reply(&first, b"granted again".to_vec())
        .await
        .unwrap();
    let answer = tokio::time::timeout(DEADLINE, request)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(answer.payload, b"granted");
    let marker = bmsgw::cloud::link::Incoming {
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
