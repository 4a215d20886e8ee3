//! The proactor backend: a completion-based loop on a real io_uring.
//!
//! Why completions: an operation is handed to the kernel once and the loop
//! learns that it *finished* — no readiness round trip, no re-arming, and
//! whole batches of operations go in with one `io_uring_enter`. This is the
//! Linux analog of asyncio's `ProactorEventLoop` (I/O completion ports on
//! Windows).
//!
//! # Operations and memory safety
//!
//! Every entry is built and pushed by the ring core (`ring/`), and this file
//! holds no `unsafe`. [`Proactor::submit`] hands the core an operation that
//! owns what the kernel points into (a buffer, a `siginfo_t`, ...). It moves
//! into the core's operation table and stays there until the kernel posts
//! the operation's completion — *not* until its future is dropped. Dropping
//! an [`Op`] before it completes only marks it abandoned and asks the kernel
//! to cancel it; the buffer is freed when the cancelled operation's CQE
//! arrives. If the ring is torn down with operations the kernel never
//! finished, their resources are leaked rather than freed under the
//! kernel's feet.
//!
//! # Closing
//!
//! [`Proactor::shutdown`] (the loop's `close()`) cancels what is in flight,
//! waits a bounded time for the kernel, then closes the io_uring at once:
//! its descriptor and mappings do not wait for the last handle to the loop
//! (a clone, a child watcher's task state). The operation table stays, so
//! every later use (submit, poll, cancel, `in_flight`) works as it did
//! after shutdown before: new operations complete with `ECANCELED` at once
//! and never reach a kernel.
//!
//! # Wake-ups
//!
//! The loop's [`Notifier`] eventfd is watched by a one-shot `POLL_ADD`, re-armed
//! after each wake-up, so `call_soon_threadsafe`, cross-thread wakers and
//! signal handlers can interrupt `io_uring_enter`.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use super::notify::Notifier;
use super::op_state::{OnCompletion, OnDrop, OpState};
use super::ring::{FIRST_TAG, OpRing, Plain, Read, RingOp, Ticket, Wait, Write};

/// `user_data` of the wake-up poll on the notifier eventfd.
const WAKE_TAG: u64 = u64::MAX;
/// `user_data` of cancellation requests, whose own completions are ignored.
const CANCEL_TAG: u64 = u64::MAX - 1;
const _: () = assert!(CANCEL_TAG >= FIRST_TAG);
/// Submission queue entries; the completion queue gets four times as many,
/// and the kernel buffers overflow beyond that (IORING_FEAT_NODROP).
const SQ_ENTRIES: u32 = 1024;
/// How long teardown waits for cancelled operations to complete before it
/// leaves their resources to the ring core (which leaks them).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Each operation's state: `Done` holds the CQE's result (>= 0, or a
/// negative errno). Its resources are held by the ring core.
type State = OpState<i32>;

struct Inner {
    ring: RefCell<OpRing<State>>,
    wake_armed: Cell<bool>,
    cqes: RefCell<Vec<(u64, i32)>>,
    shut_down: Cell<bool>,
}

/// One loop's io_uring and its table of operations in flight.
#[derive(Clone)]
pub(crate) struct Proactor {
    inner: Rc<Inner>,
}

impl std::fmt::Debug for Proactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proactor")
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

fn unsupported(e: io::Error) -> io::Error {
    let kind = match e.raw_os_error() {
        Some(libc::ENOSYS) | Some(libc::EPERM) | Some(libc::EOPNOTSUPP) => {
            io::ErrorKind::Unsupported
        }
        _ => e.kind(),
    };
    io::Error::new(
        kind,
        format!(
            "io_uring is not available ({e}); use EventLoop::selector() or the \
             SelectorEventLoopPolicy instead (is io_uring disabled by \
             kernel.io_uring_disabled or a seccomp filter?)"
        ),
    )
}

impl Proactor {
    /// Sets up a ring. `Unsupported` when the kernel has no io_uring.
    pub(crate) fn new() -> io::Result<Proactor> {
        let ring = OpRing::new(SQ_ENTRIES, SQ_ENTRIES * 4).map_err(unsupported)?;
        Ok(Proactor {
            inner: Rc::new(Inner {
                ring: RefCell::new(ring),
                wake_armed: Cell::new(false),
                cqes: RefCell::new(Vec::with_capacity(256)),
                shut_down: Cell::new(false),
            }),
        })
    }

