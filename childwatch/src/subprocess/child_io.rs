//! The public ends of a child's pipes — `ChildStdin`, `ChildStdout`,
//! `ChildStderr` — the same on every platform. The platform's `pipes` module
//! supplies the `Reader` and `Writer` underneath (io_uring or epoll on Unix,
//! overlapped named pipes through the completion port on Windows).
//!
//! `ChildStdout` and `ChildStderr` have their own `read_to_end` and
//! `read_to_string`, which method-call syntax picks over the extension
//! traits' (`futures_util::io::AsyncReadExt`, `futures_lite::AsyncReadExt`).
//! Those generic versions zero the whole spare capacity of the `Vec` each
//! time the read resumes after `Pending` — once per time the pipe runs dry —
//! so a large transfer costs time quadratic in its size. Ours read into the
//! spare capacity without initialising it, growing it geometrically: linear,
//! one system call per pipe-full (from 32 MiB on, through a small in-cache
//! bounce buffer with the pages faulted in ahead; see `pipes.rs`).

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures_io::{AsyncRead, AsyncWrite};

use super::pipes::{RawPipe, Reader, Writer};
use crate::event_loop::EventLoop;

/// The parent's end of the child's stdin: [`futures_io::AsyncWrite`].
///
/// Closing (or dropping) it gives the child end-of-file. On Unix a write goes
/// straight into the pipe; on Windows a write is accepted into an owned
/// buffer and completes in the background, so call `flush` (or `close`) to
/// learn that it reached the pipe.
pub struct ChildStdin {
    inner: Writer,
}

/// The parent's end of the child's stdout: [`futures_io::AsyncRead`], plus
/// a linear-time [`read_to_end`](Self::read_to_end).
pub struct ChildStdout {
    inner: Reader,
}

/// The parent's end of the child's stderr: [`futures_io::AsyncRead`], plus
/// a linear-time [`read_to_end`](Self::read_to_end).
pub struct ChildStderr {
    inner: Reader,
}

impl ChildStdin {
    pub(crate) fn new(lp: &EventLoop, pipe: RawPipe) -> io::Result<ChildStdin> {
        Ok(ChildStdin {
            inner: Writer::new(lp, pipe)?,
        })
    }

    /// Whether `close` was called.
    pub fn is_closed(&self) -> bool {
        self.inner.is_closed()
    }
}

/// Bytes read in one poll of `read_to_end` before it yields to the loop, so
/// a child that writes faster than we read cannot starve other tasks.
const YIELD_AFTER: usize = 16 << 20;

/// Reads `r` to end-of-file into `buf`'s spare capacity; see the module docs.
fn read_to_end<'a>(
    r: &'a mut Reader,
    buf: &'a mut Vec<u8>,
) -> impl Future<Output = io::Result<usize>> + 'a {
    let start = buf.len();
    std::future::poll_fn(move |cx| {
        let mut this_poll = 0usize;
        loop {
            match ready!(r.poll_read_spare(cx, buf)) {
                Ok(0) => return Poll::Ready(Ok(buf.len() - start)),
                Ok(n) => this_poll += n,
                Err(e) => return Poll::Ready(Err(e)),
            }
            if this_poll >= YIELD_AFTER {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
    })
}

/// [`read_to_end`], then a UTF-8 check; `buf` is unchanged on error.
async fn read_to_string(r: &mut Reader, buf: &mut String) -> io::Result<usize> {
    let mut bytes = Vec::new();
    let n = read_to_end(r, &mut bytes).await?;
    match String::from_utf8(bytes) {
        Ok(s) if buf.is_empty() => *buf = s,
        Ok(s) => buf.push_str(&s),
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the child's output is not valid UTF-8",
            ));
        }
    }
    Ok(n)
}

macro_rules! reader_methods {
    ($ty:ident) => {
        impl $ty {
            pub(crate) fn new(lp: &EventLoop, pipe: RawPipe) -> io::Result<$ty> {
                Ok($ty {
                    inner: Reader::new(lp, pipe)?,
                })
            }

            /// Reads to end-of-file, appending to `buf`; returns the number of
            /// bytes read. Linear in the bytes read: the kernel writes straight
            /// into `buf`'s spare capacity, which grows geometrically.
            ///
            /// Method-call syntax picks this over the `read_to_end` of
            /// `futures_util::io::AsyncReadExt` or `futures_lite::AsyncReadExt`,
            /// which are quadratic on a pipe (see the module docs). Cancelling
            /// it loses nothing: what was read is in `buf`.
            pub fn read_to_end<'a>(
                &'a mut self,
                buf: &'a mut Vec<u8>,
            ) -> impl Future<Output = io::Result<usize>> + 'a {
                read_to_end(&mut self.inner, buf)
            }

            /// Reads to end-of-file and appends the text to `buf`; an
            /// `InvalidData` error (and `buf` unchanged) if it is not UTF-8.
            /// Linear, like [`read_to_end`](Self::read_to_end).
            pub fn read_to_string<'a>(
                &'a mut self,
                buf: &'a mut String,
            ) -> impl Future<Output = io::Result<usize>> + 'a {
                read_to_string(&mut self.inner, buf)
            }
        }
    };
}

reader_methods!(ChildStdout);
reader_methods!(ChildStderr);

impl AsyncWrite for ChildStdin {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().inner.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().inner.poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().inner.poll_close(cx)
    }
}

impl AsyncRead for ChildStdout {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().inner.poll_read(cx, buf)
    }
}

impl AsyncRead for ChildStderr {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().inner.poll_read(cx, buf)
    }
}

#[cfg(unix)]
mod raw {
    use std::os::fd::{AsRawFd, RawFd};

    impl AsRawFd for super::ChildStdout {
        fn as_raw_fd(&self) -> RawFd {
            self.inner.as_raw_fd()
        }
    }

    impl AsRawFd for super::ChildStderr {
        fn as_raw_fd(&self) -> RawFd {
            self.inner.as_raw_fd()
        }
    }
}

#[cfg(windows)]
mod raw {
    use std::os::windows::io::{AsRawHandle, RawHandle};

    impl AsRawHandle for super::ChildStdout {
        fn as_raw_handle(&self) -> RawHandle {
            self.inner.as_raw_handle()
        }
    }

    impl AsRawHandle for super::ChildStderr {
        fn as_raw_handle(&self) -> RawHandle {
            self.inner.as_raw_handle()
        }
    }
}

impl fmt::Debug for ChildStdin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ChildStdin").field(&self.inner).finish()
    }
}

impl fmt::Debug for ChildStdout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ChildStdout").field(&self.inner).finish()
    }
}

impl fmt::Debug for ChildStderr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ChildStderr").field(&self.inner).finish()
    }
}
