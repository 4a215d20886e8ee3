//! `ThreadedChildWatcher`: one small waiter thread per child.
//!
//! How it learns of an exit: a thread per child blocks in `waitid(pid,
//! WEXITED | WNOWAIT)`, which reaps nothing; the thread then reaps the child
//! through its gate ([`ChildHandle::try_reap`]), so the status is recorded in
//! the same step that `Process::send_signal` respects. Cost: O(1) per exit in
//! user space, but a thread (64 KiB stack) per live child, and every blocked
//! `waitid` sits on the parent's child-exit wait queue, so each exit makes
//! the kernel check all of them (O(pending) in the kernel). It needs no
//! loop, no signal and no descriptor, reaps only its own children, and works
//! everywhere: the fallback when neither io_uring WAITID nor pidfds work.
//!
//! The fallback chain when a thread cannot be started (`EAGAIN`: the process
//! or user hit its thread limit): the child goes to one shared overflow
//! thread that polls its children on a back-off; if that cannot start
//! either, the same polling runs as timers of the loop running at
//! registration, and the list is also checked by every waiter thread
//! before it ends and at every registration, with an error logged.
//! A registration never fails for want of a thread and no child is dropped.
//! A panicking callback (run inline when no loop was running) is caught and
//! logged; the thread goes on.
//!
//! `close()` stops delivering callbacks at once. A waiter whose child is still
//! alive cannot be interrupted; it keeps waiting so the child is still reaped
//! (no zombie) and then ends without calling anything.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::child::{ChildHandle, Reaped};
use super::registry::{Added, Registry, Target};
use super::{ChildCallback, ChildWatcher, Pid, ReturnCode};
use crate::event_loop::{EventLoop, get_running_loop};

/// Stack size of a waiter thread: it only calls `waitid` and delivers.
const WAITER_STACK: usize = 64 * 1024;

#[derive(Debug, Default)]
struct Inner {
    registry: Registry,
    closed: AtomicBool,
    waiters: AtomicUsize,
}

/// Watches each child with a thread blocked in `waitid(pid, WNOWAIT)`,
/// which then reaps it through the child's gate.
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

    fn register(
        &self,
        pid: Pid,
        child: Option<&ChildHandle>,
        callback: ChildCallback,
    ) -> io::Result<()> {
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(io::Error::other(
                "the ThreadedChildWatcher is closed; set a new child watcher",
            ));
        }
        let (added, child) =
            self.inner
                .registry
                .add_child(pid, child, callback, Target::current())?;
        if added != Added::New {
            return Ok(());
        }
        let inner = Arc::clone(&self.inner);
        inner.waiters.fetch_add(1, Ordering::SeqCst);
        let on_exit: OnExit = Box::new(move |c: &ChildHandle, rc| {
            if !inner.closed.load(Ordering::SeqCst) {
                inner.registry.deliver_to(c, rc);
            }
            inner.waiters.fetch_sub(1, Ordering::SeqCst);
        });
        spawn_waiter(child, on_exit);
        // Children whose waiter could not start are also checked from here.
        sweep_overflow();
        Ok(())
    }
}

impl ChildWatcher for ThreadedChildWatcher {
    fn add_child_handler(&self, pid: Pid, callback: ChildCallback) -> io::Result<()> {
        self.register(pid, None, callback)
    }

    fn add_child(&self, child: &ChildHandle, callback: ChildCallback) -> io::Result<()> {
        self.register(child.pid(), Some(child), callback)
    }

    fn remove_child_handler(&self, pid: Pid) -> bool {
        self.inner.registry.remove(pid)
    }

    fn attach_loop(&self, lp: Option<&EventLoop>) {
        adopt_overflow(lp);
    }

    fn is_active(&self) -> bool {
        !self.inner.closed.load(Ordering::SeqCst)
    }

    fn close(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        self.inner.registry.clear();
    }
}

/// What a waiter calls once the child is reaped through its gate, with the
/// child and its returncode. It runs on the waiter's (or the overflow
/// poller's) thread; a panic in it is caught there.
pub(super) type OnExit = Box<dyn FnOnce(&ChildHandle, ReturnCode) + Send + 'static>;

/// Runs `on_exit`, catching a panic (a user callback run inline when no
/// loop was running) so the thread that calls it keeps working.
fn call(on_exit: OnExit, child: &ChildHandle, rc: ReturnCode) {
    let pid = child.pid();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| on_exit(child, rc)));
    if r.is_err() {
        tracing::error!("the exit callback of pid {pid} panicked; the watcher goes on");
    }
}

/// Waits for `child` on a thread of its own (blocking `waitid(WNOWAIT)`,
/// then the reap under the child's gate), then calls `on_exit` on that
/// thread. When no thread can be started (`EAGAIN`), the child goes to the
/// shared overflow poller instead: see [`overflow_watch`]. Used by
/// `ThreadedChildWatcher` and as the fallback of the pidfd and Uring
/// watchers: the one fallback chain, waiter thread → overflow poller.
pub(super) fn spawn_waiter(child: ChildHandle, on_exit: OnExit) {
    // The closure is lost with a failed spawn; keep it where we can get it
    // back to hand it to the overflow poller.
    let slot = Arc::new(Mutex::new(Some(on_exit)));
    let s2 = Arc::clone(&slot);
    let c2 = child.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("waitpid-{}", child.pid()))
        .stack_size(WAITER_STACK)
        .spawn(move || {
            let rc = match c2.wait_blocking() {
                Ok(Reaped::Now(rc) | Reaped::Before(rc)) => Some(rc),
                Ok(Reaped::Running) => None,
                Err(e) => {
                    tracing::warn!("{e}; the overflow poller takes over");
                    None
                }
            };
            let f = s2.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(f) = f {
                match rc {
                    Some(rc) => call(f, &c2, rc),
                    None => overflow_watch(c2, f),
                }
            }
            // Before this thread ends, it checks the children whose own
            // waiter could not start.
            sweep_overflow();
        });
    if let Err(e) = spawned {
        let f = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(f) = f {
            tracing::warn!(
                "cannot start a waiter thread for pid {} ({e}); watching it from the overflow \
                 poller",
                child.pid()
            );
            overflow_watch(child, f);
        }
    }
}

