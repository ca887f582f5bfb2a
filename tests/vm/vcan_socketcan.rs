//! The SocketCAN backend against a real kernel CAN stack.
//!
//! These need a `vcan` interface, which only exists inside the VM lane
//! (`tests/vcan/run.sh`), so they are ignored by default. Run them with
//!
//! ```text
//! BMSGW_VCAN=vcan0 cargo test --test vm -- vcan_socketcan:: --ignored
//! ```
//!
//! Two tests take the interface down or recreate it, so every test holds
//! the same lock: they run one at a time whatever the test-thread count.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use bmsgw::can::candump::{LogEntry, LogReader, LogWriter, parse_line};
use bmsgw::can::socketcan::{Filter, SocketCanBus, SocketCanOptions, err_class};
use bmsgw::can::{
    BusError, BusEvent, CanBus, CanFrame, ErrorEvent, ExtendedId, LinkState, StandardId,
};
use socketcan::{CanErrorFrame, Socket};

/// Generous: the lane runs under software emulation.
const WAIT: Duration = Duration::from_secs(10);

/// tokio's mutex: held across awaits, and shared by the tests' separate
/// runtimes.
static IFACE_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn iface() -> String {
    std::env::var("BMSGW_VCAN").expect(
        "BMSGW_VCAN must name a vcan interface, e.g. vcan0; these tests run in the VM lane (tests/vcan/run.sh)",
    )
}

fn open(opts: SocketCanOptions) -> SocketCanBus {
    let iface = iface();
    SocketCanBus::open(&iface, opts).unwrap_or_else(|e| panic!("opening {iface}: {e}"))
}

fn ext(id: u32, data: &[u8]) -> CanFrame {
    CanFrame::new(ExtendedId::new(id).unwrap(), data).unwrap()
}

fn std_frame(id: u16, data: &[u8]) -> CanFrame {
    CanFrame::new(StandardId::new(id).unwrap(), data).unwrap()
}

async fn next_event(bus: &mut SocketCanBus) -> BusEvent {
    tokio::time::timeout(WAIT, bus.recv())
        .await
        .unwrap_or_else(|_| panic!("no event on {} within {WAIT:?}", bus.iface()))
        .unwrap_or_else(|e| panic!("recv on {}: {e}", bus.iface()))
}

/// Like `next_event`, but cancels `recv` every 100 ms, as a caller's
/// `select!` next to a fast timer does; the event must still come.
async fn next_event_cancelled_often(bus: &mut SocketCanBus) -> BusEvent {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(ev) = tokio::time::timeout(Duration::from_millis(100), bus.recv()).await {
            return ev.unwrap_or_else(|e| panic!("recv on {}: {e}", bus.iface()));
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no event on {} within {WAIT:?}",
            bus.iface()
        );
    }
}

async fn next_frame(bus: &mut SocketCanBus) -> CanFrame {
    match next_event(bus).await {
        BusEvent::Frame(f) => f,
        other => panic!("expected a frame, got {other:?}"),
    }
}

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("bmsgw=debug")
        .with_test_writer()
        .with_ansi(false)
        .try_init();
}

#[tokio::test]
#[ignore = "needs a vcan interface: run in the VM lane"]
async fn two_sockets_exchange_frames() {
    let _g = IFACE_LOCK.lock().await;
    let mut a = open(SocketCanOptions::default());
    let mut b = open(SocketCanOptions::default());
    let f1 = ext(
        0x1826_F456,
        &[0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88],
    );
    let f2 = std_frame(0x123, &[]);
    a.send(&f1).await.unwrap();
    assert_eq!(next_frame(&mut b).await, f1);
    b.send(&f2).await.unwrap();
    assert_eq!(next_frame(&mut a).await, f2);
}

