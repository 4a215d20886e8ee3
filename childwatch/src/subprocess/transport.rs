//! asyncio's transport/protocol layer for subprocesses:
//! [`EventLoop::subprocess_exec`] / [`EventLoop::subprocess_shell`] drive a
//! [`SubprocessProtocol`] through a [`SubprocessTransport`] and one
//! [`PipeTransport`] per piped stream (CPython's `base_subprocess.py`).
//!
//! How: the child is started by the same spawn path as [`Process`]
//! (`Command::spawn_child`), so its exit arrives through the same watcher
//! callback and signals go through the same reap gate. A task per readable
//! pipe reads 64 KiB at a time into `pipe_data_received`, honouring
//! `pause_reading`; a task for stdin drains the write buffer; a task waits
//! for the exit. Callbacks run on the loop's thread, in this order:
//! `connection_made` first; each pipe's data in arrival order, then its
//! `pipe_connection_lost`; `process_exited` once when the status is known;
//! `connection_lost` last, once the process exited **and** every pipe is
//! closed; nothing after it. The transport then drops the protocol, which
//! breaks the usual cycle of a protocol that stores its transport.
//!
//! Transport methods called from inside a callback never call the protocol
//! back synchronously (they set state and wake a task), so a callback may
//! use the transport freely. If the protocol is borrowed elsewhere when an
//! event arrives (the caller holds a `borrow_mut` of the returned
//! `Rc<RefCell<P>>` across an `.await`), the event is retried on the next
//! loop iteration.
//!
//! Cost against [`Process`]: one more task per pipe and one for the exit,
//! and data is copied once more (kernel → our buffer → the callback's
//! slice), as in asyncio. [`Process`] reads its pipes directly.
//!
//! [`Process`]: super::Process

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fmt;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Poll, Waker};

use futures_io::{AsyncRead, AsyncWrite};

use super::child_io::{ChildStderr, ChildStdin, ChildStdout};
use super::command::{Command, Spawned, Stdio, create_subprocess_shell};
use super::exit::ChildCore;
use crate::event_loop::{EventLoop, get_running_loop};
use crate::watcher::{Pid, ReturnCode};

/// Bytes read per `pipe_data_received` at most.
const READ_CHUNK: usize = 64 * 1024;

/// asyncio's `SubprocessProtocol`; every method has an empty default.
/// Callbacks run on the loop's thread, in the order the module docs give.
pub trait SubprocessProtocol: 'static {
    /// The child started; `transport` controls it. Called first, once.
    fn connection_made(&mut self, _transport: &SubprocessTransport) {}
    /// `data` arrived on the child's stdout (`fd` 1) or stderr (`fd` 2).
    fn pipe_data_received(&mut self, _fd: i32, _data: &[u8]) {}
    /// Pipe `fd` (0 stdin, 1 stdout, 2 stderr) reached end-of-file or was
    /// closed (`None`), or failed (`Some(error)`).
    fn pipe_connection_lost(&mut self, _fd: i32, _exc: Option<io::Error>) {}
    /// The child exited; its status is in `get_returncode()`. Called once.
    fn process_exited(&mut self) {}
    /// Called last, once the child exited and every pipe is closed. `exc`
    /// is `Some` only when the exit status could not be learned (the child
    /// watcher was closed before the child exited).
    fn connection_lost(&mut self, _exc: Option<io::Error>) {}
}

/// What a dynamic protocol looks like inside the transport.
type DynProtocol = Rc<RefCell<dyn SubprocessProtocol>>;

/// One protocol callback, kept until the protocol is free.
type Event = Box<dyn FnOnce(&mut dyn SubprocessProtocol)>;

/// Which end of which pipe a [`PipeTransport`] is.
enum End {
    /// stdin: a write buffer drained by a task.
    Write {
        buffer: RefCell<VecDeque<u8>>,
        eof: Cell<bool>,
    },
    /// stdout or stderr: a task reading into `pipe_data_received`.
    Read { paused: Cell<bool> },
}