    /// A fresh operation's state, and whether it goes to the kernel: after
    /// shutdown it does not, and completes with `ECANCELED` at once.
    fn fresh(&self) -> (State, bool) {
        let mut state = OpState::new();
        if self.inner.shut_down.get() {
            let _ = state.complete(-libc::ECANCELED);
            return (state, false);
        }
        (state, true)
    }

    /// Queues `op`; it reaches the kernel at the loop's next iteration (or
    /// at once if the submission queue is full). The future gives back the
    /// operation's output (its buffer, say) with the result.
    pub(crate) fn submit<O: RingOp>(&self, op: O) -> Op<O::Output> {
        let (state, to_kernel) = self.fresh();
        let ticket = self.inner.ring.borrow_mut().submit(op, state, to_kernel);
        Op::new(self.clone(), ticket)
    }

    /// As [`submit`](Self::submit), keeping `keep` alive until the kernel
    /// is done with the operation (even if the future is dropped first).
    pub(crate) fn submit_keeping<O: RingOp, K: 'static>(
        &self,
        op: O,
        keep: K,
    ) -> Op<(O::Output, K)> {
        let (state, to_kernel) = self.fresh();
        let ticket = self
            .inner
            .ring
            .borrow_mut()
            .submit_keeping(op, keep, state, to_kernel);
        Op::new(self.clone(), ticket)
    }

    /// A `POLL_ADD` for `events` (e.g. `libc::POLLIN`) on `fd`, which the
    /// caller keeps open while the future lives.
    pub(crate) fn poll_add(&self, fd: RawFd, events: u32) -> Op<()> {
        self.submit(Plain::PollAdd { fd, events })
    }

    // Pipes read and write in place after a readiness `poll_add` (see
    // subprocess/pipes.rs); these owned-buffer operations stay for callers
    // that want completions (and are exercised by the tests below).
    #[allow(dead_code)]
    /// Reads up to `buf.capacity() - buf.len()` bytes, appended to `buf`
    /// (its length grows by what was read).
    pub(crate) fn read(&self, fd: RawFd, buf: Vec<u8>) -> Op<Vec<u8>> {
        self.submit(Read::new(fd, buf))
    }

    #[allow(dead_code)]
    /// Writes `buf[offset..]`.
    pub(crate) fn write(&self, fd: RawFd, buf: Vec<u8>, offset: usize) -> Op<Vec<u8>> {
        self.submit(Write::new(fd, buf, offset))
    }

    fn cancel(&self, key: usize) {
        let cancel = Plain::Cancel {
            user_data: key as u64,
        };
        self.inner.ring.borrow_mut().push_tagged(cancel, CANCEL_TAG);
    }

    fn arm_wake(&self, notifier: &Notifier) {
        if !self.inner.wake_armed.get() {
            // The notifier's eventfd is open until the loop closes, which
            // closes this ring first.
            let poll = Plain::PollAdd {
                fd: notifier.as_raw_fd(),
                events: libc::POLLIN as u32,
            };
            self.inner.ring.borrow_mut().push_tagged(poll, WAKE_TAG);
            self.inner.wake_armed.set(true);
        }
    }

    /// Submits what is queued, waits up to `timeout` (forever if `None`) for
    /// at least one completion, and dispatches every completion available.
    /// Fails once the proactor is shut down (its ring is closed).
    pub(crate) fn poll(&self, timeout: Option<Duration>, notifier: &Notifier) -> io::Result<()> {
        if self.inner.shut_down.get() {
            return Err(io::Error::other(
                "the event loop is closed: its io_uring was released",
            ));
        }
        self.arm_wake(notifier);
        let wait = match timeout {
            Some(t) if t.is_zero() => Wait::No,
            Some(t) => Wait::Upto(t),
            None => Wait::Forever,
        };
        let res = self.inner.ring.borrow_mut().enter(wait);
        if let Err(e) = res {
            match e.raw_os_error() {
                Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::EAGAIN) => {}
                _ => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("io_uring_enter failed: {e}"),
                    ));
                }
            }
        }
        if self.harvest() {
            self.inner.wake_armed.set(false);
            notifier.reset();
        }
        Ok(())
    }

    /// Drains the completion queue; returns whether the wake-up poll fired.
    fn harvest(&self) -> bool {
        let mut cqes = self.inner.cqes.borrow_mut();
        cqes.clear();
        let mut woke = false;
        let mut wakers = Vec::new();
        {
            let mut ring = self.inner.ring.borrow_mut();
            ring.drain(&mut cqes);
            for &(tag, res) in cqes.iter() {
                match tag {
                    WAKE_TAG => woke = true,
                    CANCEL_TAG => {}
                    key => {
                        let key = key as usize;
                        let Some(state) = ring.state_mut(key) else {
                            continue;
                        };
                        match state.complete(res) {
                            OnCompletion::Wake(w) => wakers.extend(w),
                            OnCompletion::Free => {
                                ring.remove(key);
                            }
                        }
                    }
                }
            }
        }
        drop(cqes);
        for w in wakers {
            w.wake();
        }
        woke
    }

    /// Number of operations the kernel has not completed yet.
    pub(crate) fn in_flight(&self) -> usize {
        self.inner
            .ring
            .borrow()
            .states()
            .filter(|(_, s)| s.in_flight())
            .count()
    }

    /// Cancels everything in flight, waits (bounded) for the kernel to
    /// finish with it, and closes the io_uring. Operations still in the
    /// kernel after the grace period fail with `ECANCELED`; the ring core
    /// leaks their resources as it closes rather than free them under the
    /// kernel. Later operations complete with `ECANCELED` at once.
    pub(crate) fn shutdown(&self) {
        if self.inner.shut_down.replace(true) {
            return;
        }
        let keys: Vec<usize> = self
            .inner
            .ring
            .borrow()
            .states()
            .filter(|(_, s)| s.in_flight())
            .map(|(k, _)| k)
            .collect();
        for k in keys {
            self.cancel(k);
        }
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        while self.in_flight() > 0 {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let t = (deadline - now).min(Duration::from_millis(50));
            let _ = self.inner.ring.borrow_mut().enter(Wait::Upto(t));
            if self.harvest() {
                // Re-armed at the next poll, if there is one.
                self.inner.wake_armed.set(false);
            }
        }
        let mut wakers = Vec::new();
        {
            let mut ring = self.inner.ring.borrow_mut();
            let stuck: Vec<usize> = ring
                .states()
                .filter(|(_, s)| s.in_flight())
                .map(|(k, _)| k)
                .collect();
            for &k in &stuck {
                if let Some(w) = ring.state_mut(k).and_then(|s| s.fail(-libc::ECANCELED)) {
                    wakers.push(w);
                }
            }
            if !stuck.is_empty() {
                tracing::warn!(
                    "io_uring torn down with {} operation(s) the kernel did not finish; \
                     their buffers are leaked on purpose",
                    stuck.len()
                );
            }
            // Now, not when the last handle goes: asyncio's close() closes
            // its proactor at once too.
            ring.close();
            self.inner.wake_armed.set(false);
        }
        for w in wakers {
            w.wake();
        }
    }
}

