//! The proactor backend on Windows: a completion-based loop on an I/O
//! completion port (asyncio's `IocpProactor`, the loop behind
//! `WindowsProactorEventLoopPolicy`).
//!
//! The loop sleeps in `GetQueuedCompletionStatusEx`, no longer than its next
//! timer. Three kinds of packets arrive:
//!
//! * a wake-up ([`WAKE_KEY`], posted by the loop's [`Notifier`]) from
//!   `call_soon_threadsafe`, `stop` or a task woken on another thread;
//! * the completion of an overlapped read or write on a handle associated
//!   with the port ([`Iocp::register`]);
//! * the completion of a [`wait_for_handle`](Iocp::wait_for_handle): a
//!   `RegisterWaitForSingleObject` wait on the OS thread pool whose callback
//!   posts a packet to the port, as CPython's `IocpProactor.wait_for_handle`
//!   does. This is how a loop learns that a process exited with no thread
//!   of its own.
//!
//! # Operations and memory safety
//!
//! Exactly as for io_uring (`proactor.rs` on Linux): [`Iocp::submit`]
//! moves the operation's `OVERLAPPED` and buffers into the loop's operation
//! table, boxed so that they never move, and they stay there until the
//! completion packet arrives — not until the future is dropped. Dropping an
//! unfinished [`Op`] marks it abandoned and calls `CancelIoEx`; the memory is
//! freed when the (cancelled) completion arrives. On close every operation is
//! cancelled, the loop waits a bounded time for the packets, and leaks
//! whatever the kernel still owns rather than freeing it under its feet.
//! Then the loop lets go of the port, and the loop's notifier does too, so
//! the port is closed at `close()`, not when the last handle to the loop
//! goes (a wait leaked at close keeps its own reference until its callback
//! has run). Later operations fail at once with `ERROR_OPERATION_ABORTED`.
//!
//! A wait registration is cancelled with `UnregisterWaitEx`. The callback and
//! the canceller race for one atomic flag in a reference-counted context that
//! the registration owns: whoever claims it decides whether a packet is
//! posted, and the context is freed only after the wait is unregistered
//! (blocking until a callback in progress has returned).

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::ffi::c_void;
use std::future::Future;
use std::io;
use std::marker::PhantomData;
use std::pin::Pin;
use std::ptr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use slab::Slab;
use windows_sys::Win32::Foundation::{
    CloseHandle, ERROR_IO_PENDING, ERROR_OPERATION_ABORTED, HANDLE, INVALID_HANDLE_VALUE,
    RtlNtStatusToDosError, WAIT_TIMEOUT,
};
use windows_sys::Win32::Storage::FileSystem::{ReadFile, WriteFile};
use windows_sys::Win32::System::IO::{
    CancelIoEx, CreateIoCompletionPort, GetQueuedCompletionStatusEx, OVERLAPPED, OVERLAPPED_ENTRY,
    PostQueuedCompletionStatus,
};
use windows_sys::Win32::System::Threading::{
    INFINITE, RegisterWaitForSingleObject, UnregisterWaitEx, WT_EXECUTEINWAITTHREAD,
    WT_EXECUTEONLYONCE,
};

use super::notify::{Notifier, WakeTarget};
use super::op_state::{OnCompletion, OnDrop, OpState};

/// Completion key of the loop's wake-up packets.
pub(crate) const WAKE_KEY: usize = 1;
/// Completion key of overlapped IO on handles associated with the port.
const IO_KEY: usize = 2;
/// Completion key of `wait_for_handle` packets.
const WAIT_KEY: usize = 3;
/// Packets taken per `GetQueuedCompletionStatusEx`.
const BATCH: usize = 256;
/// How long teardown waits for cancelled operations to complete before it
/// leaks their resources instead of freeing them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

fn last_error(what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what} failed: {e}"))
}

fn aborted() -> io::Error {
    io::Error::from_raw_os_error(ERROR_OPERATION_ABORTED as i32)
}

/// An I/O completion port handle, closed when the last owner drops it. The
/// loop, its [`Notifier`] and every pending wait registration own one.
pub(crate) struct Port {
    handle: HANDLE,
}

// SAFETY: a completion port handle may be used from any thread; the value is
// only closed in `Drop`, when no other owner is left.
unsafe impl Send for Port {}
// SAFETY: as above; every operation on it is a thread-safe kernel call.
unsafe impl Sync for Port {}

