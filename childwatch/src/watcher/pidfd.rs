//! `PidfdChildWatcher`: a pidfd per child, polled on the running loop.
//!
//! How it learns of an exit: `pidfd_open(pid)` gives a descriptor that
//! becomes readable when the child exits; a task on the loop that was
//! running at `add_child_handler` waits for that readiness (an io_uring
//! `POLL_ADD` on the proactor, a one-shot epoll registration on the
//! selector), then reaps with `waitid(P_PIDFD, WEXITED | WNOHANG)`.
//!
//! Cost: O(1) per exit (a pidfd has its own wait queue, so nothing scans the
//! other children), no thread, one descriptor per live child. It reaps only
//! its own children and is active from `new()` until `close()`, with no
//! attached loop needed. Needs Linux 5.4 ([`is_supported`] probes once).
//!
//! Fallbacks, so a child is never left unwatched: with no running loop at
//! `add_child_handler`, when `pidfd_open` fails (EMFILE/ENFILE: out of
//! descriptors), or when the loop holding the wait closes first, the child
//! is waited for by a waiter thread (the `ThreadedChildWatcher` mechanism).
//!
//! `remove_child_handler` cancels that child's wait and closes its pidfd.
//! `close()` stops delivering at once and cancels every wait: each task
//! drops its pidfd on its loop's thread the next time that loop runs (at
//! once if it is running; a loop that closes drops them too). Children still
//! running at `close()` are *not* reaped by this watcher afterwards, so
//! another watcher can take them over and get their real status (asyncio's
//! watchers also stop at `close`); children handed to a waiter thread are
//! still reaped by it, without a callback.
//!
//! When to choose it: the default where io_uring's WAITID is missing; any
//! number of loops and threads, many children, O(1) per exit.
//!
//! [`is_supported`]: PidfdChildWatcher::is_supported

use std::collections::HashMap;
use std::fmt;
use std::future::{Future, poll_fn};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Poll, Waker};
use std::time::Duration;

use rustix::process::{PidfdFlags, WaitId, WaitIdOptions, pidfd_open, waitid};

use super::child::{ChildHandle, Reaped};
use super::registry::{Added, Registry, Target};
use super::threaded::{adopt_overflow, spawn_waiter};
use super::{ChildCallback, ChildWatcher, Pid};
use crate::event_loop::{EventLoop, get_running_loop, sleep};

/// Cancellation of one child's wait, from any thread.
#[derive(Debug, Default)]
struct Cancel {
    flag: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl Cancel {
    fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    fn cancel(&self) {
        self.flag.store(true, Ordering::SeqCst);
        let w = self.waker.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(w) = w {
            w.wake();
        }
    }

    fn register(&self, waker: &Waker) {
        let mut slot = self.waker.lock().unwrap_or_else(|p| p.into_inner());
        match slot.as_ref() {
            Some(w) if w.will_wake(waker) => {}
            _ => *slot = Some(waker.clone()),
        }
    }
}

/// How a registered child is being waited for.
#[derive(Debug)]
enum How {
    /// A task on a loop polls its pidfd.
    Task(Arc<Cancel>),
    /// A waiter thread blocks in `waitid`; it cannot be cancelled.
    Thread,
}

#[derive(Debug)]
struct Watch {
    child: ChildHandle,
    how: How,
}

#[derive(Debug, Default)]
struct State {
    watches: HashMap<Pid, Watch>,
    closed: bool,
}

#[derive(Debug, Default)]
struct Inner {
    registry: Registry,
    state: Mutex<State>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // User code never runs under this lock.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets the watch of `child` if it is still the current one.
    fn forget(&self, child: &ChildHandle) {
        let mut st = self.lock();
        if matches!(st.watches.get(&child.pid()), Some(w) if w.child.same(child)) {
            st.watches.remove(&child.pid());
        }
    }

    /// Reaps `child` through its gate and delivers; `Ok(true)` when the
    /// wait is over.
    fn look(&self, child: &ChildHandle) -> io::Result<bool> {
        match self.registry.reap(child)? {
            Reaped::Running => Ok(false),
            Reaped::Now(_) | Reaped::Before(_) => {
                self.forget(child);
                Ok(true)
            }
        }
    }

    /// Waits for `child` on a waiter thread instead (the shared fallback
    /// chain: thread, then the overflow poller).
    fn to_thread(self: &Arc<Self>, child: &ChildHandle) {
        {
            let mut st = self.lock();
            if st.closed || !self.registry.holds(child) {
                return;
            }
            st.watches.insert(
                child.pid(),
                Watch {
                    child: child.clone(),
                    how: How::Thread,
                },
            );
        }
        let inner = Arc::clone(self);
        spawn_waiter(
            child.clone(),
            Box::new(move |c, rc| {
                inner.forget(c);
                inner.registry.deliver_to(c, rc);
            }),
        );
    }

