//! `FastChildWatcher`: SIGCHLD on the attached loop, then `waitpid(-1,
//! WNOHANG)` until no exited child is left.
//!
//! # It reaps EVERY child of the process
//!
//! **Read this before choosing it.** `waitpid(-1)` collects any child of the
//! process, not only the ones registered here. A child started by another
//! library, by `std::process::Command` (whose `wait` will then fail with
//! ECHILD) or by another watcher is reaped by this one, and its status is
//! lost to its owner. Use it only when this watcher is the one and only
//! reaper of the process.
//!
//! How it learns of an exit: a SIGCHLD handler installed with the attached
//! loop's `add_signal_handler` runs on the loop's thread and asks
//! `waitid(P_ALL, WNOHANG | WNOWAIT)` for a zombie until none is left; a
//! registered one is reaped through its gate (`ChildHandle::try_reap`), any
//! other with `waitid(P_PID)`. A SIGCHLD that finds no zombie means someone
//! else reaped a child: the registered children are checked then, and one
//! taken by others gets 255 rather than a hang. A replaced SIGCHLD is
//! noticed by a 250 ms safety check (see `attach.rs`).
//!
//! Cost: O(1) per exit, independent of how many children are watched; no
//! thread, no descriptor.
//!
//! Zombies seen early: a child can exit before its handler is added. Exits
//! of unregistered pids seen while a spawn is inside
//! [`enter`](ChildWatcher::enter)/[`exit`](ChildWatcher::exit) are kept and
//! delivered when the handler is added (so add it before `exit`); outside
//! such a section they are logged and dropped, as in asyncio. A handler added
//! for a pid whose status was dropped that way gets 255 with a warning,
//! never a hang.
//!
//! When to choose it: a process whose children all belong to one loop and
//! one watcher, with many children alive at once, where Safe's O(n) sweep
//! would hurt and pidfds are unavailable.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use super::attach::{Attachment, Sweeper, attach_sweeper, close_sweeper};
use super::child::{ChildHandle, Reaped};
use super::registry::{Added, Registry, Target};
use super::{ChildCallback, ChildWatcher, Pid};
use crate::event_loop::EventLoop;
use crate::sys::{self, Found, Which};

#[derive(Debug, Default)]
struct ReapState {
    /// Nesting depth of `enter()` sections (spawns in progress).
    forks: usize,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    attachment: Arc<Attachment>,
    /// Held across reaping and the registry update that follows it.
    reap: Mutex<ReapState>,
}