impl Port {
    fn new() -> io::Result<Arc<Port>> {
        // SAFETY: creating a new port: no handle or pointer is passed in.
        let handle = unsafe { CreateIoCompletionPort(INVALID_HANDLE_VALUE, ptr::null_mut(), 0, 1) };
        if handle.is_null() {
            return Err(last_error("CreateIoCompletionPort (new port)"));
        }
        Ok(Arc::new(Port { handle }))
    }

    /// Posts a packet (`PostQueuedCompletionStatus`); `overlapped` is the
    /// address of the operation's `OVERLAPPED`, or 0.
    pub(crate) fn post(&self, bytes: u32, key: usize, overlapped: usize) -> io::Result<()> {
        // SAFETY: the port is open while `self` lives; the kernel only hands
        // the pointer back to whoever dequeues the packet.
        let ok = unsafe {
            PostQueuedCompletionStatus(self.handle, bytes, key, overlapped as *const OVERLAPPED)
        };
        if ok == 0 {
            return Err(last_error("PostQueuedCompletionStatus"));
        }
        Ok(())
    }
}

impl Drop for Port {
    fn drop(&mut self) {
        // SAFETY: we own the handle and nobody else uses it any more.
        unsafe { CloseHandle(self.handle) };
    }
}

impl std::fmt::Debug for Port {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Port").finish_non_exhaustive()
    }
}

/// The `OVERLAPPED` of one operation, with the key of its slot so that a
/// completion finds its way back. `repr(C)` with the `OVERLAPPED` first: the
/// pointer the kernel returns is a pointer to the header.
#[repr(C)]
struct Header {
    ov: OVERLAPPED,
    key: usize,
}

/// What a wait registration and its callback share.
struct WaitCtx {
    port: Arc<Port>,
    /// Address of the operation's header, posted back with the packet.
    header: usize,
    /// Set by whichever of the callback and a canceller comes first.
    claimed: AtomicBool,
}

/// Runs on the OS thread pool when the waited-on handle is signalled (or the
/// timeout elapsed): posts the completion to the loop's port.
///
/// # Safety
/// Only called by Windows, with the context given at registration.
unsafe extern "system" fn wait_callback(ctx: *mut c_void, timed_out: bool) {
    // SAFETY: `ctx` is the `Arc<WaitCtx>` reference owned by the
    // registration; it is released only after `UnregisterWaitEx` (blocking)
    // returned, so it outlives every callback.
    let ctx = unsafe { &*(ctx as *const WaitCtx) };
    if !ctx.claimed.swap(true, Ordering::SeqCst) {
        if let Err(e) = ctx.port.post(u32::from(timed_out), WAIT_KEY, ctx.header) {
            tracing::error!("cannot report a finished wait to its event loop: {e}");
        }
    }
}

/// What an operation is waiting on, for cancellation.
enum Source {
    /// Overlapped IO on this handle (`CancelIoEx`).
    Io(HANDLE),
    /// A thread-pool wait: the wait handle and the registration's reference
    /// to its context (from `Arc::into_raw`).
    Wait(HANDLE, *const WaitCtx),
    /// Nothing left to cancel.
    None,
}

/// Unregisters a wait, blocking until a callback in progress has returned,
/// then releases the registration's reference to the context.
///
/// # Safety
/// `wait` and `ctx` come from one successful registration, used once.
unsafe fn finish_wait(wait: HANDLE, ctx: *const WaitCtx) {
    // SAFETY: the wait handle is valid until this call, which frees it.
    if unsafe { UnregisterWaitEx(wait, INVALID_HANDLE_VALUE) } == 0 {
        tracing::warn!(
            "UnregisterWaitEx failed: {}; the wait context is leaked",
            io::Error::last_os_error()
        );
        return;
    }
    // SAFETY: no callback runs any more; this is the registration's reference.
    drop(unsafe { Arc::from_raw(ctx) });
}

/// `Done` holds the bytes transferred, or the error.
struct OpSlot {
    state: OpState<io::Result<u32>>,
    /// From `Box::into_raw`; null once leaked.
    header: *mut Header,
    resources: Option<Box<dyn Any>>,
    source: Source,
}

impl OpSlot {
    fn in_flight(&self) -> bool {
        self.state.in_flight()
    }

