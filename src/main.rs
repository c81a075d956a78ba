//! The `livelock` binary: `livelock server` runs the lock server,
//! `livelock run NAME -- COMMAND` holds a lock around a command.

mod admin;
mod logging;
mod run;

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand};

use livelock::config::{Durability, ServerConfig, TcpTuning};
use livelock::duration::{millis_flag, seconds_flag};
use livelock::server::Server;

const DEFAULT_PORT: u16 = 7873;

#[derive(Parser)]
#[command(
    name = "livelock",
    version,
    about = "A lock server whose locks live exactly as long as their holder's connection",
    long_about = "A lock server whose locks live exactly as long as their holder's connection.\n\n\
        `livelock server` runs the server (127.0.0.1:7873 by default; every change is logged to ./livelock-data before it is acknowledged, so a restart or a crash keeps every hold).\n\
        `livelock run NAME -- COMMAND` runs COMMAND while holding the lock NAME, like flock(1) \
        across machines: COMMAND never runs without the lock."
)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Run the lock server.
    Server(ServerArgs),
    /// Hold a lock while a command runs (exit 75: not obtained in time; 79: lost while it ran).
    Run(run::RunArgs),
    /// Hold a lock until interrupted, printing its fencing token (like `etcdctl lock NAME`).
    Hold(run::HoldArgs),
    /// Operator commands: list, inspect, signal, stats, release --force, kill-session, cluster status.
    #[command(flatten)]
    Admin(AdminCommandWithArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell), e.g. `livelock completions bash > /etc/bash_completion.d/livelock`.
    Completions { shell: clap_complete::Shell },
    /// Print the manual page (roff), e.g. `livelock man > livelock.1`; with --dir, write livelock.1 and one page per subcommand (livelock-server.1, ...) there.
    Man {
        /// Write every page into this directory instead.
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
    },
}

#[derive(Subcommand)]
enum AdminCommandWithArgs {
    /// List held locks whose name matches a glob (*, ?, [...]).
    List {
        #[command(flatten)]
        args: admin::AdminArgs,
        #[arg(default_value = "*")]
        pattern: String,
        /// At most this many locks.
        #[arg(long, default_value_t = 1000)]
        limit: u32,
    },
    /// Show who holds a lock and who waits for it, first in line first.
    Inspect {
        #[command(flatten)]
        args: admin::AdminArgs,
        name: String,
    },
    /// Raise a signal on a held lock; its holders are told at once.
    Signal {
        #[command(flatten)]
        args: admin::AdminArgs,
        name: String,
        signal: String,
    },
    /// Server version, uptime, counts and totals.
    Stats {
        #[command(flatten)]
        args: admin::AdminArgs,
    },
    /// The busiest lock names lately: acquires, grants, busy, timeouts (halved every minute), wait and hold times, held and waiting now.
    Report {
        #[command(flatten)]
        args: admin::AdminArgs,
        /// This many names, busiest first (at most 500).
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=500))]
        top: u32,
        /// Only names whose tags (given by pool requests) have this KEY=VALUE (repeat it, or join pairs with ','), after a TOTAL row of all of them.
        #[arg(long, value_name = "KEY=VALUE")]
        tag: Vec<String>,
    },
    /// Break a stuck lock: end its holds (needs --force); each holder is told LOCK_LOST and the next waiter is granted.
    Release {
        #[command(flatten)]
        args: admin::AdminArgs,
        name: String,
        /// Required: ending another session's hold is an operator's act (it is logged).
        #[arg(long)]
        force: bool,
        /// Only the hold with this fencing token (as `inspect` shows it).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        token: Option<u64>,
    },
    /// End a session (as `inspect`/`list` show it): its locks are released, its waits dropped, its client told LOCK_LOST and disconnected.
    KillSession {
        #[command(flatten)]
        args: admin::AdminArgs,
        session: u64,
    },
    /// A cluster's members: `livelock cluster status` shows the leader, term, commit and applied index, and each member's lag and health.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// The leader, term, commit and applied index, and each member's matched index, lag and health, as the leader sees them (any member answers).
    Status {
        #[command(flatten)]
        args: admin::AdminArgs,
    },
    /// Add members (started with --join), each as ID=HOST:PORT (its peer address); several at once go through joint consensus. Waits until they are caught up.
    Add {
        #[command(flatten)]
        args: admin::AdminArgs,
        #[arg(required = true, value_name = "ID=HOST:PORT")]
        members: Vec<String>,
    },
    /// Remove members by id; several at once go through joint consensus. A removed node exits. Waits until the change is done.
    Remove {
        #[command(flatten)]
        args: admin::AdminArgs,
        #[arg(required = true, value_parser = clap::value_parser!(u64).range(1..))]
        ids: Vec<u64>,
    },
    /// Hand leadership to member ID (brought up to date first). Waits until it leads.
    Transfer {
        #[command(flatten)]
        args: admin::AdminArgs,
        #[arg(value_parser = clap::value_parser!(u64).range(1..))]
        id: u64,
    },
}