#[tokio::test]
#[ignore = "needs a vcan interface: run in the VM lane"]
async fn kernel_filters_pass_only_matching_frames() {
    let _g = IFACE_LOCK.lock().await;
    let mut tx = open(SocketCanOptions::default());
    // Everything from the BMS (SA 0xF4) to the charger (DA 0x56).
    let mut rx = open(SocketCanOptions {
        filters: vec![Filter::extended(0x0000_56F4, 0x0000_FFFF)],
        ..SocketCanOptions::default()
    });
    let wanted1 = ext(0x1811_56F4, &[1]);
    let wanted2 = ext(0x1C22_56F4, &[2]);
    for f in [
        ext(0x1826_F456, &[0xA]), // the other direction
        wanted1,
        std_frame(0x0F4, &[0xB]), // same low bits, standard format
        ext(0x1811_57F4, &[0xC]), // another destination
        wanted2,
    ] {
        tx.send(&f).await.unwrap();
    }
    // Frames arrive in order, so anything the filter let through by mistake
    // would show up before `wanted2`.
    assert_eq!(next_frame(&mut rx).await, wanted1);
    assert_eq!(next_frame(&mut rx).await, wanted2);
}

#[tokio::test]
#[ignore = "needs a vcan interface: run in the VM lane"]
async fn own_frames_arrive_only_when_asked_for() {
    let _g = IFACE_LOCK.lock().await;
    let mut plain = open(SocketCanOptions::default());
    let mut own = open(SocketCanOptions {
        receive_own: true,
        ..SocketCanOptions::default()
    });
    let mine = ext(0x1801_F456, &[1]);
    let theirs = ext(0x1802_56F4, &[2]);
    plain.send(&mine).await.unwrap();
    own.send(&theirs).await.unwrap();
    // `plain` does not see its own frame, only the other socket's.
    assert_eq!(next_frame(&mut plain).await, theirs);
    // `own` sees both, its own included, in bus order.
    assert_eq!(next_frame(&mut own).await, mine);
    assert_eq!(next_frame(&mut own).await, theirs);
}

/// Brings the interface back up even if the test fails half-way, so the
/// other tests still have a bus.
struct UpOnDrop(String);

impl Drop for UpOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "set", "dev", &self.0, "up"])
            .status();
    }
}

fn ip(args: &[&str]) {
    let status = Command::new("ip")
        .args(args)
        .status()
        .expect("running ip (iproute2)");
    assert!(status.success(), "ip {}: {status}", args.join(" "));
}

fn ip_link_set(iface: &str, state: &str) {
    ip(&["link", "set", "dev", iface, state]);
}

#[tokio::test]
#[ignore = "needs a vcan interface: run in the VM lane"]
async fn link_down_and_up_is_reported_and_the_bus_works_again() {
    let _g = IFACE_LOCK.lock().await;
    init_logs();
    let iface = iface();
    let mut a = open(SocketCanOptions::default());
    let mut b = open(SocketCanOptions::default());
    let _restore = UpOnDrop(iface.clone());

    ip_link_set(&iface, "down");
    // The idle reader must notice by itself: no frame arrives, and the
    // kernel only flags the socket with an error. It must notice even when
    // its `recv` keeps being cancelled.
    assert_eq!(
        next_event_cancelled_often(&mut a).await,
        BusEvent::Link(LinkState::Down)
    );
    assert!(!a.is_up());
    // A send while down fails with an I/O error instead of crashing, and
    // the sender reports the outage once too.
    let err = b.send(&ext(0x1801_F456, &[0])).await.unwrap_err();
    assert!(matches!(err, BusError::Io { op: "send", .. }), "{err}");
    assert!(err.to_string().contains(&iface), "{err}");
    let err = b.send(&ext(0x1801_F456, &[0])).await.unwrap_err();
    assert!(matches!(err, BusError::Io { .. }), "{err}");
    assert_eq!(next_event(&mut b).await, BusEvent::Link(LinkState::Down));

    ip_link_set(&iface, "up");
    assert_eq!(next_event(&mut a).await, BusEvent::Link(LinkState::Up));
    assert_eq!(next_event(&mut b).await, BusEvent::Link(LinkState::Up));
    assert!(a.is_up() && b.is_up());

    let f = ext(0x1826_F456, &[0xAB; 8]);
    b.send(&f).await.unwrap();
    assert_eq!(next_frame(&mut a).await, f);
    a.send(&f).await.unwrap();
    assert_eq!(next_frame(&mut b).await, f);
}

