//! The control socket: how `bmsgw status` and `bmsgw ticket import` talk to
//! the running daemon. It owns the socket file, the wire protocol and both
//! ends of it; what the answers say comes from the daemon through
//! [`ControlHandler`].
//!
//! # Protocol (`docs/control.md`)
//!
//! A Unix stream socket (default [`DEFAULT_SOCKET_PATH`], mode 0660, group
//! configurable). One exchange per connection: the client sends one JSON
//! object on one line (at most [`MAX_REQUEST_LEN`] bytes, ended by `\n` or by
//! closing its write half, within [`READ_TIMEOUT`]); the daemon answers with
//! one JSON object on one line and closes.
//!
//! ```text
//! → {"request":"status"}
//! ← {"ok":true,"status":{…}}
//! → {"request":"import_ticket","ticket":{"format":"bmsgw-sealed-push/1",…}}
//! ← {"ok":true,"imported":{"vouchers":3,"charger_numbers":[1],"revoked":0}}
//! ← {"ok":false,"error":"…"}
//! ```
//!
//! Anything else (not JSON, an unknown request or field, a malformed ticket,
//! an over-long line, silence) gets `ok:false` with an error that says what
//! was wrong; nothing a client sends can panic the server. At most
//! [`MAX_CONNECTIONS`] connections are served at once; one more is answered
//! `ok:false` ("busy") and closed. The socket's permissions are the access
//! control: only its owner and group can connect.

use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::status::Status;
use crate::cloud::exchange::PushEvent;
use crate::cloud::ticket_file::TicketFile;

/// Where the daemon listens unless configured otherwise (systemd's
/// `RuntimeDirectory=bmsgw`).
pub const DEFAULT_SOCKET_PATH: &str = "/run/bmsgw/control.sock";
/// The environment variable the CLI reads the socket path from.
pub const SOCKET_ENV: &str = "BMSGW_SOCKET";
/// The longest request line (without its newline).
pub const MAX_REQUEST_LEN: usize = 64 * 1024;
/// The longest answer a client reads.
pub const MAX_RESPONSE_LEN: usize = 1024 * 1024;
/// How long the daemon waits for a complete request line.
pub const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 8;
/// How long the daemon's handler may take before the client is told so.
const HANDLER_TIMEOUT: Duration = Duration::from_secs(5);
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// The client's deadline for the whole exchange (above the handler's).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long requests in progress may finish after shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// How much of an over-long request is read and dropped, and for how long,
/// so that the client sees the answer rather than a reset.
const DRAIN_LIMIT: u64 = 1024 * 1024;
const DRAIN_TIME: Duration = Duration::from_millis(500);
const SOCKET_MODE: u32 = 0o660;
/// `sockaddr_un.sun_path` holds 108 bytes, the terminating NUL included.
const MAX_PATH_LEN: usize = 107;

/// What the daemon answers with. The server calls it from several tasks at
/// once (one per connection).
pub trait ControlHandler: Send + Sync + 'static {
    /// The daemon's state now.
    fn status(&self) -> impl Future<Output = Status> + Send;
    /// Open `ticket` with the vehicle's keys (it was only parsed so far) and
    /// apply it to the wallet. The error text reaches the client as is.
    fn import_ticket(
        &self,
        ticket: TicketFile,
    ) -> impl Future<Output = Result<ImportReport, String>> + Send;
}

/// What an imported ticket changed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct ImportReport {
    /// Vouchers added to the wallet.
    pub vouchers: usize,
    /// The piles they are for, ascending, each once.
    pub charger_numbers: Vec<u32>,
    /// Tickets revoked.
    pub revoked: usize,
}

impl ImportReport {
    /// What a push carries: its vouchers and their piles, or the number of
    /// tickets a revocation names (a daemon that knows how many of them
    /// were in its wallet may report that instead).
    pub fn of(push: &PushEvent) -> ImportReport {
        match push {
            PushEvent::Vouchers { vouchers, .. } => {
                let mut charger_numbers: Vec<u32> =
                    vouchers.iter().map(|v| v.charger_number).collect();
                charger_numbers.sort_unstable();
                charger_numbers.dedup();
                ImportReport {
                    vouchers: vouchers.len(),
                    charger_numbers,
                    revoked: 0,
                }
            }
            PushEvent::Revocation(r) => ImportReport {
                revoked: r.ticket_ids.len(),
                ..ImportReport::default()
            },
        }
    }
}