#[derive(Args)]
struct ServerArgs {
    /// Address to listen on; overrides LIVELOCK_BIND_TO/LIVELOCK_HOST and LIVELOCK_PORT.
    #[arg(long, value_name = "ADDR", env = "LIVELOCK_LISTEN")]
    listen: Option<SocketAddr>,
    /// Host to listen on [env: LIVELOCK_BIND_TO, LIVELOCK_HOST] [default: 127.0.0.1]
    #[arg(long)]
    host: Option<IpAddr>,
    /// Port to listen on.
    #[arg(long, env = "LIVELOCK_PORT", default_value_t = DEFAULT_PORT)]
    port: u16,
    /// Event-loop threads, each owning a shard of the locks [default: number of cores]
    #[arg(long, env = "LIVELOCK_THREADS")]
    threads: Option<usize>,
    /// Password clients must give in HELLO.
    #[arg(long, env = "LIVELOCK_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// Allow a non-loopback listener without a password [env: LIVELOCK_INSECURE_NO_PASSWORD=1]
    #[arg(long)]
    insecure_no_password: bool,
    /// Silence before TCP keepalive probes start (e.g. 2s; plain number: seconds).
    #[arg(long, env = "LIVELOCK_TCP_KEEPALIVE_TIME", default_value = "2", value_parser = seconds_flag)]
    keepalive_time: Duration,
    /// Time between keepalive probes (plain number: seconds).
    #[arg(long, env = "LIVELOCK_TCP_KEEPALIVE_INTERVAL", default_value = "1", value_parser = seconds_flag)]
    keepalive_interval: Duration,
    /// Unanswered probes before the peer is declared dead.
    #[arg(long, env = "LIVELOCK_TCP_KEEPALIVE_PROBES", default_value_t = 3)]
    keepalive_probes: u32,
    /// How long unacknowledged data may wait before the connection is dropped (TCP_USER_TIMEOUT; plain number: seconds).
    #[arg(long, env = "LIVELOCK_TCP_USER_TIMEOUT_SECONDS", default_value = "5", value_parser = seconds_flag)]
    user_timeout: Duration,
    /// LiveLock protocol: how long a client id keeps its locks after its connection is lost (plain number: seconds).
    #[arg(long, env = "LIVELOCK_RELEASE_ALL_TIMEOUT", default_value = "5", value_parser = seconds_flag)]
    release_all_timeout: Duration,
    /// What survives a restart: memory (nothing), dump (the state, written at shutdown), log (every change, before it is acknowledged; survives kill -9).
    #[arg(long, env = "LIVELOCK_DURABILITY", default_value = "log", value_parser = Durability::parse)]
    durability: Durability,
    /// Directory of the log, the dump and the fencing-token mark (created if missing).
    #[arg(long, env = "LIVELOCK_DATA_DIR", default_value = "livelock-data")]
    data_dir: std::path::PathBuf,
    /// With --durability log: take a snapshot once this many bytes were logged since the last one.
    #[arg(long, env = "LIVELOCK_SNAPSHOT_LOG_BYTES", default_value_t = 64 << 20)]
    snapshot_log_bytes: u64,
    /// Cluster: this node's id in the member list (a replicated cluster of 3 or 5 nodes; see docs/OPERATIONS.md).
    #[arg(long, env = "LIVELOCK_NODE_ID", requires = "peers")]
    node_id: Option<u64>,
    /// Cluster: every member as ID=HOST:PORT (its peer port), comma-separated, this node included.
    #[arg(
        long,
        env = "LIVELOCK_PEERS",
        value_name = "ID=HOST:PORT,...",
        requires = "node_id"
    )]
    peers: Option<String>,
    /// Cluster: the secret every peer connection proves (16 bytes or more; all members the same).
    #[arg(long, env = "LIVELOCK_CLUSTER_SECRET", hide_env_values = true)]
    cluster_secret: Option<String>,
    /// Cluster: after a failover, every session waits at least this long for its client (plain number: seconds).
    #[arg(long, env = "LIVELOCK_FAILOVER_GRACE", default_value = "5", value_parser = seconds_flag)]
    failover_grace: Duration,
    /// Cluster: a follower stands for election after this (randomised up to twice it) without a leader's word; a leader without a quorum steps down as soon. Plain number: milliseconds.
    #[arg(long, env = "LIVELOCK_ELECTION_TIMEOUT", default_value = "500", value_parser = millis_flag)]
    election_timeout: Duration,
    /// Cluster: TLS on peer links, each node showing its --tls-cert and checking its peers' against this CA (PEM).
    #[arg(long, env = "LIVELOCK_PEER_TLS_CA", value_name = "FILE")]
    peer_tls_ca: Option<std::path::PathBuf>,
    /// Cluster: a new member that waits to be added (`livelock cluster add`) instead of founding a cluster with the member list [env: LIVELOCK_JOIN=1]
    #[arg(long)]
    join: bool,
    /// Do not read the dump at start [env: LIVELOCK_DISABLE_DUMP_LOAD=1]
    #[arg(long)]
    disable_dump_load: bool,
    /// Same as --durability memory [env: LIVELOCK_NO_DUMP=1]
    #[arg(long)]
    no_dump: bool,
    /// How long a start waits for a predecessor to release the port and the data directory (plain number: seconds).
    #[arg(long, env = "LIVELOCK_TAKEOVER_WAIT", default_value = "10", value_parser = seconds_flag)]
    takeover_wait: Duration,
    /// Obey the LiveLock SHUTDOWN command [env: LIVELOCK_SHUTDOWN_SUPPORT=1]
    #[arg(long)]
    shutdown_support: bool,
    /// Largest LiveLock-protocol command in bytes.
    #[arg(long, env = "LIVELOCK_MAX_PAYLOAD", default_value_t = 1024)]
    max_payload: usize,
    /// TLS on the client port: the certificate chain (PEM); a connection that opens with a TLS record speaks TLS. Reloaded on SIGHUP.
    #[arg(
        long,
        env = "LIVELOCK_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    tls_cert: Option<std::path::PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(
        long,
        env = "LIVELOCK_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    tls_key: Option<std::path::PathBuf>,
    /// Require client certificates signed by these CAs (PEM): mutual TLS (plaintext is then refused too).
    #[arg(
        long,
        env = "LIVELOCK_TLS_CLIENT_CA",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    tls_client_ca: Option<std::path::PathBuf>,
    /// Refuse plaintext connections (the LiveLock protocol's included) [env: LIVELOCK_TLS_REQUIRED=1]
    #[arg(long, requires = "tls_cert")]
    tls_required: bool,
    /// Serve Prometheus metrics over HTTP here [env: LIVELOCK_PROMETHEUS_PORT, on the listen host]
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Log level: TRACE (every request), DEBUG (connections, sessions), INFO (state changes an operator cares about), WARNING, ERROR or CRITICAL.
    #[arg(long, env = "LIVELOCK_LOGLEVEL", default_value = "INFO", value_parser = logging::parse_level)]
    log_level: tracing::level_filters::LevelFilter,
    /// Log lines as text or as JSON objects (timestamp, level, target, message, fields).
    #[arg(long, env = "LIVELOCK_LOG_FORMAT", value_enum, default_value_t = logging::Format::Text)]
    log_format: logging::Format,
}

