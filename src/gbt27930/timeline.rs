//! A human-readable timeline of a GB/T 27930 session, from raw frames.
//!
//! Used by `bmsgw decode` on `candump -L` captures and by the demo. Frames go
//! through the passive J1939 [`Monitor`], so TP messages (BRM, BCP, BCS …)
//! are reassembled whichever direction they travel.
//!
//! Each message is also judged as its receiver would judge it under the
//! field profile ([`LinkWatch`]), and each transfer as its sender would
//! ([`Monitor`]): the deviations a capture holds (docs/interop.md) are
//! listed where they occur (`!! deviation …`) and counted per side in the
//! summary (`deviations: …`), with values a peer would refuse
//! (`!! refused …`), so a field failure can be diagnosed from a capture.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::time::Duration;

use super::field::{Finding, LinkWatch};
use super::messages::{BMS_ADDRESS, CHARGER_ADDRESS, Message, MessageKind, Sender};
use super::session::Phase;
use crate::can::CanFrame;
use crate::can::candump::{LogEntry, LogReader};
use crate::interop::DeviationCounts;
use crate::j1939::monitor::{Monitor, MonitorEvent};
use crate::j1939::{Address, tp::J1939Message};
use crate::time::Timestamp;

/// How much of the traffic to print.
#[derive(Clone, Copy, Debug, Default)]
pub struct TimelineOptions {
    /// Print a periodic message only when its content changes (and count
    /// the repeats), instead of every copy.
    pub changes_only: bool,
}

/// Builds timeline lines from frames as they arrive.
pub struct Timeline {
    monitor: Monitor,
    options: TimelineOptions,
    start: Option<Duration>,
    /// Time of the latest frame relative to the first.
    last_rel: Duration,
    last: HashMap<(Address, MessageKind), Vec<u8>>,
    phases: Vec<Phase>,
    counts: HashMap<MessageKind, usize>,
    repeats_hidden: usize,
    malformed: usize,
    bad_lines: usize,
    /// Lines read, frames among them, and whether the last line was bad
    /// (a capture cut off mid-line).
    lines: usize,
    frames: usize,
    last_line_bad: bool,
    watch: LinkWatch,
    /// Deviations found, of the BMS and of the pile.
    bms_deviations: DeviationCounts,
    pile_deviations: DeviationCounts,
    /// Messages a receiver would refuse.
    refusals: usize,
}

impl Timeline {
    pub fn new(options: TimelineOptions) -> Self {
        Timeline {
            monitor: Monitor::new(64),
            options,
            start: None,
            last_rel: Duration::ZERO,
            last: HashMap::new(),
            phases: Vec::new(),
            counts: HashMap::new(),
            repeats_hidden: 0,
            malformed: 0,
            bad_lines: 0,
            lines: 0,
            frames: 0,
            last_line_bad: false,
            watch: LinkWatch::default(),
            bms_deviations: DeviationCounts::default(),
            pile_deviations: DeviationCounts::default(),
            refusals: 0,
        }
    }

    /// The deviations found so far: the BMS's, then the pile's.
    pub fn deviations(&self) -> (&DeviationCounts, &DeviationCounts) {
        (&self.bms_deviations, &self.pile_deviations)
    }

    fn counts_of(&mut self, by: Sender) -> &mut DeviationCounts {
        match by {
            Sender::Bms => &mut self.bms_deviations,
            Sender::Charger => &mut self.pile_deviations,
        }
    }

    /// Feed one frame seen at `time` (any clock; only differences are
    /// printed). Returns the lines it completes.
    pub fn feed(&mut self, time: Duration, frame: &CanFrame) -> Vec<String> {
        let start = *self.start.get_or_insert(time);
        let now = Timestamp::ZERO + time;
        self.monitor.handle_timeout(now);
        self.monitor.handle_frame(frame, now);
        self.last_rel = time.saturating_sub(start);
        self.drain(self.last_rel)
    }