    /// Never frees what the kernel may still write to.
    fn leak(&mut self) {
        if let Some(r) = self.resources.take() {
            std::mem::forget(r);
        }
        self.header = ptr::null_mut();
        self.source = Source::None;
    }
}

impl Drop for OpSlot {
    fn drop(&mut self) {
        if !self.header.is_null() {
            // SAFETY: from `Box::into_raw`; a slot is dropped only once its
            // completion arrived (or it never reached the kernel).
            drop(unsafe { Box::from_raw(self.header) });
        }
    }
}

struct Inner {
    /// `None` once shut down (the loop is closed).
    port: RefCell<Option<Arc<Port>>>,
    ops: RefCell<Slab<OpSlot>>,
    entries: RefCell<Vec<OVERLAPPED_ENTRY>>,
    shut_down: Cell<bool>,
}

/// One loop's completion port and its table of operations in flight.
#[derive(Clone)]
pub(crate) struct Iocp {
    inner: Rc<Inner>,
}

impl std::fmt::Debug for Iocp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Iocp")
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

fn empty_entry() -> OVERLAPPED_ENTRY {
    OVERLAPPED_ENTRY {
        lpCompletionKey: 0,
        lpOverlapped: ptr::null_mut(),
        Internal: 0,
        dwNumberOfBytesTransferred: 0,
    }
}

/// Milliseconds for a Windows wait, rounded up so a timer due in 0.3 ms does
/// not make the loop spin; `INFINITE` for `None`.
fn millis(timeout: Option<Duration>) -> u32 {
    match timeout {
        None => INFINITE,
        Some(t) => {
            let ms = t.as_nanos().div_ceil(1_000_000);
            ms.min(u128::from(INFINITE - 1)) as u32
        }
    }
}

impl Iocp {
    /// Creates the port and makes it the loop's wake-up target.
    pub(crate) fn new(notifier: &Notifier) -> io::Result<Iocp> {
        let port = Port::new()?;
        notifier.set_target(WakeTarget::Port(Arc::clone(&port)));
        Ok(Iocp {
            inner: Rc::new(Inner {
                port: RefCell::new(Some(port)),
                ops: RefCell::new(Slab::with_capacity(64)),
                entries: RefCell::new((0..BATCH).map(|_| empty_entry()).collect()),
                shut_down: Cell::new(false),
            }),
        })
    }

    /// The port, or the closed-loop error once it is released.
    fn port(&self, doing: &str) -> io::Result<Arc<Port>> {
        self.inner.port.borrow().clone().ok_or_else(|| {
            io::Error::other(format!(
                "{doing}: the event loop is closed (its completion port was released)"
            ))
        })
    }

    /// Associates `handle` (opened with `FILE_FLAG_OVERLAPPED`) with the
    /// port, so that its overlapped IO completes here. A handle can belong
    /// to one port only, for good.
    pub(crate) fn register(&self, handle: HANDLE) -> io::Result<()> {
        let port = self.port("cannot associate a handle with the event loop")?;
        // SAFETY: associating a caller-owned handle; no memory is involved.
        let r = unsafe { CreateIoCompletionPort(handle, port.handle, IO_KEY, 0) };
        if r.is_null() {
            return Err(last_error(
                "CreateIoCompletionPort (associating a handle with the loop)",
            ));
        }
        Ok(())
    }

    fn insert(&self, source: Source) -> (usize, *mut Header) {
        let header = Box::into_raw(Box::new(Header {
            // SAFETY: OVERLAPPED is plain data; all-zero is its initial state.
            ov: unsafe { std::mem::zeroed() },
            key: 0,
        }));
        let key = self.inner.ops.borrow_mut().insert(OpSlot {
            state: OpState::new(),
            header,
            resources: None,
            source,
        });
        // SAFETY: we own the fresh allocation; the kernel has not seen it.
        unsafe { (*header).key = key };
        (key, header)
    }

