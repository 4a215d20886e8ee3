//! The attached-loop SIGCHLD plumbing shared by `SafeChildWatcher` and
//! `FastChildWatcher`.
//!
//! Both watchers learn of exits through a SIGCHLD handler installed with the
//! attached loop's `add_signal_handler`, so the reaping runs on that loop's
//! thread. What they share lives here: moving the handler from one loop to
//! another, knowing whether they are active, and posting callbacks to the
//! attached loop.
//!
//! An [`EventLoop`] is `!Send` and lives on its own thread, while a watcher is
//! `Send + Sync`. The watcher therefore keeps only the loop's `LoopHandle`;
//! the loop itself is remembered in a thread-local of the loop's thread, so
//! that detaching from that thread removes the signal handler at once, and
//! detaching from any other thread asks the loop (through
//! `call_soon_threadsafe`) to remove it. Every installed handler carries a
//! generation number and does nothing once it is stale, so a late removal is
//! only tidiness, never a correctness question.
//!
//! SIGCHLD is process-wide, and other code may replace its handler after we
//! attach (a library's own `sigaction`, `SIG_IGN`, `SA_NOCLDWAIT`). So while
//! children are watched, the attached loop checks the disposition every
//! [`SAFETY_PERIOD`] (one `sigaction` call); when it is no longer the one
//! installed at attach time, it warns once and sweeps on that period, so
//! exits are still reported (255 for children the kernel reaped itself).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::ThreadId;
use std::time::Duration;

use super::registry::{Handler, Registry, Target};
use super::{ChildCallback, Pid, ReturnCode};
use crate::event_loop::{EventLoop, LoopHandle, get_running_loop};
use crate::sys::{SigchldDisposition, sigchld_disposition};

/// How often a loop with watched children checks that SIGCHLD still
/// reaches its handler.
pub(super) const SAFETY_PERIOD: Duration = Duration::from_millis(250);

thread_local! {
    /// (attachment id, generation) → loop, for loops living on this thread.
    static LOOPS: RefCell<HashMap<(u64, u64), EventLoop>> = RefCell::new(HashMap::new());
}

#[derive(Debug, Clone)]
struct Attached {
    handle: LoopHandle,
    thread: ThreadId,
    generation: u64,
}

/// Which loop a SIGCHLD-driven watcher is attached to.
#[derive(Debug)]
pub(super) struct Attachment {
    id: u64,
    generation: AtomicU64,
    state: Mutex<Option<Attached>>,
}

