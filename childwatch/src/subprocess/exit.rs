//! How a child's exit reaches its `Process` (and its transport): the exit
//! slot that the watcher's callback fills, any number of waiters on it, and
//! `ChildCore` — pid, exit slot, and signals decided under the same locks
//! that record the exit, so a signal never reaches a recycled pid.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use slab::Slab;

use crate::watcher::{Pid, ReturnCode};

#[derive(Default)]
pub(crate) struct ExitState {
    pub(crate) rc: Option<ReturnCode>,
    /// The watcher dropped our callback without calling it.
    pub(crate) lost: bool,
    /// The `Process` went away while the watcher still held the callback:
    /// if the watcher drops it uncalled, the callback's drop hands the child
    /// to the orphan reaper (nobody else would reap it).
    abandoned: bool,
    /// The callback was dropped by `remove_child_handler`: the caller took
    /// the child back, so nobody of ours hands it to the orphan reaper.
    handed_back: bool,
    waiters: Slab<Waker>,
}

/// Where the watcher's callback records the exit; thread-safe because some
/// watchers may call back on another thread.
#[derive(Default)]
pub(crate) struct ExitSlot {
    state: Mutex<ExitState>,
}

impl ExitSlot {
    pub(crate) fn lock(&self) -> MutexGuard<'_, ExitState> {
        // Nothing panics under this lock; a poisoned one still holds valid data.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the exit (`None`: lost) and wakes the waiters; returns whether
    /// the child is now ours to give to the orphan reaper: the `Process` was
    /// already dropped (see `abandoned`) and the child was not handed back.
    fn finish(&self, rc: Option<ReturnCode>) -> bool {
        let handed_back = rc.is_none() && HANDING_BACK.with(Cell::get);
        let (wakers, orphan): (Vec<Waker>, bool) = {
            let mut st = self.lock();
            match rc {
                Some(rc) => st.rc = Some(rc),
                None => st.lost = true,
            }
            st.handed_back |= handed_back;
            (
                st.waiters.drain().collect(),
                st.abandoned && !st.handed_back,
            )
        };
        for w in wakers {
            w.wake();
        }
        orphan
    }
}

