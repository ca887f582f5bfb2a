//! `candump -L` log lines, the lingua franca of Linux CAN captures.
//!
//! The reader lets `bmsgw decode` and the tests take captures made with
//! can-utils (on a vehicle, or in the VM lane); the writer produces logs
//! that can-utils' `canplayer` and `log2asc` accept. A line looks like
//!
//! ```text
//! (1700000000.123456) vcan0 18EC56F4#1122334455667788
//! ```
//!
//! and follows can-utils' `lib.c`: 3 hex digits are a standard id, 8 an
//! extended id, or an error frame when `CAN_ERR_FLAG` (0x20000000) is set;
//! `#R` / `#R5` are remote frames, `##<flags><data>` CAN FD, and a 5-digit
//! id with `#FF:SS:AAAAAAAA#<data>` CAN XL. Data bytes may be separated by
//! `.`, an 8-byte classical frame may end in `_<raw DLC 9..F>`, and
//! `candump -x` appends ` R` (received) or ` T` (transmitted).
//!
//! Only classical data frames become a [`CanFrame`]; error frames are
//! decoded with the same function the SocketCAN backend uses, and remote,
//! FD and XL frames are recognised as their own entries so a caller can
//! count or skip them.

use std::io::{self, BufRead, Write};
use std::time::Duration;

use super::socketcan::{CAN_ERR_FLAG, error_events_from};
use super::{CAN_MAX_DLEN, CanFrame, CanId, ErrorEvent, ExtendedId, FrameError, StandardId};

/// Largest CAN FD payload.
pub const CANFD_MAX_DLEN: usize = 64;
/// Largest CAN XL payload.
pub const CANXL_MAX_DLEN: usize = 2048;

/// Longest line the reader accepts (a full CAN XL frame is about 4.2 kB),
/// so a binary file fed by mistake cannot make it buffer without bound.
pub const MAX_LINE_LEN: usize = 8192;

/// One frame of a capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    /// Wall-clock time of reception, since the Unix epoch.
    pub timestamp: Duration,
    pub interface: String,
    pub entry: LogEntry,
    /// The `candump -x` mark, when the capture has one.
    pub direction: Option<Direction>,
}

/// Whether the capturing socket received the frame or sent it itself
/// (`candump -x`: `R` / `T`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Received,
    Transmitted,
}

/// What a log line holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogEntry {
    /// A classical data frame.
    Frame(CanFrame),
    /// An error frame: the class bits (identifier without the flag) and
    /// the payload as logged. See [`LogEntry::error_events`].
    Error { class: u32, data: Vec<u8> },
    /// A remote (RTR) frame, with its requested length.
    Remote { id: CanId, len: u8 },
    /// A CAN FD frame, with its flags nibble (BRS 0x1, ESI 0x2).
    Fd { id: CanId, flags: u8, data: Vec<u8> },
    /// A CAN XL frame.
    Xl {
        /// Virtual CAN network id.
        vcid: u8,
        /// 11-bit priority (XL's arbitration field).
        priority: u16,
        flags: u8,
        /// SDU type.
        sdt: u8,
        /// Acceptance field.
        af: u32,
        data: Vec<u8>,
    },
}

impl LogEntry {
    /// For an error frame, what it reports (the SocketCAN backend's
    /// decoding); `None` for other entries.
    pub fn error_events(&self) -> Option<Vec<ErrorEvent>> {
        match self {
            LogEntry::Error { class, data } => Some(error_events_from(*class, data)),
            _ => None,
        }
    }
}