impl Sweeper for Inner {
    fn attachment(&self) -> &Attachment {
        &self.attachment
    }
    fn registry(&self) -> &Registry {
        &self.registry
    }
    fn sweep(&self) {
        self.sweep_now();
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, ReapState> {
        // Callbacks only post to a loop under this lock; poisoning cannot
        // leave the counter invalid.
        self.reap.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reaps every exited child: `waitid(P_ALL, WNOHANG | WNOWAIT)` names
    /// a zombie without reaping it; a registered one is then reaped through
    /// its gate (so `send_signal` stays race-free), any other with
    /// `waitid(P_PID)`. When a SIGCHLD finds no zombie at all, someone else
    /// reaped a child (a foreign `waitpid`): every registered child is
    /// checked then, and one taken by others gets 255 instead of a hang.
    /// Handlers only post to the loop, so they are delivered under the lock.
    fn sweep_now(&self) {
        let st = self.lock();
        let mut found = 0usize;
        loop {
            match sys::waitid(Which::All, libc::WNOHANG | libc::WNOWAIT) {
                Ok(Found::Nothing) => break,
                Ok(Found::Exited(pid, _)) => {
                    found += 1;
                    if let Some(child) = self.registry.child(pid) {
                        match self.registry.reap(&child) {
                            Ok(Reaped::Running) => break, // not waitable after all
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!("{e}");
                                break;
                            }
                        }
                        continue;
                    }
                    match sys::waitid(Which::Pid(pid), libc::WNOHANG) {
                        Ok(Found::Exited(_, rc)) => {
                            if !self.registry.exited(pid, rc, st.forks > 0) && st.forks == 0 {
                                tracing::warn!(
                                    "FastChildWatcher reaped unknown child pid {pid} \
                                     (returncode {rc}); its status is dropped"
                                );
                            }
                        }
                        Ok(Found::Nothing) => break,
                        Err(e) if sys::is_echild(&e) => continue, // reaped meanwhile
                        Err(e) => {
                            tracing::warn!("waitid({pid}) failed: {e}");
                            break;
                        }
                    }
                }
                Err(e) if sys::is_echild(&e) => break,
                Err(e) => {
                    tracing::warn!("waitid(P_ALL) failed: {e}");
                    break;
                }
            }
        }
        if found == 0 && self.registry.len() > 0 {
            // A SIGCHLD with nothing to reap: a child was reaped elsewhere
            // (or only stopped). Find registered children taken by others.
            self.registry.sweep();
        }
    }
}

/// Reaps children on SIGCHLD with `waitpid(-1, WNOHANG)`: O(1) per exit, no
/// thread, no descriptor.
///
/// # Warning: it reaps EVERY child of the process
///
/// Not only the registered ones: a child of another library, of
/// `std::process::Command` (whose `wait` then fails with ECHILD) or of another
/// watcher loses its status to this watcher. Choose it only when it is the
/// process's one and only reaper.
///
/// Like asyncio's, it is active only while attached to a loop that is not
/// closed ([`attach_loop`](ChildWatcher::attach_loop)); callbacks run on the
/// attached loop. Exits of unregistered children seen inside
/// [`enter`](ChildWatcher::enter)/[`exit`](ChildWatcher::exit) are kept for
/// a handler added before `exit`; other unregistered exits are logged and
/// dropped (a handler added later gets 255, never a hang).
#[derive(Debug, Clone)]
pub struct FastChildWatcher {
    inner: Arc<Inner>,
}

impl FastChildWatcher {
    /// A new watcher; inactive until [`attach_loop`](ChildWatcher::attach_loop).
    pub fn new() -> io::Result<FastChildWatcher> {
        Ok(FastChildWatcher {
            inner: Arc::new(Inner {
                registry: Registry::default(),
                attachment: Arc::new(Attachment::new()),
                reap: Mutex::new(ReapState::default()),
            }),
        })
    }
}

impl FastChildWatcher {
    fn register(
        &self,
        pid: Pid,
        child: Option<&ChildHandle>,
        callback: ChildCallback,
    ) -> io::Result<()> {
        if !self.inner.attachment.is_active() {
            return Err(io::Error::other(format!(
                "the FastChildWatcher is not activated: attach it to a running event loop \
                 (attach_loop) before watching pid {pid}"
            )));
        }
        let cb = self.inner.attachment.post_to_loop(callback);
        let _st = self.inner.lock();
        let (added, child) = self
            .inner
            .registry
            .add_child(pid, child, cb, Target::AnyThread)?;
        if added == Added::New {
            // Not reaped yet (it is still our child and running, or a zombie
            // the next sweep collects), or reaped before anyone asked to keep
            // its status: then it is lost (255), and we must not wait forever.
            if let Err(e) = self.inner.registry.reap(&child) {
                tracing::warn!("{e}");
            }
        }
        Ok(())
    }
}

impl ChildWatcher for FastChildWatcher {
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
        attach_sweeper(&self.inner, lp);
    }

    fn is_active(&self) -> bool {
        self.inner.attachment.is_active()
    }

    fn close(&self) {
        close_sweeper(&*self.inner);
    }

    fn enter(&self) {
        self.inner.lock().forks += 1;
    }

    fn exit(&self) {
        let mut st = self.inner.lock();
        st.forks = st.forks.saturating_sub(1);
        if st.forks == 0 {
            let dropped = self.inner.registry.clear_early();
            drop(st);
            for (pid, rc) in dropped {
                tracing::warn!(
                    "FastChildWatcher: child pid {pid} exited (returncode {rc}) during a spawn \
                     but no handler was added for it; its status is dropped"
                );
            }
        }
    }
}
