//! Child watchers: how the loop learns that a child process exited.
//!
//! The [`ChildWatcher`] trait is asyncio's `AbstractChildWatcher` contract.
//! The implementations land with the watchers issue; until then the policy
//! hands out a [`PlaceholderChildWatcher`] that refuses registrations.

use std::io;

use crate::event_loop::EventLoop;

pub(crate) mod registry;
pub mod status;
mod threaded;
#[cfg(target_os = "linux")]
mod uring;

pub use threaded::ThreadedChildWatcher;
#[cfg(target_os = "linux")]
pub use uring::UringChildWatcher;

/// A process id.
pub type Pid = i32;

/// asyncio's convention: the exit code, or `-N` when the child was killed by
/// signal `N`; 255 when the status was lost (someone else reaped the child).
pub type ReturnCode = i32;

/// Called once with the pid and its return code when a watched child exits.
pub type ChildCallback = Box<dyn FnOnce(Pid, ReturnCode) + Send + 'static>;

/// asyncio's child watcher contract.
pub trait ChildWatcher: Send + Sync {
    /// Calls `callback(pid, returncode)` when child `pid` exits. Registering
    /// the same pid again replaces the earlier callback. A child that already
    /// exited still gets its callback.
    fn add_child_handler(&self, pid: Pid, callback: ChildCallback) -> io::Result<()>;
    /// Stops watching `pid`; true if a handler was removed.
    fn remove_child_handler(&self, pid: Pid) -> bool;
    /// Attaches the watcher to a loop (`None` detaches).
    fn attach_loop(&self, lp: Option<&EventLoop>);
    /// Whether the watcher can take handlers now.
    fn is_active(&self) -> bool;
    /// Stops watching and releases everything the watcher holds.
    fn close(&self);
    /// Entered around a spawn (asyncio's `with watcher:`).
    fn enter(&self) {}
    /// Left after a spawn.
    fn exit(&self) {}
}

/// Stand-in used until the real watchers exist: never active.
#[derive(Debug, Default)]
pub struct PlaceholderChildWatcher;

impl ChildWatcher for PlaceholderChildWatcher {
    fn add_child_handler(&self, pid: Pid, _callback: ChildCallback) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("no child watcher is implemented yet; cannot watch pid {pid}"),
        ))
    }
    fn remove_child_handler(&self, _pid: Pid) -> bool {
        false
    }
    fn attach_loop(&self, _lp: Option<&EventLoop>) {}
    fn is_active(&self) -> bool {
        false
    }
    fn close(&self) {}
}

/// The policy's default watcher (Uring, else Pidfd, else Threaded; for now
/// Threaded until the others land).
pub(crate) fn default_watcher() -> std::sync::Arc<dyn ChildWatcher> {
    match ThreadedChildWatcher::new() {
        Ok(w) => std::sync::Arc::new(w),
        Err(_) => std::sync::Arc::new(PlaceholderChildWatcher),
    }
}