/// What is wrong with one log line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CandumpError {
    #[error(
        "expected '(seconds.fraction) interface frame', e.g. \
         '(1700000000.123456) can0 18EC56F4#1122'"
    )]
    Shape,
    #[error("timestamp '{0}' is not '(seconds.fraction)', e.g. '(1700000000.123456)'")]
    Timestamp(String),
    #[error("frame '{0}' needs a 3-, 5- or 8-digit hex identifier followed by '#'")]
    Identifier(String),
    #[error("identifier '{0}' is not hex")]
    IdentifierNotHex(String),
    #[error("identifier '{0}' sets the extended or remote flag bits, which candump never writes")]
    IdentifierFlags(String),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("data '{0}' is not hex")]
    DataNotHex(String),
    #[error("data '{0}' has an odd number of hex digits")]
    DataOddLength(String),
    #[error("data '{data}' is {len} bytes; a {kind} frame holds at most {max}")]
    DataTooLong {
        data: String,
        len: usize,
        kind: &'static str,
        max: usize,
    },
    #[error("remote frame '{0}' must be 'R', 'R' and a length 0-8, or 'R8_' and a raw DLC 9-F")]
    Remote(String),
    #[error("CAN FD frame '{0}' needs a flags digit after '##'")]
    FdFlags(String),
    #[error("CAN XL header '{0}' must be 'FF:SS:AAAAAAAA#' (flags, SDU type, acceptance field)")]
    XlHeader(String),
    #[error("raw DLC suffix '{0}' must be '_' and one hex digit 9-F, after exactly 8 bytes")]
    RawDlc(String),
    #[error("unexpected '{0}' after the frame (only candump -x's 'R' or 'T' may follow)")]
    Trailing(String),
    #[error("the line is not UTF-8 text")]
    NotText,
    #[error("the line is longer than {MAX_LINE_LEN} bytes")]
    TooLong,
}

/// A [`LogReader`] failure, with the 1-based line it happened on.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("line {line}: {error}")]
    Line { line: u64, error: CandumpError },
    #[error("reading line {line} failed")]
    Io {
        line: u64,
        #[source]
        source: io::Error,
    },
}

impl ReadError {
    pub fn line(&self) -> u64 {
        match self {
            ReadError::Line { line, .. } | ReadError::Io { line, .. } => *line,
        }
    }
}

/// Parses one `candump -L` line.
///
/// `Ok(None)` for a line with nothing to report: blank, or candump's
/// `DROPCOUNT: ...` note (which `log2asc` and `canplayer` skip too).
pub fn parse_line(line: &str) -> Result<Option<LogRecord>, CandumpError> {
    let line = line.trim();
    if line.is_empty() || line.starts_with("DROPCOUNT:") {
        return Ok(None);
    }
    let mut tokens = line.split_ascii_whitespace();
    let (Some(ts), Some(iface), Some(frame)) = (tokens.next(), tokens.next(), tokens.next()) else {
        return Err(CandumpError::Shape);
    };
    let direction = match tokens.next() {
        None => None,
        Some("R") => Some(Direction::Received),
        Some("T") => Some(Direction::Transmitted),
        Some(other) => return Err(CandumpError::Trailing(other.to_owned())),
    };
    if let Some(extra) = tokens.next() {
        return Err(CandumpError::Trailing(extra.to_owned()));
    }
    Ok(Some(LogRecord {
        timestamp: parse_timestamp(ts)?,
        interface: iface.to_owned(),
        entry: parse_frame(frame)?,
        direction,
    }))
}

fn parse_timestamp(token: &str) -> Result<Duration, CandumpError> {
    let bad = || CandumpError::Timestamp(token.to_owned());
    let inner = token
        .strip_prefix('(')
        .and_then(|t| t.strip_suffix(')'))
        .ok_or_else(bad)?;
    let (secs, frac) = inner.split_once('.').ok_or_else(bad)?;
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    // Duration holds nanoseconds, so at most 9 fraction digits.
    if !all_digits(secs) || !all_digits(frac) || frac.len() > 9 {
        return Err(bad());
    }
    let secs: u64 = secs.parse().map_err(|_| bad())?;
    let frac_value: u32 = frac.parse().map_err(|_| bad())?;
    let scale = 10u32.pow(9 - frac.len() as u32);
    Ok(Duration::new(secs, frac_value * scale))
}