/// A boolean flag, or else its `LIVELOCK_*` variable, parsed strictly.
fn flag_or_env(flag: bool, variable: &str) -> Result<bool, String> {
    if flag {
        return Ok(true);
    }
    match std::env::var(variable) {
        Ok(value) => livelock::config::parse_bool(variable, &value),
        Err(_) => Ok(false),
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => return usage_error(error),
    };
    match cli.command {
        Commands::Server(args) => serve(args),
        Commands::Run(args) => run::run(args),
        Commands::Hold(args) => run::hold(args),
        Commands::Completions { shell } => {
            // Generated from the same clap definitions as --help.
            let mut command = Cli::command();
            clap_complete::generate(shell, &mut command, "livelock", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Commands::Man { dir } => {
            let written = match dir {
                Some(dir) => clap_mangen::generate_to(Cli::command(), &dir),
                None => clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()),
            };
            match written {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("livelock: cannot write the manual page: {e}");
                    ExitCode::from(70)
                }
            }
        }
        Commands::Admin(command) => {
            let (args, command) = match command {
                AdminCommandWithArgs::List {
                    args,
                    pattern,
                    limit,
                } => (args, admin::AdminCommand::List { pattern, limit }),
                AdminCommandWithArgs::Inspect { args, name } => {
                    (args, admin::AdminCommand::Inspect { name })
                }
                AdminCommandWithArgs::Signal { args, name, signal } => {
                    (args, admin::AdminCommand::Signal { name, signal })
                }
                AdminCommandWithArgs::Stats { args } => (args, admin::AdminCommand::Stats),
                AdminCommandWithArgs::Report { args, top, tag } => {
                    let tag = tag.join(",");
                    if !livelock::pool::tags_valid(tag.as_bytes()) {
                        eprintln!(
                            "livelock: --tag {tag:?}: tags are KEY=VALUE pairs joined by ',' \
                             (at most {} bytes)",
                            livelock::limits::TAGS_LEN_MAX
                        );
                        return ExitCode::from(2);
                    }
                    (args, admin::AdminCommand::Report { top, tag })
                }
                AdminCommandWithArgs::Release {
                    force: false, name, ..
                } => {
                    eprintln!(
                        "livelock: a lock is released by its holder; to end another session's \
                         hold of {name:?} as an operator, add --force"
                    );
                    return ExitCode::from(2);
                }
                AdminCommandWithArgs::Release {
                    args, name, token, ..
                } => (args, admin::AdminCommand::ForceRelease { name, token }),
                AdminCommandWithArgs::KillSession { args, session } => {
                    (args, admin::AdminCommand::KillSession { session })
                }
                AdminCommandWithArgs::Cluster { command } => match command {
                    ClusterCommand::Status { args } => (args, admin::AdminCommand::ClusterStatus),
                    ClusterCommand::Add { args, members } => {
                        let mut changes = Vec::new();
                        for member in members {
                            match livelock::cluster::parse_peers(&member) {
                                Ok(parsed) => {
                                    changes.extend(parsed.into_iter().map(|(id, addr)| {
                                        livelock::protocol::MemberChange::Add {
                                            id,
                                            peer_addr: addr.to_string(),
                                        }
                                    }))
                                }
                                Err(e) => {
                                    eprintln!("livelock: {e}");
                                    return ExitCode::from(2);
                                }
                            }
                        }
                        (
                            args,
                            admin::AdminCommand::ClusterChange(changes_of(changes)),
                        )
                    }
                    ClusterCommand::Remove { args, ids } => {
                        let changes = ids
                            .into_iter()
                            .map(|id| livelock::protocol::MemberChange::Remove { id })
                            .collect();
                        (
                            args,
                            admin::AdminCommand::ClusterChange(changes_of(changes)),
                        )
                    }
                    ClusterCommand::Transfer { args, id } => (
                        args,
                        admin::AdminCommand::ClusterChange(
                            livelock::protocol::ClusterChange::Transfer(id),
                        ),
                    ),
                },
            };
            admin::run(args, command)
        }
    }
}

