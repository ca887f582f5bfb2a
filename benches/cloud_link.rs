//! Request→response latency of the cloud link over loopback, through the
//! embedded rumqttd and through mosquitto (when installed): a vehicle link
//! sends a request (QoS 1, Response Topic, Correlation Data), a cloud link
//! answers it with `reply`, both over mutual TLS 1.3.
//!
//! Criterion reports the mean and median; percentiles matter more for a
//! charging handshake, so each broker also gets 1000 timed round trips
//! whose p50, p90, p99 and max are printed.
//!
//! Run: `cargo bench --bench cloud_link`. The percentile lines are printed
//! before criterion's own report for each broker.

use std::hint::black_box;
use std::time::{Duration, Instant};

use bmsgw::cloud::link::{Link, LinkConfig, LinkState, QoS};
use bmsgw::cloud::tls::TlsFiles;
use bmsgw::sim::broker::EmbeddedBroker;
use bmsgw::sim::pki::{DevPki, DevPkiOptions};
use criterion::{Criterion, criterion_group, criterion_main};
use tokio::runtime::Runtime;

#[path = "../tests/support/mod.rs"]
mod support;

const ROUND_TRIPS: usize = 1000;
const PAYLOAD: usize = 200;
const TIMEOUT: Duration = Duration::from_secs(10);

struct Pair {
    vehicle: Link,
    cloud: Link,
    next: u64,
}

impl Pair {
    async fn start(pki: &DevPki, host: &str, port: u16) -> Pair {
        let files = pki.vehicle("veh-a");
        let mut v = LinkConfig::new(
            host,
            port,
            "veh-a",
            TlsFiles {
                ca: pki.ca_cert.clone(),
                cert: files.cert,
                key: files.key,
            },
        );
        v.subscriptions = vec![("bmsgw/v1/veh-a/identity/resp".into(), QoS::AtLeastOnce)];
        let mut c = LinkConfig::new(
            host,
            port,
            "cloud-bench",
            TlsFiles {
                ca: pki.ca_cert.clone(),
                cert: pki.cloud_cert.clone(),
                key: pki.cloud_key.clone(),
            },
        );
        c.subscriptions = vec![("bmsgw/v1/+/identity/req".into(), QoS::AtLeastOnce)];
        let (cloud, mut requests) = Link::start(c).expect("cloud link");
        let responder = cloud.clone();
        tokio::spawn(async move {
            while let Some(msg) = requests.recv().await {
                let link = responder.clone();
                // Answer without waiting for the previous answer's PUBACK.
                tokio::spawn(async move {
                    let payload = msg.payload.clone();
                    let _ = link.reply(&msg, payload).await;
                });
            }
        });
        let (vehicle, _rx) = Link::start(v).expect("vehicle link");
        for link in [&cloud, &vehicle] {
            let mut state = link.state_watch();
            tokio::time::timeout(TIMEOUT, state.wait_for(|s| *s == LinkState::Connected))
                .await
                .expect("connected in time")
                .expect("link running");
        }
        Pair {
            vehicle,
            cloud,
            next: 0,
        }
    }

    async fn round_trip(&mut self) {
        self.next += 1;
        let mut correlation = [0u8; 16];
        correlation[..8].copy_from_slice(&self.next.to_be_bytes());
        let answer = self
            .vehicle
            .request(
                "bmsgw/v1/veh-a/identity/req",
                "bmsgw/v1/veh-a/identity/resp",
                correlation.to_vec(),
                vec![0xA5; PAYLOAD],
                TIMEOUT,
            )
            .await
            .expect("answered");
        black_box(answer);
    }

    async fn stop(self) {
        self.vehicle.shutdown().await;
        self.cloud.shutdown().await;
    }
}

fn percentiles(name: &str, rt: &Runtime, pair: &mut Pair) {
    let mut samples = Vec::with_capacity(ROUND_TRIPS);
    rt.block_on(async {
        for _ in 0..50 {
            pair.round_trip().await;
        }
        for _ in 0..ROUND_TRIPS {
            let t = Instant::now();
            pair.round_trip().await;
            samples.push(t.elapsed());
        }
    });
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    println!(
        "cloud_link/{name}: {ROUND_TRIPS} request->response round trips, {PAYLOAD}-byte payload: \
         p50 {:?}  p90 {:?}  p99 {:?}  max {:?}",
        at(0.50),
        at(0.90),
        at(0.99),
        samples[samples.len() - 1]
    );
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = DevPki::generate(&DevPkiOptions::new(dir.path().join("pki"))).expect("dev PKI");

    let broker = EmbeddedBroker::start(&pki).expect("embedded rumqttd");
    let mut pair = rt.block_on(Pair::start(&pki, broker.host(), broker.port()));
    percentiles("rumqttd", &rt, &mut pair);
    c.bench_function("cloud_link/request_response/rumqttd", |b| {
        b.iter(|| rt.block_on(pair.round_trip()))
    });
    rt.block_on(pair.stop());
    drop(broker);

    if let Some(broker) = support::mosquitto::Mosquitto::start(&pki) {
        let mut pair = rt.block_on(Pair::start(&pki, broker.host(), broker.port()));
        percentiles("mosquitto", &rt, &mut pair);
        c.bench_function("cloud_link/request_response/mosquitto", |b| {
            b.iter(|| rt.block_on(pair.round_trip()))
        });
        rt.block_on(pair.stop());
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    targets = bench
}
criterion_main!(benches);
