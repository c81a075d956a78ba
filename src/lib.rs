//! livelock: a lock server whose locks live exactly as long as their holder's
//! session. See docs/ARCHITECTURE.md for how the pieces fit.
pub mod client;
pub mod config;
pub mod connection;
pub mod data_dir;
pub mod dump;
pub mod duration;
pub mod event_loop;
pub mod glob;
pub mod journal;
pub mod limits;
pub mod lock_table;
pub mod metrics;
pub mod protocol;
pub mod raft_log;
pub mod resp;
pub mod server;
pub mod session;
pub mod snapshot;
