//! The Windows `Reader` and `Writer` behind the public `ChildStdin`
//! (`AsyncWrite`), `ChildStdout` and `ChildStderr` (`AsyncRead`) of
//! `child_io.rs`.
//!
//! Windows anonymous pipes cannot do overlapped IO, so each pipe is a named
//! pipe with a unique name (`\\.\pipe\childwatch-<pid>-<n>`, created with
//! `FILE_FLAG_FIRST_PIPE_INSTANCE` and `PIPE_REJECT_REMOTE_CLIENTS`, like
//! CPython's `windows_utils.pipe`). Our end is opened with
//! `FILE_FLAG_OVERLAPPED` and associated with the loop's completion port;
//! the child's end is an ordinary blocking handle that `std::process`
//! duplicates into the child as inheritable, and ours is never inherited.
//!
//! Reads and writes are IOCP operations (`event_loop/iocp.rs`):
//! completion-based exactly like the io_uring pipes on Linux. A read owns
//! its buffer across polls, so a cancelled `poll_read` loses nothing; a write
//! copies the caller's bytes and reports them accepted (a one-chunk
//! write-behind), and the next `poll_write`/`poll_flush`/`poll_close` waits
//! for it and reports its error. End-of-file is `ERROR_BROKEN_PIPE` (every
//! writer closed). Pipes need the proactor loop: on a selector loop they are
//! `Unsupported`, as asyncio's `SelectorEventLoop` has no subprocesses on
//! Windows.

use std::fmt;
use std::future::Future;
use std::io;
use std::os::windows::io::{AsRawHandle, FromRawHandle, OwnedHandle, RawHandle};
use std::pin::Pin;
use std::ptr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};

use windows_sys::Win32::Foundation::{
    ERROR_BROKEN_PIPE, ERROR_PIPE_NOT_CONNECTED, GENERIC_READ, GENERIC_WRITE, INVALID_HANDLE_VALUE,
};
use windows_sys::Win32::Storage::FileSystem::{
    CreateFileW, FILE_FLAG_FIRST_PIPE_INSTANCE, FILE_FLAG_OVERLAPPED, OPEN_EXISTING,
    PIPE_ACCESS_INBOUND, PIPE_ACCESS_OUTBOUND,
};
use windows_sys::Win32::System::Pipes::{
    CreateNamedPipeW, PIPE_READMODE_BYTE, PIPE_REJECT_REMOTE_CLIENTS, PIPE_TYPE_BYTE, PIPE_WAIT,
};

use crate::event_loop::EventLoop;
use crate::event_loop::iocp::{Iocp, Op};

/// Size of each read, and of the pipe's kernel buffers.
const CHUNK: usize = 64 * 1024;

/// Which way the bytes flow between us and the child.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flow {
    /// We write, the child reads (its stdin).
    ToChild,
    /// The child writes, we read (its stdout or stderr).
    FromChild,
}

/// A new pipe: `(ours, the child's)`. Ours is overlapped and not
/// inheritable; the child's is blocking (std makes an inheritable duplicate
/// of it when spawning).
pub(crate) fn pipe(flow: Flow) -> io::Result<(OwnedHandle, OwnedHandle)> {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let name = format!(
        r"\\.\pipe\childwatch-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let wide: Vec<u16> = name.encode_utf16().chain(Some(0)).collect();
    let (open_mode, child_access) = match flow {
        Flow::ToChild => (PIPE_ACCESS_OUTBOUND, GENERIC_READ),
        Flow::FromChild => (PIPE_ACCESS_INBOUND, GENERIC_WRITE),
    };
    // SAFETY: a NUL-terminated name and no security attributes (the handle
    // is not inheritable).
    let ours = unsafe {
        CreateNamedPipeW(
            wide.as_ptr(),
            open_mode | FILE_FLAG_OVERLAPPED | FILE_FLAG_FIRST_PIPE_INSTANCE,
            PIPE_TYPE_BYTE | PIPE_READMODE_BYTE | PIPE_WAIT | PIPE_REJECT_REMOTE_CLIENTS,
            1,
            CHUNK as u32,
            CHUNK as u32,
            0,
            ptr::null(),
        )
    };
    if ours == INVALID_HANDLE_VALUE {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("cannot create a pipe for the child (CreateNamedPipeW): {e}"),
        ));
    }
    // SAFETY: a fresh handle we own.
    let ours = unsafe { OwnedHandle::from_raw_handle(ours) };
    // SAFETY: as above; the pipe exists, so this connects to it at once.
    let theirs = unsafe {
        CreateFileW(
            wide.as_ptr(),
            child_access,
            0,
            ptr::null(),
            OPEN_EXISTING,
            0,
            ptr::null_mut(),
        )
    };
    if theirs == INVALID_HANDLE_VALUE {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("cannot open the child's end of a pipe (CreateFileW): {e}"),
        ));
    }
    // SAFETY: a fresh handle we own.
    Ok((ours, unsafe { OwnedHandle::from_raw_handle(theirs) }))
}

