//! The demo's scenarios, each with what it must show to pass.

use std::io::Write;
use std::time::{Duration, Instant};

use super::attacker;
use super::world::{Vehicle, World};
use super::{DEMO_CHARGER, DemoError, DemoReport, secs};
use crate::auth::ResultCode;
use crate::can::CanBus;
use crate::cloud::messages::CredentialKind;
use crate::gateway::orchestrator::Notice;
use crate::gbt27930::session::Summary;
use crate::gbt27930::{BMS_ADDRESS, CHARGER_ADDRESS, Cml, Message, MessageKind};
use crate::j1939::J1939Id;
use crate::sim::SimError;
use crate::sim::pile::PileSimOptions;

/// How one scenario went.
#[derive(Clone, Debug)]
pub struct ScenarioResult {
    pub name: &'static str,
    pub title: &'static str,
    pub passed: bool,
    pub credential: Option<&'static str>,
    /// From the pile's first CRM(0x00) to CRM(0xAA).
    pub request_to_recognized: Option<Duration>,
    pub duration: Duration,
    pub notes: String,
}

/// Gathers a scenario's checks: each failed one is named in the notes.
struct Checks {
    failed: Vec<String>,
    notes: Vec<String>,
}

impl Checks {
    fn new() -> Self {
        Checks {
            failed: Vec::new(),
            notes: Vec::new(),
        }
    }

    fn check(&mut self, ok: bool, what: impl Into<String>) {
        if !ok {
            self.failed.push(what.into());
        }
    }

    fn note(&mut self, what: impl Into<String>) {
        self.notes.push(what.into());
    }

    fn finish<W: Write + Send>(
        self,
        world: &mut World<'_, W>,
        name: &'static str,
        title: &'static str,
    ) -> ScenarioResult {
        let passed = self.failed.is_empty();
        let credential = world.seen.iter().find_map(|n| match n {
            Notice::Credential { kind, .. } => Some(match kind {
                CredentialKind::Online => "online",
                CredentialKind::Voucher => "voucher",
            }),
            _ => None,
        });
        let request_to_recognized = world.seen.iter().find_map(|n| match n {
            Notice::Recognized { since_request } => *since_request,
            _ => None,
        });
        let mut notes = self.notes;
        if !passed {
            notes.insert(0, format!("NOT AS EXPECTED: {}", self.failed.join("; ")));
        }
        let verdict = if passed {
            "as expected"
        } else {
            "NOT as expected"
        };
        world.say("demo", format!("({name}) {title}: {verdict}"));
        ScenarioResult {
            name,
            title,
            passed,
            credential,
            request_to_recognized,
            duration: world.elapsed(),
            notes: notes.join("; "),
        }
    }
}

type Outcomes = (Result<Summary, SimError>, Result<Summary, SimError>);

/// One charging session: the BMS simulator on the BMS's bus, `pile` on the
/// pile's bus.
async fn session<W: Write + Send>(
    world: &mut World<'_, W>,
    pile: PileSimOptions,
) -> Result<Outcomes, DemoError> {
    let mut bms_bus = world.buses.bms_node()?;
    let mut pile_bus = world.buses.pile_node()?;
    let bms = world.bms_options();
    let never = std::future::pending::<()>;
    let outcomes = world
        .drive(async {
            tokio::join!(
                crate::sim::bms::run(&mut bms_bus, bms, never()),
                crate::sim::pile::run(&mut pile_bus, pile, never()),
            )
        })
        .await;
    Ok(outcomes)
}

fn has(world_seen: &[Notice], f: impl Fn(&Notice) -> bool) -> bool {
    world_seen.iter().any(f)
}

fn credential_is(seen: &[Notice], want: CredentialKind) -> bool {
    has(
        seen,
        |n| matches!(n, Notice::Credential { kind, .. } if *kind == want),
    )
}

fn report_sims(c: &mut Checks, (bms, pile): &Outcomes) {
    c.check(bms.is_ok(), format!("BMS: {}", describe(bms)));
    c.check(pile.is_ok(), format!("pile: {}", describe(pile)));
    if let Ok(s) = pile
        && s.energy_decikwh > 0
    {
        c.note(format!(
            "{:.1} kWh delivered",
            f32::from(s.energy_decikwh) / 10.0
        ));
    }
}