fn parse_frame(token: &str) -> Result<LogEntry, CandumpError> {
    let (id_text, rest) = token
        .split_once('#')
        .ok_or_else(|| CandumpError::Identifier(token.to_owned()))?;
    if !matches!(id_text.len(), 3 | 5 | 8) {
        return Err(CandumpError::Identifier(token.to_owned()));
    }
    if !id_text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(CandumpError::IdentifierNotHex(id_text.to_owned()));
    }
    let raw = u32::from_str_radix(id_text, 16)
        .map_err(|_| CandumpError::IdentifierNotHex(id_text.to_owned()))?;
    if id_text.len() == 5 {
        return parse_xl(raw, rest);
    }
    let id = match id_text.len() {
        // Three hex digits fit in u16; StandardId rejects what exceeds 11 bits.
        3 => CanId::Standard(StandardId::new(raw as u16)?),
        _ => {
            if raw & (CAN_EFF_FLAG | CAN_RTR_FLAG) != 0 {
                return Err(CandumpError::IdentifierFlags(id_text.to_owned()));
            }
            if raw & CAN_ERR_FLAG != 0 {
                let data = parse_data(rest, CAN_MAX_DLEN, "error")?;
                return Ok(LogEntry::Error {
                    class: raw & ExtendedId::MAX,
                    data,
                });
            }
            CanId::Extended(ExtendedId::new(raw)?)
        }
    };
    if let Some(after_r) = rest.strip_prefix(['R', 'r']) {
        return parse_remote(id, after_r, rest);
    }
    if let Some(fd) = rest.strip_prefix('#') {
        let mut chars = fd.chars();
        let flags = chars
            .next()
            .and_then(|c| c.to_digit(16))
            .ok_or_else(|| CandumpError::FdFlags(rest.to_owned()))?;
        let data = parse_data(chars.as_str(), CANFD_MAX_DLEN, "CAN FD")?;
        return Ok(LogEntry::Fd {
            id,
            // A hex digit is below 16.
            flags: flags as u8,
            data,
        });
    }
    // An 8-byte classical frame may carry its raw DLC (9..=15). CanFrame
    // has no place for it and it means the same 8 bytes, so it is checked
    // and dropped.
    let (data_text, raw_dlc) = match rest.split_once('_') {
        Some((d, dlc)) => (d, Some(dlc)),
        None => (rest, None),
    };
    let data = parse_data(data_text, CAN_MAX_DLEN, "classical")?;
    if let Some(dlc) = raw_dlc
        && (data.len() != CAN_MAX_DLEN || !is_raw_dlc(dlc))
    {
        return Err(CandumpError::RawDlc(format!("_{dlc}")));
    }
    Ok(LogEntry::Frame(CanFrame::new(id, &data)?))
}

const CAN_EFF_FLAG: u32 = 0x8000_0000;
const CAN_RTR_FLAG: u32 = 0x4000_0000;

fn is_raw_dlc(s: &str) -> bool {
    s.len() == 1 && u8::from_str_radix(s, 16).is_ok_and(|d| (9..=15).contains(&d))
}

fn parse_remote(id: CanId, after_r: &str, whole: &str) -> Result<LogEntry, CandumpError> {
    let bad = || CandumpError::Remote(whole.to_owned());
    let (len_text, raw_dlc) = match after_r.split_once('_') {
        Some((l, d)) => (l, Some(d)),
        None => (after_r, None),
    };
    let len = match len_text {
        "" => 0,
        t if t.len() == 1 => t
            .parse::<u8>()
            .ok()
            .filter(|l| usize::from(*l) <= CAN_MAX_DLEN)
            .ok_or_else(bad)?,
        _ => return Err(bad()),
    };
    if let Some(dlc) = raw_dlc
        && (usize::from(len) != CAN_MAX_DLEN || !is_raw_dlc(dlc))
    {
        return Err(bad());
    }
    Ok(LogEntry::Remote { id, len })
}

fn parse_xl(prio_field: u32, rest: &str) -> Result<LogEntry, CandumpError> {
    // lib.c prints the 5 digits as "%02X%03X": VCID, then priority.
    let header_error = || CandumpError::XlHeader(rest.to_owned());
    let (header, data_text) = rest.split_once('#').ok_or_else(header_error)?;
    let mut parts = header.split(':');
    let (Some(flags), Some(sdt), Some(af), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(header_error());
    };
    let hex_field = |s: &str, width: usize| {
        (s.len() == width && s.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| u32::from_str_radix(s, 16).ok())
            .flatten()
            .ok_or_else(header_error)
    };
    let flags = hex_field(flags, 2)?;
    let sdt = hex_field(sdt, 2)?;
    let af = hex_field(af, 8)?;
    let data = parse_data(data_text, CANXL_MAX_DLEN, "CAN XL")?;
    Ok(LogEntry::Xl {
        // Each value was checked to fit: 2 hex digits, 3 hex digits masked
        // to 11 bits.
        vcid: (prio_field >> 12) as u8,
        priority: (prio_field & 0x7FF) as u16,
        flags: flags as u8,
        sdt: sdt as u8,
        af,
        data,
    })
}

