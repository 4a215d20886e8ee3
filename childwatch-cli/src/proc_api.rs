//! The slice of the library's subprocess API the CLI uses, in one place:
//! `Command`, `Stdio`, `Process` (re-exported from `childwatch`), and
//! [`read_all`], which reads a child's pipe to its end on the running loop.

use std::io;

pub use childwatch::{Command, Process, Stdio};
use futures_lite::AsyncReadExt;

/// Reads a child's pipe (stdout or stderr) to end-of-file; an absent pipe
/// reads as empty.
pub async fn read_all<R: futures_lite::AsyncRead + Unpin>(pipe: Option<R>) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    if let Some(mut r) = pipe {
        r.read_to_end(&mut buf).await?;
    }
    Ok(buf)
}
