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
//! When a thread cannot be started (EAGAIN: the process or user hit its
//! thread limit), that child falls back to one shared overflow thread that
//! polls its children with `waitpid(pid, WNOHANG)` on a short backoff, so
//! the spawn does not fail; the overflow thread ends when it has nothing
//! left to watch. Only if that thread cannot start either does
//! registration fail.
//!
//! `close()` stops delivering callbacks at once. A waiter whose child is still
//! alive cannot be interrupted; it keeps waiting so the child is still reaped
//! (no zombie) and then ends without calling anything.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::registry::{Added, Registry, Target};
use super::status::{reap_blocking, rpid, try_reap};
use super::{ChildCallback, ChildWatcher, Pid, ReturnCode};
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
        let started = spawn_waiter(
            pid,
            Box::new(move |rc| {
                if !inner.closed.load(Ordering::SeqCst) {
                    inner.registry.exited(pid, rc, false);
                }
                inner.waiters.fetch_sub(1, Ordering::SeqCst);
            }),
        );
        if let Err(e) = started {
            self.inner.waiters.fetch_sub(1, Ordering::SeqCst);
            self.inner.registry.remove(pid);
            return Err(e);
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

/// What a waiter calls with the child's returncode once it is reaped.
pub(super) type OnExit = Box<dyn FnOnce(ReturnCode) + Send + 'static>;

/// Waits for `pid` on a thread of its own (blocking `waitpid(pid)`), then
/// calls `on_exit(rc)` on that thread. When no thread can be started, the
/// child goes to the shared overflow poller instead; an error only if that
/// cannot start either. Used by `ThreadedChildWatcher` and as the fallback
/// of the pidfd watcher.
pub(super) fn spawn_waiter(pid: Pid, on_exit: OnExit) -> io::Result<()> {
    // The closure is lost with a failed spawn; keep it where we can get it
    // back to hand it to the overflow poller.
    let slot = Arc::new(Mutex::new(Some(on_exit)));
    let s2 = Arc::clone(&slot);
    let spawned = std::thread::Builder::new()
        .name(format!("waitpid-{pid}"))
        .stack_size(WAITER_STACK)
        .spawn(move || {
            let rc = reap_blocking(pid);
            let f = s2.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(f) = f {
                f(rc);
            }
        });
    match spawned {
        Ok(_) => Ok(()),
        Err(e) => {
            let f = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
            let Some(f) = f else {
                // The thread started after all and owns the callback.
                return Ok(());
            };
            tracing::warn!(
                "cannot start a waiter thread for pid {pid} ({e}); watching it from the \
                 overflow poller"
            );
            overflow_watch(pid, f).map_err(|e2| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "cannot start a waiter thread for pid {pid} ({e}) nor the overflow \
                         poller ({e2}); lower the number of live children or raise the \
                         thread limit (ulimit -u)"
                    ),
                )
            })
        }
    }
}

/// Children whose waiter thread could not start, and whether the poller
/// thread that watches them runs.
static OVERFLOW: Mutex<(Vec<(Pid, OnExit)>, bool)> = Mutex::new((Vec::new(), false));

/// Hands `pid` to the overflow poller, starting it if needed.
pub(super) fn overflow_watch(pid: Pid, on_exit: OnExit) -> io::Result<()> {
    let mut ov = OVERFLOW.lock().unwrap_or_else(|p| p.into_inner());
    ov.0.push((pid, on_exit));
    if ov.1 {
        return Ok(());
    }
    match std::thread::Builder::new()
        .name("waitpid-overflow".into())
        .stack_size(WAITER_STACK)
        .spawn(overflow_poller)
    {
        Ok(_) => {
            ov.1 = true;
            Ok(())
        }
        Err(e) => {
            ov.0.pop();
            Err(e)
        }
    }
}

/// Polls the overflow children with `waitpid(pid, WNOHANG)`, backing off
/// from 1 ms to 50 ms while nothing exits; ends when none is left.
fn overflow_poller() {
    let mut pause = Duration::from_millis(1);
    loop {
        std::thread::sleep(pause);
        let mut done: Vec<(OnExit, ReturnCode)> = Vec::new();
        {
            let mut ov = OVERFLOW.lock().unwrap_or_else(|p| p.into_inner());
            let list = std::mem::take(&mut ov.0);
            for (pid, f) in list {
                match try_reap(pid) {
                    Ok(Some(rc)) => done.push((f, rc)),
                    Ok(None) => ov.0.push((pid, f)),
                    Err(e) => {
                        tracing::warn!("waitpid({pid}) failed: {e}");
                        ov.0.push((pid, f));
                    }
                }
            }
            if ov.0.is_empty() && done.is_empty() {
                ov.1 = false;
                return;
            }
        }
        pause = if done.is_empty() {
            (pause * 2).min(Duration::from_millis(50))
        } else {
            Duration::from_millis(1)
        };
        for (f, rc) in done {
            f(rc);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    #[allow(clippy::zombie_processes)] // reaped by the overflow poller under test
    fn overflow_poller_reaps_and_ends() {
        let (tx, rx) = mpsc::channel();
        for code in [0, 3, 7] {
            let child = std::process::Command::new("/bin/sh")
                .args(["-c", &format!("exit {code}")])
                .spawn()
                .unwrap();
            let pid = child.id() as Pid;
            let tx = tx.clone();
            overflow_watch(pid, Box::new(move |rc| tx.send((code, rc)).unwrap())).unwrap();
        }
        for _ in 0..3 {
            let (code, rc) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
            assert_eq!(code, rc);
        }
        // Once empty, the poller thread ends.
        for _ in 0..500 {
            if !OVERFLOW.lock().unwrap().1 {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        panic!("the overflow poller did not end");
    }
}
