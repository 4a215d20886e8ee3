//! One watched child and the gate its exit goes through.
//!
//! Unix recycles a pid as soon as its zombie is reaped, so "pid 1234 exited
//! with 7" is only meaningful together with *which* pid-1234 it was, and a
//! `kill(1234, …)` is only safe while our own child 1234 is provably still
//! unreaped. Both hold when every reap of a child goes through one gate:
//!
//! * A [`ChildHandle`] is made once per child process (by the spawn, or by
//!   `add_child_handler` for a pid given by the user) and shared by the
//!   watcher's registration and the `Process`. It holds the pid, the child's
//!   only pidfd if a watcher opened one, and a lock.
//! * Watchers never reap on their own. Whatever tells them a child may have
//!   exited (a pidfd turning readable, an io_uring `WAITID` with `WNOWAIT`,
//!   `SIGCHLD`, a thread blocked in `waitid(WNOWAIT)`) only *wakes* them; the
//!   reap is [`ChildHandle::try_reap`], a non-blocking `waitid` made under
//!   the lock, which records the status in the same step. A stale wake-up
//!   finds the status recorded already and changes nothing, so a status can
//!   only ever reach the registration of the process it came from.
//! * [`ChildHandle::send_signal`] takes the same lock: while it holds it, no
//!   reaper of ours can reap the child, so the pid cannot be recycled under
//!   it; after the reap it is a no-op. This holds with or without a pidfd.
//!
//! A child reaped behind our back (a foreign `waitpid(-1)`, `SIGCHLD` set to
//! `SIG_IGN`) is reported as lost (255, with a warning), as asyncio does;
//! with a pidfd the reap is exact even then (`P_PIDFD` names one process).

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

use super::status::lost;
use super::{Pid, ReturnCode};
use crate::sys::{self, Found, Which};

/// Where a child is in its life, as far as our gate knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not reaped by us.
    Running,
    /// Reaped through this gate (or found reaped by someone else: 255).
    Exited(ReturnCode),
}

struct Gate {
    state: State,
    /// The child's pidfd, if a watcher opened one; dropped at the reap. An
    /// `Arc` so a poll in flight keeps the descriptor number valid until
    /// its own end, whatever the gate does.
    pidfd: Option<Arc<OwnedFd>>,
    /// Kept open for signals after a watcher stopped watching the child
    /// (see [`ChildHandle::pin`]); `release_pidfd` leaves it alone.
    pinned: bool,
}

/// Every unreaped child this process has a gate for, by pid: so that
/// `add_child_handler(pid)` on any watcher shares the gate of the
/// `Process` that spawned `pid` instead of making a second one. An entry
/// leaves at the reap or when its last handle is dropped.
fn live() -> MutexGuard<'static, HashMap<Pid, Weak<Inner>>> {
    static LIVE: OnceLock<Mutex<HashMap<Pid, Weak<Inner>>>> = OnceLock::new();
    LIVE.get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// Removes the live entry of `pid` if it is `inner`'s.
fn unlist(pid: Pid, inner: *const Inner) {
    let mut m = live();
    if m.get(&pid).is_some_and(|w| std::ptr::eq(w.as_ptr(), inner)) {
        m.remove(&pid);
    }
}

struct Inner {
    pid: Pid,
    gate: Mutex<Gate>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        unlist(self.pid, self);
    }
}

/// One child process: its pid, its pidfd (at most one, shared), and the
/// gate under which it is reaped and signalled. Cheap to clone; every clone
/// is the same child.
#[derive(Clone)]
pub struct ChildHandle(Arc<Inner>);

impl fmt::Debug for ChildHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = self.lock();
        f.debug_struct("ChildHandle")
            .field("pid", &self.0.pid)
            .field("state", &g.state)
            .field("pidfd", &g.pidfd.is_some())
            .finish()
    }
}

/// What one [`ChildHandle::try_reap`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reaped {
    /// Still running (or only stopped or continued).
    Running,
    /// Reaped by this call: the status to deliver.
    Now(ReturnCode),
    /// Reaped earlier through the gate; nothing new to deliver.
    Before(ReturnCode),
}

impl ChildHandle {
    /// The gate of a child this process has just spawned with pid `pid`
    /// (what `Command::spawn` makes). An earlier gate for the same pid,
    /// still unreaped as far as it knows, belonged to a process that someone
    /// else reaped (the pid was free to reuse): it records the lost status
    /// (255). `InvalidInput` for a pid that is not positive.
    pub fn new(pid: Pid) -> io::Result<ChildHandle> {
        let h = ChildHandle::fresh(pid)?;
        let old = live().insert(pid, Arc::downgrade(&h.0));
        if let Some(old) = old.and_then(|w| w.upgrade()) {
            let old = ChildHandle(old);
            if old.returncode().is_none() {
                tracing::warn!(
                    "pid {pid} was reused by a new child before the earlier child's exit was \
                     seen (reaped by someone else?); its status is lost"
                );
                old.record_exit(super::status::LOST_STATUS);
            }
        }
        Ok(h)
    }