fn changes_of(changes: Vec<livelock::protocol::MemberChange>) -> livelock::protocol::ClusterChange {
    livelock::protocol::ClusterChange::Members(changes)
}

/// Reports a command-line error as clap does (exit 2), except that a bad
/// value that came from the environment is reported under the variable's
/// name (`LIVELOCK_PORT="abc"`), not the flag's, which was never typed.
fn usage_error(error: clap::Error) -> ExitCode {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let from_env = match (error.kind(), error.get(ContextKind::InvalidArg)) {
        (ErrorKind::InvalidValue | ErrorKind::ValueValidation, Some(ContextValue::String(arg))) => {
            let long = arg.split_whitespace().next().unwrap_or_default();
            let typed = std::env::args().any(|a| a == long || a.starts_with(&format!("{long}=")));
            let command = Cli::command();
            let env = std::iter::once(&command)
                .chain(command.get_subcommands())
                .flat_map(|c| c.get_arguments())
                .find(|a| a.get_long().is_some_and(|l| format!("--{l}") == long))
                .and_then(|a| a.get_env())
                .map(|e| e.to_string_lossy().into_owned());
            env.filter(|_| !typed)
                .and_then(|name| std::env::var(&name).ok().map(|value| (name, value)))
                .map(|found| (found, long.to_string()))
        }
        _ => None,
    };
    match from_env {
        Some(((name, value), long)) => {
            let why = std::error::Error::source(&error)
                .map_or_else(|| error.kind().to_string(), |e| e.to_string());
            eprintln!("error: invalid value {value:?} in {name} (the environment's {long}): {why}");
            ExitCode::from(2)
        }
        None => {
            let _ = error.print();
            // `livelock run NAME COMMAND` without `--`: say what to type.
            let args: Vec<String> = std::env::args().collect();
            if error.kind() == ErrorKind::UnknownArgument
                && args.get(1).is_some_and(|a| a == "run")
                && !args.iter().any(|a| a == "--")
            {
                eprintln!(
                    "hint: put `--` between the lock's name and the command: livelock run NAME \
                     -- COMMAND [ARGS...] (or -c 'SHELL COMMAND')"
                );
            }
            ExitCode::from(if error.use_stderr() { 2 } else { 0 })
        }
    }
}

