//! The bookkeeping every watcher shares: pid → callback, replace, remove,
//! exits seen before registration, and delivery to the right loop.
//!
//! Watchers differ only in *how* they learn that a child exited; what
//! happens next is the same for all of them and lives here, so six watchers
//! do not carry six copies of it (tokio keeps `orphan.rs` apart from its
//! reapers for the same reason). The registry knows nothing of the kernel,
//! so its rules are unit-tested with made-up pids.
//!
//! Delivery: a callback runs on the thread of the loop that was running when
//! it was registered (through `call_soon_threadsafe`), or on whatever thread
//! observed the exit when no loop was running. If that loop has closed in the
//! meantime the callback runs on the observing thread, with a warning: an
//! exit status is never dropped.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Mutex, MutexGuard};

#[cfg(unix)]
use super::child::{ChildHandle, Reaped};
use super::{ChildCallback, Pid, ReturnCode};
use crate::event_loop::{LoopHandle, get_running_loop};

/// Where a callback must run.
#[derive(Clone, Debug)]
pub(crate) enum Target {
    /// On this loop's thread.
    Loop(LoopHandle),
    /// On whichever thread sees the exit.
    AnyThread,
}

impl Target {
    /// The running loop of the calling thread, if any.
    pub(crate) fn current() -> Target {
        match get_running_loop() {
            Some(lp) => Target::Loop(lp.handle()),
            None => Target::AnyThread,
        }
    }
}

/// A registered callback and where it runs.
pub(crate) struct Handler {
    callback: ChildCallback,
    target: Target,
}

impl Handler {
    pub(crate) fn new(callback: ChildCallback, target: Target) -> Handler {
        Handler { callback, target }
    }

    /// Runs the callback where it belongs. A callback run here, on a
    /// watcher's own thread (no loop was running at registration, or that
    /// loop has closed), is guarded: a panic in it is caught and logged so
    /// that thread goes on delivering to everyone else.
    pub(crate) fn deliver(self, pid: Pid, rc: ReturnCode) {
        let Handler { callback, target } = self;
        match target {
            Target::AnyThread => run_guarded(callback, pid, rc),
            Target::Loop(h) => {
                // The callback moves into the loop's queue; if the loop has
                // closed we get an error and must run it here instead. A
                // shared slot lets us recover it from the refused closure.
                let slot = std::sync::Arc::new(Mutex::new(Some(callback)));
                let s2 = std::sync::Arc::clone(&slot);
                let sent = h.call_soon_threadsafe(move || {
                    let cb = s2.lock().unwrap_or_else(|p| p.into_inner()).take();
                    if let Some(cb) = cb {
                        cb(pid, rc);
                    }
                });
                if sent.is_err() {
                    tracing::warn!(
                        "the event loop that registered pid {pid} is closed; running its exit \
                         callback on the watcher's thread"
                    );
                    let cb = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
                    if let Some(cb) = cb {
                        run_guarded(cb, pid, rc);
                    }
                }
            }
        }
    }
}

/// Calls `callback(pid, rc)`, catching and logging a panic.
fn run_guarded(callback: ChildCallback, pid: Pid, rc: ReturnCode) {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| callback(pid, rc)));
    if r.is_err() {
        tracing::error!("the exit callback of pid {pid} panicked; the watcher goes on");
    }
}

impl fmt::Debug for Handler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handler")
            .field("target", &self.target)
            .finish()
    }
}

#[derive(Default)]
struct State {
    handlers: HashMap<Pid, Handler>,
    /// The child each handler belongs to: a status is delivered only to the
    /// registration of the very process it came from.
    #[cfg(unix)]
    children: HashMap<Pid, ChildHandle>,
    /// Exits observed before a handler was registered (kept on request).
    early: HashMap<Pid, ReturnCode>,
}

/// pid → handler, shared by a watcher and whatever observes exits for it.
#[derive(Default)]
pub(crate) struct Registry {
    state: Mutex<State>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.lock();
        f.debug_struct("Registry")
            .field("handlers", &st.handlers.len())
            .field("early_exits", &st.early.len())
            .finish()
    }
}

