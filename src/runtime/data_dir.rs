//! The server's data directory and what keeps a restart safe there:
//!
//! - `livelock.lock`: an exclusive `flock` held for the whole life of the
//!   process (with its pid inside), so two servers never share a directory;
//!   a successor waits for it, for a bounded time;
//! - the dump is consumed exactly once: right after it is read, it is
//!   renamed to `livelock.dump.consumed` and the directory is fsynced,
//!   before any client is accepted, so a crash restart never loads state
//!   older than what clients were last told;
//! - `livelock.tokens`: the fencing-token high-water mark. Tokens handed out
//!   stay below a ceiling that is on disk (fsynced) before any token past
//!   the previous one is handed out; a start begins at the stored ceiling.
//!   So tokens never repeat after a crash, whatever the wall clock does.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::dump::{self, Dump, DumpError};

/// The lock file's name inside the data directory.
pub const LOCK_FILE: &str = "livelock.lock";
/// The token high-water mark's file name.
pub const TOKENS_FILE: &str = "livelock.tokens";
/// What a dump is renamed to once it has been read.
pub const CONSUMED_SUFFIX: &str = ".consumed";
/// What a dump that could not be read is renamed to (kept for the
/// operator: the next consumed dump does not overwrite it).
pub const REJECTED_SUFFIX: &str = ".rejected";
/// Tokens reserved at a time. A start skips what is left of the previous
/// reservation, so u64 allows 2^64 / 2^40 = 16 million starts; a loop
/// extends the reservation when less than half of it is left, and no loop
/// turn comes near handing out 2^39 tokens.
pub const TOKEN_BLOCK: u64 = 1 << 40;
const TOKENS_MAGIC: [u8; 8] = *b"LLTOKEN1";

/// The held lock on a data directory; released when dropped (or when the
/// process ends, however it ends).
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

/// Calls `attempt` until it succeeds, or fails otherwise than `held` (a
/// predecessor still has the thing), or `wait` has passed: a successor's
/// bounded wait for its predecessor, for the data directory and the port.
pub fn wait_for_predecessor<T>(
    wait: Duration,
    held: io::ErrorKind,
    mut attempt: impl FnMut() -> io::Result<T>,
) -> io::Result<T> {
    let deadline = Instant::now() + wait;
    loop {
        match attempt() {
            Err(e) if e.kind() == held && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            result => return result,
        }
    }
}

/// Takes the data directory's lock, waiting up to `wait` for a predecessor
/// to let go. Creates the directory if needed.
pub fn lock(dir: &Path, wait: Duration) -> io::Result<DirLock> {
    let unusable = |e: io::Error| {
        io::Error::new(
            e.kind(),
            format!("cannot use the data directory {}: {e}", dir.display()),
        )
    };
    fs::create_dir_all(dir).map_err(unusable)?;
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(unusable)?;
    let locked = wait_for_predecessor(wait, io::ErrorKind::WouldBlock, || {
        // SAFETY: flock on a descriptor we own; no memory is involved.
        match unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } {
            0 => Ok(()),
            _ => Err(io::Error::last_os_error()),
        }
    });
    match locked {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => "another process".to_string(),
                pid => format!("pid {pid}"),
            };
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "the data directory {} is in use by another livelock server ({holder} holds \
                     {}); waited {}",
                    dir.display(),
                    path.display(),
                    crate::duration::human(wait)
                ),
            ));
        }
        locked => locked?,
    }
    // Overwrite, then cut: a waiter reading meanwhile never sees it empty.
    let pid = format!("{}\n", std::process::id());
    file.write_all_at(pid.as_bytes(), 0)?;
    file.set_len(pid.len() as u64)?;
    Ok(DirLock { _file: file })
}

/// Renames the dump aside (if there is one), adding `suffix`, and makes
/// that durable, so it is never read twice. Called after it was read (or
/// deliberately not read, or found unreadable).
pub fn consume_dump(dump_path: &Path, suffix: &str) -> io::Result<()> {
    let mut consumed = dump_path.as_os_str().to_owned();
    consumed.push(suffix);
    match fs::rename(dump_path, &consumed) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error),
    }
    sync_dir(parent_dir(dump_path))
}

/// The durable ceiling of fencing tokens (see the module comment).
#[derive(Debug)]
pub struct TokenCeiling {
    /// None: nothing on disk (a server without a data directory); the
    /// ceiling is then u64::MAX and tokens are not kept across restarts.
    path: Option<PathBuf>,
    ceiling: AtomicU64,
    /// Serialises extensions by several loops; after a failed write (disk
    /// full), when to try again (at most once a second, not every turn).
    extending: Mutex<Option<Instant>>,
}

impl TokenCeiling {
    /// No file: tokens are bounded only by u64.
    pub fn in_memory() -> TokenCeiling {
        TokenCeiling {
            path: None,
            ceiling: AtomicU64::new(u64::MAX),
            extending: Mutex::new(None),
        }
    }

