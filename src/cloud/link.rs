//! The vehicle's MQTT v5 link to the cloud (rumqttc over rustls).
//!
//! One tokio task owns rumqttc's [`EventLoop`] and is the only thing that
//! polls it. [`Link`] is a cheap handle that callers clone; it talks to
//! the task through a small book-keeping table under a mutex, and puts
//! publishes into rumqttc's request channel itself, in the same critical
//! section that records them, so the order of the channel is known.
//!
//! What the link adds to rumqttc:
//! - **Paced reconnects.** rumqttc reconnects as fast as it is polled. On a
//!   connection error the task sleeps an exponential [`Backoff`] with jitter
//!   before polling again, and resets it after a successful CONNACK.
//! - **Persistent session.** MQTT 5 Clean Start = 0 with a Session Expiry
//!   Interval. The subscriptions are sent again after every CONNACK: when
//!   the broker answers without a session (it restarted, or the session
//!   expired) publishes wait for the SUBACK; when it kept the session they
//!   do not, and the SUBSCRIBE only restores what a broker may have lost
//!   (mosquitto 2.0.11 keeps a session's plain subscriptions over a
//!   restart, but not its `$share/...` ones).
//! - **Request and response** ([`Link::request`]) with the MQTT 5 Response
//!   Topic and Correlation Data, a timeout per request, re-publication after
//!   a reconnect, and duplicate answers dropped and counted.
//! - **Confirmed publishes** ([`Link::publish_confirmed`]) that resolve on
//!   the PUBACK of that very publish.
//! - **Observable state**: [`LinkState`] on a watch channel and
//!   [`LinkCounters`].
//!
//! # Waking up
//! A parked car's gateway is frozen or suspended for hours; the broker drops
//! the connection meanwhile, and keepalive alone would find that out only
//! after up to a keepalive period. So the link checks at once, without
//! waiting for keepalive or a backoff delay, when:
//! - a request comes and the broker has sent nothing for [`CONFIRMED_FOR`]
//!   (a charge request after a freeze): a PINGREQ goes out with it, and if
//!   nothing comes back within [`LinkConfig::wake_check_timeout`] the
//!   connection is dropped and made again at once;
//! - the gap between `CLOCK_BOOTTIME` and `CLOCK_MONOTONIC` grew (the
//!   machine was suspended): the same check;
//! - a request comes while the link waits out a reconnect delay: it
//!   reconnects now. While a request waits, the first reconnect after a
//!   lost connection is not delayed either; later ones back off as usual.
//!
//! # Packet identifiers and PUBACKs
//! rumqttc assigns the packet identifier when its event loop takes a
//! publish from its request channel, and reports it as
//! `Outgoing::Publish(pkid)` (or `Outgoing::AwaitAck(pkid)` when that id is
//! still in flight and the publish must wait, a "collision"). The channel is
//! first in, first out, and a publish enters it only together with its entry
//! in a FIFO of the link (under one lock), so the n-th such event belongs to
//! the n-th entry. The PUBACK carrying that id then resolves it.
//!
//! # Reconnects and re-sending
//! On a connection error the link discards what rumqttc would re-send by
//! itself (its `pending` queue, and any requests still in its channel) and
//! forgets every packet id. After the next CONNACK it publishes again, with
//! new packet ids, everything that has no PUBACK yet, in the order it was
//! first published. A request whose publish had been acknowledged is
//! published again only when the broker lost the session (Session Present =
//! 0): with the session kept, the broker still holds the answer for us. So
//! QoS 1 is at least once across reconnects: a receiver may see a request
//! twice, and the requester drops the second answer (counted in
//! `duplicate_responses`). This deviates from MQTT 5's "re-send with the
//! original packet id and DUP set" when the session was kept; for QoS 1 the
//! broker keeps no state about our incoming publishes, so the effect is the
//! same.
//!
//! A [`Link::publish_confirmed`] waits across reconnects until its PUBACK
//! (or until the link stops). If the caller drops the future, the publish is
//! not sent again after a reconnect; the durable outbox above re-publishes
//! anything it has no confirmation for.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{
    ConnAck, Filter, PubAck, Publish, PublishProperties, SubAck, SubscribeReasonCode,
};
use rumqttc::v5::{AsyncClient, ClientError, ConnectionError, Event, EventLoop, MqttOptions};
use rumqttc::{NetworkOptions, Outgoing, TlsConfiguration, Transport};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{Instrument, debug, error, info, warn};

use super::tls::{TlsError, TlsFiles, client_config};
use crate::backoff::Backoff;

pub use rumqttc::v5::mqttbytes::QoS;
pub use rumqttc::v5::mqttbytes::v5::PubAckReason;

/// How long [`Link::shutdown`] waits for the DISCONNECT to be written.
const DISCONNECT_GRACE: Duration = Duration::from_secs(2);
/// Requests and publishes rumqttc's channel holds before the link queues
/// them itself.
const REQUEST_CHANNEL: usize = 64;
/// Answers a [`Responses`] buffers; more are dropped and counted.
const STREAM_CAPACITY: usize = 8;
/// Upper limit of QoS 1 publishes in flight (the broker's Receive Maximum
/// may lower it). rumqttc allocates a slot for each.
const MAX_INFLIGHT: u16 = 64;
/// How many finished correlations are remembered to tell a duplicate or
/// late answer from an unsolicited message.
const FINISHED_MEMORY: usize = 1024;
/// Room for the fixed header, topic and properties of an incoming packet
/// beyond its payload.
const PACKET_OVERHEAD: usize = 8 * 1024;
/// A request finds the link alive only if the broker sent something within
/// this time; otherwise the link checks at once (see "Waking up" above).
const CONFIRMED_FOR: Duration = Duration::from_secs(1);
/// How often the boot-time and monotonic clocks are compared.
const SUSPEND_CHECK: Duration = Duration::from_secs(1);
/// A growth of their gap at least this large is a suspend.
const SUSPEND_MIN: Duration = Duration::from_secs(2);

/// Everything the link needs. [`LinkConfig::new`] fills in defaults for
/// the tuning fields.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// Broker host name (checked against the broker certificate) or IP.
    pub host: String,
    pub port: u16,
    /// MQTT client id; with a persistent session it names the session.
    pub client_id: String,
    /// CA, client certificate and key for mutual TLS.
    pub tls: TlsFiles,
    /// MQTT keepalive (5 s to 18 h; the broker may override it).
    pub keep_alive: Duration,
    /// How long the broker keeps the session (subscriptions and queued
    /// QoS 1 messages) after the connection drops.
    pub session_expiry: Duration,
    /// First reconnect delay.
    pub backoff_min: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
    /// Default timeout of a request, for callers that have no better one
    /// ([`Link::request_timeout`]).
    pub request_timeout: Duration,
    /// Filters subscribed after every CONNACK without a session. Response
    /// topics of requests must be among them.
    pub subscriptions: Vec<(String, QoS)>,
    /// Largest payload sent or accepted; also announced to the broker as
    /// the Maximum Packet Size (plus room for headers).
    pub max_payload: usize,
    /// Capacity of the [`Incoming`] channel; overflow is dropped and counted.
    pub incoming_capacity: usize,
    /// How long a wake-up check (a PINGREQ) may go unanswered before the
    /// connection is taken as dead and made again.
    pub wake_check_timeout: Duration,
}

impl LinkConfig {
    /// A configuration with the default tuning: keepalive 30 s, session
    /// expiry 1 h, backoff 500 ms to 60 s, request timeout 10 s, payload up
    /// to 64 KiB, 256 incoming messages buffered.
    pub fn new(
        host: impl Into<String>,
        port: u16,
        client_id: impl Into<String>,
        tls: TlsFiles,
    ) -> Self {
        LinkConfig {
            host: host.into(),
            port,
            client_id: client_id.into(),
            tls,
            keep_alive: Duration::from_secs(30),
            session_expiry: Duration::from_secs(3600),
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
            request_timeout: Duration::from_secs(10),
            subscriptions: Vec::new(),
            max_payload: 64 * 1024,
            incoming_capacity: 256,
            wake_check_timeout: Duration::from_secs(2),
        }
    }

