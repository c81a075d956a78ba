//! Starting and stopping the server: the data directory (lock, dump,
//! token mark), one listener (on loop 0, which deals connections out to the
//! loops round robin), one thread per loop, the channels and wakers between
//! them, the metrics endpoint, and the state dump: read (and consumed)
//! before the loops start, written at the shutdown barrier, before the port
//! is released. See "Shutdown, restart and crash" in docs/ARCHITECTURE.md.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use mio::net::TcpListener;
use mio::{Poll, Token, Waker};
use socket2::{Domain, Protocol, Socket, Type};

use crate::config::ServerConfig;
use crate::data_dir::{self, DirLock, TokenCeiling};
use crate::dump::{self, LoopPosition};
use crate::event_loop::{Clock, EventLoop, LoopStart, Msg, Peer, Shared};
use crate::journal;
use crate::limits::{INBOX_MAX, TOKENS_PER_MS_MAX};
use crate::lock_table::{Effect, LockTable};
use crate::metrics::{LoopMetrics, ServerMetrics};
use crate::raft_log::{self, Log, LogConfig, LogShared};
use crate::session::Sessions;
use crate::snapshot::{self, LoopState};

const WAKER: Token = Token(usize::MAX - 2);

/// A running server.
pub struct Server {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    /// Runs the shutdown (`shut_down`) once it is asked for.
    coordinator: JoinHandle<io::Result<()>>,
    metrics_stop: Arc<AtomicBool>,
    metrics_thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Takes the data directory (waiting for a predecessor, bounded), binds
    /// (same), reads and consumes the dump (if enabled), reserves fencing
    /// tokens, and starts every loop. The address may have port 0 (tests).
    pub fn start(config: ServerConfig) -> io::Result<Server> {
        let loops = config.threads;
        assert!((1..=crate::limits::THREADS_MAX).contains(&loops));
        let started = Instant::now();
        // The directory first: its lock outlives our port (it is released
        // when the process ends), so a successor that has it knows the
        // dump we wrote is complete.
        let dir_lock = match config.uses_data_dir() {
            true => Some(data_dir::lock(&config.data_dir, config.takeover_wait)?),
            false => None,
        };
        let wait_left = config.takeover_wait.saturating_sub(started.elapsed());
        // One listener, on loop 0, which deals connections out round robin.
        // (Not SO_REUSEPORT: another process could join that group and
        // receive a share of our clients.)
        let listener = bind_listener(config.listen, wait_left)?;
        let clock = match config.clock_start_unix_ms {
            Some(unix_ms) => Clock::starting_at(unix_ms),
            None => Clock::new(),
        };
        let dump_path = config.dump_path();
        let mut suffix = data_dir::CONSUMED_SUFFIX;
        let loaded = match config.dump_load {
            true => match data_dir::load_dump(&dump_path) {
                Ok(state) => state,
                Err(e) => {
                    suffix = data_dir::REJECTED_SUFFIX;
                    tracing::warn!(
                        "ignoring the dump {}: {e}; starting empty (the file is \
                         kept as {}{suffix})",
                        dump_path.display(),
                        dump_path.display()
                    );
                    None
                }
            },
            false => None,
        };
        // A dump is read once: consumed (durably) before any client comes,
        // so a crash never brings back state older than what clients saw.
        // (With the log, the new base snapshot replaces it below; only an
        // unreadable one is put aside.)
        if (config.dump_load || config.dump_save)
            && (!config.log || suffix == data_dir::REJECTED_SUFFIX)
        {
            data_dir::consume_dump(&dump_path, suffix).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot consume the dump {}: {e}", dump_path.display()),
                )
            })?;
        }
        // The log: the snapshot (the dump file) and the entries after it,
        // replayed into the state they describe.
        let mut loaded = loaded;
        let mut recovered = None;
        if config.log {
            let base = if config.dump_load {
                loaded.take()
            } else {
                None
            };
            let mut found = raft_log::recover(&config.data_dir, base)
                .map_err(|e| io::Error::other(format!("cannot start from the log: {e}")))?;
            if found.ignored_entries > 0 {
                tracing::warn!(
                    "{} log entries belong to no snapshot (the dump was \
                     written by a clean shutdown, or is missing); they are ignored",
                    found.ignored_entries
                );
            }
            if found.batches > 0 {
                tracing::info!(
                    "replayed {} logged batch(es) on top of the snapshot",
                    found.batches
                );
            }
            loaded = found.state.take().map(snapshot::settle);
            recovered = Some(found);
        } else if config.dump_load && raft_log::log_dir(&config.data_dir).is_dir() {
            tracing::warn!(
                "{} holds a log (--durability log) that this mode does not \
                 read: only the dump is restored; changes logged after it are not",
                raft_log::log_dir(&config.data_dir).display()
            );
        }
        launch(Launch {
            config,
            started,
            dir_lock,
            listener,
            clock,
            loaded,
            log: match recovered {
                Some(found) => LaunchLog::Single(Box::new(found)),
                None => LaunchLog::None,
            },
        })
    }

    /// Starts a cluster's new leader: `state` (the replayed log) restored
    /// with every session detached for at least `failover_grace`, counted
    /// from now (DESIGN.md §5, Chubby's rule); the base entry goes to
    /// `serve` before any loop runs.
    pub fn start_leader(
        config: ServerConfig,
        dir_lock: DirLock,
        listener: std::net::TcpListener,
        state: dump::Dump,
        (log, status): (Arc<LogShared>, Arc<crate::cluster::NodeStatus>),
        serve: Box<dyn FnOnce(crate::cluster::Base)>,
    ) -> io::Result<Server> {
        listener.set_nonblocking(true)?;
        launch(Launch {
            started: Instant::now(),
            dir_lock: Some(dir_lock),
            listener: TcpListener::from_std(listener),
            clock: Clock::new(),
            loaded: Some(state),
            log: LaunchLog::Cluster { log, status, serve },
            config,
        })
    }
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where the Prometheus endpoint listens, if enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Asks every loop to stop taking changes, export its state, and exit
    /// once the dump is written (`join` does the rest).
    pub fn shutdown(&self) {
        self.shared.request_shutdown();
    }

    /// A handle that can ask for shutdown from another thread (signals).
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            shared: self.shared.clone(),
        }
    }

    /// What reads the TLS certificate and key files again (SIGHUP): new
    /// connections get them. It answers `Ok(false)` without TLS; an error
    /// keeps the old ones.
    pub fn tls_reloader(&self) -> impl Fn() -> Result<bool, String> + Send + 'static {
        let shared = self.shared.clone();
        move || match &shared.tls {
            Some(tls) => tls.reload().map(|()| true),
            None => Ok(false),
        }
    }

    /// Waits for the shutdown (asked by a signal, `shutdown`, or the
    /// LiveLock SHUTDOWN command) to finish: the dump written, every loop
    /// gone, the port and the data directory released. The error is the
    /// dump's, if it could not be written.
    pub fn join(self) -> io::Result<()> {
        let result = self
            .coordinator
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the shutdown thread panicked")));
        self.metrics_stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.metrics_thread {
            let _ = thread.join();
        }
        result
    }
}

