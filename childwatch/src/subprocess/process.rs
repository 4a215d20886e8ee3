//! `Process`: asyncio's `asyncio.subprocess.Process` — the child's pipes as
//! async streams, `wait`, `communicate`, and signals.

use std::fmt;
use std::future::Future;
use std::io;
#[cfg(unix)]
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::pin;
#[cfg(unix)]
use std::sync::Arc;
use std::task::Poll;

use super::child_io::{ChildStderr, ChildStdin, ChildStdout};
use super::command::Spawned;
use super::exit::ChildCore;
use super::stream;
use crate::watcher::{Pid, ReturnCode};

/// A running (or finished) child (asyncio's `asyncio.subprocess.Process`).
///
/// Dropping it leaves the child running unless the command asked for
/// [`Command::kill_on_drop`](crate::Command::kill_on_drop); either way the watcher reaps the child when it
/// exits, so there is no zombie.
pub struct Process {
    /// The child's stdin, if it was [`Stdio::piped`](crate::Stdio::piped).
    pub stdin: Option<ChildStdin>,
    /// The child's stdout, if it was [`Stdio::piped`](crate::Stdio::piped).
    pub stdout: Option<ChildStdout>,
    /// The child's stderr, if it was [`Stdio::piped`](crate::Stdio::piped).
    pub stderr: Option<ChildStderr>,
    core: ChildCore,
    kill_on_drop: bool,
    communicated: bool,
}

impl fmt::Debug for Process {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Process");
        d.field("pid", &self.pid())
            .field("returncode", &self.returncode())
            .field("stdin", &self.stdin)
            .field("stdout", &self.stdout)
            .field("stderr", &self.stderr);
        #[cfg(unix)]
        d.field("pidfd", &self.pidfd().map(|f| f.as_raw_fd()));
        d.finish()
    }
}

impl Process {
    pub(crate) fn new(s: Spawned, kill_on_drop: bool) -> Process {
        Process {
            stdin: s.stdin,
            stdout: s.stdout,
            stderr: s.stderr,
            core: s.core,
            kill_on_drop,
            communicated: false,
        }
    }

    /// The child's pid.
    pub fn pid(&self) -> Pid {
        self.core.pid()
    }

    /// The child's pidfd, if its watcher opened one (Pidfd, or Uring
    /// within its descriptor budget) and the child is not reaped yet: it
    /// keeps naming this child, never a process that reused the pid. The
    /// child has at most one pidfd, shared by the watcher and the `Process`;
    /// it closes at the reap (once every holder of the `Arc` drops it).
    #[cfg(unix)]
    pub fn pidfd(&self) -> Option<Arc<OwnedFd>> {
        self.core.child_handle().pidfd()
    }

    /// The child's [`ChildHandle`](crate::ChildHandle): the gate its reap
    /// and its signals go through.
    #[cfg(unix)]
    pub fn child_handle(&self) -> &crate::watcher::ChildHandle {
        self.core.child_handle()
    }