    fn validate(&self) -> Result<(), LinkError> {
        let bad = |field: &'static str, reason: String| Err(LinkError::Config { field, reason });
        if self.host.is_empty() {
            return bad("host", "is empty".into());
        }
        if self.client_id.is_empty() || self.client_id.len() > 256 {
            return bad("client_id", "must be 1 to 256 bytes".into());
        }
        let ka = self.keep_alive.as_secs();
        if !(5..=u64::from(u16::MAX)).contains(&ka) {
            return bad("keep_alive", format!("{ka} s is outside 5..=65535 s"));
        }
        if self.session_expiry.as_secs() > u64::from(u32::MAX) {
            return bad("session_expiry", "exceeds 2^32-1 seconds".into());
        }
        if self.backoff_min < Duration::from_millis(1) || self.backoff_min > self.backoff_max {
            return bad(
                "backoff_min",
                format!(
                    "{:?} must be at least 1 ms and not above backoff_max {:?}",
                    self.backoff_min, self.backoff_max
                ),
            );
        }
        if self.max_payload == 0 || self.max_payload > 16 * 1024 * 1024 {
            return bad(
                "max_payload",
                format!("{} is outside 1..=16 MiB", self.max_payload),
            );
        }
        if self.incoming_capacity == 0 {
            return bad("incoming_capacity", "must be at least 1".into());
        }
        for (filter, _) in &self.subscriptions {
            if !valid_filter(filter) {
                return bad(
                    "subscriptions",
                    format!("{filter:?} is not a valid topic filter"),
                );
            }
        }
        Ok(())
    }
}

/// A message from the broker that was not the answer to a pending request
/// (or, from [`Link::request`], the answer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    pub topic: String,
    pub payload: Vec<u8>,
    /// MQTT 5 Correlation Data, if the sender set it.
    pub correlation: Option<Vec<u8>>,
    /// MQTT 5 Response Topic, if the sender expects an answer.
    pub response_topic: Option<String>,
}

/// Where the connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Opening TCP, TLS and MQTT, and subscribing.
    Connecting,
    /// CONNACK received and, when the broker had no session, the
    /// subscriptions acknowledged (SUBACK): requests can be answered.
    Connected,
    /// The last attempt failed (or the connection dropped); waiting
    /// `delay` before attempt number `attempt + 1`.
    Backoff { attempt: u32, delay: Duration },
    /// Shut down, or every [`Link`] handle was dropped.
    Stopped,
}

/// A snapshot of what the link has done since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkCounters {
    /// Wake-up checks (PINGREQs sent because a request found the link
    /// unconfirmed, or after a suspend).
    pub wake_checks: u64,
    /// Reconnects made at once for a waiting request: a wake-up check that
    /// got no answer, or a reconnect delay cut short.
    pub wake_reconnects: u64,
    /// Successful CONNACKs.
    pub connects: u64,
    /// Failed connection attempts and dropped connections.
    pub connection_errors: u64,
    /// QoS 1 PUBLISH packets written, re-sends included.
    pub publishes: u64,
    /// PUBACKs received.
    pub pubacks: u64,
    /// Calls of [`Link::request`].
    pub requests: u64,
    /// Answers matched to a pending request.
    pub responses: u64,
    /// Requests that got no answer in time.
    pub request_timeouts: u64,
    /// Further answers for a request already answered: dropped.
    pub duplicate_responses: u64,
    /// Answers for a request that had timed out or was abandoned: dropped.
    pub late_responses: u64,
    /// Messages handed to the [`Incoming`] receiver.
    pub incoming: u64,
    /// Messages that could not be handed over (receiver full or gone,
    /// payload too large, topic not UTF-8): dropped.
    pub incoming_dropped: u64,
    /// SUBSCRIBEs sent, one after each CONNACK (the first connection
    /// included).
    pub resubscribes: u64,
}

/// Why a link operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("link configuration: {field} {reason}")]
    Config { field: &'static str, reason: String },
    #[error("link TLS setup: {0}")]
    Tls(#[from] TlsError),
    #[error(
        "topic {topic:?} cannot be published to (empty, wildcard, NUL or longer than 65535 bytes)"
    )]
    InvalidTopic { topic: String },
    #[error("payload of {size} bytes for {topic} exceeds the limit of {max} bytes")]
    PayloadTooLarge {
        topic: String,
        size: usize,
        max: usize,
    },
    #[error("correlation data of {size} bytes for {topic} exceeds 65535 bytes")]
    CorrelationTooLarge { topic: String, size: usize },
    #[error("a request with this correlation data is already pending on {topic}")]
    DuplicateCorrelation { topic: String },
    #[error("no answer on {response_topic} to the request on {topic} within {after:?}")]
    Timeout {
        topic: String,
        response_topic: String,
        after: Duration,
    },
    #[error("broker refused the publish on {topic}: {reason:?}")]
    Refused { topic: String, reason: PubAckReason },
    #[error("message on {topic} has no response topic to reply to")]
    NoResponseTopic { topic: String },
    #[error("the link is stopped")]
    Stopped,
}

/// A handle to the link. Clones share one connection. When the last clone
/// is dropped the task disconnects and stops in the background;
/// [`Link::shutdown`] does the same and waits for it.
#[derive(Clone)]
pub struct Link {
    inner: Arc<Inner>,
    stop: Arc<watch::Sender<bool>>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("client_id", &self.inner.client_id)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

impl Link {
    /// Check the configuration, load the TLS files and spawn the task that
    /// connects and keeps the connection. Returns at once; the link
    /// connects in the background (watch [`Link::state_watch`]).
    pub fn start(config: LinkConfig) -> Result<(Link, mpsc::Receiver<Incoming>), LinkError> {
        config.validate()?;
        let tls = client_config(&config.tls)?;
        let mut options =
            MqttOptions::new(config.client_id.clone(), config.host.clone(), config.port);
        options
            .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)))
            .set_keep_alive(config.keep_alive)
            .set_clean_start(false)
            .set_session_expiry_interval(Some(
                u32::try_from(config.session_expiry.as_secs()).unwrap_or(u32::MAX),
            ))
            .set_max_packet_size(Some(
                u32::try_from(config.max_payload + PACKET_OVERHEAD).unwrap_or(u32::MAX),
            ))
            .set_outgoing_inflight_upper_limit(MAX_INFLIGHT);
        // Requests and answers are small and latency-bound: without
        // TCP_NODELAY, Nagle's algorithm and delayed ACKs add ~40 ms per leg.
        let mut network = NetworkOptions::new();
        network.set_tcp_nodelay(true);
        options.set_network_options(network);
        let (client, eventloop) = AsyncClient::new(options, REQUEST_CHANNEL);
        let (incoming_tx, incoming_rx) = mpsc::channel(config.incoming_capacity);
        let (state_tx, _) = watch::channel(LinkState::Connecting);
        let (stop_tx, stop_rx) = watch::channel(false);
        let seed = getrandom::u64().unwrap_or_else(|_| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
        let backoff = Backoff::jittered(config.backoff_min, config.backoff_max, seed);
        let inner = Arc::new(Inner {
            client_id: config.client_id.clone(),
            client,
            subscriptions: config
                .subscriptions
                .iter()
                .map(|(f, q)| Filter::new(f.clone(), *q))
                .collect(),
            max_payload: config.max_payload,
            request_timeout: config.request_timeout,
            incoming_tx,
            state: state_tx,
            counters: Counters::default(),
            book: Mutex::new(Book::default()),
            wake: Notify::new(),
            wake_check_timeout: config.wake_check_timeout,
        });
        let span = tracing::info_span!("link", client = %config.client_id, broker = %format!("{}:{}", config.host, config.port));
        tokio::spawn(run(inner.clone(), eventloop, backoff, stop_rx).instrument(span));
        Ok((
            Link {
                inner,
                stop: Arc::new(stop_tx),
            },
            incoming_rx,
        ))
    }

    /// Publish `payload` on `topic` at QoS 1 with Response Topic and
    /// Correlation Data, and wait up to `timeout` for the message on
    /// `response_topic` that carries the same correlation data.
    ///
    /// If the connection drops first, the request is published again after
    /// the reconnect (see the module docs). Only the first answer counts.
    pub async fn request(
        &self,
        topic: &str,
        response_topic: &str,
        correlation: Vec<u8>,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Incoming, LinkError> {
        let mut rx =
            self.inner
                .submit_request(topic, response_topic, correlation.clone(), payload)?;
        let mut guard = RequestGuard {
            inner: &self.inner,
            correlation: Some(correlation),
        };
        let result = match tokio::time::timeout(timeout, &mut rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(LinkError::Stopped),
            Err(_) => {
                let still_pending = guard.finish(Finished::TimedOut);
                if still_pending {
                    self.inner
                        .counters
                        .request_timeouts
                        .fetch_add(1, Ordering::Relaxed);
                    debug!(topic, response_topic, ?timeout, "request timed out");
                    Err(LinkError::Timeout {
                        topic: topic.to_owned(),
                        response_topic: response_topic.to_owned(),
                        after: timeout,
                    })
                } else {
                    // Answered between the deadline and the lock.
                    rx.try_recv().unwrap_or(Err(LinkError::Stopped))
                }
            }
        };
        guard.correlation = None;
        result
    }

    /// Like [`Link::request`], but every answer with this correlation data
    /// is handed over until the returned [`Responses`] is dropped: for
    /// exchanges with more than one answer (PendingApproval, then the
    /// grant), and so that a forged first answer cannot hide the genuine
    /// one. The request is re-published after a reconnect until the first
    /// answer arrives. The caller applies its own deadline.
    pub async fn request_stream(
        &self,
        topic: &str,
        response_topic: &str,
        correlation: Vec<u8>,
        payload: Vec<u8>,
    ) -> Result<Responses, LinkError> {
        let (tx, rx) = mpsc::channel(STREAM_CAPACITY);
        self.inner.submit_request_with(
            topic,
            response_topic,
            correlation.clone(),
            payload,
            Reply::Stream(tx),
        )?;
        Ok(Responses {
            link: self.clone(),
            correlation,
            answers: rx,
            answered: false,
        })
    }

    /// Publish at QoS 1 and resolve once the broker's PUBACK for this
    /// publish arrives (across reconnects), with an error if the broker
    /// refuses it, or when the link stops first.
    pub async fn publish_confirmed(
        &self,
        topic: &str,
        payload: Vec<u8>,
        correlation: Option<Vec<u8>>,
    ) -> Result<(), LinkError> {
        self.publish_acked(topic, payload, correlation)
            .await
            .map(|_| ())
    }

    /// [`Link::publish_confirmed`], giving the reason of the PUBACK that
    /// accepted the publish: `Success`, or `NoMatchingSubscribers` when the
    /// broker took it but had no subscriber to give it to (MQTT v5), so that
    /// nobody will ever receive it.
    pub async fn publish_acked(
        &self,
        topic: &str,
        payload: Vec<u8>,
        correlation: Option<Vec<u8>>,
    ) -> Result<PubAckReason, LinkError> {
        let rx = self.inner.submit_confirm(topic, payload, correlation)?;
        rx.await.unwrap_or(Err(LinkError::Stopped))
    }

    /// Answer `request` on its Response Topic, echoing its Correlation
    /// Data, at QoS 1; resolves on the PUBACK like [`Link::publish_confirmed`].
    pub async fn reply(&self, request: &Incoming, payload: Vec<u8>) -> Result<(), LinkError> {
        let topic =
            request
                .response_topic
                .as_deref()
                .ok_or_else(|| LinkError::NoResponseTopic {
                    topic: request.topic.clone(),
                })?;
        self.publish_confirmed(topic, payload, request.correlation.clone())
            .await
    }

    /// The current state.
    pub fn state(&self) -> LinkState {
        *self.inner.state.borrow()
    }

    /// A receiver of state changes (e.g. to wait until `Connected`).
    pub fn state_watch(&self) -> watch::Receiver<LinkState> {
        self.inner.state.subscribe()
    }

    /// A snapshot of the counters.
    pub fn counters(&self) -> LinkCounters {
        self.inner.counters.snapshot()
    }

    /// The configured default request timeout.
    pub fn request_timeout(&self) -> Duration {
        self.inner.request_timeout
    }

    /// Disconnect cleanly (MQTT DISCONNECT, so the broker keeps the session
    /// and sends no will), fail whatever is still waiting with
    /// [`LinkError::Stopped`], and wait until the task has ended.
    pub async fn shutdown(&self) {
        self.stop.send_replace(true);
        let mut state = self.inner.state.subscribe();
        // The task's exit guard sets Stopped even if it ends abnormally.
        let _ = state.wait_for(|s| *s == LinkState::Stopped).await;
    }
}

