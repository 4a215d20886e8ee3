//! The loop-ring driver: one task per child on the proactor loop that was
//! running at registration, holding that child's operation on the loop's
//! own ring (a `POLL_ADD` on its pidfd, or a per-pid `WAITID(WNOWAIT)`).
//!
//! It only applies the state machine's steps. If the task is dropped before
//! its child is reaped (its loop is closing), the child is handed over to
//! the watcher's own ring; a cancelled task (remove, close) just ends, and
//! dropping its operation cancels it in the kernel (a `WNOWAIT` wait reaps
//! nothing).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use super::machine::{Arm, Machine, Step};
use super::{Counted, How, Inner, Pidfd, Reap, Watch, sentinel};
use crate::event_loop::EventLoop;
use crate::event_loop::proactor::{Op, Proactor};
use crate::event_loop::ring::Plain;
use crate::watcher::child::ChildHandle;

/// Cancellation (and the watch's pidfd) shared between the watcher and a
/// task living on some loop.
#[derive(Default)]
pub(super) struct Token {
    cancelled: AtomicBool,
    waker: Mutex<Option<Waker>>,
    pidfd: Mutex<Option<Pidfd>>,
}

impl Token {
    pub(super) fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    pub(super) fn set_waker(&self, w: &Waker) {
        let mut slot = self.waker.lock().unwrap_or_else(|p| p.into_inner());
        match &*slot {
            Some(old) if old.will_wake(w) => {}
            _ => *slot = Some(w.clone()),
        }
    }

    fn pidfd(&self) -> std::sync::MutexGuard<'_, Option<Pidfd>> {
        self.pidfd.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks cancelled, closes the pidfd now (an in-flight `POLL_ADD` holds
    /// its own reference to the file) and wakes the task.
    pub(super) fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
        drop(self.pidfd().take());
        let w = self.waker.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(w) = w {
            w.wake();
        }
    }
}

/// Watches `child` on the running proactor loop `lp`: a poll on its pidfd,
/// or (no pidfd) under the loop's sentinel.
pub(super) fn watch(
    inner: &Arc<Inner>,
    lp: &EventLoop,
    p: &Proactor,
    child: &ChildHandle,
    pidfd: Option<Pidfd>,
) -> io::Result<()> {
    match pidfd {
        Some(fd) => spawn(inner, lp, p, child, Arm::Poll, Some(fd)).map(drop),
        None => sentinel::watch(inner, lp, p, child),
    }
}

/// Starts a task watching `child` with `arm` on `lp`'s ring.
pub(super) fn spawn(
    inner: &Arc<Inner>,
    lp: &EventLoop,
    p: &Proactor,
    child: &ChildHandle,
    arm: Arm,
    pidfd: Option<Pidfd>,
) -> io::Result<Arc<Token>> {
    let token = Arc::new(Token::default());
    *token.pidfd() = pidfd;
    {
        let mut st = inner.state();
        if inner.is_closed() {
            token.cancel();
            return Err(Inner::closed_error());
        }
        st.watches.insert(
            child.pid(),
            Watch {
                child: child.clone(),
                how: How::Loop(Arc::clone(&token)),
            },
        );
    }
    let mut task = LoopWatch {
        inner: Arc::clone(inner),
        proactor: p.clone(),
        child: child.clone(),
        token: Arc::clone(&token),
        machine: Machine::new(arm),
        op: LoopOp::Done,
    };
    task.arm(arm);
    lp.create_task(task).detach();
    Ok(token)
}

enum LoopOp {
    Poll(Op<()>),
    Wait(Op<((), Counted)>),
    Done,
}

/// A task on a proactor loop watching one child through that loop's ring.
struct LoopWatch {
    inner: Arc<Inner>,
    proactor: Proactor,
    child: ChildHandle,
    token: Arc<Token>,
    machine: Machine,
    op: LoopOp,
}

impl LoopWatch {
    /// Submits the operation for `arm`.
    fn arm(&mut self, arm: Arm) {
        let fd = match arm {
            Arm::Poll => self.token.pidfd().as_ref().map(Pidfd::raw),
            Arm::WaitId => None,
        };
        self.op = match fd {
            Some(fd) => LoopOp::Poll(self.proactor.poll_add(fd, libc::POLLIN as u32)),
            None => {
                // No descriptor needed any more: release it now.
                drop(self.token.pidfd().take());
                let count = Counted::new(&self.inner.waitids);
                let wait = Plain::WaitIdPid {
                    pid: self.child.pid(),
                };
                LoopOp::Wait(self.proactor.submit_keeping(wait, count))
            }
        };
    }

    /// Applies the machine's step for a completion with result `res`.
    fn step(&mut self, res: i32) {
        let step = self.machine.complete(
            res,
            &mut Reap {
                inner: &self.inner,
                child: &self.child,
            },
        );
        match step {
            Step::Done => {
                self.op = LoopOp::Done;
                drop(self.token.pidfd().take());
                self.inner.forget(&self.child);
            }
            Step::Arm(a) => self.arm(a),
            Step::HandOver => self.hand_over(),
        }
    }

    fn hand_over(&mut self) {
        self.op = LoopOp::Done;
        let pidfd = self.token.pidfd().take();
        self.inner.hand_over(&self.child, pidfd);
    }
}

/// The CQE result of an op's outcome: `>= 0`, or a negative errno.
fn raw(res: io::Result<i32>) -> i32 {
    match res {
        Ok(n) => n,
        Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
    }
}

impl Future for LoopWatch {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        loop {
            if this.token.is_cancelled() {
                // Dropping the op cancels it; the pidfd was closed by cancel().
                this.op = LoopOp::Done;
            }
            if matches!(this.op, LoopOp::Done) {
                return Poll::Ready(());
            }
            this.token.set_waker(cx.waker());
            if this.token.is_cancelled() {
                continue;
            }
            let res = match &mut this.op {
                LoopOp::Done => continue,
                LoopOp::Poll(op) => match Pin::new(op).poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready((res, ())) => raw(res),
                },
                LoopOp::Wait(op) => match Pin::new(op).poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready((res, _count)) => raw(res),
                },
            };
            this.op = LoopOp::Done;
            if this.token.is_cancelled() {
                continue;
            }
            this.step(res);
        }
    }
}

impl Drop for LoopWatch {
    fn drop(&mut self) {
        if matches!(self.op, LoopOp::Done) || self.token.is_cancelled() {
            return;
        }
        // Dropped before its child was reaped: its loop is closing. Nothing
        // was reaped by the operation (WNOWAIT or a poll): hand it over.
        self.hand_over();
    }
}
