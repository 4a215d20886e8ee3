//! The event loop: asyncio's `BaseEventLoop` semantics over two backends.
//!
//! One [`EventLoop`] runs on one thread. Each iteration (asyncio's
//! `_run_once`) it
//!
//! 1. asks its backend for IO — the io_uring proactor (`proactor.rs`) or the
//!    epoll selector (`selector.rs`) — sleeping no longer than the next timer,
//!    and not at all if callbacks are ready;
//! 2. takes in what other threads queued (`call_soon_threadsafe`, tasks woken
//!    elsewhere) and the signals that arrived;
//! 3. moves due timers to the ready queue;
//! 4. runs exactly the callbacks that were ready when the iteration began, in
//!    FIFO order; callbacks they schedule run in the next iteration.
//!
//! Everything but the backend is shared: the ready queue, the timer heap,
//! tasks (on `async-task`), signals and the cross-thread queue. Backends are
//! behind `cfg` seams so that another platform only brings its own: on
//! Windows the proactor is an I/O completion port (`iocp.rs`) and the selector
//! runs on `polling`'s Windows backend; signal handlers are Unix-only (as in
//! asyncio, `add_signal_handler` is not supported on Windows).
//!
//! Closing releases everything the loop owns: the futures of its live tasks
//! (kept in a table, `tasks.rs`, since a parked task is otherwise owned by
//! whoever holds its waker), timers, callbacks, signal handlers, and the
//! backend's OS resources: the io_uring, epoll instance or completion port
//! and the wake-up eventfd are closed at once, as asyncio's `close()` closes
//! its selector or proactor, however many handles (clones, `LoopHandle`s,
//! watchers' state) still point at the loop. As in tokio's
//! `Runtime`/`Handle`, one kind of handle owns the loop and every other one
//! only reaches it: the handle a constructor returns and the one the policy
//! keeps for a thread own it; clones (and what `get_running_loop` returns)
//! do not. So dropping the owner closes the loop even when its tasks hold
//! clones of it, and no task can keep its own loop alive. A handle used
//! after its loop closed gets an error saying why.
//!
//! A panicking callback or task never wedges the loop: the panic is caught,
//! reported through `tracing` (as asyncio's default exception handler logs),
//! and the loop goes on; a task's panic is re-raised where the task is
//! awaited.

#[cfg(windows)]
pub(crate) mod iocp;
mod notify;
#[cfg(any(target_os = "linux", windows))]
mod op_state;
#[cfg(target_os = "linux")]
pub(crate) mod proactor;
#[cfg(target_os = "linux")]
pub(crate) mod ring;
#[cfg(any(unix, windows))]
pub(crate) mod selector;
mod signals;
mod tasks;
mod timers;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::{Pin, pin};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use async_task::Runnable;

use notify::Notifier;
use signals::SignalHandlers;
use tasks::TaskTable;
use timers::Timers;

/// Which backend a loop runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LoopKind {
    /// Completion-based: io_uring on Linux (asyncio's `ProactorEventLoop`).
    Proactor,
    /// Readiness-based: epoll (asyncio's `SelectorEventLoop`).
    Selector,
}

impl fmt::Display for LoopKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LoopKind::Proactor => "proactor",
            LoopKind::Selector => "selector",
        })
    }
}

// ---------------------------------------------------------------- handles

/// The state behind a [`Handle`]: the callback until it runs or is cancelled.
pub(crate) struct HandleState {
    cancelled: Cell<bool>,
    callback: RefCell<Option<Box<dyn FnOnce()>>>,
}

impl HandleState {
    fn new(f: Box<dyn FnOnce()>) -> Rc<HandleState> {
        Rc::new(HandleState {
            cancelled: Cell::new(false),
            callback: RefCell::new(Some(f)),
        })
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancelled.get()
    }

    fn take(&self) -> Option<Box<dyn FnOnce()>> {
        if self.cancelled.get() {
            return None;
        }
        self.callback.borrow_mut().take()
    }

    /// Takes the callback out for good (the loop is closing); the caller
    /// drops it once no borrow is held. A `Handle` or `Sleep` may keep this
    /// state alive, and with it whatever the callback captured, so dropping
    /// the loop's reference alone would not be enough.
    fn release(&self) -> Option<Box<dyn FnOnce()>> {
        self.cancelled.set(true);
        self.callback
            .try_borrow_mut()
            .ok()
            .and_then(|mut c| c.take())
    }
}

/// A scheduled callback, returned by `call_soon`, `call_later` and `call_at`
/// (asyncio's `Handle` / `TimerHandle`).
pub struct Handle {
    state: Rc<HandleState>,
    when: Option<Instant>,
}

impl Handle {
    /// Cancels the callback if it has not run yet; it then never runs. The
    /// callback (and what it captured) is dropped at once.
    pub fn cancel(&self) {
        if !self.state.cancelled.replace(true) {
            let cb = self.state.callback.borrow_mut().take();
            drop(cb);
        }
    }

    /// Whether [`cancel`](Self::cancel) was called.
    pub fn cancelled(&self) -> bool {
        self.state.cancelled.get()
    }

    /// When a timer handle is due (`None` for `call_soon`).
    pub fn when(&self) -> Option<Instant> {
        self.when
    }
}

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handle")
            .field("cancelled", &self.cancelled())
            .field("when", &self.when)
            .finish()
    }
}

// ---------------------------------------------------------------- tasks

/// A future running on a loop (asyncio's `Task`), created by
/// [`EventLoop::create_task`].
///
/// Awaiting it gives the future's output; a panic inside the task is
/// re-raised where it is awaited. Dropping a `Task` cancels it (the future is
/// dropped on its loop's thread); [`detach`](Self::detach) lets it run to
/// completion on its own instead.
#[must_use = "dropping a Task cancels it; call .detach() to let it run"]
pub struct Task<T> {
    inner: async_task::FallibleTask<T>,
}

