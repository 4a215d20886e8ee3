//! The Unix `Reader` and `Writer` behind the public `ChildStdin`
//! (`AsyncWrite`), `ChildStdout` and `ChildStderr` (`AsyncRead`) of
//! `child_io.rs`.
//!
//! A pipe works through the loop that spawned the child, in that loop's own
//! style:
//!
//! * **proactor** (io_uring): completion-based. A read is an io_uring `READ`
//!   into a buffer the operation owns; the pipe keeps that operation and its
//!   buffer *across polls*, so a `poll_read` whose future is dropped
//!   (cancelled) loses nothing: the bytes land in the internal buffer and the
//!   next `poll_read` returns them. A write copies the caller's bytes into an
//!   owned buffer, submits one `WRITE` and reports the bytes as accepted (a
//!   one-chunk write-behind, like a `BufWriter`); the next `poll_write`,
//!   `poll_flush` or `poll_close` waits for it and reports its error, if any.
//!   The descriptor stays blocking: io_uring arms its own poll on a pipe.
//! * **selector** (epoll): readiness-based. The descriptor is non-blocking
//!   and registered with the loop's epoll; a `read`/`write` that would block
//!   arms interest and returns `Pending`.
//!
//! Every descriptor is `O_CLOEXEC`, so no pipe end leaks into other children.
//! A write to a pipe whose reader is gone (or after `poll_close`) is a
//! `BrokenPipe` error. `poll_close` on `ChildStdin` closes the descriptor,
//! which is how the child sees end-of-file.
//!
//! A pipe belongs to its loop's thread (it is `!Send`, like the loop).

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use crate::event_loop::EventLoop;
use crate::event_loop::proactor::{Op, Proactor};
use crate::event_loop::selector::{Interest, Source};

/// Size of one io_uring read or write (a pipe's default capacity).
const CHUNK: usize = 64 * 1024;

enum ReadIo {
    Proactor {
        proactor: Proactor,
        /// The read in flight; it owns its buffer until the kernel is done.
        op: Option<Op<Vec<u8>>>,
        /// Bytes read but not yet handed out: `buf[pos..]`.
        buf: Vec<u8>,
        pos: usize,
        eof: bool,
    },
    Selector(Source),
}

/// The reading end, shared by stdout and stderr.
pub(crate) struct Reader {
    // Field order matters: the IO state (an in-flight op, an epoll
    // registration) is dropped before the descriptor it refers to.
    io: ReadIo,
    fd: OwnedFd,
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    use rustix::fs::{OFlags, fcntl_getfl, fcntl_setfl};
    let fl = fcntl_getfl(fd)?;
    fcntl_setfl(fd, fl | OFlags::NONBLOCK)?;
    Ok(())
}

/// What a pipe needs from the loop: its proactor, or its selector.
enum Backend {
    Proactor(Proactor),
    Selector(crate::event_loop::selector::Selector),
}

fn backend(lp: &EventLoop) -> io::Result<Backend> {
    if let Some(p) = lp.proactor_backend() {
        return Ok(Backend::Proactor(p.clone()));
    }
    if let Some(s) = lp.selector_backend() {
        return Ok(Backend::Selector(s.clone()));
    }
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "this event loop has no backend that can drive pipes",
    ))
}

fn register(sel: &crate::event_loop::selector::Selector, fd: &OwnedFd) -> io::Result<Source> {
    set_nonblocking(fd)?;
    // SAFETY: the Source is stored beside `fd` and dropped before it (field
    // order in Reader / WriterState).
    unsafe { sel.register(fd.as_raw_fd()) }
}

impl Reader {
    pub(crate) fn new(lp: &EventLoop, fd: OwnedFd) -> io::Result<Reader> {
        let io = match backend(lp)? {
            Backend::Proactor(proactor) => ReadIo::Proactor {
                proactor,
                op: None,
                buf: Vec::new(),
                pos: 0,
                eof: false,
            },
            Backend::Selector(sel) => ReadIo::Selector(register(&sel, &fd)?),
        };
        Ok(Reader { io, fd })
    }

    pub(crate) fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let fd = self.fd.as_raw_fd();
        match &mut self.io {
            ReadIo::Proactor {
                proactor,
                op,
                buf,
                pos,
                eof,
            } => loop {
                if *pos < buf.len() {
                    let n = out.len().min(buf.len() - *pos);
                    out[..n].copy_from_slice(&buf[*pos..*pos + n]);
                    *pos += n;
                    return Poll::Ready(Ok(n));
                }
                if *eof || out.is_empty() {
                    return Poll::Ready(Ok(0));
                }
                let current = match op {
                    Some(op) => op,
                    None => {
                        let mut b = std::mem::take(buf);
                        b.clear();
                        b.reserve(CHUNK);
                        *pos = 0;
                        op.insert(proactor.read(fd, b))
                    }
                };
                let (res, mut b) = ready!(Pin::new(current).poll(cx));
                *op = None;
                *pos = 0;
                match res {
                    Ok(0) => *eof = true,
                    Ok(n) => {
                        let len = b.len() + n as usize;
                        if len <= b.capacity() {
                            // SAFETY: the kernel wrote `n` bytes into the spare
                            // capacity right after the old length (the READ's
                            // target); `len` stays within the allocation.
                            unsafe { b.set_len(len) };
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        *buf = b;
                        return Poll::Ready(Err(e));
                    }
                }
                *buf = b;
            },
            ReadIo::Selector(src) => loop {
                match rustix::io::read(&self.fd, &mut *out) {
                    Ok(n) => return Poll::Ready(Ok(n)),
                    Err(rustix::io::Errno::INTR) => {}
                    Err(rustix::io::Errno::AGAIN) => {
                        ready!(src.poll_ready(cx, Interest::Read))?;
                    }
                    Err(e) => return Poll::Ready(Err(e.into())),
                }
            },
        }
    }
}