/// Hex bytes, optionally separated by single dots (`11.22.33`).
fn parse_data(text: &str, max: usize, kind: &'static str) -> Result<Vec<u8>, CandumpError> {
    let mut data = Vec::new();
    let mut high: Option<u8> = None;
    let mut after_dot = false;
    for c in text.chars() {
        if c == '.' && high.is_none() && !after_dot {
            after_dot = true;
            continue;
        }
        after_dot = false;
        // A hex digit is below 16.
        let nibble = c
            .to_digit(16)
            .ok_or_else(|| CandumpError::DataNotHex(text.to_owned()))? as u8;
        match high.take() {
            None => high = Some(nibble),
            Some(h) => data.push(h << 4 | nibble),
        }
    }
    if high.is_some() {
        return Err(CandumpError::DataOddLength(text.to_owned()));
    }
    if data.len() > max {
        return Err(CandumpError::DataTooLong {
            data: text.to_owned(),
            len: data.len(),
            kind,
            max,
        });
    }
    Ok(data)
}

/// One `candump -L` line (without newline) for a data frame.
pub fn format_line(timestamp: Duration, iface: &str, frame: &CanFrame) -> String {
    format!("{} {iface} {frame}", format_timestamp(timestamp))
}

/// One `candump -L` line (without newline) for any entry, with the
/// `candump -x` mark if the record has a direction.
pub fn format_record(record: &LogRecord) -> String {
    let mut line = format!(
        "{} {} ",
        format_timestamp(record.timestamp),
        record.interface
    );
    match &record.entry {
        LogEntry::Frame(f) => line.push_str(&f.to_string()),
        LogEntry::Error { class, data } => {
            line.push_str(&format!(
                "{:08X}#",
                (class & ExtendedId::MAX) | CAN_ERR_FLAG
            ));
            push_hex(&mut line, data);
        }
        LogEntry::Remote { id, len } => {
            line.push_str(&format!("{id}#R"));
            if (1..=8).contains(len) {
                line.push_str(&len.to_string());
            }
        }
        LogEntry::Fd { id, flags, data } => {
            line.push_str(&format!("{id}##{:X}", flags & 0xF));
            push_hex(&mut line, data);
        }
        LogEntry::Xl {
            vcid,
            priority,
            flags,
            sdt,
            af,
            data,
        } => {
            line.push_str(&format!(
                "{vcid:02X}{:03X}#{flags:02X}:{sdt:02X}:{af:08X}#",
                priority & 0x7FF
            ));
            push_hex(&mut line, data);
        }
    }
    match record.direction {
        Some(Direction::Received) => line.push_str(" R"),
        Some(Direction::Transmitted) => line.push_str(" T"),
        None => {}
    }
    line
}

fn format_timestamp(t: Duration) -> String {
    // candump's "(%010lu.%06lu)": microseconds, truncated.
    format!("({:010}.{:06})", t.as_secs(), t.subsec_micros())
}

fn push_hex(out: &mut String, data: &[u8]) {
    for b in data {
        out.push_str(&format!("{b:02X}"));
    }
}

/// Reads a `candump -L` log record by record.
///
/// Each item is a record or an error naming its line; the reader can go on
/// after an error, so a caller may skip bad lines or stop at the first.
pub struct LogReader<R> {
    inner: R,
    line: u64,
    buf: Vec<u8>,
}

impl<R: BufRead> LogReader<R> {
    pub fn new(inner: R) -> Self {
        LogReader {
            inner,
            line: 0,
            buf: Vec::new(),
        }
    }

    /// The number of the line read last (1-based; 0 before the first).
    pub fn line(&self) -> u64 {
        self.line
    }