/// The answers to one [`Link::request_stream`]. Dropping it ends the
/// request: later answers count as duplicates (or late, if none came).
pub struct Responses {
    link: Link,
    correlation: Vec<u8>,
    answers: mpsc::Receiver<Result<Incoming, LinkError>>,
    answered: bool,
}

impl Responses {
    /// The next answer; `None` once the link has stopped.
    pub async fn next(&mut self) -> Option<Incoming> {
        match self.answers.recv().await {
            Some(Ok(answer)) => {
                self.answered = true;
                Some(answer)
            }
            Some(Err(_)) | None => None,
        }
    }
}

impl Drop for Responses {
    fn drop(&mut self) {
        let how = if self.answered {
            Finished::Answered
        } else {
            Finished::Abandoned
        };
        RequestGuard {
            inner: &self.link.inner,
            correlation: Some(std::mem::take(&mut self.correlation)),
        }
        .finish(how);
    }
}

/// Removes a request from the book when its caller stops waiting (timeout,
/// or the future dropped), so a late answer is recognised as such.
struct RequestGuard<'a> {
    inner: &'a Inner,
    correlation: Option<Vec<u8>>,
}

impl RequestGuard<'_> {
    /// Returns whether the request was still pending.
    fn finish(&mut self, how: Finished) -> bool {
        let Some(correlation) = self.correlation.take() else {
            return false;
        };
        let mut book = self.inner.lock();
        match book.requests.remove(&correlation) {
            Some(pending) => {
                book.ops.remove(&pending.op);
                book.finished
                    .insert(correlation, pending.response_topic, how);
                true
            }
            None => false,
        }
    }
}

impl Drop for RequestGuard<'_> {
    fn drop(&mut self) {
        self.finish(Finished::Abandoned);
    }
}

struct Inner {
    client_id: String,
    client: AsyncClient,
    subscriptions: Vec<Filter>,
    max_payload: usize,
    request_timeout: Duration,
    incoming_tx: mpsc::Sender<Incoming>,
    state: watch::Sender<LinkState>,
    counters: Counters,
    book: Mutex<Book>,
    /// Rung when the link should check itself now (see "Waking up").
    wake: Notify,
    wake_check_timeout: Duration,
}