    /// Starts an overlapped operation on `handle`: `start` gets the
    /// resources (already at their final heap address) and the `OVERLAPPED`
    /// to pass to the Windows call, and returns that call's result. An
    /// `ERROR_IO_PENDING` error means "in flight"; any other error completes
    /// the operation at once (no packet will come).
    ///
    /// # Safety
    ///
    /// Every pointer `start` hands to Windows must point into heap memory
    /// owned by `resources` (which does not move when the box moves) or into
    /// memory that outlives the operation; `handle` must be registered with
    /// this port and stay open until the operation completes or is
    /// cancelled.
    pub(crate) unsafe fn submit<R: 'static>(
        &self,
        handle: HANDLE,
        resources: R,
        start: impl FnOnce(&mut R, *mut OVERLAPPED) -> io::Result<()>,
    ) -> Op<R> {
        let mut resources = Box::new(resources);
        let (key, header) = self.insert(Source::Io(handle));
        let result = if self.inner.shut_down.get() {
            Err(aborted())
        } else {
            // SAFETY: `header` is ours until its completion; `ov` is its first
            // field. Pointers into `resources` stay valid: the box moves into
            // the table below without moving its contents.
            start(&mut resources, unsafe { &raw mut (*header).ov })
        };
        let mut ops = self.inner.ops.borrow_mut();
        let slot = &mut ops[key];
        slot.resources = Some(resources);
        match result {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(ERROR_IO_PENDING as i32) => {}
            Err(e) => {
                let _ = slot.state.complete(Err(e));
                slot.source = Source::None;
            }
        }
        Op::new(self.clone(), key)
    }

    /// Reads up to `buf.capacity() - buf.len()` bytes into `buf`'s spare
    /// capacity. The length is left unchanged: on `Ok(n)` the caller extends
    /// it by `n`, which the kernel has initialised. A closed write end shows
    /// as `ERROR_BROKEN_PIPE`.
    pub(crate) fn read(&self, handle: HANDLE, buf: Vec<u8>) -> Op<Vec<u8>> {
        let start = |buf: &mut Vec<u8>, ov: *mut OVERLAPPED| {
            let len = buf.len();
            let spare = (buf.capacity() - len).min(u32::MAX as usize) as u32;
            // SAFETY: the pointer is into `buf`'s heap allocation past its
            // length; the op owns `buf` until the completion.
            let ok = unsafe {
                ReadFile(
                    handle,
                    buf.as_mut_ptr().add(len),
                    spare,
                    ptr::null_mut(),
                    ov,
                )
            };
            if ok == 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        // SAFETY: see above; the caller keeps `handle` open (crate contract).
        unsafe { self.submit(handle, buf, start) }
    }

    /// Writes `buf[offset..]`.
    pub(crate) fn write(&self, handle: HANDLE, buf: Vec<u8>, offset: usize) -> Op<Vec<u8>> {
        let start = move |buf: &mut Vec<u8>, ov: *mut OVERLAPPED| {
            let rest = &buf[offset.min(buf.len())..];
            let len = rest.len().min(u32::MAX as usize) as u32;
            // SAFETY: the pointer is into `buf`'s heap allocation, which the
            // op owns until the completion.
            let ok = unsafe { WriteFile(handle, rest.as_ptr(), len, ptr::null_mut(), ov) };
            if ok == 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        // SAFETY: see above; the caller keeps `handle` open (crate contract).
        unsafe { self.submit(handle, buf, start) }
    }

    /// Completes when `handle` is signalled (`Ok(true)`; a process handle is
    /// signalled when the process exits) or when `timeout` elapses
    /// (`Ok(false)`), through a thread-pool wait that posts to the port.
    ///
    /// # Safety
    ///
    /// `handle` must stay open until the returned op completes or is dropped.
    pub(crate) unsafe fn wait_for_handle(
        &self,
        handle: HANDLE,
        timeout: Option<Duration>,
    ) -> io::Result<Op<()>> {
        if self.inner.shut_down.get() {
            return Err(io::Error::other(
                "the event loop is closed; wait_for_handle needs an open loop",
            ));
        }
        let port = self.port("wait_for_handle")?;
        let (key, header) = self.insert(Source::None);
        self.inner.ops.borrow_mut()[key].resources = Some(Box::new(()));
        let ctx = Arc::into_raw(Arc::new(WaitCtx {
            port,
            header: header as usize,
            claimed: AtomicBool::new(false),
        }));
        let mut wait: HANDLE = ptr::null_mut();
        // SAFETY: `ctx` stays alive until `finish_wait` after unregistering;
        // the caller keeps `handle` open while the wait is registered.
        let ok = unsafe {
            RegisterWaitForSingleObject(
                &mut wait,
                handle,
                Some(wait_callback),
                ctx as *const c_void,
                millis(timeout),
                WT_EXECUTEONLYONCE | WT_EXECUTEINWAITTHREAD,
            )
        };
        if ok == 0 {
            let e = last_error("RegisterWaitForSingleObject");
            // SAFETY: never registered: this is the only reference.
            drop(unsafe { Arc::from_raw(ctx) });
            self.inner.ops.borrow_mut().remove(key);
            return Err(e);
        }
        self.inner.ops.borrow_mut()[key].source = Source::Wait(wait, ctx);
        Ok(Op::new(self.clone(), key))
    }

    /// Asks Windows to cancel an operation. An IO op completes later with
    /// `ERROR_OPERATION_ABORTED`; a wait that the callback has not claimed
    /// is finished here and completes at once with that error.
    fn cancel(&self, key: usize) {
        let mut ops = self.inner.ops.borrow_mut();
        let Some(slot) = ops.get_mut(key) else { return };
        match slot.source {
            Source::Io(handle) => {
                // SAFETY: the handle is open (submit's contract) and the
                // OVERLAPPED is alive until the completion.
                let ok = unsafe { CancelIoEx(handle, &raw const (*slot.header).ov) };
                if ok == 0 {
                    // ERROR_NOT_FOUND: already completing; the packet comes.
                    tracing::trace!("CancelIoEx: {}", io::Error::last_os_error());
                }
            }
            Source::Wait(wait, ctx) => {
                // SAFETY: `ctx` lives until `finish_wait`.
                let won = !unsafe { &*ctx }.claimed.swap(true, Ordering::SeqCst);
                if won {
                    // The callback will never post: finish here.
                    slot.source = Source::None;
                    let waker = match slot.state.complete(Err(aborted())) {
                        OnCompletion::Wake(w) => w,
                        OnCompletion::Free => {
                            ops.remove(key);
                            None
                        }
                    };
                    drop(ops);
                    // SAFETY: from the registration, used once.
                    unsafe { finish_wait(wait, ctx) };
                    if let Some(w) = waker {
                        w.wake();
                    }
                }
                // Else the packet is posted (or about to be): the completion
                // finishes the wait.
            }
            Source::None => {}
        }
    }

    /// Waits up to `timeout` (forever if `None`) for completions and
    /// dispatches every one available.
    pub(crate) fn poll(&self, timeout: Option<Duration>, notifier: &Notifier) -> io::Result<()> {
        if self.inner.shut_down.get() {
            return Err(io::Error::other(
                "the event loop is closed: its completion port was released",
            ));
        }
        if self.harvest(millis(timeout))? {
            notifier.reset();
        }
        Ok(())
    }

    /// One `GetQueuedCompletionStatusEx`; returns whether a wake-up arrived.
    fn harvest(&self, ms: u32) -> io::Result<bool> {
        let port = self.port("cannot wait for completions")?;
        let mut entries = self.inner.entries.borrow_mut();
        let mut n: u32 = 0;
        // SAFETY: `entries` has BATCH initialised elements we own.
        let ok = unsafe {
            GetQueuedCompletionStatusEx(
                port.handle,
                entries.as_mut_ptr(),
                BATCH as u32,
                &mut n,
                ms,
                0,
            )
        };
        if ok == 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(WAIT_TIMEOUT as i32) {
                return Ok(false);
            }
            return Err(io::Error::new(
                e.kind(),
                format!("GetQueuedCompletionStatusEx failed: {e}"),
            ));
        }
        let mut woke = false;
        let mut wakers = Vec::new();
        let mut waits = Vec::new();
        {
            let mut ops = self.inner.ops.borrow_mut();
            for entry in &entries[..n as usize] {
                let header = entry.lpOverlapped as *mut Header;
                let kind = entry.lpCompletionKey;
                if kind == WAKE_KEY {
                    woke = true;
                    continue;
                }
                if header.is_null() || (kind != IO_KEY && kind != WAIT_KEY) {
                    continue;
                }
                // SAFETY: a packet for one of our ops points at its header,
                // which lives until the slot is removed below.
                let key = unsafe { (*header).key };
                let Some(slot) = ops.get_mut(key) else {
                    continue;
                };
                if slot.header != header {
                    continue;
                }
                let res = if kind == IO_KEY {
                    // SAFETY: the kernel finished with the OVERLAPPED.
                    let status = unsafe { (*header).ov.Internal } as i32;
                    if status >= 0 {
                        Ok(entry.dwNumberOfBytesTransferred)
                    } else {
                        // SAFETY: a plain conversion function.
                        let code = unsafe { RtlNtStatusToDosError(status) };
                        Err(io::Error::from_raw_os_error(code as i32))
                    }
                } else {
                    if let Source::Wait(wait, ctx) =
                        std::mem::replace(&mut slot.source, Source::None)
                    {
                        waits.push((wait, ctx));
                    }
                    Ok(entry.dwNumberOfBytesTransferred)
                };
                slot.source = Source::None;
                match slot.state.complete(res) {
                    OnCompletion::Wake(w) => wakers.extend(w),
                    OnCompletion::Free => {
                        ops.remove(key);
                    }
                }
            }
        }
        drop(entries);
        for (wait, ctx) in waits {
            // SAFETY: from the registration, used once (taken out of the slot).
            unsafe { finish_wait(wait, ctx) };
        }
        for w in wakers {
            w.wake();
        }
        Ok(woke)
    }

    /// Number of operations Windows has not completed yet.
    pub(crate) fn in_flight(&self) -> usize {
        self.inner
            .ops
            .borrow()
            .iter()
            .filter(|(_, s)| s.in_flight())
            .count()
    }

    /// Cancels everything in flight and waits (bounded) for the completions.
    /// Resources of operations still owned by Windows after the grace period
    /// are leaked, never freed.
    pub(crate) fn shutdown(&self) {
        if self.inner.shut_down.replace(true) {
            return;
        }
        let keys: Vec<usize> = self
            .inner
            .ops
            .borrow()
            .iter()
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
            let wait = (deadline - now).min(Duration::from_millis(50));
            if let Err(e) = self.harvest(millis(Some(wait))) {
                tracing::error!("while closing the event loop: {e}");
                break;
            }
        }
        let mut leaked = 0usize;
        let mut wakers = Vec::new();
        for (_, slot) in self.inner.ops.borrow_mut().iter_mut() {
            if slot.in_flight() {
                slot.leak();
                leaked += 1;
                wakers.extend(slot.state.fail(Err(aborted())));
            }
        }
        for w in wakers {
            w.wake();
        }
        if leaked > 0 {
            tracing::warn!(
                "completion port closed with {leaked} operation(s) Windows did not finish; \
                 their buffers were leaked on purpose"
            );
        }
        // Let go of the port now: with the notifier's reference (dropped
        // right after this by the loop's close) it is closed at once.
        let port = self.inner.port.borrow_mut().take();
        drop(port);
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // `shutdown` ran from the loop's close; if it did not (an Iocp
        // outside a loop), leak whatever Windows still owns.
        for (_, slot) in self.ops.get_mut().iter_mut() {
            if slot.in_flight() {
                slot.leak();
            }
        }
    }
}

