//! `UringChildWatcher`: child exits learned through io_uring — no thread,
//! no signal, and every reap through the child's gate.
//!
//! # How it learns of an exit
//!
//! io_uring operations only *wake* the watcher; the reap is always
//! [`ChildHandle::try_reap`](crate::ChildHandle::try_reap) on the thread
//! that harvests the completion, which records the status in the step that
//! `Process::send_signal` respects. A stale completion finds the status
//! recorded and changes nothing.
//!
//! * **Within the descriptor budget** (default: half of the soft
//!   `RLIMIT_NOFILE`): `IORING_OP_POLL_ADD` on the child's one pidfd (shared
//!   with its `Process`). One wait queue per pidfd: O(1) per exit.
//! * **Beyond it, on a proactor loop**: one *sentinel* per loop, a
//!   `WAITID(P_ALL, WEXITED | WNOWAIT)` that completes when any child is a
//!   zombie; the loop thread reaps the registered zombies through their
//!   gates. A zombie that is not ours blocks it: that loop's overflow
//!   children then get a per-pid `WAITID(WNOWAIT)` each until the foreign
//!   zombie is gone, then go back under the sentinel ([`sentinel`]).
//! * **Beyond it elsewhere** (selector loop, no loop): a per-pid
//!   `WAITID(P_PID, WEXITED | WNOWAIT)` on the watcher's own ring.
//!
//! # Cost
//!
//! A pidfd costs a descriptor; every pending `WAITID` sits on the parent's
//! single child-exit wait queue, so each exit makes the kernel check all of
//! them (O(pending) per exit). Hence pidfds first and one sentinel per loop
//! beyond the budget: O(1) per exit, and never a failure at the descriptor
//! limit. `childwatch bench --scenario scale` measures it.
//!
//! # Which ring, and the fallback chain
//!
//! With a proactor loop running at registration, the operation goes on that
//! loop's ring ([`loop_ring`]); otherwise on the watcher's own ring
//! ([`own_ring`]), harvested by a task on the running selector loop or, with
//! no loop at all, by one lazily started reaper thread. Both kinds of ring
//! go through the event loop's ring core (`event_loop/ring/`), which builds
//! every io_uring entry and owns what the kernel writes into: the watcher
//! never handles a raw entry, and the own ring only takes pointer-free
//! operations. Each child's decisions come from one state machine
//! ([`machine`]). When a ring cannot watch a child any more (its loop
//! closed, errors beyond the budget): loop ring → own ring → a waiter
//! thread → the shared overflow poller. A child is never dropped: with no
//! thread to be had at all, it waits unreaped on the overflow list, which
//! every registration checks.
//!
//! `close()` cancels everything (a cancelled `WNOWAIT` wait reaps nothing),
//! reaps the children that already died and leaves live ones to the caller.
//!
//! When to choose it: the default on Linux 6.7+.

mod harvester;
mod host;
mod loop_ring;
mod machine;
mod own_ring;
mod sentinel;
mod shared;

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use io_uring::{IoUring, Probe as RingProbe, opcode};
use rustix::process::{PidfdFlags, pidfd_open};

use super::child::{ChildHandle, Reaped};
use super::registry::{Added, Registry, Target};
use super::threaded::adopt_overflow;
use super::threaded::sweep_overflow;
use super::{ChildCallback, ChildWatcher, Pid};
use crate::event_loop::{EventLoop, get_running_loop};
pub use host::HostDriver;
use shared::{Counted, How, Inner, Pidfd, Reap, Start, State, Watch, forget_locked};

