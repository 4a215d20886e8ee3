//! `SafeChildWatcher`: SIGCHLD on the attached loop, then `waitpid(pid,
//! WNOHANG)` for every registered pid.
//!
//! How it learns of an exit: a SIGCHLD handler installed with the attached
//! loop's `add_signal_handler` runs on that loop's thread and polls each
//! registered child with a non-blocking `waitpid(pid)`.
//!
//! Cost: O(n) system calls per SIGCHLD with n children registered (signals
//! coalesce, so a burst of exits costs one sweep, but 1,000 live children mean
//! 1,000 `waitpid` calls for each exit). No thread, no descriptor. It touches
//! only the pids it was given, so it never steals another library's child.
//!
//! When to choose it: a handful of children on one loop, where not reaping
//! other children matters and nothing else may be assumed about the kernel.
//! Like asyncio's, it needs an attached loop: `add_child_handler` fails
//! while it is detached, and callbacks run on the attached loop. One loop has
//! one SIGCHLD handler, so two Safe/Fast watchers cannot share a loop.

use std::io;
use std::sync::{Arc, Mutex};

use super::attach::Attachment;
use super::registry::{Added, Handler, Registry, Target};
use super::status::{rpid, try_reap};
use super::{ChildCallback, ChildWatcher, Pid, ReturnCode};
use crate::event_loop::EventLoop;

#[derive(Debug)]
struct Inner {
    registry: Registry,
    attachment: Arc<Attachment>,
    /// Held across `waitpid` and taking the handler, so that two sweeps
    /// never race (the loser would see ECHILD and report 255).
    reap: Mutex<()>,
}

impl Inner {
    /// Polls the given pids; delivers (through the attached loop) the ones
    /// that exited.
    fn check(&self, pids: &[Pid]) {
        let mut done: Vec<(Handler, Pid, ReturnCode)> = Vec::new();
        {
            let _g = self.reap.lock().unwrap_or_else(|p| p.into_inner());
            for &pid in pids {
                if !self.registry.contains(pid) {
                    continue;
                }
                match try_reap(pid) {
                    Ok(Some(rc)) => {
                        if let Some(h) = self.registry.take(pid) {
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

    fn sweep(&self) {
        let pids = self.registry.pids();
        self.check(&pids);
    }
}

/// On SIGCHLD (through the attached loop's signal handling) polls each
/// registered child with `waitpid(pid, WNOHANG)`: O(n) per signal, no thread,
/// no descriptor, and it never touches another library's children.
///
/// Like asyncio's, it is active only while attached to a loop that is not
/// closed ([`attach_loop`](ChildWatcher::attach_loop)): `add_child_handler`
/// fails otherwise. Callbacks run on the attached loop; exits that happen
/// while detached are reported once attached again. One loop holds one
/// SIGCHLD handler, so two Safe/Fast watchers cannot share a loop.
#[derive(Debug, Clone)]
pub struct SafeChildWatcher {
    inner: Arc<Inner>,
}

impl SafeChildWatcher {
    /// A new watcher; inactive until [`attach_loop`](ChildWatcher::attach_loop).
    pub fn new() -> io::Result<SafeChildWatcher> {
        Ok(SafeChildWatcher {
            inner: Arc::new(Inner {
                registry: Registry::default(),
                attachment: Arc::new(Attachment::new()),
                reap: Mutex::new(()),
            }),
        })
    }
}

impl ChildWatcher for SafeChildWatcher {
    fn add_child_handler(&self, pid: Pid, callback: ChildCallback) -> io::Result<()> {
        rpid(pid)?;
        if !self.inner.attachment.is_active() {
            return Err(io::Error::other(format!(
                "the SafeChildWatcher is not activated: attach it to a running event loop \
                 (attach_loop) before watching pid {pid}"
            )));
        }
        let cb = self.inner.attachment.post_to_loop(callback);
        if self.inner.registry.add(pid, cb, Target::AnyThread) == Added::New {
            // The child may have exited before we were told about it.
            self.inner.check(&[pid]);
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
            // Exits that happened while detached sent no signal we saw.
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
}