fn env_host() -> Result<Option<IpAddr>, String> {
    for var in ["LIVELOCK_BIND_TO", "LIVELOCK_HOST"] {
        if let Ok(value) = std::env::var(var) {
            return value
                .parse()
                .map(Some)
                .map_err(|_| format!("{var}={value:?} is not an IP address"));
        }
    }
    Ok(None)
}

fn server_config(args: &ServerArgs) -> Result<ServerConfig, String> {
    let listen = match args.listen {
        Some(addr) => addr,
        None => {
            let host = match args.host {
                Some(host) => host,
                None => env_host()?.unwrap_or(IpAddr::from([127, 0, 0, 1])),
            };
            SocketAddr::new(host, args.port)
        }
    };
    let mut config = ServerConfig::new(listen);
    if let Some(threads) = args.threads {
        config.threads = threads;
    }
    config.password = args
        .password
        .clone()
        .filter(|p| !p.is_empty())
        .map(String::into_bytes);
    config.tcp = TcpTuning {
        keepalive_idle: args.keepalive_time.max(Duration::from_secs(1)),
        keepalive_interval: args.keepalive_interval.max(Duration::from_secs(1)),
        keepalive_probes: args.keepalive_probes.max(1),
        user_timeout: args.user_timeout,
    };
    if args.release_all_timeout > Duration::from_secs(86_400) {
        return Err(format!(
            "LIVELOCK_RELEASE_ALL_TIMEOUT is at most 1 day, got {:?}",
            args.release_all_timeout
        ));
    }
    config.release_all_timeout = args.release_all_timeout;
    config.data_dir = args.data_dir.clone();
    if args.takeover_wait > Duration::from_secs(3600) {
        return Err(format!(
            "--takeover-wait is at most 1 h, got {:?}",
            args.takeover_wait
        ));
    }
    config.takeover_wait = args.takeover_wait;
    // Tests of debug builds only: make a loop panic (see ServerConfig).
    #[cfg(debug_assertions)]
    if let Ok(idx) = std::env::var("LIVELOCK_FAULT_PANIC_LOOP") {
        config.fault_panic_loop = idx.parse().ok();
    }
    #[cfg(debug_assertions)]
    if let Ok(file) = std::env::var("LIVELOCK_FAULT_LOG_FAIL_FILE") {
        config.fault_log_fail_file = Some(file.into());
    }
    let durability = match flag_or_env(args.no_dump, "LIVELOCK_NO_DUMP")? {
        true => Durability::Memory,
        false => args.durability,
    };
    let load = !flag_or_env(args.disable_dump_load, "LIVELOCK_DISABLE_DUMP_LOAD")?;
    config.set_durability(durability, load);
    // The fencing-token mark is kept in the data directory unless nothing
    // is (`memory` keeps nothing on disk: its tokens start from the clock).
    config.keep_tokens = durability != Durability::Memory;
    if args.snapshot_log_bytes < 1 << 20 {
        return Err(format!(
            "--snapshot-log-bytes is at least 1 MiB, got {}",
            args.snapshot_log_bytes
        ));
    }
    config.snapshot_log_bytes = args.snapshot_log_bytes;
    config.shutdown_support = flag_or_env(args.shutdown_support, "LIVELOCK_SHUTDOWN_SUPPORT")?;
    let tls_required = flag_or_env(args.tls_required, "LIVELOCK_TLS_REQUIRED")?;
    config.tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(livelock::tls::TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: args.tls_client_ca.clone(),
            // Client certificates are the access control: no plaintext way around them.
            required: tls_required || args.tls_client_ca.is_some(),
        }),
        _ if tls_required => {
            return Err("LIVELOCK_TLS_REQUIRED needs --tls-cert and --tls-key".into())
        }
        _ => None,
    };
    config.max_payload = args.max_payload;
    config.metrics_listen = match args.metrics {
        Some(addr) => Some(addr),
        None => match std::env::var("LIVELOCK_PROMETHEUS_PORT") {
            Ok(port) if !port.is_empty() => {
                let port: u16 = port
                    .parse()
                    .map_err(|_| format!("LIVELOCK_PROMETHEUS_PORT={port:?} is not a port"))?;
                Some(SocketAddr::new(listen.ip(), port))
            }
            _ => None,
        },
    };
    if let (Some(node_id), Some(peers)) = (args.node_id, &args.peers) {
        if durability != Durability::Log {
            return Err("a cluster node keeps its state in the log: --durability log".into());
        }
        let cluster = livelock::cluster::ClusterConfig {
            node_id,
            peers: livelock::cluster::parse_peers(peers)?,
            secret: args.cluster_secret.clone().unwrap_or_default().into_bytes(),
            failover_grace: args.failover_grace,
            election_timeout: args.election_timeout,
            join: flag_or_env(args.join, "LIVELOCK_JOIN")?,
            peer_tls_ca: args.peer_tls_ca.clone(),
        };
        cluster.validate()?;
        // The state is the log's: no dump is read or written.
        config.dump_load = false;
        config.dump_save = false;
        config.keep_tokens = false;
        config.cluster = Some(cluster);
    }
    config.validate(flag_or_env(
        args.insecure_no_password,
        "LIVELOCK_INSECURE_NO_PASSWORD",
    )?)?;
    Ok(config)
}

