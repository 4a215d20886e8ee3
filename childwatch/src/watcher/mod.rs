//! Child watchers: how the loop learns that a child process exited.
//!
//! The [`ChildWatcher`] trait is asyncio's `AbstractChildWatcher` contract;
//! each implementation lives in its own file and says in its header how it
//! learns of an exit, what that costs and when to choose it. However they
//! learn of it, every watcher reaps a child only through that child's
//! [`ChildHandle`] (`child.rs`): one gate per child process, under which
//! the status is recorded and `Process::send_signal` decides, so a status
//! reaches only the registration of its own process and a signal never a
//! recycled pid. What follows an exit (pid → callback, replace, remove,
//! delivery to the right loop) is shared in `registry.rs`; the one fallback
//! chain (waiter thread → overflow poller) in `threaded.rs`.
//!
//! | watcher | how it learns of an exit | cost per exit | threads | fds per child | reaps others' children |
//! |---|---|---|---|---|---|
//! | [`ThreadedChildWatcher`] | a thread per child blocks in `waitid(pid, WNOWAIT)` | O(1) | 1 per child | 0 | no |
//! | [`SafeChildWatcher`] | SIGCHLD on the attached loop → try each registered child | O(n) | 0 | 0 | no |
//! | [`FastChildWatcher`] | SIGCHLD on the attached loop → `waitid(P_ALL, WNOWAIT)` until no zombie | O(1) | 0 | 0 | **yes** |
//! | [`MultiLoopChildWatcher`] | process-wide SIGCHLD → helper thread → try each registered child | O(n) | 1 helper | 0 | no |
//! | [`PidfdChildWatcher`] | pidfd readable on the running loop | O(1) | 0 | 1 | no |
//! | `WindowsChildWatcher` (Windows) | a one-shot thread-pool wait on the process handle (`RegisterWaitForSingleObject`) | O(1) | 0 of ours (pool threads, 63 waits each) | 1 process handle | no |

use std::io;

use crate::event_loop::EventLoop;

#[cfg(unix)]
mod attach;
#[cfg(unix)]
mod child;
#[cfg(unix)]
mod fast;
#[cfg(unix)]
mod multi_loop;
#[cfg(unix)]
mod pidfd;
pub(crate) mod registry;
#[cfg(unix)]
mod safe;
pub mod status;
#[cfg(unix)]
mod threaded;
#[cfg(target_os = "linux")]
mod uring;
#[cfg(windows)]
mod windows;

#[cfg(unix)]
pub use child::{ChildHandle, Reaped};
#[cfg(unix)]
pub use fast::FastChildWatcher;
#[cfg(unix)]
pub use multi_loop::MultiLoopChildWatcher;
#[cfg(unix)]
pub use pidfd::PidfdChildWatcher;
#[cfg(unix)]
pub use safe::SafeChildWatcher;
#[cfg(unix)]
pub use threaded::ThreadedChildWatcher;
#[cfg(target_os = "linux")]
pub use uring::{HostDriver, UringChildWatcher};
#[cfg(windows)]
pub use windows::WindowsChildWatcher;

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
    /// Registers a child this process has just spawned, through its
    /// [`ChildHandle`] (an extension of asyncio's contract; what
    /// [`Command::spawn`](crate::Command::spawn) calls). The watchers of
    /// this crate reap the child through the handle's gate, so the status
    /// is matched to this very process and `Process::send_signal` can never
    /// reach a recycled pid; a registered pid with a *different* handle is
    /// known to be reused, and its earlier registration gets 255. The
    /// default, for watchers written elsewhere, is
    /// `add_child_handler(child.pid(), callback)`.
    #[cfg(unix)]
    fn add_child(&self, child: &ChildHandle, callback: ChildCallback) -> io::Result<()> {
        self.add_child_handler(child.pid(), callback)
    }
    /// Entered around a spawn (asyncio's `with watcher:`).
    fn enter(&self) {}
    /// Left after a spawn.
    fn exit(&self) {}
}

/// Reaps `child` in the background through its gate, delivering to nobody:
/// for a child whose watcher stopped watching it and whose last holder is
/// gone (the orphan queue). Uses the shared overflow poller.
#[cfg(unix)]
pub(crate) fn reap_orphan(child: &ChildHandle) {
    threaded::overflow_watch(child.clone(), Box::new(|_, _| {}));
}

/// A watcher that refuses every registration: what the policy hands out
/// only if no real watcher could be created.
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

/// The policy's default watcher on Windows: [`WindowsChildWatcher`].
#[cfg(windows)]
pub(crate) fn default_watcher() -> std::sync::Arc<dyn ChildWatcher> {
    match WindowsChildWatcher::new() {
        Ok(w) => std::sync::Arc::new(w),
        Err(_) => std::sync::Arc::new(PlaceholderChildWatcher),
    }
}

/// The policy's default watcher: Uring where the kernel has io_uring WAITID,
/// else Pidfd where pidfds work, else Threaded (each probed once).
#[cfg(unix)]
pub(crate) fn default_watcher() -> std::sync::Arc<dyn ChildWatcher> {
    #[cfg(target_os = "linux")]
    if UringChildWatcher::is_supported() {
        match UringChildWatcher::new() {
            Ok(w) => return std::sync::Arc::new(w),
            Err(e) => tracing::warn!("cannot create a UringChildWatcher: {e}"),
        }
    }
    if PidfdChildWatcher::is_supported() {
        match PidfdChildWatcher::new() {
            Ok(w) => return std::sync::Arc::new(w),
            Err(e) => tracing::warn!("cannot create a PidfdChildWatcher: {e}"),
        }
    }
    match ThreadedChildWatcher::new() {
        Ok(w) => std::sync::Arc::new(w),
        Err(_) => std::sync::Arc::new(PlaceholderChildWatcher),
    }
}
