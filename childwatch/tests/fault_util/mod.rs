//! Helpers for the fault-injection tests of issue 9: every watcher by name,
//! a hang guard for futures, a full descriptor table, re-executing the test
//! binary inside a private pid namespace (small `pid_max`, pids recycle
//! within ~100 spawns) or as an unprivileged user, and steering the next pid.
//!
//! Each test binary declares `mod watcher_util; mod fault_util;`.
#![allow(dead_code)]

pub mod pidns;
pub mod reexec;

use std::future::{Future, poll_fn};
use std::os::fd::{FromRawFd, OwnedFd};
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use childwatch::{
    ChildWatcher, FastChildWatcher, LoopKind, MultiLoopChildWatcher, Pid, PidfdChildWatcher,
    SafeChildWatcher, ThreadedChildWatcher, UringChildWatcher, sleep,
};

/// The hang guard of these tests: a wait longer than this is a failure (a
/// hang), never a timing assertion.
pub const HANG: Duration = Duration::from_secs(30);

/// Every watcher of the crate, plus Uring without pidfds (`set_fd_budget(0)`:
/// every child waited for by `IORING_OP_WAITID`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wk {
    Threaded,
    Safe,
    Fast,
    MultiLoop,
    Pidfd,
    Uring,
    UringNoFd,
}

impl Wk {
    /// A new watcher of this kind, or None (with a "skipped" note) where the
    /// kernel lacks what it needs.
    pub fn make(self) -> Option<Arc<dyn ChildWatcher>> {
        let w: Arc<dyn ChildWatcher> = match self {
            Wk::Threaded => Arc::new(ThreadedChildWatcher::new().expect("Threaded::new")),
            Wk::Safe => Arc::new(SafeChildWatcher::new().expect("Safe::new")),
            Wk::Fast => Arc::new(FastChildWatcher::new().expect("Fast::new")),
            Wk::MultiLoop => Arc::new(MultiLoopChildWatcher::new().expect("MultiLoop::new")),
            Wk::Pidfd => {
                if !PidfdChildWatcher::is_supported() {
                    eprintln!("skipped: pidfd is not supported by this kernel");
                    return None;
                }
                Arc::new(PidfdChildWatcher::new().expect("Pidfd::new"))
            }
            Wk::Uring | Wk::UringNoFd => {
                if !UringChildWatcher::is_supported() {
                    eprintln!("skipped: io_uring WAITID is not supported by this kernel");
                    return None;
                }
                let w = UringChildWatcher::new().expect("Uring::new");
                if self == Wk::UringNoFd {
                    w.set_fd_budget(0);
                }
                Arc::new(w)
            }
        };
        Some(w)
    }

    /// Safe and Fast only work attached to a loop.
    pub fn needs_loop(self) -> bool {
        matches!(self, Wk::Safe | Wk::Fast)
    }
}

/// Runs `fut` on the running loop for at most `d`; None if it did not finish
/// (the caller turns that into a "hang" failure).
pub async fn within<T>(d: Duration, fut: impl Future<Output = T>) -> Option<T> {
    let mut fut = pin!(fut);
    let mut timer = pin!(sleep(d));
    poll_fn(|cx| {
        if let Poll::Ready(v) = fut.as_mut().poll(cx) {
            return Poll::Ready(Some(v));
        }
        if timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await
}

/// Blocks the calling thread until `f` holds or `d` passes; whether it held.
pub fn block_until(d: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + d;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Runs the loop (from inside a future) until `f` holds or `d` passes.
pub async fn run_until(d: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + d;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        sleep(Duration::from_millis(2)).await;
    }
}

/// Whether `/proc/<pid>` exists (a live process or a zombie).
pub fn pid_exists(pid: Pid) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Blocks until `pid` has exited: a zombie, or already reaped by someone.
pub fn wait_exited(pid: Pid) {
    let ok = block_until(HANG, || {
        matches!(crate::watcher_util::proc_state(pid), None | Some('Z'))
    });
    assert!(ok, "pid {pid} never exited");
}

/// A full descriptor table: the soft `RLIMIT_NOFILE` lowered to 256 and
/// every free slot below it taken by a CLOEXEC duplicate, so `pidfd_open`
/// (and `pipe`, `open`, ...) fail with EMFILE. `posix_spawn` with inherited
/// stdio needs no descriptor, so a child can still start: it then has no
/// pidfd anywhere. Dropping it frees the slots and restores the limit.
pub struct FdFill {
    held: Vec<OwnedFd>,
    old: libc::rlimit,
}

impl FdFill {
    pub fn new() -> FdFill {
        let mut old = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit with a valid out-pointer.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut old) }, 0);
        let low = libc::rlimit {
            rlim_cur: old.rlim_cur.min(256),
            rlim_max: old.rlim_max,
        };
        // SAFETY: setrlimit with a valid pointer.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &low) }, 0);
        let mut held = Vec::new();
        loop {
            // SAFETY: F_DUPFD_CLOEXEC of stderr; the result is owned below.
            let fd = unsafe { libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 0) };
            if fd < 0 {
                let e = std::io::Error::last_os_error();
                assert_eq!(e.raw_os_error(), Some(libc::EMFILE), "dup: {e}");
                break;
            }
            // SAFETY: a fresh descriptor nobody else owns.
            held.push(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        FdFill { held, old }
    }
}

impl Default for FdFill {
    fn default() -> Self {
        FdFill::new()
    }
}

impl Drop for FdFill {
    fn drop(&mut self) {
        self.held.clear();
        // SAFETY: setrlimit with a valid pointer.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &self.old) };
    }
}

/// Sets the soft `RLIMIT_NOFILE` (the hard limit stays); returns the old one.
pub fn set_nofile(soft: libc::rlim_t) -> libc::rlimit {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with valid pointers.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut old), 0);
        let new = libc::rlimit {
            rlim_cur: soft.min(old.rlim_max),
            rlim_max: old.rlim_max,
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &new), 0);
    }
    old
}

/// Our zombies, after giving the watcher up to `d` (running the loop) to
/// reap them.
pub async fn zombies_after(d: Duration) -> Vec<Pid> {
    run_until(d, || crate::watcher_util::zombie_children().is_empty()).await;
    crate::watcher_util::zombie_children()
}

/// Sends `sig` with kill(2) and ignores the result (cleanup only).
pub fn kill_quiet(pid: Pid, sig: i32) {
    // SAFETY: kill(2) with integer arguments.
    unsafe { libc::kill(pid, sig) };
}

/// Every std child started by a test that must not outlive it: killed and
/// reaped on drop (ECHILD tolerated: Fast may have reaped it).
#[derive(Default)]
pub struct Strangers(pub Vec<std::process::Child>);

impl Drop for Strangers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The names of the loop kinds, for messages.
pub fn kind_name(kind: LoopKind) -> &'static str {
    match kind {
        LoopKind::Proactor => "proactor",
        LoopKind::Selector => "selector",
    }
}