fn iocp_of(lp: &EventLoop) -> io::Result<Iocp> {
    lp.iocp_backend().cloned().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::Unsupported,
            "subprocess pipes on Windows need the proactor (completion port) loop, as in \
             asyncio; use EventLoop::proactor() or the default policy",
        )
    })
}

fn is_eof(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(c) if c == ERROR_BROKEN_PIPE as i32 || c == ERROR_PIPE_NOT_CONNECTED as i32
    )
}

/// A pipe we read from.
pub(crate) struct Reader {
    /// Declared before `handle`: a pending read is cancelled (and its
    /// buffer handed to the loop's op table) before the handle closes.
    op: Option<Op<Vec<u8>>>,
    handle: OwnedHandle,
    iocp: Iocp,
    buf: Vec<u8>,
    pos: usize,
    eof: bool,
}

impl Reader {
    pub(crate) fn new(lp: &EventLoop, handle: OwnedHandle) -> io::Result<Reader> {
        let iocp = iocp_of(lp)?;
        iocp.register(handle.as_raw_handle())?;
        Ok(Reader {
            op: None,
            handle,
            iocp,
            buf: Vec::new(),
            pos: 0,
            eof: false,
        })
    }

    pub(crate) fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        if out.is_empty() {
            return Poll::Ready(Ok(0));
        }
        ready!(self.poll_fill(cx))?;
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Poll::Ready(Ok(n))
    }

    /// Appends what the next read gives to `buf` (no zero-filling of its
    /// spare capacity); `Ok(0)` is end-of-file.
    pub(crate) fn poll_read_spare(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut Vec<u8>,
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_fill(cx))?;
        let avail = &self.buf[self.pos..];
        buf.extend_from_slice(avail);
        let n = avail.len();
        self.pos = self.buf.len();
        Poll::Ready(Ok(n))
    }

    /// Ready once bytes are buffered or end-of-file was seen.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if self.pos < self.buf.len() || self.eof {
                return Poll::Ready(Ok(()));
            }
            let op = match &mut self.op {
                Some(op) => op,
                None => {
                    let mut v = std::mem::take(&mut self.buf);
                    v.clear();
                    v.reserve(CHUNK);
                    self.pos = 0;
                    self.op
                        .insert(self.iocp.read(self.handle.as_raw_handle(), v))
                }
            };
            let (res, mut v) = ready!(Pin::new(op).poll(cx));
            self.op = None;
            match res {
                Ok(n) => {
                    // SAFETY: the kernel initialised `n` bytes of the spare
                    // capacity the read was given.
                    unsafe { v.set_len(v.len() + n as usize) };
                    // A zero-byte read leaves nothing buffered: read again.
                    self.buf = v;
                }
                Err(e) if is_eof(&e) => {
                    self.buf = v;
                    self.eof = true;
                }
                Err(e) => {
                    self.buf = v;
                    return Poll::Ready(Err(e));
                }
            }
        }
    }
}

fn closed_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        "the child's stdin was closed (poll_close); nothing more can be written",
    )
}

/// A pipe we write to.
pub(crate) struct Writer {
    /// Declared before `handle`, for the same reason as in [`Reader`].
    op: Option<(Op<Vec<u8>>, usize)>,
    handle: Option<OwnedHandle>,
    iocp: Iocp,
    error: Option<io::Error>,
}

impl Writer {
    /// Whether `poll_close` closed the pipe.
    pub(crate) fn is_closed(&self) -> bool {
        self.handle.is_none()
    }

    /// Waits for the write in flight (`AsyncWrite::poll_flush`).
    pub(crate) fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.drive(cx)
    }

    pub(crate) fn new(lp: &EventLoop, handle: OwnedHandle) -> io::Result<Writer> {
        let iocp = iocp_of(lp)?;
        iocp.register(handle.as_raw_handle())?;
        Ok(Writer {
            op: None,
            handle: Some(handle),
            iocp,
            error: None,
        })
    }

    /// Waits for the write in flight (resubmitting what a short write left).
    fn drive(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((op, offset)) = &mut self.op {
            let offset = *offset;
            let (res, buf) = ready!(Pin::new(op).poll(cx));
            self.op = None;
            match res {
                Ok(n) => {
                    let done = offset + n as usize;
                    if done < buf.len() {
                        if let Some(h) = &self.handle {
                            let op = self.iocp.write(h.as_raw_handle(), buf, done);
                            self.op = Some((op, done));
                        }
                    }
                }
                Err(e) => self.error = Some(e),
            }
        }
        match self.error.take() {
            Some(e) => Poll::Ready(Err(e)),
            None => Poll::Ready(Ok(())),
        }
    }

    pub(crate) fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(self.drive(cx))?;
        let Some(h) = &self.handle else {
            return Poll::Ready(Err(closed_error()));
        };
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let op = self.iocp.write(h.as_raw_handle(), data.to_vec(), 0);
        self.op = Some((op, 0));
        Poll::Ready(Ok(data.len()))
    }

    pub(crate) fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let res = ready!(self.drive(cx));
        self.handle = None;
        Poll::Ready(res)
    }
}

