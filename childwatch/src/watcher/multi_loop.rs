//! `MultiLoopChildWatcher`: a process-wide SIGCHLD handler wakes one helper
//! thread, which tries every registered child with a non-blocking reap
//! through its gate (`ChildHandle::try_reap`).
//!
//! How it learns of an exit: a SIGCHLD action registered with
//! `signal-hook-registry` (chained with any other SIGCHLD handler of the
//! process, and tied to no loop) writes to an eventfd; the helper thread
//! blocked on that eventfd wakes and polls each registered pid. Each callback
//! goes to the loop that was running when `add_child_handler` was called, or
//! runs on the helper thread when none was.
//!
//! Cost: O(n) `waitid` calls per SIGCHLD with n children registered
//! (signals coalesce, so a burst of exits costs one sweep), one helper thread
//! and one eventfd for the whole watcher, nothing per child. It reaps only
//! its registered pids.
//!
//! When to choose it: children spawned from several loops on several threads
//! (asyncio's `MultiLoopChildWatcher`), without pidfds, and without a thread
//! per child; it needs no attached loop and is active from `new()` until
//! `close()`.

use std::fmt;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rustix::event::{EventfdFlags, eventfd};
use signal_hook_registry::SigId;

use rustix::event::{PollFd, PollFlags, Timespec, poll};

use super::attach::SAFETY_PERIOD;
use super::child::ChildHandle;
use super::registry::{Added, Registry, Target};
use super::threaded::adopt_overflow;
use super::{ChildCallback, ChildWatcher, Pid};
use crate::event_loop::EventLoop;
use crate::sys::{SigchldDisposition, sigchld_disposition};

struct Inner {
    registry: Registry,
    stop: AtomicBool,
}

impl Inner {
    /// The helper thread: sleep on the eventfd, sweep, repeat. While
    /// children are watched it also wakes every [`SAFETY_PERIOD`] to check
    /// that SIGCHLD still reaches our action (another library may have
    /// replaced it, or set `SIG_IGN`); if not, it warns once and sweeps on
    /// that period. Callbacks run on this thread only when no loop was
    /// running at registration; a panic in one is caught by the registry.
    fn run(&self, wake: &OwnedFd, expected: Option<SigchldDisposition>) {
        let mut buf = [0u8; 8];
        let mut warned = false;
        loop {
            // Always a timeout: a child registered while we sleep must be
            // covered by the safety check too (an idle tick is one poll).
            let ready = {
                let mut fds = [PollFd::new(wake, PollFlags::IN)];
                let ts = Timespec::try_from(SAFETY_PERIOD).ok();
                match poll(&mut fds, ts.as_ref()) {
                    Ok(n) => n > 0,
                    Err(rustix::io::Errno::INTR) => false,
                    Err(e) => {
                        tracing::error!("MultiLoopChildWatcher: polling its eventfd failed: {e}");
                        // Keep watching rather than spin: sweep on a slow tick.
                        std::thread::sleep(SAFETY_PERIOD);
                        false
                    }
                }
            };
            if ready {
                match rustix::io::read(wake, &mut buf) {
                    Ok(_) | Err(rustix::io::Errno::INTR) | Err(rustix::io::Errno::AGAIN) => {}
                    Err(e) => {
                        tracing::error!("MultiLoopChildWatcher: reading its eventfd failed: {e}")
                    }
                }
            }
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            if !ready {
                // A safety tick: sweep only if children are watched and
                // SIGCHLD no longer reaches us.
                if self.registry.len() == 0 {
                    continue;
                }
                let now = sigchld_disposition().ok();
                if now == expected {
                    continue;
                }
                if !warned {
                    tracing::warn!(
                        "SIGCHLD no longer reaches the MultiLoopChildWatcher (now {now:?}; \
                         something replaced its action); checking watched children every \
                         {SAFETY_PERIOD:?} instead"
                    );
                    warned = true;
                }
            }
            self.registry.sweep();
        }
    }
}

fn wake(fd: &OwnedFd) {
    // A full counter (EAGAIN) means a wake-up is pending anyway.
    let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
}

struct Running {
    sig: SigId,
    thread: JoinHandle<()>,
    /// Written by the SIGCHLD action and by `close`; read by the helper.
    /// The action and the helper hold the other references.
    wake: Arc<OwnedFd>,
}

