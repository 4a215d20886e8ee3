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
//! [`Proactor::submit`] hands the kernel an SQE together with the resources it
//! points into (a buffer, a `siginfo_t`, ...). Those resources move into the
//! ring's operation table and stay there until the kernel posts the
//! operation's completion — *not* until its future is dropped. Dropping an
//! [`Op`] before it completes only marks it abandoned and asks the kernel to
//! cancel it; the buffer is freed when the cancelled operation's CQE arrives.
//! If the ring is torn down with operations the kernel never finished, their
//! resources are leaked rather than freed under the kernel's feet.
//!
//! # Wake-ups
//!
//! The loop's [`Notifier`] eventfd is watched by a one-shot `POLL_ADD`, re-armed
//! after each wake-up, so `call_soon_threadsafe`, cross-thread wakers and
//! signal handlers can interrupt `io_uring_enter`.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use io_uring::{IoUring, opcode, squeue, types};
use slab::Slab;

use super::notify::Notifier;
use super::op_state::{OnCompletion, OnDrop, OpState};

/// `user_data` of the wake-up poll on the notifier eventfd.
const WAKE_TAG: u64 = u64::MAX;
/// `user_data` of cancellation requests, whose own completions are ignored.
const CANCEL_TAG: u64 = u64::MAX - 1;
/// Submission queue entries; the completion queue gets four times as many,
/// and the kernel buffers overflow beyond that (IORING_FEAT_NODROP).
const SQ_ENTRIES: u32 = 1024;
/// How long teardown waits for cancelled operations to complete before it
/// leaks their resources instead of freeing them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// `Done` holds the CQE's result: >= 0, or a negative errno.
struct OpSlot {
    state: OpState<i32>,
    resources: Option<Box<dyn Any>>,
}