/// What a pipe end is made from on this platform.
pub(crate) type RawPipe = OwnedHandle;

impl AsRawHandle for Reader {
    fn as_raw_handle(&self) -> RawHandle {
        self.handle.as_raw_handle()
    }
}

impl fmt::Debug for Writer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pipe")
            .field("closed", &self.is_closed())
            .field("write_in_flight", &self.op.is_some())
            .finish()
    }
}

impl fmt::Debug for Reader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pipe")
            .field("buffered", &(self.buf.len() - self.pos))
            .field("read_in_flight", &self.op.is_some())
            .field("eof", &self.eof)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures_util::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::subprocess::{ChildStdin, ChildStdout};

    #[test]
    fn bytes_flow_both_ways_and_close_is_eof() {
        let lp = EventLoop::proactor().unwrap();
        // One pipe each way, both ends ours: write into "stdin", read the
        // child's end directly; write the child's end of "stdout", read ours.
        let (w_ours, w_theirs) = pipe(Flow::ToChild).unwrap();
        let (r_ours, r_theirs) = pipe(Flow::FromChild).unwrap();
        let mut stdin = ChildStdin::new(&lp, w_ours).unwrap();
        let mut stdout = ChildStdout::new(&lp, r_ours).unwrap();
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let p2 = payload.clone();
        // A thread plays the child: copies its stdin to its stdout.
        let child = std::thread::spawn(move || {
            use std::io::{Read, Write};
            let mut input = std::fs::File::from(w_theirs);
            let mut output = std::fs::File::from(r_theirs);
            let mut all = Vec::new();
            input.read_to_end(&mut all).unwrap();
            output.write_all(&all).unwrap();
            all.len()
        });
        let got = lp
            .run_until_complete(async move {
                let feed = async {
                    stdin.write_all(&p2).await.unwrap();
                    stdin.close().await.unwrap();
                    assert!(stdin.is_closed());
                    let e = stdin.write_all(b"x").await.unwrap_err();
                    assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
                };
                let read = async {
                    let mut out = Vec::new();
                    stdout.read_to_end(&mut out).await.unwrap();
                    out
                };
                futures_util::future::join(feed, read).await.1
            })
            .unwrap();
        assert_eq!(child.join().unwrap(), payload.len());
        assert_eq!(got, payload);
        assert_eq!(lp.iocp_backend().unwrap().in_flight(), 0);
    }

    #[test]
    fn a_cancelled_read_loses_nothing_and_drop_releases_the_op() {
        let lp = EventLoop::proactor().unwrap();
        let (r_ours, r_theirs) = pipe(Flow::FromChild).unwrap();
        let mut stdout = ChildStdout::new(&lp, r_ours).unwrap();
        let lp2 = lp.clone();
        lp.run_until_complete(async {
            let mut buf = [0u8; 16];
            // Start a read, give up on it (nothing written yet).
            {
                let read = stdout.read(&mut buf);
                let timer = crate::sleep(Duration::from_millis(10));
                futures_util::pin_mut!(read, timer);
                let r = futures_util::future::select(read, timer).await;
                assert!(matches!(r, futures_util::future::Either::Right(_)));
            }
            use std::io::Write;
            std::fs::File::from(r_theirs.try_clone().unwrap())
                .write_all(b"kept")
                .unwrap();
            let n = stdout.read(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], b"kept");
            drop(r_theirs);
            assert_eq!(stdout.read(&mut buf).await.unwrap(), 0, "eof");
            let _ = lp2;
        })
        .unwrap();
        // A read left in flight when the pipe is dropped is cancelled, and its
        // buffer is freed when the cancelled completion arrives.
        let (r_ours, _r_theirs) = pipe(Flow::FromChild).unwrap();
        let mut stdout = ChildStdout::new(&lp, r_ours).unwrap();
        lp.run_until_complete(async {
            let mut buf = [0u8; 4];
            let mut read = Box::pin(stdout.read(&mut buf));
            let _ = futures_util::poll!(read.as_mut());
        })
        .unwrap();
        assert_eq!(lp.iocp_backend().unwrap().in_flight(), 1);
        drop(stdout);
        lp.run_until_complete(crate::sleep(Duration::from_millis(5)))
            .unwrap();
        assert_eq!(lp.iocp_backend().unwrap().in_flight(), 0);
    }

    #[test]
    fn pipes_need_the_proactor() {
        let lp = EventLoop::selector().unwrap();
        let (ours, _theirs) = pipe(Flow::FromChild).unwrap();
        let e = ChildStdout::new(&lp, ours).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Unsupported);
    }
}
