//! `ThreadedChildWatcher`: one small waiter thread per child.
//!
//! How it learns of an exit: a thread per child blocks in `waitpid(pid)`.
//! Cost: O(1) per exit in user space, but a thread (64 KiB stack) per live
//! child, and every blocked `waitpid` sits on the parent's child-exit wait
//! queue, so each exit makes the kernel scan all of them (measured ~130 µs
//! per exit with 10,000 pending). It needs no loop, no signal and no
//! descriptor, reaps only its own children, and works everywhere: the
//! fallback when neither io_uring WAITID nor pidfds are available.
//!
//! `close()` stops delivering callbacks at once. A waiter whose child is still
//! alive cannot be interrupted; it keeps waiting so the child is still reaped
//! (no zombie) and then ends without calling anything.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::registry::{Added, Registry, Target};
use super::status::{reap_blocking, rpid};
use super::{ChildCallback, ChildWatcher, Pid};
use crate::event_loop::EventLoop;

/// Stack size of a waiter thread: it only calls `waitpid` and delivers.
const WAITER_STACK: usize = 64 * 1024;

#[derive(Debug, Default)]
struct Inner {
    registry: Registry,
    closed: AtomicBool,
    waiters: AtomicUsize,
}

/// Watches each child with a thread blocked in `waitpid(pid)`.
#[derive(Debug, Clone)]
pub struct ThreadedChildWatcher {
    inner: Arc<Inner>,
}

impl ThreadedChildWatcher {
    /// A new, active watcher.
    pub fn new() -> io::Result<ThreadedChildWatcher> {
        Ok(ThreadedChildWatcher {
            inner: Arc::new(Inner::default()),
        })
    }

    /// Number of waiter threads alive now.
    pub fn waiter_threads(&self) -> usize {
        self.inner.waiters.load(Ordering::SeqCst)
    }
}

impl ChildWatcher for ThreadedChildWatcher {
    fn add_child_handler(&self, pid: Pid, callback: ChildCallback) -> io::Result<()> {
        rpid(pid)?;
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(io::Error::other(
                "the ThreadedChildWatcher is closed; set a new child watcher",
            ));
        }
        if self.inner.registry.add(pid, callback, Target::current()) != Added::New {
            return Ok(());
        }
        let inner = Arc::clone(&self.inner);
        inner.waiters.fetch_add(1, Ordering::SeqCst);
        let spawned = std::thread::Builder::new()
            .name(format!("waitpid-{pid}"))
            .stack_size(WAITER_STACK)
            .spawn(move || {
                let rc = reap_blocking(pid);
                if !inner.closed.load(Ordering::SeqCst) {
                    inner.registry.exited(pid, rc, false);
                }
                inner.waiters.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            self.inner.waiters.fetch_sub(1, Ordering::SeqCst);
            self.inner.registry.remove(pid);
            return Err(io::Error::new(
                e.kind(),
                format!("cannot start a waiter thread for pid {pid}: {e}"),
            ));
        }
        Ok(())
    }

    fn remove_child_handler(&self, pid: Pid) -> bool {
        self.inner.registry.remove(pid)
    }

    fn attach_loop(&self, _lp: Option<&EventLoop>) {}

    fn is_active(&self) -> bool {
        !self.inner.closed.load(Ordering::SeqCst)
    }

    fn close(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        self.inner.registry.clear();
    }
}