impl<T> Task<T> {
    /// Lets the task run to completion without anyone awaiting it.
    pub fn detach(self) {
        self.inner.detach();
    }

    /// Whether the task has completed (or was cancelled).
    pub fn is_finished(&self) -> bool {
        self.inner.is_finished()
    }
}

impl<T> Future for Task<T> {
    type Output = T;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        match Pin::new(&mut self.inner).poll(cx) {
            Poll::Ready(Some(v)) => Poll::Ready(v),
            // Its loop closed and dropped the future: there is no output,
            // ever. Never completing is what a task of a closed loop does.
            Poll::Ready(None) => Poll::Pending,
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T> fmt::Debug for Task<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Task")
            .field("finished", &self.inner.is_finished())
            .finish()
    }
}

/// Wraps a task's future so that a panic is reported when it happens, not
/// only when (if ever) the task is awaited.
struct ReportPanic<F>(F);

impl<F: Future> Future for ReportPanic<F> {
    type Output = F::Output;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // SAFETY: structural pinning of the only field.
        let fut = unsafe { self.map_unchecked_mut(|s| &mut s.0) };
        match catch_unwind(AssertUnwindSafe(|| fut.poll(cx))) {
            Ok(p) => p,
            Err(payload) => {
                tracing::error!("task panicked: {}", panic_message(&*payload));
                std::panic::resume_unwind(payload)
            }
        }
    }
}

pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "<non-string panic payload>".to_string()
    }
}

// ---------------------------------------------------------------- shared (Send) part

enum RemoteItem {
    Call(Box<dyn FnOnce() + Send>),
    Run(Runnable),
}

struct Remote {
    queue: VecDeque<RemoteItem>,
    closed: bool,
}

/// The part of a loop other threads (and signal handlers) may touch.
pub(crate) struct Shared {
    remote: Mutex<Remote>,
    notifier: Notifier,
    stop_requested: AtomicBool,
    signals_pending: AtomicU64,
    closed: AtomicBool,
    thread: u64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Remote> {
        // A panic while holding this lock cannot leave the queue inconsistent.
        self.remote.lock().unwrap_or_else(|p| p.into_inner())
    }
}

thread_local! {
    static THREAD_ID: u64 = {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        NEXT.fetch_add(1, Ordering::Relaxed)
    };
    static RUNNING: RefCell<Option<EventLoop>> = const { RefCell::new(None) };
}

fn thread_id() -> u64 {
    THREAD_ID.try_with(|id| *id).unwrap_or(0)
}

// ---------------------------------------------------------------- backends

enum Backend {
    #[cfg(target_os = "linux")]
    Proactor(proactor::Proactor),
    #[cfg(windows)]
    Iocp(iocp::Iocp),
    #[cfg(any(unix, windows))]
    Selector(selector::Selector),
}

impl Backend {
    fn poll(&self, timeout: Option<Duration>, notifier: &Notifier) -> io::Result<()> {
        match self {
            #[cfg(target_os = "linux")]
            Backend::Proactor(p) => p.poll(timeout, notifier),
            #[cfg(windows)]
            Backend::Iocp(p) => p.poll(timeout, notifier),
            #[cfg(any(unix, windows))]
            Backend::Selector(s) => s.poll(timeout, notifier),
        }
    }

    fn close(&self) {
        match self {
            #[cfg(target_os = "linux")]
            Backend::Proactor(p) => p.shutdown(),
            #[cfg(windows)]
            Backend::Iocp(p) => p.shutdown(),
            #[cfg(any(unix, windows))]
            Backend::Selector(s) => s.shutdown(),
        }
    }
}

// ---------------------------------------------------------------- the loop

enum Ready {
    Call(Rc<HandleState>),
    Run(Runnable),
}

struct Inner {
    kind: LoopKind,
    shared: Arc<Shared>,
    backend: Backend,
    ready: RefCell<VecDeque<Ready>>,
    timers: RefCell<Timers>,
    signals: RefCell<SignalHandlers>,
    tasks: Rc<TaskTable>,
    /// Owning [`EventLoop`] handles alive; the loop closes when it drops to 0.
    owners: Cell<usize>,
    running: Cell<bool>,
    stopping: Cell<bool>,
    closed: Cell<bool>,
    /// How the loop came to be closed, for the error a handle gets after.
    closed_by: Cell<Option<ClosedBy>>,
}

/// Why a loop is closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ClosedBy {
    /// [`EventLoop::close`] was called.
    Close,
    /// Its last owning handle was dropped.
    LastOwner,
}