fn describe(r: &Result<Summary, SimError>) -> String {
    match r {
        Ok(_) => "session completed".into(),
        Err(e) => e.to_string(),
    }
}

/// Wait until the cloud has `more_than` session records.
async fn record_reaches_cloud<W: Write + Send>(
    world: &mut World<'_, W>,
    more_than: u64,
    within: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < within {
        if world.cloud_stats().records > more_than {
            world.say("cloud", "session record received and reconciled");
            return Some(start.elapsed());
        }
        world.pause(Duration::from_millis(50)).await;
    }
    None
}

/// (a) An online session.
async fn online<W: Write + Send>(
    world: &mut World<'_, W>,
) -> Result<(ScenarioResult, Option<Vec<u8>>), DemoError> {
    world.begin("(a) online session: veh-a at pile 1, the cloud issues a ticket")?;
    world.start_daemon(Vehicle::A).await?;
    let mut c = Checks::new();
    let connected = world
        .wait_status(Duration::from_secs(15), |s| s.cloud.state == "connected")
        .await;
    c.check(
        connected.is_some(),
        "the gateway never connected to the broker",
    );
    let records = world.cloud_stats().records;
    let pile = world.pile_options()?;
    let outcomes = session(world, pile).await?;
    report_sims(&mut c, &outcomes);
    c.check(
        credential_is(&world.seen, CredentialKind::Online),
        "no online ticket",
    );
    c.check(
        has(&world.seen, |n| {
            matches!(n, Notice::PileAuthenticated { .. })
        }),
        "pile not authenticated",
    );
    let uploaded = record_reaches_cloud(world, records, Duration::from_secs(10)).await;
    c.check(uploaded.is_some(), "record never reached the cloud");
    if let Some(d) = uploaded {
        c.note(format!("record at the cloud {} after the session", secs(d)));
    }
    let captured = attacker::captured_auth_request(&world.pile_seen);
    Ok((c.finish(world, "a", "online session"), captured))
}