/// A thread that answers SIGHUP with `reload_tls` and the first SIGTERM
/// or SIGINT with `stop`.
fn on_signals(
    reload_tls: impl Fn() -> Result<bool, String> + Send + 'static,
    stop: impl FnOnce() + Send + 'static,
) -> Result<(), ExitCode> {
    let mut signals = match signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ]) {
        Ok(signals) => signals,
        Err(e) => {
            tracing::error!("cannot install signal handlers: {e}");
            return Err(ExitCode::from(1));
        }
    };
    std::thread::spawn(move || {
        for signal in signals.forever() {
            if signal == signal_hook::consts::SIGHUP {
                match reload_tls() {
                    Ok(true) => tracing::info!("SIGHUP: TLS certificate and key reloaded"),
                    Ok(false) => tracing::info!("SIGHUP: no TLS to reload"),
                    Err(e) => tracing::error!("SIGHUP: TLS not reloaded (the old one stays): {e}"),
                }
                continue;
            }
            tracing::info!(signal, "signal {signal}: shutting down");
            stop();
            break;
        }
    });
    Ok(())
}

/// A cluster node: follows (relaying its clients to the leader) until it
/// is elected, then serves. SIGTERM hands leadership over first; a leader
/// that loses office restarts itself as a follower (the raft thread
/// executes the program again).
fn serve_cluster(config: ServerConfig) -> ExitCode {
    let follower = match livelock::cluster::start(config) {
        Ok(follower) => follower,
        Err(e) => {
            tracing::error!("cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    type Reload = Box<dyn Fn() -> Result<bool, String> + Send + Sync>;
    let reload: Arc<OnceLock<Reload>> = Arc::new(OnceLock::new());
    let reload_tls = reload.clone();
    if let Err(code) = on_signals(
        move || reload_tls.get().map_or(Ok(false), |reload| reload()),
        follower.stopper(),
    ) {
        return code;
    }
    let server = match follower.lead() {
        Ok(server) => server,
        Err(e) => {
            tracing::error!("cannot serve as the leader: {e}");
            return ExitCode::from(1);
        }
    };
    let _ = reload.set(Box::new(server.tls_reloader()));
    tracing::info!("serving clients on {} as the leader", server.local_addr());
    // The process ends in the raft thread (stopped; deposed, it executes
    // itself again as a follower), or here after a LiveLock SHUTDOWN.
    match server.join() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(1)
        }
    }
}

/// Raises the soft limit on open files towards what CONNECTIONS_MAX needs
/// (within the hard limit), as the default 1024 would cap connections.
fn raise_descriptor_limit() {
    let wanted = (livelock::limits::CONNECTIONS_MAX + 1024) as libc::rlim_t;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < wanted {
            limit.rlim_cur = wanted.min(limit.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn serve(args: ServerArgs) -> ExitCode {
    let config = match server_config(&args) {
        Ok(config) => config,
        Err(message) => {
            eprintln!("livelock: {message}");
            return ExitCode::from(2);
        }
    };
    logging::init(args.log_level, args.log_format);
    raise_descriptor_limit();
    let threads = config.threads;
    let durability = match (config.log, config.dump_save) {
        (true, _) => "log",
        (false, true) => "dump",
        (false, false) => "memory",
    };
    let data_dir = config.data_dir.clone();
    if config.cluster.is_some() {
        return serve_cluster(config);
    }
    let server = match Server::start(config) {
        Ok(server) => server,
        Err(e) => {
            tracing::error!("cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    let shutdown = server.shutdown_handle();
    if let Err(code) = on_signals(server.tls_reloader(), move || shutdown.shutdown()) {
        return code;
    }
    tracing::info!(
        addr = %server.local_addr(),
        threads,
        version = env!("CARGO_PKG_VERSION"),
        "listening on {} with {threads} loop(s), durability {durability}, data in {}",
        server.local_addr(),
        data_dir.display()
    );
    if let Some(addr) = server.metrics_addr() {
        tracing::info!("metrics on http://{addr}/metrics");
    }
    match server.join() {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(1)
        }
    }
}
