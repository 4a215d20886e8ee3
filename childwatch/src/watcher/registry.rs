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

    /// Runs the callback where it belongs.
    pub(crate) fn deliver(self, pid: Pid, rc: ReturnCode) {
        let Handler { callback, target } = self;
        match target {
            Target::AnyThread => callback(pid, rc),
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
                        cb(pid, rc);
                    }
                }
            }
        }
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

    /// Removes the handler of `pid`; true if there was one.
    pub(crate) fn remove(&self, pid: Pid) -> bool {
        self.lock().handlers.remove(&pid).is_some()
    }

    /// Whether `pid` has a handler.
    #[cfg_attr(windows, allow(dead_code))] // used by the unix watchers
    pub(crate) fn contains(&self, pid: Pid) -> bool {
        self.lock().handlers.contains_key(&pid)
    }

    /// The registered pids.
    #[cfg_attr(windows, allow(dead_code))] // used by the unix watchers
    pub(crate) fn pids(&self) -> Vec<Pid> {
        self.lock().handlers.keys().copied().collect()
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

    /// Takes the handler of `pid` without delivering it.
    #[cfg_attr(windows, allow(dead_code))] // used by the unix watchers
    pub(crate) fn take(&self, pid: Pid) -> Option<Handler> {
        self.lock().handlers.remove(&pid)
    }

    /// Drops every handler and kept exit (watcher close); returns how many
    /// handlers were still registered.
    pub(crate) fn clear(&self) -> usize {
        let mut st = self.lock();
        st.early.clear();
        let n = st.handlers.len();
        let handlers: Vec<Handler> = st.handlers.drain().map(|(_, h)| h).collect();
        drop(st);
        drop(handlers);
        n
    }

    /// Polls each of `pids` that is still registered with `reap` (a
    /// non-blocking wait: `Ok(None)` while the child runs) and delivers the
    /// ones that exited: the O(n) sweep of Safe and MultiLoop. `reap_lock` is
    /// held across each reap and the removal of its handler, so two sweeps
    /// never race (the loser would see ECHILD and report 255); callbacks are
    /// delivered after it is released.
    #[cfg(unix)]
    pub(crate) fn poll_each(
        &self,
        reap_lock: &Mutex<()>,
        pids: &[Pid],
        reap: impl Fn(Pid) -> std::io::Result<Option<ReturnCode>>,
    ) {
        let mut done: Vec<(Handler, Pid, ReturnCode)> = Vec::new();
        {
            let _g = reap_lock.lock().unwrap_or_else(|p| p.into_inner());
            for &pid in pids {
                if !self.contains(pid) {
                    continue;
                }
                match reap(pid) {
                    Ok(Some(rc)) => {
                        if let Some(h) = self.take(pid) {
                            done.push((h, pid, rc));
                        }
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!("waitpid({pid}) failed: {e}"),
                }
            }
        }
        for (h, pid, rc) in done {
            h.deliver(pid, rc);
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
    fn poll_each_delivers_only_registered_exits() {
        let (log, cb) = recorder();
        let r = Registry::default();
        r.add(40, cb("exited"), Target::AnyThread);
        r.add(41, cb("running"), Target::AnyThread);
        let lock = Mutex::new(());
        let reaped = Mutex::new(Vec::new());
        r.poll_each(&lock, &[40, 41, 42], |pid| {
            reaped.lock().unwrap().push(pid);
            Ok((pid == 40).then_some(3))
        });
        assert_eq!(
            *reaped.lock().unwrap(),
            vec![40, 41],
            "unregistered 42 not waited on"
        );
        assert_eq!(*log.lock().unwrap(), vec![(40, 3, "exited")]);
        assert!(r.contains(41) && !r.contains(40));
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