/// Why the control socket could not be served or used.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "control socket path {path} is {len} bytes long; a Unix socket path has at most {MAX_PATH_LEN}"
    )]
    PathTooLong { path: PathBuf, len: usize },
    #[error(
        "{path} exists and is not a socket; refusing to replace it (remove it, or configure another control socket path)"
    )]
    NotASocket { path: PathBuf },
    #[error("another process already listens on {path} (is bmsgw already running?)")]
    InUse { path: PathBuf },
    #[error("control socket {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("control socket group {group:?}: {problem}")]
    Group { group: String, problem: String },
    #[error("cannot connect to the daemon at {path}: {hint}")]
    Connect {
        path: PathBuf,
        hint: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("no answer from the daemon at {path} within {} s", .after.as_secs())]
    Timeout { path: PathBuf, after: Duration },
    #[error("the daemon's answer on {path} is not understood: {problem}")]
    Protocol { path: PathBuf, problem: String },
    #[error("the daemon refused: {0}")]
    Refused(String),
}

/// The socket path the CLI uses: `explicit` (`--socket`), else
/// `$BMSGW_SOCKET`, else [`DEFAULT_SOCKET_PATH`].
pub fn resolve_socket_path(explicit: Option<PathBuf>) -> PathBuf {
    explicit
        .or_else(|| std::env::var_os(SOCKET_ENV).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET_PATH))
}

/// A bound control socket, not yet serving. Dropping it removes the file.
#[derive(Debug)]
pub struct ControlServer {
    listener: std::os::unix::net::UnixListener,
    file: SocketFile,
}

