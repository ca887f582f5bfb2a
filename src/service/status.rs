//! What `bmsgw status` shows: the daemon fills a [`Status`] from its parts
//! and answers it on the control socket (`service::control`); the CLI prints
//! it with [`Status::render`] or as JSON.
//!
//! Every struct takes missing fields as their defaults and ignores unknown
//! ones, so a `bmsgw status` of one version can read a daemon of another.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// The daemon's state at one moment.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Status {
    /// The daemon's version (`CARGO_PKG_VERSION`).
    pub version: String,
    /// `single-bus` or `bridge`.
    pub mode: String,
    pub uptime_s: u64,
    pub can: Vec<CanLinkStatus>,
    pub cloud: CloudStatus,
    /// The session in progress, if any.
    pub session: Option<SessionStatus>,
    /// The session before it (or the one just ended).
    pub last_session: Option<SessionStatus>,
    /// Vouchers left in the wallet, per pile.
    pub vouchers: Vec<VoucherCount>,
    pub outbox: OutboxStatus,
    /// The bridge's firewall counters (bridge mode only), as their JSON
    /// object: the CLI shows whatever counters the daemon has.
    pub firewall: Option<serde_json::Value>,
    /// How the BMS's and the pile's deviations are met (`interop.bms`,
    /// `interop.pile`: "field" or "strict").
    pub profiles: ProfileStatus,
    /// The deviations from the standards the BMS and the pile showed since
    /// the daemon started, per kind (docs/interop.md).
    pub deviations: crate::interop::LinkDeviations,
    /// The most recent errors, oldest first.
    pub last_errors: Vec<ErrorEntry>,
}

/// The compatibility profile of each side.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ProfileStatus {
    pub bms: String,
    pub pile: String,
}

/// One CAN interface.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct CanLinkStatus {
    /// `bus` (single-bus mode), or `bms` / `pile` (bridge mode).
    pub role: String,
    pub interface: String,
    pub up: bool,
    pub frames_in: u64,
    pub frames_out: u64,
    pub errors: u64,
    /// Frames dropped because the bus could not take them (its transmit
    /// queue stayed full: no ACK, bus-off).
    pub tx_dropped: u64,
}

/// The MQTT link to the cloud and the identity exchanges over it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct CloudStatus {
    pub enabled: bool,
    /// `connecting`, `connected`, `backoff`, `stopped` or `disabled`.
    pub state: String,
    pub connects: u64,
    /// Failed connection attempts and dropped connections.
    pub connection_errors: u64,
    /// Answers that did not pass the end-to-end checks.
    pub refused_answers: u64,
    pub grants: u64,
    pub denials: u64,
    /// Requests the cloud did not answer within `cloud.request_timeout`.
    pub timeouts: u64,
}

/// One charging session as the gateway saw it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct SessionStatus {
    pub id: String,
    /// The GB/T phase (`gbt27930::session::Phase`), as text.
    pub phase: String,
    /// From the pile's CRM(0x00).
    pub charger_number: Option<u32>,
    /// `online` or `voucher`, once chosen.
    pub credential: Option<String>,
    pub pile_authenticated: bool,
    /// The cloud holds the grant for the owner's approval.
    pub awaiting_approval: bool,
    /// Unix seconds.
    pub started_at: u32,
    /// Unix seconds.
    pub ended_at: Option<u32>,
    pub result: Option<String>,
    pub energy_wh: Option<u32>,
    /// From the pile's first CRM(0x00) to its CRM(0xAA).
    pub request_to_recognized_ms: Option<u64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct VoucherCount {
    pub charger_number: u32,
    pub remaining: usize,
}

/// The durable outbox of session records waiting for the cloud.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct OutboxStatus {
    pub records: u64,
    pub events: u64,
    pub bytes: u64,
    pub dropped_events: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ErrorEntry {
    /// Unix seconds.
    pub at: u32,
    pub message: String,
}

