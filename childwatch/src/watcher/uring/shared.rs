//! What the parts of the Uring watcher share: the watch of each child, the
//! descriptor budget, and the fallback chain (`hand_over`, `to_thread`).

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::loop_ring::Token;
use super::machine;
use super::own_ring::{self, OwnRing};
use super::sentinel::SentinelRing;
use crate::watcher::Pid;
use crate::watcher::child::{ChildHandle, Reaped};
use crate::watcher::registry::Registry;
use crate::watcher::threaded::spawn_waiter;

/// A counter bumped for as long as a value lives (pidfds held, `WAITID`s
/// pending).
#[derive(Debug)]
pub(super) struct Counted(Arc<AtomicUsize>);

impl Counted {
    pub(super) fn new(c: &Arc<AtomicUsize>) -> Counted {
        c.fetch_add(1, Ordering::SeqCst);
        Counted(Arc::clone(c))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The watcher's use of a child's pidfd, counted against the budget. When
/// dropped, the gate's pidfd is released too (the watcher is done polling).
pub(super) struct Pidfd {
    pub(super) fd: Arc<OwnedFd>,
    pub(super) child: ChildHandle,
    pub(super) _count: Counted,
}

impl Pidfd {
    pub(super) fn raw(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.fd.as_raw_fd()
    }
}

impl Drop for Pidfd {
    fn drop(&mut self) {
        self.child.release_pidfd();
    }
}

/// The probe of the state machine: a reap through the child's gate, which
/// delivers the status to its registration.
pub(super) struct Reap<'a> {
    pub(super) inner: &'a Inner,
    pub(super) child: &'a ChildHandle,
}

impl machine::Probe for Reap<'_> {
    fn probe(&mut self) -> io::Result<Reaped> {
        self.inner.registry.reap(self.child)
    }
}

/// How a registered child is being watched.
pub(super) enum How {
    /// By a task on a proactor loop (a poll, or a per-pid `WAITID`).
    Loop(Arc<Token>),
    /// By operation `id` on the watcher's own ring.
    Own(u64),
    /// By the sentinel of a proactor loop.
    Sentinel,
    /// By a waiter thread (or the overflow poller).
    Thread,
}

pub(super) struct Watch {
    pub(super) child: ChildHandle,
    pub(super) how: How,
}

#[derive(Default)]
pub(super) struct State {
    pub(super) watches: HashMap<Pid, Watch>,
    pub(super) own: Option<Arc<OwnRing>>,
    pub(super) sentinels: Vec<SentinelRing>,
}

pub(super) struct Inner {
    pub(super) registry: Registry,
    pub(super) closed: AtomicBool,
    pub(super) budget: AtomicUsize,
    pub(super) pidfds: Arc<AtomicUsize>,
    pub(super) waitids: Arc<AtomicUsize>,
    /// Sentinels in flight (each counts as one pending `WAITID`).
    pub(super) sentinels: Arc<AtomicUsize>,
    pub(super) next_id: AtomicU64,
    pub(super) state: Mutex<State>,
}

/// What the start of a watch found.
pub(super) enum Start {
    Pidfd(Pidfd),
    NoPidfd,
    /// Reaped already, or gone (its lost status is recorded in the gate).
    Reaped,
}

impl Inner {
    pub(super) fn state(&self) -> MutexGuard<'_, State> {
        // No callback runs under this lock; its data stays consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    pub(super) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub(super) fn closed_error() -> io::Error {
        io::Error::other("the UringChildWatcher is closed; set a new child watcher")
    }

    /// The child's pidfd, within the budget.
    pub(super) fn start(&self, child: &ChildHandle) -> Start {
        let budget = self.budget.load(Ordering::SeqCst);
        let reserved = self
            .pidfds
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < budget).then_some(n + 1)
            })
            .is_ok();
        if !reserved {
            // Over budget: no descriptor for this child, not even the gate's.
            child.release_pidfd();
            return Start::NoPidfd;
        }
        // The reservation is counted already: every path releases it once.
        let count = Counted(Arc::clone(&self.pidfds));
        match child.open_pidfd() {
            Ok(Some(fd)) => Start::Pidfd(Pidfd {
                fd,
                child: child.clone(),
                _count: count,
            }),
            Ok(None) => Start::Reaped,
            Err(e) => {
                if !matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                    tracing::debug!("pidfd_open({}) failed ({e}); using WAITID", child.pid());
                }
                Start::NoPidfd
            }
        }
    }

    /// Forgets the watch of `child` (and its place under a sentinel).
    pub(super) fn forget(&self, child: &ChildHandle) {
        let mut st = self.state();
        forget_locked(&mut st, child);
    }

    /// The fallback chain's thread stage: a waiter thread, else the overflow
    /// poller (see `threaded::spawn_waiter`). Never fails.
    pub(super) fn to_thread(self: &Arc<Self>, child: &ChildHandle) {
        {
            let mut st = self.state();
            if self.is_closed() || !self.registry.holds(child) {
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
        // The waiter waits by pid: no descriptor beyond the budget.
        child.release_pidfd();
        let inner = Arc::clone(self);
        spawn_waiter(
            child.clone(),
            Box::new(move |c, rc| {
                inner.forget(c);
                inner.registry.deliver_to(c, rc);
            }),
        );
    }

    /// Moves `child` off a loop's ring (the loop is going away, or its ring
    /// keeps failing): the watcher's own ring, else a waiter thread.
    pub(super) fn hand_over(self: &Arc<Self>, child: &ChildHandle, pidfd: Option<Pidfd>) {
        self.forget(child);
        if self.is_closed() || !self.registry.holds(child) {
            return;
        }
        // Dead already (its loop did not run to see it): reap it here, so
        // its status arrives even if nothing can watch it any more.
        if let Ok(Reaped::Now(_) | Reaped::Before(_)) = self.registry.reap(child) {
            self.forget(child);
            return;
        }
        if let Err(e) = own_ring::watch(self, child, pidfd, None) {
            tracing::warn!(
                "cannot move pid {} to the watcher's own io_uring ({e}); a waiter thread takes \
                 over",
                child.pid()
            );
            self.to_thread(child);
        }
    }
}

/// [`Inner::forget`] with the state locked.
pub(super) fn forget_locked(st: &mut State, child: &ChildHandle) {
    let pid = child.pid();
    if st.watches.get(&pid).is_some_and(|w| w.child.same(child)) {
        st.watches.remove(&pid);
    }
    for r in &mut st.sentinels {
        r.forget(child);
    }
}
