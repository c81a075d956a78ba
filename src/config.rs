//! Server settings: what `livelock server` is told by flags and `LIVELOCK_*`
//! variables, resolved into one value the loops read. Defaults are the
//! in-memory, loopback-only server of the README.

use std::net::SocketAddr;
use std::time::Duration;

/// TCP failure detection on every accepted socket (socket2): a silently dead
/// peer is found after `keepalive_idle + keepalive_interval * keepalive_probes`
/// of silence, or when unacknowledged data is older than `user_timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpTuning {
    pub keepalive_idle: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_probes: u32,
    pub user_timeout: Duration,
}

impl Default for TcpTuning {
    /// About 5 s to find a dead peer: 2 s idle + 3 probes 1 s apart.
    fn default() -> Self {
        TcpTuning {
            keepalive_idle: Duration::from_secs(2),
            keepalive_interval: Duration::from_secs(1),
            keepalive_probes: 3,
            user_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Event-loop threads, each owning one shard (1..=THREADS_MAX).
    pub threads: usize,
    /// Required in HELLO/RESUME when set; compared in constant time.
    pub password: Option<Vec<u8>>,
    pub tcp: TcpTuning,
    /// Time a new connection has to say HELLO.
    pub hello_timeout: Duration,
}

impl ServerConfig {
    /// Loopback, one loop per core, no password.
    pub fn new(listen: SocketAddr) -> ServerConfig {
        ServerConfig {
            listen,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            password: None,
            tcp: TcpTuning::default(),
            hello_timeout: Duration::from_millis(crate::limits::HELLO_TIMEOUT_MS),
        }
    }

    /// Refuses settings that cannot work or are unsafe, with a message that
    /// says what to change. `allow_insecure`: the operator accepts a
    /// non-loopback listener without a password.
    pub fn validate(&self, allow_insecure: bool) -> Result<(), String> {
        if self.threads == 0 || self.threads > crate::limits::THREADS_MAX {
            return Err(format!(
                "--threads must be 1..={}, got {}",
                crate::limits::THREADS_MAX,
                self.threads
            ));
        }
        if !self.listen.ip().is_loopback() && self.password.is_none() && !allow_insecure {
            return Err(format!(
                "refusing to listen on {} without a password: anyone who can reach it could take \
                 and release locks. Set --password / LIVELOCK_PASSWORD, listen on 127.0.0.1, or \
                 pass --insecure-no-password if the network is trusted",
                self.listen
            ));
        }
        Ok(())
    }
}
