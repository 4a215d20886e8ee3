//! The platform-neutral stream helpers `communicate` uses, over any
//! `futures_io::AsyncRead`/`AsyncWrite` (the pipes of either platform).

use std::io;
use std::pin::Pin;

use futures_io::{AsyncRead, AsyncWrite};

/// Least spare room offered to a read.
const CHUNK: usize = 64 * 1024;

/// Reads `r` to end-of-file, in time linear in the bytes read: straight into
/// the output buffer, whose new room is zeroed once when it grows (never
/// again after a `Pending`, unlike the extension traits' `read_to_end`).
pub(crate) async fn read_to_end<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Vec<u8>> {
    // `out[..filled]` holds the bytes read; `out[filled..]` is zeroed room.
    let mut out = Vec::new();
    let mut filled = 0usize;
    loop {
        if out.len() - filled < CHUNK {
            let grow = CHUNK.max(out.len());
            out.resize(out.len() + grow, 0);
        }
        let room = &mut out[filled..];
        let n = std::future::poll_fn(|cx| Pin::new(&mut *r).poll_read(cx, room)).await?;
        if n == 0 {
            out.truncate(filled);
            return Ok(out);
        }
        filled += n.min(out.len() - filled);
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
