//! A timerfd registered in the mio loop, for deadlines finer than a
//! millisecond (hold times, retry back-off, the open-loop send schedule).
//! `epoll_wait` only takes whole milliseconds, which would stretch a 50 µs
//! hold to 1 ms whenever the generator is otherwise idle.
//!
//! The timer is one-shot and re-armed only when the earliest deadline moves,
//! so a busy loop makes at most one `timerfd_settime` per turn. Firing early
//! or spuriously is harmless: the loop just checks its queues again.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Instant;

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};

pub struct TimerFd {
    fd: OwnedFd,
    /// The deadline the kernel timer is set for, if any.
    armed_for: Option<Instant>,
}

impl TimerFd {
    pub fn new(registry: &Registry, token: Token) -> io::Result<TimerFd> {
        // SAFETY: plain syscall; the returned fd is checked and then owned.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        registry.register(&mut SourceFd(&fd.as_raw_fd()), token, Interest::READABLE)?;
        Ok(TimerFd {
            fd,
            armed_for: None,
        })
    }

    /// Makes sure the timer fires no later than `deadline` (> `now`).
    pub fn arm(&mut self, deadline: Instant, now: Instant) -> io::Result<()> {
        if self.armed_for.is_some_and(|at| at <= deadline) {
            return Ok(());
        }
        // A zero it_value would disarm the timer: wait at least 1 ns.
        let wait = deadline
            .saturating_duration_since(now)
            .max(std::time::Duration::from_nanos(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: wait.as_secs() as libc::time_t,
                tv_nsec: libc::c_long::from(wait.subsec_nanos() as i32),
            },
        };
        // SAFETY: valid fd and a fully initialised itimerspec.
        let rc =
            unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        self.armed_for = Some(deadline);
        Ok(())
    }

    /// Called when the timer's token is readable: consumes the expiry so the
    /// next one is reported again.
    pub fn fired(&mut self) {
        let mut expirations = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a local buffer; EAGAIN (already
        // consumed) is fine to ignore.
        let _ = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                expirations.as_mut_ptr().cast(),
                expirations.len(),
            )
        };
        self.armed_for = None;
    }
}