enum WriteIo {
    Proactor {
        proactor: Proactor,
        /// The write in flight and the offset it started at in its buffer.
        op: Option<(Op<Vec<u8>>, usize)>,
        /// A buffer to reuse for the next write.
        spare: Vec<u8>,
    },
    Selector(Source),
}

struct WriterState {
    // Field order: the IO state before the descriptor (see Reader).
    io: WriteIo,
    fd: OwnedFd,
}

/// The writing end of stdin; `None` once closed.
pub(crate) struct Writer {
    state: Option<WriterState>,
}

fn closed_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        "the child's stdin was closed; nothing more can be written to it",
    )
}

impl WriterState {
    /// Waits until the write in flight (and any remainder) is done.
    fn drive(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let fd = self.fd.as_raw_fd();
        let WriteIo::Proactor {
            proactor,
            op,
            spare,
        } = &mut self.io
        else {
            return Poll::Ready(Ok(()));
        };
        while let Some((current, offset)) = op {
            let (res, b) = ready!(Pin::new(current).poll(cx));
            let start = *offset;
            *op = None;
            match res {
                Ok(n) => {
                    let done = start + n as usize;
                    if n == 0 && done < b.len() {
                        *spare = b;
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::WriteZero,
                            "the child's stdin accepted no bytes",
                        )));
                    }
                    if done < b.len() {
                        *op = Some((proactor.write(fd, b, done), done));
                    } else {
                        *spare = b;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                    *op = Some((proactor.write(fd, b, start), start));
                }
                Err(e) => {
                    *spare = b;
                    return Poll::Ready(Err(e));
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        ready!(self.drive(cx))?;
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let fd = self.fd.as_raw_fd();
        match &mut self.io {
            WriteIo::Proactor {
                proactor,
                op,
                spare,
            } => {
                let n = data.len().min(CHUNK);
                let mut b = std::mem::take(spare);
                b.clear();
                b.extend_from_slice(&data[..n]);
                *op = Some((proactor.write(fd, b, 0), 0));
                Poll::Ready(Ok(n))
            }
            WriteIo::Selector(src) => loop {
                match rustix::io::write(&self.fd, data) {
                    Ok(n) => return Poll::Ready(Ok(n)),
                    Err(rustix::io::Errno::INTR) => {}
                    Err(rustix::io::Errno::AGAIN) => {
                        ready!(src.poll_ready(cx, Interest::Write))?;
                    }
                    Err(e) => return Poll::Ready(Err(e.into())),
                }
            },
        }
    }
}

impl Writer {
    /// Whether `poll_close` closed the pipe.
    pub(crate) fn is_closed(&self) -> bool {
        self.state.is_none()
    }

    pub(crate) fn new(lp: &EventLoop, fd: OwnedFd) -> io::Result<Writer> {
        let io = match backend(lp)? {
            Backend::Proactor(proactor) => WriteIo::Proactor {
                proactor,
                op: None,
                spare: Vec::new(),
            },
            Backend::Selector(sel) => WriteIo::Selector(register(&sel, &fd)?),
        };
        Ok(Writer {
            state: Some(WriterState { io, fd }),
        })
    }

    pub(crate) fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.state {
            Some(st) => st.poll_write(cx, data),
            None => Poll::Ready(Err(closed_error())),
        }
    }

    pub(crate) fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.state {
            Some(st) => st.drive(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    pub(crate) fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let res = match &mut self.state {
            Some(st) => ready!(st.drive(cx)),
            None => return Poll::Ready(Ok(())),
        };
        // Drops the IO state, then the descriptor: the child sees EOF.
        self.state = None;
        Poll::Ready(res)
    }
}

/// What a pipe end is made from on this platform.
pub(crate) type RawPipe = OwnedFd;

impl AsRawFd for Reader {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn io_kind(io_proactor: bool) -> &'static str {
    if io_proactor { "proactor" } else { "selector" }
}

impl fmt::Debug for Writer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Pipe");
        match &self.state {
            Some(st) => d
                .field("fd", &st.fd.as_raw_fd())
                .field("io", &io_kind(matches!(st.io, WriteIo::Proactor { .. }))),
            None => d.field("closed", &true),
        };
        d.finish()
    }
}

impl fmt::Debug for Reader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pipe")
            .field("fd", &self.fd.as_raw_fd())
            .field("io", &io_kind(matches!(self.io, ReadIo::Proactor { .. })))
            .finish()
    }
}
