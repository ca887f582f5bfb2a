//! An embedded MQTT v5 broker (rumqttd) with mutual TLS on 127.0.0.1, for
//! the tests and the demo: no broker to install, a free port per instance.
//!
//! The broker runs on its own thread with its own tokio runtime, so it works
//! under any caller (a `#[tokio::test]`, a plain test, the demo). Rather than
//! `rumqttd::Broker::start`, which blocks forever and cannot be stopped, it
//! drives rumqttd's public `Router` and `Server` directly: [`stop`] drops the
//! runtime, which closes the listener and every connection at once (what a
//! crashed broker looks like to its clients), and [`restart`] brings a fresh
//! broker up on the same port.
//!
//! What rumqttd 0.20 cannot do, and the mosquitto suite (`tests/broker/mqtt_acl.rs`)
//! covers instead:
//! - **No ACLs.** Any client with a certificate from the CA may publish and
//!   subscribe to any topic; the certificate's CN is not an identity (client
//!   ids are free-form). Confinement of vehicles to their own topics can
//!   only be shown on mosquitto.
//! - **No TLS 1.3-only setting.** rumqttd builds its rustls `ServerConfig`
//!   itself with the default versions, so it also accepts TLS 1.2 clients.
//!   Our clients offer TLS 1.3 only, so our connections are 1.3.
//! - **A certificate Organization becomes a tenant id** (feature
//!   `verify-client-cert`) that prefixes every topic, and a non-alphanumeric
//!   one is refused; the dev PKI therefore puts no O in client certificates.
//! - **TLS handshakes run inside the accept loop**, one at a time and
//!   without a timeout: a client that opens TCP and stalls holds up every
//!   other connection. Fine on loopback in tests; not a production broker.
//! - **No persistence**: sessions and queued messages live in memory and
//!   are lost by [`stop`]/[`restart`], like a broker crash without a store.
//! - Each start leaves rumqttd's router thread behind (it holds its own
//!   sender and never exits); it is idle once its server is stopped.
//!
//! - **Loose v5 edges** (observed): it answers DISCONNECT and a client-id
//!   takeover by closing TCP without TLS close_notify or a v5 DISCONNECT
//!   reason code, and its CONNACK states no session expiry, receive maximum
//!   or shared-subscription availability (only a topic alias maximum).
//!
//! Observed to work (tests below, and by hand): MQTT 5 shared
//! subscriptions (`$share/group/filter`, round robin, each message to one
//! member); Response Topic and Correlation Data forwarded unchanged;
//! client-certificate verification (no certificate, or one from another CA,
//! is refused in the handshake); persistent sessions (`clean_start = false`
//! with a session expiry: `session_present` and queued QoS 1 messages are
//! delivered on reconnect, while the broker runs).
//!
//! [`stop`]: EmbeddedBroker::stop
//! [`restart`]: EmbeddedBroker::restart

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rumqttd::{ConnectionSettings, RouterConfig, ServerSettings, TlsConfig};
use tokio::sync::oneshot;

use super::pki::DevPki;

/// How long a start may take before it is reported as failed.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Interval between connection attempts while waiting for the listener.
const POLL: Duration = Duration::from_millis(10);