    /// Starts watching `child` through `fd` on `lp`.
    fn start_task(self: &Arc<Self>, lp: &EventLoop, child: ChildHandle, fd: Arc<OwnedFd>) {
        let cancel = Arc::new(Cancel::default());
        {
            let mut st = self.lock();
            if st.closed {
                return;
            }
            st.watches.insert(
                child.pid(),
                Watch {
                    child: child.clone(),
                    how: How::Task(Arc::clone(&cancel)),
                },
            );
        }
        // The child may have exited already, or not be our child at all.
        match self.look(&child) {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) => {
                tracing::warn!("{e}; a waiter thread takes over");
                self.to_thread(&child);
                return;
            }
        }
        let guard = TaskGuard {
            inner: Arc::clone(self),
            child,
            cancel,
            finished: false,
        };
        lp.create_task(watch_pidfd(guard, fd)).detach();
    }
}

/// Lives inside a child's task: if the task is dropped without finishing
/// and without being cancelled (its loop closed), the child moves to a
/// waiter thread, so its exit is still reported.
struct TaskGuard {
    inner: Arc<Inner>,
    child: ChildHandle,
    cancel: Arc<Cancel>,
    finished: bool,
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if self.finished || self.cancel.is_set() {
            return;
        }
        tracing::warn!(
            "the event loop watching pid {} went away; a waiter thread takes over",
            self.child.pid()
        );
        self.inner.to_thread(&self.child);
    }
}

/// The task: wait for readiness (or cancellation), then reap.
async fn watch_pidfd(mut guard: TaskGuard, fd: Arc<OwnedFd>) {
    let Some(lp) = get_running_loop() else {
        return; // A task only runs on its loop; dropping the guard falls back.
    };
    loop {
        let ready = {
            let cancel = Arc::clone(&guard.cancel);
            let mut wait = pin!(lp.wait_readable(fd.as_raw_fd()));
            poll_fn(|cx| {
                if cancel.is_set() {
                    return Poll::Ready(None);
                }
                cancel.register(cx.waker());
                if cancel.is_set() {
                    return Poll::Ready(None);
                }
                wait.as_mut().poll(cx).map(Some)
            })
            .await
        };
        match ready {
            None => {
                guard.finished = true;
                return;
            }
            Some(Err(e)) => {
                tracing::warn!(
                    "waiting on the pidfd of pid {} failed: {e}; a waiter thread takes over",
                    guard.child.pid()
                );
                guard.finished = true;
                guard.inner.to_thread(&guard.child);
                return;
            }
            Some(Ok(())) => {}
        }
        match guard.inner.look(&guard.child) {
            Ok(true) => {
                guard.finished = true;
                return;
            }
            // Readable but not yet waitable: let the exit complete.
            Ok(false) => sleep(Duration::from_millis(1)).await,
            Err(e) => {
                tracing::warn!("{e}; a waiter thread takes over");
                guard.finished = true;
                guard.inner.to_thread(&guard.child);
                return;
            }
        }
    }
}

/// Watches each child through a pidfd polled on the loop that is running at
/// registration, then reaps it with `waitid(P_PIDFD)`: O(1) per exit, no
/// thread, one descriptor per live child (Linux 5.4+).
///
/// With no running loop at `add_child_handler`, when out of descriptors
/// (EMFILE/ENFILE), or when the loop goes away first, the child is waited
/// for by a waiter thread instead: a child is never left unwatched.
/// `remove_child_handler` cancels the wait and closes the pidfd. `close()`
/// stops all callbacks and cancels every wait (each pidfd closes on its
/// loop's thread at that loop's next iteration, or when it closes);
/// children still running are then left for another watcher to take over,
/// with their real status.
pub struct PidfdChildWatcher {
    inner: Arc<Inner>,
}

impl fmt::Debug for PidfdChildWatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.inner.lock();
        f.debug_struct("PidfdChildWatcher")
            .field("registry", &self.inner.registry)
            .field("watches", &st.watches.len())
            .field("closed", &st.closed)
            .finish()
    }
}