/// Children whose waiter thread could not start, and whether the poller
/// thread that watches them runs.
static OVERFLOW: Mutex<(Vec<(ChildHandle, OnExit)>, bool)> = Mutex::new((Vec::new(), false));

/// Hands `child` to the overflow poller, starting it if needed. If even
/// that thread cannot start (the process is out of threads), the child
/// stays on the overflow list, which every waiter thread checks before it
/// ends and every registration with a `ThreadedChildWatcher` checks too, so
/// its status still arrives as soon as any of those runs; an error is
/// logged. It is never dropped.
pub(super) fn overflow_watch(child: ChildHandle, on_exit: OnExit) {
    let mut ov = OVERFLOW.lock().unwrap_or_else(|p| p.into_inner());
    ov.0.push((child, on_exit));
    if ov.1 {
        return;
    }
    match std::thread::Builder::new()
        .name("waitpid-overflow".into())
        .stack_size(WAITER_STACK)
        .spawn(overflow_poller)
    {
        Ok(_) => ov.1 = true,
        Err(e) => {
            let on_loop = get_running_loop();
            tracing::error!(
                "cannot start the overflow poller thread ({e}): {} children are checked {}, \
                 when another waiter thread ends and when a child is registered; lower the \
                 number of live children or raise the thread limit (ulimit -u)",
                ov.0.len(),
                if on_loop.is_some() {
                    "from the running event loop"
                } else {
                    "only"
                }
            );
            drop(ov);
            if let Some(lp) = on_loop {
                poll_from_loop(&lp, Duration::from_millis(1));
            }
        }
    }
}

/// `attach_loop(Some(lp))` of the watchers that need no loop: children
/// stranded on the overflow list with no poller thread (no thread could be
/// started, and the loop that polled them closed) are polled from `lp`'s
/// timers from now on, so attaching a new loop is enough to get their
/// statuses.
pub(super) fn adopt_overflow(lp: Option<&EventLoop>) {
    let Some(lp) = lp else { return };
    let stranded = {
        let ov = OVERFLOW.lock().unwrap_or_else(|p| p.into_inner());
        !ov.0.is_empty() && !ov.1
    };
    if stranded && !lp.is_closed() {
        poll_from_loop(lp, Duration::from_millis(1));
    }
}

/// The overflow poller as timers of the running loop, for when no thread
/// can start: polls the overflow list with the same back-off until it is
/// empty or a poller thread runs.
fn poll_from_loop(lp: &EventLoop, pause: Duration) {
    lp.call_later(pause, move || {
        if OVERFLOW.lock().unwrap_or_else(|p| p.into_inner()).1 {
            return; // a poller thread took over
        }
        let (empty, n) = overflow_pass();
        if empty {
            return;
        }
        let next = if n == 0 {
            (pause * 2).min(Duration::from_millis(50))
        } else {
            Duration::from_millis(1)
        };
        if let Some(lp) = get_running_loop() {
            poll_from_loop(&lp, next);
        }
    });
}

/// One pass over the overflow list: reaps (through each child's gate) and
/// calls back the ones that exited. True if the list is empty afterwards.
/// `done` tells how many exits it found.
fn overflow_pass() -> (bool, usize) {
    let mut done: Vec<(ChildHandle, OnExit, ReturnCode)> = Vec::new();
    let empty = {
        let mut ov = OVERFLOW.lock().unwrap_or_else(|p| p.into_inner());
        let list = std::mem::take(&mut ov.0);
        for (child, f) in list {
            match child.try_reap() {
                Ok(Reaped::Now(rc) | Reaped::Before(rc)) => done.push((child, f, rc)),
                Ok(Reaped::Running) => ov.0.push((child, f)),
                Err(e) => {
                    tracing::warn!("{e}");
                    ov.0.push((child, f));
                }
            }
        }
        ov.0.is_empty()
    };
    let n = done.len();
    for (child, f, rc) in done {
        call(f, &child, rc);
    }
    (empty, n)
}

/// Checks the overflow list once from the calling thread, if it has
/// anything and no poller thread runs.
pub(super) fn sweep_overflow() {
    let pending = {
        let ov = OVERFLOW.lock().unwrap_or_else(|p| p.into_inner());
        !ov.0.is_empty() && !ov.1
    };
    if pending {
        overflow_pass();
    }
}

/// Polls the overflow children with a non-blocking reap, backing off from
/// 1 ms to 50 ms while nothing exits; ends when none is left.
fn overflow_poller() {
    let mut pause = Duration::from_millis(1);
    loop {
        std::thread::sleep(pause);
        let (empty, n) = overflow_pass();
        if empty {
            let mut ov = OVERFLOW.lock().unwrap_or_else(|p| p.into_inner());
            if ov.0.is_empty() {
                ov.1 = false;
                return;
            }
        }
        pause = if n == 0 {
            (pause * 2).min(Duration::from_millis(50))
        } else {
            Duration::from_millis(1)
        };
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
            let h = ChildHandle::new(child.id() as Pid).unwrap();
            let tx = tx.clone();
            overflow_watch(h, Box::new(move |_, rc| tx.send((code, rc)).unwrap()));
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