/// An asyncio event loop: callbacks, timers, tasks, signals and IO on one
/// thread.
///
/// `EventLoop` is a cheap handle (`Clone`) to one loop and is `!Send`: a loop
/// belongs to the thread that created it. Other threads talk to it through a
/// [`LoopHandle`].
///
/// # Closing and dropping
///
/// [`close`](Self::close) releases everything the loop holds: the futures of
/// its parked tasks are dropped (their destructors run: a `kill_on_drop`
/// child is killed, pipes close), timers and callbacks are dropped, and the
/// ring or epoll instance and the wake-up eventfd are closed, at once: a
/// clone or [`LoopHandle`] kept afterwards holds no descriptor.
///
/// A loop that is not closed is closed the same way when its *owning* handle
/// is dropped (as a tokio `Runtime` is; its other handles are like tokio's
/// `Handle`):
///
/// * the handle a constructor returns ([`EventLoop::proactor`],
///   [`selector`](Self::selector), [`new`](Self::new), the policy's
///   `new_event_loop`) owns the loop;
/// * the policy's loop for a thread is owned by the policy: `set_event_loop`
///   takes ownership of the loop it is given (from any handle), and the
///   loop `get_event_loop` creates on first use is owned there, so it lives
///   until it is replaced, cleared or the thread ends;
/// * [`clone`](Clone::clone), [`non_owning`](Self::non_owning) and the
///   handle [`get_running_loop`] returns reach the same loop but do not keep
///   it open.
///
/// So a task or callback may hold a clone of its own loop: dropping the
/// owner still closes the loop and drops that task. A clone used after its
/// loop closed fails with an error that says so (`run_until_complete`,
/// `run_forever`, `add_signal_handler`), schedules nothing (`call_soon`,
/// `call_later`, `call_at` return a cancelled [`Handle`]; `create_task`
/// returns a task that never runs) and never panics.
///
/// To keep the loop open from more than one place, ask for another owning
/// handle with [`share_ownership`](Self::share_ownership); the loop then
/// closes when the last owning handle goes (or at `close()`).
///
/// ```
/// use std::time::Duration;
/// let lp = childwatch::EventLoop::selector()?;
/// let lp2 = lp.clone(); // does not keep the loop open
/// let v = lp.run_until_complete(async move {
///     childwatch::sleep(Duration::from_millis(1)).await;
///     lp2.create_task(async { 40 + 2 }).await
/// })?;
/// assert_eq!(v, 42);
/// let lp3 = lp.clone();
/// drop(lp); // the owner: the loop is closed now
/// assert!(lp3.is_closed());
/// assert!(lp3.run_until_complete(async {}).is_err());
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct EventLoop {
    inner: Rc<Inner>,
    /// Whether this handle keeps the loop open (see the type's docs).
    owning: bool,
}

impl Clone for EventLoop {
    /// Another handle to the same loop that does not keep it open (see
    /// [Closing and dropping](EventLoop#closing-and-dropping)); use
    /// [`share_ownership`](EventLoop::share_ownership) for one that does.
    fn clone(&self) -> EventLoop {
        self.non_owning()
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        if !self.owning {
            return;
        }
        let left = self.inner.owners.get().saturating_sub(1);
        self.inner.owners.set(left);
        // The last owner is gone: nobody outside the loop can run it again,
        // so release what its tasks and callbacks hold, which breaks any
        // cycle through them (a task holding a clone). A running loop closes
        // when its run returns (`RunGuard`).
        if left == 0 && !self.inner.running.get() {
            self.inner.release(ClosedBy::LastOwner);
        }
    }
}

impl fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventLoop")
            .field("kind", &self.inner.kind)
            .field("running", &self.inner.running.get())
            .field("closed", &self.inner.closed.get())
            .finish()
    }
}

impl PartialEq for EventLoop {
    fn eq(&self, other: &Self) -> bool {
        Rc::ptr_eq(&self.inner, &other.inner)
    }
}
impl Eq for EventLoop {}

/// The loop running on this thread, if any (asyncio's `get_running_loop`,
/// which raises where this returns `None`).
pub fn get_running_loop() -> Option<EventLoop> {
    RUNNING.try_with(|r| r.borrow().clone()).ok().flatten()
}

impl EventLoop {
    fn with_backend(
        kind: LoopKind,
        make: impl FnOnce(&Notifier) -> io::Result<Backend>,
    ) -> io::Result<EventLoop> {
        let notifier = Notifier::new()?;
        let backend = make(&notifier)?;
        Ok(EventLoop {
            owning: true,
            inner: Rc::new(Inner {
                kind,
                shared: Arc::new(Shared {
                    remote: Mutex::new(Remote {
                        queue: VecDeque::new(),
                        closed: false,
                    }),
                    notifier,
                    stop_requested: AtomicBool::new(false),
                    signals_pending: AtomicU64::new(0),
                    closed: AtomicBool::new(false),
                    thread: thread_id(),
                }),
                backend,
                ready: RefCell::new(VecDeque::new()),
                timers: RefCell::new(Timers::default()),
                signals: RefCell::new(SignalHandlers::default()),
                tasks: Rc::new(TaskTable::default()),
                owners: Cell::new(1),
                running: Cell::new(false),
                stopping: Cell::new(false),
                closed: Cell::new(false),
                closed_by: Cell::new(None),
            }),
        })
    }

