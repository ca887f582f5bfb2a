//! The `bmsgw` command line. Parsing only: every subcommand is a library call.

use std::path::PathBuf;
use std::process::ExitCode;
#[cfg(feature = "sim")]
use std::time::Duration;

use bmsgw::service::logging::chain;
// Ctrl-C or SIGTERM, whichever comes first (services stop on either).
use bmsgw::service::signals::terminate;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "bmsgw",
    version,
    about = "Vehicle gateway for GB/T 27930 charging"
)]
struct Cli {
    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    /// Default: `warn`, or `[log] level` of the config for `run`.
    #[arg(long, global = true)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway daemon (under systemd: `Type=notify`).
    Run {
        /// The config file; `BMSGW__SECTION__KEY` variables override it.
        #[arg(long, value_name = "F", default_value = bmsgw::service::config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// The whole system in one process: dev PKI, embedded broker, cloud
    /// service, BMS and pile simulators and the gateway daemon in bridge
    /// mode, through scenarios (a) online, (b) owner approval, (c) broker
    /// down, (d) attacks; exits 0 only if every scenario went as expected.
    #[cfg(feature = "sim")]
    Demo {
        /// SocketCAN interface of the BMS side (alone: single-bus mode on it)
        /// instead of the in-process buses.
        #[arg(long, value_name = "IF")]
        can: Option<String>,
        /// SocketCAN interface of the pile side (bridge mode; needs --can).
        #[arg(long, value_name = "IF", requires = "can")]
        can_pile: Option<String>,
        /// Also print every GB/T message the BMS exchanges.
        #[arg(long)]
        all: bool,
    },
    /// Validate a config file and the keys and certificates it names,
    /// without starting anything.
    CheckConfig {
        /// The config file (`BMSGW__SECTION__KEY` variables apply too)
        /// [default: /etc/bmsgw/bmsgw.toml].
        #[arg(value_name = "F", conflicts_with = "config")]
        file: Option<PathBuf>,
        /// The same, spelt as `run` takes it.
        #[arg(long, value_name = "F")]
        config: Option<PathBuf>,
    },
    /// Decode a `candump -L` log: reassemble TP and print one line per GB/T message.
    Decode {
        /// The log file (`-` for standard input).
        log: PathBuf,
        /// Print a periodic message only when its content changes.
        #[arg(long)]
        changes: bool,
    },
    /// Measurements for docs/performance.md (bench/run.sh runs them all).
    #[cfg(feature = "sim")]
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
    /// Simulators for tests and benches.
    #[cfg(feature = "sim")]
    Sim {
        #[command(subcommand)]
        role: SimRole,
    },
    /// Test helper for tests/system/outbox_kill.rs: push session records into the
    /// outbox of STORE until killed, printing each commit.
    #[command(hide = true)]
    StoreWriter {
        /// The state file (redb).
        #[arg(long, value_name = "PATH")]
        store: PathBuf,
        /// Sequence number of the first record.
        #[arg(long, default_value_t = 0)]
        start: u64,
    },
    /// Show the running daemon's state (asks it over the control socket).
    Status {
        /// Print the status as JSON instead of text.
        #[arg(long)]
        json: bool,
        /// The daemon's control socket [default: the --config's
        /// `control.socket`, else $BMSGW_SOCKET, else /run/bmsgw/control.sock].
        #[arg(long, value_name = "PATH", conflicts_with = "config")]
        socket: Option<PathBuf>,
        /// The daemon's config file, to find its control socket.
        #[arg(long, value_name = "F")]
        config: Option<PathBuf>,
    },
    /// Sealed tickets delivered by another carrier (phone, head unit).
    Ticket {
        #[command(subcommand)]
        what: TicketCommand,
    },
    /// Development keys (never for production).
    #[cfg(feature = "sim")]
    Pki {
        #[command(subcommand)]
        what: PkiCommand,
    },
}

#[derive(Subcommand)]
enum TicketCommand {
    /// Hand a ticket file (`bmsgw sim cloud-issue` makes one) to the running
    /// daemon, which checks it end to end and adds its vouchers to the wallet.
    Import {
        /// The ticket file (JSON, format bmsgw-sealed-push/1).
        file: PathBuf,
        /// The daemon's control socket [default: the --config's
        /// `control.socket`, else $BMSGW_SOCKET, else /run/bmsgw/control.sock].
        #[arg(long, value_name = "PATH", conflicts_with = "config")]
        socket: Option<PathBuf>,
        /// The daemon's config file, to find its control socket.
        #[arg(long, value_name = "F")]
        config: Option<PathBuf>,
    },
}

#[cfg(feature = "sim")]
#[derive(Subcommand)]
enum BenchCommand {
    /// Authorization latency, the pile's first CRM(0x00) to its CRM(0xAA),
    /// over whole sessions in bridge mode on in-process 250 kbit/s buses,
    /// against each session's bus-time lower bound. Use a release build.
    Latency {
        /// Sessions per path.
        #[arg(long, default_value_t = 1000)]
        sessions: usize,
        /// Only this path (default: online, then offline).
        #[arg(long, value_parser = ["online", "offline"])]
        path: Option<String>,
        /// Also write the figures as JSON to this file.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
    },
    /// Grants per second of the reference cloud with 1 and with 2
    /// `sim cloud` instances on a shared subscription, through a real
    /// mosquitto (found on PATH or in /usr/sbin). Use a release build.
    Cloud {
        /// Instance counts to measure.
        #[arg(long, value_delimiter = ',', default_value = "1,2")]
        instances: Vec<usize>,
        /// Identity requests per run.
        #[arg(long, default_value_t = 3000)]
        requests: usize,
        /// Vehicles sending them (one TLS connection each).
        #[arg(long, default_value_t = 8)]
        vehicles: usize,
        /// Requests in flight at once.
        #[arg(long, default_value_t = 64)]
        in_flight: usize,
        /// Runs per instance count (the figure is the median run).
        #[arg(long, default_value_t = 5)]
        repeats: usize,
        /// Vouchers each request asks for (0: a plain online grant).
        #[arg(long, default_value_t = 0)]
        vouchers: u16,
        /// Also write the figures as JSON to this file.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
    },
    /// Time from starting bmsgw to its READY=1 (systemd notify), restarting
    /// on an existing store: this binary run as `bmsgw run` does, on
    /// in-process buses (this host may have no SocketCAN).
    Startup {
        /// Starts (the first, a first start, is reported apart).
        #[arg(long, default_value_t = 21)]
        runs: usize,
        /// Also write the figures as JSON to this file.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
    },
    /// What `bench startup` starts: `bmsgw run` on in-process buses.
    #[command(hide = true)]
    StartupChild {
        /// The daemon's config file.
        #[arg(long)]
        config: PathBuf,
    },
}

#[cfg(feature = "sim")]
#[derive(Subcommand)]
enum PkiCommand {
    /// Generate a development PKI into DIR: CA, broker, cloud, vehicle and
    /// owner certificates, X25519 keys, pile root keys, the cloud's registry
    /// and config files, and the broker's dynamic-security file and
    /// mosquitto.conf (secrets mode 0600).
    Dev {
        /// The directory to write the PKI into (created; refused if it
        /// already holds files, unless --force). The config files it writes
        /// name their keys relative to themselves, so DIR may be moved.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Replace an existing PKI in DIR.
        #[arg(long)]
        force: bool,
        /// Broker port to write into cloud.toml, mosquitto.conf and the
        /// gateway's config.
        #[arg(long, default_value_t = bmsgw::sim::pki::DEFAULT_BROKER_PORT)]
        broker_port: u16,
        /// Cloud instances to make a certificate and config file for
        /// (cloud.toml, cloud-2.toml, ...): the broker takes a certificate's
        /// CN as the client id, so instances cannot share one.
        #[arg(long, value_name = "N", default_value_t = bmsgw::sim::pki::DEFAULT_CLOUD_INSTANCES)]
        cloud_instances: u32,
    },
    /// Print the broker's dynamic-security file (see config/mosquitto/) for
    /// the cloud's vehicle registry: one role per vehicle and per owner app,
    /// revoked vehicles left out, and the cloud's role for instances
    /// bmsgw-cloud-1..N. mosquitto reads it at start (not on SIGHUP).
    BrokerAcl {
        /// The cloud's vehicle registry (vehicles.toml).
        #[arg(long, value_name = "FILE")]
        vehicles: PathBuf,
        /// Cloud instances (certificate CNs bmsgw-cloud-1..N).
        #[arg(long, value_name = "N", default_value_t = bmsgw::sim::pki::DEFAULT_CLOUD_INSTANCES)]
        cloud_instances: u32,
    },
}

#[cfg(feature = "sim")]
#[derive(Subcommand)]
enum SimRole {
    /// Run the reference cloud identity service on the broker that its
    /// config names, until Ctrl-C (or SIGTERM).
    Cloud {
        /// cloud.toml (`bmsgw pki dev` writes one).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Override [broker] client_id. Each instance needs a certificate of
        /// its own: the production broker uses the certificate's CN as the
        /// client id, whatever this says.
        #[arg(long, value_name = "ID")]
        client_id: Option<String>,
    },
    /// Seal a batch of vouchers for a vehicle into a ticket file, as the
    /// cloud would for the owner's phone to carry (`bmsgw ticket import`).
    CloudIssue {
        /// cloud.toml (`bmsgw pki dev` writes one).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The vehicle id (as in vehicles.toml).
        #[arg(long, value_name = "ID")]
        vehicle: String,
        /// The pile the vouchers are for (as in piles.toml).
        #[arg(long, value_name = "N")]
        charger: u32,
        /// How many vouchers (1 to 64).
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// The ticket file to write (must not exist).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Play the BMS: charge from --soc-start to --soc-end over --duration, then stop.
    Bms {
        /// The SocketCAN interface (e.g. vcan0, can1).
        #[arg(long, value_name = "IFACE")]
        can: String,
        /// State of charge at the start, in percent.
        #[arg(long, default_value_t = 50.0)]
        soc_start: f32,
        /// State of charge at which the BMS stops, in percent.
        #[arg(long, default_value_t = 80.0)]
        soc_end: f32,
        /// Charging current requested, in amps.
        #[arg(long, default_value_t = 100.0)]
        current: f32,
        /// Time in the charging phase from start to end SOC (e.g. 10s, 500ms, 2m).
        #[arg(long, default_value = "10s", value_parser = bmsgw::time::parse_duration)]
        duration: Duration,
        /// How long to wait for a charger to appear.
        #[arg(long, default_value = "60s", value_parser = bmsgw::time::parse_duration)]
        wait: Duration,
        /// Our J1939 source address.
        #[arg(long, default_value = "0xF4", value_parser = parse_u8)]
        address: u8,
        /// The pile's J1939 address.
        #[arg(long, default_value = "0x56", value_parser = parse_u8)]
        pile_address: u8,
        /// How the pile's deviations from GB/T 27930 and J1939-21 are met:
        /// "field" (accepted where the reading is unambiguous and safe, and
        /// counted) or "strict" (refused, naming the deviation). See docs/interop.md.
        #[arg(long, default_value = "field", value_name = "PROFILE")]
        profile: bmsgw::interop::Profile,
    },
    /// Play the charging pile (charger role).
    Pile {
        /// The SocketCAN interface (e.g. vcan1, can0).
        #[arg(long, value_name = "IFACE")]
        can: String,
        /// Charger number sent in CRM bytes 2–5.
        #[arg(long, default_value_t = 1)]
        charger_number: u32,
        /// Region code sent in CRM bytes 6–8: three ASCII characters or six hex digits.
        #[arg(long, default_value = "000", value_parser = parse_region)]
        region_code: [u8; 3],
        /// Maximum output current in amps.
        #[arg(long, default_value_t = 250.0)]
        max_current: f32,
        /// Maximum output voltage in volts.
        #[arg(long, default_value_t = 750.0)]
        max_voltage: f32,
        /// Stop by itself after this long in the charging phase (e.g. 30s).
        #[arg(long, value_parser = bmsgw::time::parse_duration)]
        duration: Option<Duration>,
        /// Our J1939 source address.
        #[arg(long, default_value = "0x56", value_parser = parse_u8)]
        address: u8,
        /// The BMS's J1939 address.
        #[arg(long, default_value = "0xF4", value_parser = parse_u8)]
        bms_address: u8,
        /// Require vehicle authentication before CRM(0xAA).
        #[arg(long, requires_all = ["root_key_file", "key_offset"])]
        require_auth: bool,
        /// The pile's 32-byte root key (64 hex digits), mode 0600.
        #[arg(long, value_name = "F")]
        root_key_file: Option<PathBuf>,
        /// The current root key offset (key epoch).
        #[arg(long, value_name = "N")]
        key_offset: Option<u16>,
        /// Also accept tickets of this earlier epoch (during rotation).
        #[arg(long, value_name = "N")]
        previous_key_offset: Option<u16>,
        /// Clock skew tolerated on ticket validity.
        #[arg(long, default_value = "300s", value_parser = bmsgw::time::parse_duration)]
        skew: Duration,
        /// How the BMS's deviations from GB/T 27930 and J1939-21 are met:
        /// "field" (accepted where the reading is unambiguous and safe, and
        /// counted) or "strict" (refused, naming the deviation). See docs/interop.md.
        #[arg(long, default_value = "field", value_name = "PROFILE")]
        profile: bmsgw::interop::Profile,
    },
    /// Play the vehicle side of authentication with a credential from a file
    /// (stands in for the gateway daemon).
    Vehicle {
        /// The SocketCAN interface the pile is on.
        #[arg(long, value_name = "IFACE")]
        can: String,
        /// Credential file written by `bmsgw sim ticket` (mode 0600).
        #[arg(long, value_name = "F")]
        credential: PathBuf,
        /// Our J1939 source address.
        #[arg(long, default_value = "0xF5", value_parser = parse_u8)]
        address: u8,
        /// How long to wait for a pile's CRM(0x00).
        #[arg(long, default_value = "60s", value_parser = bmsgw::time::parse_duration)]
        wait: Duration,
    },
    /// Issue a credential (ticket + session key) for a pile, as the cloud
    /// would, into a new file with mode 0600.
    Ticket {
        /// The pile's 32-byte root key (64 hex digits), mode 0600.
        #[arg(long, value_name = "F")]
        root_key_file: PathBuf,
        /// The root key offset (key epoch) to seal under.
        #[arg(long, value_name = "N")]
        key_offset: u16,
        /// The pile the ticket is for.
        #[arg(long, value_name = "N")]
        charger_number: u32,
        /// Validity from its start.
        #[arg(long, default_value = "10m", value_parser = bmsgw::time::parse_duration)]
        valid_for: Duration,
        /// Start the validity this long before now (to test expiry).
        #[arg(long, default_value = "0s", value_parser = bmsgw::time::parse_duration)]
        start_ago: Duration,
        /// Issue a voucher (offline credential) rather than an online ticket.
        #[arg(long)]
        voucher: bool,
        /// Energy cap in Wh (0 = none).
        #[arg(long, default_value_t = 0)]
        energy_cap_wh: u32,
        /// The credential file to write (mode 0600; must not exist).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Flood a CAN interface with seeded junk at 100% load of a real bus at
    /// --bitrate (the attack suite's pile-side attacker), for --seconds.
    Flood {
        /// The SocketCAN interface to flood.
        #[arg(long, value_name = "IFACE")]
        can: String,
        /// How long to flood.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Seed of the junk generator (the same seed sends the same frames).
        #[arg(long, default_value_t = 0x5EED)]
        seed: u64,
        /// The bit rate whose wire time paces the frames (vcan has none).
        #[arg(long, default_value_t = 250_000)]
        bitrate: u32,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `run` reads its level from the config; a bad config is reported
    // below, with the default level.
    let config_level = match &cli.command {
        Command::Run { config } => bmsgw::service::config::Config::load(config)
            .ok()
            .map(|c| c.log.level),
        #[cfg(feature = "sim")]
        Command::Bench {
            what: BenchCommand::StartupChild { config },
        } => bmsgw::service::config::Config::load(config)
            .ok()
            .map(|c| c.log.level),
        _ => None,
    };
    // The demo's own timeline says what happens (and the embedded broker
    // logs every client disconnect as an error): only errors by default.
    #[cfg(feature = "sim")]
    let default_level = match &cli.command {
        Command::Demo { .. } | Command::Bench { .. } => "error,rumqttd=off",
        _ => "warn",
    };
    #[cfg(not(feature = "sim"))]
    let default_level = "warn";
    let level = cli
        .log_level
        .clone()
        .or(config_level)
        .unwrap_or_else(|| default_level.to_string());
    bmsgw::service::logging::init(&level);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the async runtime: {e}")),
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => fail(&msg),
    }
}

/// One line on stderr and a non-zero exit, as the CLI contract says.
fn fail(msg: &str) -> ExitCode {
    // File names, log lines and peers' text can carry control characters.
    eprintln!("bmsgw: {}", bmsgw::text::printable(msg));
    ExitCode::FAILURE
}

async fn dispatch(command: Command) -> Result<(), String> {
    match command {
        Command::CheckConfig { file, config } => {
            let config = file
                .or(config)
                .unwrap_or_else(|| PathBuf::from(bmsgw::service::config::DEFAULT_PATH));
            let report = bmsgw::service::check::check(&config)
                .map_err(|e| format!("check-config: {}", chain(&e)))?;
            // Values from the file (host names, paths) may hold anything.
            print!("{}", bmsgw::text::printable_lines(&report.render()));
            if report.passed() {
                println!(
                    "{}: ok",
                    bmsgw::text::printable(&config.display().to_string())
                );
                Ok(())
            } else {
                Err(format!(
                    "check-config: {}: {} check(s) failed",
                    config.display(),
                    report.lines.iter().filter(|l| !l.ok).count()
                ))
            }
        }
        Command::Run { config } => {
            let config = bmsgw::service::config::Config::load(&config)
                .map_err(|e| format!("run: {}", chain(&e)))?;
            bmsgw::service::daemon::run(config, terminate())
                .await
                .map_err(|e| format!("run: {}", chain(&e)))
        }
        Command::Decode { log, changes } => {
            let opts = bmsgw::gbt27930::timeline::TimelineOptions {
                changes_only: changes,
            };
            let stdout = std::io::stdout().lock();
            let result = if log.as_os_str() == "-" {
                bmsgw::gbt27930::timeline::decode_log(std::io::stdin().lock(), stdout, opts)
            } else {
                let file = std::fs::File::open(&log)
                    .map_err(|e| format!("decode: cannot open {}: {e}", log.display()))?;
                bmsgw::gbt27930::timeline::decode_log(std::io::BufReader::new(file), stdout, opts)
            };
            // A script must be able to tell a capture from garbage: the
            // timeline is printed either way, the exit says which it was.
            let timeline =
                result.map_err(|e| format!("decode {}: {}", log.display(), chain(&e)))?;
            match timeline.problem() {
                None => Ok(()),
                Some(p) => Err(format!("decode {}: {p}", log.display())),
            }
        }
        #[cfg(feature = "sim")]
        Command::Demo { can, can_pile, all } => {
            let opts = bmsgw::sim::demo::DemoOptions {
                can,
                can_pile,
                all_messages: all,
            };
            let mut out = std::io::stdout();
            bmsgw::sim::demo::run(opts, &mut out, ctrl_c())
                .await
                .map(|_| ())
                .map_err(|e| format!("demo: {}", chain(&e)))
        }
        #[cfg(feature = "sim")]
        Command::Bench { what } => bench(what).await,
        #[cfg(feature = "sim")]
        Command::Sim { role } => sim(role).await,
        #[cfg(feature = "sim")]
        Command::Pki {
            what:
                PkiCommand::Dev {
                    out,
                    force,
                    broker_port,
                    cloud_instances,
                },
        } => pki_dev(out, force, broker_port, cloud_instances),
        #[cfg(feature = "sim")]
        Command::Pki {
            what:
                PkiCommand::BrokerAcl {
                    vehicles,
                    cloud_instances,
                },
        } => pki_broker_acl(&vehicles, cloud_instances),
        Command::Status {
            json,
            socket,
            config,
        } => status(json, socket_of(socket, config, "status")?).await,
        Command::Ticket {
            what:
                TicketCommand::Import {
                    file,
                    socket,
                    config,
                },
        } => ticket_import(&file, socket_of(socket, config, "ticket import")?).await,
        Command::StoreWriter { store, start } => {
            bmsgw::store::writer::run(&store, start, &mut std::io::stdout().lock())
                .map_err(|e| format!("store-writer: {}", chain(&e)))
        }
    }
}

/// The control socket a command talks to: `--socket`, or the one the
/// config file (`--config`) names; `None` leaves it to the defaults.
fn socket_of(
    socket: Option<PathBuf>,
    config: Option<PathBuf>,
    what: &str,
) -> Result<Option<PathBuf>, String> {
    match (socket, config) {
        (Some(s), _) => Ok(Some(s)),
        (None, Some(path)) => bmsgw::service::config::Config::load(&path)
            .map(|c| Some(c.control.socket))
            .map_err(|e| format!("{what}: {}", chain(&e))),
        (None, None) => Ok(None),
    }
}

async fn status(json: bool, socket: Option<PathBuf>) -> Result<(), String> {
    use bmsgw::service::control;
    let path = control::resolve_socket_path(socket);
    let status = control::request_status(&path)
        .await
        .map_err(|e| format!("status: {}", chain(&e)))?;
    if json {
        let text = serde_json::to_string_pretty(&status)
            .map_err(|e| format!("status: cannot print JSON: {e}"))?;
        println!("{text}");
    } else {
        print!("{}", status.render());
    }
    Ok(())
}

async fn ticket_import(file: &std::path::Path, socket: Option<PathBuf>) -> Result<(), String> {
    use bmsgw::service::control;
    // Parsed here first, so a damaged file is refused even with no daemon;
    // the daemon, which holds the keys, does the cryptographic checks.
    let ticket = bmsgw::cloud::ticket_file::TicketFile::load(file)
        .map_err(|e| format!("ticket import: {}", chain(&e)))?;
    let path = control::resolve_socket_path(socket);
    let report = control::import_ticket(&path, &ticket)
        .await
        .map_err(|e| format!("ticket import: {}: {}", file.display(), chain(&e)))?;
    let chargers: Vec<String> = report.charger_numbers.iter().map(u32::to_string).collect();
    println!(
        "ticket import: {}: {} vouchers added{}, {} tickets revoked",
        bmsgw::text::printable(&file.display().to_string()),
        report.vouchers,
        if chargers.is_empty() {
            String::new()
        } else {
            format!(" (charger {})", chargers.join(", "))
        },
        report.revoked
    );
    Ok(())
}

#[cfg(feature = "sim")]
fn pki_dev(
    out: PathBuf,
    force: bool,
    broker_port: u16,
    cloud_instances: u32,
) -> Result<(), String> {
    use bmsgw::sim::pki::{DevPki, DevPkiOptions};
    let opts = DevPkiOptions {
        force,
        broker_port,
        cloud_instances,
        ..DevPkiOptions::new(out)
    };
    let pki = DevPki::generate(&opts).map_err(|e| format!("pki dev: {}", chain(&e)))?;
    // A `bmsgw run` config for the first vehicle: bridge mode on vcan0 (BMS
    // side) and vcan1 (pile side), state and socket next to the keys.
    let gateway = pki.vehicle_ids().first().map(|id| {
        let state = pki.dir.join(format!("state-{id}"));
        pki.write_gateway_toml(
            id,
            &bmsgw::sim::pki::GatewayTomlOptions {
                broker_port,
                can: bmsgw::service::config::CanInterfaces::Bridge {
                    bms: "vcan0".into(),
                    pile: "vcan1".into(),
                },
                control_socket: state.join("control.sock"),
                state_dir: state,
                request_timeout: Duration::from_secs(2),
            },
        )
    });
    let gateway = gateway
        .transpose()
        .map_err(|e| format!("pki dev: {}", chain(&e)))?;
    let secrets = pki.secret_files();
    for path in pki.files().into_iter().chain(gateway) {
        let note = if secrets.contains(&path) {
            " (secret, mode 0600)"
        } else {
            ""
        };
        println!(
            "pki dev: wrote {}{note}",
            bmsgw::text::printable(&path.display().to_string())
        );
    }
    Ok(())
}

#[cfg(feature = "sim")]
fn pki_broker_acl(vehicles: &std::path::Path, cloud_instances: u32) -> Result<(), String> {
    use bmsgw::sim::pki::{MAX_CLOUD_INSTANCES, mosquitto_dynsec};
    if !(1..=MAX_CLOUD_INSTANCES).contains(&cloud_instances) {
        return Err(format!(
            "pki broker-acl: --cloud-instances must be 1 to {MAX_CLOUD_INSTANCES}, not {cloud_instances}"
        ));
    }
    let entries = bmsgw::sim::cloud::registry::Registry::load_vehicles(vehicles)
        .map_err(|e| format!("pki broker-acl: {}", chain(&e)))?;
    // An empty or misnamed table would give every vehicle no rights.
    if entries.is_empty() {
        return Err(format!(
            "pki broker-acl: {}: no [[vehicle]] entries (an empty file?)",
            bmsgw::text::printable(&vehicles.display().to_string())
        ));
    }
    // A revoked vehicle keeps no right on the broker.
    let ids: Vec<String> = entries
        .iter()
        .filter(|v| !v.revoked)
        .map(|v| v.id.as_str().to_owned())
        .collect();
    print!("{}", mosquitto_dynsec(&ids, cloud_instances));
    Ok(())
}

#[cfg(feature = "sim")]
async fn sim(role: SimRole) -> Result<(), String> {
    use bmsgw::can::socketcan::{SocketCanBus, SocketCanOptions};
    use bmsgw::j1939::Address;
    use bmsgw::sim::{bms, pile};
    match role {
        SimRole::Bms {
            can,
            soc_start,
            soc_end,
            current,
            duration,
            wait,
            address,
            pile_address,
            profile,
        } => {
            let opts = bms::BmsSimOptions {
                soc_start,
                soc_end,
                current,
                duration,
                charger_wait: Some(wait),
                address: Address(address),
                pile_address: Address(pile_address),
                profile,
                ..Default::default()
            };
            opts.validate().map_err(|e| format!("sim bms: {e}"))?;
            let mut bus = SocketCanBus::open(&can, SocketCanOptions::default())
                .map_err(|e| format!("sim bms: {}", chain(&e)))?;
            let log = opts.deviations.clone();
            let result = bms::run(&mut bus, opts, ctrl_c()).await;
            println!(
                "sim bms: pile deviations ({profile} profile): {}",
                log.get()
            );
            let s = result.map_err(|e| format!("sim bms: {}", chain(&e)))?;
            println!(
                "sim bms: session completed: final SOC {}%, {} min, {:.1} kWh",
                s.final_soc_percent,
                s.charging_minutes,
                f32::from(s.energy_decikwh) / 10.0
            );
            Ok(())
        }
        SimRole::Pile {
            can,
            charger_number,
            region_code,
            max_current,
            max_voltage,
            duration,
            address,
            bms_address,
            require_auth,
            root_key_file,
            key_offset,
            previous_key_offset,
            skew,
            profile,
        } => {
            let auth = match (require_auth, root_key_file, key_offset) {
                (true, Some(file), Some(offset)) => {
                    let key = bmsgw::service::keyfile::load_key(&file)
                        .map_err(|e| format!("sim pile: {e}"))?;
                    Some(pile::PileAuthSetup {
                        keys: bmsgw::auth::PileKeys {
                            root: bmsgw::auth::RootKey::from_bytes(*key),
                            charger_number,
                            current_offset: offset,
                            previous_offset: previous_key_offset,
                        },
                        config: bmsgw::auth::PileAuthConfig {
                            skew: u32::try_from(skew.as_secs()).unwrap_or(u32::MAX),
                            ..Default::default()
                        },
                        replay: bmsgw::auth::MemoryReplayStore::default(),
                    })
                }
                (true, _, _) => {
                    return Err(
                        "sim pile: --require-auth needs --root-key-file and --key-offset".into(),
                    );
                }
                (false, _, _) => None,
            };
            let opts = pile::PileSimOptions {
                auth,
                charger_number: bmsgw::gbt27930::ChargerNumber(charger_number),
                region_code: bmsgw::gbt27930::RegionCode(region_code),
                max_current,
                max_voltage,
                duration,
                address: Address(address),
                bms_address: Address(bms_address),
                profile,
                ..Default::default()
            };
            let mut bus = SocketCanBus::open(&can, SocketCanOptions::default())
                .map_err(|e| format!("sim pile: {}", chain(&e)))?;
            let log = opts.deviations.clone();
            let result = pile::run(&mut bus, opts, ctrl_c()).await;
            println!(
                "sim pile: BMS deviations ({profile} profile): {}",
                log.get()
            );
            let s = result.map_err(|e| format!("sim pile: {}", chain(&e)))?;
            println!(
                "sim pile: session completed: BMS final SOC {}%, {} min, {:.1} kWh delivered",
                s.final_soc_percent,
                s.charging_minutes,
                f32::from(s.energy_decikwh) / 10.0
            );
            Ok(())
        }
        SimRole::Cloud { config, client_id } => {
            use bmsgw::sim::cloud::{CloudConfig, run::CloudMonitor, run::run};
            let mut config =
                CloudConfig::load(&config).map_err(|e| format!("sim cloud: {}", chain(&e)))?;
            if let Some(id) = client_id {
                config.broker.client_id = id;
            }
            let s = run(&config, CloudMonitor::default(), terminate())
                .await
                .map_err(|e| format!("sim cloud: {}", chain(&e)))?;
            // What this instance did, for `bmsgw bench cloud` (each
            // instance's share of the grants) and for whoever stopped it.
            println!(
                "sim cloud: stopped: granted={} pending={} denied={} pushes={} records={} rejected={} publish_failures={}",
                s.granted, s.pending, s.denied, s.pushes, s.records, s.rejected, s.publish_failures
            );
            Ok(())
        }
        SimRole::CloudIssue {
            config,
            vehicle,
            charger,
            count,
            out,
        } => {
            use bmsgw::sim::cloud::{CloudConfig, issue::issue_vouchers};
            let fail = |e: &dyn std::error::Error| format!("sim cloud-issue: {}", chain(e));
            let config = CloudConfig::load(&config).map_err(|e| fail(&e))?;
            let vehicle = bmsgw::cloud::topics::VehicleId::parse(&vehicle)
                .map_err(|e| format!("sim cloud-issue: --vehicle: {e}"))?;
            let now_ms = u64::from(bmsgw::time::unix_now()) * 1000;
            let ticket = issue_vouchers(
                &config,
                &vehicle,
                charger,
                count,
                now_ms,
                &mut bmsgw::auth::SystemRng,
            )
            .map_err(|e| fail(&e))?;
            ticket.write_new(&out).map_err(|e| fail(&e))?;
            println!(
                "sim cloud-issue: wrote {} ({count} vouchers for charger {charger}, sealed to {vehicle})",
                out.display()
            );
            Ok(())
        }
        SimRole::Vehicle {
            can,
            credential,
            address,
            wait,
        } => {
            use bmsgw::gateway::vehicle_auth::{VehicleAuthOptions, authenticate};
            let text = bmsgw::service::keyfile::read_secret_text(&credential)
                .map_err(|e| format!("sim vehicle: {e}"))?;
            let cred = bmsgw::auth::Credential::from_text(&text)
                .map_err(|e| format!("sim vehicle: {}: {e}", credential.display()))?;
            let mut bus = SocketCanBus::open(&can, SocketCanOptions::default())
                .map_err(|e| format!("sim vehicle: {}", chain(&e)))?;
            let opts = VehicleAuthOptions {
                address: Address(address),
                wait_for_pile: wait,
                ..Default::default()
            };
            let ok = authenticate(&mut bus, cred, opts, ctrl_c())
                .await
                .map_err(|e| format!("sim vehicle: {}", chain(&e)))?;
            println!(
                "sim vehicle: pile {} (address {}) accepted the credential",
                ok.charger_number, ok.pile_address
            );
            Ok(())
        }
        SimRole::Ticket {
            root_key_file,
            key_offset,
            charger_number,
            valid_for,
            start_ago,
            voucher,
            energy_cap_wh,
            out,
        } => {
            use bmsgw::auth::{Credential, Rng, RootKey, SystemRng};
            let key = bmsgw::service::keyfile::load_key(&root_key_file)
                .map_err(|e| format!("sim ticket: {e}"))?;
            let root = RootKey::from_bytes(*key);
            let now = bmsgw::time::unix_now();
            let secs = |d: Duration| u32::try_from(d.as_secs()).unwrap_or(u32::MAX);
            let not_before = now.saturating_sub(secs(start_ago));
            let not_after = not_before.saturating_add(secs(valid_for));
            let mut pseudonym = [0u8; 16];
            SystemRng.fill(&mut pseudonym);
            let cred = Credential::issue(
                &root,
                key_offset,
                charger_number,
                pseudonym,
                not_before,
                not_after,
                energy_cap_wh,
                voucher,
                &mut SystemRng,
            );
            bmsgw::service::keyfile::write_secret_text(&out, &cred.to_text())
                .map_err(|e| format!("sim ticket: {e}"))?;
            println!(
                "sim ticket: wrote {} ({} for charger {charger_number}, valid {not_before}..{not_after})",
                out.display(),
                if voucher { "voucher" } else { "online ticket" }
            );
            Ok(())
        }
        SimRole::Flood {
            can,
            seconds,
            seed,
            bitrate,
        } => sim_flood(&can, seconds, seed, bitrate).await,
    }
}

/// `bmsgw sim flood`: one greppable summary line, so the VM lane can quote
/// what was sent and the load it made.
#[cfg(feature = "sim")]
async fn sim_flood(can: &str, seconds: u64, seed: u64, bitrate: u32) -> Result<(), String> {
    use bmsgw::can::socketcan::{SocketCanBus, SocketCanOptions};
    use bmsgw::sim::attack::flood::{Junk, flood};
    if bitrate == 0 {
        return Err("sim flood: --bitrate must be above 0".into());
    }
    let mut bus = SocketCanBus::open(can, SocketCanOptions::default())
        .map_err(|e| format!("sim flood: {}", chain(&e)))?;
    let mut junk = Junk::new(seed);
    let start = tokio::time::Instant::now();
    let stop = async {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(seconds)) => {}
            () = terminate() => {}
        }
    };
    let report = flood(&mut bus, &mut junk, Some(bitrate), stop).await;
    let elapsed = start.elapsed();
    // The load a real bus at --bitrate would carry: wire time over time.
    let load = 100.0 * report.wire_time.as_secs_f64() / elapsed.as_secs_f64().max(1e-9);
    println!(
        "sim flood: {can}: frames={} send_errors={} elapsed={:.1}s wire_time={:.1}s bitrate={bitrate} load={load:.1}% seed={seed:#x}",
        report.frames,
        report.send_errors,
        elapsed.as_secs_f64(),
        report.wire_time.as_secs_f64(),
    );
    Ok(())
}

// Only the simulators, the demo and the benches stop on Ctrl-C alone.
#[cfg(feature = "sim")]
async fn ctrl_c() {
    // If the handler cannot be installed, run without one.
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// A J1939 address: decimal or 0x-prefixed hex.
#[cfg(feature = "sim")]
fn parse_u8(s: &str) -> Result<u8, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u8::from_str_radix(hex, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("'{s}' is not an address 0..=255 (decimal or 0x..)"))
}

/// Three ASCII characters, or six hex digits for three raw bytes.
#[cfg(feature = "sim")]
fn parse_region(s: &str) -> Result<[u8; 3], String> {
    let b = s.as_bytes();
    if b.len() == 6 && b.iter().all(u8::is_ascii_hexdigit) {
        let mut out = [0u8; 3];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
        }
        return Ok(out);
    }
    match <[u8; 3]>::try_from(b) {
        Ok(arr) if arr.iter().all(u8::is_ascii_graphic) => Ok(arr),
        _ => Err(format!(
            "'{s}' is not a region code; expected 3 ASCII characters or 6 hex digits"
        )),
    }
}