    /// End of input: report transfers that never completed.
    pub fn finish(&mut self) -> Vec<String> {
        self.monitor.finish();
        self.drain(self.last_rel)
    }

    fn drain(&mut self, rel: Duration) -> Vec<String> {
        let mut lines = Vec::new();
        while let Some(ev) = self.monitor.poll_event() {
            match ev {
                MonitorEvent::Message(m) => {
                    if let Some(line) = self.message_line(rel, &m) {
                        lines.push(line);
                    }
                    lines.extend(self.judge(rel, &m));
                }
                MonitorEvent::Deviation {
                    by,
                    sender,
                    pgn,
                    deviation,
                    detail,
                } => {
                    let side = match by.0 {
                        BMS_ADDRESS => Some(Sender::Bms),
                        CHARGER_ADDRESS => Some(Sender::Charger),
                        _ => None,
                    };
                    if let Some(side) = side {
                        self.counts_of(side).add(deviation);
                    }
                    lines.push(format!(
                        "{:>10.3}  {:<9} !! deviation {deviation}: {detail} (transfer of PGN {pgn})",
                        rel.as_secs_f64(),
                        direction(by, sender),
                    ));
                }
                MonitorEvent::Incomplete {
                    source,
                    destination,
                    pgn,
                    reason,
                    received,
                    total,
                } => lines.push(format!(
                    "{:>10.3}  {:<9} TP {pgn} incomplete ({received}/{total} packets): {reason}",
                    rel.as_secs_f64(),
                    direction(source, destination),
                )),
            }
        }
        lines
    }

    fn message_line(&mut self, rel: Duration, m: &J1939Message) -> Option<String> {
        let dir = direction(m.source, m.destination);
        let t = rel.as_secs_f64();
        if m.pgn.raw() == crate::auth::AUTH_PGN {
            return Some(format!("{t:>10.3}  {dir:<9} {}", auth_summary(&m.data)));
        }
        let Some(kind) = MessageKind::from_pgn(m.pgn) else {
            return Some(format!(
                "{t:>10.3}  {dir:<9} PGN {} len={} data={}",
                m.pgn,
                m.data.len(),
                hex::encode_upper(&m.data)
            ));
        };
        *self.counts.entry(kind).or_default() += 1;
        let phase = phase_of(kind);
        if !self.phases.contains(&phase) {
            self.phases.push(phase);
        }
        if self.options.changes_only {
            let key = (m.source, kind);
            if self.last.get(&key) == Some(&m.data) {
                self.repeats_hidden += 1;
                return None;
            }
            self.last.insert(key, m.data.clone());
        }
        Some(match Message::decode(m.pgn, &m.data) {
            Ok(msg) => format!("{t:>10.3}  {dir:<9} {msg}"),
            Err(e) => {
                self.malformed += 1;
                format!("{t:>10.3}  {dir:<9} {kind} MALFORMED: {e}")
            }
        })
    }

    /// What the receiver of `m` would find in it (see the module docs).
    fn judge(&mut self, rel: Duration, m: &J1939Message) -> Vec<String> {
        let Some(kind) = MessageKind::from_pgn(m.pgn) else {
            return Vec::new();
        };
        let Ok(msg) = Message::decode(m.pgn, &m.data) else {
            return Vec::new();
        };
        let by = kind.sender();
        let now = Timestamp::ZERO + rel;
        let dir = direction(m.source, m.destination);
        let t = rel.as_secs_f64();
        let mut lines = Vec::new();
        for finding in self.watch.message(by, &msg, m.data.len(), now) {
            match finding {
                Finding::Deviation {
                    by,
                    deviation,
                    detail,
                } => {
                    self.counts_of(by).add(deviation);
                    lines.push(format!(
                        "{t:>10.3}  {dir:<9} !! deviation {deviation}: {detail}"
                    ));
                }
                Finding::Fault { fault, .. } => {
                    self.refusals += 1;
                    lines.push(format!("{t:>10.3}  {dir:<9} !! refused: {fault}"));
                }
                Finding::Ignored { .. } => {}
            }
        }
        lines
    }

