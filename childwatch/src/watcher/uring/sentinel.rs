//! The sentinel: one `WAITID(P_ALL, WEXITED | WNOWAIT)` per proactor loop
//! for all of that loop's children beyond the descriptor budget.
//!
//! How: the wait reaps nothing; it completes once some child of the process
//! is a zombie. The loop thread then *sweeps*: it asks the kernel for a
//! zombie pid (`waitid(P_ALL, WNOHANG | WNOWAIT)`, the completion's pid
//! first) and, if that pid is registered with this watcher (any loop's
//! child, a pidfd-mode one too), reaps it through its gate, which delivers
//! to its registration; until no zombie is left. Cost: one pending `WAITID`
//! per loop, so O(1) kernel work per exit, plus two or three `waitid` calls.
//!
//! A zombie that is *not* ours (another library's child) is never reaped
//! and would make the sentinel fire at once, forever. While one lingers,
//! that loop's overflow children get a per-pid `WAITID(WNOWAIT)` each (O(1)
//! in user space, O(pending) in the kernel per exit) and the task checks on
//! a backing-off timer (one `waitid` per tick) whether the foreign zombie
//! is gone; then the per-pid waits are cancelled (they reap nothing) and
//! the children go back under the sentinel, so a passing foreign zombie
//! costs a passing slowdown, not one for the rest of the run.

use std::collections::HashMap;
use std::future::{Future, poll_fn};
use std::io;
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use super::loop_ring::{self, Token};
use super::machine::{Arm, MAX_ERRORS};
use super::{Counted, How, Inner, Watch, forget_locked};
use crate::event_loop::proactor::{Op, Proactor};
use crate::event_loop::ring::WaitIdAll;
use crate::event_loop::{EventLoop, LoopHandle, get_running_loop, sleep};
use crate::sys::{self, Found, Which};
use crate::watcher::Pid;
use crate::watcher::child::{ChildHandle, Reaped};

/// First and last pause between two checks of a foreign zombie.
const FOREIGN_CHECK: (Duration, Duration) = (Duration::from_millis(5), Duration::from_millis(200));

/// The overflow children of one proactor loop and its sentinel.
pub(super) struct SentinelRing {
    lp: LoopHandle,
    /// Children watched by the sentinel.
    overflow: HashMap<Pid, ChildHandle>,
    /// Overflow children on a per-pid `WAITID` while a foreign zombie
    /// blocks the sentinel (or after the sentinel broke).
    per_pid: HashMap<Pid, (ChildHandle, Arc<Token>)>,
    /// The foreign zombie blocking the sentinel, while there is one.
    foreign: Option<Pid>,
    /// The sentinel kept failing: per-pid waits from now on.
    broken: bool,
    /// The sentinel task's token while one runs.
    task: Option<Arc<Token>>,
}

impl SentinelRing {
    /// Drops `child` from this loop's sets (reaped, removed or handed over).
    pub(super) fn forget(&mut self, child: &ChildHandle) {
        let pid = child.pid();
        if self.overflow.get(&pid).is_some_and(|c| c.same(child)) {
            self.overflow.remove(&pid);
        }
        if self.per_pid.get(&pid).is_some_and(|(c, _)| c.same(child)) {
            self.per_pid.remove(&pid);
        }
        if self.overflow.is_empty() && self.per_pid.is_empty() {
            // Nothing left to watch: no WAITID stays pending for nobody (a
            // new overflow child starts a new sentinel).
            if let Some(t) = self.task.take() {
                t.cancel();
            }
        }
    }

    /// Stops the sentinel task (watcher close).
    pub(super) fn cancel(self) {
        if let Some(t) = self.task {
            t.cancel();
        }
    }
}

fn ring<'a>(sentinels: &'a mut [SentinelRing], lp: &LoopHandle) -> Option<&'a mut SentinelRing> {
    sentinels.iter_mut().find(|r| r.lp.same_loop(lp))
}

/// Watches `child` (no pidfd) on the running proactor loop `lp`: under its
/// sentinel, or with a per-pid `WAITID` while the sentinel is blocked.
pub(super) fn watch(
    inner: &Arc<Inner>,
    lp: &EventLoop,
    p: &Proactor,
    child: &ChildHandle,
) -> io::Result<()> {
    let h = lp.handle();
    let mut st = inner.state();
    if inner.is_closed() {
        return Err(Inner::closed_error());
    }
    if ring(&mut st.sentinels, &h).is_none() {
        st.sentinels.push(SentinelRing {
            lp: h.clone(),
            overflow: HashMap::new(),
            per_pid: HashMap::new(),
            foreign: None,
            broken: false,
            task: None,
        });
    }
    let blocked = ring(&mut st.sentinels, &h).is_some_and(|r| r.foreign.is_some() || r.broken);
    if blocked {
        drop(st);
        return per_pid(inner, lp, p, child);
    }
    let pid = child.pid();
    st.watches.insert(
        pid,
        Watch {
            child: child.clone(),
            how: How::Sentinel,
        },
    );
    let Some(r) = ring(&mut st.sentinels, &h) else {
        return Ok(()); // unreachable: pushed above
    };
    r.overflow.insert(pid, child.clone());
    if child.returncode().is_some() {
        // Reaped meanwhile by another loop's sweep, which may have looked
        // for this watch before it existed.
        forget_locked(&mut st, child);
        return Ok(());
    }
    let Some(r) = ring(&mut st.sentinels, &h) else {
        return Ok(());
    };
    if r.task.is_some() {
        return Ok(());
    }
    let token = Arc::new(Token::default());
    r.task = Some(Arc::clone(&token));
    drop(st);
    let task = Task {
        inner: Arc::clone(inner),
        proactor: p.clone(),
        lp: h,
        token,
        done: false,
    };
    // Submitted now, so it is counted (and in the kernel) at once.
    let op = arm(p, inner);
    lp.create_task(run(task, op)).detach();
    Ok(())
}

