//! Starting and stopping the server: one listener (on loop 0, which deals
//! connections out to the loops round robin), one thread per loop, the channels and wakers between them, the metrics
//! endpoint, and the state dump: read before the loops start, written after
//! they stop.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use mio::net::TcpListener;
use mio::{Poll, Token, Waker};
use parking_lot::Mutex;
use socket2::{Domain, Protocol, Socket, Type};

use crate::config::ServerConfig;
use crate::dump::{self, Dump};
use crate::event_loop::{Clock, EventLoop, LoopStart, Peer, Shared};
use crate::limits::{INBOX_MAX, TOKENS_PER_MS_MAX};
use crate::lock_table::{shard_for, Command, LockTable, Mode};
use crate::metrics::{LoopMetrics, ServerMetrics};
use crate::session::{home_of, Sessions};

const WAKER: Token = Token(usize::MAX - 2);

/// A running server.
pub struct Server {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    server_metrics: Arc<ServerMetrics>,
    threads: Vec<JoinHandle<io::Result<()>>>,
    metrics_stop: Arc<AtomicBool>,
    metrics_thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Binds, reloads the dump (if enabled), and starts every loop. The
    /// address may have port 0 (tests).
    pub fn start(config: ServerConfig) -> io::Result<Server> {
        let loops = config.threads;
        assert!((1..=crate::limits::THREADS_MAX).contains(&loops));
        // One listener, on loop 0, which deals connections out round robin.
        // (Not SO_REUSEPORT: another process could join that group and
        // receive a share of our clients.)
        let listener = bind_listener(config.listen)?;
        let addr = listener.local_addr()?;
        let mut listeners: Vec<Option<TcpListener>> = (0..loops).map(|_| None).collect();
        listeners[0] = Some(listener);
        let clock = Clock::new();
        let mut tables: Vec<LockTable> = (0..loops).map(|i| LockTable::new(i, loops)).collect();
        // Fencing tokens must keep increasing across restarts, crashes (no
        // dump) included: every shard starts above the wall-clock floor,
        // which no earlier run can have reached (see TOKENS_PER_MS_MAX).
        let floor = clock.now_ms().saturating_mul(TOKENS_PER_MS_MAX);
        for table in &mut tables {
            table.raise_token_floor(floor);
        }
        let mut sessions: Vec<Sessions> = (0..loops).map(Sessions::new).collect();
        if config.dump_load {
            match dump::load(&config.dump_path()) {
                Ok(Some(state)) => {
                    restore(&config, &state, clock.now_ms(), &mut tables, &mut sessions)
                }
                Ok(None) => {}
                Err(e) => eprintln!(
                    "livelock: warning: ignoring the dump {}: {e}; starting empty",
                    config.dump_path().display()
                ),
            }
        }
        let mut starts = Vec::with_capacity(loops);
        let mut peers = Vec::with_capacity(loops);
        for ((listener, table), sessions) in listeners.into_iter().zip(tables).zip(sessions) {
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
            });
        }
        let metrics_listener = match config.metrics_listen {
            Some(addr) => Some(std::net::TcpListener::bind(addr)?),
            None => None,
        };
        let shared = Arc::new(Shared {
            config,
            clock,
            peers,
            connections: AtomicUsize::new(0),
            metrics: (0..loops).map(|_| Arc::new(LoopMetrics::new())).collect(),
            final_states: Mutex::new(Vec::new()),
        });
        let server_metrics = Arc::new(ServerMetrics::new());
        let metrics_stop = Arc::new(AtomicBool::new(false));
        let mut metrics_addr = None;
        let mut metrics_thread = None;
        if let Some(listener) = metrics_listener {
            metrics_addr = Some(listener.local_addr()?);
            let clock = shared.clock;
            metrics_thread = Some(crate::metrics::serve(
                listener,
                shared.metrics.clone(),
                server_metrics.clone(),
                move || clock.now_ms(),
                metrics_stop.clone(),
            )?);
        }
        let mut threads = Vec::with_capacity(loops);
        for (idx, start) in starts.into_iter().enumerate() {
            let event_loop = EventLoop::new(idx, shared.clone(), start)?;
            let thread = std::thread::Builder::new()
                .name(format!("livelock-loop-{idx}"))
                .spawn(move || event_loop.run())?;
            threads.push(thread);
        }
        Ok(Server {
            addr,
            metrics_addr,
            shared,
            server_metrics,
            threads,
            metrics_stop,
            metrics_thread,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where the Prometheus endpoint listens, if enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Asks every loop to stop accepting, tell its clients, and exit.
    pub fn shutdown(&self) {
        self.shared.request_shutdown();
    }

    /// A handle that can ask for shutdown from another thread (signals).
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            shared: self.shared.clone(),
        }
    }

    /// Waits for every loop to exit (after a shutdown request: a signal,
    /// `shutdown`, or the LiveLock SHUTDOWN command), then writes the dump.
    pub fn join(self) -> io::Result<()> {
        let mut result = Ok(());
        for thread in self.threads {
            match thread.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => result = Err(e),
                Err(_) => result = Err(io::Error::other("an event loop panicked")),
            }
        }
        if self.shared.config.dump_save {
            let started = Instant::now();
            let states = std::mem::take(&mut *self.shared.final_states.lock());
            let mut state = Dump {
                created_unix_ms: self.shared.clock.now_ms(),
                ..Dump::default()
            };
            for part in states {
                state.last_token = state.last_token.max(part.last_token);
                state.sessions.extend(part.sessions);
                state.holds.extend(part.holds);
                state.signals.extend(part.signals);
            }
            // Holds of sessions that do not outlive their connection end now.
            let kept: hashbrown::HashSet<u64> = state.sessions.iter().map(|s| s.id).collect();
            state.holds.retain(|h| kept.contains(&h.session));
            let path = self.shared.config.dump_path();
            match dump::write_atomic(&path, &dump::encode(&state)) {
                Ok(()) => self
                    .server_metrics
                    .record_dump(started.elapsed().as_micros() as u64),
                Err(e) => {
                    eprintln!("livelock: writing the dump {} failed: {e}", path.display());
                    result = result.and(Err(e));
                }
            }
        }
        self.metrics_stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.metrics_thread {
            let _ = thread.join();
        }
        result
    }
}

