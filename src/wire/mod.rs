//! The wire formats: the native binary protocol (mirrored in
//! `include/livelock.h`) and the LiveLock protocol (RESP and inline
//! commands, FIND globs). Bytes to requests and back, nothing else.
pub mod glob;
pub mod pool;
pub mod protocol;
pub mod resp;