#[cfg(feature = "sim")]
async fn bench(what: BenchCommand) -> Result<(), String> {
    use bmsgw::sim::bench::{LatencyOptions, Path};
    match what {
        BenchCommand::Latency {
            sessions,
            path,
            json,
        } => {
            let paths = match path.as_deref() {
                Some("online") => vec![Path::Online],
                Some("offline") => vec![Path::Offline],
                _ => vec![Path::Online, Path::Offline],
            };
            let opts = LatencyOptions { sessions, paths };
            let mut out = std::io::stdout();
            let measure = bmsgw::sim::bench::latency::run(&opts, &mut out);
            let report = tokio::select! {
                r = measure => r.map_err(|e| format!("bench latency: {}", chain(&e)))?,
                () = ctrl_c() => return Err("bench latency: stopped by a signal".into()),
            };
            if let Some(file) = json {
                let text = serde_json::to_string_pretty(&report)
                    .map_err(|e| format!("bench latency: JSON: {e}"))?;
                std::fs::write(&file, text + "\n")
                    .map_err(|e| format!("bench latency: writing {}: {e}", file.display()))?;
            }
            let failed: usize = report.paths.iter().map(|p| p.failed).sum();
            if failed > 0 {
                return Err(format!("bench latency: {failed} session(s) failed"));
            }
            Ok(())
        }
        BenchCommand::Cloud {
            instances,
            requests,
            vehicles,
            in_flight,
            repeats,
            vouchers,
            json,
        } => {
            let instance_binary = std::env::current_exe()
                .map_err(|e| format!("bench cloud: cannot find this binary: {e}"))?;
            let opts = bmsgw::sim::bench::cloud::CloudOptions {
                instances,
                requests,
                vehicles,
                in_flight,
                repeats,
                want_vouchers: vouchers,
                instance_binary,
            };
            let mut out = std::io::stdout();
            let measure = bmsgw::sim::bench::cloud::run(&opts, &mut out);
            let report = tokio::select! {
                r = measure => r.map_err(|e| format!("bench cloud: {}", chain(&e)))?,
                () = ctrl_c() => return Err("bench cloud: stopped by a signal".into()),
            };
            if let Some(file) = json {
                let text = serde_json::to_string_pretty(&report)
                    .map_err(|e| format!("bench cloud: JSON: {e}"))?;
                std::fs::write(&file, text + "\n")
                    .map_err(|e| format!("bench cloud: writing {}: {e}", file.display()))?;
            }
            Ok(())
        }
        BenchCommand::Startup { runs, json } => {
            let binary = std::env::current_exe()
                .map_err(|e| format!("bench startup: cannot find this binary: {e}"))?;
            let opts = bmsgw::sim::bench::startup::StartupOptions { runs, binary };
            let mut out = std::io::stdout();
            let report = bmsgw::sim::bench::startup::run(&opts, &mut out)
                .await
                .map_err(|e| format!("bench startup: {}", chain(&e)))?;
            if let Some(file) = json {
                let text = serde_json::to_string_pretty(&report)
                    .map_err(|e| format!("bench startup: JSON: {e}"))?;
                std::fs::write(&file, text + "\n")
                    .map_err(|e| format!("bench startup: writing {}: {e}", file.display()))?;
            }
            Ok(())
        }
        BenchCommand::StartupChild { config } => {
            use bmsgw::can::virtual_bus::VirtualBus;
            use bmsgw::service::daemon::{Buses, Observe, run_on};
            let config = bmsgw::service::config::Config::load(&config)
                .map_err(|e| format!("run: {}", chain(&e)))?;
            let (bms, pile) = (VirtualBus::new(), VirtualBus::new());
            let buses = Buses::Bridge {
                bms: bms.node(),
                pile: pile.node(),
            };
            run_on(&config, buses, Observe::default(), terminate())
                .await
                .map_err(|e| format!("run: {}", chain(&e)))
        }
    }
}