/// Recreates the interface, up, if a test failed after deleting it.
struct RecreateOnDrop(String);

impl Drop for RecreateOnDrop {
    fn drop(&mut self) {
        // Quietly: stray output on the test's line would hide its result
        // from the lane, which reads `test NAME ... ok` lines.
        let quiet = |args: &[&str]| {
            let _ = Command::new("ip")
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        if !std::path::Path::new("/sys/class/net")
            .join(&self.0)
            .exists()
        {
            quiet(&["link", "add", "dev", &self.0, "type", "vcan"]);
        }
        quiet(&["link", "set", "dev", &self.0, "up"]);
    }
}

#[tokio::test]
#[ignore = "needs a vcan interface: run in the VM lane"]
async fn an_interface_recreated_under_the_same_name_is_reopened() {
    // A driver reload or a replugged USB adapter: a new interface with the
    // old name. Sockets stay bound to the old index and would hear nothing.
    let _g = IFACE_LOCK.lock().await;
    init_logs();
    let iface = iface();
    let mut a = open(SocketCanOptions::default());
    let mut b = open(SocketCanOptions::default());
    let _restore = RecreateOnDrop(iface.clone());

    // Gone and back, up, before either bus looks: only the changed index
    // tells them.
    ip(&["link", "del", "dev", &iface]);
    ip(&["link", "add", "dev", &iface, "type", "vcan"]);
    ip_link_set(&iface, "up");

    for bus in [&mut a, &mut b] {
        assert_eq!(next_event(bus).await, BusEvent::Link(LinkState::Down));
        assert_eq!(next_event(bus).await, BusEvent::Link(LinkState::Up));
        assert!(bus.is_up());
    }
    let f = ext(0x1826_F456, &[0xCD; 8]);
    b.send(&f).await.unwrap();
    assert_eq!(next_frame(&mut a).await, f);
    a.send(&f).await.unwrap();
    assert_eq!(next_frame(&mut b).await, f);
}

#[tokio::test]
#[ignore = "needs a vcan interface: run in the VM lane"]
async fn error_frames_become_error_events_only_when_enabled() {
    // vcan has no controller, so it never raises error frames itself.
    // What can be checked is the rest of the path: the kernel delivers an
    // error frame written by another raw socket only to sockets whose
    // error mask asks for it, and the backend decodes it.
    let _g = IFACE_LOCK.lock().await;
    let mut with_errors = open(SocketCanOptions::default());
    let mut without = open(SocketCanOptions {
        error_frames: false,
        ..SocketCanOptions::default()
    });
    let raw = socketcan::CanSocket::open(&iface()).expect("raw socket");
    let class = err_class::CONTROLLER | err_class::BUS_OFF;
    let frame = CanErrorFrame::new_error(class, &[0, 0x20, 0, 0, 0, 0, 0, 0]).unwrap();
    raw.write_frame(&frame).expect("writing an error frame");
    let sentinel = ext(0x1FFF_FFFF, &[0x55]);
    let mut tx = open(SocketCanOptions::default());
    tx.send(&sentinel).await.unwrap();

    assert_eq!(
        next_event(&mut with_errors).await,
        BusEvent::Error(ErrorEvent::Controller { detail: 0x20 })
    );
    assert_eq!(
        next_event(&mut with_errors).await,
        BusEvent::Error(ErrorEvent::BusOff)
    );
    assert_eq!(next_frame(&mut with_errors).await, sentinel);
    // Without the error mask the next thing is the sentinel.
    assert_eq!(next_frame(&mut without).await, sentinel);
}

/// `candump -L -x` on the interface, its lines arriving on a channel.
struct Candump {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Candump {
    fn start(iface: &str) -> Candump {
        let mut child = Command::new("candump")
            .args(["-L", "-x", iface])
            .stdout(Stdio::piped())
            .spawn()
            .expect("running candump (can-utils)");
        let stdout = child.stdout.take().expect("stdout was piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Candump { child, lines }
    }

    /// The next line, waiting at most `WAIT` in total.
    fn line(&self, within: Duration) -> Option<String> {
        self.lines.recv_timeout(within).ok()
    }
}

impl Drop for Candump {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
#[ignore = "needs a vcan interface and can-utils: run in the VM lane"]
async fn candump_captures_what_we_send_and_our_reader_parses_it() {
    let _g = IFACE_LOCK.lock().await;
    let iface = iface();
    let mut bus = open(SocketCanOptions::default());
    let dump = Candump::start(&iface);

    // candump gives no sign that it is listening: probe until it shows.
    let probe = std_frame(0x7FE, &[]);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        bus.send(&probe).await.unwrap();
        if dump.line(Duration::from_millis(200)).is_some() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "candump printed nothing"
        );
    }