/// What `launch` starts from.
struct Launch {
    config: ServerConfig,
    started: Instant,
    dir_lock: Option<DirLock>,
    listener: TcpListener,
    clock: Clock,
    loaded: Option<dump::Dump>,
    log: LaunchLog,
}

/// How the loops' changes are made durable.
enum LaunchLog {
    None,
    /// This server's own log, as recovered.
    Single(Box<raft_log::Recovered>),
    /// A cluster's log (its raft thread runs already); the base entry goes
    /// to `serve`.
    Cluster {
        log: Arc<LogShared>,
        status: Arc<crate::cluster::NodeStatus>,
        serve: Box<dyn FnOnce(crate::cluster::Base)>,
    },
}

/// Restores the loaded state, writes (or proposes) the base snapshot, and
/// starts the loops, the log and the shutdown coordinator.
fn launch(launch: Launch) -> io::Result<Server> {
    let Launch {
        config,
        started,
        dir_lock,
        listener,
        clock,
        loaded,
        log: launch_log,
    } = launch;
    let loops = config.threads;
    let addr = listener.local_addr()?;
    let mut listeners: Vec<Option<TcpListener>> = (0..loops).map(|_| None).collect();
    listeners[0] = Some(listener);
    let mut tables: Vec<LockTable> = (0..loops).map(|i| LockTable::new(i, loops)).collect();
    let mut sessions: Vec<Sessions> = (0..loops).map(|home| Sessions::new(home, loops)).collect();
    let dump_path = config.dump_path();
    let dump_floor = loaded.as_ref().map_or(0, |d| d.last_token);
    // Fencing tokens: above the durable mark (and the dump's or the
    // log's last one). With the log, durable state is all they come
    // from (a new directory starts at 1); with a dump, a directory seen
    // for the first time is seeded from the wall clock, above anything
    // an earlier version handed out. Without a mark (`memory`, an
    // embedder's server), the wall clock is all there is to start
    // above an earlier run.
    let clock_floor = || match config.log {
        true => 0,
        false => clock.now_ms().saturating_mul(TOKENS_PER_MS_MAX),
    };
    let (tokens, floor) = match config.keep_tokens {
        true => TokenCeiling::reserve(&config.data_dir, clock_floor, dump_floor)?,
        false => (TokenCeiling::in_memory(), dump_floor.max(clock_floor())),
    };
    for table in &mut tables {
        table.raise_token_floor(floor);
        table.set_token_ceiling(tokens.get());
    }
    let mut effects: Vec<Vec<Effect>> = (0..loops).map(|_| Vec::new()).collect();
    // One instant for the restore and the base snapshot, so the log's
    // replay starts from exactly the state the loops start from.
    let now_ms = clock.now_ms();
    if let Some(state) = &loaded {
        // After a restart, or a failover: sessions wait this long at least
        // for their clients to come back.
        let restart_grace_ms = match &launch_log {
            LaunchLog::Cluster { .. } => config.cluster_failover_grace().as_millis() as u64,
            _ => config.release_all_timeout.as_millis() as u64 + 1000,
        };
        let report = snapshot::restore(
            state,
            now_ms,
            restart_grace_ms,
            &mut tables,
            &mut sessions,
            &mut effects,
        );
        report.log(state, restart_grace_ms);
    }
    // The base snapshot: the restored state, each loop at batch 0.
    let base_parts = || {
        tables
            .iter()
            .zip(&sessions)
            .map(|(table, sessions)| {
                let mut state = snapshot::export_shard(table, now_ms);
                state.sessions = snapshot::durable_sessions(sessions, now_ms);
                let position = LoopPosition {
                    stamp_ms: now_ms,
                    batch: 0,
                    last_token: table.last_token(),
                };
                (state, position)
            })
            .collect()
    };
    let mut base_entry = None;
    match &launch_log {
        LaunchLog::None => {}
        LaunchLog::Single(found) => {
            let (index, term) = found.position();
            let written = Instant::now();
            let base = snapshot::log_snapshot(base_parts(), index, term);
            let bytes = dump::encode(&base);
            data_dir::write_atomic(&dump_path, &bytes).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot write the snapshot {}: {e}", dump_path.display()),
                )
            })?;
            tracing::info!(
                "base snapshot of {} hold(s) written ({} bytes, {} ms); started in {} ms",
                base.holds.len(),
                bytes.len(),
                written.elapsed().as_millis(),
                started.elapsed().as_millis()
            );
        }
        // Its place in the log is the entry's own (`Replay::apply_committed`).
        LaunchLog::Cluster { .. } => {
            base_entry = Some(journal::base_entry(&snapshot::log_snapshot(
                base_parts(),
                0,
                0,
            )));
        }
    }
    let mut starts = Vec::with_capacity(loops);
    let mut peers = Vec::with_capacity(loops);
    for (((listener, table), sessions), effects) in
        listeners.into_iter().zip(tables).zip(sessions).zip(effects)
    {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (tx, inbox) = crossbeam_channel::bounded(INBOX_MAX);
        peers.push(Peer {
            tx,
            waker,
            sleeping: AtomicBool::new(false),
        });
        starts.push(LoopStart {
            poll,
            listener,
            inbox,
            table,
            sessions,
            effects,
        });
    }
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(std::net::TcpListener::bind(addr)?),
        None => None,
    };
    let tls = match &config.tls {
        Some(files) => Some(crate::tls::Tls::load(files.clone()).map_err(io::Error::other)?),
        None => None,
    };
    let (final_tx, final_rx) = crossbeam_channel::unbounded();
    let (launch_log, log_parts) = match launch_log {
        LaunchLog::None => (LaunchLog::None, None),
        LaunchLog::Single(found) => (LaunchLog::Single(found), Some(LogShared::new())),
        // A cluster node takes no snapshot of its own (it keeps its log).
        LaunchLog::Cluster { log, status, serve } => (
            LaunchLog::Cluster {
                log: log.clone(),
                status,
                serve,
            },
            Some((log, crossbeam_channel::never())),
        ),
    };
    let cluster = match &launch_log {
        LaunchLog::Cluster { status, .. } => Some(status.clone()),
        _ => None,
    };
    let shared = Arc::new(Shared {
        cluster,
        log: log_parts.as_ref().map(|(log, _)| log.clone()),
        config,
        clock,
        peers,
        connections: AtomicUsize::new(0),
        metrics: (0..loops).map(|_| Arc::new(LoopMetrics::new())).collect(),
        tokens,
        final_tx,
        stopping: AtomicBool::new(false),
        tls,
    });
    let server_metrics = Arc::new(
        ServerMetrics::new()
            .with_log(shared.log.clone())
            .with_cluster(shared.cluster.clone()),
    );
    let metrics_stop = Arc::new(AtomicBool::new(false));
    let mut metrics_addr = None;
    let mut metrics_thread = None;
    if let Some(listener) = metrics_listener {
        metrics_addr = Some(listener.local_addr()?);
        let clock = shared.clock;
        let for_health = shared.clone();
        metrics_thread = Some(crate::metrics::serve(
            listener,
            shared.metrics.clone(),
            server_metrics.clone(),
            move || clock.now_ms(),
            Box::new(move || for_health.not_ready()),
            metrics_stop.clone(),
        )?);
    }
    let wake_loops = |shared: &Arc<Shared>| -> Box<dyn Fn() + Send> {
        let wake = Arc::downgrade(shared);
        Box::new(move || {
            if let Some(shared) = wake.upgrade() {
                shared.wake_sleepers();
            }
        })
    };
    // What asks every loop for its part of a snapshot.
    let ask_loops = |shared: &Arc<Shared>| -> Box<dyn Fn() + Send> {
        let ask = Arc::downgrade(shared);
        Box::new(move || {
            if let Some(shared) = ask.upgrade() {
                shared.send_to_all(|| Msg::Snapshot);
            }
        })
    };
    let log = match (launch_log, log_parts) {
        (LaunchLog::Cluster { serve, .. }, _) => {
            serve(crate::cluster::Base {
                entry: base_entry.take().expect("made above"),
                wake_loops: wake_loops(&shared),
                ask_loops: ask_loops(&shared),
                loops,
            });
            None
        }
        (LaunchLog::Single(found), Some(parts)) => {
            let config = LogConfig {
                data_dir: shared.config.data_dir.clone(),
                snapshot_log_bytes: shared.config.snapshot_log_bytes,
                fault_fail_file: shared.config.fault_log_fail_file.clone(),
            };
            let log = Log::start(
                *found,
                config,
                parts,
                loops,
                ask_loops(&shared),
                wake_loops(&shared),
            )
            .map_err(io::Error::other)?;
            Some(log)
        }
        _ => None,
    };
    let mut threads = Vec::with_capacity(loops);
    for (idx, start) in starts.into_iter().enumerate() {
        let event_loop = EventLoop::new(idx, shared.clone(), start)?;
        let thread = std::thread::Builder::new()
            .name(format!("livelock-loop-{idx}"))
            .spawn(move || run_or_abort(idx, event_loop))?;
        threads.push(thread);
    }
    let coordinator = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("livelock-shutdown".into())
            .spawn(move || shut_down(&shared, &final_rx, threads, &server_metrics, dir_lock, log))?
    };
    Ok(Server {
        addr,
        metrics_addr,
        shared,
        coordinator,
        metrics_stop,
        metrics_thread,
    })
}

