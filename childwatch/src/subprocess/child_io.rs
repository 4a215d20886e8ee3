//! The public ends of a child's pipes — `ChildStdin`, `ChildStdout`,
//! `ChildStderr` — the same on every platform. The platform's `pipes` module
//! supplies the `Reader` and `Writer` underneath (io_uring or epoll on Unix,
//! overlapped named pipes through the completion port on Windows).

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_io::{AsyncRead, AsyncWrite};

use super::pipes::{RawPipe, Reader, Writer};
use crate::event_loop::EventLoop;

/// The parent's end of the child's stdin: [`futures_io::AsyncWrite`].
///
/// On a completion-based (proactor) loop a write is accepted into an owned
/// buffer and completes in the background; call `flush` (or `close`) to learn
/// that it reached the pipe. Closing (or dropping) it gives the child
/// end-of-file.
pub struct ChildStdin {
    inner: Writer,
}

/// The parent's end of the child's stdout: [`futures_io::AsyncRead`].
pub struct ChildStdout {
    inner: Reader,
}

/// The parent's end of the child's stderr: [`futures_io::AsyncRead`].
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

impl ChildStdout {
    pub(crate) fn new(lp: &EventLoop, pipe: RawPipe) -> io::Result<ChildStdout> {
        Ok(ChildStdout {
            inner: Reader::new(lp, pipe)?,
        })
    }
}

impl ChildStderr {
    pub(crate) fn new(lp: &EventLoop, pipe: RawPipe) -> io::Result<ChildStderr> {
        Ok(ChildStderr {
            inner: Reader::new(lp, pipe)?,
        })
    }
}

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
