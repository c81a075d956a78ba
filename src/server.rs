//! Starting and stopping the server: one listener per loop on the same port
//! (SO_REUSEPORT, so the kernel spreads connections over the loops), one
//! thread per loop, the channels and wakers between them, and shutdown.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::thread::JoinHandle;

use mio::net::TcpListener;
use mio::{Poll, Token, Waker};
use socket2::{Domain, Protocol, Socket, Type};

use crate::config::ServerConfig;
use crate::event_loop::{Clock, EventLoop, Msg, Peer, Shared};
use crate::limits::INBOX_MAX;

const WAKER: Token = Token(usize::MAX - 2);

/// A running server.
pub struct Server {
    addr: SocketAddr,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<io::Result<()>>>,
}

impl Server {
    /// Binds and starts every loop. The address may have port 0 (tests).
    pub fn start(config: ServerConfig) -> io::Result<Server> {
        let loops = config.threads;
        assert!((1..=crate::limits::THREADS_MAX).contains(&loops));
        let mut listeners = Vec::with_capacity(loops);
        let mut addr = config.listen;
        for _ in 0..loops {
            let listener = bind_reuseport(addr)?;
            addr = listener.local_addr()?;
            listeners.push(listener);
        }
        let mut polls = Vec::with_capacity(loops);
        let mut peers = Vec::with_capacity(loops);
        let mut inboxes = Vec::with_capacity(loops);
        for _ in 0..loops {
            let poll = Poll::new()?;
            let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
            let (tx, rx) = crossbeam_channel::bounded(INBOX_MAX);
            peers.push(Peer { tx, waker });
            inboxes.push(rx);
            polls.push(poll);
        }
        let shared = Arc::new(Shared {
            config,
            clock: Clock::new(),
            peers,
            connections: AtomicUsize::new(0),
        });
        let mut threads = Vec::with_capacity(loops);
        for (idx, ((poll, listener), inbox)) in
            polls.into_iter().zip(listeners).zip(inboxes).enumerate()
        {
            let event_loop = EventLoop::new(idx, shared.clone(), poll, listener, inbox)?;
            let thread = std::thread::Builder::new()
                .name(format!("livelock-loop-{idx}"))
                .spawn(move || event_loop.run())?;
            threads.push(thread);
        }
        Ok(Server {
            addr,
            shared,
            threads,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Asks every loop to stop accepting, tell its clients, and exit.
    pub fn shutdown(&self) {
        shutdown_all(&self.shared);
    }

    /// A handle that can ask for shutdown from another thread (signals).
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            shared: self.shared.clone(),
        }
    }

    /// Waits for every loop to exit.
    pub fn join(self) -> io::Result<()> {
        let mut result = Ok(());
        for thread in self.threads {
            match thread.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => result = Err(e),
                Err(_) => result = Err(io::Error::other("an event loop panicked")),
            }
        }
        result
    }
}

#[derive(Clone)]
pub struct ShutdownHandle {
    shared: Arc<Shared>,
}

impl ShutdownHandle {
    pub fn shutdown(&self) {
        shutdown_all(&self.shared);
    }
}

fn shutdown_all(shared: &Shared) {
    for peer in &shared.peers {
        // A full inbox still gets it: block briefly rather than lose it.
        let _ = peer.tx.send(Msg::Shutdown);
        let _ = peer.waker.wake();
    }
}

fn bind_reuseport(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(TcpListener::from_std(socket.into()))
}
