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
//! loop's `add_signal_handler` runs on the loop's thread and calls
//! `waitpid(-1, WNOHANG)` until it reports nothing more.
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

use rustix::process::{WaitOptions, wait};

use super::attach::Attachment;
use super::registry::{Added, Registry, Target};
use super::status::{from_wait_status, rpid, try_reap};
use super::{ChildCallback, ChildWatcher, Pid};
use crate::event_loop::EventLoop;

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

impl Inner {
    fn lock(&self) -> MutexGuard<'_, ReapState> {
        // Callbacks only post to a loop under this lock; poisoning cannot
        // leave the counter invalid.
        self.reap.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reaps every exited child. Handlers only post to the loop, so they are
    /// delivered under the lock.
    fn sweep(&self) {
        let st = self.lock();
        loop {
            match wait(WaitOptions::NOHANG) {
                Ok(None) => break,
                Ok(Some((p, status))) => {
                    let pid = p.as_raw_pid();
                    let Some(rc) = from_wait_status(status) else {
                        continue;
                    };
                    if !self.registry.exited(pid, rc, st.forks > 0) && st.forks == 0 {
                        tracing::warn!(
                            "FastChildWatcher reaped unknown child pid {pid} (returncode {rc}); \
                             its status is dropped"
                        );
                    }
                }
                Err(rustix::io::Errno::INTR) => continue,
                Err(rustix::io::Errno::CHILD) => break,
                Err(e) => {
                    tracing::warn!("waitpid(-1) failed: {e}");
                    break;
                }
            }
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

impl ChildWatcher for FastChildWatcher {
    fn add_child_handler(&self, pid: Pid, callback: ChildCallback) -> io::Result<()> {
        rpid(pid)?;
        if !self.inner.attachment.is_active() {
            return Err(io::Error::other(format!(
                "the FastChildWatcher is not activated: attach it to a running event loop \
                 (attach_loop) before watching pid {pid}"
            )));
        }
        let cb = self.inner.attachment.post_to_loop(callback);
        let _st = self.inner.lock();
        if self.inner.registry.add(pid, cb, Target::AnyThread) == Added::New {
            // Not reaped yet (it is still our child and running, or a zombie
            // the next sweep collects), or reaped before anyone asked to keep
            // its status: then it is lost, and we must not wait forever.
            match try_reap(pid) {
                Ok(Some(rc)) => {
                    self.inner.registry.exited(pid, rc, false);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!("waitpid({pid}) failed: {e}"),
            }
        }
        Ok(())
    }

    fn remove_child_handler(&self, pid: Pid) -> bool {
        self.inner.registry.remove(pid)
    }

    fn attach_loop(&self, lp: Option<&EventLoop>) {
        if lp.is_none() && self.inner.registry.len() > 0 {
            tracing::warn!(
                "a child watcher is detached while {} children are watched; their exits are \
                 reported once it is attached again",
                self.inner.registry.len()
            );
        }
        let weak = Arc::downgrade(&self.inner);
        let installed = self.inner.attachment.attach(lp, move |generation| {
            Box::new(move || {
                if let Some(inner) = weak.upgrade() {
                    if inner.attachment.is_current(generation) {
                        inner.sweep();
                    }
                }
            })
        });
        if let (Some(lp), Some(generation)) = (lp, installed) {
            let weak = Arc::downgrade(&self.inner);
            lp.call_soon(move || {
                if let Some(inner) = weak.upgrade() {
                    if inner.attachment.is_current(generation) {
                        inner.sweep();
                    }
                }
            });
        }
    }

    fn is_active(&self) -> bool {
        self.inner.attachment.is_active()
    }

    fn close(&self) {
        self.inner.registry.clear();
        self.inner.attachment.attach(None, |_| Box::new(|| {}));
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