thread_local! {
    /// Set while `remove_child_handler` drops a handler (see [`handing_back`]).
    static HANDING_BACK: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` (which drops callbacks a watcher removed at its caller's
/// request) with this thread marked as handing children back: an exit slot
/// whose callback is dropped meanwhile records that the caller took the
/// child back and leaves it to them (asyncio's `remove_child_handler`: the
/// caller reaps), instead of giving it to the orphan reaper.
pub(crate) fn handing_back<R>(f: impl FnOnce() -> R) -> R {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            HANDING_BACK.with(|h| h.set(self.0));
        }
    }
    let _reset = Reset(HANDING_BACK.with(|h| h.replace(true)));
    f()
}

/// Owned by the watcher's callback: records the exit when called, or marks
/// it lost when the watcher drops the callback without calling it (closed,
/// or the pid re-registered by someone else), so `wait` errors instead of
/// hanging.
pub(crate) struct ExitReport {
    slot: Option<Arc<ExitSlot>>,
    /// Pinned with a pidfd if the watcher drops the callback uncalled.
    #[cfg(unix)]
    child: Option<crate::watcher::ChildHandle>,
}

impl ExitReport {
    #[cfg(any(windows, test))]
    pub(crate) fn new(slot: &Arc<ExitSlot>) -> ExitReport {
        ExitReport {
            slot: Some(Arc::clone(slot)),
            #[cfg(unix)]
            child: None,
        }
    }

    /// The same, pinning `child` with a pidfd when the watcher drops the
    /// callback without calling it (it stopped watching: closed, removed):
    /// from then on nobody of ours may reap it, and only a pidfd opened
    /// while it is surely still ours keeps `send_signal` exact.
    #[cfg(unix)]
    pub(crate) fn pinning(slot: &Arc<ExitSlot>, child: &crate::watcher::ChildHandle) -> ExitReport {
        ExitReport {
            slot: Some(Arc::clone(slot)),
            child: Some(child.clone()),
        }
    }

    pub(crate) fn fire(mut self, rc: ReturnCode) {
        if let Some(slot) = self.slot.take() {
            let _ = slot.finish(Some(rc));
        }
    }
}

impl Drop for ExitReport {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            #[cfg(unix)]
            if let Some(c) = self.child.take() {
                if c.returncode().is_none() {
                    c.pin();
                }
                // The same lock decides against `ChildCore`'s drop: exactly
                // one of the two hands an unwatched, unheld child over.
                if slot.finish(None) && c.returncode().is_none() {
                    crate::watcher::reap_orphan(&c);
                }
                return;
            }
            let _ = slot.finish(None);
        }
    }
}

/// The future of [`Process::wait`].
pub(crate) struct WaitExit {
    slot: Arc<ExitSlot>,
    pid: Pid,
    key: Option<usize>,
}

impl Future for WaitExit {
    type Output = io::Result<ReturnCode>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let mut st = this.slot.lock();
        if let Some(rc) = st.rc {
            if let Some(k) = this.key.take() {
                st.waiters.try_remove(k);
            }
            return Poll::Ready(Ok(rc));
        }
        if st.lost {
            this.key = None;
            return Poll::Ready(Err(io::Error::other(format!(
                "the child watcher stopped watching pid {} (closed or replaced) before it \
                 exited; its status is lost",
                this.pid
            ))));
        }
        match this.key.and_then(|k| st.waiters.get_mut(k)) {
            Some(w) => {
                if !w.will_wake(cx.waker()) {
                    *w = cx.waker().clone();
                }
            }
            None => this.key = Some(st.waiters.insert(cx.waker().clone())),
        }
        Poll::Pending
    }
}

impl Drop for WaitExit {
    fn drop(&mut self) {
        if let Some(k) = self.key.take() {
            self.slot.lock().waiters.try_remove(k);
        }
    }
}

#[cfg(unix)]
const SIGTERM: i32 = libc::SIGTERM;
#[cfg(unix)]
const SIGKILL: i32 = libc::SIGKILL;
// asyncio accepts these numbers on Windows too; both terminate the process.
#[cfg(windows)]
const SIGTERM: i32 = 15;
#[cfg(windows)]
const SIGKILL: i32 = 9;

/// What every view of a spawned child shares — [`Process`] and the
/// protocol-level `SubprocessTransport` alike: its pid, what pins it for
/// signals (the reap gate on Unix, the process handle on Windows) and the
/// slot where the watcher's callback records the exit.
///
/// [`Process`]: super::Process
pub(crate) struct ChildCore {
    pid: Pid,
    /// The gate the child's reap goes through (and its pidfd, if any).
    #[cfg(unix)]
    child: crate::watcher::ChildHandle,
    /// Windows: the process handle (never waited on through std).
    #[cfg(windows)]
    child: std::process::Child,
    exit: Arc<ExitSlot>,
}

impl ChildCore {
    #[cfg(unix)]
    pub(crate) fn new(
        pid: Pid,
        child: crate::watcher::ChildHandle,
        exit: Arc<ExitSlot>,
    ) -> ChildCore {
        ChildCore { pid, child, exit }
    }

    #[cfg(windows)]
    pub(crate) fn new(pid: Pid, child: std::process::Child, exit: Arc<ExitSlot>) -> ChildCore {
        ChildCore { pid, child, exit }
    }

    pub(crate) fn pid(&self) -> Pid {
        self.pid
    }

    #[cfg(unix)]
    pub(crate) fn child_handle(&self) -> &crate::watcher::ChildHandle {
        &self.child
    }

    #[cfg(windows)]
    pub(crate) fn process(&self) -> &std::process::Child {
        &self.child
    }

    /// The return code once the watcher reported the exit, or, when the
    /// watcher stopped watching, once the child's gate recorded its reap.
    pub(crate) fn returncode(&self) -> Option<ReturnCode> {
        let st = self.exit.lock();
        #[cfg(unix)]
        if st.rc.is_none() && st.lost {
            return self.child.returncode();
        }
        st.rc
    }

    /// A future of the exit (see [`WaitExit`]).
    pub(crate) fn wait(&self) -> WaitExit {
        WaitExit {
            slot: Arc::clone(&self.exit),
            pid: self.pid,
            key: None,
        }
    }

    /// [`wait`](Self::wait), and when the watcher stopped watching, the
    /// status the child's gate recorded if it has one.
    pub(crate) async fn wait_status(&self) -> io::Result<ReturnCode> {
        let r = self.wait().await;
        #[cfg(unix)]
        if r.is_err() {
            if let Some(rc) = self.child.returncode() {
                return Ok(rc);
            }
        }
        r
    }

    /// `Process::send_signal` on Windows: SIGTERM and SIGKILL only.
    #[cfg(windows)]
    pub(crate) fn send_signal(&self, sig: i32) -> io::Result<()> {
        // Decided under the lock that records the exit.
        let st = self.exit.lock();
        if st.rc.is_some() {
            return Ok(());
        }
        super::spawn::send_signal(&self.child, sig)
    }

    /// `Process::send_signal` on Unix: decided under the child's gate.
    #[cfg(unix)]
    pub(crate) fn send_signal(&self, sig: i32) -> io::Result<()> {
        if !(0..=64).contains(&sig) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid signal number {sig}"),
            ));
        }
        let st = self.exit.lock();
        if st.rc.is_some() {
            return Ok(());
        }
        if st.lost && self.child.pidfd().is_none() && self.child.returncode().is_none() {
            // The watcher stopped watching (and pinned a pidfd if it could):
            // whoever reaps the child now may not use its gate, so kill(2)
            // could hit a recycled pid. Opening a pidfd only now would not
            // prove it is still our child.
            return Err(io::Error::other(format!(
                "the child watcher stopped watching pid {} and no pidfd is held; refusing to \
                 signal a pid that may have been recycled",
                self.pid
            )));
        }
        // Decided under the child's gate: a no-op once it is reaped.
        self.child.send_signal(sig)
    }

    /// SIGTERM (Windows: `TerminateProcess(h, 1)`).
    pub(crate) fn terminate(&self) -> io::Result<()> {
        self.send_signal(SIGTERM)
    }

    /// SIGKILL (Windows: `TerminateProcess(h, 1)`).
    pub(crate) fn kill(&self) -> io::Result<()> {
        self.send_signal(SIGKILL)
    }
}

#[cfg(unix)]
impl Drop for ChildCore {
    /// A child its watcher stopped watching (closed, or its handler
    /// removed) would stay a zombie once nobody holds it: it goes to the
    /// shared overflow poller, which reaps it through its gate (tokio's
    /// orphan queue does the same for a dropped child). If the watcher still
    /// holds the callback, the callback does this when it is dropped uncalled
    /// (a watcher closed, or left on a closed loop, after the `Process`).
    fn drop(&mut self) {
        let lost = {
            let mut st = self.exit.lock();
            st.abandoned = true;
            st.lost && !st.handed_back
        };
        if lost && self.child.returncode().is_none() {
            crate::watcher::reap_orphan(&self.child);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn waker() -> (Arc<Count>, Waker) {
        let c = Arc::new(Count(AtomicUsize::new(0)));
        (Arc::clone(&c), Waker::from(c))
    }

    fn wait(slot: &Arc<ExitSlot>) -> WaitExit {
        WaitExit {
            slot: Arc::clone(slot),
            pid: 42,
            key: None,
        }
    }

    #[test]
    fn every_waiter_is_woken_once_and_sees_the_code() {
        let slot = Arc::new(ExitSlot::default());
        let report = ExitReport::new(&slot);
        let (counts, wakers): (Vec<_>, Vec<_>) = (0..3).map(|_| waker()).unzip();
        let mut waits: Vec<_> = (0..3).map(|_| Box::pin(wait(&slot))).collect();
        for (w, wk) in waits.iter_mut().zip(&wakers) {
            assert!(w.as_mut().poll(&mut Context::from_waker(wk)).is_pending());
        }
        // A cancelled waiter leaves no waker behind.
        let (c4, w4) = waker();
        {
            let mut extra = Box::pin(wait(&slot));
            assert!(
                extra
                    .as_mut()
                    .poll(&mut Context::from_waker(&w4))
                    .is_pending()
            );
        }
        assert_eq!(slot.lock().waiters.len(), 3);
        report.fire(-9);
        for c in &counts {
            assert_eq!(c.0.load(Ordering::SeqCst), 1);
        }
        assert_eq!(c4.0.load(Ordering::SeqCst), 0);
        for (w, wk) in waits.iter_mut().zip(&wakers) {
            match w.as_mut().poll(&mut Context::from_waker(wk)) {
                Poll::Ready(Ok(rc)) => assert_eq!(rc, -9),
                other => panic!("expected the code, got {other:?}"),
            }
        }
        // A wait started after the exit resolves at once.
        let mut late = Box::pin(wait(&slot));
        assert!(matches!(
            late.as_mut().poll(&mut Context::from_waker(&w4)),
            Poll::Ready(Ok(-9))
        ));
    }

    #[test]
    fn a_dropped_callback_fails_the_waiters() {
        let slot = Arc::new(ExitSlot::default());
        let report = ExitReport::new(&slot);
        let (c, w) = waker();
        let mut fut = Box::pin(wait(&slot));
        assert!(fut.as_mut().poll(&mut Context::from_waker(&w)).is_pending());
        drop(report); // the watcher closed without calling back
        assert_eq!(c.0.load(Ordering::SeqCst), 1);
        match fut.as_mut().poll(&mut Context::from_waker(&w)) {
            Poll::Ready(Err(e)) => assert_eq!(e.kind(), io::ErrorKind::Other),
            other => panic!("expected an error, got {other:?}"),
        }
    }
}
