//! The shipped broker configuration, `config/mosquitto/`, works as shipped:
//! mosquitto starts with `mosquitto.conf` (only its paths and port replaced
//! by a dev PKI's), a vehicle and the cloud connect over mutual TLS 1.3 and
//! exchange a request under `acl`, a vehicle cannot write another
//! vehicle's topics, and TLS 1.2 is refused. Also: `acl` holds the
//! vehicle-independent rules `sim::pki::mosquitto_acl` generates.
//!
//! Skipped, with a printed notice, when mosquitto is not installed.

#![cfg(feature = "sim")]

mod support;

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bmsgw::sim::pki::{DevPki, DevPkiOptions, mosquitto_acl};
use support::mosquitto::Mosquitto;
use support::mqtt::{RawClient, topic};

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config/mosquitto")
        .join(name)
}

#[test]
fn acl_example_holds_the_generated_rules() {
    let example = std::fs::read_to_string(example("acl")).unwrap();
    let rules = |text: &str| -> Vec<String> {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_owned)
            .collect()
    };
    // Owner entries are per vehicle (commented examples in the shipped
    // file), so compare the rules every deployment needs.
    assert_eq!(rules(&example), rules(&mosquitto_acl(&[])));
}

/// A mosquitto process; killed on drop.
struct Broker {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `mosquitto.conf` with each path and the port replaced; everything else
/// as shipped.
fn test_config(pki: &DevPki, dir: &Path, acl: &Path, port: u16) -> String {
    let shipped = std::fs::read_to_string(example("mosquitto.conf")).unwrap();
    bmsgw::sim::mosquitto::shipped_config(&shipped, pki, acl, dir, port)
        .unwrap_or_else(|e| panic!("the shipped file changed shape ({e}):\n{shipped}"))
}

fn start(pki: &DevPki, dir: &Path) -> Option<Broker> {
    let Some(binary) = Mosquitto::binary() else {
        let line = format!(
            "SKIPPED: mosquitto not installed (apt-get install mosquitto) — {}",
            support::test_name()
        );
        if std::env::var(support::mosquitto::REQUIRE_ENV).is_ok_and(|v| v == "1") {
            panic!("{line}");
        }
        support::notice(&line);
        return None;
    };
    let acl = dir.join("bmsgw.acl");
    // The shipped ACL as is; the PKI's vehicles are veh-a and veh-b.
    std::fs::copy(example("acl"), &acl).unwrap();
    let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(&conf, test_config(pki, dir, &acl, port)).unwrap();
    let log = dir.join("mosquitto.log");
    let out = std::fs::File::create(&log).unwrap();
    let child = Command::new(binary)
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let mut broker = Broker { child, port, log };
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
        if let Ok(Some(status)) = broker.child.try_wait() {
            panic!("mosquitto exited ({status}):\n{}", broker.log());
        }
        assert!(
            Instant::now() < deadline,
            "mosquitto did not listen:\n{}",
            broker.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Some(broker)
}

impl Broker {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

#[tokio::test]
async fn the_shipped_broker_config_carries_a_request_and_refuses_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = DevPki::generate(&DevPkiOptions::new(tmp.path().join("pki"))).unwrap();
    let Some(broker) = start(&pki, tmp.path()) else {
        return;
    };
    let a = pki.vehicle("veh-a");
    let b = pki.vehicle("veh-b");
    let host = "localhost";

    let mut cloud = RawClient::connect(
        host,
        broker.port,
        "bmsgw-cloud-1",
        pki.tls_client_config(&pki.cloud_cert, &pki.cloud_key)
            .unwrap(),
    )
    .await
    .unwrap_or_else(|e| panic!("cloud: {e}\n{}", broker.log()));
    cloud
        .subscribe_ok("$share/bmsgw-cloud/bmsgw/v1/+/identity/req")
        .await;
    let mut veh_a = RawClient::connect(
        host,
        broker.port,
        "veh-a",
        pki.tls_client_config(&a.cert, &a.key).unwrap(),
    )
    .await
    .unwrap_or_else(|e| panic!("veh-a: {e}\n{}", broker.log()));
    let mut veh_b = RawClient::connect(
        host,
        broker.port,
        "veh-b",
        pki.tls_client_config(&b.cert, &b.key).unwrap(),
    )
    .await
    .unwrap();

    // veh-b may not write veh-a's request topic: refused (v5 reason code)
    // and never delivered; veh-a's own request arrives at the cloud.
    let refused = veh_b
        .publish("bmsgw/v1/veh-a/identity/req", b"forged", None)
        .await;
    assert_ne!(
        refused.reason,
        rumqttc::v5::mqttbytes::v5::PubAckReason::Success,
        "{}",
        broker.log()
    );
    veh_a
        .publish("bmsgw/v1/veh-a/identity/req", b"request", None)
        .await;
    let got = cloud.next_publish().await;
    assert_eq!(topic(&got), "bmsgw/v1/veh-a/identity/req");
    assert_eq!(&got.payload[..], b"request");

    // TLS 1.3 only. Our rustls is built without TLS 1.2, so openssl plays
    // the old client; the same command with TLS 1.3 shows it can connect.
    let handshake = |version: &str| {
        Command::new("openssl")
            .arg("s_client")
            .arg("-connect")
            .arg(format!("127.0.0.1:{}", broker.port))
            .arg(version)
            .arg("-CAfile")
            .arg(&pki.ca_cert)
            .arg("-cert")
            .arg(&a.cert)
            .arg("-key")
            .arg(&a.key)
            .stdin(Stdio::null())
            .output()
    };
    let (Ok(tls12), Ok(tls13)) = (handshake("-tls1_2"), handshake("-tls1_3")) else {
        support::notice(&format!(
            "SKIPPED (TLS 1.2 part): openssl not runnable — {}",
            support::test_name()
        ));
        return;
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
        "TLS 1.2 accepted:\n{}",
        text(&tls12)
    );
    assert!(tls13.status.success(), "TLS 1.3 refused:\n{}", text(&tls13));
}