/// The future of one io_uring operation: its result (`Ok(n)` with the CQE's
/// non-negative result, or the errno as an error) and what the operation
/// gives back (its buffer, what was kept with it).
pub(crate) struct Op<R: 'static> {
    proactor: Proactor,
    ticket: Ticket<R>,
    finished: bool,
}

impl<R: 'static> Op<R> {
    fn new(proactor: Proactor, ticket: Ticket<R>) -> Op<R> {
        Op {
            proactor,
            ticket,
            finished: false,
        }
    }
}

impl<R: 'static> std::fmt::Debug for Op<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Op")
            .field("key", &self.ticket.key())
            .finish()
    }
}

impl<R: 'static> Future for Op<R> {
    type Output = (io::Result<i32>, R);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let mut ring = this.proactor.inner.ring.borrow_mut();
        let Some(state) = ring.state_mut(this.ticket.key()) else {
            // Only reachable if polled after completion.
            return Poll::Pending;
        };
        let Some(res) = state.poll_done(cx) else {
            return Poll::Pending;
        };
        this.finished = true;
        let Some((_, Some(output))) = ring.take(&this.ticket, res) else {
            // Failed at shutdown while the kernel still had it: its
            // resources were leaked by the ring core, nothing to return.
            return Poll::Pending;
        };
        let out = if res < 0 {
            Err(io::Error::from_raw_os_error(-res))
        } else {
            Ok(res)
        };
        Poll::Ready((out, output))
    }
}

