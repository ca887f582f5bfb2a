//! Raw rumqttc v5 clients over mutual TLS, for tests of the brokers
//! themselves (ACLs, properties, shared subscriptions).
//!
//! One client is one rumqttc event loop, driven only while the test awaits
//! one of its methods. Waits are on events, each with [`DEADLINE`]; a
//! publish that arrives while the client waits for an acknowledgement is
//! kept for the next [`RawClient::next_publish`].
//!
//! ```ignore
//! let tls = pki.tls_client_config(&pki.cloud_cert, &pki.cloud_key).unwrap();
//! let mut cloud = RawClient::connect(broker.host(), broker.port(), "cloud-1", tls).await.unwrap();
//! cloud.subscribe("bmsgw/v1/+/events").await;
//! let msg = cloud.next_publish().await;
//! ```

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, Packet, PubAck, Publish, PublishProperties, SubscribeReasonCode,
};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};

/// How long any single wait may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// MQTT options for `client_id` at `host:port` over `tls`.
pub fn options(
    host: &str,
    port: u16,
    client_id: &str,
    tls: Arc<rustls::ClientConfig>,
) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, host, port);
    o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    o.set_keep_alive(Duration::from_secs(30));
    o
}

/// A connected client.
pub struct RawClient {
    pub client: AsyncClient,
    pub events: EventLoop,
    pub connack: ConnAck,
    /// Publishes received while waiting for something else.
    pending: VecDeque<Publish>,
}

impl RawClient {
    /// Connect and wait for a successful CONNACK; the connection error if
    /// there is none (e.g. a refused TLS handshake).
    pub async fn connect(
        host: &str,
        port: u16,
        client_id: &str,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<RawClient, ConnectionError> {
        RawClient::connect_with(options(host, port, client_id, tls)).await
    }

    /// [`connect`](Self::connect) with prepared options.
    pub async fn connect_with(opts: MqttOptions) -> Result<RawClient, ConnectionError> {
        let (client, mut events) = AsyncClient::new(opts, 64);
        let connack = tokio::time::timeout(DEADLINE, async {
            loop {
                match events.poll().await? {
                    Event::Incoming(Packet::ConnAck(ack)) => return Ok::<_, ConnectionError>(ack),
                    _ => continue,
                }
            }
        })
        .await
        .expect("the connection attempt ended before the deadline")?;
        Ok(RawClient {
            client,
            events,
            connack,
            pending: VecDeque::new(),
        })
    }

    /// Subscribe at QoS 1 and return the SUBACK's reason codes.
    pub async fn subscribe(&mut self, filter: &str) -> Vec<SubscribeReasonCode> {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("the client accepts a request");
        match self.wait(|p| matches!(p, Packet::SubAck(_))).await {
            Packet::SubAck(ack) => ack.return_codes,
            _ => unreachable!("wait returns the packet it matched"),
        }
    }

    /// Subscribe and require success.
    pub async fn subscribe_ok(&mut self, filter: &str) {
        let codes = self.subscribe(filter).await;
        assert!(
            codes
                .iter()
                .all(|c| matches!(c, SubscribeReasonCode::Success(_))),
            "subscribe {filter}: {codes:?}"
        );
    }

    /// Publish at QoS 1 and wait for its PUBACK, which is returned (a v5
    /// broker may refuse with a reason code in it).
    pub async fn publish(
        &mut self,
        topic: &str,
        payload: &[u8],
        properties: Option<PublishProperties>,
    ) -> PubAck {
        let request = match properties {
            Some(props) => {
                self.client
                    .publish_with_properties(
                        topic,
                        QoS::AtLeastOnce,
                        false,
                        payload.to_vec(),
                        props,
                    )
                    .await
            }
            None => {
                self.client
                    .publish(topic, QoS::AtLeastOnce, false, payload.to_vec())
                    .await
            }
        };
        request.expect("the client accepts a request");
        match self.wait(|p| matches!(p, Packet::PubAck(_))).await {
            Packet::PubAck(ack) => ack,
            _ => unreachable!("wait returns the packet it matched"),
        }
    }

    /// The next message delivered to this client.
    pub async fn next_publish(&mut self) -> Publish {
        if let Some(p) = self.pending.pop_front() {
            return p;
        }
        match self.wait(|p| matches!(p, Packet::Publish(_))).await {
            Packet::Publish(p) => p,
            _ => unreachable!("wait returns the packet it matched"),
        }
    }

    /// Drive the connection until it fails, and return how.
    pub async fn closed(&mut self) -> ConnectionError {
        tokio::time::timeout(DEADLINE, async {
            loop {
                if let Err(e) = self.events.poll().await {
                    return e;
                }
            }
        })
        .await
        .expect("the connection ended before the deadline")
    }

    /// Poll until an incoming packet matches `want`, keeping publishes
    /// that do not.
    async fn wait(&mut self, want: impl Fn(&Packet) -> bool) -> Packet {
        let result = tokio::time::timeout(DEADLINE, async {
            loop {
                match self.events.poll().await {
                    Ok(Event::Incoming(p)) if want(&p) => return Ok(p),
                    Ok(Event::Incoming(Packet::Publish(p))) => self.pending.push_back(p),
                    Ok(_) => {}
                    Err(e) => return Err(e),
                }
            }
        })
        .await;
        match result {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => panic!("connection failed while waiting: {e:?}"),
            Err(_) => panic!("nothing arrived within {DEADLINE:?}"),
        }
    }
}

/// The topic of a received message, as text.
pub fn topic(p: &Publish) -> String {
    String::from_utf8_lossy(&p.topic).into_owned()
}