    /// Phases in the order they first appeared.
    pub fn phases(&self) -> &[Phase] {
        &self.phases
    }

    pub fn malformed(&self) -> usize {
        self.malformed
    }

    /// Log lines that did not parse (see [`decode_log`]).
    pub fn bad_lines(&self) -> usize {
        self.bad_lines
    }

    /// Why the input is not a usable `candump -L` capture, if it is not:
    /// no frame at all, or lines that are not frames. One bad last line is
    /// a capture cut off mid-line and passes.
    pub fn problem(&self) -> Option<String> {
        if self.frames == 0 {
            return Some(if self.lines == 0 {
                "the log is empty".to_string()
            } else {
                format!("none of its {} lines is a candump -L frame", self.lines)
            });
        }
        let cut_off = usize::from(self.last_line_bad);
        if self.bad_lines > cut_off {
            return Some(format!(
                "{} of its {} lines are not candump -L frames (see the !! lines)",
                self.bad_lines, self.lines
            ));
        }
        None
    }

    /// Closing lines: the phase sequence and message counts.
    pub fn summary(&self) -> Vec<String> {
        let phases: Vec<String> = self.phases.iter().map(|p| p.to_string()).collect();
        let mut counts: Vec<(MessageKind, usize)> =
            self.counts.iter().map(|(k, v)| (*k, *v)).collect();
        counts.sort();
        let counts: Vec<String> = counts.iter().map(|(k, n)| format!("{k}×{n}")).collect();
        let mut out = vec![
            format!("phases: {}", phases.join(" -> ")),
            format!("messages: {}", counts.join(" ")),
        ];
        if self.repeats_hidden > 0 {
            out.push(format!("unchanged repeats hidden: {}", self.repeats_hidden));
        }
        if self.malformed > 0 {
            out.push(format!("malformed: {}", self.malformed));
        }
        if self.bad_lines > 0 {
            out.push(format!("bad log lines: {}", self.bad_lines));
        }
        out.push(format!(
            "deviations: BMS {}; pile {}",
            self.bms_deviations, self.pile_deviations
        ));
        if self.refusals > 0 {
            out.push(format!(
                "messages a receiver would refuse: {}",
                self.refusals
            ));
        }
        out
    }
}

/// One line for a vehicle-authentication message: its type and the clear
/// parts (the ticket header, the result code). Nothing secret is in clear.
fn auth_summary(data: &[u8]) -> String {
    use crate::auth::AuthMessage;
    match AuthMessage::parse(data) {
        Ok(AuthMessage::Request { ticket, noise }) => {
            let header = match crate::auth::TicketHeader::parse(&ticket) {
                Ok(h) => format!(
                    "v{} key_offset={} charger={} id={}",
                    crate::auth::ticket::TICKET_VERSION,
                    h.key_offset,
                    h.charger_number,
                    hex::encode(h.ticket_id)
                ),
                Err(code) => format!("header refused: {code}"),
            };
            format!(
                "AuthRequest len={} ticket({header}) noise={}B",
                data.len(),
                noise.len()
            )
        }
        Ok(AuthMessage::Challenge { noise }) => {
            format!("AuthChallenge len={} noise={}B", data.len(), noise.len())
        }
        Ok(AuthMessage::Confirm { transport }) => {
            format!("AuthConfirm len={} sealed={}B", data.len(), transport.len())
        }
        Ok(AuthMessage::Result { code, transport }) => format!(
            "AuthResult {code} ({})",
            if transport.is_some() {
                "authenticated"
            } else {
                "unauthenticated"
            }
        ),
        Err(e) => format!("Auth MALFORMED len={}: {e}", data.len()),
    }
}