impl Status {
    /// The text `bmsgw status` prints: a few aligned sections, one line per
    /// item. Text from the daemon has its control characters escaped, so a
    /// hostile string in an error message cannot drive the terminal.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mode = if self.mode.is_empty() {
            "?"
        } else {
            &self.mode
        };
        line(
            &mut out,
            format_args!(
                "bmsgw {}  mode {}  up {}",
                clean(&self.version),
                clean(mode),
                duration(self.uptime_s)
            ),
        );

        out.push_str("\nCAN\n");
        if self.can.is_empty() {
            out.push_str("  (no interfaces)\n");
        } else {
            let rows: Vec<[String; 7]> = self
                .can
                .iter()
                .map(|c| {
                    [
                        clean(&c.role),
                        clean(&c.interface),
                        if c.up { "up" } else { "DOWN" }.to_owned(),
                        c.frames_in.to_string(),
                        c.frames_out.to_string(),
                        c.errors.to_string(),
                        c.tx_dropped.to_string(),
                    ]
                })
                .collect();
            table(
                &mut out,
                [
                    "role",
                    "interface",
                    "state",
                    "frames in",
                    "frames out",
                    "errors",
                    "dropped (bus full)",
                ],
                &rows,
            );
        }

        let c = &self.cloud;
        out.push_str("\nCloud\n");
        let state = if !c.enabled {
            "disabled".to_owned()
        } else if c.state.is_empty() {
            "?".to_owned()
        } else {
            clean(&c.state)
        };
        line(
            &mut out,
            format_args!(
                "  {state}  connects {}  connection errors {}  grants {}  denials {}  timeouts {}  refused answers {}",
                c.connects, c.connection_errors, c.grants, c.denials, c.timeouts, c.refused_answers
            ),
        );

        out.push_str("\nSession\n");
        match &self.session {
            Some(s) => session(&mut out, s),
            None => out.push_str("  none\n"),
        }
        if let Some(s) = &self.last_session {
            out.push_str("\nLast session\n");
            session(&mut out, s);
        }

        out.push_str("\nVouchers\n");
        if self.vouchers.is_empty() {
            out.push_str("  none\n");
        } else {
            for v in &self.vouchers {
                line(
                    &mut out,
                    format_args!("  charger {:<10}  {} left", v.charger_number, v.remaining),
                );
            }
        }

        let o = &self.outbox;
        out.push_str("\nOutbox\n");
        line(
            &mut out,
            format_args!(
                "  {} records, {} events, {} bytes waiting; {} events dropped",
                o.records, o.events, o.bytes, o.dropped_events
            ),
        );

        if let Some(fw) = &self.firewall {
            out.push_str("\nFirewall\n");
            match fw {
                serde_json::Value::Object(map) => {
                    let width = map.keys().map(|k| k.chars().count()).max().unwrap_or(0);
                    for (k, v) in map {
                        let v = match v {
                            serde_json::Value::String(s) => clean(s),
                            other => clean(&other.to_string()),
                        };
                        line(&mut out, format_args!("  {:<width$}  {v}", clean(k)));
                    }
                }
                other => line(&mut out, format_args!("  {}", clean(&other.to_string()))),
            }
        }

        let p = &self.profiles;
        line(
            &mut out,
            format_args!(
                "\nDeviations from the standards (profiles: BMS {}, pile {})",
                clean(&p.bms),
                clean(&p.pile)
            ),
        );
        for (who, d) in [
            ("BMS", &self.deviations.bms),
            ("pile", &self.deviations.pile),
        ] {
            line(&mut out, format_args!("  {who:<5} {d}"));
        }

        out.push_str("\nLast errors\n");
        if self.last_errors.is_empty() {
            out.push_str("  none\n");
        } else {
            for e in &self.last_errors {
                line(
                    &mut out,
                    format_args!("  {}  {}", utc(e.at), clean(&e.message)),
                );
            }
        }
        out
    }
}

fn line(out: &mut String, args: std::fmt::Arguments<'_>) {
    let _ = out.write_fmt(args);
    out.push('\n');
}

fn session(out: &mut String, s: &SessionStatus) {
    let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".to_owned());
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    let rows = [
        ("id", clean(&s.id)),
        ("phase", clean(&s.phase)),
        ("charger", or_dash(s.charger_number.map(|n| n.to_string()))),
        ("credential", or_dash(s.credential.as_deref().map(clean))),
        (
            "pile authenticated",
            yes_no(s.pile_authenticated).to_owned(),
        ),
        ("awaiting approval", yes_no(s.awaiting_approval).to_owned()),
        ("started", utc(s.started_at)),
        ("ended", or_dash(s.ended_at.map(utc))),
        ("result", or_dash(s.result.as_deref().map(clean))),
        (
            "energy",
            or_dash(
                s.energy_wh
                    .map(|wh| format!("{:.1} kWh", f64::from(wh) / 1000.0)),
            ),
        ),
        (
            "request to CRM(0xAA)",
            or_dash(s.request_to_recognized_ms.map(|ms| format!("{ms} ms"))),
        ),
    ];
    for (k, v) in rows {
        line(out, format_args!("  {k:<20}  {v}"));
    }
}