    /// Reads the next line into `buf`, up to [`MAX_LINE_LEN`]. `Ok(false)`
    /// at end of input; `Err(None)` for an over-long line, whose rest has
    /// been skipped.
    fn next_line(&mut self) -> Result<bool, Option<io::Error>> {
        self.buf.clear();
        let limit = MAX_LINE_LEN as u64 + 1;
        let n = io::Read::take(&mut self.inner, limit)
            .read_until(b'\n', &mut self.buf)
            .map_err(Some)?;
        if n == 0 {
            return Ok(false);
        }
        self.line += 1;
        if self.buf.len() > MAX_LINE_LEN && self.buf.last() != Some(&b'\n') {
            let mut sink = Vec::new();
            loop {
                sink.clear();
                let n = io::Read::take(&mut self.inner, limit)
                    .read_until(b'\n', &mut sink)
                    .map_err(Some)?;
                if n == 0 || sink.last() == Some(&b'\n') {
                    break;
                }
            }
            return Err(None);
        }
        Ok(true)
    }
}

impl<R: BufRead> Iterator for LogReader<R> {
    type Item = Result<LogRecord, ReadError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            match self.next_line() {
                Ok(false) => return None,
                Ok(true) => {}
                Err(Some(source)) => {
                    return Some(Err(ReadError::Io {
                        line: self.line + 1,
                        source,
                    }));
                }
                Err(None) => {
                    return Some(Err(ReadError::Line {
                        line: self.line,
                        error: CandumpError::TooLong,
                    }));
                }
            }
            let parsed = std::str::from_utf8(&self.buf)
                .map_err(|_| CandumpError::NotText)
                .and_then(parse_line);
            match parsed {
                Ok(None) => continue,
                Ok(Some(record)) => return Some(Ok(record)),
                Err(error) => {
                    return Some(Err(ReadError::Line {
                        line: self.line,
                        error,
                    }));
                }
            }
        }
    }
}

/// Writes a `candump -L` log.
pub struct LogWriter<W: Write> {
    inner: W,
}

impl<W: Write> LogWriter<W> {
    pub fn new(inner: W) -> Self {
        LogWriter { inner }
    }

    pub fn write_frame(
        &mut self,
        timestamp: Duration,
        iface: &str,
        frame: &CanFrame,
    ) -> io::Result<()> {
        check_iface(iface)?;
        writeln!(self.inner, "{}", format_line(timestamp, iface, frame))
    }

    pub fn write_record(&mut self, record: &LogRecord) -> io::Result<()> {
        check_iface(&record.interface)?;
        writeln!(self.inner, "{}", format_record(record))
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }

    pub fn into_inner(self) -> W {
        self.inner
    }
}