/// The future of one IOCP operation: its result (`Ok(bytes transferred)` or
/// the Windows error) and the resources given to [`Iocp::submit`].
pub(crate) struct Op<R: 'static> {
    iocp: Iocp,
    key: usize,
    finished: bool,
    _resources: PhantomData<R>,
}

impl<R: 'static> Op<R> {
    fn new(iocp: Iocp, key: usize) -> Op<R> {
        Op {
            iocp,
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
    type Output = (io::Result<u32>, R);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if this.finished {
            return Poll::Pending;
        }
        let mut ops = this.iocp.inner.ops.borrow_mut();
        let Some(slot) = ops.get_mut(this.key) else {
            return Poll::Pending;
        };
        let Some(res) = slot.state.poll_done(cx) else {
            return Poll::Pending;
        };
        let mut slot = ops.remove(this.key);
        drop(ops);
        this.finished = true;
        let resources = slot
            .resources
            .take()
            .and_then(|b| b.downcast::<R>().ok())
            .map(|b| *b);
        match resources {
            Some(r) => Poll::Ready((res, r)),
            // The buffers were leaked at shutdown: nothing to return.
            None => Poll::Pending,
        }
    }
}

impl<R: 'static> Drop for Op<R> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut ops = self.iocp.inner.ops.borrow_mut();
        let Some(slot) = ops.get_mut(self.key) else {
            return;
        };
        match slot.state.abandon() {
            OnDrop::Free => {
                ops.remove(self.key);
            }
            OnDrop::Cancel => {
                drop(ops);
                self.iocp.cancel(self.key);
            }
            OnDrop::Keep => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::windows::io::{AsRawHandle, FromRawHandle, OwnedHandle};
    use std::time::Duration;

    use windows_sys::Win32::Foundation::{ERROR_BROKEN_PIPE, GENERIC_WRITE};
    use windows_sys::Win32::Storage::FileSystem::{
        CreateFileW, FILE_FLAG_FIRST_PIPE_INSTANCE, FILE_FLAG_OVERLAPPED, OPEN_EXISTING,
        PIPE_ACCESS_INBOUND,
    };
    use windows_sys::Win32::System::Pipes::{
        CreateNamedPipeW, PIPE_READMODE_BYTE, PIPE_REJECT_REMOTE_CLIENTS, PIPE_TYPE_BYTE, PIPE_WAIT,
    };
    use windows_sys::Win32::System::Threading::{CreateEventW, SetEvent};

    use super::*;
    use crate::EventLoop;

    /// An inbound named pipe: (overlapped read end, overlapped write end).
    fn pipe() -> (OwnedHandle, OwnedHandle) {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let name = format!(
            r"\\.\pipe\childwatch-iocp-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let wide: Vec<u16> = name.encode_utf16().chain(Some(0)).collect();
        // SAFETY: plain Win32 calls with a NUL-terminated name.
        unsafe {
            let r = CreateNamedPipeW(
                wide.as_ptr(),
                PIPE_ACCESS_INBOUND | FILE_FLAG_OVERLAPPED | FILE_FLAG_FIRST_PIPE_INSTANCE,
                PIPE_TYPE_BYTE | PIPE_READMODE_BYTE | PIPE_WAIT | PIPE_REJECT_REMOTE_CLIENTS,
                1,
                4096,
                4096,
                0,
                ptr::null(),
            );
            assert_ne!(r, INVALID_HANDLE_VALUE, "CreateNamedPipeW");
            let w = CreateFileW(
                wide.as_ptr(),
                GENERIC_WRITE,
                0,
                ptr::null(),
                OPEN_EXISTING,
                FILE_FLAG_OVERLAPPED,
                ptr::null_mut(),
            );
            assert_ne!(w, INVALID_HANDLE_VALUE, "CreateFileW");
            (
                OwnedHandle::from_raw_handle(r),
                OwnedHandle::from_raw_handle(w),
            )
        }
    }

    #[test]
    fn read_and_write_complete_through_the_port() {
        let lp = EventLoop::proactor().unwrap();
        let p = lp.iocp_backend().unwrap().clone();
        let (r, w) = pipe();
        p.register(r.as_raw_handle()).unwrap();
        p.register(w.as_raw_handle()).unwrap();
        let (n, buf) = lp
            .run_until_complete(async {
                let (res, buf) = p.write(w.as_raw_handle(), b"hello port".to_vec(), 6).await;
                assert_eq!(res.unwrap(), 4);
                assert_eq!(buf, b"hello port");
                let (res, buf) = p.read(r.as_raw_handle(), Vec::with_capacity(64)).await;
                (res.unwrap(), buf)
            })
            .unwrap();
        assert_eq!(n, 4);
        assert_eq!(buf.len(), 0, "read leaves the length to the caller");
        // SAFETY: the kernel initialised n bytes of spare capacity.
        assert_eq!(
            unsafe { std::slice::from_raw_parts(buf.as_ptr(), 4) },
            b"port"
        );
        // The write end closed: the read end reports a broken pipe.
        drop(w);
        let (res, _) = lp
            .run_until_complete(p.read(r.as_raw_handle(), Vec::with_capacity(8)))
            .unwrap();
        assert_eq!(
            res.unwrap_err().raw_os_error(),
            Some(ERROR_BROKEN_PIPE as i32)
        );
        assert_eq!(p.in_flight(), 0);
    }

    #[test]
    fn a_dropped_read_keeps_its_buffer_until_the_completion() {
        let lp = EventLoop::proactor().unwrap();
        let p = lp.iocp_backend().unwrap().clone();
        let (r, w) = pipe();
        p.register(r.as_raw_handle()).unwrap();
        lp.run_until_complete(async {
            let mut op = Box::pin(p.read(r.as_raw_handle(), Vec::with_capacity(1 << 16)));
            let _ = futures_util::poll!(op.as_mut());
            assert_eq!(p.in_flight(), 1);
            drop(op);
            crate::sleep(Duration::from_millis(5)).await;
        })
        .unwrap();
        assert_eq!(p.in_flight(), 0, "the cancelled completion arrived");
        drop(w);
    }

    #[test]
    fn close_cancels_operations_in_flight() {
        let lp = EventLoop::proactor().unwrap();
        let p = lp.iocp_backend().unwrap().clone();
        let (r, _w) = pipe();
        p.register(r.as_raw_handle()).unwrap();
        let t = lp.create_task({
            let p = p.clone();
            let h = r.as_raw_handle();
            async move { p.read(h, Vec::with_capacity(16)).await.0 }
        });
        t.detach();
        lp.run_until_complete(crate::sleep(Duration::from_millis(2)))
            .unwrap();
        assert_eq!(p.in_flight(), 1);
        lp.close().unwrap();
        assert_eq!(p.in_flight(), 0);
    }

    #[test]
    fn a_closed_port_fails_everything_at_once() {
        let lp = EventLoop::proactor().unwrap();
        let p = lp.iocp_backend().unwrap().clone();
        let (r, _w) = pipe();
        p.register(r.as_raw_handle()).unwrap();
        lp.close().unwrap();
        assert!(p.port("test").is_err(), "the port was let go at close");
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut op = Box::pin(p.read(r.as_raw_handle(), Vec::with_capacity(8)));
        let Poll::Ready((res, buf)) = op.as_mut().poll(&mut cx) else {
            panic!("a read on a closed port completes at once");
        };
        assert_eq!(
            res.unwrap_err().raw_os_error(),
            Some(ERROR_OPERATION_ABORTED as i32)
        );
        assert_eq!(buf.capacity(), 8);
        let (r2, _w2) = pipe();
        assert!(p.register(r2.as_raw_handle()).is_err());
        let ev = event();
        // SAFETY: `ev` outlives the call (which fails at once).
        assert!(unsafe { p.wait_for_handle(ev.as_raw_handle(), None) }.is_err());
        assert_eq!(p.in_flight(), 0);
        assert!(lp.handle().call_soon_threadsafe(|| {}).is_err());
        lp.handle().stop();
    }

    fn event() -> OwnedHandle {
        // SAFETY: a new unnamed manual-reset event.
        let h = unsafe { CreateEventW(ptr::null(), 1, 0, ptr::null()) };
        assert!(!h.is_null());
        // SAFETY: we own the new handle.
        unsafe { OwnedHandle::from_raw_handle(h) }
    }

    #[test]
    fn wait_for_handle_completes_on_signal_timeout_and_cancel() {
        let lp = EventLoop::proactor().unwrap();
        let p = lp.iocp_backend().unwrap().clone();
        let ev = event();
        let h = ev.as_raw_handle() as usize;
        // Timeout: completes with 1 ("timed out").
        // SAFETY: `ev` outlives every op below.
        let op = unsafe { p.wait_for_handle(ev.as_raw_handle(), Some(Duration::from_millis(5))) };
        let (res, ()) = lp.run_until_complete(op.unwrap()).unwrap();
        assert_eq!(res.unwrap(), 1);
        // Signalled from another thread while the loop sleeps.
        // SAFETY: as above.
        let op = unsafe { p.wait_for_handle(ev.as_raw_handle(), None) }.unwrap();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(10));
            // SAFETY: the event is open until the test ends.
            unsafe { SetEvent(h as HANDLE) };
        });
        let (res, ()) = lp.run_until_complete(op).unwrap();
        assert_eq!(res.unwrap(), 0);
        t.join().unwrap();
        // Dropping a pending wait unregisters it; nothing is left behind.
        let ev2 = event();
        // SAFETY: `ev2` outlives the op.
        let op = unsafe { p.wait_for_handle(ev2.as_raw_handle(), None) }.unwrap();
        lp.run_until_complete(async {
            let mut op = Box::pin(op);
            let _ = futures_util::poll!(op.as_mut());
            drop(op);
            crate::sleep(Duration::from_millis(2)).await;
        })
        .unwrap();
        assert_eq!(p.in_flight(), 0);
        // A pending wait at close is cancelled.
        // SAFETY: `ev2` outlives the loop.
        let op = unsafe { p.wait_for_handle(ev2.as_raw_handle(), None) }.unwrap();
        lp.create_task(async move { op.await.0 }).detach();
        lp.run_until_complete(async {}).unwrap();
        assert_eq!(p.in_flight(), 1);
        lp.close().unwrap();
        assert_eq!(p.in_flight(), 0);
    }
}