/// (b) The owner must approve the grant.
async fn approval<W: Write + Send>(world: &mut World<'_, W>) -> Result<ScenarioResult, DemoError> {
    world.begin("(b) owner approval: veh-b's grants wait for the owner's app")?;
    world.start_daemon(Vehicle::B).await?;
    let connected = world
        .wait_status(Duration::from_secs(15), |s| s.cloud.state == "connected")
        .await;
    let pile = world.pile_options()?;
    let monitor = world.cloud_monitor();
    let pki = world.pki.clone();
    let port = world.broker.port();
    let host = world.broker.host().to_string();
    // The owner's app: sees the held request and approves it after a second.
    let owner = tokio::spawn(async move {
        let Some(monitor) = monitor else {
            return Err("no cloud".to_string());
        };
        let give_up = Instant::now() + Duration::from_secs(20);
        let (vehicle_id, request_id) = loop {
            if let Some(held) = monitor
                .held_requests()
                .into_iter()
                .rev()
                .find(|(v, _)| v.as_str() == "veh-b")
            {
                break held;
            }
            if Instant::now() > give_up {
                return Err("no request was held for the owner".to_string());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        approve(&pki, &host, port, vehicle_id, request_id).await
    });
    let outcomes = session(world, pile).await?;
    let owner = owner.await.map_err(|e| e.to_string()).and_then(|r| r);
    let mut c = Checks::new();
    c.check(
        connected.is_some(),
        "the gateway never connected to the broker",
    );
    report_sims(&mut c, &outcomes);
    c.check(owner.is_ok(), format!("owner app: {:?}", owner.err()));
    c.check(
        has(&world.seen, |n| {
            matches!(n, Notice::AwaitingApproval { .. })
        }),
        "the gateway never showed 'awaiting approval'",
    );
    c.check(
        credential_is(&world.seen, CredentialKind::Online),
        "no online ticket after the approval",
    );
    c.note("the owner approved 1 s after the request was held");
    Ok(c.finish(world, "b", "owner approval"))
}

async fn approve(
    pki: &crate::sim::pki::DevPki,
    host: &str,
    port: u16,
    vehicle_id: crate::cloud::topics::VehicleId,
    request_id: crate::cloud::messages::Id16,
) -> Result<(), String> {
    use crate::cloud::envelope::{KeyPair, PublicKey};
    use crate::cloud::link::{Link, LinkConfig, LinkState};
    use crate::cloud::messages::OwnerApproval;
    use crate::cloud::tls::TlsFiles;
    let files = pki.owner(vehicle_id.as_str());
    let owner_key = KeyPair::load(&files.hpke_key).map_err(|e| e.to_string())?;
    let cloud = PublicKey::load(&pki.cloud_hpke_pub).map_err(|e| e.to_string())?;
    let approval = OwnerApproval {
        vehicle_id: vehicle_id.clone(),
        request_id,
        approve: true,
        time: crate::time::unix_now(),
    };
    let sealed = crate::sim::cloud::owner::seal_approval(
        &approval,
        &owner_key,
        &cloud,
        &mut crate::auth::SystemRng,
    )
    .map_err(|e| e.to_string())?;
    let config = LinkConfig::new(
        host,
        port,
        format!("owner-{vehicle_id}"),
        TlsFiles {
            ca: pki.ca_cert.clone(),
            cert: files.cert,
            key: files.key,
        },
    );
    let (link, _incoming) = Link::start(config).map_err(|e| e.to_string())?;
    let mut state = link.state_watch();
    tokio::time::timeout(
        Duration::from_secs(10),
        state.wait_for(|s| *s == LinkState::Connected),
    )
    .await
    .map_err(|_| "the owner app could not connect".to_string())?
    .map_err(|e| e.to_string())?;
    let sent = link
        .publish_confirmed(&sealed.topic, sealed.payload, None)
        .await
        .map_err(|e| e.to_string());
    link.shutdown().await;
    sent
}

/// (c) The broker is down: a voucher, and the record once it is back.
async fn offline<W: Write + Send>(world: &mut World<'_, W>) -> Result<ScenarioResult, DemoError> {
    world.begin("(c) broker stopped: charge on a voucher, report when it is back")?;
    world.start_daemon(Vehicle::A).await?;
    let mut c = Checks::new();
    let before = world
        .wait_status(Duration::from_secs(15), |s| s.cloud.state == "connected")
        .await;
    let vouchers_before = before
        .as_ref()
        .and_then(|s| s.vouchers.iter().find(|v| v.charger_number == DEMO_CHARGER))
        .map_or(0, |v| v.remaining);
    c.note(format!(
        "{vouchers_before} voucher(s) for pile {DEMO_CHARGER} from (a)"
    ));
    world.broker.stop();
    world.say("broker", "stopped");
    let down = world
        .wait_status(Duration::from_secs(15), |s| s.cloud.state != "connected")
        .await;
    c.check(
        down.is_some(),
        "the gateway never noticed the broker was gone",
    );
    let pile = world.pile_options()?;
    let outcomes = session(world, pile).await?;
    report_sims(&mut c, &outcomes);
    c.check(
        credential_is(&world.seen, CredentialKind::Voucher),
        "no voucher used",
    );
    let queued = world
        .wait_status(Duration::from_secs(5), |s| s.outbox.records >= 1)
        .await;
    c.check(queued.is_some(), "no record waiting in the outbox");
    if let Some(s) = &queued {
        let left = s
            .vouchers
            .iter()
            .find(|v| v.charger_number == DEMO_CHARGER)
            .map_or(0, |v| v.remaining);
        c.check(
            left + 1 == vouchers_before,
            format!("vouchers went from {vouchers_before} to {left}, not down by one"),
        );
        world.say(
            "gateway",
            format!(
                "outbox holds {} record(s); {left} voucher(s) left",
                s.outbox.records
            ),
        );
    }
    // The embedded broker keeps no session over a restart and, unlike
    // mosquitto, acknowledges a publish that no one hears (no "no matching
    // subscribers"), so the cloud must be subscribed before the gateway
    // is back. The old instance goes first (its link backs off up to 10
    // s); the broker returns just after a failed attempt of the gateway,
    // whose next one is at least `reconnect_min` (1 s) away, which leaves
    // the fresh instance that second to subscribe.
    world.stop_cloud().await;
    world.say(
        "cloud",
        "stopped; a fresh instance starts once the broker is back",
    );
    let failed = world.status().await.map(|s| s.cloud.connection_errors);
    let attempt = world
        .wait_status_every(Duration::from_secs(10), Duration::from_millis(10), |s| {
            failed.is_some_and(|f| s.cloud.connection_errors > f)
        })
        .await;
    c.check(
        attempt.is_some(),
        "the gateway made no connection attempt while the broker was down",
    );
    let restarted = world.broker.restart();
    world.say("broker", "restarted");
    c.check(
        restarted.is_ok(),
        format!("broker restart: {:?}", restarted.err()),
    );
    world.start_cloud().await?;
    world.say("cloud", "reconnected");
    let first = world.status().await.map_or(0, |s| s.cloud.connects);
    c.check(
        attempt.is_none_or(|a| first == a.cloud.connects),
        "the gateway was back before the cloud had subscribed (the demo's timing failed, not the gateway)",
    );
    // A fresh instance: every record it counts arrived after the restart.
    let uploaded = record_reaches_cloud(world, 0, Duration::from_secs(30)).await;
    c.check(
        uploaded.is_some(),
        "record never reached the cloud after the broker returned",
    );
    if let Some(d) = uploaded {
        c.note(format!(
            "record at the cloud {} after the broker returned",
            secs(d)
        ));
    }
    Ok(c.finish(world, "c", "broker down: voucher"))
}

/// (d1) A forged grant on the broker.
async fn forged_grant<W: Write + Send>(
    world: &mut World<'_, W>,
) -> Result<ScenarioResult, DemoError> {
    world
        .begin("(d1) attack: the cloud is silenced and an intruder answers with a forged grant")?;
    world.start_daemon(Vehicle::A).await?;
    let mut c = Checks::new();
    let ready = world
        .wait_status(Duration::from_secs(20), |s| s.cloud.state == "connected")
        .await;
    c.check(
        ready.is_some(),
        "the gateway did not reconnect to the broker",
    );
    let refused_before = ready.map_or(0, |s| s.cloud.refused_answers);
    world.stop_cloud().await;
    world.say("cloud", "stopped (requests now reach only the intruder)");
    let host = world.broker.host().to_string();
    let intruder =
        attacker::forge_grants(&world.pki, &host, world.broker.port(), Vehicle::A.id()).await;
    c.check(
        intruder.is_ok(),
        format!("intruder: {:?}", intruder.as_ref().err()),
    );
    world.say(
        "intruder",
        "subscribed to veh-a's requests, answering with forged grants",
    );
    let pile = world.pile_options()?;
    let outcomes = session(world, pile).await?;
    if let Ok(stop) = intruder {
        let _ = stop.send(());
    }
    report_sims(&mut c, &outcomes);
    let refused = world
        .status()
        .await
        .map_or(0, |s| s.cloud.refused_answers)
        .saturating_sub(refused_before);
    c.check(refused >= 1, "the forged grant was not refused");
    c.check(
        credential_is(&world.seen, CredentialKind::Voucher),
        "no voucher after the cloud's silence",
    );
    c.note(format!(
        "{refused} forged answer(s) refused; charged on a voucher"
    ));
    world.start_cloud().await?;
    world.say("cloud", "restarted");
    Ok(c.finish(world, "d1", "forged grant on the broker"))
}

/// (d2) A captured AuthRequest replayed to the pile.
async fn replayed_auth<W: Write + Send>(
    world: &mut World<'_, W>,
    captured: Option<Vec<u8>>,
) -> Result<ScenarioResult, DemoError> {
    world.begin("(d2) attack: an AuthRequest captured in (a) is replayed to the pile")?;
    world.stop_daemon().await?;
    world.say(
        "demo",
        "gateway stopped; a BMS and the replaying attacker sit on the pile's bus",
    );
    let mut c = Checks::new();
    let Some(request) = captured else {
        c.check(false, "no AuthRequest was captured in (a)");
        return Ok(c.finish(world, "d2", "replayed AuthRequest"));
    };
    let mut bms_bus = world.buses.pile_node()?;
    let mut pile_bus = world.buses.pile_node()?;
    let mut attacker_bus = world.buses.pile_node()?;
    let bms = world.bms_options();
    let pile = world.pile_options()?;
    let never = std::future::pending::<()>;
    let (bms_r, pile_r, replay) = world
        .drive(async {
            tokio::join!(
                crate::sim::bms::run(&mut bms_bus, bms, never()),
                crate::sim::pile::run(&mut pile_bus, pile, never()),
                attacker::replay_auth_request(&mut attacker_bus, request, Duration::from_secs(20)),
            )
        })
        .await;
    c.check(replay.is_ok(), format!("replay: {:?}", replay.err()));
    match &pile_r {
        Err(SimError::Unauthenticated {
            last_rejection: Some(ResultCode::Replayed),
            ..
        }) => world.say(
            "pile",
            "refused the AuthRequest: ticket already used (replay)",
        ),
        other => c.check(
            false,
            format!("pile: expected a replay refusal, got {}", describe(other)),
        ),
    }
    c.check(bms_r.is_err(), "the BMS charged without authentication");
    c.note("pile refused: Replayed; no CRM(0xAA), no charging");
    Ok(c.finish(world, "d2", "replayed AuthRequest"))
}

/// (d3) A fake pile that does not hold the pile's key.
async fn fake_pile<W: Write + Send>(world: &mut World<'_, W>) -> Result<ScenarioResult, DemoError> {
    world.begin("(d3) attack: a fake pile claims to be pile 1 and offers CRM(0xAA) at once")?;
    world.start_daemon(Vehicle::A).await?;
    let mut c = Checks::new();
    let before = world.status().await;
    let held_before = firewall_counter(before.as_ref(), "crm_held");
    let fake = PileSimOptions {
        charger_number: crate::gbt27930::ChargerNumber(DEMO_CHARGER),
        region_code: crate::gbt27930::RegionCode(*b"310"),
        auth: None,
        ..PileSimOptions::default()
    };
    let outcomes = session(world, fake).await?;
    c.check(
        has(&world.seen, |n| matches!(n, Notice::PileRefused { .. })),
        "the gateway did not catch the fake pile",
    );
    c.check(outcomes.0.is_err(), "the BMS charged from the fake pile");
    if world.buses.is_bridge() {
        let crm_aa = world.bms_seen.iter().filter(|f| is_crm_aa(f)).count();
        c.check(crm_aa == 0, format!("{crm_aa} CRM(0xAA) reached the BMS"));
        let held = firewall_counter(world.status().await.as_ref(), "crm_held") - held_before;
        c.check(held > 0, "the firewall held no CRM(0xAA)");
        c.note(format!(
            "{held} CRM(0xAA) held back from the BMS; the BMS never charged"
        ));
    } else {
        c.note("single-bus: the gateway detects the fake pile but cannot hold CRM(0xAA)");
    }
    Ok(c.finish(world, "d3", "fake pile"))
}

/// (d4) Frames injected on the pile's side towards the BMS.
async fn injection<W: Write + Send>(world: &mut World<'_, W>) -> Result<ScenarioResult, DemoError> {
    world.begin("(d4) attack: frames injected on the pile's bus towards the BMS")?;
    let mut c = Checks::new();
    if !world.buses.is_bridge() {
        c.note("skipped: single-bus mode has no firewall between pile and BMS");
        return Ok(c.finish(world, "d4", "frames injected towards the BMS"));
    }
    world.start_daemon(Vehicle::A).await?;
    let before = world.status().await;
    let pile = CHARGER_ADDRESS;
    let bms = BMS_ADDRESS;
    let cml = Message::Cml(Cml {
        max_output_voltage: crate::gbt27930::units::DeciVolt(7500),
        min_output_voltage: crate::gbt27930::units::DeciVolt(2000),
        max_output_current: crate::gbt27930::units::Current::charging(250.0),
        min_output_current: Some(crate::gbt27930::units::Current::charging(0.0)),
    })
    .encode();
    let bcl_pgn = MessageKind::Bcl.pgn().raw();
    let cml_pgn = MessageKind::Cml.pgn().raw();
    let bad: Vec<(&str, crate::can::CanFrame)> = [
        (
            "proprietary PGN 0xEF00 to the BMS",
            attacker::frame(0xEF00, pile, bms, &[0xDE; 8]),
        ),
        (
            "a BMS message (BCL) sent by the pile",
            attacker::frame(bcl_pgn, pile, bms, &[0; 5]),
        ),
        (
            "CML with the BMS's own address as source",
            attacker::frame(cml_pgn, bms, pile, &cml),
        ),
    ]
    .into_iter()
    .filter_map(|(what, f)| f.map(|f| (what, f)))
    .collect();
    let flood = attacker::frame(cml_pgn, pile, bms, &cml);
    let mut node = world.buses.pile_node()?;
    let sent = world
        .drive(async {
            let mut n = 0u32;
            for (_, f) in &bad {
                for _ in 0..10 {
                    if node.send(f).await.is_ok() {
                        n += 1;
                    }
                }
            }
            if let Some(f) = &flood {
                for _ in 0..200 {
                    if node.send(f).await.is_ok() {
                        n += 1;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            n
        })
        .await;
    world.say("attacker", format!("sent {sent} frames on the pile's bus"));
    for (what, f) in &bad {
        let reached = world.bms_seen.iter().filter(|s| s.id() == f.id()).count();
        c.check(reached == 0, format!("{what}: {reached} reached the BMS"));
    }
    let flood_through = flood.as_ref().map_or(0, |f| {
        world.bms_seen.iter().filter(|s| s.id() == f.id()).count()
    });
    world.say(
        "firewall",
        format!("of 200 CML frames in a burst, {flood_through} reached the BMS (rate limit)"),
    );
    c.check(
        flood_through < 100,
        "the rate limit did not hold the flood back",
    );
    let after = world.status().await;
    for key in [
        "dropped_not_allowed",
        "dropped_wrong_address",
        "dropped_rate_limited",
    ] {
        let d = firewall_counter(after.as_ref(), key) - firewall_counter(before.as_ref(), key);
        world.say("firewall", format!("{key}: +{d}"));
        c.check(d > 0, format!("{key} did not move"));
    }
    c.note(format!(
        "none of the forbidden frames reached the BMS; {flood_through}/200 of a flood"
    ));
    Ok(c.finish(world, "d4", "frames injected towards the BMS"))
}

fn firewall_counter(status: Option<&crate::service::status::Status>, key: &str) -> i64 {
    status
        .and_then(|s| s.firewall.as_ref())
        .and_then(|f| f.get(key))
        .and_then(serde_json::Value::as_i64)
        .unwrap_or(0)
}

fn is_crm_aa(frame: &crate::can::CanFrame) -> bool {
    J1939Id::from_can_id(frame.id()).is_ok_and(|id| id.pgn == MessageKind::Crm.pgn())
        && frame.data().first() == Some(&0xAA)
}

/// Play every scenario and print the summary.
pub(super) async fn play_all<W: Write + Send>(
    world: &mut World<'_, W>,
) -> Result<DemoReport, DemoError> {
    let started = Instant::now();
    let (a, captured) = online(world).await?;
    let mut scenarios = vec![a];
    scenarios.push(approval(world).await?);
    scenarios.push(offline(world).await?);
    scenarios.push(forged_grant(world).await?);
    scenarios.push(replayed_auth(world, captured).await?);
    scenarios.push(fake_pile(world).await?);
    scenarios.push(injection(world).await?);
    world.stop_daemon().await?;
    let out = world.out();
    writeln!(out)?;
    writeln!(out, "summary ({} in all)", secs(started.elapsed()))?;
    writeln!(
        out,
        "  {:<4} {:<32} {:<8} {:<8} {:>18} {:>9}  notes",
        "", "scenario", "result", "ticket", "request→CRM(0xAA)", "duration"
    )?;
    for s in &scenarios {
        writeln!(
            out,
            "  {:<4} {:<32} {:<8} {:<8} {:>18} {:>9}  {}",
            format!("({})", s.name),
            s.title,
            if s.passed { "ok" } else { "FAILED" },
            s.credential.unwrap_or("-"),
            s.request_to_recognized.map_or("-".into(), secs),
            secs(s.duration),
            s.notes
        )?;
    }
    let passed = scenarios.iter().filter(|s| s.passed).count();
    writeln!(out, "{passed} of {} scenarios as expected", scenarios.len())?;
    Ok(DemoReport { scenarios })
}
