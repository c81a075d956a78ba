//! Server settings: what `livelock server` is told by flags and `LIVELOCK_*`
//! variables, resolved into one value the loops read. Defaults are the
//! in-memory, loopback-only server of the README.

use std::net::SocketAddr;
use std::path::PathBuf;
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

impl TcpTuning {
    /// TCP_NODELAY, keepalive and TCP_USER_TIMEOUT on `stream`, so that a
    /// dead peer is found fast.
    pub fn apply(&self, stream: &impl std::os::fd::AsFd) -> std::io::Result<()> {
        let socket = socket2::SockRef::from(stream);
        socket.set_nodelay(true)?;
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(self.keepalive_idle)
            .with_interval(self.keepalive_interval)
            .with_retries(self.keepalive_probes);
        socket.set_tcp_keepalive(&keepalive)?;
        socket.set_tcp_user_timeout(Some(self.user_timeout))?;
        Ok(())
    }
}

/// What survives a restart (`--durability`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Nothing is kept on disk (tokens start from the clock).
    Memory,
    /// The state is dumped at shutdown and read back at start (the
    /// LiveLock server's behaviour); a crash loses it.
    Dump,
    /// Every change is in the log before it is acknowledged; a crash loses
    /// nothing acknowledged. A clean shutdown still leaves one dump file.
    Log,
}

impl Durability {
    pub fn parse(value: &str) -> Result<Durability, String> {
        match value.trim().to_ascii_lowercase().as_str() {
            "memory" => Ok(Durability::Memory),
            "dump" => Ok(Durability::Dump),
            "log" => Ok(Durability::Log),
            _ => Err(format!(
                "durability {value:?} is not one of memory, dump, log"
            )),
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
    /// LiveLock protocol: how long a client id's locks outlive its latest
    /// connection (LIVELOCK_RELEASE_ALL_TIMEOUT).
    pub release_all_timeout: Duration,
    /// Where the state dump is written on shutdown and read on start.
    pub data_dir: PathBuf,
    /// Read the dump at start (LIVELOCK_DISABLE_DUMP_LOAD turns it off).
    pub dump_load: bool,
    /// Write the dump on shutdown.
    pub dump_save: bool,
    /// Keep every change in the durable log (`--durability log`).
    pub log: bool,
    /// `--durability log`: take a snapshot (and cut the log) once this
    /// many bytes were logged since the last one.
    pub snapshot_log_bytes: u64,
    /// Fault injection (debug builds' tests only): while this file exists,
    /// log writes fail as on a full disk.
    pub fault_log_fail_file: Option<PathBuf>,
    /// The LiveLock SHUTDOWN command is obeyed (LIVELOCK_SHUTDOWN_SUPPORT).
    pub shutdown_support: bool,
    /// LiveLock protocol: the largest command in bytes (LIVELOCK_MAX_PAYLOAD).
    pub max_payload: usize,
    /// Prometheus metrics over HTTP on this address.
    pub metrics_listen: Option<SocketAddr>,
    /// TLS on the client port (None: plaintext only).
    pub tls: Option<crate::tls::TlsFiles>,
    /// Keep the fencing-token high-water mark in the data directory, so
    /// tokens never repeat across crashes (`livelock server` always does,
    /// also without a dump).
    pub keep_tokens: bool,
    /// How long a start waits for a predecessor to release the port and
    /// the data directory.
    pub takeover_wait: Duration,
    /// The wall clock's reading at start, if not the real one (tests: a
    /// clock that stepped back).
    pub clock_start_unix_ms: Option<u64>,
    /// Fault injection (debug builds' tests only): this loop panics once
    /// it has a connection, to show a loop's death ends the process.
    pub fault_panic_loop: Option<usize>,
    /// Sessions and detached sessions over all loops (limits.rs; tests
    /// set them low).
    pub sessions_max: usize,
    pub detached_sessions_max: usize,
    /// A member of a replicated cluster (`--node-id`, `--peers`).
    pub cluster: Option<crate::cluster::ClusterConfig>,
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
            release_all_timeout: Duration::from_secs(5),
            data_dir: PathBuf::from("."),
            dump_load: false,
            dump_save: false,
            log: false,
            snapshot_log_bytes: 64 << 20,
            fault_log_fail_file: None,
            shutdown_support: false,
            max_payload: 1024,
            metrics_listen: None,
            tls: None,
            keep_tokens: false,
            takeover_wait: Duration::from_secs(10),
            clock_start_unix_ms: None,
            fault_panic_loop: None,
            sessions_max: crate::limits::SESSIONS_MAX,
            detached_sessions_max: crate::limits::DETACHED_SESSIONS_MAX,
            cluster: None,
        }
    }