/// An interface name that would not read back as one token is refused
/// rather than written as a line no tool can parse.
fn check_iface(iface: &str) -> io::Result<()> {
    if iface.is_empty() || iface.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {iface:?} cannot go in a candump log: it must be one word"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ext(id: u32, data: &[u8]) -> CanFrame {
        CanFrame::new(ExtendedId::new(id).unwrap(), data).unwrap()
    }

    fn record(line: &str) -> LogRecord {
        parse_line(line).unwrap().unwrap()
    }

    #[test]
    fn reads_the_canonical_line() {
        let r = record("(1700000000.123456) vcan0 18EC56F4#1122334455667788");
        assert_eq!(r.timestamp, Duration::new(1_700_000_000, 123_456_000));
        assert_eq!(r.interface, "vcan0");
        assert_eq!(
            r.entry,
            LogEntry::Frame(ext(
                0x18EC_56F4,
                &[0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88]
            ))
        );
        assert_eq!(r.direction, None);
    }

    #[test]
    fn reads_standard_ids_empty_data_separators_and_lowercase() {
        let r = record("(0000000001.000001) can0 7ff#");
        let f = CanFrame::new(StandardId::new(0x7FF).unwrap(), &[]).unwrap();
        assert_eq!(r.entry, LogEntry::Frame(f));
        let r = record("(1.5) can1 123#de.ad.BE.ef");
        assert_eq!(r.timestamp, Duration::from_millis(1500));
        let f = CanFrame::new(StandardId::new(0x123).unwrap(), &[0xDE, 0xAD, 0xBE, 0xEF]).unwrap();
        assert_eq!(r.entry, LogEntry::Frame(f));
    }

    #[test]
    fn tolerates_padding_crlf_and_the_direction_mark() {
        // candump right-aligns interface names ("%*s") when several differ
        // in length, and -x appends R or T.
        let r = record("(1700000000.000000)  can0 18FF50E5#01 T\r\n");
        assert_eq!(r.interface, "can0");
        assert_eq!(r.direction, Some(Direction::Transmitted));
        let r = record("(1700000000.000000) vcan10 18FF50E5#01 R");
        assert_eq!(r.direction, Some(Direction::Received));
    }

    #[test]
    fn maps_error_frames_like_the_socketcan_backend() {
        // Controller problem (RX error-passive) plus protocol violation
        // (stuff error in the data field), as candump logs it.
        let r = record("(1700000000.000000) can0 2000000C#0010040A00000000");
        assert_eq!(
            r.entry,
            LogEntry::Error {
                class: 0x0C,
                data: vec![0, 0x10, 0x04, 0x0A, 0, 0, 0, 0]
            }
        );
        assert_eq!(
            r.entry.error_events().unwrap(),
            [
                ErrorEvent::Controller { detail: 0x10 },
                ErrorEvent::Protocol {
                    kind: 0x04,
                    location: 0x0A
                }
            ]
        );
        let r = record("(1700000000.000000) can0 20000040#0000000000000000");
        assert_eq!(r.entry.error_events().unwrap(), [ErrorEvent::BusOff]);
        assert_eq!(LogEntry::Frame(ext(1, &[])).error_events(), None);
    }

    #[test]
    fn recognises_remote_fd_and_xl_frames() {
        let std_id = CanId::Standard(StandardId::new(0x123).unwrap());
        assert_eq!(
            record("(1.0) can0 123#R").entry,
            LogEntry::Remote { id: std_id, len: 0 }
        );
        assert_eq!(
            record("(1.0) can0 123#r5").entry,
            LogEntry::Remote { id: std_id, len: 5 }
        );
        assert_eq!(
            record("(1.0) can0 123#R8_F").entry,
            LogEntry::Remote { id: std_id, len: 8 }
        );
        assert_eq!(
            record("(1.0) can0 123##1AABB").entry,
            LogEntry::Fd {
                id: std_id,
                flags: 1,
                data: vec![0xAA, 0xBB]
            }
        );
        assert_eq!(
            record("(1.0) can0 18EC56F4##0").entry,
            LogEntry::Fd {
                id: CanId::Extended(ExtendedId::new(0x18EC_56F4).unwrap()),
                flags: 0,
                data: vec![]
            }
        );
        assert_eq!(
            record("(1.0) xl0 0A242#80:01:12345678#AABBCC").entry,
            LogEntry::Xl {
                vcid: 0x0A,
                priority: 0x242,
                flags: 0x80,
                sdt: 0x01,
                af: 0x1234_5678,
                data: vec![0xAA, 0xBB, 0xCC]
            }
        );
    }

    #[test]
    fn accepts_and_drops_a_raw_dlc_after_eight_bytes() {
        let r = record("(1.0) can0 18EC56F4#0102030405060708_C");
        assert_eq!(
            r.entry,
            LogEntry::Frame(ext(0x18EC_56F4, &[1, 2, 3, 4, 5, 6, 7, 8]))
        );
        for bad in [
            "123#01_9",
            "123#0102030405060708_8",
            "123#0102030405060708_",
        ] {
            assert!(
                matches!(
                    parse_line(&format!("(1.0) can0 {bad}")),
                    Err(CandumpError::RawDlc(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn skips_blank_lines_and_dropcount_notes() {
        assert_eq!(parse_line(""), Ok(None));
        assert_eq!(parse_line("   \r\n"), Ok(None));
        assert_eq!(
            parse_line("DROPCOUNT: dropped 3 CAN frames on 'can0' socket (total drops 3)"),
            Ok(None)
        );
    }

    #[test]
    fn says_what_is_wrong() {
        let err = |l: &str| parse_line(l).unwrap_err().to_string();
        assert_eq!(err("(1.0) can0 123#11G2"), "data '11G2' is not hex");
        assert_eq!(
            err("(1.0) can0 123#112"),
            "data '112' has an odd number of hex digits"
        );
        assert_eq!(
            err("(1.0) can0 123#112233445566778899"),
            "data '112233445566778899' is 9 bytes; a classical frame holds at most 8"
        );
        assert_eq!(
            err("(1.0) can0 1234#00"),
            "frame '1234#00' needs a 3-, 5- or 8-digit hex identifier followed by '#'"
        );
        assert_eq!(err("(1.0) can0 12X#00"), "identifier '12X' is not hex");
        assert_eq!(
            err("(1.0) can0 800#00"),
            "standard CAN id 0x800 does not fit in 11 bits"
        );
        assert_eq!(
            err("(1.0) can0 80000001#00"),
            "identifier '80000001' sets the extended or remote flag bits, which candump never writes"
        );
        assert!(err("1700000000.1 can0 123#00").starts_with("timestamp '1700000000.1'"));
        assert!(err("(1.0) can0").starts_with("expected '(seconds.fraction) interface frame'"));
        assert_eq!(
            err("(1.0) can0 123#00 X"),
            "unexpected 'X' after the frame (only candump -x's 'R' or 'T' may follow)"
        );
        assert!(err("(1.0) can0 123#R9").starts_with("remote frame 'R9'"));
        assert!(err("(1.0) can0 123##").starts_with("CAN FD frame '#'"));
        assert!(err("(1.0) can0 12345#80:00#").starts_with("CAN XL header"));
    }

    #[test]
    fn reader_reports_line_numbers_and_continues() {
        let log = "(1700000000.000001) can0 18EC56F4#11\n\
                   \n\
                   (1700000000.000002) can0 18EC56F4#11G2\n\
                   (1700000000.000003) can0 18EC56F4#22\n";
        let items: Vec<_> = LogReader::new(log.as_bytes()).collect();
        assert_eq!(items.len(), 3);
        assert_eq!(
            items[0].as_ref().unwrap().entry,
            LogEntry::Frame(ext(0x18EC_56F4, &[0x11]))
        );
        let e = items[1].as_ref().unwrap_err();
        assert_eq!(e.line(), 3);
        assert_eq!(e.to_string(), "line 3: data '11G2' is not hex");
        assert_eq!(
            items[2].as_ref().unwrap().entry,
            LogEntry::Frame(ext(0x18EC_56F4, &[0x22]))
        );
    }

    #[test]
    fn reader_refuses_over_long_and_binary_lines_and_goes_on() {
        let mut log = vec![b'A'; MAX_LINE_LEN * 3];
        log.extend_from_slice(b"\n\xFF\xFE\n(1.0) can0 123#01\n");
        let items: Vec<_> = LogReader::new(log.as_slice()).collect();
        assert_eq!(items.len(), 3);
        assert_eq!(
            items[0].as_ref().unwrap_err().to_string(),
            format!("line 1: the line is longer than {MAX_LINE_LEN} bytes")
        );
        assert_eq!(
            items[1].as_ref().unwrap_err().to_string(),
            "line 2: the line is not UTF-8 text"
        );
        assert_eq!(items[2].as_ref().unwrap().interface, "can0");
    }

    #[test]
    fn writes_what_candump_writes() {
        let f = ext(
            0x18EC_56F4,
            &[0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88],
        );
        assert_eq!(
            format_line(Duration::new(1_700_000_000, 123_456_789), "vcan0", &f),
            "(1700000000.123456) vcan0 18EC56F4#1122334455667788"
        );
        let s = CanFrame::new(StandardId::new(0x12).unwrap(), &[]).unwrap();
        assert_eq!(
            format_line(Duration::from_micros(1), "can0", &s),
            "(0000000000.000001) can0 012#"
        );
        let err = LogRecord {
            timestamp: Duration::ZERO,
            interface: "can0".into(),
            entry: LogEntry::Error {
                class: 0x40,
                data: vec![0; 8],
            },
            direction: Some(Direction::Received),
        };
        assert_eq!(
            format_record(&err),
            "(0000000000.000000) can0 20000040#0000000000000000 R"
        );
    }

    #[test]
    fn writer_writes_lines_and_refuses_unreadable_interfaces() {
        let mut w = LogWriter::new(Vec::new());
        let f = ext(0x1826_F456, &[1]);
        w.write_frame(Duration::from_secs(2), "vcan1", &f).unwrap();
        assert!(w.write_frame(Duration::from_secs(2), "v can", &f).is_err());
        assert!(w.write_frame(Duration::from_secs(2), "", &f).is_err());
        let text = String::from_utf8(w.into_inner()).unwrap();
        assert_eq!(text, "(0000000002.000000) vcan1 1826F456#01\n");
        let back: Vec<_> = LogReader::new(text.as_bytes())
            .map(Result::unwrap)
            .collect();
        assert_eq!(back[0].entry, LogEntry::Frame(f));
    }

    fn arb_id() -> impl Strategy<Value = CanId> {
        prop_oneof![
            (0..=StandardId::MAX).prop_map(|r| CanId::Standard(StandardId::new(r).unwrap())),
            (0..=ExtendedId::MAX).prop_map(|r| CanId::Extended(ExtendedId::new(r).unwrap())),
        ]
    }

    fn arb_frame() -> impl Strategy<Value = CanFrame> {
        (arb_id(), prop::collection::vec(any::<u8>(), 0..=8))
            .prop_map(|(id, data)| CanFrame::new(id, &data).unwrap())
    }

    fn arb_timestamp() -> impl Strategy<Value = Duration> {
        // candump's resolution is the microsecond.
        (0u64..=99_999_999_999, 0u32..1_000_000).prop_map(|(s, us)| Duration::new(s, us * 1000))
    }

    fn arb_iface() -> impl Strategy<Value = String> {
        "[a-z][a-z0-9_.-]{0,14}"
    }

    fn arb_entry() -> impl Strategy<Value = LogEntry> {
        prop_oneof![
            arb_frame().prop_map(LogEntry::Frame),
            (
                0..=ExtendedId::MAX,
                prop::collection::vec(any::<u8>(), 0..=8)
            )
                .prop_map(|(class, data)| LogEntry::Error { class, data }),
            (arb_id(), 0u8..=8).prop_map(|(id, len)| LogEntry::Remote { id, len }),
            (
                arb_id(),
                0u8..16,
                prop::collection::vec(any::<u8>(), 0..=64)
            )
                .prop_map(|(id, flags, data)| LogEntry::Fd { id, flags, data }),
            (
                any::<u8>(),
                0u16..=0x7FF,
                any::<u8>(),
                any::<u8>(),
                any::<u32>(),
                prop::collection::vec(any::<u8>(), 0..=100)
            )
                .prop_map(|(vcid, priority, flags, sdt, af, data)| LogEntry::Xl {
                    vcid,
                    priority,
                    flags,
                    sdt,
                    af,
                    data
                }),
        ]
    }

    proptest! {
        #[test]
        fn frame_lines_round_trip(ts in arb_timestamp(), iface in arb_iface(), frame in arb_frame()) {
            let line = format_line(ts, &iface, &frame);
            let r = parse_line(&line).unwrap().unwrap();
            prop_assert_eq!(r.timestamp, ts);
            prop_assert_eq!(r.interface, iface);
            prop_assert_eq!(r.entry, LogEntry::Frame(frame));
        }

        #[test]
        fn every_entry_kind_round_trips(
            timestamp in arb_timestamp(),
            interface in arb_iface(),
            entry in arb_entry(),
            direction in prop::option::of(prop_oneof![Just(Direction::Received), Just(Direction::Transmitted)]),
        ) {
            let rec = LogRecord { timestamp, interface, entry, direction };
            let line = format_record(&rec);
            prop_assert_eq!(parse_line(&line).unwrap(), Some(rec));
        }

        #[test]
        fn arbitrary_text_never_panics(line in any::<String>()) {
            let _ = parse_line(&line);
        }

        #[test]
        fn candump_like_text_never_panics(line in "[() 0-9A-Fa-f#.Rr_:xTz-]{0,80}") {
            let _ = parse_line(&line);
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_reader(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
            for item in LogReader::new(bytes.as_slice()) {
                let _ = item;
            }
        }
    }
}