/// The socket file this process created: removed on drop, but only while
/// the path still names that same file (a successor may have replaced it).
#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path)
            && m.dev() == self.dev
            && m.ino() == self.ino
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl ControlServer {
    /// Bind at `path` (removing a stale socket file only if nothing listens
    /// there), chmod 0660, and chgrp to `group` (a name from `/etc/group`,
    /// or a numeric gid) if given. The parent directory must exist; under
    /// systemd `RuntimeDirectory=bmsgw` (mode 0750) makes it.
    pub fn bind(path: &Path, group: Option<&str>) -> Result<ControlServer, ControlError> {
        let len = path.as_os_str().len();
        if len > MAX_PATH_LEN {
            return Err(ControlError::PathTooLong {
                path: path.to_owned(),
                len,
            });
        }
        // Resolve the group first: a typo must not leave a socket behind.
        let gid = group.map(resolve_group).transpose()?;
        let io = |what| {
            move |source| ControlError::Io {
                path: path.to_owned(),
                what,
                source,
            }
        };
        remove_stale(path)?;
        let listener = std::os::unix::net::UnixListener::bind(path).map_err(io("cannot bind"))?;
        let meta = std::fs::symlink_metadata(path).map_err(io("cannot stat the new socket"))?;
        let file = SocketFile {
            path: path.to_owned(),
            dev: meta.dev(),
            ino: meta.ino(),
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
            .map_err(io("cannot chmod 0660"))?;
        if let (Some(gid), Some(group)) = (gid, group) {
            std::os::unix::fs::chown(path, None, Some(gid)).map_err(|e| ControlError::Group {
                group: group.to_owned(),
                problem: format!(
                    "cannot give {} to gid {gid}: {e} (the daemon's user must be a member of the group)",
                    path.display()
                ),
            })?;
        }
        listener
            .set_nonblocking(true)
            .map_err(io("cannot make the socket non-blocking"))?;
        Ok(ControlServer { listener, file })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.file.path
    }

    /// Serve until `shutdown` resolves, then let requests in progress finish
    /// (up to 2 s) and remove the socket file.
    pub async fn run<H: ControlHandler>(
        self,
        handler: Arc<H>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ControlError> {
        let ControlServer { listener, file } = self;
        let listener =
            tokio::net::UnixListener::from_std(listener).map_err(|source| ControlError::Io {
                path: file.path.clone(),
                what: "cannot register the listener with the runtime",
                source,
            })?;
        info!(path = %file.path.display(), "control socket listening");
        let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let busy = response_line(&Response::error(format!(
            "busy: {MAX_CONNECTIONS} requests are being served; try again"
        )));
        let mut tasks = JoinSet::new();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => match Arc::clone(&permits).try_acquire_owned() {
                        Ok(permit) => {
                            let handler = Arc::clone(&handler);
                            tasks.spawn(async move {
                                serve_connection(stream, &*handler).await;
                                drop(permit);
                            });
                        }
                        Err(_) => {
                            warn!("control socket: {MAX_CONNECTIONS} connections open; refusing one more");
                            // A fresh socket's buffer takes the short line.
                            let _ = stream.try_write(&busy);
                        }
                    },
                    Err(e) => {
                        // EMFILE and the like: wait rather than spin.
                        warn!(error = %e, "control socket: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        drop(listener);
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        tasks.abort_all();
        debug!(path = %file.path.display(), "control socket closed");
        drop(file);
        Ok(())
    }
}

/// The daemon's state, from the daemon at `path`.
pub async fn request_status(path: &Path) -> Result<Status, ControlError> {
    match call(path, &Request::Status {}).await? {
        Response {
            ok: true,
            status: Some(status),
            ..
        } => Ok(*status),
        other => Err(refusal(path, other, "status")),
    }
}

/// Hand `ticket` to the daemon at `path`, which opens and applies it.
pub async fn import_ticket(path: &Path, ticket: &TicketFile) -> Result<ImportReport, ControlError> {
    match call(
        path,
        &Request::ImportTicket {
            ticket: ticket.clone(),
        },
    )
    .await?
    {
        Response {
            ok: true,
            imported: Some(report),
            ..
        } => Ok(report),
        other => Err(refusal(path, other, "imported")),
    }
}

/// A request as the client writes it: serde's internally tagged enum,
/// refusing fields it does not know.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case", deny_unknown_fields)]
enum Request {
    // A struct variant, not a unit one: serde ignores the other fields of
    // an internally tagged unit variant, so `{"request":"status","x":1}`
    // would pass.
    Status {},
    ImportTicket { ticket: TicketFile },
}

impl Request {
    /// Parse one request line; the error is for the client.
    fn parse(line: &[u8]) -> Result<Request, String> {
        // serde would also take an internally tagged enum from an array
        // (`["status"]`); the protocol is one object per line.
        if line.trim_ascii_start().first() != Some(&b'{') {
            return Err(
                match serde_json::from_slice::<serde::de::IgnoredAny>(line) {
                    Err(e) => format!("request is not JSON: {}", clip_quoted(&e.to_string())),
                    Ok(_) => r#"a request is a JSON object such as {"request":"status"}"#.into(),
                },
            );
        }
        serde_json::from_slice(line).map_err(|e| {
            // serde quotes what the client sent in backticks (an unknown
            // request or field); those spans are clipped.
            let what = clip_quoted(&e.to_string());
            match e.classify() {
                serde_json::error::Category::Data => what,
                _ => format!("request is not JSON: {what}"),
            }
        })
    }

    fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).unwrap_or_default();
        line.push(b'\n');
        line
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Response {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    status: Option<Box<Status>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    imported: Option<ImportReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl Response {
    fn error(message: impl Into<String>) -> Response {
        Response {
            error: Some(message.into()),
            ..Response::default()
        }
    }
}

fn response_line(r: &Response) -> Vec<u8> {
    let mut line = serde_json::to_vec(r).unwrap_or_else(|e| {
        // Only a non-string map key could get here; say so rather than
        // close silently.
        format!(r#"{{"ok":false,"error":"the daemon cannot encode its answer: {e}"}}"#).into_bytes()
    });
    line.push(b'\n');
    line
}

/// Read, answer and close one connection: the whole protocol on any byte
/// stream (the server hands it each accepted socket; the fuzz target an
/// in-memory pipe).
pub async fn serve_connection<S, H>(stream: S, handler: &H)
where
    S: AsyncRead + AsyncWrite,
    H: ControlHandler,
{
    let (mut read, mut write) = tokio::io::split(stream);
    let read_result =
        tokio::time::timeout(READ_TIMEOUT, read_line(&mut read, MAX_REQUEST_LEN)).await;
    // The rest of an over-long request is read and dropped before closing:
    // closing with unread input would make the client's read fail with a
    // reset instead of seeing the answer and the end of it.
    let drain = matches!(read_result, Ok(Err(LineError::TooLong)));
    let response = match read_result {
        Err(_) => Response::error(format!(
            "no complete request line within {} s",
            READ_TIMEOUT.as_secs()
        )),
        Ok(Err(LineError::TooLong)) => {
            Response::error(format!("request is longer than {MAX_REQUEST_LEN} bytes"))
        }
        Ok(Err(LineError::Empty)) => {
            Response::error("empty request; send one JSON object on one line")
        }
        Ok(Err(LineError::Io(e))) => {
            debug!(error = %e, "control socket: reading a request failed");
            return;
        }
        Ok(Ok(line)) => match Request::parse(&line) {
            Err(e) => Response::error(format!("bad request: {e}")),
            Ok(request) => {
                match tokio::time::timeout(HANDLER_TIMEOUT, answer(request, handler)).await {
                    Ok(r) => r,
                    Err(_) => Response::error(format!(
                        "the daemon did not answer within {} s",
                        HANDLER_TIMEOUT.as_secs()
                    )),
                }
            }
        },
    };
    if let Some(e) = &response.error {
        warn!(error = %e, "control request refused");
    }
    let line = response_line(&response);
    let sent = tokio::time::timeout(WRITE_TIMEOUT, async {
        write.write_all(&line).await?;
        write.shutdown().await
    })
    .await;
    if !matches!(sent, Ok(Ok(()))) {
        debug!("control socket: the client did not take the answer");
    }
    if drain {
        let mut rest = (&mut read).take(DRAIN_LIMIT);
        let _ = tokio::time::timeout(
            DRAIN_TIME,
            tokio::io::copy(&mut rest, &mut tokio::io::sink()),
        )
        .await;
    }
}

async fn answer<H: ControlHandler>(request: Request, handler: &H) -> Response {
    match request {
        Request::Status {} => Response {
            ok: true,
            status: Some(Box::new(handler.status().await)),
            ..Response::default()
        },
        Request::ImportTicket { ticket } => match handler.import_ticket(ticket).await {
            Ok(report) => {
                info!(
                    vouchers = report.vouchers,
                    chargers = ?report.charger_numbers,
                    revoked = report.revoked,
                    "ticket imported"
                );
                Response {
                    ok: true,
                    imported: Some(report),
                    ..Response::default()
                }
            }
            Err(e) => Response::error(e),
        },
    }
}

enum LineError {
    TooLong,
    Empty,
    Io(io::Error),
}

/// One line of at most `max` bytes (without the newline); the end of the
/// stream also ends it.
async fn read_line<R: AsyncRead + Unpin>(r: R, max: usize) -> Result<Vec<u8>, LineError> {
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    let mut reader = BufReader::new(r.take(limit));
    let mut buf = Vec::new();
    reader
        .read_until(b'\n', &mut buf)
        .await
        .map_err(LineError::Io)?;
    if buf.last() == Some(&b'\n') {
        buf.pop();
    } else if buf.len() > max {
        return Err(LineError::TooLong);
    }
    if buf.iter().all(u8::is_ascii_whitespace) {
        return Err(LineError::Empty);
    }
    Ok(buf)
}

/// One exchange with the daemon.
async fn call(path: &Path, request: &Request) -> Result<Response, ControlError> {
    let exchange = async {
        let mut stream = UnixStream::connect(path)
            .await
            .map_err(|e| connect_error(path, e))?;
        let io = |what| {
            move |source| ControlError::Io {
                path: path.to_owned(),
                what,
                source,
            }
        };
        stream
            .write_all(&request.to_line())
            .await
            .map_err(io("sending the request"))?;
        let protocol = |problem: String| ControlError::Protocol {
            path: path.to_owned(),
            problem,
        };
        let line = match read_line(&mut stream, MAX_RESPONSE_LEN).await {
            Ok(line) => line,
            Err(LineError::Io(e)) => return Err(io("reading the answer")(e)),
            Err(LineError::Empty) => {
                return Err(protocol(
                    "the daemon closed the connection without answering".into(),
                ));
            }
            Err(LineError::TooLong) => {
                return Err(protocol(format!(
                    "answer longer than {MAX_RESPONSE_LEN} bytes"
                )));
            }
        };
        serde_json::from_slice::<Response>(&line).map_err(|e| protocol(e.to_string()))
    };
    tokio::time::timeout(CLIENT_TIMEOUT, exchange)
        .await
        .map_err(|_| ControlError::Timeout {
            path: path.to_owned(),
            after: CLIENT_TIMEOUT,
        })?
}

fn connect_error(path: &Path, source: io::Error) -> ControlError {
    let hint = match source.kind() {
        io::ErrorKind::NotFound => {
            "no socket there; is bmsgw running? (--socket or BMSGW_SOCKET name another path)"
        }
        io::ErrorKind::PermissionDenied => {
            "permission denied; run as root or as a member of the socket's group (control.group)"
        }
        io::ErrorKind::ConnectionRefused => "nothing listens there; bmsgw is not running",
        _ => "unexpected error",
    };
    ControlError::Connect {
        path: path.to_owned(),
        hint,
        source,
    }
}

/// An answer that is not the success expected: the daemon's error, or a
/// protocol error if it said ok without the `field` asked for.
fn refusal(path: &Path, r: Response, field: &str) -> ControlError {
    if r.ok {
        ControlError::Protocol {
            path: path.to_owned(),
            problem: format!("ok without `{field}`"),
        }
    } else {
        ControlError::Refused(r.error.unwrap_or_else(|| "no reason given".to_owned()))
    }
}

/// Remove a socket file nobody listens on; refuse anything else.
fn remove_stale(path: &Path) -> Result<(), ControlError> {
    let io = |what| {
        move |source| ControlError::Io {
            path: path.to_owned(),
            what,
            source,
        }
    };
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io("cannot stat")(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(ControlError::NotASocket {
            path: path.to_owned(),
        });
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(ControlError::InUse {
            path: path.to_owned(),
        }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            info!(path = %path.display(), "removing a stale control socket");
            std::fs::remove_file(path).map_err(io("cannot remove the stale socket"))
        }
        Err(e) => Err(io("cannot tell whether the existing socket is in use")(e)),
    }
}

/// A group name from `/etc/group`, or a numeric gid.
fn resolve_group(group: &str) -> Result<u32, ControlError> {
    let err = |problem: String| ControlError::Group {
        group: group.to_owned(),
        problem,
    };
    if group.is_empty() {
        return Err(err("is empty; name a group or give a numeric gid".into()));
    }
    if group.bytes().all(|b| b.is_ascii_digit()) {
        return group
            .parse()
            .map_err(|_| err("is not a valid numeric gid".into()));
    }
    let text = std::fs::read_to_string("/etc/group")
        .map_err(|e| err(format!("cannot read /etc/group: {e}")))?;
    gid_in(&text, group).ok_or_else(|| {
        err("is not in /etc/group; name a group listed there, or give a numeric gid".into())
    })
}

/// The gid of `name` in `/etc/group` text (`name:password:gid:members`).
fn gid_in(group_file: &str, name: &str) -> Option<u32> {
    group_file.lines().find_map(|line| {
        let mut fields = line.split(':');
        if fields.next()? != name {
            return None;
        }
        fields.next()?;
        fields.next()?.trim().parse().ok()
    })
}

/// `message` with every span in backticks clipped by [`clip`].
fn clip_quoted(message: &str) -> String {
    message
        .split('`')
        .enumerate()
        .map(|(i, part)| {
            if i % 2 == 1 {
                clip(part)
            } else {
                part.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("`")
}

/// At most 64 characters of client text, for error messages.
fn clip(s: &str) -> String {
    let mut out: String = s.chars().take(64).collect();
    if s.chars().nth(64).is_some() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_or_say_why_not() {
        assert!(matches!(
            Request::parse(br#"{"request":"status"}"#),
            Ok(Request::Status {})
        ));
        assert!(matches!(
            Request::parse(br#" {"request":"status"} "#),
            Ok(Request::Status {})
        ));
        for (line, want) in [
            (&b"status"[..], "request is not JSON: expected value"),
            (b"[]", "JSON object such as"),
            (br#"["status"]"#, "JSON object such as"),
            (br#"{"request":"status""#, "request is not JSON: EOF"),
            (br#"{"req":"status"}"#, "missing field `request`"),
            (br#"{"request":1}"#, "invalid type: integer `1`"),
            (
                br#"{"request":"reboot"}"#,
                "unknown variant `reboot`, expected `status` or `import_ticket`",
            ),
            (br#"{"request":"status","x":1}"#, "unknown field `x`"),
            (br#"{"request":"import_ticket"}"#, "missing field `ticket`"),
            (
                br#"{"request":"import_ticket","x":1,"ticket":{}}"#,
                "unknown field `x`, expected `ticket`",
            ),
            (
                br#"{"request":"import_ticket","ticket":{"format":"x"}}"#,
                "ticket file `format`",
            ),
            (
                br#"{"request":"import_ticket","ticket":"x"}"#,
                "a ticket file is a JSON object",
            ),
        ] {
            let e = Request::parse(line).err().unwrap_or_default();
            assert!(e.contains(want), "{}: {e}", String::from_utf8_lossy(line));
        }
        // What the client sent is clipped, wherever serde quotes it.
        let long = "r".repeat(1000);
        for line in [
            format!(r#"{{"request":"{long}"}}"#),
            format!(r#"{{"request":"status","{long}":1}}"#),
        ] {
            let e = Request::parse(line.as_bytes()).err().unwrap_or_default();
            assert!(e.len() < 200 && e.contains('…'), "{e}");
        }
    }

    #[test]
    fn requests_are_sent_as_the_server_reads_them() {
        // The import request's round trip is tests/system/control_socket.rs.
        let status = Request::Status {}.to_line();
        assert_eq!(status, b"{\"request\":\"status\"}\n");
        assert!(matches!(
            Request::parse(&status[..status.len() - 1]),
            Ok(Request::Status {})
        ));
    }

    #[test]
    fn group_file_lookup() {
        let text = "root:x:0:\n# comment\nbmsgw:x:997:alice,bob\nbroken:x\nodd:x:notanumber:\n";
        assert_eq!(gid_in(text, "root"), Some(0));
        assert_eq!(gid_in(text, "bmsgw"), Some(997));
        assert_eq!(gid_in(text, "bms"), None);
        assert_eq!(gid_in(text, "broken"), None);
        assert_eq!(gid_in(text, "odd"), None);
        assert_eq!(resolve_group("1234").ok(), Some(1234));
        assert!(resolve_group("").is_err());
        assert!(resolve_group("99999999999").is_err());
        let e = resolve_group("no-such-group-bmsgw").expect_err("unknown");
        assert!(e.to_string().contains("not in /etc/group"), "{e}");
    }

    #[tokio::test]
    async fn lines_are_bounded() {
        let read = |bytes: &'static [u8], max| async move {
            read_line(bytes, max).await.map_err(|e| match e {
                LineError::TooLong => "long",
                LineError::Empty => "empty",
                LineError::Io(_) => "io",
            })
        };
        assert_eq!(read(b"abc\nrest", 3).await, Ok(b"abc".to_vec()));
        assert_eq!(read(b"abc", 3).await, Ok(b"abc".to_vec()));
        assert_eq!(read(b"abcd", 3).await, Err("long"));
        assert_eq!(read(b"abcd\n", 3).await, Err("long"));
        assert_eq!(read(b" \r\n", 3).await, Err("empty"));
        assert_eq!(read(b"", 3).await, Err("empty"));
    }

    #[test]
    fn socket_path_resolution_prefers_the_flag() {
        assert_eq!(
            resolve_socket_path(Some(PathBuf::from("/tmp/x.sock"))),
            PathBuf::from("/tmp/x.sock")
        );
    }

    #[test]
    fn bind_refuses_what_it_must_not_replace() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("plain");
        std::fs::write(&file, b"x").expect("written");
        assert!(matches!(
            ControlServer::bind(&file, None),
            Err(ControlError::NotASocket { .. })
        ));
        let long = dir.path().join("s".repeat(120));
        assert!(matches!(
            ControlServer::bind(&long, None),
            Err(ControlError::PathTooLong { .. })
        ));
        // A stale socket (nobody listening) is replaced; a live one is not.
        let path = dir.path().join("c.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).expect("bind"));
        assert!(path.exists());
        let server = ControlServer::bind(&path, None).expect("stale socket replaced");
        assert!(matches!(
            ControlServer::bind(&path, None),
            Err(ControlError::InUse { .. })
        ));
        // An unknown group leaves no socket behind.
        drop(server);
        assert!(!path.exists(), "dropping the server removes its socket");
        assert!(matches!(
            ControlServer::bind(&path, Some("no-such-group-bmsgw")),
            Err(ControlError::Group { .. })
        ));
        assert!(!path.exists());
    }
}
