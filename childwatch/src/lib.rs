//! # childwatch
//!
//! asyncio's process-watching system, in Rust: an **event-loop policy**, a
//! **proactor** event loop (io_uring) beside a **selector** event loop
//! (epoll), **child watchers** with asyncio's contract, and **subprocesses**
//! on top. On Windows the proactor is an I/O completion port loop and the
//! default policy is asyncio's `WindowsProactorEventLoopPolicy`.
//!
//! ```
//! use std::time::Duration;
//!
//! let lp = childwatch::new_event_loop()?;      // proactor where io_uring works
//! let out = lp.run_until_complete(async {
//!     childwatch::sleep(Duration::from_millis(5)).await;
//!     "done"
//! })?;
//! assert_eq!(out, "done");
//! lp.close()?;
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! Every fallible call returns [`std::io::Result`] with a message that says
//! what to do; the library does not panic on bad input or failing syscalls.
#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod event_loop;
pub mod policy;
#[cfg(any(target_os = "linux", windows))]
pub mod subprocess;
#[cfg(unix)]
mod sys;
pub mod watcher;

pub use event_loop::{
    EventLoop, Handle, LoopHandle, LoopKind, Sleep, Task, get_running_loop, sleep,
};
pub use policy::{
    DefaultEventLoopPolicy, EventLoopPolicy, ProactorEventLoopPolicy, SelectorEventLoopPolicy,
    get_child_watcher, get_event_loop, get_event_loop_policy, new_event_loop, proactor_supported,
    set_child_watcher, set_event_loop, set_event_loop_policy,
};
#[cfg(windows)]
pub use policy::{WindowsProactorEventLoopPolicy, WindowsSelectorEventLoopPolicy};
#[cfg(any(target_os = "linux", windows))]
pub use subprocess::{
    ChildStderr, ChildStdin, ChildStdout, Command, PipeTransport, Process, Stdio,
    SubprocessProtocol, SubprocessTransport, create_subprocess_exec, create_subprocess_shell,
};
#[cfg(windows)]
pub use watcher::WindowsChildWatcher;
pub use watcher::{ChildCallback, ChildWatcher, Pid, ReturnCode};
#[cfg(unix)]
pub use watcher::{
    ChildHandle, FastChildWatcher, MultiLoopChildWatcher, PidfdChildWatcher, Reaped,
    SafeChildWatcher, ThreadedChildWatcher,
};
#[cfg(target_os = "linux")]
pub use watcher::{HostDriver, UringChildWatcher};