impl PidfdChildWatcher {
    /// A new, active watcher; `Unsupported` where the kernel lacks pidfds
    /// (`pidfd_open` and `waitid(P_PIDFD)`, Linux 5.4).
    pub fn new() -> io::Result<PidfdChildWatcher> {
        if !PidfdChildWatcher::is_supported() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "this kernel has no usable pidfds (pidfd_open and waitid(P_PIDFD) need Linux \
                 5.4+); use ThreadedChildWatcher",
            ));
        }
        Ok(PidfdChildWatcher {
            inner: Arc::new(Inner::default()),
        })
    }

    /// Whether `pidfd_open` and `waitid(P_PIDFD)` work here (probed once per
    /// process, like CPython's `can_use_pidfd`).
    pub fn is_supported() -> bool {
        static PROBE: OnceLock<bool> = OnceLock::new();
        *PROBE.get_or_init(|| {
            let me = rustix::process::getpid();
            let fd = match pidfd_open(me, PidfdFlags::empty()) {
                Ok(fd) => fd,
                Err(e) => {
                    tracing::info!("pidfd_open is unavailable: {e}");
                    return false;
                }
            };
            // We are not our own child: a kernel that knows P_PIDFD says
            // ECHILD, an older one EINVAL.
            match waitid(
                WaitId::PidFd(fd.as_fd()),
                WaitIdOptions::EXITED | WaitIdOptions::NOHANG,
            ) {
                Err(rustix::io::Errno::CHILD) | Ok(_) => true,
                Err(e) => {
                    tracing::info!("waitid(P_PIDFD) is unavailable: {e}");
                    false
                }
            }
        })
    }

    /// Number of children currently watched through a pidfd (each holding
    /// one descriptor) or a waiter thread.
    pub fn watched(&self) -> usize {
        self.inner.lock().watches.len()
    }
}

impl PidfdChildWatcher {
    fn register(
        &self,
        pid: Pid,
        child: Option<&ChildHandle>,
        callback: ChildCallback,
    ) -> io::Result<()> {
        if self.inner.lock().closed {
            return Err(io::Error::other(
                "the PidfdChildWatcher is closed; set a new child watcher",
            ));
        }
        let (added, child) =
            self.inner
                .registry
                .add_child(pid, child, callback, Target::current())?;
        if added != Added::New {
            return Ok(());
        }
        let Some(lp) = get_running_loop() else {
            self.inner.to_thread(&child);
            return Ok(());
        };
        match child.open_pidfd() {
            Ok(Some(fd)) => self.inner.start_task(&lp, child, fd),
            // Reaped already, or gone (its lost status is recorded).
            Ok(None) => {
                if let Err(e) = self.inner.registry.reap(&child) {
                    tracing::warn!("{e}");
                }
            }
            Err(e) => {
                if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                    tracing::debug!("out of descriptors for pid {pid}'s pidfd; using a thread");
                } else {
                    tracing::warn!("pidfd_open({pid}) failed: {e}; using a waiter thread");
                }
                self.inner.to_thread(&child);
            }
        }
        Ok(())
    }
}

impl ChildWatcher for PidfdChildWatcher {
    fn add_child_handler(&self, pid: Pid, callback: ChildCallback) -> io::Result<()> {
        self.register(pid, None, callback)
    }

    fn add_child(&self, child: &ChildHandle, callback: ChildCallback) -> io::Result<()> {
        self.register(child.pid(), Some(child), callback)
    }

    fn remove_child_handler(&self, pid: Pid) -> bool {
        let mut st = self.inner.lock();
        let removed = self.inner.registry.remove(pid);
        if let Some(Watch {
            how: How::Task(_), ..
        }) = st.watches.get(&pid)
        {
            if let Some(Watch {
                how: How::Task(cancel),
                ..
            }) = st.watches.remove(&pid)
            {
                drop(st);
                cancel.cancel();
            }
        }
        removed
    }

    fn attach_loop(&self, lp: Option<&EventLoop>) {
        // Needs no loop; a new one still adopts children stranded with no
        // thread to watch them.
        adopt_overflow(lp);
    }

    fn is_active(&self) -> bool {
        !self.inner.lock().closed
    }

    fn close(&self) {
        let cancels: Vec<Arc<Cancel>> = {
            let mut st = self.inner.lock();
            st.closed = true;
            let mut cancels = Vec::new();
            st.watches.retain(|_, w| match &w.how {
                How::Task(cancel) => {
                    cancels.push(Arc::clone(cancel));
                    false
                }
                How::Thread => true,
            });
            cancels
        };
        for c in cancels {
            c.cancel();
        }
        self.inner.registry.clear();
    }
}

impl Drop for PidfdChildWatcher {
    fn drop(&mut self) {
        self.close();
    }
}