    /// Windows: the child's process handle, held for the `Process`'s
    /// lifetime (so the pid is never reused while it lives). Usable with
    /// [`EventLoop::wait_for_handle`].
    #[cfg(windows)]
    pub fn process_handle(&self) -> std::os::windows::io::BorrowedHandle<'_> {
        std::os::windows::io::AsHandle::as_handle(self.core.process())
    }

    /// The return code once the watcher reported the exit (exit code, or
    /// `-N` for signal `N`), else `None`.
    pub fn returncode(&self) -> Option<ReturnCode> {
        self.core.returncode()
    }

    /// Waits for the child to exit and returns its return code. Any number
    /// of `wait`s may run at once; a dropped `wait` can be started again.
    /// Never waits on the pipes.
    ///
    /// Errors only if the watcher stopped watching the child before it
    /// exited (it was closed).
    pub async fn wait(&self) -> io::Result<ReturnCode> {
        self.core.wait_status().await
    }

    /// Writes `input` (if any) to stdin and closes it, while reading stdout
    /// and stderr to end-of-file; then waits for the exit. Returns
    /// `(stdout, stderr)`; a stream that was not piped gives an empty `Vec`.
    ///
    /// A child that exits without reading its input is fine (a broken pipe
    /// on stdin is ignored). Calling it a second time is an error, since the
    /// pipes were consumed by the first; dropping its future before it
    /// completes closes the pipes (what was read so far is lost).
    ///
    /// It reads to end-of-file, so a grandchild that keeps a pipe open keeps
    /// it waiting; use [`wait`](Self::wait) when only the exit matters.
    pub async fn communicate(&mut self, input: Option<&[u8]>) -> io::Result<(Vec<u8>, Vec<u8>)> {
        if self.communicated {
            return Err(io::Error::other(
                "communicate() was already called on this process; its pipes are consumed",
            ));
        }
        self.communicated = true;
        let mut stdin = self.stdin.take();
        let mut stdout = self.stdout.take();
        let mut stderr = self.stderr.take();
        let feed = async {
            if let Some(w) = stdin.as_mut() {
                let res = match input {
                    Some(data) if !data.is_empty() => stream::write_all(w, data).await,
                    _ => Ok(()),
                };
                let closed = stream::close(w).await;
                for r in [res, closed] {
                    match r {
                        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => return Err(e),
                        _ => {}
                    }
                }
            }
            Ok(())
        };
        let out = async {
            match stdout.as_mut() {
                Some(r) => stream::read_to_end(r).await,
                None => Ok(Vec::new()),
            }
        };
        let err = async {
            match stderr.as_mut() {
                Some(r) => stream::read_to_end(r).await,
                None => Ok(Vec::new()),
            }
        };
        let (fed, out, err) = join3(feed, out, err).await;
        fed?;
        let (out, err) = (out?, err?);
        drop((stdin, stdout, stderr));
        self.wait().await?;
        Ok((out, err))
    }

    /// Sends signal `sig` to the child. A no-op (`Ok`) once the child has
    /// exited; never reaches another process that reused the pid (see the
    /// module docs): on Unix it is decided under the child's reap gate.
    /// `InvalidInput` for a number outside 0..=64.
    ///
    /// On Windows, as in asyncio, only SIGTERM (15) and SIGKILL (9) are
    /// accepted, and both call `TerminateProcess(h, 1)` through the held
    /// process handle; other numbers are `InvalidInput`.
    pub fn send_signal(&self, sig: i32) -> io::Result<()> {
        self.core.send_signal(sig)
    }

    /// Sends SIGTERM (Windows: `TerminateProcess(h, 1)`).
    pub fn terminate(&self) -> io::Result<()> {
        self.core.terminate()
    }

    /// Sends SIGKILL (Windows: `TerminateProcess(h, 1)`).
    pub fn kill(&self) -> io::Result<()> {
        self.core.kill()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.kill_on_drop {
            if let Err(e) = self.kill() {
                tracing::warn!("kill_on_drop: {e}");
            }
        }
    }
}

/// Polls three futures concurrently until all are done.
async fn join3<A: Future, B: Future, C: Future>(
    a: A,
    b: B,
    c: C,
) -> (A::Output, B::Output, C::Output) {
    let (mut a, mut b, mut c) = (pin!(a), pin!(b), pin!(c));
    let (mut ra, mut rb, mut rc) = (None, None, None);
    std::future::poll_fn(|cx| {
        if ra.is_none() {
            if let Poll::Ready(v) = a.as_mut().poll(cx) {
                ra = Some(v);
            }
        }
        if rb.is_none() {
            if let Poll::Ready(v) = b.as_mut().poll(cx) {
                rb = Some(v);
            }
        }
        if rc.is_none() {
            if let Poll::Ready(v) = c.as_mut().poll(cx) {
                rc = Some(v);
            }
        }
        match (ra.take(), rb.take(), rc.take()) {
            (Some(x), Some(y), Some(z)) => Poll::Ready((x, y, z)),
            (x, y, z) => {
                (ra, rb, rc) = (x, y, z);
                Poll::Pending
            }
        }
    })
    .await
}