    /// Refuses settings that cannot work or are unsafe, with a message that
    /// says what to change. `allow_insecure`: the operator accepts a
    /// non-loopback listener without a password.
    pub fn validate(&self, allow_insecure: bool) -> Result<(), String> {
        if self.threads == 0 || self.threads > crate::limits::THREADS_MAX {
            return Err(format!(
                "--threads / LIVELOCK_THREADS must be 1..={}, got {}",
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
        if self.max_payload < 16 || self.max_payload > crate::limits::READ_BUFFER_MAX / 2 {
            return Err(format!(
                "LIVELOCK_MAX_PAYLOAD must be 16..={}, got {}",
                crate::limits::READ_BUFFER_MAX / 2,
                self.max_payload
            ));
        }
        Ok(())
    }

    /// Whether the server keeps anything in `data_dir` (then it holds the
    /// directory's lock file for its whole life).
    pub fn uses_data_dir(&self) -> bool {
        self.dump_save || self.dump_load || self.keep_tokens || self.log
    }

    /// Sets what survives a restart: `dump_load`/`dump_save`/`log`.
    /// `load`: whether state left by the previous run is read at all.
    pub fn set_durability(&mut self, durability: Durability, load: bool) {
        self.log = durability == Durability::Log;
        self.dump_save = durability != Durability::Memory;
        self.dump_load = durability != Durability::Memory && load;
    }

    /// The dump file's path.
    /// How long sessions wait for their clients after a failover.
    pub fn cluster_failover_grace(&self) -> Duration {
        self.cluster
            .as_ref()
            .map_or(crate::cluster::FAILOVER_GRACE_DEFAULT, |c| c.failover_grace)
    }

    pub fn dump_path(&self) -> PathBuf {
        self.data_dir.join(crate::dump::FILE_NAME)
    }
}

/// Parses a boolean setting strictly: `1/true/yes/on` or `0/false/no/off`
/// (any case); anything else is an error that names the variable.
pub fn parse_bool(variable: &str, value: &str) -> Result<bool, String> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(format!(
            "{variable}={value:?} is not a boolean: use 1/true/yes/on or 0/false/no/off"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn booleans_are_strict() {
        for yes in ["1", "true", "YES", "On"] {
            assert_eq!(parse_bool("X", yes), Ok(true));
        }
        for no in ["0", "false", "No", "OFF"] {
            assert_eq!(parse_bool("X", no), Ok(false));
        }
        let err = parse_bool("LIVELOCK_SHUTDOWN_SUPPORT", "maybe").unwrap_err();
        assert!(err.contains("LIVELOCK_SHUTDOWN_SUPPORT"), "{err}");
        assert!(parse_bool("X", "").is_err());
    }

    #[test]
    fn non_loopback_needs_a_password() {
        let config = ServerConfig::new("0.0.0.0:7873".parse().unwrap());
        assert!(config.validate(false).unwrap_err().contains("password"));
        assert!(config.validate(true).is_ok());
        let mut with_password = config.clone();
        with_password.password = Some(b"pw".to_vec());
        assert!(with_password.validate(false).is_ok());
        assert!(ServerConfig::new("127.0.0.1:7873".parse().unwrap())
            .validate(false)
            .is_ok());
        assert!(ServerConfig::new("[::1]:7873".parse().unwrap())
            .validate(false)
            .is_ok());
    }
}