/// What [`Registry::add`] did.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub(crate) enum Added {
    /// A new registration: the watcher must start watching `pid`.
    New,
    /// The pid was registered already; only the callback changed.
    Replaced,
    /// The exit was already known: the callback was delivered.
    Delivered,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Callbacks never run under this lock, so a poisoned lock can only
        // come from a panic in our own bookkeeping; its data is still valid.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers (or replaces) the handler of `pid`.
    #[cfg_attr(unix, allow(dead_code))] // the Windows watcher; unix uses add_child
    pub(crate) fn add(&self, pid: Pid, callback: ChildCallback, target: Target) -> Added {
        let handler = Handler::new(callback, target);
        let mut st = self.lock();
        if let Some(rc) = st.early.remove(&pid) {
            drop(st);
            handler.deliver(pid, rc);
            return Added::Delivered;
        }
        match st.handlers.insert(pid, handler) {
            Some(_) => Added::Replaced,
            None => Added::New,
        }
    }

    /// Removes the handler of `pid`; true if there was one. The caller
    /// (asyncio's `remove_child_handler`) takes the child back: its handler
    /// is dropped, outside the lock, as handed back, so a `Process` that
    /// was dropped does not give the child to the orphan reaper.
    pub(crate) fn remove(&self, pid: Pid) -> bool {
        let handler = {
            let mut st = self.lock();
            #[cfg(unix)]
            st.children.remove(&pid);
            st.handlers.remove(&pid)
        };
        let removed = handler.is_some();
        crate::subprocess::exit::handing_back(|| drop(handler));
        removed
    }

    /// Whether `pid` has a handler.
    #[allow(dead_code)] // kept for watchers keyed by pid alone
    pub(crate) fn contains(&self, pid: Pid) -> bool {
        self.lock().handlers.contains_key(&pid)
    }

    /// Number of registered pids.
    #[cfg_attr(windows, allow(dead_code))] // used by the unix watchers
    pub(crate) fn len(&self) -> usize {
        self.lock().handlers.len()
    }

    /// `pid` exited with `rc`: delivers to its handler and returns true, or,
    /// with no handler, keeps the exit for a later `add` when `keep` is set
    /// and returns false.
    pub(crate) fn exited(&self, pid: Pid, rc: ReturnCode, keep: bool) -> bool {
        let mut st = self.lock();
        #[cfg(unix)]
        st.children.remove(&pid);
        match st.handlers.remove(&pid) {
            Some(h) => {
                drop(st);
                h.deliver(pid, rc);
                true
            }
            None => {
                if keep {
                    st.early.insert(pid, rc);
                }
                false
            }
        }
    }

    /// Drops every handler and kept exit (watcher close); returns how many
    /// handlers were still registered.
    pub(crate) fn clear(&self) -> usize {
        let mut st = self.lock();
        st.early.clear();
        #[cfg(unix)]
        st.children.clear();
        let n = st.handlers.len();
        let handlers: Vec<Handler> = st.handlers.drain().map(|(_, h)| h).collect();
        drop(st);
        drop(handlers);
        n
    }

    /// Registers `callback` for a child (unix): `child` is `Some` for a
    /// process this program just spawned, `None` for a pid given by the user
    /// (asyncio's `add_child_handler`).
    ///
    /// * The same pid registered again with the same (or no) handle only
    ///   replaces the callback: [`Added::Replaced`].
    /// * A *different* handle for a registered pid means the old child was
    ///   reaped behind our back and its pid reused by the new one: the old
    ///   registration gets the lost status (255) and the new one is
    ///   [`Added::New`]. A status never crosses from one process to another.
    /// * An exit kept from before registration (Fast) is delivered at once:
    ///   [`Added::Delivered`].
    ///
    /// Returns the handle now registered for the pid.
    #[cfg(unix)]
    pub(crate) fn add_child(
        &self,
        pid: Pid,
        child: Option<&ChildHandle>,
        callback: ChildCallback,
        target: Target,
    ) -> std::io::Result<(Added, ChildHandle)> {
        let handler = Handler::new(callback, target);
        let mut st = self.lock();
        let mut stale = None;
        let handle = match (st.children.get(&pid), child) {
            (Some(old), Some(new)) if !old.same(new) => {
                let old = old.clone();
                let h = st.handlers.remove(&pid);
                stale = h.map(|h| (old, h));
                new.clone()
            }
            (Some(old), _) => {
                let old = old.clone();
                st.handlers.insert(pid, handler);
                return Ok((Added::Replaced, old));
            }
            (None, Some(new)) => new.clone(),
            // The user's pid: share the gate of the `Process` (or other
            // watcher) that has one for it.
            (None, None) => ChildHandle::for_pid(pid)?,
        };
        let early = st.early.remove(&pid);
        let mut handler = Some(handler);
        if early.is_none() {
            st.children.insert(pid, handle.clone());
            if let Some(h) = handler.take() {
                st.handlers.insert(pid, h);
            }
        }
        drop(st);
        // ChildHandle::new recorded (and warned about) the stale gate's lost
        // status already; its registration gets it now.
        if let Some((old, h)) = stale {
            h.deliver(pid, old.record_exit(super::status::LOST_STATUS));
        }
        if let (Some(rc), Some(h)) = (early, handler) {
            h.deliver(pid, handle.record_exit(rc));
            return Ok((Added::Delivered, handle));
        }
        Ok((Added::New, handle))
    }

    /// The child registered for `pid`, if any.
    #[cfg(unix)]
    pub(crate) fn child(&self, pid: Pid) -> Option<ChildHandle> {
        self.lock().children.get(&pid).cloned()
    }

    /// The registered children.
    #[cfg(unix)]
    pub(crate) fn children(&self) -> Vec<ChildHandle> {
        self.lock().children.values().cloned().collect()
    }

    /// Reaps `child` through its gate ([`ChildHandle::try_reap`]) and, if
    /// it has exited, delivers its status to the handler registered for
    /// this very child (not merely this pid), once. Returns what the reap
    /// found; `Err` only for an unexpected `waitid` failure.
    #[cfg(unix)]
    pub(crate) fn reap(&self, child: &ChildHandle) -> std::io::Result<Reaped> {
        let r = child.try_reap()?;
        if let Reaped::Now(rc) | Reaped::Before(rc) = r {
            self.deliver_to(child, rc);
        }
        Ok(r)
    }

    /// Whether `child` (that very process, not merely its pid) is the one
    /// registered for its pid.
    #[cfg(unix)]
    pub(crate) fn holds(&self, child: &ChildHandle) -> bool {
        self.lock()
            .children
            .get(&child.pid())
            .is_some_and(|c| c.same(child))
    }

    /// Delivers `rc` to the handler of `child` if that exact child is still
    /// registered; true if delivered.
    #[cfg(unix)]
    pub(crate) fn deliver_to(&self, child: &ChildHandle, rc: ReturnCode) -> bool {
        let pid = child.pid();
        let handler = {
            let mut st = self.lock();
            match st.children.get(&pid) {
                Some(c) if c.same(child) => {
                    st.children.remove(&pid);
                    st.handlers.remove(&pid)
                }
                _ => None,
            }
        };
        match handler {
            Some(h) => {
                h.deliver(pid, rc);
                true
            }
            None => false,
        }
    }

    /// Reaps every registered child that has exited: the O(n) sweep of
    /// Safe and MultiLoop (and Fast after `ECHILD`). Each reap is one
    /// non-blocking `waitid` under that child's gate, so two sweeps never
    /// race; callbacks run as each exit is found.
    #[cfg(unix)]
    pub(crate) fn sweep(&self) {
        for child in self.children() {
            if let Err(e) = self.reap(&child) {
                tracing::warn!("{e}");
            }
        }
    }

    /// Forgets kept exits (Fast's zombies once a spawn section ends).
    #[cfg_attr(windows, allow(dead_code))] // used by the unix watchers
    pub(crate) fn clear_early(&self) -> Vec<(Pid, ReturnCode)> {
        self.lock().early.drain().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    type Log = Arc<Mutex<Vec<(Pid, ReturnCode, &'static str)>>>;

    fn recorder() -> (Log, impl Fn(&'static str) -> ChildCallback) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let l2 = Arc::clone(&log);
        let make = move |tag: &'static str| -> ChildCallback {
            let l = Arc::clone(&l2);
            Box::new(move |pid, rc| l.lock().unwrap().push((pid, rc, tag)))
        };
        (log, make)
    }

    #[test]
    fn add_replace_remove_and_deliver_once() {
        let (log, cb) = recorder();
        let r = Registry::default();
        assert_eq!(r.add(10, cb("first"), Target::AnyThread), Added::New);
        assert_eq!(r.add(10, cb("second"), Target::AnyThread), Added::Replaced);
        assert!(r.exited(10, 3, false));
        assert!(!r.exited(10, 3, false), "delivered exactly once");
        assert_eq!(*log.lock().unwrap(), vec![(10, 3, "second")]);
        assert_eq!(r.add(11, cb("x"), Target::AnyThread), Added::New);
        assert!(r.remove(11));
        assert!(!r.remove(11));
        assert!(!r.exited(11, 0, false));
        assert_eq!(log.lock().unwrap().len(), 1);
    }

    #[test]
    fn early_exit_is_kept_only_when_asked() {
        let (log, cb) = recorder();
        let r = Registry::default();
        assert!(!r.exited(20, -9, true));
        assert!(!r.exited(21, 1, false));
        assert_eq!(r.add(20, cb("a"), Target::AnyThread), Added::Delivered);
        assert_eq!(r.add(21, cb("b"), Target::AnyThread), Added::New);
        assert_eq!(*log.lock().unwrap(), vec![(20, -9, "a")]);
        assert_eq!(r.clear(), 1);
        assert_eq!(r.len(), 0);
    }

    #[test]
    #[cfg(unix)]
    fn a_status_only_reaches_the_registration_of_its_own_child() {
        let (log, cb) = recorder();
        let r = Registry::default();
        let old = ChildHandle::new(50).unwrap();
        let (a, h) = r
            .add_child(50, Some(&old), cb("old"), Target::AnyThread)
            .unwrap();
        assert_eq!(a, Added::New);
        assert!(h.same(&old));
        // The user's add_child_handler for the same pid only replaces.
        let (a, h) = r
            .add_child(50, None, cb("old2"), Target::AnyThread)
            .unwrap();
        assert_eq!(a, Added::Replaced);
        assert!(h.same(&old));
        // A new process with the same pid: the old one was reaped elsewhere.
        let new = ChildHandle::new(50).unwrap();
        let (a, _) = r
            .add_child(50, Some(&new), cb("new"), Target::AnyThread)
            .unwrap();
        assert_eq!(a, Added::New);
        assert_eq!(*log.lock().unwrap(), vec![(50, 255, "old2")]);
        assert_eq!(old.returncode(), Some(255));
        // A late status of the old child never reaches the new registration.
        assert!(!r.deliver_to(&old, 7));
        assert!(r.deliver_to(&new, 3));
        assert!(!r.deliver_to(&new, 3), "delivered once");
        assert_eq!(log.lock().unwrap()[1], (50, 3, "new"));
    }

    #[test]
    fn closed_loop_still_gets_its_status_delivered() {
        let (log, cb) = recorder();
        let lp = crate::EventLoop::selector().unwrap();
        let h = lp.handle();
        lp.close().unwrap();
        let r = Registry::default();
        r.add(30, cb("c"), Target::Loop(h));
        assert!(r.exited(30, 0, false));
        assert_eq!(*log.lock().unwrap(), vec![(30, 0, "c")]);
    }
}
