//! Cross-thread wake-ups of a sleeping loop.
//!
//! A loop sleeps in its backend (`io_uring_enter` or `epoll_wait`). Anything
//! that must wake it from elsewhere — `call_soon_threadsafe`, a task woken
//! on another thread, a signal handler — writes to one eventfd that the
//! backend watches. A `pending` flag collapses a burst of wake-ups into one
//! write, so 80,000 cross-thread calls cost a handful of syscalls, not 80,000.
//!
//! `notify` is async-signal-safe: atomic operations and one `write(2)`.
//!
//! # Closing
//!
//! The loop's `close()` closes the eventfd at once ([`Notifier::close`]),
//! although other threads (`LoopHandle`s, wakers) and signal handlers may
//! still call `notify` on it. A descriptor closed while another thread is
//! about to write to it is a bug: its number may be reused by then, and the
//! write would land in someone else's file. So the number sits in an atomic
//! (`-1` once closed) and every `notify` counts itself in `users` around
//! its load and write; `close` swaps the number out, waits until `users`
//! is back to zero (a `write` to an eventfd never blocks: the wait is a few
//! instructions, or one system call, long) and only then closes the fd. A
//! `notify` that loads `-1` does nothing: the loop is closed and nobody
//! waits for a wake-up. No lock is involved, so `notify` stays
//! async-signal-safe: a signal handler interrupting `close` on the loop's
//! thread runs to its end before `close` goes on.
//!
//! On Windows there is no eventfd: the wake-up is a completion packet posted
//! to the proactor's I/O completion port (`PostQueuedCompletionStatus`), or
//! `polling`'s own notification on the selector, with the same `pending`
//! flag collapsing bursts. The backend installs its target right after it is
//! created ([`Notifier::set_target`]).

use std::io;
#[cfg(unix)]
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
#[cfg(unix)]
use std::sync::atomic::{AtomicI32, AtomicUsize};

#[cfg(unix)]
use rustix::event::{EventfdFlags, eventfd};

/// An eventfd plus the flag that says a wake-up is already on its way.
#[cfg(unix)]
#[derive(Debug)]
pub(crate) struct Notifier {
    /// The eventfd, owned; `-1` once closed.
    fd: AtomicI32,
    /// `notify` calls between their load of `fd` and the end of their write.
    users: AtomicUsize,
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
            fd: AtomicI32::new(fd.into_raw_fd()),
            users: AtomicUsize::new(0),
            pending: AtomicBool::new(false),
        })
    }

    /// Runs `f` on the eventfd unless it is closed; `close` waits for it.
    /// Async-signal-safe (atomics only, around `f`).
    fn with_fd(&self, f: impl FnOnce(BorrowedFd<'_>)) {
        self.users.fetch_add(1, Ordering::SeqCst);
        let raw = self.fd.load(Ordering::SeqCst);
        if raw >= 0 {
            // SAFETY: `close` swaps the number out before it waits for
            // `users` to drop to zero, and closes the fd only then; we
            // counted ourselves in before loading it, so it stays open
            // until we count ourselves out below.
            f(unsafe { BorrowedFd::borrow_raw(raw) });
        }
        self.users.fetch_sub(1, Ordering::SeqCst);
    }

    /// Wakes the loop if no wake-up is pending. Async-signal-safe. Does
    /// nothing once the notifier is closed (so is its loop).
    pub(crate) fn notify(&self) {
        if !self.pending.swap(true, Ordering::SeqCst) {
            // A full counter (EAGAIN) means the loop has a wake-up anyway.
            self.with_fd(|fd| {
                let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
            });
        }
    }

    /// Called by the backend when it saw the eventfd readable: empties the
    /// counter and re-opens the flag. Everything queued before this call is
    /// visible to the loop's next drain of its remote queue; anything queued
    /// after it writes the eventfd again.
    pub(crate) fn reset(&self) {
        self.with_fd(|fd| {
            let mut buf = [0u8; 8];
            let _ = rustix::io::read(fd, &mut buf);
        });
        self.pending.store(false, Ordering::SeqCst);
    }

    /// Closes the eventfd now (the loop is closing, and its backend no
    /// longer watches it), safely against `notify` on other threads and in
    /// signal handlers (see the module's docs). Idempotent.
    pub(crate) fn close(&self) {
        let raw = self.fd.swap(-1, Ordering::SeqCst);
        if raw < 0 {
            return;
        }
        // A `notify` that loaded the number before the swap is between its
        // load and the end of its write(2) to a non-blocking eventfd.
        while self.users.load(Ordering::SeqCst) != 0 {
            std::thread::yield_now();
        }
        // SAFETY: we own the fd (from `new`), nobody can load it any more
        // and nobody still uses it.
        drop(unsafe { OwnedFd::from_raw_fd(raw) });
    }
}

