//! The platform-neutral stream helpers `communicate` uses, over any
//! `futures_io::AsyncRead`/`AsyncWrite` (the pipes of either platform).

use std::io;
use std::pin::Pin;

use futures_io::{AsyncRead, AsyncWrite};

/// Bytes asked for per read.
const CHUNK: usize = 64 * 1024;

/// Reads `r` to end-of-file.
pub(crate) async fn read_to_end<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut chunk = vec![0u8; CHUNK];
    loop {
        let n = std::future::poll_fn(|cx| Pin::new(&mut *r).poll_read(cx, &mut chunk)).await?;
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&chunk[..n]);
    }
}

/// Writes all of `data` to `w`, then flushes it.
pub(crate) async fn write_all<W: AsyncWrite + Unpin>(w: &mut W, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let n = std::future::poll_fn(|cx| Pin::new(&mut *w).poll_write(cx, data)).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "the child's stdin accepted no bytes",
            ));
        }
        data = &data[n..];
    }
    std::future::poll_fn(|cx| Pin::new(&mut *w).poll_flush(cx)).await
}

/// Closes `w`.
pub(crate) async fn close<W: AsyncWrite + Unpin>(w: &mut W) -> io::Result<()> {
    std::future::poll_fn(|cx| Pin::new(&mut *w).poll_close(cx)).await
}