/// Why the embedded broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("no free port on 127.0.0.1: {0}")]
    NoFreePort(#[source] std::io::Error),
    #[error("broker TLS file {path}: {reason}")]
    TlsFile { path: PathBuf, reason: &'static str },
    #[error("cannot start the broker thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("broker on port {port} stopped while starting: {reason}")]
    Exited { port: u16, reason: String },
    #[error("broker on port {port} did not accept connections within {waited:?}")]
    NotReady { port: u16, waited: Duration },
}

/// The TLS files of the broker: its certificate and key, and the CA that
/// client certificates must chain to.
#[derive(Clone, Debug)]
pub struct BrokerTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl From<&DevPki> for BrokerTls {
    fn from(pki: &DevPki) -> Self {
        BrokerTls {
            ca: pki.ca_cert.clone(),
            cert: pki.broker_cert.clone(),
            key: pki.broker_key.clone(),
        }
    }
}

/// A running embedded broker. Dropping it stops it.
#[derive(Debug)]
pub struct EmbeddedBroker {
    tls: BrokerTls,
    port: u16,
    running: Option<Running>,
}

#[derive(Debug)]
struct Running {
    shutdown: oneshot::Sender<()>,
    thread: JoinHandle<()>,
}

impl EmbeddedBroker {
    /// Start a broker with the PKI's broker certificate on a free port of
    /// 127.0.0.1, requiring client certificates from the PKI's CA, and wait
    /// until it accepts connections.
    pub fn start(tls: impl Into<BrokerTls>) -> Result<EmbeddedBroker, BrokerError> {
        let port = free_port()?;
        EmbeddedBroker::start_on(tls, port)
    }

    /// [`start`](Self::start) on a given port.
    pub fn start_on(tls: impl Into<BrokerTls>, port: u16) -> Result<EmbeddedBroker, BrokerError> {
        let mut broker = EmbeddedBroker {
            tls: tls.into(),
            port,
            running: None,
        };
        broker.run()?;
        Ok(broker)
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The host clients connect to; the broker certificate names it.
    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    /// Whether it is running (not [`stop`](Self::stop)ped).
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Stop at once: the listener and every client connection close, and
    /// all sessions are lost. Returns when the port is closed.
    pub fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            // The thread may have ended already (then the send fails).
            let _ = running.shutdown.send(());
            let _ = running.thread.join();
        }
    }

    /// Stop, then start a fresh broker on the same port.
    pub fn restart(&mut self) -> Result<(), BrokerError> {
        self.stop();
        self.run()
    }

    fn run(&mut self) -> Result<(), BrokerError> {
        let settings = server_settings(&self.tls, self.port)?;
        let (shutdown, shutdown_rx) = oneshot::channel();
        let (exit_tx, exit_rx) = std::sync::mpsc::channel::<String>();
        let thread = std::thread::Builder::new()
            .name(format!("rumqttd-{}", self.port))
            .spawn(move || {
                let reason = serve(settings, shutdown_rx);
                // Nobody listens once the start has been confirmed.
                let _ = exit_tx.send(reason);
            })
            .map_err(BrokerError::Thread)?;
        self.running = Some(Running { shutdown, thread });

        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let start = Instant::now();
        loop {
            if let Ok(reason) = exit_rx.try_recv() {
                self.stop();
                return Err(BrokerError::Exited {
                    port: self.port,
                    reason,
                });
            }
            // A bare TCP connection, closed at once: the broker's TLS
            // accept fails on it and moves on.
            if TcpStream::connect_timeout(&addr, POLL).is_ok() {
                return Ok(());
            }
            if start.elapsed() > START_TIMEOUT {
                self.stop();
                return Err(BrokerError::NotReady {
                    port: self.port,
                    waited: START_TIMEOUT,
                });
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Run one broker until `shutdown`; returns why it ended.
fn serve(settings: ServerSettings, shutdown: oneshot::Receiver<()>) -> String {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return format!("cannot build a tokio runtime: {e}"),
    };
    let router = rumqttd::Router::new(0, router_config()).spawn();
    let mut server = rumqttd::Server::new(settings, router, rumqttd::protocol::v5::V5);
    runtime.block_on(async move {
        tokio::select! {
            r = server.start(rumqttd::LinkType::Remote) => match r {
                Ok(()) => "server ended".to_owned(),
                Err(e) => e.to_string(),
            },
            _ = shutdown => "stopped".to_owned(),
        }
    })
    // Dropping the runtime here drops every connection task.
}

fn router_config() -> RouterConfig {
    RouterConfig {
        max_connections: 1000,
        max_outgoing_packet_count: 200,
        max_segment_size: 1024 * 1024,
        max_segment_count: 10,
        ..RouterConfig::default()
    }
}

fn server_settings(tls: &BrokerTls, port: u16) -> Result<ServerSettings, BrokerError> {
    Ok(ServerSettings {
        name: format!("v5-tls-{port}"),
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        tls: Some(TlsConfig::Rustls {
            capath: Some(utf8(&tls.ca)?),
            certpath: utf8(&tls.cert)?,
            keypath: utf8(&tls.key)?,
        }),
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: 5000,
            max_payload_size: 256 * 1024,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    })
}

fn utf8(path: &Path) -> Result<String, BrokerError> {
    if !path.is_file() {
        return Err(BrokerError::TlsFile {
            path: path.to_owned(),
            reason: "not a readable file",
        });
    }
    path.to_str()
        .map(str::to_owned)
        .ok_or_else(|| BrokerError::TlsFile {
            path: path.to_owned(),
            reason: "path is not UTF-8 (rumqttd takes string paths)",
        })
}

/// A port that was free a moment ago: bind port 0, read it, release it.
pub fn free_port() -> Result<u16, BrokerError> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(BrokerError::NoFreePort)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::pki::DevPkiOptions;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::{Packet, Publish, PublishProperties};
    use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions};
    use rumqttc::{TlsConfiguration, Transport};
    use std::sync::Arc;

    const DEADLINE: Duration = Duration::from_secs(10);

    fn new_pki() -> (tempfile::TempDir, DevPki) {
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::generate(&DevPkiOptions::new(dir.path())).unwrap();
        (dir, pki)
    }

    fn options(port: u16, id: &str, tls: Arc<rustls::ClientConfig>) -> MqttOptions {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
        o.set_keep_alive(Duration::from_secs(30));
        o
    }

    /// Connect and wait for CONNACK.
    async fn connect(opts: MqttOptions) -> (AsyncClient, EventLoop) {
        let (client, mut events) = AsyncClient::new(opts, 16);
        next(&mut events, |p| matches!(p, Packet::ConnAck(_))).await;
        (client, events)
    }

    /// Poll until an incoming packet matches; panics at the deadline.
    async fn next(events: &mut EventLoop, want: impl Fn(&Packet) -> bool) -> Packet {
        tokio::time::timeout(DEADLINE, async {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(p)) if want(&p) => return p,
                    Ok(_) => {}
                    Err(e) => panic!("connection failed: {e:?}"),
                }
            }
        })
        .await
        .expect("the awaited packet arrived before the deadline")
    }

    async fn subscribe(client: &AsyncClient, events: &mut EventLoop, filter: &str) {
        client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
        let ack = next(events, |p| matches!(p, Packet::SubAck(_))).await;
        let Packet::SubAck(ack) = ack else {
            unreachable!()
        };
        assert!(
            ack.return_codes.iter().all(|c| matches!(
                c,
                rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_)
            )),
            "{filter}: {ack:?}"
        );
    }

    async fn next_publish(events: &mut EventLoop) -> Publish {
        match next(events, |p| matches!(p, Packet::Publish(_))).await {
            Packet::Publish(p) => p,
            _ => unreachable!(),
        }
    }

    #[tokio::test]
    async fn forwards_response_topic_and_correlation_data_through_a_shared_subscription() {
        let (_tmp, pki) = new_pki();
        let broker = EmbeddedBroker::start(&pki).unwrap();
        let cloud = pki
            .tls_client_config(&pki.cloud_cert, &pki.cloud_key)
            .unwrap();
        let veh = pki.vehicle("veh-a");
        let vehicle = pki.tls_client_config(&veh.cert, &veh.key).unwrap();

        let (sub, mut sub_events) = connect(options(broker.port(), "cloud-1", cloud)).await;
        subscribe(
            &sub,
            &mut sub_events,
            "$share/bmsgw-cloud-req/bmsgw/v1/+/identity/req",
        )
        .await;
        let (publ, mut pub_events) = connect(options(broker.port(), "veh-a", vehicle)).await;

        let correlation = [0xA5u8; 16];
        let props = PublishProperties {
            response_topic: Some("bmsgw/v1/veh-a/identity/resp".into()),
            correlation_data: Some(correlation.to_vec().into()),
            ..Default::default()
        };
        publ.publish_with_properties(
            "bmsgw/v1/veh-a/identity/req",
            QoS::AtLeastOnce,
            false,
            b"sealed request".to_vec(),
            props,
        )
        .await
        .unwrap();
        // Drive the publisher until its PUBACK, concurrently with the
        // subscriber's wait.
        let (got, _) = tokio::join!(
            next_publish(&mut sub_events),
            next(&mut pub_events, |p| matches!(p, Packet::PubAck(_)))
        );
        assert_eq!(&got.topic[..], b"bmsgw/v1/veh-a/identity/req");
        assert_eq!(&got.payload[..], b"sealed request");
        let props = got.properties.expect("properties forwarded");
        assert_eq!(
            props.response_topic.as_deref(),
            Some("bmsgw/v1/veh-a/identity/resp")
        );
        assert_eq!(props.correlation_data.as_deref(), Some(&correlation[..]));
    }

    #[tokio::test]
    async fn a_shared_subscription_delivers_each_message_to_one_member() {
        let (_tmp, pki) = new_pki();
        let broker = EmbeddedBroker::start(&pki).unwrap();
        let cloud = pki
            .tls_client_config(&pki.cloud_cert, &pki.cloud_key)
            .unwrap();
        let filter = "$share/bmsgw-cloud-req/bmsgw/v1/+/identity/req";
        let (m1, mut e1) = connect(options(broker.port(), "cloud-1", cloud.clone())).await;
        subscribe(&m1, &mut e1, filter).await;
        let (m2, mut e2) = connect(options(broker.port(), "cloud-2", cloud.clone())).await;
        subscribe(&m2, &mut e2, filter).await;
        let (publ, mut pe) = connect(options(broker.port(), "pub", cloud)).await;

        const N: usize = 6;
        for i in 0..N {
            publ.publish(
                "bmsgw/v1/veh-a/identity/req",
                QoS::AtLeastOnce,
                false,
                vec![i as u8],
            )
            .await
            .unwrap();
        }
        let mut seen: Vec<(u8, u8)> = Vec::new(); // (member, payload)
        tokio::time::timeout(DEADLINE, async {
            while seen.len() < N {
                tokio::select! {
                    r = e1.poll() => if let Ok(Event::Incoming(Packet::Publish(p))) = r { seen.push((1, p.payload[0])) },
                    r = e2.poll() => if let Ok(Event::Incoming(Packet::Publish(p))) = r { seen.push((2, p.payload[0])) },
                    r = pe.poll() => { r.unwrap(); }
                }
            }
        })
        .await
        .expect("all messages delivered");
        let mut payloads: Vec<u8> = seen.iter().map(|&(_, p)| p).collect();
        payloads.sort_unstable();
        assert_eq!(payloads, (0..N as u8).collect::<Vec<_>>(), "{seen:?}");
        assert!(seen.iter().any(|&(m, _)| m == 1), "{seen:?}");
        assert!(seen.iter().any(|&(m, _)| m == 2), "{seen:?}");
    }

    #[tokio::test]
    async fn refuses_a_client_certificate_from_another_ca_and_no_certificate() {
        let (_tmp, pki) = new_pki();
        let (_tmp2, other) = new_pki();
        let broker = EmbeddedBroker::start(&pki).unwrap();
        // Trusts our broker, but presents a certificate of another CA.
        let veh = other.vehicle("veh-a");
        let foreign = crate::sim::pki::tls_client_config(
            &pki.ca_cert,
            &veh.cert,
            &veh.key,
            &[&rustls::version::TLS13],
        )
        .unwrap();
        let refused = attempt(options(broker.port(), "intruder", foreign)).await;
        assert!(refused.is_err(), "a foreign certificate was accepted");

        // No client certificate at all.
        let mut roots = rustls::RootCertStore::empty();
        for c in crate::sim::pki::read_certs(&pki.ca_cert).unwrap() {
            roots.add(c).unwrap();
        }
        let anonymous = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let refused = attempt(options(broker.port(), "anon", Arc::new(anonymous))).await;
        assert!(
            refused.is_err(),
            "a client without a certificate was accepted"
        );

        // The same broker accepts a certificate of its own CA.
        let own = pki.vehicle("veh-a");
        let own = pki.tls_client_config(&own.cert, &own.key).unwrap();
        attempt(options(broker.port(), "veh-a", own)).await.unwrap();
    }

    /// Try to connect: Ok on CONNACK, the error otherwise.
    async fn attempt(opts: MqttOptions) -> Result<(), ConnectionError> {
        let (_client, mut events) = AsyncClient::new(opts, 4);
        tokio::time::timeout(DEADLINE, async {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                    Ok(_) => {}
                    Err(e) => return Err(e),
                }
            }
        })
        .await
        .expect("the connection attempt ended before the deadline")
    }

    #[tokio::test]
    async fn restart_serves_again_on_the_same_port() {
        let (_tmp, pki) = new_pki();
        let mut broker = EmbeddedBroker::start(&pki).unwrap();
        let port = broker.port();
        let cloud = pki
            .tls_client_config(&pki.cloud_cert, &pki.cloud_key)
            .unwrap();
        let (_c, mut events) = connect(options(port, "c", cloud.clone())).await;

        broker.stop();
        assert!(!broker.is_running());
        // The connection is dropped and new ones are refused.
        let err = tokio::time::timeout(DEADLINE, async {
            loop {
                if let Err(e) = events.poll().await {
                    return e;
                }
            }
        })
        .await
        .expect("the client saw the broker go");
        assert!(
            matches!(err, ConnectionError::Io(_) | ConnectionError::MqttState(_)),
            "{err:?}"
        );
        assert!(TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err());

        broker.restart().unwrap();
        assert_eq!(broker.port(), port);
        let (c, mut events) = connect(options(port, "c2", cloud)).await;
        subscribe(&c, &mut events, "bmsgw/v1/+/events").await;
    }

    #[test]
    fn a_missing_tls_file_is_reported() {
        let (_tmp, pki) = new_pki();
        std::fs::remove_file(&pki.broker_key).unwrap();
        let err = EmbeddedBroker::start(&pki).unwrap_err();
        assert!(
            matches!(&err, BrokerError::TlsFile { path, .. } if *path == pki.broker_key),
            "{err}"
        );
    }
}