impl<R: 'static> Drop for Op<R> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let key = self.ticket.key();
        let mut ring = self.proactor.inner.ring.borrow_mut();
        let Some(state) = ring.state_mut(key) else {
            return;
        };
        match state.abandon() {
            OnDrop::Free => {
                ring.remove(key);
            }
            OnDrop::Cancel => {
                drop(ring);
                if !self.proactor.inner.shut_down.get() {
                    self.proactor.cancel(key);
                }
            }
            OnDrop::Keep => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::os::fd::AsRawFd;

    use crate::EventLoop;

    fn pipe() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).expect("pipe")
    }

    #[test]
    fn read_and_write_complete_through_the_ring() {
        let lp = EventLoop::proactor().unwrap();
        let p = lp.proactor_backend().unwrap().clone();
        let (r, w) = pipe();
        let out = lp
            .run_until_complete(async {
                let (res, buf) = p.write(w.as_raw_fd(), b"hello ring".to_vec(), 6).await;
                assert_eq!(res.unwrap(), 4);
                assert_eq!(buf, b"hello ring");
                let (res, buf) = p.read(r.as_raw_fd(), Vec::with_capacity(64)).await;
                let n = res.unwrap() as usize;
                (n, buf)
            })
            .unwrap();
        // `read` appends what it read to the buffer.
        assert_eq!(out.0, 4);
        assert_eq!(out.1, b"ring");
    }

    #[test]
    fn a_dropped_read_keeps_its_buffer_until_the_kernel_is_done() {
        let lp = EventLoop::proactor().unwrap();
        let p = lp.proactor_backend().unwrap().clone();
        let (r, w) = pipe();
        lp.run_until_complete(async {
            let op = p.read(r.as_raw_fd(), Vec::with_capacity(1 << 16));
            // Poll once so it is in the kernel, then drop it.
            let mut op = Box::pin(op);
            let _ = futures_util::poll!(op.as_mut());
            drop(op);
            crate::sleep(std::time::Duration::from_millis(5)).await;
        })
        .unwrap();
        // Whatever the cancel raced with, writing now must not touch freed
        // memory (run under a sanitizer or valgrind to see it), and the op
        // table drains.
        rustix::io::write(&w, b"late data").unwrap();
        lp.run_until_complete(crate::sleep(std::time::Duration::from_millis(5)))
            .unwrap();
        assert_eq!(p.in_flight(), 0);
    }

    #[test]
    fn close_cancels_operations_in_flight() {
        let lp = EventLoop::proactor().unwrap();
        let p = lp.proactor_backend().unwrap().clone();
        let (r, _w) = pipe();
        let t = lp.create_task({
            let p = p.clone();
            let fd = r.as_raw_fd();
            async move { p.read(fd, Vec::with_capacity(16)).await.0 }
        });
        t.detach();
        lp.run_until_complete(crate::sleep(std::time::Duration::from_millis(2)))
            .unwrap();
        assert_eq!(p.in_flight(), 1);
        lp.close().unwrap();
        assert_eq!(p.in_flight(), 0);
    }

    #[test]
    fn a_closed_proactor_completes_everything_at_once_with_ecanceled() {
        let lp = EventLoop::proactor().unwrap();
        let p = lp.proactor_backend().unwrap().clone();
        let (r, w) = pipe();
        lp.close().unwrap();
        let waker = futures_util::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        let mut op = Box::pin(p.read(r.as_raw_fd(), Vec::with_capacity(8)));
        let std::task::Poll::Ready((res, buf)) = op.as_mut().poll(&mut cx) else {
            panic!("a read on a closed proactor completes at once");
        };
        assert_eq!(res.unwrap_err().raw_os_error(), Some(libc::ECANCELED));
        assert_eq!(buf.capacity(), 8, "the buffer comes back");
        let mut op = Box::pin(p.write(w.as_raw_fd(), b"x".to_vec(), 0));
        assert!(op.as_mut().poll(&mut cx).is_ready());
        let mut op = Box::pin(p.poll_add(r.as_raw_fd(), libc::POLLIN as u32));
        assert!(op.as_mut().poll(&mut cx).is_ready());
        // Dropped unpolled: nothing to cancel, nothing left.
        drop(p.read(r.as_raw_fd(), Vec::with_capacity(8)));
        assert_eq!(p.in_flight(), 0);
        let n = super::super::notify::Notifier::new().unwrap();
        assert!(p.poll(Some(std::time::Duration::ZERO), &n).is_err());
        p.shutdown();
    }
}