/// The session phase a message belongs to.
pub fn phase_of(kind: MessageKind) -> Phase {
    use MessageKind::*;
    match kind {
        Chm | Bhm => Phase::Handshake,
        Crm | Brm => Phase::Recognition,
        Bcp | Cts | Cml | Bro | Cro => Phase::Configuration,
        Bcl | Bcs | Ccs | Bsm | Bmv | Bmt | Bsp => Phase::Charging,
        Bst | Cst => Phase::Stopping,
        Bsd | Csd => Phase::Statistics,
        Bem | Cem => Phase::Error,
    }
}

fn name(a: Address) -> String {
    match a.0 {
        CHARGER_ADDRESS => "pile".to_string(),
        BMS_ADDRESS => "BMS".to_string(),
        crate::gateway::vehicle_auth::DEFAULT_VEHICLE_ADDRESS => "GW".to_string(),
        _ => format!("{a}"),
    }
}

fn direction(source: Address, destination: Address) -> String {
    format!("{}→{}", name(source), name(destination))
}

/// One output line: what came from the log (a bad line's text, decoded
/// strings) never reaches the terminal as control characters.
fn write_line(out: &mut impl Write, line: &str) -> Result<(), DecodeLogError> {
    writeln!(out, "{}", crate::text::printable(line)).map_err(DecodeLogError::Output)
}

/// Why a log could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeLogError {
    #[error("reading the log failed: {0}")]
    Input(#[source] crate::can::candump::ReadError),
    #[error("writing the timeline failed: {0}")]
    Output(#[source] std::io::Error),
}

/// Decode a `candump -L` log into a timeline written to `out`, and return
/// the timeline so the caller can inspect the phases.
///
/// A line that does not parse is reported in the output (`!! line N: …`)
/// and skipped, so a capture cut off mid-line still decodes; only I/O
/// errors stop the run.
pub fn decode_log(
    input: impl BufRead,
    mut out: impl Write,
    options: TimelineOptions,
) -> Result<Timeline, DecodeLogError> {
    let mut timeline = Timeline::new(options);
    let mut reader = LogReader::new(input);
    while let Some(record) = reader.next() {
        timeline.lines = usize::try_from(reader.line()).unwrap_or(usize::MAX);
        timeline.last_line_bad = false;
        let lines = match record {
            Ok(record) => match &record.entry {
                LogEntry::Frame(frame) => {
                    timeline.frames += 1;
                    timeline.feed(record.timestamp, frame)
                }
                _ => Vec::new(),
            },
            Err(e @ crate::can::candump::ReadError::Io { .. }) => {
                return Err(DecodeLogError::Input(e));
            }
            Err(e) => {
                timeline.bad_lines += 1;
                timeline.last_line_bad = true;
                vec![format!("!! {e}")]
            }
        };
        for line in lines {
            write_line(&mut out, &line)?;
        }
    }
    for line in timeline.finish().into_iter().chain(timeline.summary()) {
        write_line(&mut out, &line)?;
    }
    Ok(timeline)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SESSION: &str = "\
(1700000000.000000) vcan0 1826F456#010100
(1700000000.001000) vcan0 182756F4#6810
(1700000000.002000) vcan0 1801F456#004E61BC00333130
(1700000000.003000) vcan0 1CEC56F4#101E0005FF000600
this line is not a frame
(1700000000.004000) vcan0 1CEC56F4#10
";

    #[test]
    fn decodes_frames_and_reports_bad_lines_without_stopping() {
        let mut out = Vec::new();
        let t = decode_log(SESSION.as_bytes(), &mut out, TimelineOptions::default()).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("pile→BMS  CHM"), "{text}");
        assert!(text.contains("BMS→pile  BHM"), "{text}");
        assert!(
            text.contains("CRM recognition=0x00 charger=12345678"),
            "{text}"
        );
        assert!(text.contains("!! line 5:"), "{text}");
        assert_eq!(t.bad_lines(), 1);
        assert_eq!(t.phases(), [Phase::Handshake, Phase::Recognition]);
        assert!(text.contains("phases: handshake -> recognition"), "{text}");
        assert!(text.contains("bad log lines: 1"), "{text}");
    }

    #[test]
    fn changes_only_hides_identical_repeats() {
        let log = "(1.0) vcan0 1826F456#010100\n(1.25) vcan0 1826F456#010100\n(1.5) vcan0 1826F456#010200\n";
        let mut out = Vec::new();
        decode_log(
            log.as_bytes(),
            &mut out,
            TimelineOptions { changes_only: true },
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.matches(" CHM ").count(), 2, "{text}");
        assert!(text.contains("unchanged repeats hidden: 1"), "{text}");
    }
}