    /// Reads the stored ceiling (or, on a directory that has none yet,
    /// `seed()`), takes the greater of it and `floor`, reserves a block
    /// above it and makes that durable. Returns the ceiling and the floor
    /// every shard starts above.
    pub fn reserve(
        dir: &Path,
        seed: impl FnOnce() -> u64,
        floor: u64,
    ) -> io::Result<(TokenCeiling, u64)> {
        let path = dir.join(TOKENS_FILE);
        let stored = match fs::read(&path) {
            Ok(bytes) => decode_mark(&bytes).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{} is damaged; without it fencing tokens could repeat. Remove it only if \
                         the wall clock is right (it is then seeded from the clock)",
                        path.display()
                    ),
                )
            })?,
            Err(error) if error.kind() == io::ErrorKind::NotFound => seed(),
            Err(error) => return Err(error),
        };
        let floor = stored.max(floor);
        let ceiling = floor.checked_add(TOKEN_BLOCK).ok_or_else(|| {
            io::Error::other(format!(
                "fencing tokens are exhausted (the last one handed out may be {floor})"
            ))
        })?;
        write_atomic(&path, &encode_mark(ceiling))?;
        let tokens = TokenCeiling {
            path: Some(path),
            ceiling: AtomicU64::new(ceiling),
            extending: Mutex::new(None),
        };
        Ok((tokens, floor))
    }

    pub fn get(&self) -> u64 {
        self.ceiling.load(Ordering::Acquire)
    }

    /// Called by each loop once per turn with its shard's last token: when
    /// less than half a block is left, moves the ceiling a block above it
    /// (durably, before anyone can use it). Returns the ceiling in force.
    /// A failed write (disk full) is reported and retried at most once a
    /// second; half a block is still left meanwhile.
    pub fn ensure(&self, last_token: u64) -> u64 {
        let ceiling = self.get();
        if ceiling - last_token.min(ceiling) >= TOKEN_BLOCK / 2 {
            return ceiling;
        }
        let Some(path) = &self.path else {
            return ceiling;
        };
        let mut retry_at = self.extending.lock();
        let ceiling = self.get();
        if ceiling - last_token.min(ceiling) >= TOKEN_BLOCK / 2
            || retry_at.is_some_and(|at| Instant::now() < at)
        {
            return ceiling;
        }
        let Some(next) = last_token.checked_add(TOKEN_BLOCK) else {
            return ceiling;
        };
        match write_atomic(path, &encode_mark(next)) {
            Ok(()) => {
                *retry_at = None;
                self.ceiling.store(next, Ordering::Release);
                next
            }
            Err(error) => {
                *retry_at = Some(Instant::now() + Duration::from_secs(1));
                tracing::error!(
                    "cannot extend the fencing-token reservation in {}: {error}",
                    path.display()
                );
                ceiling
            }
        }
    }
}

fn encode_mark(ceiling: u64) -> Vec<u8> {
    let mut out = TOKENS_MAGIC.to_vec();
    out.extend_from_slice(&ceiling.to_le_bytes());
    out.extend_from_slice(&dump::crc64(&out).to_le_bytes());
    out
}

fn decode_mark(bytes: &[u8]) -> Option<u64> {
    if bytes.len() != 24 || bytes[..8] != TOKENS_MAGIC {
        return None;
    }
    let (covered, crc) = bytes.split_at(16);
    if dump::crc64(covered).to_le_bytes() != crc {
        return None;
    }
    Some(u64::from_le_bytes(bytes[8..16].try_into().ok()?))
}

/// Writes atomically: temp file in the same directory, write, fsync, rename
/// over `path`, fsync the directory. If writing or renaming fails, the temp
/// file is removed and `path` is left as it was; if only the directory fsync
/// fails, the new file is in place but may not survive a power loss.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    /// Tells apart temp files of concurrent writers within one process.
    static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

    let file_name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "dump path has no file name"))?;
    let dir = parent_dir(path);
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(file_name);
    temp_name.push(format!(
        ".tmp.{}.{}",
        std::process::id(),
        TEMP_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let temp = dir.join(temp_name);

    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&temp, path)
    })();
    if let Err(error) = written {
        let _ = fs::remove_file(&temp);
        return Err(error);
    }
    sync_dir(dir)
}

/// Renames `from` to `to` and makes the rename durable.
pub fn rename_durably(from: &Path, to: &Path) -> io::Result<()> {
    fs::rename(from, to)?;
    sync_dir(parent_dir(to))
}

/// The directory `path` is in ("." for a bare file name).
pub(crate) fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// Makes the rename durable. Only Unix can open and fsync a directory.
#[cfg(unix)]
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
pub(crate) fn sync_dir(_dir: &Path) -> io::Result<()> {
    Ok(())
}

