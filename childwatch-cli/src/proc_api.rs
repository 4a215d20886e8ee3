//! The small slice of the subprocess API the CLI uses (`Command`, `Stdio`,
//! `Process`), in one place so that `run` and `bench` do not care where it
//! comes from.
//!
//! INTERIM: until the library's `subprocess` module lands, this is a stand-in
//! with the same shape as the public contract: children are started with
//! `std::process::Command`, their exit is learned from the current child
//! watcher (`add_child_handler`), and piped output is read by one helper
//! thread per pipe. When `childwatch::Command` exists this file shrinks to
//! re-exports plus [`read_all`].

use std::cell::Cell;
use std::future::Future;
use std::io::{self, Read};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use childwatch::{Pid, ReturnCode};

/// A value produced on another thread, awaited on the loop.
struct Slot<T> {
    state: Mutex<(Option<T>, Vec<Waker>)>,
}

impl<T> Slot<T> {
    fn new() -> Arc<Slot<T>> {
        Arc::new(Slot {
            state: Mutex::new((None, Vec::new())),
        })
    }

    fn put(&self, v: T) {
        let wakers = {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            s.0 = Some(v);
            std::mem::take(&mut s.1)
        };
        for w in wakers {
            w.wake();
        }
    }
}

/// Resolves with a copy of the slot's value once it is set.
struct SlotFuture<T: Clone> {
    slot: Arc<Slot<T>>,
}

impl<T: Clone> Future for SlotFuture<T> {
    type Output = T;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let mut s = self.slot.state.lock().unwrap_or_else(|p| p.into_inner());
        match &s.0 {
            Some(v) => Poll::Ready(v.clone()),
            None => {
                s.1.push(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// How a child's standard stream is set up.
#[derive(Debug)]
pub enum Stdio {
    /// Shares the parent's stream.
    Inherit,
    /// A pipe to the parent.
    Piped,
    /// `/dev/null`.
    Null,
}

impl Stdio {
    /// A pipe to the parent.
    pub fn piped() -> Stdio {
        Stdio::Piped
    }
    /// `/dev/null`.
    pub fn null() -> Stdio {
        Stdio::Null
    }
    fn std(&self) -> std::process::Stdio {
        match self {
            Stdio::Inherit => std::process::Stdio::inherit(),
            Stdio::Piped => std::process::Stdio::piped(),
            Stdio::Null => std::process::Stdio::null(),
        }
    }
}

/// A child process to start (the library's `Command` shape).
#[derive(Debug)]
pub struct Command {
    inner: std::process::Command,
    stdin: Stdio,
    stdout: Stdio,
    stderr: Stdio,
}

impl Command {
    /// Runs `program` (looked up in `PATH`).
    pub fn new(program: impl AsRef<std::ffi::OsStr>) -> Command {
        Command {
            inner: std::process::Command::new(program),
            stdin: Stdio::Inherit,
            stdout: Stdio::Inherit,
            stderr: Stdio::Inherit,
        }
    }
    /// Adds arguments.
    pub fn args<I: IntoIterator<Item = S>, S: AsRef<std::ffi::OsStr>>(
        &mut self,
        args: I,
    ) -> &mut Command {
        self.inner.args(args);
        self
    }
    /// Standard input.
    pub fn stdin(&mut self, s: Stdio) -> &mut Command {
        self.stdin = s;
        self
    }
    /// Standard output.
    pub fn stdout(&mut self, s: Stdio) -> &mut Command {
        self.stdout = s;
        self
    }
    /// Standard error.
    pub fn stderr(&mut self, s: Stdio) -> &mut Command {
        self.stderr = s;
        self
    }
    /// Puts the child in process group `pgid` (0: a new group led by it).
    pub fn process_group(&mut self, pgid: Pid) -> &mut Command {
        use std::os::unix::process::CommandExt;
        self.inner.process_group(pgid);
        self
    }

    /// Starts the child and registers it with the current child watcher.
    pub fn spawn(&mut self) -> io::Result<Process> {
        self.inner
            .stdin(self.stdin.std())
            .stdout(self.stdout.std())
            .stderr(self.stderr.std());
        let watcher = childwatch::get_child_watcher();
        watcher.enter();
        let spawned = self.inner.spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                watcher.exit();
                return Err(e);
            }
        };
        let pid = child.id() as Pid;
        let exit = Slot::new();
        let e2 = Arc::clone(&exit);
        let added = watcher.add_child_handler(pid, Box::new(move |_, rc| e2.put(rc)));
        watcher.exit();
        if let Err(e) = added {
            // Never leave a live child unwatched: kill and reap it here.
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        Ok(Process {
            pid,
            rc: Rc::new(Cell::new(None)),
            exit,
            stdout: child.stdout.take().map(|s| ChildStdout(Box::new(s))),
            stderr: child.stderr.take().map(|s| ChildStdout(Box::new(s))),
        })
    }
}

/// A readable pipe from the child.
pub struct ChildStdout(Box<dyn Read + Send>);

impl std::fmt::Debug for ChildStdout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChildStdout")
    }
}

/// A started child.
#[derive(Debug)]
pub struct Process {
    pid: Pid,
    rc: Rc<Cell<Option<ReturnCode>>>,
    exit: Arc<Slot<ReturnCode>>,
    /// The read end of the child's stdout, when piped.
    pub stdout: Option<ChildStdout>,
    /// The read end of the child's stderr, when piped.
    pub stderr: Option<ChildStdout>,
}

impl<T> std::fmt::Debug for Slot<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Slot")
    }
}

impl Process {
    /// The child's pid.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// The return code once the child was reaped.
    pub fn returncode(&self) -> Option<ReturnCode> {
        if self.rc.get().is_none() {
            let s = self.exit.state.lock().unwrap_or_else(|p| p.into_inner());
            self.rc.set(s.0);
        }
        self.rc.get()
    }

    /// Waits for the child to exit.
    pub async fn wait(&self) -> io::Result<ReturnCode> {
        let rc = SlotFuture {
            slot: Arc::clone(&self.exit),
        }
        .await;
        self.rc.set(Some(rc));
        Ok(rc)
    }

    /// Sends `sig` unless the child was already reaped.
    pub fn send_signal(&self, sig: i32) -> io::Result<()> {
        if self.returncode().is_some() {
            return Ok(());
        }
        // SAFETY: kill(2) takes plain integers; the pid is our unreaped child.
        if unsafe { libc::kill(self.pid, sig) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(e);
            }
        }
        Ok(())
    }

    /// SIGKILL.
    pub fn kill(&self) -> io::Result<()> {
        self.send_signal(libc::SIGKILL)
    }
}

/// Reads a child's pipe to its end.
pub async fn read_all(pipe: Option<ChildStdout>) -> io::Result<Vec<u8>> {
    let Some(ChildStdout(mut r)) = pipe else {
        return Ok(Vec::new());
    };
    type ReadResult = Result<Arc<Vec<u8>>, Arc<io::Error>>;
    let slot: Arc<Slot<ReadResult>> = Slot::new();
    let s2 = Arc::clone(&slot);
    std::thread::Builder::new()
        .name("pipe-reader".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            let mut buf = Vec::new();
            let res = r.read_to_end(&mut buf).map(|_| Arc::new(buf));
            s2.put(res.map_err(Arc::new));
        })?;
    match (SlotFuture { slot }).await {
        Ok(v) => Ok(Arc::try_unwrap(v).unwrap_or_else(|a| (*a).clone())),
        Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
    }
}
