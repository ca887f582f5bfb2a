//! The shipped broker configuration, `config/mosquitto/`, works as shipped:
//! mosquitto starts with `mosquitto.conf` (only its paths and port replaced
//! by a dev PKI's) and the example `dynamic-security.json` as it is; a
//! vehicle and the cloud connect over mutual TLS 1.3 and exchange a request,
//! a vehicle cannot write another vehicle's topics, and TLS 1.2 is refused.
//! Also: the example is what `sim::pki::mosquitto_dynsec` generates for its
//! vehicles.
//!
//! Skipped, with a printed notice, when mosquitto is not installed.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use bmsgw::sim::pki::{DevPki, DevPkiOptions, mosquitto_dynsec};
use support::mosquitto::Mosquitto;
use support::mqtt::{RawClient, topic};

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config/mosquitto")
        .join(name)
}

#[test]
fn the_dynsec_example_is_what_the_generator_writes() {
    let example: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(example("dynamic-security.json")).unwrap())
            .unwrap();
    let generated: serde_json::Value =
        serde_json::from_str(&mosquitto_dynsec(&["veh-a".into(), "veh-b".into()], 2)).unwrap();
    assert_eq!(example, generated);
}

/// `bmsgw pki broker-acl` writes the file from the cloud's vehicle
/// registry: the same as `pki dev`'s, and a revoked vehicle (and its owner
/// app) left out.
#[test]
fn broker_acl_follows_the_vehicle_registry() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = DevPki::generate(&DevPkiOptions::new(tmp.path().join("pki"))).unwrap();
    let acl = |vehicles: &Path| -> serde_json::Value {
        let out = Command::new(env!("CARGO_BIN_EXE_bmsgw"))
            .args(["pki", "broker-acl", "--vehicles"])
            .arg(vehicles)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&pki.mosquitto_dynsec).unwrap()).unwrap();
    assert_eq!(acl(&pki.vehicles_toml), written);

    let registry = std::fs::read_to_string(&pki.vehicles_toml).unwrap();
    let (a, b) = registry.split_at(registry.find("id = \"veh-b\"").unwrap());
    let revoked = tmp.path().join("revoked.toml");
    std::fs::write(
        &revoked,
        format!("{a}{}", b.replacen("revoked = false", "revoked = true", 1)),
    )
    .unwrap();
    let users: Vec<String> = acl(&revoked)["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["username"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        users,
        ["bmsgw-cloud-1", "bmsgw-cloud-2", "veh-a", "owner-veh-a"]
    );
}

#[tokio::test]
async fn the_shipped_broker_config_carries_a_request_and_refuses_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = DevPki::generate(&DevPkiOptions::new(tmp.path().join("pki"))).unwrap();
    // The example file as shipped; the PKI's vehicles are its veh-a and veh-b.
    let Some(broker) = Mosquitto::start_with(&pki, &example("dynamic-security.json")) else {
        return;
    };
    let a = pki.vehicle("veh-a");
    let b = pki.vehicle("veh-b");
    let host = "localhost";

    let mut cloud = RawClient::connect(
        host,
        broker.port(),
        "bmsgw-cloud-1",
        pki.tls_client_config(&pki.cloud_cert, &pki.cloud_key)
            .unwrap(),
    )
    .await
    .unwrap_or_else(|e| panic!("cloud: {e}\n{}", broker.log()));
    cloud
        .subscribe_ok("$share/bmsgw-cloud-req/bmsgw/v1/+/identity/req")
        .await;
    let mut veh_a = RawClient::connect(
        host,
        broker.port(),
        "veh-a",
        pki.tls_client_config(&a.cert, &a.key).unwrap(),
    )
    .await
    .unwrap_or_else(|e| panic!("veh-a: {e}\n{}", broker.log()));
    let mut veh_b = RawClient::connect(
        host,
        broker.port(),
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
            .arg(format!("127.0.0.1:{}", broker.port()))
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