    /// A completion-based loop: io_uring on Linux (`ErrorKind::Unsupported`
    /// where the kernel has no usable io_uring), an I/O completion port on
    /// Windows (asyncio's `ProactorEventLoop`).
    pub fn proactor() -> io::Result<EventLoop> {
        #[cfg(target_os = "linux")]
        {
            EventLoop::with_backend(LoopKind::Proactor, |_| {
                proactor::Proactor::new().map(Backend::Proactor)
            })
        }
        #[cfg(windows)]
        {
            EventLoop::with_backend(LoopKind::Proactor, |n| {
                iocp::Iocp::new(n).map(Backend::Iocp)
            })
        }
        #[cfg(not(any(target_os = "linux", windows)))]
        {
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the proactor event loop is not available on this platform; use EventLoop::selector()",
            ))
        }
    }

    /// A readiness-based loop: epoll on Linux; on Windows `polling`'s
    /// IOCP-based readiness (asyncio's `SelectorEventLoop` there: callbacks,
    /// timers, tasks and sockets, but no subprocesses).
    pub fn selector() -> io::Result<EventLoop> {
        EventLoop::with_backend(LoopKind::Selector, |n| {
            selector::Selector::new(n).map(Backend::Selector)
        })
    }

    /// A loop of the given kind.
    pub fn new(kind: LoopKind) -> io::Result<EventLoop> {
        match kind {
            LoopKind::Proactor => EventLoop::proactor(),
            LoopKind::Selector => EventLoop::selector(),
        }
    }

    /// Which backend this loop runs on.
    pub fn kind(&self) -> LoopKind {
        self.inner.kind
    }

    /// The loop's clock (monotonic).
    pub fn time(&self) -> Instant {
        Instant::now()
    }

    /// Schedules `f` to run at the next iteration, after the callbacks
    /// already scheduled (FIFO).
    ///
    /// On a closed loop `f` is dropped at once and the handle comes back
    /// cancelled.
    pub fn call_soon(&self, f: impl FnOnce() + 'static) -> Handle {
        let state = HandleState::new(Box::new(f));
        if self.refuse_callback(&state, "call_soon") {
            return Handle { state, when: None };
        }
        self.inner
            .ready
            .borrow_mut()
            .push_back(Ready::Call(Rc::clone(&state)));
        Handle { state, when: None }
    }

    /// Schedules `f` to run after `delay`.
    pub fn call_later(&self, delay: Duration, f: impl FnOnce() + 'static) -> Handle {
        let when = self.time().checked_add(delay).unwrap_or_else(far_future);
        self.call_at(when, f)
    }

    /// Schedules `f` to run at `when`; timers due at the same instant run in
    /// the order they were scheduled.
    ///
    /// On a closed loop `f` is dropped at once and the handle comes back
    /// cancelled.
    pub fn call_at(&self, when: Instant, f: impl FnOnce() + 'static) -> Handle {
        let state = HandleState::new(Box::new(f));
        if self.refuse_callback(&state, "call_at") {
            return Handle {
                state,
                when: Some(when),
            };
        }
        self.inner.timers.borrow_mut().push(when, Rc::clone(&state));
        Handle {
            state,
            when: Some(when),
        }
    }

    /// A `Send + Sync` handle for other threads.
    pub fn handle(&self) -> LoopHandle {
        LoopHandle {
            shared: Arc::clone(&self.inner.shared),
        }
    }

    /// Runs `fut` as a task on this loop. It starts at the next iteration.
    ///
    /// On a closed loop the task is cancelled at once (`fut` is dropped) and
    /// never runs; awaiting it never completes.
    pub fn create_task<F>(&self, fut: F) -> Task<F::Output>
    where
        F: Future + 'static,
        F::Output: 'static,
    {
        let shared = Arc::clone(&self.inner.shared);
        let schedule = move |runnable: Runnable| schedule_runnable(&shared, runnable);
        let fut = self.inner.tasks.register(fut);
        let (runnable, task) = async_task::Builder::new()
            .propagate_panic(true)
            .spawn_local(move |_| ReportPanic(fut), schedule);
        runnable.schedule();
        Task {
            inner: task.fallible(),
        }
    }

    /// Runs the loop until `fut` completes and returns its output.
    ///
    /// `fut` need not be `'static`: it is polled in place. Errors (never
    /// panics) if the loop is closed, already running, another loop runs on
    /// this thread, or the loop was stopped before `fut` completed.
    pub fn run_until_complete<F: Future>(&self, fut: F) -> io::Result<F::Output> {
        let _guard = self.enter_running()?;
        let main = Arc::new(MainWaker {
            woken: AtomicBool::new(true),
            shared: Arc::clone(&self.inner.shared),
        });
        let waker = Waker::from(Arc::clone(&main));
        let mut cx = Context::from_waker(&waker);
        let mut fut = pin!(fut);
        // Like asyncio, where the future runs as a task scheduled with
        // call_soon: callbacks already queued run first, then the future is
        // polled in the same iteration whenever it was woken.
        loop {
            self.run_once(main.woken.load(Ordering::SeqCst))?;
            if main.woken.swap(false, Ordering::SeqCst) {
                if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
                    return Ok(v);
                }
            }
            if self.inner.stopping.replace(false) {
                return Err(io::Error::other(
                    "the event loop was stopped before the future completed",
                ));
            }
        }
    }

    /// Runs the loop until [`stop`](Self::stop) is called. If `stop` was
    /// called before, runs one iteration and returns.
    pub fn run_forever(&self) -> io::Result<()> {
        let _guard = self.enter_running()?;
        loop {
            self.run_once(false)?;
            if self.inner.stopping.replace(false) {
                return Ok(());
            }
        }
    }

    /// Stops the loop after the current iteration.
    pub fn stop(&self) {
        self.inner.stopping.set(true);
    }

    /// Whether the loop is running.
    pub fn is_running(&self) -> bool {
        self.inner.running.get()
    }

    /// Closes the loop: drops the futures of its unfinished tasks (their
    /// destructors run here: a `kill_on_drop` child is killed, pipes close),
    /// drops pending callbacks and timers, removes its signal handlers,
    /// cancels its IO and closes its ring or epoll instance and its wake-up
    /// eventfd (even while clones or [`LoopHandle`]s exist). Closing twice
    /// is fine; closing a running loop is an error. A task of a closed loop
    /// never completes.
    pub fn close(&self) -> io::Result<()> {
        if self.inner.running.get() {
            return Err(io::Error::other(
                "cannot close a running event loop; call stop() and let run_forever() return first",
            ));
        }
        self.inner.release(ClosedBy::Close);
        Ok(())
    }

    /// A handle to this loop that does not keep it open: the same as
    /// [`clone`](Clone::clone), spelled out (see
    /// [Closing and dropping](Self#closing-and-dropping)). Once the owning
    /// handle is dropped, the loop is closed and this handle sees a closed
    /// loop.
    pub fn non_owning(&self) -> EventLoop {
        EventLoop {
            inner: Rc::clone(&self.inner),
            owning: false,
        }
    }

    /// Another handle that owns the loop, from any handle to it: the loop
    /// stays open until every owning handle is dropped (or `close()` is
    /// called). For a loop kept from several places, e.g. a struct that
    /// outlives the function that created the loop.
    ///
    /// Do not store it inside the loop's own tasks or callbacks: a task that
    /// owns its loop is a reference cycle, and that loop (with its ring or
    /// epoll descriptors and every parked task) is then released only by
    /// `close()`. A clone is what a task should hold.
    ///
    /// Errors if the loop is already closed (there is nothing left to keep
    /// open).
    pub fn share_ownership(&self) -> io::Result<EventLoop> {
        if self.is_closed() {
            return Err(self.closed_error("cannot share ownership of the event loop"));
        }
        Ok(self.owning_handle())
    }

    /// Whether this handle keeps the loop open (see
    /// [Closing and dropping](Self#closing-and-dropping)).
    pub fn is_owning(&self) -> bool {
        self.owning
    }

    /// Whether the loop is closed: [`close`](Self::close) was called or its
    /// owning handle was dropped.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.get()
    }

    /// Calls `f` on this loop's thread each time signal `sig` arrives
    /// (replacing an earlier handler for `sig`). Other handlers for `sig` in
    /// the process keep working.
    ///
    /// On Windows this is `ErrorKind::Unsupported`, as asyncio raises
    /// `NotImplementedError` there.
    pub fn add_signal_handler(&self, sig: i32, f: impl FnMut() + 'static) -> io::Result<()> {
        if self.is_closed() {
            return Err(self.closed_error("cannot add a signal handler"));
        }
        self.inner
            .signals
            .borrow_mut()
            .add(&self.inner.shared, sig, Box::new(f))
    }

    /// Removes the handler for `sig`; false if there was none.
    pub fn remove_signal_handler(&self, sig: i32) -> bool {
        self.inner.signals.borrow_mut().remove(sig)
    }

    /// Completes with `Ok(true)` when `handle` is signalled (a process handle
    /// is signalled when the process exits) or `Ok(false)` when `timeout`
    /// elapses: asyncio's `IocpProactor.wait_for_handle`. The wait runs on
    /// the OS thread pool (`RegisterWaitForSingleObject`) and its completion
    /// is posted to this loop's completion port, so no thread of ours waits.
    ///
    /// Windows only, on a proactor loop (`ErrorKind::Unsupported` on a
    /// selector loop). The handle is borrowed until the future completes or
    /// is dropped; dropping it unregisters the wait.
    #[cfg(windows)]
    pub fn wait_for_handle<'a>(
        &self,
        handle: std::os::windows::io::BorrowedHandle<'a>,
        timeout: Option<Duration>,
    ) -> impl Future<Output = io::Result<bool>> + 'a {
        use std::os::windows::io::AsRawHandle;
        let lp = self.clone();
        async move {
            let Some(p) = lp.iocp_backend() else {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "wait_for_handle needs a proactor (completion port) loop; \
                     create it with EventLoop::proactor()",
                ));
            };
            // SAFETY: `handle` is borrowed for as long as this future lives,
            // and dropping the future unregisters the wait.
            let op = unsafe { p.wait_for_handle(handle.as_raw_handle(), timeout)? };
            let (res, ()) = op.await;
            res.map(|timed_out| timed_out == 0)
        }
    }

    // ------------------------------------------------------------ internals

    /// An owning handle to this loop, from any handle (the policy keeps one
    /// for its thread's loop). On a closed loop it owns nothing that is left.
    pub(crate) fn owning_handle(&self) -> EventLoop {
        self.inner.owners.set(self.inner.owners.get() + 1);
        EventLoop {
            inner: Rc::clone(&self.inner),
            owning: true,
        }
    }

    /// The error for using this loop once it is closed, saying how it came
    /// to be closed and what to do about it. `doing` names what failed.
    pub(crate) fn closed_error(&self, doing: &str) -> io::Error {
        let why = match self.inner.closed_by.get() {
            Some(ClosedBy::LastOwner) => {
                "the event loop is closed: its owning handle (from EventLoop::proactor/selector/new \
                 or new_event_loop) was dropped, and clones do not keep a loop open; keep that \
                 handle alive while the loop is in use, or set it as this thread's loop with \
                 set_event_loop"
            }
            _ => "the event loop is closed (close() was called); create a new one",
        };
        io::Error::other(format!("{doing}: {why}"))
    }

    /// On a closed loop, cancels `state` and drops its callback at once
    /// (queued there, it would keep whatever it captured, perhaps a handle
    /// to this very loop, until the last handle goes); true if it did.
    fn refuse_callback(&self, state: &HandleState, what: &str) -> bool {
        if !self.inner.closed.get() {
            return false;
        }
        tracing::debug!("{what} on a closed event loop: the callback is dropped, never run");
        drop(state.release());
        true
    }

    /// The io_uring backend, for operations that want completions.
    #[cfg(target_os = "linux")]
    pub(crate) fn proactor_backend(&self) -> Option<&proactor::Proactor> {
        match &self.inner.backend {
            Backend::Proactor(p) => Some(p),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    /// The completion-port backend, for operations that want completions.
    #[cfg(windows)]
    pub(crate) fn iocp_backend(&self) -> Option<&iocp::Iocp> {
        match &self.inner.backend {
            Backend::Iocp(p) => Some(p),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    /// The epoll backend, for operations that want readiness.
    #[cfg(unix)]
    pub(crate) fn selector_backend(&self) -> Option<&selector::Selector> {
        match &self.inner.backend {
            Backend::Selector(s) => Some(s),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    /// Waits until `fd` is readable, on either backend (a `POLL_ADD` on the
    /// proactor, a one-shot epoll registration on the selector).
    ///
    /// The caller keeps `fd` open until the returned future completes or is
    /// dropped.
    #[cfg(unix)]
    pub(crate) async fn wait_readable(&self, fd: std::os::fd::RawFd) -> io::Result<()> {
        match &self.inner.backend {
            #[cfg(target_os = "linux")]
            Backend::Proactor(p) => {
                let (res, ()) = p.poll_add(fd, libc::POLLIN as u32).await;
                res.map(|_| ())
            }
            Backend::Selector(s) => {
                // SAFETY: the caller keeps `fd` open while this future lives,
                // and the Source (dropped with the future) deregisters it.
                let src = unsafe { s.register(fd)? };
                std::future::poll_fn(|cx| src.poll_ready(cx, selector::Interest::Read)).await
            }
        }
    }

    /// Whether the calling thread is this loop's thread.
    pub(crate) fn is_own_thread(&self) -> bool {
        self.inner.shared.thread == thread_id()
    }

    fn enter_running(&self) -> io::Result<RunGuard> {
        if self.inner.closed.get() {
            return Err(self.closed_error("cannot run the event loop"));
        }
        if self.inner.running.get() {
            return Err(io::Error::other("this event loop is already running"));
        }
        if !self.is_own_thread() {
            return Err(io::Error::other(
                "an event loop can only run on the thread that created it",
            ));
        }
        let other = RUNNING.try_with(|r| r.borrow().is_some()).unwrap_or(true);
        if other {
            return Err(io::Error::other(
                "cannot run the event loop while another loop is running on this thread",
            ));
        }
        RUNNING.with(|r| *r.borrow_mut() = Some(self.non_owning()));
        self.inner.running.set(true);
        Ok(RunGuard {
            lp: self.non_owning(),
        })
    }

    /// One iteration; `busy` says there is work outside the ready queue (the
    /// main future was woken), so the backend must not sleep.
    fn run_once(&self, busy: bool) -> io::Result<()> {
        let inner = &*self.inner;
        let timeout = if busy
            || inner.stopping.get()
            || !inner.ready.borrow().is_empty()
            || inner.shared.stop_requested.load(Ordering::Relaxed)
            // Work queued from this thread does not wake the loop: it only
            // must not be slept on.
            || !inner.shared.lock().queue.is_empty()
        {
            Some(Duration::ZERO)
        } else {
            inner
                .timers
                .borrow_mut()
                .next_deadline()
                .map(|d| d.saturating_duration_since(Instant::now()))
        };
        inner.backend.poll(timeout, &inner.shared.notifier)?;
        if inner.shared.stop_requested.swap(false, Ordering::SeqCst) {
            inner.stopping.set(true);
        }
        self.take_remote();
        self.take_signals();
        {
            let now = Instant::now();
            let mut ready = inner.ready.borrow_mut();
            inner
                .timers
                .borrow_mut()
                .pop_expired(now, &mut |h| ready.push_back(Ready::Call(h)));
        }
        let ntodo = inner.ready.borrow().len();
        for _ in 0..ntodo {
            let item = inner.ready.borrow_mut().pop_front();
            match item {
                Some(Ready::Call(h)) => {
                    if let Some(cb) = h.take() {
                        if let Err(p) = catch_unwind(AssertUnwindSafe(cb)) {
                            tracing::error!(
                                "exception in callback (the loop goes on): {}",
                                panic_message(&*p)
                            );
                        }
                    }
                }
                Some(Ready::Run(r)) => {
                    // Task panics are caught by async-task (propagate_panic)
                    // after `ReportPanic` logged them.
                    if let Err(p) = catch_unwind(AssertUnwindSafe(|| r.run())) {
                        tracing::error!("task panicked: {}", panic_message(&*p));
                    }
                }
                None => break,
            }
        }
        Ok(())
    }

    fn take_remote(&self) {
        let items: VecDeque<RemoteItem> = {
            let mut r = self.inner.shared.lock();
            if r.queue.is_empty() {
                return;
            }
            std::mem::take(&mut r.queue)
        };
        let mut ready = self.inner.ready.borrow_mut();
        for item in items {
            match item {
                RemoteItem::Call(f) => ready.push_back(Ready::Call(HandleState::new(f))),
                RemoteItem::Run(r) => ready.push_back(Ready::Run(r)),
            }
        }
    }

    fn take_signals(&self) {
        let pending = self.inner.shared.signals_pending.swap(0, Ordering::SeqCst);
        if pending == 0 {
            return;
        }
        let signals = self.inner.signals.borrow();
        let mut ready = self.inner.ready.borrow_mut();
        signals.collect(pending, &mut |cb| {
            ready.push_back(Ready::Call(HandleState::new(Box::new(move || {
                (cb.borrow_mut())();
            }))));
        });
    }

    /// Live tasks (for tests).
    #[cfg(test)]
    pub(crate) fn live_tasks(&self) -> usize {
        self.inner.tasks.len()
    }

    /// Pending callbacks, timers and signal handlers (for tests).
    #[cfg(test)]
    pub(crate) fn pending_counts(&self) -> (usize, usize, bool) {
        (
            self.inner.ready.borrow().len(),
            self.inner.timers.borrow().len(),
            !self.inner.signals.borrow().is_empty(),
        )
    }
}

fn far_future() -> Instant {
    // About 30 years: far enough to never fire, near enough not to overflow.
    Instant::now() + Duration::from_secs(86400 * 365 * 30)
}

impl Inner {
    /// Closes the loop and releases everything tied to it, on the loop's
    /// thread; idempotent. Order matters: task futures are dropped first,
    /// while the backend still works, so the IO they own is cancelled
    /// properly; destructors may queue more work, so queues are drained until
    /// they stay empty; the backend goes last.
    fn release(&self, why: ClosedBy) {
        let first = !self.closed.replace(true);
        self.shared.closed.store(true, Ordering::SeqCst);
        if first {
            self.closed_by.set(Some(why));
            self.shared.lock().closed = true;
        }
        for _ in 0..16 {
            self.tasks.cancel_all();
            let remote: Vec<RemoteItem> = self.shared.lock().queue.drain(..).collect();
            let ready: Vec<Ready> = match self.ready.try_borrow_mut() {
                Ok(mut r) => r.drain(..).collect(),
                Err(_) => Vec::new(),
            };
            let timers: Vec<Rc<HandleState>> = match self.timers.try_borrow_mut() {
                Ok(mut t) => t.drain(),
                Err(_) => Vec::new(),
            };
            if remote.is_empty() && ready.is_empty() && timers.is_empty() && self.tasks.len() == 0 {
                break;
            }
            // Callbacks are taken out of their states (a `Handle` or `Sleep`
            // may keep the state alive) and dropped with no borrow held.
            let mut callbacks = Vec::new();
            for item in &ready {
                if let Ready::Call(h) = item {
                    callbacks.extend(h.release());
                }
            }
            for h in &timers {
                callbacks.extend(h.release());
            }
            drop(callbacks);
            drop(ready);
            drop(timers);
            drop(remote);
        }
        if first {
            if let Ok(mut s) = self.signals.try_borrow_mut() {
                s.clear();
            }
            self.backend.close();
            // The backend no longer watches the wake-up eventfd: close it
            // too (safe against other threads' and signal handlers' wake-ups,
            // see notify.rs), so that no descriptor waits for the last handle.
            self.shared.notifier.close();
            // Completions the backend delivered while shutting down woke
            // tasks that are now dropped; nothing else is left to run.
            self.tasks.cancel_all();
            let ready: Vec<Ready> = match self.ready.try_borrow_mut() {
                Ok(mut r) => r.drain(..).collect(),
                Err(_) => Vec::new(),
            };
            drop(ready);
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Same teardown as `close`, for a loop whose handles are all gone.
        self.release(ClosedBy::LastOwner);
    }
}

struct RunGuard {
    lp: EventLoop,
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        self.lp.inner.running.set(false);
        self.lp.inner.stopping.set(false);
        let _ = RUNNING.try_with(|r| r.borrow_mut().take());
        // The last owning handle went away while the loop ran.
        if self.lp.inner.owners.get() == 0 {
            self.lp.inner.release(ClosedBy::LastOwner);
        }
    }
}

/// Schedules a task's runnable: straight onto the ready queue when called on
/// the loop's own thread while it runs, else through the remote queue (and a
/// wake-up if called from another thread).
fn schedule_runnable(shared: &Arc<Shared>, runnable: Runnable) {
    let mut slot = Some(runnable);
    let on_loop = RUNNING.try_with(|r| {
        let r = r.borrow();
        match r.as_ref() {
            Some(lp) if Arc::ptr_eq(&lp.inner.shared, shared) => {
                if let Some(run) = slot.take() {
                    lp.inner.ready.borrow_mut().push_back(Ready::Run(run));
                }
                true
            }
            _ => false,
        }
    });
    let Some(runnable) = slot else { return };
    if on_loop.is_err() {
        // Thread-local storage is being torn down: we cannot tell where we are.
        return leak_runnable(runnable);
    }
    let mut remote = shared.lock();
    if remote.closed {
        drop(remote);
        if shared.thread == thread_id() {
            // On the loop's thread: dropping cancels the task correctly.
            drop(runnable);
        } else {
            leak_runnable(runnable);
        }
        return;
    }
    remote.queue.push_back(RemoteItem::Run(runnable));
    drop(remote);
    if shared.thread != thread_id() {
        shared.notifier.notify();
    }
}

/// A task woken on a foreign thread after its loop closed cannot be dropped
/// there (its future is not `Send`); leaking it is the only safe choice.
fn leak_runnable(runnable: Runnable) {
    tracing::warn!("a task was woken after its event loop closed; it is leaked, not run");
    std::mem::forget(runnable);
}

struct MainWaker {
    woken: AtomicBool,
    shared: Arc<Shared>,
}

impl Wake for MainWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::SeqCst);
        if self.shared.thread != thread_id() {
            self.shared.notifier.notify();
        }
    }
}

// ---------------------------------------------------------------- LoopHandle

/// A `Send + Sync` handle to a loop, for other threads: asyncio's
/// `call_soon_threadsafe` and a thread-safe `stop`.
#[derive(Clone)]
pub struct LoopHandle {
    shared: Arc<Shared>,
}

impl fmt::Debug for LoopHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoopHandle")
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl LoopHandle {
    /// Schedules `f` on the loop's thread and wakes the loop. Errors once the
    /// loop is closed.
    pub fn call_soon_threadsafe(&self, f: impl FnOnce() + Send + 'static) -> io::Result<()> {
        {
            let mut r = self.shared.lock();
            if r.closed {
                return Err(io::Error::other(
                    "the event loop is closed; call_soon_threadsafe cannot schedule on it",
                ));
            }
            r.queue.push_back(RemoteItem::Call(Box::new(f)));
        }
        // From the loop's own thread no wake-up is needed: the loop is not
        // sleeping (we are running on it), and `run_once` never sleeps while
        // this queue holds work.
        if self.shared.thread != thread_id() {
            self.shared.notifier.notify();
        }
        Ok(())
    }

    /// Stops the loop after its current iteration (thread-safe `stop`).
    pub fn stop(&self) {
        self.shared.stop_requested.store(true, Ordering::SeqCst);
        self.shared.notifier.notify();
    }

    /// Whether the loop was closed.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::SeqCst)
    }

    /// Whether both handles refer to the same loop.
    pub fn same_loop(&self, other: &LoopHandle) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }
}