/// Watches children with io_uring: `IORING_OP_POLL_ADD` on each child's
/// pidfd while the watcher holds fewer pidfds than its descriptor budget
/// (default: half of the soft `RLIMIT_NOFILE`), `IORING_OP_WAITID` with
/// `WNOWAIT` (Linux 6.7+, no descriptor) beyond it: one shared sentinel per
/// proactor loop, else one per child. The operations only wake the watcher;
/// every reap goes through the child's gate.
///
/// **Cost.** O(1) per exit within the budget and under a sentinel; each
/// pending per-pid `WAITID` makes every exit cost the kernel a check
/// (O(pending)), which is why they are the last choice.
///
/// **Which ring, which thread.** With a proactor loop running at
/// registration, that loop's ring; otherwise a ring the watcher owns (one
/// descriptor), harvested by a task on the running selector loop or, with
/// no loop at all, by one reaper thread that ends when nothing is in
/// flight. Callbacks run on the thread of the loop that was running at
/// registration.
///
/// **`close()`** cancels every operation, closes every pidfd and the own
/// ring, and joins the reaper. Children already dead are reaped (their
/// statuses are dropped with their handlers); live ones are the caller's.
///
/// ```no_run
/// use childwatch::{ChildWatcher, UringChildWatcher};
/// let w = UringChildWatcher::new()?.with_fd_budget(64);
/// let child = std::process::Command::new("true").spawn()?;
/// w.add_child_handler(child.id() as i32, Box::new(|pid, rc| println!("{pid} -> {rc}")))?;
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone)]
pub struct UringChildWatcher {
    inner: Arc<Inner>,
}

impl fmt::Debug for UringChildWatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UringChildWatcher")
            .field("active", &self.is_active())
            .field("fd_budget", &self.fd_budget())
            .field("pidfds_held", &self.pidfds_held())
            .field("waitids_pending", &self.waitids_pending())
            .field("registry", &self.inner.registry)
            .finish()
    }
}

impl UringChildWatcher {
    /// Whether the kernel supports this watcher: io_uring can be set up,
    /// `IORING_OP_WAITID` (Linux 6.7+) and `IORING_OP_POLL_ADD` are
    /// supported, and `pidfd_open` works. Probed once per process.
    pub fn is_supported() -> bool {
        static SUPPORTED: OnceLock<bool> = OnceLock::new();
        *SUPPORTED.get_or_init(probe)
    }

    /// A new, active watcher; `ErrorKind::Unsupported` where the kernel lacks
    /// what it needs (see [`is_supported`](Self::is_supported)).
    pub fn new() -> io::Result<UringChildWatcher> {
        if !UringChildWatcher::is_supported() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "UringChildWatcher needs io_uring with IORING_OP_WAITID (Linux 6.7+) and \
                 pidfd_open; use PidfdChildWatcher or ThreadedChildWatcher instead",
            ));
        }
        Ok(UringChildWatcher {
            inner: Arc::new(Inner {
                registry: Registry::default(),
                closed: AtomicBool::new(false),
                budget: AtomicUsize::new(default_budget()),
                pidfds: Arc::new(AtomicUsize::new(0)),
                waitids: Arc::new(AtomicUsize::new(0)),
                sentinels: Arc::new(AtomicUsize::new(0)),
                next_id: AtomicU64::new(1),
                state: Mutex::new(State::default()),
            }),
        })
    }

    /// Sets the descriptor budget (builder style); see
    /// [`set_fd_budget`](Self::set_fd_budget).
    pub fn with_fd_budget(self, n: usize) -> UringChildWatcher {
        self.set_fd_budget(n);
        self
    }

    /// Sets how many pidfds the watcher may hold at once; children beyond it
    /// are watched with `WAITID` (0: `WAITID` only). Applies to children
    /// added from now on. Default: half of the soft `RLIMIT_NOFILE`.
    pub fn set_fd_budget(&self, n: usize) {
        self.inner.budget.store(n, Ordering::SeqCst);
    }

    /// The descriptor budget.
    pub fn fd_budget(&self) -> usize {
        self.inner.budget.load(Ordering::SeqCst)
    }

    /// How many pidfds the watcher holds now (never above the budget).
    pub fn pidfds_held(&self) -> usize {
        self.inner.pidfds.load(Ordering::SeqCst)
    }

    /// How many `WAITID` operations the watcher has in flight now: one per
    /// child on the per-pid path, plus one per armed sentinel.
    pub fn waitids_pending(&self) -> usize {
        self.inner.waitids.load(Ordering::SeqCst) + self.inner.sentinels.load(Ordering::SeqCst)
    }

    /// How many children have a handler registered now.
    pub fn watched(&self) -> usize {
        self.inner.registry.len()
    }

    fn register(
        &self,
        pid: Pid,
        child: Option<&ChildHandle>,
        callback: ChildCallback,
    ) -> io::Result<()> {
        let inner = &self.inner;
        if inner.is_closed() {
            return Err(Inner::closed_error());
        }
        // Children whose rings lost every harvester, or whose waiter thread
        // could not start, are checked from here too.
        own_ring::harvest_orphaned(inner);
        sweep_overflow();
        let (added, child) = inner
            .registry
            .add_child(pid, child, callback, Target::current())?;
        if added != Added::New {
            return Ok(());
        }
        let pidfd = match inner.start(&child) {
            Start::Pidfd(fd) => Some(fd),
            Start::NoPidfd => None,
            Start::Reaped => {
                // Delivers the status the gate recorded.
                if let Err(e) = inner.registry.reap(&child) {
                    tracing::warn!("{e}");
                }
                return Ok(());
            }
        };
        let lp = get_running_loop();
        let watched = match lp
            .as_ref()
            .and_then(|lp| Some((lp, lp.proactor_backend()?)))
        {
            Some((lp, p)) => loop_ring::watch(inner, lp, p, &child, pidfd),
            None => own_ring::watch(inner, &child, pidfd, lp.as_ref()),
        };
        if let Err(e) = watched {
            if inner.is_closed() {
                inner.registry.remove(pid);
                return Err(e);
            }
            tracing::warn!("{e}; a waiter thread watches pid {pid}");
            inner.to_thread(&child);
        }
        Ok(())
    }
}

