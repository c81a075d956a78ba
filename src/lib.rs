//! livelock: a lock server whose locks live exactly as long as their holder's
//! session. See docs/ARCHITECTURE.md for how the pieces fit.
//!
//! As a client library (`default-features = false, features = ["client"]`
//! builds only this part):
//!
//! ```no_run
//! use livelock::client::{AcquireOptions, Client, ClientOptions};
//! use std::time::Duration;
//!
//! # fn main() -> livelock::client::Result<()> {
//! let client = Client::connect("127.0.0.1:7873", &ClientOptions::default())?;
//! let guard = client.acquire("report-42")?; // waits, FIFO, server-side
//! println!("fencing token {}", guard.token()); // pass it to what you write
//! drop(guard); // releases this hold (by its token)
//! let options = AcquireOptions {
//!     wait: Some(Duration::from_secs(5)),
//!     lease: Some(Duration::from_secs(30)),
//!     ..AcquireOptions::default()
//! };
//! if let Ok(guard) = client.acquire_with("nightly", options) {
//!     guard.extend(Duration::from_secs(30))?;
//! }
//! # Ok(())
//! # }
//! ```
//!
//! The folders are the layers (imports go down this list, never up; the
//! exceptions are named in docs/ARCHITECTURE.md, "Modules"):
//! - `runtime`: the server's threads and I/O — event loops, connections,
//!   the log, the data directory, metrics, start-up and shutdown;
//! - `client`: the blocking Rust client (no runtime);
//! - `wire`: the native protocol and LiveLock's RESP, bytes to requests and
//!   back;
//! - `state`: the pure core — the lock table, sessions, the log's records
//!   and their replay, the dump's format, export and restore. No socket, no
//!   clock, no thread, no file;
//! - `limits`, `duration`, `address`, `mode`, `order`: shared by all.
//!
//! Features: `server` (the default) is all of it; `client` alone (with
//! `default-features = false`) is the blocking client, the wire format and
//! the shared modules, without the server's dependencies; `tokio` adds the
//! async client (`client_async`).
pub mod address;
pub mod client;
#[cfg(feature = "tokio")]
pub mod client_async;
pub mod duration;
pub mod limits;
pub mod mode;
pub mod order;
#[cfg(feature = "server")]
pub mod runtime;
#[cfg(feature = "server")]
pub mod state;
pub mod wire;

// Every module also under its short name (`livelock::lock_table`...).
#[cfg(feature = "server")]
pub use runtime::{
    cluster, config, connection, data_dir, event_loop, metrics, raft_log, server, tls,
};
#[cfg(feature = "server")]
pub use state::{deadlock, dump, journal, lock_table, multi, session, snapshot, usage};
pub use wire::{glob, pool, protocol, resp};