/// A process-wide SIGCHLD handler (not tied to any loop) wakes one helper
/// thread, which polls each registered child with `waitpid(pid, WNOHANG)`:
/// O(n) per SIGCHLD, one thread and one eventfd in all, nothing per child.
///
/// Each callback runs on the loop that was running when its handler was
/// added (else on the helper thread). Active from `new()` until `close()`;
/// `attach_loop` is a no-op. Reaps only registered children. `close()`
/// removes the SIGCHLD action, joins the thread and closes the eventfd.
pub struct MultiLoopChildWatcher {
    inner: Arc<Inner>,
    running: Mutex<Option<Running>>,
}

impl fmt::Debug for MultiLoopChildWatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MultiLoopChildWatcher")
            .field("registry", &self.inner.registry)
            .field("active", &self.is_active())
            .finish()
    }
}

impl MultiLoopChildWatcher {
    /// A new, active watcher: installs its SIGCHLD action and starts its
    /// helper thread.
    pub fn new() -> io::Result<MultiLoopChildWatcher> {
        let fd = eventfd(0, EventfdFlags::CLOEXEC).map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!("cannot create the MultiLoopChildWatcher's eventfd: {e}"),
            )
        })?;
        let inner = Arc::new(Inner {
            registry: Registry::default(),
            stop: AtomicBool::new(false),
        });
        let wake_fd = Arc::new(fd);
        let fd2 = Arc::clone(&wake_fd);
        // SAFETY: the action only calls write(2) on an eventfd it keeps alive
        // (async-signal-safe; no allocation, no lock).
        let sig = unsafe { signal_hook_registry::register(libc::SIGCHLD, move || wake(&fd2)) }
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot install the MultiLoopChildWatcher's SIGCHLD handler: {e}"),
                )
            })?;
        // What SIGCHLD looks like with our action installed; a later change
        // means someone replaced it.
        let expected = sigchld_disposition().ok();
        let i2 = Arc::clone(&inner);
        let fd3 = Arc::clone(&wake_fd);
        let thread = std::thread::Builder::new()
            .name("childwatch-sigchld".into())
            .stack_size(128 * 1024)
            .spawn(move || i2.run(&fd3, expected));
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                signal_hook_registry::unregister(sig);
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot start the MultiLoopChildWatcher's helper thread: {e}"),
                ));
            }
        };
        Ok(MultiLoopChildWatcher {
            inner,
            running: Mutex::new(Some(Running {
                sig,
                thread,
                wake: wake_fd,
            })),
        })
    }
}

impl MultiLoopChildWatcher {
    fn register(
        &self,
        pid: Pid,
        child: Option<&ChildHandle>,
        callback: ChildCallback,
    ) -> io::Result<()> {
        if !self.is_active() {
            return Err(io::Error::other(
                "the MultiLoopChildWatcher is closed; set a new child watcher",
            ));
        }
        let (added, child) =
            self.inner
                .registry
                .add_child(pid, child, callback, Target::current())?;
        if added == Added::New {
            // An exit before now may have raised its SIGCHLD before the pid
            // was registered: look once.
            if let Err(e) = self.inner.registry.reap(&child) {
                tracing::warn!("{e}");
            }
        }
        Ok(())
    }
}

impl ChildWatcher for MultiLoopChildWatcher {
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
        // Needs no loop; a new one still adopts children stranded with no
        // thread to watch them.
        adopt_overflow(lp);
    }

    fn is_active(&self) -> bool {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    fn close(&self) {
        let running = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some(Running {
            sig,
            thread,
            wake: fd,
        }) = running
        else {
            return;
        };
        // After unregister returns no handler runs the action any more, and
        // the action's copy of the eventfd is dropped.
        signal_hook_registry::unregister(sig);
        self.inner.stop.store(true, Ordering::SeqCst);
        wake(&fd);
        if thread.thread().id() != std::thread::current().id() {
            let _ = thread.join();
        }
        // The last reference: the eventfd closes here (unless close() was
        // called from a callback on the helper thread itself, which then
        // ends and drops it right after).
        drop(fd);
        self.inner.registry.clear();
    }
}

impl Drop for MultiLoopChildWatcher {
    fn drop(&mut self) {
        self.close();
    }
}