fn default_budget() -> usize {
    let lim = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let soft = lim.current.unwrap_or(1 << 20).min(1 << 20);
    (soft / 2) as usize
}

fn probe() -> bool {
    let Ok(ring) = IoUring::new(2) else {
        return false;
    };
    let mut p = RingProbe::new();
    if ring.submitter().register_probe(&mut p).is_err() {
        return false;
    }
    if !p.is_supported(opcode::WaitId::CODE) || !p.is_supported(opcode::PollAdd::CODE) {
        return false;
    }
    pidfd_open(rustix::process::getpid(), PidfdFlags::empty()).is_ok()
}

impl ChildWatcher for UringChildWatcher {
    fn add_child_handler(&self, pid: Pid, callback: ChildCallback) -> io::Result<()> {
        self.register(pid, None, callback)
    }

    fn add_child(&self, child: &ChildHandle, callback: ChildCallback) -> io::Result<()> {
        self.register(child.pid(), Some(child), callback)
    }

    fn remove_child_handler(&self, pid: Pid) -> bool {
        let removed = self.inner.registry.remove(pid);
        let (watch, ring) = {
            let mut st = self.inner.state();
            let w = st.watches.remove(&pid);
            if let Some(w) = &w {
                forget_locked(&mut st, &w.child);
            }
            (w, st.own.clone())
        };
        match watch.map(|w| w.how) {
            Some(How::Loop(t)) => t.cancel(),
            Some(How::Own(id)) => {
                if let Some(ring) = ring {
                    ring.cancel(id);
                }
            }
            // Out of the overflow set (above); a thread cannot be cancelled
            // and delivers to nobody now.
            Some(How::Sentinel | How::Thread) | None => {}
        }
        removed
    }

    fn attach_loop(&self, lp: Option<&EventLoop>) {
        // Needs no loop; a new one still adopts children stranded with no
        // thread to watch them.
        adopt_overflow(lp);
    }

    fn is_active(&self) -> bool {
        !self.inner.is_closed()
    }

    fn close(&self) {
        let inner = &self.inner;
        if inner.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        let (watches, own, sentinels) = {
            let mut st = inner.state();
            (
                std::mem::take(&mut st.watches),
                st.own.take(),
                std::mem::take(&mut st.sentinels),
            )
        };
        inner.registry.clear();
        for r in sentinels {
            // The task drops (= cancels) its WNOWAIT op: it reaps nothing.
            r.cancel();
        }
        for w in watches.values() {
            if let How::Loop(t) = &w.how {
                t.cancel();
            }
        }
        if let Some(ring) = own {
            ring.close(inner);
        }
        // Reap what already died (through the gates); live children are the
        // caller's now. A waiter thread still reaps its child, silently.
        let alive = watches
            .values()
            .filter(|w| !matches!(w.how, How::Thread))
            .filter(|w| matches!(w.child.try_reap(), Ok(Reaped::Running)))
            .count();
        if alive > 0 {
            tracing::warn!(
                "UringChildWatcher closed with {alive} child(ren) still running; they are no \
                 longer reaped by it"
            );
        }
    }
}
