//! The server at run time: settings, the event loops with their
//! connections, the durable log and its snapshots, the data directory,
//! metrics, start-up and shutdown. All I/O and all threads live here.
pub mod cluster;
pub mod config;
pub mod connection;
pub mod data_dir;
pub mod event_loop;
pub mod metrics;
pub mod raft_log;
pub mod server;
pub mod tls;