#[derive(Default)]
struct Counters {
    wake_checks: AtomicU64,
    wake_reconnects: AtomicU64,
    connects: AtomicU64,
    connection_errors: AtomicU64,
    publishes: AtomicU64,
    pubacks: AtomicU64,
    requests: AtomicU64,
    responses: AtomicU64,
    request_timeouts: AtomicU64,
    duplicate_responses: AtomicU64,
    late_responses: AtomicU64,
    incoming: AtomicU64,
    incoming_dropped: AtomicU64,
    resubscribes: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> LinkCounters {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        LinkCounters {
            wake_checks: g(&self.wake_checks),
            wake_reconnects: g(&self.wake_reconnects),
            connects: g(&self.connects),
            connection_errors: g(&self.connection_errors),
            publishes: g(&self.publishes),
            pubacks: g(&self.pubacks),
            requests: g(&self.requests),
            responses: g(&self.responses),
            request_timeouts: g(&self.request_timeouts),
            duplicate_responses: g(&self.duplicate_responses),
            late_responses: g(&self.late_responses),
            incoming: g(&self.incoming),
            incoming_dropped: g(&self.incoming_dropped),
            resubscribes: g(&self.resubscribes),
        }
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

type OpId = u64;

/// A QoS 1 publish the link has not seen a PUBACK for (or, for a request,
/// no answer yet).
struct Op {
    topic: String,
    publish: Publish,
    kind: OpKind,
}

enum OpKind {
    /// `publish_acked` / `publish_confirmed` / `reply`: resolved by the
    /// PUBACK, with its reason (`Success` or `NoMatchingSubscribers`).
    Confirm(Option<oneshot::Sender<Result<PubAckReason, LinkError>>>),
    /// `request`: kept until the answer, which may need a re-publish.
    Request { correlation: Vec<u8>, acked: bool },
}

struct PendingRequest {
    op: OpId,
    response_topic: String,
    reply: Reply,
}

/// Where a request's answers go.
enum Reply {
    /// [`Link::request`]: the first answer ends the request.
    Once(oneshot::Sender<Result<Incoming, LinkError>>),
    /// [`Link::request_stream`]: every answer, until the caller is done.
    Stream(mpsc::Sender<Result<Incoming, LinkError>>),
}

impl Reply {
    /// Tell the waiter; `false` if a stream's buffer was full.
    fn send(self, answer: Result<Incoming, LinkError>) -> bool {
        match self {
            Reply::Once(tx) => {
                let _ = tx.send(answer);
                true
            }
            Reply::Stream(tx) => {
                !matches!(tx.try_send(answer), Err(mpsc::error::TrySendError::Full(_)))
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Finished {
    Answered,
    TimedOut,
    Abandoned,
}

/// The last [`FINISHED_MEMORY`] finished correlations.
#[derive(Default)]
struct FinishedSet {
    order: VecDeque<Vec<u8>>,
    map: HashMap<Vec<u8>, (String, Finished)>,
}

impl FinishedSet {
    fn insert(&mut self, correlation: Vec<u8>, response_topic: String, how: Finished) {
        if self
            .map
            .insert(correlation.clone(), (response_topic, how))
            .is_none()
        {
            self.order.push_back(correlation);
        }
        while self.order.len() > FINISHED_MEMORY {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
    }

    fn get(&self, correlation: &[u8], topic: &str) -> Option<Finished> {
        self.map
            .get(correlation)
            .filter(|(t, _)| t == topic)
            .map(|(_, how)| *how)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Phase {
    /// No connection; publishes wait in `ops`.
    #[default]
    Down,
    /// CONNACK seen. `subscribed` is false between a SUBSCRIBE after a
    /// CONNACK without session and its SUBACK: publishes wait so that no
    /// answer can arrive before the subscription exists.
    Up {
        subscribed: bool,
    },
    /// Shutting down: nothing new is sent.
    Stopping,
    Stopped,
}

/// Per-connection packet-id bookkeeping; reset on every connection error.
#[derive(Default)]
struct Wire {
    /// Ops waiting for room in rumqttc's channel (or for the SUBACK).
    to_send: VecDeque<OpId>,
    /// Ops in rumqttc's channel, in order, waiting for their packet id.
    assigning: VecDeque<OpId>,
    /// Ops on the wire, by packet id, waiting for their PUBACK.
    by_pkid: HashMap<u16, OpId>,
    /// An op whose packet id was still in flight: rumqttc holds it back and
    /// sends it with that id when the older publish is acknowledged.
    collided: Option<(u16, OpId)>,
    /// The `Outgoing::Publish` rumqttc reports when it sends `collided`.
    collision_sent: Option<u16>,
    /// Largest packet the broker accepts (CONNACK Maximum Packet Size).
    broker_max_packet: Option<u32>,
}

#[derive(Default)]
struct Book {
    phase: Phase,
    next_op: OpId,
    ops: BTreeMap<OpId, Op>,
    requests: HashMap<Vec<u8>, PendingRequest>,
    finished: FinishedSet,
    wire: Wire,
    /// Connection attempts failed since the link was last up: only the
    /// first and every tenth are logged as warnings, so a broker that is
    /// down for hours does not fill the journal.
    failed_attempts: u32,
    /// When the broker last sent anything on this connection.
    last_heard: Option<Instant>,
}

impl Book {
    fn add_op(&mut self, op: Op) -> OpId {
        let id = self.next_op;
        self.next_op += 1;
        self.ops.insert(id, op);
        id
    }

    /// Complete an op that will not be sent (again): tell its waiter.
    fn fail_op(&mut self, id: OpId, error: impl Fn() -> LinkError) {
        let Some(op) = self.ops.remove(&id) else {
            return;
        };
        match op.kind {
            OpKind::Confirm(Some(tx)) => {
                let _ = tx.send(Err(error()));
            }
            OpKind::Confirm(None) => {}
            OpKind::Request { correlation, .. } => {
                if let Some(pending) = self.requests.remove(&correlation) {
                    pending.reply.send(Err(error()));
                    self.finished
                        .insert(correlation, pending.response_topic, Finished::Abandoned);
                }
            }
        }
    }
}

/// What the task does after an event.
enum Next {
    Continue,
    Connected,
    Disconnected,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Book> {
        // A panic elsewhere while holding the lock leaves the book usable:
        // every update to it is a single step.
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check(
        &self,
        topic: &str,
        payload: &[u8],
        correlation: Option<&[u8]>,
    ) -> Result<(), LinkError> {
        if !valid_topic(topic) {
            return Err(LinkError::InvalidTopic {
                topic: topic.to_owned(),
            });
        }
        if payload.len() > self.max_payload {
            return Err(LinkError::PayloadTooLarge {
                topic: topic.to_owned(),
                size: payload.len(),
                max: self.max_payload,
            });
        }
        if let Some(c) = correlation
            && c.len() > usize::from(u16::MAX)
        {
            return Err(LinkError::CorrelationTooLarge {
                topic: topic.to_owned(),
                size: c.len(),
            });
        }
        Ok(())
    }

    /// Record a confirmed publish and queue it; the receiver resolves on
    /// its PUBACK.
    fn submit_confirm(
        &self,
        topic: &str,
        payload: Vec<u8>,
        correlation: Option<Vec<u8>>,
    ) -> Result<oneshot::Receiver<Result<PubAckReason, LinkError>>, LinkError> {
        self.check(topic, &payload, correlation.as_deref())?;
        let properties = correlation.map(|c| PublishProperties {
            correlation_data: Some(c.into()),
            ..PublishProperties::default()
        });
        let (tx, rx) = oneshot::channel();
        let mut book = self.lock();
        if book.phase == Phase::Stopped {
            return Err(LinkError::Stopped);
        }
        let id = book.add_op(Op {
            topic: topic.to_owned(),
            publish: Publish::new(topic, QoS::AtLeastOnce, payload, properties),
            kind: OpKind::Confirm(Some(tx)),
        });
        self.enqueue(&mut book, id);
        Ok(rx)
    }

    /// Record a request and queue its publish; the receiver gets the answer.
    /// Submit a request whose first answer ends it.
    fn submit_request(
        &self,
        topic: &str,
        response_topic: &str,
        correlation: Vec<u8>,
        payload: Vec<u8>,
    ) -> Result<oneshot::Receiver<Result<Incoming, LinkError>>, LinkError> {
        let (tx, rx) = oneshot::channel();
        self.submit_request_with(topic, response_topic, correlation, payload, Reply::Once(tx))?;
        Ok(rx)
    }

    fn submit_request_with(
        &self,
        topic: &str,
        response_topic: &str,
        correlation: Vec<u8>,
        payload: Vec<u8>,
        reply: Reply,
    ) -> Result<(), LinkError> {
        self.check(topic, &payload, Some(&correlation))?;
        if !valid_topic(response_topic) {
            return Err(LinkError::InvalidTopic {
                topic: response_topic.to_owned(),
            });
        }
        let mut book = self.lock();
        if book.phase == Phase::Stopped {
            return Err(LinkError::Stopped);
        }
        if book.requests.contains_key(&correlation) {
            return Err(LinkError::DuplicateCorrelation {
                topic: topic.to_owned(),
            });
        }
        let properties = PublishProperties {
            response_topic: Some(response_topic.to_owned()),
            correlation_data: Some(correlation.clone().into()),
            ..PublishProperties::default()
        };
        let id = book.add_op(Op {
            topic: topic.to_owned(),
            publish: Publish::new(topic, QoS::AtLeastOnce, payload, Some(properties)),
            kind: OpKind::Request {
                correlation: correlation.clone(),
                acked: false,
            },
        });
        book.requests.insert(
            correlation,
            PendingRequest {
                op: id,
                response_topic: response_topic.to_owned(),
                reply,
            },
        );
        bump(&self.counters.requests);
        self.enqueue(&mut book, id);
        let confirmed = matches!(book.phase, Phase::Up { .. })
            && book.last_heard.is_some_and(|t| t.elapsed() < CONFIRMED_FOR);
        drop(book);
        if !confirmed {
            self.wake.notify_one();
        }
        Ok(())
    }

    fn set_state(&self, state: LinkState) {
        self.state.send_if_modified(|s| {
            let changed = *s != state;
            *s = state;
            changed
        });
    }

    /// Queue op `id` and, when connected, hand what fits to rumqttc.
    fn enqueue(&self, book: &mut Book, id: OpId) {
        if matches!(book.phase, Phase::Up { .. }) {
            book.wire.to_send.push_back(id);
            self.pump(book);
        }
        // Otherwise the op waits in `ops`; the next CONNACK queues it.
    }

    /// Move ops from `to_send` into rumqttc's channel while it has room.
    fn pump(&self, book: &mut Book) {
        if book.phase != (Phase::Up { subscribed: true }) {
            return;
        }
        while let Some(&id) = book.wire.to_send.front() {
            let Some(op) = book.ops.get(&id) else {
                // Finished (answered, timed out) while waiting.
                book.wire.to_send.pop_front();
                continue;
            };
            if let OpKind::Confirm(Some(tx)) = &op.kind
                && tx.is_closed()
            {
                book.wire.to_send.pop_front();
                book.ops.remove(&id);
                continue;
            }
            if let Some(max) = book.wire.broker_max_packet
                && packet_size_estimate(&op.publish) > u64::from(max)
            {
                book.wire.to_send.pop_front();
                let (topic, size) = (op.topic.clone(), op.publish.payload.len());
                warn!(
                    topic,
                    size, max, "publish exceeds the broker's maximum packet size"
                );
                book.fail_op(id, || LinkError::PayloadTooLarge {
                    topic: topic.clone(),
                    size,
                    max: max as usize,
                });
                continue;
            }
            let sent = self.client.try_publish_with_properties(
                op.topic.clone(),
                QoS::AtLeastOnce,
                false,
                op.publish.payload.clone(),
                op.publish.properties.clone().unwrap_or_default(),
            );
            match sent {
                Ok(()) => {
                    book.wire.to_send.pop_front();
                    book.wire.assigning.push_back(id);
                }
                // Channel full: the event loop drains it and the task
                // pumps again after each event.
                Err(ClientError::TryRequest(_)) => break,
                // rumqttc refused the topic (checked before; kept honest).
                Err(ClientError::Request(_)) => {
                    book.wire.to_send.pop_front();
                    let topic = op.topic.clone();
                    book.fail_op(id, || LinkError::InvalidTopic {
                        topic: topic.clone(),
                    });
                }
            }
        }
    }

    fn on_event(&self, event: Event) -> Next {
        let mut book = self.lock();
        let next = self.handle_event(&mut book, event);
        self.pump(&mut book);
        next
    }

    fn handle_event(&self, book: &mut Book, event: Event) -> Next {
        use rumqttc::v5::Incoming as In;
        if let Event::Incoming(_) = &event {
            book.last_heard = Some(Instant::now());
        }
        match event {
            Event::Incoming(In::ConnAck(ack)) => {
                self.on_connack(book, &ack);
                return Next::Connected;
            }
            Event::Incoming(In::Publish(publish)) => self.on_publish(book, publish),
            Event::Incoming(In::PubAck(ack)) => self.on_puback(book, &ack),
            Event::Incoming(In::SubAck(ack)) => self.on_suback(book, &ack),
            Event::Incoming(In::Disconnect(d)) => {
                warn!(reason = ?d.reason_code, "broker sent DISCONNECT");
            }
            Event::Incoming(_) => {}
            Event::Outgoing(Outgoing::Publish(pkid)) if pkid != 0 => {
                bump(&self.counters.publishes);
                if book.wire.collision_sent == Some(pkid) {
                    book.wire.collision_sent = None;
                } else if let Some(id) = book.wire.assigning.pop_front() {
                    book.wire.by_pkid.insert(pkid, id);
                } else {
                    warn!(pkid, "publish with no queued op (not issued by the link)");
                }
            }
            Event::Outgoing(Outgoing::AwaitAck(pkid)) => {
                debug!(
                    pkid,
                    "packet id still in flight; rumqttc holds the publish back"
                );
                if let Some(id) = book.wire.assigning.pop_front() {
                    book.wire.collided = Some((pkid, id));
                }
            }
            Event::Outgoing(Outgoing::Disconnect) => return Next::Disconnected,
            Event::Outgoing(_) => {}
        }
        Next::Continue
    }

    fn on_connack(&self, book: &mut Book, ack: &ConnAck) {
        bump(&self.counters.connects);
        book.wire = Wire {
            broker_max_packet: ack.properties.as_ref().and_then(|p| p.max_packet_size),
            ..Wire::default()
        };
        // Subscribe after every CONNACK, also when the broker says it kept
        // the session: a broker may keep a session but not all of its
        // subscriptions (mosquitto 2.0.11 restores a persistent session's
        // plain subscriptions after a restart, but not its `$share/...`
        // ones). SUBSCRIBE replaces an existing subscription. Publishes wait
        // for the SUBACK only when the session was lost.
        let resubscribe = !self.subscriptions.is_empty();
        if resubscribe {
            match self.client.try_subscribe_many(self.subscriptions.clone()) {
                Ok(()) => {
                    bump(&self.counters.resubscribes);
                }
                Err(e) => error!(error = %e, "could not queue the SUBSCRIBE"),
            }
        }
        let wait_for_suback = resubscribe && !ack.session_present;
        if book.phase != Phase::Stopping {
            book.phase = Phase::Up {
                subscribed: !wait_for_suback,
            };
        }
        // Everything without a PUBACK goes out again, oldest first; an
        // acknowledged request only if the broker lost the answer with the
        // session.
        let mut resend = Vec::new();
        book.ops.retain(|&id, op| match &mut op.kind {
            OpKind::Confirm(Some(tx)) if tx.is_closed() => false,
            OpKind::Confirm(_) => {
                resend.push(id);
                true
            }
            OpKind::Request { acked, .. } => {
                if !*acked || !ack.session_present {
                    *acked = false;
                    resend.push(id);
                }
                true
            }
        });
        book.wire.to_send.extend(resend.iter().copied());
        info!(
            session_present = ack.session_present,
            resubscribe,
            resend = resend.len(),
            "connected"
        );
        if !wait_for_suback {
            self.set_state(LinkState::Connected);
        }
    }

    fn on_suback(&self, book: &mut Book, ack: &SubAck) {
        for (code, filter) in ack.return_codes.iter().zip(&self.subscriptions) {
            if !matches!(code, SubscribeReasonCode::Success(_)) {
                error!(filter = %filter.path, reason = ?code, "subscription refused by the broker");
            }
        }
        if book.phase == (Phase::Up { subscribed: false }) {
            book.phase = Phase::Up { subscribed: true };
            self.set_state(LinkState::Connected);
        }
    }

    fn on_puback(&self, book: &mut Book, ack: &PubAck) {
        bump(&self.counters.pubacks);
        let Some(id) = book.wire.by_pkid.remove(&ack.pkid) else {
            debug!(pkid = ack.pkid, "PUBACK for a publish no longer tracked");
            return;
        };
        let accepted = matches!(
            ack.reason,
            PubAckReason::Success | PubAckReason::NoMatchingSubscribers
        );
        if accepted
            && let Some((pkid, held)) = book.wire.collided
            && pkid == ack.pkid
        {
            // rumqttc sends the held-back publish with this id right now.
            book.wire.collided = None;
            book.wire.by_pkid.insert(pkid, held);
            book.wire.collision_sent = Some(pkid);
        }
        let Some(op) = book.ops.get_mut(&id) else {
            return;
        };
        if !accepted {
            let (topic, reason) = (op.topic.clone(), ack.reason);
            warn!(topic, ?reason, "broker refused a publish");
            book.fail_op(id, || LinkError::Refused {
                topic: topic.clone(),
                reason,
            });
            return;
        }
        match &mut op.kind {
            OpKind::Request { acked, .. } => *acked = true,
            OpKind::Confirm(tx) => {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(Ok(ack.reason));
                }
                book.ops.remove(&id);
            }
        }
    }

    fn on_publish(&self, book: &mut Book, publish: Publish) {
        // Empty: a topic alias we never allowed and rumqttc could not
        // resolve.
        let topic = match String::from_utf8(publish.topic.to_vec()) {
            Ok(topic) if !topic.is_empty() => topic,
            _ => {
                bump(&self.counters.incoming_dropped);
                warn!(
                    pkid = publish.pkid,
                    "dropped a message whose topic is empty or not UTF-8"
                );
                return;
            }
        };
        if publish.payload.len() > self.max_payload {
            bump(&self.counters.incoming_dropped);
            warn!(
                topic,
                size = publish.payload.len(),
                max = self.max_payload,
                "dropped an oversized message"
            );
            return;
        }
        let (correlation, response_topic) = match publish.properties {
            Some(p) => (p.correlation_data.map(|c| c.to_vec()), p.response_topic),
            None => (None, None),
        };
        let message = Incoming {
            topic,
            payload: publish.payload.to_vec(),
            correlation,
            response_topic,
        };
        if let Some(correlation) = &message.correlation {
            let matches = book
                .requests
                .get(correlation)
                .is_some_and(|p| p.response_topic == message.topic);
            if matches {
                // A stream stays open for further answers; the request is
                // answered, so it is not re-published.
                let stream = book.requests.get(correlation).and_then(|p| match &p.reply {
                    Reply::Stream(tx) => Some((p.op, tx.clone())),
                    Reply::Once(_) => None,
                });
                if let Some((op, tx)) = stream {
                    book.ops.remove(&op);
                    bump(&self.counters.responses);
                    if !Reply::Stream(tx).send(Ok(message)) {
                        bump(&self.counters.incoming_dropped);
                    }
                } else if let Some(pending) = book.requests.remove(correlation) {
                    book.ops.remove(&pending.op);
                    book.finished.insert(
                        correlation.clone(),
                        pending.response_topic,
                        Finished::Answered,
                    );
                    bump(&self.counters.responses);
                    pending.reply.send(Ok(message));
                }
                return;
            }
            match book.finished.get(correlation, &message.topic) {
                Some(Finished::Answered) => {
                    bump(&self.counters.duplicate_responses);
                    debug!(topic = message.topic, "dropped a duplicate answer");
                    return;
                }
                Some(Finished::TimedOut | Finished::Abandoned) => {
                    bump(&self.counters.late_responses);
                    debug!(
                        topic = message.topic,
                        "dropped an answer that came too late"
                    );
                    return;
                }
                None => {}
            }
        }
        // Count before the receiver can see it, so a reader that got the
        // message also sees it counted.
        match self.incoming_tx.try_reserve() {
            Ok(permit) => {
                bump(&self.counters.incoming);
                permit.send(message);
            }
            Err(mpsc::error::TrySendError::Full(())) => {
                bump(&self.counters.incoming_dropped);
                warn!(
                    topic = message.topic,
                    "incoming queue full; message dropped"
                );
            }
            Err(mpsc::error::TrySendError::Closed(())) => {
                bump(&self.counters.incoming_dropped);
                debug!(
                    topic = message.topic,
                    "no receiver for incoming messages; dropped"
                );
            }
        }
    }

    /// The connection is gone. Account for what rumqttc did before the
    /// error, take back what it would re-send on its own, and forget the
    /// packet ids; the next CONNACK re-sends.
    fn on_connection_error(&self, eventloop: &mut EventLoop, error: &ConnectionError) {
        bump(&self.counters.connection_errors);
        let mut book = self.lock();
        let was_up = matches!(book.phase, Phase::Up { .. });
        if book.phase != Phase::Stopping {
            book.phase = Phase::Down;
        }
        // Under the lock with the phase Down no handle adds to rumqttc's
        // channel any more; `clean` drains what is left into `pending`.
        eventloop.clean();
        eventloop.pending.clear();
        eventloop.state.collision = None;
        let handled: Vec<Event> = eventloop.state.events.drain(..).collect();
        for event in handled {
            let _ = self.handle_event(&mut book, event);
        }
        book.wire = Wire::default();
        book.last_heard = None;
        if was_up {
            book.failed_attempts = 0;
            warn!(error = %error, "connection lost");
        } else {
            book.failed_attempts = book.failed_attempts.saturating_add(1);
            let n = book.failed_attempts;
            if n == 1 || n.is_multiple_of(10) {
                warn!(error = %error, failed_attempts = n, "connection attempt failed");
            } else {
                debug!(error = %error, failed_attempts = n, "connection attempt failed");
            }
        }
    }

    /// The task is ending: fail every waiter.
    fn stop(&self) {
        let mut book = self.lock();
        book.phase = Phase::Stopped;
        let ids: Vec<OpId> = book.ops.keys().copied().collect();
        for id in ids {
            book.fail_op(id, || LinkError::Stopped);
        }
        for (_, pending) in book.requests.drain() {
            pending.reply.send(Err(LinkError::Stopped));
        }
        book.wire = Wire::default();
    }
}

/// Sets `Stopped` and fails the waiters however the task ends.
struct StopGuard(Arc<Inner>);

impl Drop for StopGuard {
    fn drop(&mut self) {
        self.0.stop();
        self.0.set_state(LinkState::Stopped);
    }
}

/// The task: poll, pace reconnects, check the connection on a wake-up,
/// disconnect on shutdown.
async fn run(
    inner: Arc<Inner>,
    mut eventloop: EventLoop,
    mut backoff: Backoff,
    mut stop: watch::Receiver<bool>,
) {
    let _guard = StopGuard(inner.clone());
    let _suspend_watch = AbortOnDrop(tokio::spawn(watch_for_suspend(inner.clone())));
    let stopping = |r: Result<(), watch::error::RecvError>, stop: &watch::Receiver<bool>| {
        r.is_err() || *stop.borrow()
    };
    // A wake-up check in flight: when its PINGREQ went out, and its deadline.
    let mut check: Option<(Instant, Instant)> = None;
    'run: loop {
        let up = {
            let book = inner.lock();
            if book.phase == Phase::Down {
                drop(book);
                inner.set_state(LinkState::Connecting);
                false
            } else {
                matches!(book.phase, Phase::Up { .. })
            }
        };
        // Only a live connection is interrupted for a check: dropping
        // `poll` while it connects would start the connect over.
        let polled = tokio::select! {
            biased;
            r = stop.changed() => {
                if stopping(r, &stop) { break 'run; }
                continue 'run;
            }
            () = inner.wake.notified(), if up && check.is_none() => {
                // rumqttc sends what is in `pending` first. If its own
                // keepalive PINGREQ is still unanswered, this one makes
                // `poll` fail at once, which is the right verdict too.
                eventloop.pending.push_back(rumqttc::v5::Request::PingReq);
                let now = Instant::now();
                check = Some((now, now + inner.wake_check_timeout));
                bump(&inner.counters.wake_checks);
                debug!("wake-up check: PINGREQ");
                continue 'run;
            }
            () = crate::time::sleep_until(check.map(|(_, deadline)| deadline)) => {
                let Some((sent, _)) = check.take() else { continue 'run };
                if inner.lock().last_heard.is_some_and(|t| t >= sent) {
                    continue 'run;
                }
                let error = ConnectionError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no answer to the wake-up check",
                ));
                inner.on_connection_error(&mut eventloop, &error);
                bump(&inner.counters.wake_reconnects);
                // Reconnect at once: `poll` connects on its next call.
                continue 'run;
            }
            polled = eventloop.poll() => polled,
        };
        match polled {
            Ok(event) => match inner.on_event(event) {
                Next::Connected => backoff.reset(),
                Next::Continue | Next::Disconnected => {}
            },
            Err(error) => {
                check = None;
                inner.on_connection_error(&mut eventloop, &error);
                let (attempt, delay) = backoff.next_delay();
                // A request is waiting: the first attempt after losing a
                // connection goes at once, later ones are paced.
                let urgent = attempt == 1 && !inner.lock().requests.is_empty();
                let delay = if urgent { Duration::ZERO } else { delay };
                inner.set_state(LinkState::Backoff { attempt, delay });
                debug!(attempt, ?delay, "reconnecting after a pause");
                tokio::select! {
                    biased;
                    r = stop.changed() => if stopping(r, &stop) { break 'run; },
                    () = tokio::time::sleep(delay) => {}
                    () = inner.wake.notified() => {
                        debug!("a request is waiting: reconnecting now");
                        bump(&inner.counters.wake_reconnects);
                    }
                }
                if urgent {
                    bump(&inner.counters.wake_reconnects);
                }
            }
        }
    }
    disconnect(&inner, &mut eventloop).await;
    info!("link stopped");
}

/// Aborts its task when dropped, however the owner ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Rings `wake` when the machine was suspended: `CLOCK_BOOTTIME` counts
/// the suspended time, `CLOCK_MONOTONIC` (tokio's clock) does not, so a
/// keepalive timer would not notice.
async fn watch_for_suspend(inner: Arc<Inner>) {
    let Some(gap) = boot_minus_monotonic() else {
        debug!("CLOCK_BOOTTIME unavailable: no suspend detection");
        return;
    };
    let mut watch = SuspendWatch::new(gap);
    loop {
        tokio::time::sleep(SUSPEND_CHECK).await;
        if let Some(slept) = boot_minus_monotonic().and_then(|g| watch.observe(g)) {
            info!(
                slept_s = slept.as_secs(),
                "resumed after a suspend: checking the link"
            );
            inner.wake.notify_one();
        }
    }
}

/// `CLOCK_BOOTTIME - CLOCK_MONOTONIC`: the time the machine spent
/// suspended since boot.
fn boot_minus_monotonic() -> Option<Duration> {
    use nix::time::{ClockId, clock_gettime};
    let boot = Duration::from(clock_gettime(ClockId::CLOCK_BOOTTIME).ok()?);
    let mono = Duration::from(clock_gettime(ClockId::CLOCK_MONOTONIC).ok()?);
    Some(boot.saturating_sub(mono))
}

/// Tells a suspend from the growth of [`boot_minus_monotonic`].
#[derive(Debug)]
struct SuspendWatch {
    gap: Duration,
}

impl SuspendWatch {
    fn new(gap: Duration) -> SuspendWatch {
        SuspendWatch { gap }
    }

    /// The time suspended since the last observation, if it is a suspend.
    fn observe(&mut self, gap: Duration) -> Option<Duration> {
        let grew = gap.saturating_sub(self.gap);
        self.gap = self.gap.max(gap);
        (grew >= SUSPEND_MIN).then_some(grew)
    }
}

/// Send DISCONNECT if connected, and wait (briefly) until it is written.
async fn disconnect(inner: &Inner, eventloop: &mut EventLoop) {
    let was_up = {
        let mut book = inner.lock();
        let up = matches!(book.phase, Phase::Up { .. });
        book.phase = Phase::Stopping;
        up
    };
    if !was_up || inner.client.try_disconnect().is_err() {
        return;
    }
    let deadline = tokio::time::Instant::now() + DISCONNECT_GRACE;
    loop {
        match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Ok(Ok(event)) => {
                if let Next::Disconnected = inner.on_event(event) {
                    debug!("DISCONNECT sent");
                    return;
                }
            }
            Ok(Err(_)) | Err(_) => return,
        }
    }
}

/// An upper bound of the encoded size of a publish.
fn packet_size_estimate(publish: &Publish) -> u64 {
    let props = publish.properties.as_ref().map_or(0, |p| {
        p.response_topic.as_ref().map_or(0, |t| t.len() + 3)
            + p.correlation_data.as_ref().map_or(0, |c| c.len() + 3)
            + p.content_type.as_ref().map_or(0, |t| t.len() + 3)
            + p.user_properties
                .iter()
                .map(|(k, v)| k.len() + v.len() + 5)
                .sum::<usize>()
            + 32
    });
    // Fixed header (5), topic length (2), packet id (2), property length (4).
    (publish.topic.len() + publish.payload.len() + props + 13) as u64
}

/// A topic name one may publish to: 1..=65535 bytes, no wildcard, no NUL.
fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && topic.len() <= usize::from(u16::MAX) && !topic.contains(['+', '#', '\0'])
}

/// A topic filter: `+` only as a whole level, `#` only as the whole last
/// level.
fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.len() > usize::from(u16::MAX) || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    let last = levels.len() - 1;
    levels.iter().enumerate().all(|(i, level)| match *level {
        "+" => true,
        "#" => i == last,
        l => !l.contains(['+', '#']),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_suspend_is_a_growth_of_the_clock_gap() {
        let ms = Duration::from_millis;
        let mut w = SuspendWatch::new(ms(10_000));
        // Drift and jitter of the clocks are not a suspend.
        assert_eq!(w.observe(ms(10_000)), None);
        assert_eq!(w.observe(ms(10_400)), None);
        assert_eq!(w.observe(ms(11_900)), None);
        // Six hours parked.
        assert_eq!(w.observe(ms(21_611_900)), Some(ms(21_600_000)));
        assert_eq!(w.observe(ms(21_611_900)), None);
        // The gap never shrinks; a smaller reading changes nothing.
        assert_eq!(w.observe(ms(5_000)), None);
        assert_eq!(w.observe(ms(21_614_900)), Some(ms(3_000)));
        // The real clocks answer on Linux.
        assert!(boot_minus_monotonic().is_some());
    }

    #[test]
    fn topics_and_filters() {
        assert!(valid_topic("bmsgw/v1/veh-a/identity/req"));
        for t in ["", "a/+/b", "a/#", "a\0b"] {
            assert!(!valid_topic(t), "{t:?}");
        }
        for f in [
            "a/b",
            "a/+/c",
            "a/#",
            "#",
            "+",
            "$share/g/bmsgw/v1/+/events",
        ] {
            assert!(valid_filter(f), "{f:?}");
        }
        for f in ["", "a/#/b", "a+/b", "a/b#", "a\0"] {
            assert!(!valid_filter(f), "{f:?}");
        }
    }

    #[test]
    fn finished_set_is_bounded_and_topic_scoped() {
        let mut f = FinishedSet::default();
        for i in 0..(FINISHED_MEMORY as u32 + 10) {
            f.insert(i.to_be_bytes().to_vec(), "r".into(), Finished::Answered);
        }
        assert_eq!(f.map.len(), FINISHED_MEMORY);
        assert_eq!(f.order.len(), FINISHED_MEMORY);
        assert_eq!(f.get(&0u32.to_be_bytes(), "r"), None, "oldest forgotten");
        let last = (FINISHED_MEMORY as u32 + 9).to_be_bytes();
        assert_eq!(f.get(&last, "r"), Some(Finished::Answered));
        assert_eq!(f.get(&last, "other"), None);
    }

    #[test]
    fn config_is_checked() {
        let tls = TlsFiles {
            ca: "ca".into(),
            cert: "c".into(),
            key: "k".into(),
        };
        let ok = LinkConfig::new("localhost", 8883, "veh-a", tls);
        assert!(ok.validate().is_ok());
        type Change = Box<dyn Fn(&mut LinkConfig)>;
        let cases: Vec<(&str, Change)> = vec![
            (
                "keep_alive",
                Box::new(|c| c.keep_alive = Duration::from_secs(1)),
            ),
            ("backoff_min", Box::new(|c| c.backoff_min = Duration::ZERO)),
            (
                "backoff_min",
                Box::new(|c| c.backoff_min = c.backoff_max * 2),
            ),
            ("client_id", Box::new(|c| c.client_id.clear())),
            ("max_payload", Box::new(|c| c.max_payload = 0)),
            (
                "subscriptions",
                Box::new(|c| c.subscriptions.push(("a/#/b".into(), QoS::AtLeastOnce))),
            ),
            ("incoming_capacity", Box::new(|c| c.incoming_capacity = 0)),
        ];
        for (field, change) in cases {
            let mut c = ok.clone();
            change(&mut c);
            match c.validate() {
                Err(LinkError::Config { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    mod book {
        //! The packet-id and re-send book-keeping, driven by synthetic
        //! rumqttc events (no broker, no task).
        use super::*;
        use rumqttc::v5::Request;
        use rumqttc::v5::mqttbytes::v5::ConnectReturnCode;

        struct Rig {
            inner: Arc<Inner>,
            eventloop: EventLoop,
            incoming: mpsc::Receiver<Incoming>,
        }

        fn rig(subscriptions: &[&str]) -> Rig {
            let options = MqttOptions::new("test", "localhost", 1);
            let (client, eventloop) = AsyncClient::new(options, 16);
            let (incoming_tx, incoming) = mpsc::channel(4);
            let inner = Arc::new(Inner {
                client_id: "test".into(),
                client,
                subscriptions: subscriptions
                    .iter()
                    .map(|f| Filter::new(*f, QoS::AtLeastOnce))
                    .collect(),
                max_payload: 64,
                request_timeout: Duration::from_secs(1),
                incoming_tx,
                state: watch::channel(LinkState::Connecting).0,
                counters: Counters::default(),
                book: Mutex::new(Book::default()),
                wake: Notify::new(),
                wake_check_timeout: Duration::from_secs(2),
            });
            Rig {
                inner,
                eventloop,
                incoming,
            }
        }

        impl Rig {
            fn event(&self, e: Event) {
                self.inner.on_event(e);
            }
            fn connack(&self, session_present: bool) {
                self.event(Event::Incoming(rumqttc::v5::Incoming::ConnAck(ConnAck {
                    session_present,
                    code: ConnectReturnCode::Success,
                    properties: None,
                })));
            }
            fn sent(&self, pkid: u16) {
                self.event(Event::Outgoing(Outgoing::Publish(pkid)));
            }
            fn puback(&self, pkid: u16, reason: PubAckReason) {
                let mut ack = PubAck::new(pkid, None);
                ack.reason = reason;
                self.event(Event::Incoming(rumqttc::v5::Incoming::PubAck(ack)));
            }
            fn publish(&self, topic: &str, correlation: Option<&[u8]>, payload: &[u8]) {
                let props = correlation.map(|c| PublishProperties {
                    correlation_data: Some(c.to_vec().into()),
                    ..PublishProperties::default()
                });
                self.event(Event::Incoming(rumqttc::v5::Incoming::Publish(
                    Publish::new(topic, QoS::AtLeastOnce, payload.to_vec(), props),
                )));
            }
            fn drop_connection(&mut self) {
                let e = ConnectionError::Io(std::io::Error::other("test"));
                self.inner.on_connection_error(&mut self.eventloop, &e);
            }
            /// The payloads of the publishes now in rumqttc's channel
            /// (drained).
            fn channel(&mut self) -> Vec<Vec<u8>> {
                self.eventloop.clean();
                self.eventloop
                    .pending
                    .drain(..)
                    .filter_map(|r| match r {
                        Request::Publish(p) => Some(p.payload.to_vec()),
                        _ => None,
                    })
                    .collect()
            }
            fn counters(&self) -> LinkCounters {
                self.inner.counters.snapshot()
            }
        }

        fn done<T>(rx: &mut oneshot::Receiver<T>) -> Option<T> {
            rx.try_recv().ok()
        }

        #[test]
        fn each_puback_resolves_its_own_publish_including_after_a_collision() {
            let mut r = rig(&[]);
            r.connack(true);
            let mut a = r.inner.submit_confirm("t/a", b"a".to_vec(), None).unwrap();
            let mut b = r.inner.submit_confirm("t/b", b"b".to_vec(), None).unwrap();
            let mut c = r.inner.submit_confirm("t/c", b"c".to_vec(), None).unwrap();
            assert_eq!(r.channel(), [b"a", b"b", b"c"].map(|p| p.to_vec()));
            // rumqttc gives a id 1, b id 2, and holds c back: id 1 is in flight.
            r.sent(1);
            r.sent(2);
            r.event(Event::Outgoing(Outgoing::AwaitAck(1)));
            r.puback(2, PubAckReason::Success);
            assert!(matches!(done(&mut b), Some(Ok(PubAckReason::Success))));
            assert!(done(&mut a).is_none() && done(&mut c).is_none());
            // The PUBACK of id 1 resolves a; rumqttc then sends c as id 1.
            r.puback(1, PubAckReason::Success);
            r.sent(1);
            assert!(matches!(done(&mut a), Some(Ok(PubAckReason::Success))));
            assert!(
                done(&mut c).is_none(),
                "c is not acknowledged by a's PUBACK"
            );
            r.puback(1, PubAckReason::NoMatchingSubscribers);
            assert!(matches!(
                done(&mut c),
                Some(Ok(PubAckReason::NoMatchingSubscribers))
            ));
            // A stray PUBACK changes nothing.
            r.puback(9, PubAckReason::Success);
            let k = r.counters();
            assert_eq!((k.publishes, k.pubacks), (3, 4));
            assert!(r.inner.lock().ops.is_empty());
        }

        #[test]
        fn a_refusing_puback_fails_the_caller() {
            let mut r = rig(&[]);
            r.connack(true);
            let mut a = r.inner.submit_confirm("t/a", vec![], None).unwrap();
            let mut q = r
                .inner
                .submit_request("t/q", "t/r", vec![1], vec![])
                .unwrap();
            r.channel();
            r.sent(1);
            r.sent(2);
            r.puback(1, PubAckReason::NotAuthorized);
            r.puback(2, PubAckReason::QuotaExceeded);
            assert!(matches!(
                done(&mut a),
                Some(Err(LinkError::Refused {
                    reason: PubAckReason::NotAuthorized,
                    ..
                }))
            ));
            assert!(matches!(
                done(&mut q),
                Some(Err(LinkError::Refused {
                    reason: PubAckReason::QuotaExceeded,
                    ..
                }))
            ));
            assert!(r.inner.lock().requests.is_empty());
        }

        #[test]
        fn a_reconnect_resends_what_is_unconfirmed_in_order() {
            let mut r = rig(&[]);
            r.connack(true);
            let _q = r
                .inner
                .submit_request("t/q", "t/r", vec![1], b"q".to_vec())
                .unwrap();
            let mut a = r.inner.submit_confirm("t/a", b"a".to_vec(), None).unwrap();
            let mut gone = r.inner.submit_confirm("t/g", b"g".to_vec(), None).unwrap();
            assert_eq!(r.channel().len(), 3);
            r.sent(1);
            r.sent(2);
            r.puback(1, PubAckReason::Success); // the request is with the broker
            gone.close(); // its caller gave up
            // rumqttc also had g in its channel when the connection dropped.
            r.drop_connection();
            assert!(done(&mut a).is_none());
            // Publishing while down queues; nothing enters rumqttc's channel.
            let _b = r.inner.submit_confirm("t/b", b"b".to_vec(), None).unwrap();
            assert!(r.channel().is_empty());

            // Session kept: the acknowledged request is not sent again.
            r.connack(true);
            assert_eq!(r.channel(), [b"a".to_vec(), b"b".to_vec()]);
            r.drop_connection();
            // Session lost: the request goes out again, first as before.
            r.connack(false);
            assert_eq!(r.channel(), [b"q".to_vec(), b"a".to_vec(), b"b".to_vec()]);
            // Packet ids start afresh: 1 is now the request.
            r.sent(1);
            r.sent(2);
            r.puback(2, PubAckReason::Success);
            assert!(matches!(done(&mut a), Some(Ok(PubAckReason::Success))));
            let k = r.counters();
            assert_eq!((k.connects, k.connection_errors), (3, 2));
        }

        #[test]
        fn publishes_wait_for_the_suback_after_a_session_loss() {
            let mut r = rig(&["t/r"]);
            let _a = r.inner.submit_confirm("t/a", b"a".to_vec(), None).unwrap();
            r.connack(false);
            assert_eq!(r.counters().resubscribes, 1);
            assert!(r.channel().is_empty(), "nothing before the SUBACK");
            assert_eq!(*r.inner.state.borrow(), LinkState::Connecting);
            r.event(Event::Incoming(rumqttc::v5::Incoming::SubAck(SubAck {
                pkid: 1,
                return_codes: vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)],
                properties: None,
            })));
            assert_eq!(r.channel(), [b"a".to_vec()]);
            assert_eq!(*r.inner.state.borrow(), LinkState::Connected);
        }

        #[test]
        fn answers_are_matched_by_topic_and_correlation_once() {
            let mut r = rig(&[]);
            r.connack(true);
            let mut q = r
                .inner
                .submit_request("t/q", "t/r", b"c1".to_vec(), vec![])
                .unwrap();
            // Same correlation on another topic: not the answer.
            r.publish("t/other", Some(b"c1"), b"x");
            assert!(done(&mut q).is_none());
            assert_eq!(r.incoming.try_recv().unwrap().topic, "t/other");
            r.publish("t/r", Some(b"c1"), b"answer");
            let answer = done(&mut q).unwrap().unwrap();
            assert_eq!(answer.payload, b"answer");
            r.publish("t/r", Some(b"c1"), b"again");
            // Unknown correlation: an ordinary message.
            r.publish("t/r", Some(b"c2"), b"push");
            assert_eq!(r.incoming.try_recv().unwrap().payload, b"push");
            assert!(r.incoming.try_recv().is_err());
            let k = r.counters();
            assert_eq!((k.responses, k.duplicate_responses, k.incoming), (1, 1, 2));
            assert!(
                r.inner.lock().ops.is_empty(),
                "the answered request is not re-sent"
            );
        }

        #[test]
        fn bad_incoming_messages_are_dropped_and_counted() {
            let mut r = rig(&[]);
            r.connack(true);
            r.publish("t/big", None, &[0; 65]);
            let mut bad_topic = Publish::new("t", QoS::AtLeastOnce, vec![], None);
            bad_topic.topic = vec![0xFF, 0xFE].into();
            r.event(Event::Incoming(rumqttc::v5::Incoming::Publish(bad_topic)));
            r.publish("", None, b"no topic");
            for n in 0..6u8 {
                r.publish("t/ok", None, &[n]);
            }
            let k = r.counters();
            // Capacity 4: two of the six are dropped too.
            assert_eq!((k.incoming, k.incoming_dropped), (4, 5));
            for n in 0..4u8 {
                assert_eq!(r.incoming.try_recv().unwrap().payload, [n]);
            }
        }

        #[test]
        fn stopping_fails_every_waiter() {
            let r = rig(&[]);
            let mut a = r.inner.submit_confirm("t/a", vec![], None).unwrap();
            let mut q = r
                .inner
                .submit_request("t/q", "t/r", vec![1], vec![])
                .unwrap();
            r.inner.stop();
            assert!(matches!(done(&mut a), Some(Err(LinkError::Stopped))));
            assert!(matches!(done(&mut q), Some(Err(LinkError::Stopped))));
            assert!(matches!(
                r.inner.submit_confirm("t/a", vec![], None),
                Err(LinkError::Stopped)
            ));
        }
    }

    #[test]
    fn size_estimate_is_an_upper_bound_of_the_encoding() {
        use rumqttc::v5::mqttbytes::v5::Packet;
        let properties = PublishProperties {
            response_topic: Some("bmsgw/v1/veh-a/identity/resp".into()),
            correlation_data: Some(vec![7u8; 16].into()),
            ..PublishProperties::default()
        };
        let mut publish = Publish::new(
            "bmsgw/v1/veh-a/identity/req",
            QoS::AtLeastOnce,
            vec![1u8; 300],
            Some(properties),
        );
        publish.pkid = 1;
        let estimate = packet_size_estimate(&publish);
        let mut buf = Default::default();
        let size = Packet::Publish(publish).write(&mut buf, None).unwrap();
        assert!(estimate >= size as u64, "{estimate} < {size}");
        assert!(estimate < size as u64 + 64);
    }
}