    /// The gate of child `pid`: the existing one if this process has an
    /// unreaped gate for it (so every watcher and the `Process` share one),
    /// else a new one. What `add_child_handler(pid)` uses.
    pub fn for_pid(pid: Pid) -> io::Result<ChildHandle> {
        let mut m = live();
        if let Some(inner) = m.get(&pid).and_then(Weak::upgrade) {
            let h = ChildHandle(inner);
            // Reaped gates leave the map at the reap; one found here is live
            // unless its reap is being recorded right now.
            return Ok(h);
        }
        let h = ChildHandle::fresh(pid)?;
        m.insert(pid, Arc::downgrade(&h.0));
        Ok(h)
    }

    fn fresh(pid: Pid) -> io::Result<ChildHandle> {
        if pid <= 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid pid {pid}: a child pid is a positive number"),
            ));
        }
        Ok(ChildHandle(Arc::new(Inner {
            pid,
            gate: Mutex::new(Gate {
                state: State::Running,
                pidfd: None,
                pinned: false,
            }),
        })))
    }

    fn lock(&self) -> MutexGuard<'_, Gate> {
        // Only our own bookkeeping runs under this lock (no user code), so
        // a poisoned lock still holds valid data.
        self.0.gate.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The child's pid.
    pub fn pid(&self) -> Pid {
        self.0.pid
    }

    /// Whether both handles are the same child (not merely the same pid).
    pub fn same(&self, other: &ChildHandle) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// The returncode once reaped through the gate.
    pub fn returncode(&self) -> Option<ReturnCode> {
        match self.lock().state {
            State::Running => None,
            State::Exited(rc) => Some(rc),
        }
    }

    /// The child's pidfd, if a watcher opened one and the child is not
    /// reaped yet. The `Arc` keeps the descriptor open for as long as the
    /// caller holds it.
    pub fn pidfd(&self) -> Option<Arc<OwnedFd>> {
        self.lock().pidfd.clone()
    }

    /// Opens the child's pidfd (`pidfd_open(2)`) unless it has one or is
    /// reaped: `Ok(None)` then. `ESRCH` (the process is gone: reaped by
    /// someone else) records the lost status and returns `Ok(None)`; other
    /// errors (`EMFILE`, `ENFILE`, `ENOSYS`) are returned for the caller to
    /// fall back.
    pub fn open_pidfd(&self) -> io::Result<Option<Arc<OwnedFd>>> {
        let mut g = self.lock();
        if g.state != State::Running {
            return Ok(None);
        }
        if let Some(fd) = &g.pidfd {
            return Ok(Some(Arc::clone(fd)));
        }
        let rp = super::status::rpid(self.0.pid)?;
        match rustix::process::pidfd_open(rp, rustix::process::PidfdFlags::empty()) {
            Ok(fd) => {
                // The pid names our unreaped child unless someone else reaped
                // it and it was reused: a pidfd on a process that is not our
                // child answers ECHILD to a non-reaping waitid.
                match sys::waitid(Which::PidFd(fd.as_fd()), libc::WNOHANG | libc::WNOWAIT) {
                    Err(e) if sys::is_echild(&e) => {
                        g.state = State::Exited(lost(self.0.pid));
                        drop(g);
                        unlist(self.0.pid, Arc::as_ptr(&self.0));
                        return Ok(None);
                    }
                    Err(e) => return Err(e),
                    Ok(_) => {}
                }
                let fd = Arc::new(fd);
                g.pidfd = Some(Arc::clone(&fd));
                Ok(Some(fd))
            }
            Err(rustix::io::Errno::SRCH) => {
                g.state = State::Exited(lost(self.0.pid));
                drop(g);
                unlist(self.0.pid, Arc::as_ptr(&self.0));
                Ok(None)
            }
            Err(e) => Err(io::Error::from(e)),
        }
    }

    /// Drops the gate's pidfd (a watcher over its descriptor budget, or
    /// done with polling); signals then go by pid, still under the gate.
    pub fn release_pidfd(&self) {
        let fd = {
            let mut g = self.lock();
            if g.pinned { None } else { g.pidfd.take() }
        };
        drop(fd);
    }

    /// Called when a watcher drops a `Process`'s callback uncalled (it
    /// stopped watching: `remove_child_handler`, `close`): opens its pidfd now, while
    /// the pid still surely names it, and keeps it, so that a later
    /// `Process::send_signal` is exact even if foreign code reaps the child
    /// and the pid is reused. Without a descriptor to be had (`EMFILE`), such
    /// a signal is refused instead.
    pub(crate) fn pin(&self) {
        match self.open_pidfd() {
            Ok(Some(_)) => self.lock().pinned = true,
            Ok(None) => {}
            Err(e) => tracing::debug!(
                "cannot pin pid {} with a pidfd ({e}); its signals will be refused once \
                 unwatched",
                self.pid()
            ),
        }
    }

    /// The non-blocking reap: `waitid(P_PIDFD or P_PID, WEXITED | WNOHANG)`
    /// under the gate, recording the status in the same step. `ECHILD`
    /// (reaped by someone else) records and returns the lost status 255,
    /// with a warning. Other errors leave the child running as far as the
    /// gate knows.
    pub fn try_reap(&self) -> io::Result<Reaped> {
        let mut g = self.lock();
        if let State::Exited(rc) = g.state {
            return Ok(Reaped::Before(rc));
        }
        let found = match &g.pidfd {
            Some(fd) => sys::waitid(Which::PidFd(fd.as_fd()), libc::WNOHANG),
            None => sys::waitid(Which::Pid(self.0.pid), libc::WNOHANG),
        };
        let rc = match found {
            Ok(Found::Nothing) => return Ok(Reaped::Running),
            Ok(Found::Exited(_, rc)) => rc,
            Err(e) if sys::is_echild(&e) => lost(self.0.pid),
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("waitid for pid {} failed: {e}", self.0.pid),
                ));
            }
        };
        g.state = State::Exited(rc);
        g.pidfd = None;
        drop(g);
        unlist(self.0.pid, Arc::as_ptr(&self.0));
        Ok(Reaped::Now(rc))
    }

    /// Blocks until the child has exited, without reaping it
    /// (`waitid(WEXITED | WNOWAIT)`), then reaps it with [`try_reap`]. For
    /// waiter threads: the status is recorded under the gate, never on the
    /// thread's own.
    ///
    /// [`try_reap`]: ChildHandle::try_reap
    pub fn wait_blocking(&self) -> io::Result<Reaped> {
        loop {
            if let State::Exited(rc) = self.lock().state {
                return Ok(Reaped::Before(rc));
            }
            let fd = self.pidfd();
            let waited = match &fd {
                Some(fd) => sys::waitid(Which::PidFd(fd.as_fd()), libc::WNOWAIT),
                None => sys::waitid(Which::Pid(self.0.pid), libc::WNOWAIT),
            };
            match waited {
                // Exited (or gone: ECHILD), so the reap will not block.
                Ok(Found::Exited(..)) => {}
                Err(e) if sys::is_echild(&e) => {}
                Ok(Found::Nothing) => continue,
                Err(e) => return Err(e),
            }
            match self.try_reap()? {
                Reaped::Running => continue,
                r => return Ok(r),
            }
        }
    }

    /// Records an exit that was learnt outside the gate (Fast's reap of a
    /// child not yet registered; a pid known reused: 255) and returns the
    /// status the gate now holds: `rc`, or the one recorded earlier.
    pub(crate) fn record_exit(&self, rc: ReturnCode) -> ReturnCode {
        let mut g = self.lock();
        if let State::Exited(old) = g.state {
            return old;
        }
        g.state = State::Exited(rc);
        g.pidfd = None;
        drop(g);
        unlist(self.0.pid, Arc::as_ptr(&self.0));
        rc
    }

    /// Sends `sig` to the child, decided under the gate: a no-op (`Ok`)
    /// once the child is reaped, so it can never reach a process that
    /// reused the pid. Through the pidfd when there is one, else `kill(2)`.
    pub fn send_signal(&self, sig: i32) -> io::Result<()> {
        if !(0..=64).contains(&sig) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid signal number {sig}"),
            ));
        }
        let g = self.lock();
        if g.state != State::Running {
            return Ok(());
        }
        let fd = g.pidfd.as_ref().map(|f| f.as_fd());
        sys::send_signal(self.0.pid, fd, sig)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Pid {
        #[allow(clippy::zombie_processes)] // reaped through the gate under test
        let c = std::process::Command::new("/bin/sh")
            .args(["-c", script])
            .spawn()
            .unwrap();
        c.id() as Pid
    }

    #[test]
    fn reap_records_once_and_signals_become_noops() {
        let h = ChildHandle::new(sh("exit 7")).unwrap();
        assert_eq!(h.wait_blocking().unwrap(), Reaped::Now(7));
        assert_eq!(h.try_reap().unwrap(), Reaped::Before(7));
        assert_eq!(h.returncode(), Some(7));
        // The pid may be recycled now; the gate never signals it again.
        h.send_signal(libc::SIGKILL).unwrap();
    }

    #[test]
    fn running_child_with_and_without_pidfd() {
        for with_fd in [false, true] {
            let h = ChildHandle::new(sh("sleep 30")).unwrap();
            if with_fd {
                assert!(h.open_pidfd().unwrap().is_some());
            }
            assert_eq!(h.try_reap().unwrap(), Reaped::Running);
            h.send_signal(libc::SIGKILL).unwrap();
            assert_eq!(h.wait_blocking().unwrap(), Reaped::Now(-9));
            assert!(h.pidfd().is_none(), "the pidfd closes at the reap");
        }
    }

    #[test]
    fn reaped_elsewhere_is_lost() {
        let pid = sh("exit 3");
        let h = ChildHandle::new(pid).unwrap();
        sys::waitid(Which::Pid(pid), 0).unwrap();
        assert_eq!(
            h.try_reap().unwrap(),
            Reaped::Now(super::super::status::LOST_STATUS)
        );
    }

    #[test]
    fn invalid_input() {
        assert_eq!(
            ChildHandle::new(0).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        let h = ChildHandle::new(sh("exit 0")).unwrap();
        assert_eq!(
            h.send_signal(99).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        h.wait_blocking().unwrap();
    }
}