struct Inner {
    ring: RefCell<IoUring>,
    ops: RefCell<Slab<OpSlot>>,
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
            .field("in_flight", &self.inner.ops.borrow().len())
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
        let ring = IoUring::builder()
            .setup_cqsize(SQ_ENTRIES * 4)
            .build(SQ_ENTRIES)
            .map_err(unsupported)?;
        Ok(Proactor {
            inner: Rc::new(Inner {
                ring: RefCell::new(ring),
                ops: RefCell::new(Slab::with_capacity(64)),
                wake_armed: Cell::new(false),
                cqes: RefCell::new(Vec::with_capacity(256)),
                shut_down: Cell::new(false),
            }),
        })
    }

    /// Queues an operation; it reaches the kernel at the loop's next
    /// iteration (or at once if the submission queue is full).
    ///
    /// # Safety
    ///
    /// Every pointer in `entry` must point into heap memory owned by
    /// `resources` (which does not move when `resources` itself moves) or into
    /// memory that outlives the operation, and every descriptor it names must
    /// stay open until the operation completes or is cancelled.
    pub(crate) unsafe fn submit<R: 'static>(&self, entry: squeue::Entry, resources: R) -> Op<R> {
        if self.inner.shut_down.get() {
            let mut state = OpState::new();
            let _ = state.complete(-libc::ECANCELED);
            let key = self.inner.ops.borrow_mut().insert(OpSlot {
                state,
                resources: Some(Box::new(resources)),
            });
            return Op::new(self.clone(), key);
        }
        let key = self.inner.ops.borrow_mut().insert(OpSlot {
            state: OpState::new(),
            resources: Some(Box::new(resources)),
        });
        // SAFETY: forwarded from this function's contract; the resources now
        // live in the op table until the completion arrives.
        unsafe { self.push(&entry.user_data(key as u64)) };
        Op::new(self.clone(), key)
    }

    /// A `POLL_ADD` for `events` (e.g. `libc::POLLIN`) on `fd`.
    pub(crate) fn poll_add(&self, fd: RawFd, events: u32) -> Op<()> {
        let entry = opcode::PollAdd::new(types::Fd(fd), events).build();
        // SAFETY: a poll carries no pointer; the kernel takes its own
        // reference to the file, so closing `fd` early cannot hurt memory.
        unsafe { self.submit(entry, ()) }
    }

    // Pipes read and write in place after a readiness `poll_add` (see
    // subprocess/pipes.rs); these owned-buffer operations stay for callers
    // that want completions (and are exercised by the tests below).
    #[allow(dead_code)]
    /// Reads up to `buf.capacity() - buf.len()` bytes into `buf`'s spare
    /// capacity. The length is left unchanged: on `Ok(n)` the caller extends
    /// it by `n` (`set_len(len + n)`), which the kernel has initialised.
    pub(crate) fn read(&self, fd: RawFd, mut buf: Vec<u8>) -> Op<Vec<u8>> {
        let len = buf.len();
        let spare = buf.capacity() - len;
        // SAFETY: the pointer is into `buf`'s heap allocation past its length;
        // `buf` is owned by the op until the completion.
        let ptr = unsafe { buf.as_mut_ptr().add(len) };
        let entry = opcode::Read::new(types::Fd(fd), ptr, spare.min(u32::MAX as usize) as u32)
            .offset(u64::MAX)
            .build();
        // SAFETY: see above.
        unsafe { self.submit(entry, buf) }
    }

    #[allow(dead_code)]
    /// Writes `buf[offset..]`.
    pub(crate) fn write(&self, fd: RawFd, buf: Vec<u8>, offset: usize) -> Op<Vec<u8>> {
        let start = offset.min(buf.len());
        let rest = &buf[start..];
        let entry = opcode::Write::new(
            types::Fd(fd),
            rest.as_ptr(),
            rest.len().min(u32::MAX as usize) as u32,
        )
        .offset(u64::MAX)
        .build();
        // SAFETY: the pointer is into `buf`'s heap allocation, which the op
        // owns until the completion.
        unsafe { self.submit(entry, buf) }
    }

    /// # Safety
    /// As for [`submit`](Self::submit).
    unsafe fn push(&self, entry: &squeue::Entry) {
        let mut ring = self.inner.ring.borrow_mut();
        loop {
            // SAFETY: forwarded from the caller.
            if unsafe { ring.submission().push(entry) }.is_ok() {
                return;
            }
            // Queue full: hand what is queued to the kernel and retry.
            if let Err(e) = ring.submit() {
                if e.raw_os_error() != Some(libc::EBUSY) && e.raw_os_error() != Some(libc::EINTR) {
                    tracing::error!("io_uring submit failed: {e}");
                }
                // EBUSY: completions must be reaped first; harvesting happens
                // in `poll`, but we cannot wait here, so reap inline.
                drop(ring);
                self.harvest();
                ring = self.inner.ring.borrow_mut();
            }
        }
    }

    fn cancel(&self, key: usize) {
        let entry = opcode::AsyncCancel::new(key as u64)
            .build()
            .user_data(CANCEL_TAG);
        // SAFETY: a cancel request carries no pointer.
        unsafe { self.push(&entry) };
    }

    fn arm_wake(&self, notifier: &Notifier) {
        if !self.inner.wake_armed.get() {
            let entry = opcode::PollAdd::new(types::Fd(notifier.as_raw_fd()), libc::POLLIN as u32)
                .build()
                .user_data(WAKE_TAG);
            // SAFETY: no pointers; the notifier fd lives as long as the loop.
            unsafe { self.push(&entry) };
            self.inner.wake_armed.set(true);
        }
    }

    /// Submits what is queued, waits up to `timeout` (forever if `None`) for
    /// at least one completion, and dispatches every completion available.
    pub(crate) fn poll(&self, timeout: Option<Duration>, notifier: &Notifier) -> io::Result<()> {
        self.arm_wake(notifier);
        {
            let mut ring = self.inner.ring.borrow_mut();
            let res = match timeout {
                Some(t) if t.is_zero() => {
                    if ring.submission().is_empty() {
                        Ok(0)
                    } else {
                        ring.submit()
                    }
                }
                Some(t) => {
                    let ts = types::Timespec::new()
                        .sec(t.as_secs())
                        .nsec(t.subsec_nanos());
                    let args = types::SubmitArgs::new().timespec(&ts);
                    ring.submitter().submit_with_args(1, &args)
                }
                None => ring.submit_and_wait(1),
            };
            if let Err(e) = res {
                match e.raw_os_error() {
                    Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
                    | Some(libc::EAGAIN) => {}
                    _ => {
                        return Err(io::Error::new(
                            e.kind(),
                            format!("io_uring_enter failed: {e}"),
                        ));
                    }
                }
            }
        }
        if self.harvest_into(Some(notifier)) {
            self.inner.wake_armed.set(false);
            notifier.reset();
        }
        Ok(())
    }

    fn harvest(&self) {
        self.harvest_into(None);
    }

    /// Drains the completion queue; returns whether the wake-up poll fired.
    fn harvest_into(&self, notifier: Option<&Notifier>) -> bool {
        let mut cqes = self.inner.cqes.borrow_mut();
        cqes.clear();
        {
            let mut ring = self.inner.ring.borrow_mut();
            cqes.extend(ring.completion().map(|c| (c.user_data(), c.result())));
        }
        let mut woke = false;
        let mut wakers = Vec::new();
        {
            let mut ops = self.inner.ops.borrow_mut();
            for &(tag, res) in cqes.iter() {
                match tag {
                    WAKE_TAG => {
                        if notifier.is_some() {
                            woke = true;
                        } else {
                            // Reaped inline from `push`: re-arm at next poll.
                            self.inner.wake_armed.set(false);
                        }
                    }
                    CANCEL_TAG => {}
                    key => {
                        let key = key as usize;
                        let Some(slot) = ops.get_mut(key) else {
                            continue;
                        };
                        match slot.state.complete(res) {
                            OnCompletion::Wake(w) => wakers.extend(w),
                            OnCompletion::Free => {
                                ops.remove(key);
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
            .ops
            .borrow()
            .iter()
            .filter(|(_, s)| s.state.in_flight())
            .count()
    }

    /// Cancels everything in flight and waits (bounded) for the kernel to
    /// finish with it. Resources of operations still in the kernel after the
    /// grace period are leaked, never freed.
    pub(crate) fn shutdown(&self) {
        if self.inner.shut_down.replace(true) {
            return;
        }
        let keys: Vec<usize> = self
            .inner
            .ops
            .borrow()
            .iter()
            .filter(|(_, s)| s.state.in_flight())
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
            {
                let ring = self.inner.ring.borrow_mut();
                let t = (deadline - now).min(Duration::from_millis(50));
                let ts = types::Timespec::new()
                    .sec(t.as_secs())
                    .nsec(t.subsec_nanos());
                let args = types::SubmitArgs::new().timespec(&ts);
                let _ = ring.submitter().submit_with_args(1, &args);
            }
            self.harvest();
        }
        let mut ops = self.inner.ops.borrow_mut();
        let mut leaked = 0usize;
        for (_, slot) in ops.iter_mut() {
            if slot.state.in_flight() {
                // The kernel may still write into these: never free them.
                if let Some(r) = slot.resources.take() {
                    std::mem::forget(r);
                    leaked += 1;
                }
                if let Some(w) = slot.state.fail(-libc::ECANCELED) {
                    w.wake();
                }
            }
        }
        if leaked > 0 {
            tracing::warn!(
                "io_uring torn down with {leaked} operation(s) the kernel did not finish; \
                 their buffers were leaked on purpose"
            );
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // `shutdown` ran from the loop's close; if it did not (a proactor
        // outside a loop), leak whatever is still in the kernel.
        for (_, slot) in self.ops.get_mut().iter_mut() {
            if slot.state.in_flight() {
                if let Some(r) = slot.resources.take() {
                    std::mem::forget(r);
                }
            }
        }
    }
}

/// The future of one io_uring operation: its result (`Ok(n)` with the CQE's
/// non-negative result, or the errno as an error) and the resources given
/// to [`Proactor::submit`].
pub(crate) struct Op<R: 'static> {
    proactor: Proactor,
    key: usize,
    finished: bool,
    _resources: PhantomData<R>,
}

impl<R: 'static> Op<R> {
    fn new(proactor: Proactor, key: usize) -> Op<R> {
        Op {
            proactor,
            key,
            finished: false,
            _resources: PhantomData,
        }
    }
}

// The op holds no `R` (the resources live in the table), so moving it is fine.
impl<R: 'static> Unpin for Op<R> {}

impl<R: 'static> std::fmt::Debug for Op<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Op").field("key", &self.key).finish()
    }
}

impl<R: 'static> Future for Op<R> {
    type Output = (io::Result<i32>, R);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let mut ops = this.proactor.inner.ops.borrow_mut();
        let Some(slot) = ops.get_mut(this.key) else {
            // Only reachable if polled after completion.
            return Poll::Pending;
        };
        let Some(res) = slot.state.poll_done(cx) else {
            return Poll::Pending;
        };
        let slot = ops.remove(this.key);
        this.finished = true;
        let resources = slot
            .resources
            .and_then(|b| b.downcast::<R>().ok())
            .map(|b| *b);
        let Some(resources) = resources else {
            // The buffers were leaked at shutdown: nothing to return.
            return Poll::Pending;
        };
        let out = if res < 0 {
            Err(io::Error::from_raw_os_error(-res))
        } else {
            Ok(res)
        };
        Poll::Ready((out, resources))
    }
}

impl<R: 'static> Drop for Op<R> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut ops = self.proactor.inner.ops.borrow_mut();
        let Some(slot) = ops.get_mut(self.key) else {
            return;
        };
        match slot.state.abandon() {
            OnDrop::Free => {
                ops.remove(self.key);
            }
            OnDrop::Cancel => {
                drop(ops);
                if !self.proactor.inner.shut_down.get() {
                    self.proactor.cancel(self.key);
                }
            }
            OnDrop::Keep => {}
        }
    }
}

#[cfg(test)]
mod tests {
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
        // `read` appends into spare capacity but does not set the length:
        // the caller owns that step.
        assert_eq!(out.0, 4);
        assert_eq!(out.1.len(), 0);
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
}