/// Reads and decodes the dump at `path`; `Ok(None)` if the file does not exist.
pub fn load_dump(path: &Path) -> Result<Option<Dump>, DumpError> {
    match fs::read(path) {
        Ok(bytes) => dump::decode(&bytes).map(Some),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(DumpError::Io(error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("livelock-dd-{test}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn the_mark_round_trips_and_damage_is_detected() {
        assert_eq!(decode_mark(&encode_mark(12345)), Some(12345));
        let mut bytes = encode_mark(12345);
        bytes[9] ^= 1;
        assert_eq!(decode_mark(&bytes), None);
        assert_eq!(decode_mark(&[]), None);
    }

    #[test]
    fn a_start_begins_at_the_stored_ceiling_whatever_the_seed() {
        let dir = temp_dir("ceiling");
        let (tokens, floor) = TokenCeiling::reserve(&dir, || 1000, 0).unwrap();
        assert_eq!(floor, 1000, "first start: seeded");
        assert_eq!(tokens.get(), 1000 + TOKEN_BLOCK);
        // A later start with a clock far behind: the seed is not used.
        let (tokens, floor) = TokenCeiling::reserve(&dir, || 1, 0).unwrap();
        assert_eq!(floor, 1000 + TOKEN_BLOCK);
        assert_eq!(tokens.get(), 1000 + 2 * TOKEN_BLOCK);
        // A dump with a higher last token wins.
        let (_, floor) = TokenCeiling::reserve(&dir, || 1, u64::MAX / 2).unwrap();
        assert_eq!(floor, u64::MAX / 2);
        // Near the end of u64: refused, not wrapped.
        let error = TokenCeiling::reserve(&dir, || 1, u64::MAX - 5).unwrap_err();
        assert!(error.to_string().contains("exhausted"), "{error}");
        fs::write(dir.join(TOKENS_FILE), b"garbage").unwrap();
        let error = TokenCeiling::reserve(&dir, || 1, 0).unwrap_err();
        assert!(error.to_string().contains("damaged"), "{error}");
    }

    #[test]
    fn ensure_extends_durably_when_half_a_block_is_used() {
        let dir = temp_dir("ensure");
        let (tokens, floor) = TokenCeiling::reserve(&dir, || 0, 0).unwrap();
        let ceiling = tokens.get();
        assert_eq!(tokens.ensure(floor + 10), ceiling, "plenty left");
        let late = ceiling - TOKEN_BLOCK / 2 + 1;
        let extended = tokens.ensure(late);
        assert_eq!(extended, late + TOKEN_BLOCK);
        let stored = decode_mark(&fs::read(dir.join(TOKENS_FILE)).unwrap());
        assert_eq!(stored, Some(extended), "on disk before it is used");
        assert_eq!(TokenCeiling::in_memory().ensure(u64::MAX - 1), u64::MAX);
    }

    #[test]
    fn a_second_lock_on_the_directory_waits_then_names_the_holder() {
        let dir = temp_dir("lock");
        let held = lock(&dir, Duration::ZERO).unwrap();
        let error = lock(&dir, Duration::from_millis(50)).unwrap_err();
        let text = error.to_string();
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        drop(held);
        lock(&dir, Duration::ZERO).expect("free again");
    }

    #[test]
    fn a_consumed_dump_is_gone() {
        let dir = temp_dir("consume");
        let path = dir.join(dump::FILE_NAME);
        fs::write(&path, b"x").unwrap();
        consume_dump(&path, CONSUMED_SUFFIX).unwrap();
        assert!(!path.exists());
        assert!(dir.join("livelock.dump.consumed").exists());
        consume_dump(&path, CONSUMED_SUFFIX).expect("nothing to consume is fine");
    }

    #[test]
    fn write_atomic_replaces_and_leaves_no_temp_files() {
        let dir = temp_dir("atomic-write");
        let path = dir.join(dump::FILE_NAME);
        fs::write(&path, b"old contents").unwrap();
        let bytes = dump::encode(&dump::Dump::default());
        write_atomic(&path, &bytes).unwrap();
        assert_eq!(fs::read(&path).unwrap(), bytes);
        write_atomic(&path, &dump::encode(&dump::Dump::default())).unwrap();
        assert_eq!(load_dump(&path).unwrap(), Some(dump::Dump::default()));
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(dump::FILE_NAME)]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn write_atomic_failure_leaves_the_old_file() {
        let dir = temp_dir("atomic-fail");
        // Renaming a file over a non-empty directory fails.
        let path = dir.join("occupied");
        fs::create_dir(&path).unwrap();
        fs::write(path.join("inside"), b"x").unwrap();
        assert!(write_atomic(&path, b"new").is_err());
        let mut names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, vec![std::ffi::OsString::from("occupied")]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn load_of_a_missing_file_is_none() {
        let dir = temp_dir("dump-missing");
        assert!(load_dump(&dir.join(dump::FILE_NAME)).unwrap().is_none());
        fs::write(dir.join(dump::FILE_NAME), b"\x80\x04\x95junk").unwrap();
        assert!(matches!(
            load_dump(&dir.join(dump::FILE_NAME)),
            Err(dump::DumpError::NotADump)
        ));
        fs::remove_dir_all(&dir).unwrap();
    }
}