#[cfg(unix)]
impl Drop for Notifier {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(unix)]
impl AsRawFd for Notifier {
    /// The eventfd's number while it is open (`-1` once closed); the loop's
    /// backend watches it and is closed before it.
    fn as_raw_fd(&self) -> RawFd {
        self.fd.load(Ordering::SeqCst)
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
///
/// The target is behind a mutex (Windows has no signal handlers to be
/// async-signal-safe for) so that [`close`](Notifier::close) can drop it at
/// once: it owns a reference to the loop's completion port or poller, which
/// is then closed without waiting for the last `LoopHandle`.
#[cfg(windows)]
pub(crate) struct Notifier {
    target: std::sync::Mutex<Option<WakeTarget>>,
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
            target: std::sync::Mutex::new(None),
            pending: AtomicBool::new(false),
        })
    }

    fn target(&self) -> std::sync::MutexGuard<'_, Option<WakeTarget>> {
        // Nothing can be left half-done by a panic under this lock.
        self.target.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Installs the backend's wake-up target (once, when the loop is built).
    pub(crate) fn set_target(&self, target: WakeTarget) {
        let mut slot = self.target();
        if slot.is_some() {
            tracing::error!("a loop's wake-up target was set twice; keeping the first");
            return;
        }
        *slot = Some(target);
    }

    /// Drops the wake-up target (the loop is closing): later `notify` calls
    /// do nothing, and the port or poller is closed once its backend lets
    /// it go too. Idempotent.
    pub(crate) fn close(&self) {
        let target = self.target().take();
        drop(target);
    }

    /// Wakes the loop if no wake-up is pending. Does nothing once closed.
    pub(crate) fn notify(&self) {
        if self.pending.swap(true, Ordering::SeqCst) {
            return;
        }
        let sent = match &*self.target() {
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

#[cfg(all(test, unix))]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use rustix::event::{EventfdFlags, eventfd};

    use super::Notifier;

    /// Closing while other threads keep notifying never lets a write land in
    /// a descriptor that reused the number.
    #[test]
    fn close_while_other_threads_notify_never_writes_to_a_reused_fd() {
        for _ in 0..20 {
            let n = Arc::new(Notifier::new().unwrap());
            let stop = Arc::new(AtomicBool::new(false));
            let threads: Vec<_> = (0..3)
                .map(|_| {
                    let (n, stop) = (Arc::clone(&n), Arc::clone(&stop));
                    std::thread::spawn(move || {
                        while !stop.load(Ordering::Relaxed) {
                            n.pending.store(false, Ordering::SeqCst);
                            n.notify();
                        }
                    })
                })
                .collect();
            std::thread::sleep(std::time::Duration::from_millis(2));
            let old = std::os::fd::AsRawFd::as_raw_fd(&*n);
            n.close();
            assert_eq!(std::os::fd::AsRawFd::as_raw_fd(&*n), -1);
            // Likely the same number as the closed one.
            let fresh = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).unwrap();
            let reused = std::os::fd::AsRawFd::as_raw_fd(&fresh) == old;
            std::thread::sleep(std::time::Duration::from_millis(2));
            stop.store(true, Ordering::Relaxed);
            for t in threads {
                t.join().unwrap();
            }
            let mut buf = [0u8; 8];
            let got = rustix::io::read(&fresh, &mut buf);
            assert!(
                got.is_err(),
                "a closed notifier wrote to a new eventfd (number reused: {reused})"
            );
            n.close();
            n.reset();
        }
    }
}