/// A per-pid `WAITID(WNOWAIT)` task for an overflow child of `lp`.
fn per_pid(
    inner: &Arc<Inner>,
    lp: &EventLoop,
    p: &Proactor,
    child: &ChildHandle,
) -> io::Result<()> {
    let token = loop_ring::spawn(inner, lp, p, child, Arm::WaitId, None)?;
    let mut st = inner.state();
    if let Some(r) = ring(&mut st.sentinels, &lp.handle()) {
        r.per_pid.insert(child.pid(), (child.clone(), token));
    }
    Ok(())
}

/// What a sweep ended with.
#[derive(Debug, PartialEq, Eq)]
enum Sweep {
    /// No zombie left.
    Clear,
    /// A zombie that is not registered with this watcher.
    Foreign(Pid),
}

/// The pid of some zombie child, without reaping it; `None` if none.
fn next_zombie() -> Option<Pid> {
    match sys::waitid(Which::All, libc::WNOHANG | libc::WNOWAIT) {
        Ok(Found::Exited(pid, _)) => Some(pid),
        _ => None,
    }
}

/// Whether `pid` is a zombie child of this process right now.
fn still_zombie(pid: Pid) -> bool {
    matches!(
        sys::waitid(Which::Pid(pid), libc::WNOHANG | libc::WNOWAIT),
        Ok(Found::Exited(..))
    )
}

/// Reaps (through their gates) and delivers every zombie registered with
/// this watcher, starting with `first` (0: none known), until no zombie is
/// left or a foreign one shows up.
fn sweep(inner: &Inner, first: Pid) -> Sweep {
    let mut next = first;
    loop {
        let x = match std::mem::take(&mut next) {
            0 => match next_zombie() {
                Some(x) => x,
                None => return Sweep::Clear,
            },
            x => x,
        };
        let reaped = match inner.registry.child(x) {
            Some(child) => match inner.registry.reap(&child) {
                Ok(Reaped::Now(_) | Reaped::Before(_)) => {
                    inner.forget(&child);
                    true
                }
                Ok(Reaped::Running) => false,
                Err(e) => {
                    tracing::warn!("{e}");
                    false
                }
            },
            None => false,
        };
        // Not reaped: a stale pid from the completion (reaped meanwhile by
        // its own poll), or a zombie that is not ours.
        if !reaped && still_zombie(x) {
            return Sweep::Foreign(x);
        }
    }
}

/// The sentinel task of one loop.
struct Task {
    inner: Arc<Inner>,
    proactor: Proactor,
    lp: LoopHandle,
    token: Arc<Token>,
    done: bool,
}

/// Waits for `fut` unless `token` is cancelled first (`None` then).
async fn cancellable<F: Future>(token: &Token, fut: F) -> Option<F::Output> {
    let mut fut = pin!(fut);
    poll_fn(|cx| {
        if token.is_cancelled() {
            return Poll::Ready(None);
        }
        token.set_waker(cx.waker());
        if token.is_cancelled() {
            return Poll::Ready(None);
        }
        fut.as_mut().poll(cx).map(Some)
    })
    .await
}

/// Submits the sentinel on `p`'s ring, counted in `waitids_pending` until
/// the kernel is done with it.
fn arm(p: &Proactor, inner: &Inner) -> Op<(WaitIdAll, Counted)> {
    p.submit_keeping(WaitIdAll::new(), Counted::new(&inner.sentinels))
}

