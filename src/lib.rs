//! livelock: a lock server whose locks live exactly as long as their holder's
//! session. See docs/ARCHITECTURE.md for how the pieces fit.
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
//! - `limits`, `duration`, `address`: shared by all.
pub mod address;
pub mod client;
pub mod duration;
pub mod limits;
pub mod runtime;
pub mod state;
pub mod wire;

// Every module also under its short name (`livelock::lock_table`...).
pub use runtime::{config, connection, data_dir, event_loop, metrics, raft_log, server};
pub use state::{dump, journal, lock_table, session, snapshot};
pub use wire::{glob, protocol, resp};