// ---------------------------------------------------------------- sleep

/// Completes after `delay` on the running loop (asyncio's `sleep`).
///
/// Must be awaited inside a running loop; outside one it completes at once
/// with a warning, rather than panicking.
pub fn sleep(delay: Duration) -> Sleep {
    Sleep { delay, state: None }
}

/// The future returned by [`sleep`].
pub struct Sleep {
    delay: Duration,
    state: Option<(Handle, Rc<SleepShared>)>,
}

/// What the timer callback and the future share.
#[derive(Default)]
struct SleepShared {
    fired: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl fmt::Debug for Sleep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sleep").field("delay", &self.delay).finish()
    }
}

impl Future for Sleep {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.state.is_none() {
            let Some(lp) = get_running_loop() else {
                tracing::warn!("sleep() awaited outside a running event loop; returning at once");
                return Poll::Ready(());
            };
            let shared = Rc::new(SleepShared::default());
            let s2 = Rc::clone(&shared);
            let h = lp.call_later(self.delay, move || {
                s2.fired.set(true);
                if let Some(w) = s2.waker.borrow_mut().take() {
                    w.wake();
                }
            });
            self.state = Some((h, shared));
        }
        let Some((_, shared)) = &self.state else {
            return Poll::Ready(());
        };
        if shared.fired.get() {
            return Poll::Ready(());
        }
        *shared.waker.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let Some((h, _)) = &self.state {
            h.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handle_cancel_drops_callback() {
        let lp = EventLoop::selector().unwrap();
        let flag = Rc::new(Cell::new(0));
        let f = Rc::clone(&flag);
        let h = lp.call_soon(move || f.set(1));
        assert_eq!(Rc::strong_count(&flag), 2);
        h.cancel();
        assert_eq!(Rc::strong_count(&flag), 1);
        lp.run_until_complete(async {}).unwrap();
        assert_eq!(flag.get(), 0);
        assert_eq!(lp.pending_counts().0, 0);
    }

    #[test]
    fn tasks_leave_the_table_when_done_cancelled_or_closed() {
        let lp = EventLoop::selector().unwrap();
        let done = lp.create_task(async { 1 });
        let cancelled = lp.create_task(std::future::pending::<()>());
        lp.create_task(std::future::pending::<()>()).detach();
        assert_eq!(lp.live_tasks(), 3);
        assert_eq!(lp.run_until_complete(done).unwrap(), 1);
        assert_eq!(lp.live_tasks(), 2);
        // Dropping the handle cancels: the future goes at the next iteration.
        drop(cancelled);
        lp.run_until_complete(async {}).unwrap();
        assert_eq!(lp.live_tasks(), 1);
        lp.close().unwrap();
        assert_eq!(lp.live_tasks(), 0);
    }

    #[test]
    fn the_last_owning_handle_closes_the_loop() {
        let lp = EventLoop::selector().unwrap();
        let inside = lp
            .run_until_complete(async { get_running_loop().unwrap() })
            .unwrap();
        let owner = lp.share_ownership().unwrap();
        assert!(owner.is_owning() && lp.is_owning() && !inside.is_owning());
        drop(lp);
        assert!(!inside.is_closed(), "a shared owner is left");
        drop(owner);
        assert!(inside.is_closed());
        assert!(inside.share_ownership().is_err());
    }

    #[test]
    fn clones_do_not_keep_the_loop_open() {
        let lp = EventLoop::selector().unwrap();
        let copy = lp.clone();
        assert!(!copy.is_owning());
        assert_eq!(copy.clone(), lp);
        drop(lp);
        assert!(copy.is_closed());
        let err = copy.run_until_complete(async {}).unwrap_err();
        assert!(err.to_string().contains("owning handle"), "{err}");
        let e2 = copy.add_signal_handler(10, || {}).unwrap_err();
        assert!(e2.to_string().contains("owning handle"), "{e2}");
        // Scheduling on it schedules nothing and keeps nothing.
        let flag = Rc::new(Cell::new(0));
        let f = Rc::clone(&flag);
        let h = copy.call_soon(move || f.set(1));
        assert!(h.cancelled());
        assert_eq!(Rc::strong_count(&flag), 1);
        let (f, keep) = (Rc::clone(&flag), copy.clone());
        let h = copy.call_later(Duration::from_secs(1), move || {
            let _ = &keep;
            f.set(2);
        });
        assert!(h.cancelled());
        assert_eq!(Rc::strong_count(&flag), 1);
        assert_eq!(copy.pending_counts(), (0, 0, false));
        let t = copy.create_task(async { 1 });
        assert!(t.is_finished());
        assert_eq!(copy.live_tasks(), 0);
    }

    #[test]
    fn close_says_close_was_called() {
        let lp = EventLoop::selector().unwrap();
        lp.close().unwrap();
        let err = lp.run_until_complete(async {}).unwrap_err();
        assert!(err.to_string().contains("close() was called"), "{err}");
    }

    #[test]
    fn a_loop_whose_last_owner_goes_while_it_runs_closes_when_the_run_returns() {
        let lp = EventLoop::selector().unwrap();
        let weak = lp.non_owning();
        let dropped = Rc::new(Cell::new(false));
        let d = Rc::clone(&dropped);
        weak.create_task(async move {
            drop(lp);
            d.set(true);
        })
        .detach();
        weak.run_until_complete(sleep(Duration::from_millis(1)))
            .unwrap();
        assert!(dropped.get());
        assert!(weak.is_closed());
    }

    #[test]
    fn awaiting_a_task_of_a_closed_loop_never_panics() {
        let a = EventLoop::selector().unwrap();
        let t = a.create_task(std::future::pending::<u8>());
        a.close().unwrap();
        let b = EventLoop::selector().unwrap();
        let out = b
            .run_until_complete(async {
                let mut t = Box::pin(t);
                futures_util::poll!(t.as_mut())
            })
            .unwrap();
        assert!(out.is_pending());
    }
}