    let frames = [
        ext(
            0x1826_F456,
            &[0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88],
        ),
        std_frame(0x000, &[]),
        ext(0x0000_0001, &[0xFF]),
        std_frame(0x7FF, &[1, 2, 3]),
    ];
    let sentinel = std_frame(0x7FD, &[0xEE]);
    for f in frames.iter().chain([&sentinel]) {
        bus.send(f).await.unwrap();
    }

    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap();
    let mut captured = Vec::new();
    loop {
        let line = dump
            .line(WAIT)
            .expect("candump stopped before the sentinel");
        let rec = parse_line(&line)
            .unwrap_or_else(|e| panic!("{line:?}: {e}"))
            .expect("candump printed a blank line");
        assert_eq!(rec.interface, iface, "{line}");
        assert!(rec.direction.is_some(), "-x marks every line: {line}");
        assert!(
            rec.timestamp.abs_diff(now) < Duration::from_secs(60),
            "{line}"
        );
        match rec.entry {
            LogEntry::Frame(f) if f == probe => {}
            LogEntry::Frame(f) if f == sentinel => break,
            LogEntry::Frame(f) => captured.push(f),
            other => panic!("unexpected entry {other:?} in {line}"),
        }
    }
    assert_eq!(captured, frames);
}

#[tokio::test]
#[ignore = "needs a vcan interface and can-utils: run in the VM lane"]
async fn canplayer_replays_a_log_we_wrote() {
    let _g = IFACE_LOCK.lock().await;
    let iface = iface();
    let mut bus = open(SocketCanOptions::default());
    let frames = [
        ext(0x1826_F456, &[0x01, 0x02]),
        std_frame(0x100, &[0xAA; 8]),
        ext(0x1CEB_56F4, &[]),
    ];
    let mut log = LogWriter::new(Vec::new());
    for (i, f) in frames.iter().enumerate() {
        log.write_frame(Duration::new(1_700_000_000, i as u32 * 1000), &iface, f)
            .unwrap();
    }
    let log = log.into_inner();
    // Our reader agrees with what our writer wrote.
    let back: Vec<_> = LogReader::new(log.as_slice())
        .map(|r| r.unwrap().entry)
        .collect();
    assert_eq!(back, frames.map(LogEntry::Frame));

    let mut player = Command::new("canplayer")
        .arg("-t") // ignore the timestamps: send at once
        .stdin(Stdio::piped())
        .spawn()
        .expect("running canplayer (can-utils)");
    player
        .stdin
        .take()
        .expect("stdin was piped")
        .write_all(&log)
        .unwrap();
    let status = player.wait().unwrap();
    assert!(status.success(), "canplayer: {status}");
    for f in frames {
        assert_eq!(next_frame(&mut bus).await, f);
    }
}

#[tokio::test]
#[ignore = "needs a vcan interface: run in the VM lane"]
async fn opening_a_missing_interface_fails_with_its_name() {
    let _g = IFACE_LOCK.lock().await;
    let err = SocketCanBus::open("bmsgw-none0", SocketCanOptions::default()).unwrap_err();
    assert!(matches!(err, BusError::Io { op: "open", .. }), "{err}");
    assert!(err.to_string().contains("bmsgw-none0"), "{err}");
}