struct PipeShared {
    fd: i32,
    end: End,
    closing: Cell<bool>,
    /// The pipe's task, to wake on a write, a resume or a close.
    waker: RefCell<Option<Waker>>,
}

impl PipeShared {
    fn wake(&self) {
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    fn park(&self, cx: &std::task::Context<'_>) {
        *self.waker.borrow_mut() = Some(cx.waker().clone());
    }
}

/// One of the child's pipes as a transport (asyncio's
/// `ReadTransport`/`WriteTransport` of `get_pipe_transport`). `!Send`;
/// clones are the same pipe.
#[derive(Clone)]
pub struct PipeTransport {
    pipe: Rc<PipeShared>,
}

impl fmt::Debug for PipeTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PipeTransport")
            .field("fd", &self.pipe.fd)
            .field("closing", &self.pipe.closing.get())
            .finish()
    }
}

impl PipeTransport {
    fn write_end(&self) -> io::Result<(&RefCell<VecDeque<u8>>, &Cell<bool>)> {
        match &self.pipe.end {
            End::Write { buffer, eof } => Ok((buffer, eof)),
            End::Read { .. } => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "pipe {} is the child's output: it can be read, not written",
                    self.pipe.fd
                ),
            )),
        }
    }

    /// Queues `data` for the child's stdin; never blocks (the buffer grows,
    /// see [`get_write_buffer_size`](Self::get_write_buffer_size)).
    /// `InvalidInput` on an output pipe; `Other` once the pipe is closing
    /// (`write_eof` or `close` was called, or the child stopped reading).
    pub fn write(&self, data: &[u8]) -> io::Result<()> {
        let (buffer, eof) = self.write_end()?;
        if self.pipe.closing.get() || eof.get() {
            return Err(io::Error::other(
                "cannot write to the child's stdin: it is closing (write_eof or close was called, \
                 or the child closed it)",
            ));
        }
        if !data.is_empty() {
            buffer.borrow_mut().extend(data);
            self.pipe.wake();
        }
        Ok(())
    }

    /// Closes the child's stdin once the buffer is written (asyncio's
    /// `write_eof`). `InvalidInput` on an output pipe.
    pub fn write_eof(&self) -> io::Result<()> {
        let (_, eof) = self.write_end()?;
        eof.set(true);
        self.pipe.wake();
        Ok(())
    }

    /// Bytes queued by [`write`](Self::write) and not yet in the pipe.
    pub fn get_write_buffer_size(&self) -> usize {
        match &self.pipe.end {
            End::Write { buffer, .. } => buffer.borrow().len(),
            End::Read { .. } => 0,
        }
    }

    /// Stops `pipe_data_received` for this pipe until
    /// [`resume_reading`](Self::resume_reading); the child then blocks once
    /// the pipe is full, and nothing is lost. No-op on stdin.
    pub fn pause_reading(&self) {
        if let End::Read { paused } = &self.pipe.end {
            paused.set(true);
        }
    }

    /// Resumes `pipe_data_received` after [`pause_reading`](Self::pause_reading).
    pub fn resume_reading(&self) {
        if let End::Read { paused } = &self.pipe.end {
            paused.set(false);
            self.pipe.wake();
        }
    }

    /// Closes the pipe: an output pipe stops reading at once, stdin closes
    /// once its buffer is written. `pipe_connection_lost(fd, None)` follows.
    pub fn close(&self) {
        self.pipe.closing.set(true);
        self.pipe.wake();
    }

    /// Whether [`close`](Self::close) was called (or the pipe is done).
    pub fn is_closing(&self) -> bool {
        self.pipe.closing.get()
    }
}