impl Attachment {
    pub(super) fn new() -> Attachment {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Attachment {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            generation: AtomicU64::new(0),
            state: Mutex::new(None),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<Attached>> {
        // No user code runs under this lock; a poisoned one is still valid.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the SIGCHLD handler installed with `generation` is the
    /// current one.
    pub(super) fn is_current(&self, generation: u64) -> bool {
        self.lock()
            .as_ref()
            .is_some_and(|a| a.generation == generation)
    }

    /// Attached to a loop that is not closed.
    pub(super) fn is_active(&self) -> bool {
        self.lock().as_ref().is_some_and(|a| !a.handle.is_closed())
    }

    /// The attached loop's handle.
    pub(super) fn handle(&self) -> Option<LoopHandle> {
        self.lock().as_ref().map(|a| a.handle.clone())
    }

    /// Attaches to `lp` (`None` detaches), installing the SIGCHLD handler
    /// that `make(generation)` builds and removing the previous one. Returns
    /// the new generation when a handler was installed.
    pub(super) fn attach(
        &self,
        lp: Option<&EventLoop>,
        make: impl FnOnce(u64) -> Box<dyn FnMut()>,
    ) -> Option<u64> {
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let mut st = self.lock();
        let old = st.take();
        let mut installed = None;
        if let Some(lp) = lp {
            if lp.is_closed() {
                tracing::warn!("cannot attach a child watcher to a closed event loop");
            } else {
                let handler = make(generation);
                match lp.add_signal_handler(libc::SIGCHLD, handler) {
                    Ok(()) => {
                        let id = self.id;
                        // Non-owning: an attached watcher must not keep the loop open.
                        let lp2 = lp.non_owning();
                        let _ = LOOPS.try_with(|m| m.borrow_mut().insert((id, generation), lp2));
                        *st = Some(Attached {
                            handle: lp.handle(),
                            thread: std::thread::current().id(),
                            generation,
                        });
                        installed = Some(generation);
                    }
                    Err(e) => {
                        tracing::warn!("cannot install the child watcher's SIGCHLD handler: {e}");
                    }
                }
            }
        }
        let new_handle = st.as_ref().map(|a| a.handle.clone());
        drop(st);
        if let Some(old) = old {
            let same = new_handle.is_some_and(|h| h.same_loop(&old.handle));
            self.release(old, same);
        }
        installed
    }

    /// Forgets a loop we no longer use and removes its SIGCHLD handler
    /// (unless `same`: we re-attached to that loop, and the new handler has
    /// replaced the old one there).
    fn release(&self, old: Attached, same: bool) {
        let id = self.id;
        let generation = old.generation;
        if old.thread == std::thread::current().id() {
            release_here(id, generation, !same);
        } else if old.handle.is_closed() {
            // A closed loop has dropped its signal handlers; the thread-local
            // entry goes when that thread ends or attaches again.
        } else {
            let _ = old
                .handle
                .call_soon_threadsafe(move || release_here(id, generation, !same));
        }
    }

    /// Wraps `cb` so that, wherever the exit is observed, it runs on the loop
    /// attached at that moment (through `call_soon_threadsafe`). It never
    /// runs user code inline, so it may be called under the watcher's locks.
    pub(super) fn post_to_loop(self: &Arc<Self>, cb: ChildCallback) -> ChildCallback {
        let att = Arc::clone(self);
        Box::new(move |pid: Pid, rc: ReturnCode| match att.handle() {
            Some(h) => Handler::new(cb, Target::Loop(h)).deliver(pid, rc),
            None => {
                tracing::warn!(
                    "child {pid} exited while its watcher was detached; running its callback \
                     on the reaping thread"
                );
                cb(pid, rc)
            }
        })
    }
}

/// A watcher that finds exits by sweeping its children whenever SIGCHLD
/// reaches the attached loop (Safe and Fast).
pub(super) trait Sweeper: Send + Sync + 'static {
    /// The loop the watcher is attached to.
    fn attachment(&self) -> &Attachment;
    /// The watcher's handlers.
    fn registry(&self) -> &Registry;
    /// Reaps what exited and delivers it.
    fn sweep(&self);
}

/// `attach_loop` for a [`Sweeper`]: warns when detaching with children
/// watched, moves the SIGCHLD handler to `lp`, and sweeps once on the new
/// loop, since exits that happened while detached sent no signal we saw.
pub(super) fn attach_sweeper<S: Sweeper>(inner: &Arc<S>, lp: Option<&EventLoop>) {
    let watched = inner.registry().len();
    if lp.is_none() && watched > 0 {
        tracing::warn!(
            "a child watcher is detached while {watched} children are watched; their exits are \
             reported once it is attached again"
        );
    }
    let sweep_if_current = |generation: u64| {
        let weak = Arc::downgrade(inner);
        move || {
            if let Some(inner) = weak.upgrade() {
                if inner.attachment().is_current(generation) {
                    inner.sweep();
                }
            }
        }
    };
    let installed = inner
        .attachment()
        .attach(lp, |generation| Box::new(sweep_if_current(generation)));
    if let (Some(lp), Some(generation)) = (lp, installed) {
        lp.call_soon(sweep_if_current(generation));
        match sigchld_disposition() {
            Ok(expected) => arm_safety(Arc::downgrade(inner), lp, generation, expected, false),
            Err(e) => tracing::warn!("cannot read the SIGCHLD disposition: {e}"),
        }
    }
}

/// The safety check: every [`SAFETY_PERIOD`] while attached as
/// `generation`, if children are watched and the SIGCHLD disposition is no
/// longer `expected`, warn (once) and sweep.
fn arm_safety<S: Sweeper>(
    weak: std::sync::Weak<S>,
    lp: &EventLoop,
    generation: u64,
    expected: SigchldDisposition,
    warned: bool,
) {
    lp.call_later(SAFETY_PERIOD, move || {
        let Some(inner) = weak.upgrade() else { return };
        if !inner.attachment().is_current(generation) {
            return;
        }
        let mut warned = warned;
        if inner.registry().len() > 0 {
            let now = sigchld_disposition();
            if now.as_ref().ok() != Some(&expected) {
                if !warned {
                    tracing::warn!(
                        "SIGCHLD no longer reaches the child watcher's handler (now {now:?}; \
                         something replaced it after the watcher was attached); checking \
                         watched children every {SAFETY_PERIOD:?} instead"
                    );
                    warned = true;
                }
                inner.sweep();
            }
        }
        if let Some(lp) = get_running_loop() {
            arm_safety(weak, &lp, generation, expected, warned);
        }
    });
}

/// `close` for a [`Sweeper`]: forgets every handler and detaches.
pub(super) fn close_sweeper<S: Sweeper>(inner: &S) {
    inner.registry().clear();
    inner.attachment().attach(None, |_| Box::new(|| {}));
}

/// On the loop's own thread: forget the loop attached as `generation`, and
/// remove its SIGCHLD handler if `remove_handler`.
fn release_here(id: u64, generation: u64, remove_handler: bool) {
    let found = LOOPS
        .try_with(|m| {
            let mut m = m.borrow_mut();
            let lp = m.remove(&(id, generation))?;
            // Re-attached to this same loop since: the handler there is the
            // new one and must stay.
            let reattached = m.iter().any(|((i, _), other)| *i == id && *other == lp);
            Some((lp, reattached))
        })
        .ok()
        .flatten();
    if let Some((lp, reattached)) = found {
        if remove_handler && !reattached && !lp.is_closed() {
            lp.remove_signal_handler(libc::SIGCHLD);
        }
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        let old = self.lock().take();
        if let Some(old) = old {
            self.release(old, false);
        }
    }
}