/// The shutdown, in this order: every loop freezes and passes the export
/// barrier (its final state arrives on `final_rx`); the dump is written and
/// fsynced; only then are the connections closed and the port released
/// (the loops exit); the data directory's lock goes last.
fn shut_down(
    shared: &Shared,
    final_rx: &Receiver<LoopState>,
    threads: Vec<JoinHandle<()>>,
    server_metrics: &ServerMetrics,
    dir_lock: Option<DirLock>,
    mut log: Option<Log>,
) -> io::Result<()> {
    let mut states = Vec::with_capacity(threads.len());
    for _ in 0..threads.len() {
        // Every loop sends, or the process aborts (`run_or_abort`).
        states.push(final_rx.recv().expect("Shared keeps a sender"));
    }
    // No snapshot of the log may land on top of the dump written now.
    if let Some(log) = &mut log {
        log.stop_snapshots();
    }
    let mut result = Ok(());
    if shared.config.dump_save {
        let started = Instant::now();
        let (state, dropped) = snapshot::merge(states, shared.clock.now_ms());
        if dropped > 0 {
            tracing::warn!("{dropped} record(s) could not be dumped, dropped");
        }
        let path = shared.config.dump_path();
        match data_dir::write_atomic(&path, &dump::encode(&state)) {
            Ok(()) => {
                server_metrics.record_dump(started.elapsed().as_micros() as u64);
                tracing::info!(
                    "state saved to {}: {} session(s), {} hold(s), {} queued acquire(s) ({} ms)",
                    path.display(),
                    state.sessions.len(),
                    state.holds.len(),
                    state.waiters.len(),
                    started.elapsed().as_millis()
                );
            }
            Err(e) => {
                tracing::error!("writing the dump {} failed: {e}", path.display());
                result = Err(e);
            }
        }
    }
    shared.request_close();
    for thread in threads {
        // A loop that fails aborts the process, so each one returns.
        let _ = thread.join();
    }
    // The dump has everything: the log before it can go (a crash before
    // this leaves entries the next start ignores, with a warning).
    if let Some(log) = log {
        log.stop(result.is_ok());
    }
    drop(dir_lock);
    result
}