#[cfg(test)]
mod deviation_tests {
    use super::*;
    use crate::gbt27930::bms::BmsConfig;
    use crate::gbt27930::units::{Current, DeciVolt};
    use crate::gbt27930::{
        Bcs, CellVoltage, ChargerNumber, Chm, Crm, ProtocolVersion, Recognition, RegionCode,
    };
    use crate::j1939::{J1939Id, Pgn, Priority};

    const BMS: Address = Address(BMS_ADDRESS);
    const PILE: Address = Address(CHARGER_ADDRESS);

    fn frame(prio: u8, pgn: u32, from: Address, to: Address, data: &[u8]) -> CanFrame {
        let id = J1939Id::new(
            Priority::new(prio).expect("priority"),
            Pgn::new(pgn).expect("pgn"),
            from,
            to,
        );
        CanFrame::new(id.to_can_id(), data).expect("frame")
    }

    fn single(msg: &Message, from: Address, to: Address) -> CanFrame {
        let k = msg.kind();
        frame(k.priority().get(), k.pgn().raw(), from, to, &msg.encode())
    }

    /// A BMS-to-pile transfer of `data` answered by the pile's `cts`.
    fn transfer(pgn: u32, data: &[u8], cts: [u8; 8]) -> Vec<CanFrame> {
        let packets = data.len().div_ceil(7) as u8;
        let [s0, s1] = (data.len() as u16).to_le_bytes();
        let [p0, p1, p2, _] = pgn.to_le_bytes();
        let mut out = vec![
            frame(
                7,
                0xEC00,
                BMS,
                PILE,
                &[0x10, s0, s1, packets, 0xFF, p0, p1, p2],
            ),
            frame(7, 0xEC00, PILE, BMS, &cts),
        ];
        for (i, chunk) in data.chunks(7).enumerate() {
            let mut d = [0xFF; 8];
            d[0] = i as u8 + 1;
            d[1..1 + chunk.len()].copy_from_slice(chunk);
            out.push(frame(7, 0xEB00, BMS, PILE, &d));
        }
        out.push(frame(
            7,
            0xEC00,
            PILE,
            BMS,
            &[0x13, s0, s1, packets, 0xFF, p0, p1, p2],
        ));
        out
    }

