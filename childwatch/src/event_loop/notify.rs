//! Cross-thread wake-ups of a sleeping loop.
//!
//! A loop sleeps in its backend (`io_uring_enter` or `epoll_wait`). Anything
//! that must wake it from elsewhere — `call_soon_threadsafe`, a task woken
//! on another thread, a signal handler — writes to one eventfd that the
//! backend watches. A `pending` flag collapses a burst of wake-ups into one
//! write, so 80,000 cross-thread calls cost a handful of syscalls, not 80,000.
//!
//! `notify` is async-signal-safe: one atomic swap and one `write(2)`.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::event::{EventfdFlags, eventfd};

/// An eventfd plus the flag that says a wake-up is already on its way.
#[derive(Debug)]
pub(crate) struct Notifier {
    fd: OwnedFd,
    pending: AtomicBool,
}

impl Notifier {
    pub(crate) fn new() -> io::Result<Notifier> {
        let fd = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!("cannot create the event loop's wake-up eventfd: {e}"),
            )
        })?;
        Ok(Notifier {
            fd,
            pending: AtomicBool::new(false),
        })
    }

    /// Wakes the loop if no wake-up is pending. Async-signal-safe.
    pub(crate) fn notify(&self) {
        if !self.pending.swap(true, Ordering::SeqCst) {
            // A full counter (EAGAIN) means the loop has a wake-up anyway.
            let _ = rustix::io::write(&self.fd, &1u64.to_ne_bytes());
        }
    }

    /// Called by the backend when it saw the eventfd readable: empties the
    /// counter and re-opens the flag. Everything queued before this call is
    /// visible to the loop's next drain of its remote queue; anything queued
    /// after it writes the eventfd again.
    pub(crate) fn reset(&self) {
        let mut buf = [0u8; 8];
        let _ = rustix::io::read(&self.fd, &mut buf);
        self.pending.store(false, Ordering::SeqCst);
    }
}

impl AsFd for Notifier {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Notifier {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