/// Runs a loop; any way out but the orderly one (a panic, a poll error)
/// ends the process at once, so a supervisor restarts a whole server rather
/// than the rest limping on with a shard nobody serves.
fn run_or_abort(idx: usize, event_loop: EventLoop) {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| event_loop.run()));
    let why = match outcome {
        Ok(Ok(())) => return,
        Ok(Err(e)) => format!("failed: {e}"),
        Err(_) => "panicked".to_string(),
    };
    tracing::error!("event loop {idx} {why}; aborting");
    std::process::abort();
}

#[derive(Clone)]
pub struct ShutdownHandle {
    shared: Arc<Shared>,
}

impl ShutdownHandle {
    pub fn shutdown(&self) {
        self.shared.request_shutdown();
    }
}

/// Binds `addr` for the event loops (see `bind`).
fn bind_listener(addr: SocketAddr, wait: Duration) -> io::Result<TcpListener> {
    Ok(TcpListener::from_std(bind(addr, wait)?))
}

/// Binds `addr` (non-blocking), waiting up to `wait` while it is in use (a
/// predecessor still shutting down), then says which process holds it, if
/// it can tell.
pub fn bind(addr: SocketAddr, wait: Duration) -> io::Result<std::net::TcpListener> {
    let bound = data_dir::wait_for_predecessor(wait, io::ErrorKind::AddrInUse, || {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        Ok(socket.into())
    });
    bound.map_err(|e| {
        let why = match e.kind() {
            io::ErrorKind::AddrInUse => {
                let owner = match port_owner(addr.port()) {
                    Some(pid) => format!("pid {pid}"),
                    None => "another process".to_string(),
                };
                format!("in use by {owner}; waited {}", crate::duration::human(wait))
            }
            _ => e.to_string(),
        };
        io::Error::new(e.kind(), format!("cannot listen on {addr}: {why}"))
    })
}

/// The pid of a process with a listening TCP socket on `port` (Linux
/// /proc; None where that cannot be read).
fn port_owner(port: u16) -> Option<u32> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local_address is HEX_IP:HEX_PORT, st 0A is LISTEN, inode is field 9.
            let listening = fields.get(3) == Some(&"0A");
            let local_port = fields
                .get(1)
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if listening && local_port == Some(port) {
                inodes.extend(fields.get(9).map(|i| format!("socket:[{i}]")));
            }
        }
    }
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                if inodes.iter().any(|i| target.as_os_str() == i.as_str()) {
                    return Some(pid);
                }
            }
        }
    }
    None
}