/// Everything one transport holds; its tasks keep it alive until
/// `connection_lost`.
struct Shared {
    lp: EventLoop,
    core: ChildCore,
    protocol: RefCell<Option<DynProtocol>>,
    pipes: [RefCell<Option<PipeTransport>>; 3],
    /// Pipes whose `pipe_connection_lost` is not delivered yet.
    open_pipes: Cell<u8>,
    exited: Cell<bool>,
    exit_error: RefCell<Option<io::Error>>,
    closed: Cell<bool>,
    lost: Cell<bool>,
    /// Events not delivered yet because the protocol was borrowed
    /// elsewhere, in order; nothing overtakes them.
    queue: RefCell<VecDeque<Event>>,
    /// A retry of the queue is scheduled.
    retry: Cell<bool>,
    /// Readers waiting for the queue to drain (backpressure).
    drained: RefCell<Vec<Waker>>,
    /// The last handle was dropped without `close()`: close once the child
    /// has exited (as asyncio's transport, kept alive by its watcher).
    close_on_exit: Cell<bool>,
}

/// How long a busy protocol is left alone before the next delivery try.
const BUSY_RETRY: std::time::Duration = std::time::Duration::from_millis(1);

impl Shared {
    /// Calls `f` on the protocol, in order: now, unless earlier events wait
    /// or the protocol is borrowed elsewhere; then after them, retried every
    /// [`BUSY_RETRY`]. Nothing is called after `connection_lost`. A panic
    /// in a callback is caught and logged (asyncio logs "Exception in
    /// callback") and the transport goes on.
    fn invoke(self: &Rc<Self>, f: Event) {
        let f = if self.queue.borrow().is_empty() {
            match self.call(f) {
                Ok(()) => return,
                Err(f) => f,
            }
        } else {
            f
        };
        // Busy (or behind others): keep it, in order.
        self.queue.borrow_mut().push_back(f);
        self.schedule_retry();
    }

    /// Delivers `f` now if the protocol is free; gives it back if busy.
    fn call<F: FnOnce(&mut dyn SubprocessProtocol)>(&self, f: F) -> Result<(), F> {
        let proto = self.protocol.borrow().clone();
        let Some(proto) = proto else { return Ok(()) };
        let Ok(mut p) = proto.try_borrow_mut() else {
            return Err(f);
        };
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut *p)));
        if r.is_err() {
            tracing::error!(
                "a SubprocessProtocol callback of pid {} panicked; the transport goes on",
                self.core.pid()
            );
        }
        Ok(())
    }

    fn schedule_retry(self: &Rc<Self>) {
        if self.retry.replace(true) {
            return;
        }
        let me = Rc::clone(self);
        self.lp.call_later(BUSY_RETRY, move || {
            me.retry.set(false);
            me.drain();
        });
    }

    /// Delivers the queued events in order until the protocol is busy.
    fn drain(self: &Rc<Self>) {
        loop {
            let Some(f) = self.queue.borrow_mut().pop_front() else {
                for w in self.drained.borrow_mut().drain(..) {
                    w.wake();
                }
                return;
            };
            if let Err(f) = self.call(f) {
                self.queue.borrow_mut().push_front(f);
                self.schedule_retry();
                return;
            }
        }
    }

    /// Whether events wait in the queue; registers `cx` to be woken when
    /// they are delivered.
    fn backlog(&self, cx: &std::task::Context<'_>) -> bool {
        if self.queue.borrow().is_empty() {
            return false;
        }
        self.drained.borrow_mut().push(cx.waker().clone());
        true
    }

    /// A pipe is done: tell the protocol, then see whether all is over.
    fn pipe_lost(self: &Rc<Self>, fd: i32, exc: Option<io::Error>) {
        if let Some(p) = self.pipes[fd as usize].borrow().as_ref() {
            p.pipe.closing.set(true);
        }
        self.open_pipes.set(self.open_pipes.get().saturating_sub(1));
        self.invoke(Box::new(move |p| p.pipe_connection_lost(fd, exc)));
        self.maybe_lost();
    }

    /// `connection_lost` once the process exited and every pipe is closed;
    /// then the protocol is dropped.
    fn maybe_lost(self: &Rc<Self>) {
        if self.lost.get() || !self.exited.get() || self.open_pipes.get() > 0 {
            return;
        }
        self.lost.set(true);
        let exc = self.exit_error.borrow_mut().take();
        let me = Rc::clone(self);
        self.invoke(Box::new(move |p| {
            p.connection_lost(exc);
            // Break the cycle protocol → transport → protocol; after this
            // nothing is delivered.
            me.protocol.borrow_mut().take();
        }));
    }

    fn close(&self) {
        if self.closed.replace(true) {
            return;
        }
        for p in self.pipes.iter() {
            if let Some(p) = p.borrow().as_ref() {
                p.close();
            }
        }
        if !self.exited.get() && self.core.returncode().is_none() {
            // asyncio's BaseSubprocessTransport.close(): a child still
            // running is killed.
            if let Err(e) = self.core.kill() {
                tracing::warn!("closing the transport of pid {}: {e}", self.core.pid());
            }
        }
    }
}