    /// A capture with a pile that puts an interval and no PGN in its CTS,
    /// and a BMS with version bytes in BHM, positive current and BCS in one
    /// frame: each is named where it occurs and counted in the summary.
    #[test]
    fn decode_lists_the_deviations_of_a_capture() {
        let crm = |recognition| {
            Message::Crm(Crm {
                recognition,
                charger_number: ChargerNumber(1),
                region_code: RegionCode(*b"310"),
            })
        };
        let mut frames = vec![
            single(
                &Message::Chm(Chm {
                    version: ProtocolVersion::V1_1,
                }),
                PILE,
                BMS,
            ),
            frame(6, 0x2700, BMS, PILE, &[0x01, 0x01]),
            single(&crm(Recognition::NotRecognized), PILE, BMS),
        ];
        let brm = Message::Brm(BmsConfig::default().identity).encode();
        frames.extend(transfer(
            0x0200,
            &brm,
            [0x11, 7, 1, 0x0A, 0x00, 0xFF, 0xFF, 0xFF],
        ));
        frames.push(single(&crm(Recognition::Recognized), PILE, BMS));
        let mut bcp = crate::gbt27930::bms::Bms::new(BmsConfig::default())
            .charging_parameters()
            .expect("BCP");
        bcp.max_charging_current = Current(6000); // 200 A counted positive
        frames.extend(transfer(
            0x0600,
            &Message::Bcp(bcp).encode(),
            [0x11, 2, 1, 0xFF, 0xFF, 0x00, 0x06, 0x00],
        ));
        let bcs = Message::Bcs(Bcs {
            measured_voltage: DeciVolt(3700),
            measured_current: Current(5000),
            max_cell: CellVoltage {
                voltage: crate::gbt27930::units::CentiVolt(380),
                group: 1,
            },
            soc_percent: 50,
            remaining_minutes: 20,
        })
        .encode();
        frames.push(frame(7, 0x1100, BMS, PILE, &bcs[..8]));

        let mut t = Timeline::new(TimelineOptions::default());
        let mut lines = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            lines.extend(t.feed(Duration::from_millis(10 * i as u64), f));
        }
        lines.extend(t.finish());
        lines.extend(t.summary());
        let text = lines.join("\n");
        for want in [
            "pile→BMS  !! deviation cts-packet-interval: CTS asks for 10 ms between packets",
            "pile→BMS  !! deviation cts-without-pgn",
            "BMS→pile  !! deviation bhm-implausible",
            "BMS→pile  !! deviation positive-current",
            "BMS→pile  !! deviation bcs-single-frame",
            "deviations: BMS positive-current×1, bhm-implausible×1, bcs-single-frame×1; pile cts-packet-interval×1, cts-without-pgn×1",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        // BRM and BCP were reassembled although the CTS lacked its PGN.
        assert!(text.contains("BMS→pile  BRM"), "{text}");
        assert!(text.contains("BMS→pile  BCP"), "{text}");
    }
}

#[cfg(test)]
mod hostile_log_tests {
    use super::*;

    fn decode(text: &str) -> (String, Timeline) {
        let mut out = Vec::new();
        let t = decode_log(text.as_bytes(), &mut out, TimelineOptions::default()).expect("decodes");
        (String::from_utf8(out).expect("UTF-8 output"), t)
    }

    #[test]
    fn garbage_is_a_problem_and_a_cut_last_line_is_not() {
        let (_, t) = decode("");
        assert_eq!(t.problem().as_deref(), Some("the log is empty"));
        let (_, t) = decode("garbage\nmore garbage\n");
        assert!(
            t.problem()
                .is_some_and(|p| p.contains("none of its 2 lines")),
            "{:?}",
            t.problem()
        );
        let good = "(1.0) vcan0 1826F456#010100\n(1.25) vcan0 1826F456#010100\n";
        let (_, t) = decode(good);
        assert_eq!(t.problem(), None);
        // candump killed mid-line: the last line is cut, the capture is fine.
        let (_, t) = decode(&format!("{good}(1.5) vcan0 1826F4"));
        assert_eq!(t.problem(), None);
        let (_, t) = decode(&format!("junk\n{good}"));
        assert!(
            t.problem().is_some_and(|p| p.contains("1 of its 3 lines")),
            "{:?}",
            t.problem()
        );
    }

    #[test]
    fn control_characters_from_the_log_never_reach_the_output() {
        // An OSC sequence that would set the terminal's title, in a timestamp.
        let (out, _) =
            decode("(1.0\u{1b}]0;pwned\u{7}) vcan0 1826F456#010100\n(2.0) vcan0 1826F456#010100\n");
        assert!(!out.contains('\u{1b}') && !out.contains('\u{7}'), "{out:?}");
        assert!(out.contains("\\u{1b}]0;pwned\\u{7}"), "{out}");
    }

    #[test]
    fn an_announcement_beyond_j1939_is_reported_not_dropped() {
        // RTS from the BMS to the pile: 2047 bytes in 255 packets of PGN 0x0200.
        let (out, _) = decode("(1.0) vcan0 1CEC56F4#10FF07FFFF000200\n");
        assert!(
            out.contains("refused: announces 2047 bytes in 255 packets") && out.contains("1785"),
            "{out}"
        );
    }
}