/// Columns padded to their widest cell.
fn table<const N: usize>(out: &mut String, head: [&str; N], rows: &[[String; N]]) {
    let mut width = head.map(|h| h.chars().count());
    for row in rows {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut row_line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::from(" ");
        for (cell, w) in cells.zip(width) {
            let _ = write!(l, " {cell:<w$} ");
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    row_line(&mut head.iter().copied());
    for row in rows {
        row_line(&mut row.iter().map(String::as_str));
    }
}

/// Control characters escaped (`\n`, `\u{1b}`), everything else as is.
fn clean(s: &str) -> String {
    crate::text::printable(s).into_owned()
}

/// `1h 02m 03s`, `4m 05s`, `6s`.
fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s:02}s"),
        (0, _, _) => format!("{h}h {m:02}m {s:02}s"),
        _ => format!("{d}d {h:02}h {m:02}m"),
    }
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SS UTC`; 0 is "-" (never set).
fn utc(unix: u32) -> String {
    if unix == 0 {
        return "-".to_owned();
    }
    let secs = u64::from(unix);
    let (y, mo, d) = civil_from_days(secs / 86_400);
    let t = secs % 86_400;
    format!(
        "{y:04}-{mo:02}-{d:02} {:02}:{:02}:{:02} UTC",
        t / 3600,
        t / 60 % 60,
        t % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian
/// calendar (H. Hinnant's `civil_from_days`, for non-negative days).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A status with every section filled.
    pub(crate) fn sample() -> Status {
        Status {
            version: "0.1.0".into(),
            mode: "bridge".into(),
            uptime_s: 3723,
            can: vec![
                CanLinkStatus {
                    role: "bms".into(),
                    interface: "vcan0".into(),
                    up: true,
                    frames_in: 1200,
                    frames_out: 1180,
                    errors: 0,
                    tx_dropped: 0,
                },
                CanLinkStatus {
                    role: "pile".into(),
                    interface: "vcan1".into(),
                    up: false,
                    frames_in: 7,
                    frames_out: 3,
                    errors: 2,
                    tx_dropped: 40,
                },
            ],
            cloud: CloudStatus {
                enabled: true,
                state: "connected".into(),
                connects: 1,
                connection_errors: 2,
                refused_answers: 0,
                grants: 3,
                denials: 1,
                timeouts: 0,
            },
            session: Some(SessionStatus {
                id: "s-1".into(),
                phase: "Charging".into(),
                charger_number: Some(1),
                credential: Some("online".into()),
                pile_authenticated: true,
                awaiting_approval: false,
                started_at: 1_760_000_000,
                ended_at: None,
                result: None,
                energy_wh: Some(12_345),
                request_to_recognized_ms: Some(412),
            }),
            last_session: None,
            vouchers: vec![VoucherCount {
                charger_number: 1,
                remaining: 3,
            }],
            outbox: OutboxStatus {
                records: 2,
                events: 2,
                bytes: 640,
                dropped_events: 0,
            },
            firewall: Some(serde_json::json!({"dropped_not_allowed": 4, "vin_blanked": 1})),
            profiles: ProfileStatus {
                bms: "field".into(),
                pile: "strict".into(),
            },
            deviations: {
                use crate::interop::Deviation;
                let mut d = crate::interop::LinkDeviations::default();
                d.bms.accepted.add(Deviation::BcpBeforeRecognition);
                d.bms.accepted.add(Deviation::PositiveCurrent);
                d.pile.refused.add(Deviation::CtsWithoutPgn);
                d
            },
            last_errors: vec![ErrorEntry {
                at: 1_760_000_100,
                message: "cloud: timeout\u{1b}[31m".into(),
            }],
        }
    }

    #[test]
    fn json_round_trip_and_tolerance() {
        let s = sample();
        let json = serde_json::to_string(&s).expect("serializes");
        assert_eq!(serde_json::from_str::<Status>(&json).expect("parses"), s);
        // Missing fields default, unknown ones are ignored.
        let partial: Status =
            serde_json::from_str(r#"{"version":"9.9","future":1,"cloud":{"enabled":true}}"#)
                .expect("parses");
        assert_eq!(partial.version, "9.9");
        assert!(partial.cloud.enabled);
        assert!(partial.can.is_empty() && partial.session.is_none());
    }

    #[test]
    fn render_shows_every_section() {
        let text = sample().render();
        for want in [
            "bmsgw 0.1.0  mode bridge  up 1h 02m 03s",
            "role  interface  state  frames in  frames out  errors  dropped (bus full)",
            "pile  vcan1      DOWN   7          3           2       40",
            "connected  connects 1  connection errors 2  grants 3  denials 1  timeouts 0",
            "phase                 Charging",
            "started               2025-10-09 08:53:20 UTC",
            "energy                12.3 kWh",
            "request to CRM(0xAA)  412 ms",
            "charger 1           3 left",
            "2 records, 2 events, 640 bytes waiting; 0 events dropped",
            "dropped_not_allowed  4",
            "vin_blanked          1",
            "Deviations from the standards (profiles: BMS field, pile strict)",
            "BMS   accepted bcp-before-recognition×1, positive-current×1",
            "pile  accepted none; refused cts-without-pgn×1",
            "2025-10-09 08:55:00 UTC  cloud: timeout\\u{1b}[31m",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        assert!(!text.contains('\u{1b}'), "control character printed");
        assert!(!text.contains("Last session"));

        let empty = Status::default().render();
        for want in [
            "mode ?",
            "(no interfaces)",
            "disabled",
            "Session\n  none",
            "Vouchers\n  none",
            "Last errors\n  none",
        ] {
            assert!(empty.contains(want), "missing {want:?} in\n{empty}");
        }
        assert!(!empty.contains("Firewall"));
    }

    #[test]
    fn durations_and_dates() {
        assert_eq!(duration(0), "0s");
        assert_eq!(duration(65), "1m 05s");
        assert_eq!(duration(86_400 * 2 + 3600), "2d 01h 00m");
        assert_eq!(utc(0), "-");
        assert_eq!(utc(1), "1970-01-01 00:00:01 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(u32::MAX), "2106-02-07 06:28:15 UTC");
    }
}
