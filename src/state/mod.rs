//! The pure core: the state machine (each loop's lock table and the
//! sessions), its commands and effects, the log's records and their replay,
//! and the state file's format with its export and restore. Nothing here
//! touches a socket, a clock, a thread or a file: time is passed in.
pub mod deadlock;
pub mod dump;
pub mod journal;
pub mod lock_table;
pub mod multi;
pub mod session;
pub mod snapshot;
pub mod usage;