/// The user-visible handle. When the last clone goes away without
/// [`close`](SubprocessTransport::close) while the connection is live, it
/// warns and closes once the child has exited: a running child is not
/// killed by a dropped handle, as asyncio's transport, kept alive by its
/// child watcher, is not collected while its child runs.
struct Handle {
    shared: Rc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        let s = &self.shared;
        if s.closed.get() || s.lost.get() {
            return;
        }
        tracing::warn!(
            "a SubprocessTransport of pid {} was dropped without close(); it closes once the \
             child has exited",
            s.core.pid()
        );
        if s.exited.get() {
            s.close();
        } else {
            s.close_on_exit.set(true);
        }
    }
}

/// asyncio's `SubprocessTransport`: controls a child started by
/// [`EventLoop::subprocess_exec`]. `!Send`; a cheap clone of the same
/// transport. Dropping every clone without `close()` logs a warning and
/// closes the transport once the child exits (it is not killed).
#[derive(Clone)]
pub struct SubprocessTransport {
    handle: Rc<Handle>,
}

impl fmt::Debug for SubprocessTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubprocessTransport")
            .field("pid", &self.get_pid())
            .field("returncode", &self.get_returncode())
            .field("closing", &self.is_closing())
            .finish()
    }
}

impl SubprocessTransport {
    fn shared(&self) -> &Rc<Shared> {
        &self.handle.shared
    }

    /// The child's pid.
    pub fn get_pid(&self) -> Pid {
        self.shared().core.pid()
    }

    /// The child's returncode once its exit was reported, else `None`.
    pub fn get_returncode(&self) -> Option<ReturnCode> {
        self.shared().core.returncode()
    }

    /// The transport of pipe `fd` (0 stdin, 1 stdout, 2 stderr) if that
    /// stream was piped, else `None`.
    pub fn get_pipe_transport(&self, fd: i32) -> Option<PipeTransport> {
        let i = usize::try_from(fd).ok().filter(|i| *i < 3)?;
        self.shared().pipes[i].borrow().clone()
    }

    /// Sends `sig` to the child: a no-op once it exited, never a recycled
    /// pid (the same gate as [`Process::send_signal`](super::Process::send_signal)).
    pub fn send_signal(&self, sig: i32) -> io::Result<()> {
        self.shared().core.send_signal(sig)
    }

    /// SIGTERM (Windows: `TerminateProcess(h, 1)`).
    pub fn terminate(&self) -> io::Result<()> {
        self.shared().core.terminate()
    }

    /// SIGKILL (Windows: `TerminateProcess(h, 1)`).
    pub fn kill(&self) -> io::Result<()> {
        self.shared().core.kill()
    }

    /// Closes every pipe and, if the child is still running, kills it
    /// (asyncio sends SIGKILL). `connection_lost` still comes, once.
    pub fn close(&self) {
        self.shared().close();
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closing(&self) -> bool {
        self.shared().closed.get()
    }
}

impl EventLoop {
    /// asyncio's `loop.subprocess_exec`: spawns `command` (its stdio
    /// settings apply; [`Stdio::piped`] streams get a [`PipeTransport`])
    /// and connects a protocol made by `protocol_factory`.
    /// `connection_made` has been called when this returns.
    ///
    /// Errors: as [`Command::spawn`], and `Other` when `self` is not the
    /// loop running on this thread.
    pub async fn subprocess_exec<P: SubprocessProtocol>(
        &self,
        protocol_factory: impl FnOnce() -> P,
        command: &mut Command,
    ) -> io::Result<(SubprocessTransport, Rc<RefCell<P>>)> {
        let running = get_running_loop().is_some_and(|lp| lp.handle().same_loop(&self.handle()));
        if !running {
            return Err(io::Error::other(
                "subprocess_exec must be awaited on the loop it is called on, while it runs \
                 (run_until_complete or a task of that loop)",
            ));
        }
        let spawned = command.spawn_child()?;
        Ok(connect(self, spawned, protocol_factory))
    }

