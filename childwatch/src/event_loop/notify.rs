//! Cross-thread wake-ups of a sleeping loop.
//!
//! A loop sleeps in its backend (`io_uring_enter` or `epoll_wait`). Anything
//! that must wake it from elsewhere — `call_soon_threadsafe`, a task woken
//! on another thread, a signal handler — writes to one eventfd that the
//! backend watches. A `pending` flag collapses a burst of wake-ups into one
//! write, so 80,000 cross-thread calls cost a handful of syscalls, not 80,000.
//!
//! `notify` is async-signal-safe: one atomic swap and one `write(2)`.
//!
//! On Windows there is no eventfd: the wake-up is a completion packet posted
//! to the proactor's I/O completion port (`PostQueuedCompletionStatus`), or
//! `polling`'s own notification on the selector, with the same `pending`
//! flag collapsing bursts. The backend installs its target right after it is
//! created ([`Notifier::set_target`]).

use std::io;
#[cfg(unix)]
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

#[cfg(unix)]
use rustix::event::{EventfdFlags, eventfd};

/// An eventfd plus the flag that says a wake-up is already on its way.
#[cfg(unix)]
#[derive(Debug)]
pub(crate) struct Notifier {
    fd: OwnedFd,
    pending: AtomicBool,
}

#[cfg(unix)]
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

#[cfg(unix)]
impl AsFd for Notifier {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(unix)]
impl AsRawFd for Notifier {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// What a Windows [`Notifier`] pokes to wake its loop.
#[cfg(windows)]
pub(crate) enum WakeTarget {
    /// The proactor's completion port: a packet with [`super::iocp::WAKE_KEY`].
    Port(std::sync::Arc<super::iocp::Port>),
    /// The selector's poller (`polling` posts to its own port).
    Poller(std::sync::Arc<polling::Poller>),
}

/// The flag that says a wake-up is on its way, and where to send one.
#[cfg(windows)]
pub(crate) struct Notifier {
    target: std::sync::OnceLock<WakeTarget>,
    pending: AtomicBool,
}

#[cfg(windows)]
impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("pending", &self.pending.load(Ordering::Relaxed))
            .finish()
    }
}

#[cfg(windows)]
impl Notifier {
    pub(crate) fn new() -> io::Result<Notifier> {
        Ok(Notifier {
            target: std::sync::OnceLock::new(),
            pending: AtomicBool::new(false),
        })
    }

    /// Installs the backend's wake-up target (once, when the loop is built).
    pub(crate) fn set_target(&self, target: WakeTarget) {
        if self.target.set(target).is_err() {
            tracing::error!("a loop's wake-up target was set twice; keeping the first");
        }
    }

    /// Wakes the loop if no wake-up is pending.
    pub(crate) fn notify(&self) {
        if self.pending.swap(true, Ordering::SeqCst) {
            return;
        }
        let sent = match self.target.get() {
            Some(WakeTarget::Port(port)) => port.post(0, super::iocp::WAKE_KEY, 0),
            Some(WakeTarget::Poller(poller)) => poller.notify(),
            None => Ok(()),
        };
        if let Err(e) = sent {
            // Nothing is on its way: let the next notify try again.
            self.pending.store(false, Ordering::SeqCst);
            tracing::error!("cannot wake the event loop: {e}");
        }
    }

    /// Called by the backend after it woke up: re-opens the flag. Everything
    /// queued before this call is visible to the loop's next drain of its
    /// remote queue; anything queued after it posts a new wake-up.
    pub(crate) fn reset(&self) {
        self.pending.store(false, Ordering::SeqCst);
    }
}