/// Gives the dump's sessions back to their home loops, detached with a
/// grace of release-all timeout + 1 s, and their holds to the shards; every
/// shard's tokens start above the dump's last token.
fn restore(
    config: &ServerConfig,
    state: &Dump,
    now_ms: u64,
    tables: &mut [LockTable],
    sessions: &mut [Sessions],
) {
    let loops = tables.len();
    let until_ms = now_ms + config.release_all_timeout.as_millis() as u64 + 1000;
    // Dumped session id → (restored id, home loop).
    let mut restored_ids: hashbrown::HashMap<u64, (u64, usize)> = hashbrown::HashMap::new();
    let put_back =
        |sessions: &mut [Sessions], home: usize, id: u64, s: &crate::dump::DumpSession| {
            sessions[home].restore(
                id,
                s.secret,
                s.grace_ms,
                &s.client_name,
                s.client_id.as_deref(),
                until_ms,
            );
        };
    // First the sessions that keep their id: native ones (their home is in
    // the id, which the client will RESUME with) and LiveLock ones whose
    // client id still hashes to the same loop.
    for session in &state.sessions {
        let home = match &session.client_id {
            Some(client_id) => shard_for(client_id, loops),
            None => home_of(session.id),
        };
        if home < loops && home_of(session.id) == home && sessions[home].get(session.id).is_none() {
            put_back(sessions, home, session.id, session);
            restored_ids.insert(session.id, (session.id, home));
        }
    }
    // Then LiveLock sessions whose client id now hashes elsewhere (the
    // loop count changed): clients find them by client id, so a fresh
    // session id at the new home is as good.
    for session in &state.sessions {
        let Some(client_id) = &session.client_id else {
            continue;
        };
        let home = shard_for(client_id, loops);
        if restored_ids.contains_key(&session.id) || sessions[home].by_client(client_id).is_some() {
            continue;
        }
        let id = sessions[home].fresh_id();
        put_back(sessions, home, id, session);
        restored_ids.insert(session.id, (id, home));
    }
    for table in tables.iter_mut() {
        table.raise_token_floor(state.last_token);
    }
    let mut restored = 0;
    let mut sink = Vec::new();
    for hold in &state.holds {
        let Some(&(id, home)) = restored_ids.get(&hold.session) else {
            continue;
        };
        if hold.name.is_empty() || hold.name.len() > crate::limits::NAME_LEN_MAX {
            continue;
        }
        let mode = if hold.shared {
            Mode::Shared
        } else {
            Mode::Exclusive
        };
        let shard = shard_for(&hold.name, loops);
        // A grant time in the future (a hostile or damaged dump) would
        // break the oldest-hold gauge (u64::MAX is its "no hold" value).
        let since_ms = hold.since_unix_ms.min(now_ms);
        if !tables[shard].restore_hold(&hold.name, id, mode, hold.token, since_ms) {
            continue;
        }
        restored += 1;
        let session = sessions[home].get_mut(id).expect("restored above");
        session.holds += 1;
        if session.touched & (1 << shard) == 0 {
            session.touched |= 1 << shard;
            let introduce = Command::Introduce {
                session: id,
                client_name: &session.client_name,
            };
            tables[shard].apply(now_ms, introduce, &mut sink);
        }
    }
    for (name, signal) in &state.signals {
        if !name.is_empty() && name.len() <= crate::limits::NAME_LEN_MAX {
            tables[shard_for(name, loops)].restore_signal(name, signal);
        }
    }
    let dropped_sessions = state.sessions.len() - restored_ids.len();
    let dropped_holds = state.holds.len() - restored;
    if dropped_sessions > 0 || dropped_holds > 0 {
        eprintln!(
            "livelock: warning: {dropped_sessions} session(s) and {dropped_holds} hold(s) of the dump \
             could not be restored (native sessions homed on a loop this server does not have)"
        );
    }
    eprintln!(
        "livelock: restored {} session(s) and {restored} hold(s) from the dump; they are released \
         unless their clients reconnect within {} ms",
        restored_ids.len(),
        until_ms - now_ms
    );
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

fn bind_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(TcpListener::from_std(socket.into()))
}