async fn run(mut t: Task, first: Op<(WaitIdAll, Counted)>) {
    let mut errors = 0;
    let mut op = Some(first);
    loop {
        let op = op.take().unwrap_or_else(|| arm(&t.proactor, &t.inner));
        let Some((res, (si, count))) = cancellable(&t.token, op).await else {
            t.done = true;
            return;
        };
        drop(count);
        let first = match res {
            Ok(_) => {
                errors = 0;
                si.pid()
            }
            // ECHILD (no child at all), ECANCELED, anything else: sweep
            // synchronously from this thread anyway.
            Err(e) => {
                if e.raw_os_error() != Some(libc::ECHILD) {
                    tracing::warn!("the child watcher's sentinel WAITID failed ({e})");
                }
                errors += 1;
                0
            }
        };
        if let Sweep::Foreign(x) = sweep(&t.inner, first) {
            tracing::debug!(
                "pid {x} is a zombie child not registered with the UringChildWatcher; this \
                 loop's overflow children wait with one WAITID each until it is gone"
            );
            t.to_per_pid(Some(x));
            if !t.wait_gone(x).await {
                t.done = true;
                return;
            }
            t.back_under_sentinel();
        }
        if errors >= MAX_ERRORS {
            tracing::error!("the child watcher's sentinel keeps failing; one WAITID per child");
            t.to_per_pid(None);
            t.finish();
            return;
        }
        if !t.keep() {
            return;
        }
    }
}

impl Task {
    /// Moves this loop's overflow children to per-pid waits: `foreign` is
    /// blocking the sentinel (`None`: the sentinel is broken for good).
    fn to_per_pid(&self, foreign: Option<Pid>) {
        let moved: Vec<ChildHandle> = {
            let mut st = self.inner.state();
            let Some(r) = ring(&mut st.sentinels, &self.lp) else {
                return;
            };
            match foreign {
                Some(x) => r.foreign = Some(x),
                None => r.broken = true,
            }
            r.overflow.drain().map(|(_, c)| c).collect()
        };
        let lp = get_running_loop().filter(|l| l.handle().same_loop(&self.lp));
        for child in moved {
            let r = match &lp {
                Some(lp) => per_pid(&self.inner, lp, &self.proactor, &child),
                None => Err(io::Error::other("not on the sentinel's loop")),
            };
            if r.is_err() && !self.inner.is_closed() {
                self.inner.hand_over(&child, None);
            }
        }
    }

    /// Waits (checking on a backing-off timer) until `x` is no longer a
    /// zombie, or nothing is left to watch: true; false if cancelled.
    async fn wait_gone(&self, x: Pid) -> bool {
        let mut pause = FOREIGN_CHECK.0;
        loop {
            if cancellable(&self.token, sleep(pause)).await.is_none() {
                return false;
            }
            if !still_zombie(x) {
                return true;
            }
            let mut st = self.inner.state();
            if ring(&mut st.sentinels, &self.lp).is_none_or(|r| r.per_pid.is_empty()) {
                return true;
            }
            pause = (pause * 2).min(FOREIGN_CHECK.1);
        }
    }

    /// The foreign zombie is gone: per-pid waits are cancelled (they reap
    /// nothing) and their children go back under the sentinel.
    fn back_under_sentinel(&self) {
        let mut st = self.inner.state();
        let Some(r) = ring(&mut st.sentinels, &self.lp) else {
            return;
        };
        r.foreign = None;
        let moved: Vec<(ChildHandle, Arc<Token>)> = r.per_pid.drain().map(|(_, v)| v).collect();
        for (child, token) in moved {
            let pid = child.pid();
            match st.watches.get_mut(&pid) {
                Some(w) if w.child.same(&child) => {
                    token.cancel();
                    w.how = How::Sentinel;
                }
                _ => continue,
            }
            if let Some(r) = ring(&mut st.sentinels, &self.lp) {
                r.overflow.insert(pid, child);
            }
        }
    }

    /// Whether to re-arm: overflow children are left. Decided (and the
    /// task's slot cleared) under the lock a registration takes to see
    /// whether a sentinel runs, so no overflow child is left unwatched.
    fn keep(&mut self) -> bool {
        let mut st = self.inner.state();
        let closed = self.inner.is_closed();
        if let Some(r) = ring(&mut st.sentinels, &self.lp) {
            if !closed && !r.overflow.is_empty() {
                return true;
            }
            if r.task.as_ref().is_some_and(|t| Arc::ptr_eq(t, &self.token)) {
                r.task = None;
            }
        }
        self.done = true;
        false
    }

    /// Ends the task: no sentinel runs on this loop any more.
    fn finish(&mut self) {
        self.done = true;
        let mut st = self.inner.state();
        if let Some(r) = ring(&mut st.sentinels, &self.lp) {
            if r.task.as_ref().is_some_and(|t| Arc::ptr_eq(t, &self.token)) {
                r.task = None;
            }
        }
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        if self.done || self.token.is_cancelled() {
            return;
        }
        // Dropped with its loop (closing): its overflow children move to
        // the watcher's own ring (per-pid tasks hand theirs over themselves).
        let moved: Vec<ChildHandle> = {
            let mut st = self.inner.state();
            let moved = ring(&mut st.sentinels, &self.lp)
                .map(|r| r.overflow.drain().map(|(_, c)| c).collect())
                .unwrap_or_default();
            st.sentinels.retain(|r| !r.lp.same_loop(&self.lp));
            moved
        };
        for child in moved {
            self.inner.hand_over(&child, None);
        }
    }
}
