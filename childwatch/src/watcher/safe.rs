//! `SafeChildWatcher`: SIGCHLD on the attached loop, then a non-blocking
//! reap of every registered child.
//!
//! How it learns of an exit: a SIGCHLD handler installed with the attached
//! loop's `add_signal_handler` runs on that loop's thread and tries each
//! registered child with a non-blocking `waitid(P_PID)` made under the
//! child's gate (`ChildHandle::try_reap`), so the status is recorded in the
//! step that `Process::send_signal` respects. If SIGCHLD is replaced after
//! attach, a 250 ms safety check notices and sweeps (see `attach.rs`).
//!
//! Cost: O(n) system calls per SIGCHLD with n children registered (signals
//! coalesce, so a burst of exits costs one sweep, but 1,000 live children mean
//! 1,000 `waitid` calls for each exit). No thread, no descriptor. It touches
//! only the pids it was given, so it never steals another library's child.
//!
//! When to choose it: a handful of children on one loop, where not reaping
//! other children matters and nothing else may be assumed about the kernel.
//! Like asyncio's, it needs an attached loop: `add_child_handler` fails
//! while it is detached, and callbacks run on the attached loop. One loop has
//! one SIGCHLD handler, so two Safe/Fast watchers cannot share a loop.

use std::io;
use std::sync::Arc;

use super::attach::{Attachment, Sweeper, attach_sweeper, close_sweeper};
use super::child::ChildHandle;
use super::registry::{Added, Registry, Target};
use super::{ChildCallback, ChildWatcher, Pid};
use crate::event_loop::EventLoop;

#[derive(Debug)]
struct Inner {
    registry: Registry,
    attachment: Arc<Attachment>,
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
    /// Reaps (each through its gate) and delivers, through the attached
    /// loop, every registered child that exited.
    fn sweep_now(&self) {
        self.registry.sweep();
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
            }),
        })
    }
}

impl SafeChildWatcher {
    fn register(
        &self,
        pid: Pid,
        child: Option<&ChildHandle>,
        callback: ChildCallback,
    ) -> io::Result<()> {
        if !self.inner.attachment.is_active() {
            return Err(io::Error::other(format!(
                "the SafeChildWatcher is not activated: attach it to a running event loop \
                 (attach_loop) before watching pid {pid}"
            )));
        }
        let cb = self.inner.attachment.post_to_loop(callback);
        let (added, child) = self
            .inner
            .registry
            .add_child(pid, child, cb, Target::AnyThread)?;
        if added == Added::New {
            // The child may have exited before we were told about it.
            if let Err(e) = self.inner.registry.reap(&child) {
                tracing::warn!("{e}");
            }
        }
        Ok(())
    }
}

impl ChildWatcher for SafeChildWatcher {
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
}