    /// asyncio's `loop.subprocess_shell`: `/bin/sh -c cmd` (`cmd.exe /c` on
    /// Windows) with every stream piped, as asyncio's default.
    pub async fn subprocess_shell<P: SubprocessProtocol>(
        &self,
        protocol_factory: impl FnOnce() -> P,
        cmd: &str,
    ) -> io::Result<(SubprocessTransport, Rc<RefCell<P>>)> {
        let mut c = create_subprocess_shell(cmd);
        c.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        self.subprocess_exec(protocol_factory, &mut c).await
    }
}

/// Builds the transport for a spawned child, calls `connection_made`, and
/// starts the pipe and exit tasks.
fn connect<P: SubprocessProtocol>(
    lp: &EventLoop,
    spawned: Spawned,
    protocol_factory: impl FnOnce() -> P,
) -> (SubprocessTransport, Rc<RefCell<P>>) {
    let Spawned {
        core,
        stdin,
        stdout,
        stderr,
    } = spawned;
    let proto = Rc::new(RefCell::new(protocol_factory()));
    let dynp: DynProtocol = proto.clone();
    let pipe = |fd: i32, end: End| PipeTransport {
        pipe: Rc::new(PipeShared {
            fd,
            end,
            closing: Cell::new(false),
            waker: RefCell::new(None),
        }),
    };
    let write = || End::Write {
        buffer: RefCell::new(VecDeque::new()),
        eof: Cell::new(false),
    };
    let read = || End::Read {
        paused: Cell::new(false),
    };
    let pipes = [
        RefCell::new(stdin.as_ref().map(|_| pipe(0, write()))),
        RefCell::new(stdout.as_ref().map(|_| pipe(1, read()))),
        RefCell::new(stderr.as_ref().map(|_| pipe(2, read()))),
    ];
    let open = pipes.iter().filter(|p| p.borrow().is_some()).count() as u8;
    let shared = Rc::new(Shared {
        // Non-owning: the transport's tasks must not keep their loop open.
        lp: lp.non_owning(),
        core,
        protocol: RefCell::new(Some(dynp)),
        pipes,
        open_pipes: Cell::new(open),
        exited: Cell::new(false),
        exit_error: RefCell::new(None),
        closed: Cell::new(false),
        lost: Cell::new(false),
        queue: RefCell::new(VecDeque::new()),
        retry: Cell::new(false),
        drained: RefCell::new(Vec::new()),
        close_on_exit: Cell::new(false),
    });
    let transport = SubprocessTransport {
        handle: Rc::new(Handle {
            shared: Rc::clone(&shared),
        }),
    };
    // connection_made first: the tasks below only run after this returns.
    proto.borrow_mut().connection_made(&transport);
    let pipe_of = |i: usize| {
        shared.pipes[i]
            .borrow()
            .as_ref()
            .map(|p| Rc::clone(&p.pipe))
    };
    if let (Some(w), Some(p)) = (stdin, pipe_of(0)) {
        lp.create_task(write_task(Rc::clone(&shared), p, w))
            .detach();
    }
    if let (Some(r), Some(p)) = (stdout, pipe_of(1)) {
        lp.create_task(read_task(Rc::clone(&shared), p, Reader::Out(r)))
            .detach();
    }
    if let (Some(r), Some(p)) = (stderr, pipe_of(2)) {
        lp.create_task(read_task(Rc::clone(&shared), p, Reader::Err(r)))
            .detach();
    }
    let s2 = Rc::clone(&shared);
    lp.create_task(async move {
        let waited = s2.core.wait_status().await;
        s2.exited.set(true);
        match waited {
            Ok(_) => s2.invoke(Box::new(|p| p.process_exited())),
            Err(e) => *s2.exit_error.borrow_mut() = Some(e),
        }
        // The child's stdin is gone with it: an idle stdin pipe closes
        // (asyncio notices the reader hanging up), so connection_lost can
        // come without an explicit write_eof.
        if let Some(p) = s2.pipes[0].borrow().as_ref() {
            if p.get_write_buffer_size() == 0 {
                p.close();
            }
        }
        if s2.close_on_exit.get() {
            s2.close();
        }
        s2.maybe_lost();
    })
    .detach();
    (transport, proto)
}

/// stdout or stderr.
enum Reader {
    Out(ChildStdout),
    Err(ChildStderr),
}

impl Reader {
    fn poll_read(
        &mut self,
        cx: &mut std::task::Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        match self {
            Reader::Out(r) => Pin::new(r).poll_read(cx, buf),
            Reader::Err(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

/// Reads a pipe into `pipe_data_received` until end-of-file, an error or
/// `close`, pausing while asked to.
async fn read_task(shared: Rc<Shared>, pipe: Rc<PipeShared>, mut reader: Reader) {
    let fd = pipe.fd;
    let mut buf = vec![0u8; READ_CHUNK];
    let exc = loop {
        let step = poll_fn(|cx| {
            if pipe.closing.get() {
                return Poll::Ready(None);
            }
            if let End::Read { paused } = &pipe.end {
                if paused.get() {
                    pipe.park(cx);
                    return Poll::Pending;
                }
            }
            // The protocol is behind: read nothing more until it catches up.
            if shared.backlog(cx) {
                return Poll::Pending;
            }
            pipe.park(cx);
            reader.poll_read(cx, &mut buf).map(Some)
        })
        .await;
        match step {
            None | Some(Ok(0)) => break None,
            Some(Ok(n)) => deliver_data(&shared, fd, &buf[..n]),
            Some(Err(e)) => break Some(e),
        }
    };
    drop(reader);
    shared.pipe_lost(fd, exc);
}

/// `pipe_data_received(fd, data)`: borrowed when the protocol is free and
/// nothing waits before it, else copied behind the waiting events.
fn deliver_data(shared: &Rc<Shared>, fd: i32, data: &[u8]) {
    if shared.queue.borrow().is_empty() && shared.call(|p| p.pipe_data_received(fd, data)).is_ok() {
        return;
    }
    let owned = data.to_vec();
    shared.invoke(Box::new(move |p| p.pipe_data_received(fd, &owned)));
}

/// Drains the stdin buffer into the pipe; closes it on `write_eof` or
/// `close` once the buffer is empty.
async fn write_task(shared: Rc<Shared>, pipe: Rc<PipeShared>, mut w: ChildStdin) {
    let End::Write { buffer, eof } = &pipe.end else {
        return;
    };
    let exc = loop {
        let step = poll_fn(|cx| {
            let mut b = buffer.borrow_mut();
            if b.is_empty() {
                if eof.get() || pipe.closing.get() {
                    return Poll::Ready(Ok(None));
                }
                pipe.park(cx);
                return Poll::Pending;
            }
            let (front, _) = b.as_slices();
            match Pin::new(&mut w).poll_write(cx, front) {
                Poll::Ready(Ok(n)) => {
                    b.drain(..n);
                    Poll::Ready(Ok(Some(n)))
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        match step {
            Ok(Some(0)) => {
                break Some(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the child's stdin accepted no bytes",
                ));
            }
            Ok(Some(_)) => {}
            Ok(None) => {
                let closed = poll_fn(|cx| Pin::new(&mut w).poll_close(cx)).await;
                break closed
                    .err()
                    .filter(|e| e.kind() != io::ErrorKind::BrokenPipe);
            }
            Err(e) => {
                buffer.borrow_mut().clear();
                break Some(e);
            }
        }
    };
    drop(w);
    shared.pipe_lost(0, exc);
}
