//! Subprocesses: asyncio's `create_subprocess_exec` / `create_subprocess_shell`
//! and `Process`.
//!
//! A [`Command`] is a builder; [`Command::spawn`] starts the child on the
//! **running** loop and hands its pid to the policy's child watcher (or the
//! one given with [`Command::watcher`]), inside the watcher's
//! `enter()`/`exit()` (asyncio's `with watcher:`). The watcher reaps the
//! child and calls back with its return code; the [`Process`] records it in
//! a thread-safe exit slot that any number of [`Process::wait`] futures
//! watch. Nothing else ever reaps the child: the spawn path never creates a
//! `std::process::Child`.
//!
//! ```
//! use childwatch::{Stdio, create_subprocess_exec, new_event_loop};
//!
//! # #[cfg(unix)] {
//! let lp = new_event_loop()?;
//! let (out, rc) = lp.run_until_complete(async {
//!     let mut p = create_subprocess_exec("echo", ["hello"])
//!         .stdout(Stdio::piped())
//!         .spawn()?;
//!     let (out, _err) = p.communicate(None).await?;
//!     Ok::<_, std::io::Error>((out, p.returncode()))
//! })??;
//! assert_eq!(out, b"hello\n");
//! assert_eq!(rc, Some(0));
//! lp.close()?;
//! # }
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! Spawning uses `posix_spawnp` directly rather than `std::process::Command`;
//! the measurements behind that choice are in the `spawn` module's source
//! docs (`src/subprocess/spawn.rs`).
//!
//! # Signals never reach a recycled pid
//!
//! The spawn makes one [`ChildHandle`](crate::ChildHandle) for the child and
//! registers it with the watcher ([`ChildWatcher::add_child`]). The watchers
//! of this crate reap the child only through that handle's gate, recording
//! the status in the same step, and [`Process::send_signal`] decides under
//! the same gate: while it holds it the child cannot be reaped, so its pid
//! cannot be recycled, and after the reap the signal is a no-op. This holds
//! with or without a pidfd; the child has at most one, opened by a watcher
//! that polls it (Pidfd, Uring within its budget) and shared with the
//! `Process`. With a watcher written elsewhere (which reaps on its own), the
//! signal is sent only while the exit slot says the child has not been
//! reported, which leaves the window between that watcher's reap and its
//! callback.
//!
//! # Waiting never depends on the pipes
//!
//! [`Process::wait`] resolves as soon as the watcher reports the exit. It
//! does not wait for pipes to reach end-of-file, so a grandchild that keeps
//! stdout open cannot make it hang (CPython gh-119710);
//! [`Process::communicate`], which must read to end-of-file, can.
//!
//! # Windows
//!
//! The same API on Windows, on the completion-port proactor loop (asyncio's
//! `WindowsProactorEventLoopPolicy`): `spawn_windows.rs` starts the child
//! with `std::process::Command` (there is no reaping on Windows, so its
//! `Child` cannot steal a status; we keep it for the process handle, which
//! pins the pid and is what `terminate`/`kill` use), `pipes_windows.rs`
//! gives overlapped named pipes read and written through the port, and the
//! `WindowsChildWatcher` reports the exit code. `create_subprocess_shell`
//! runs `cmd.exe /c "cmd"`; `terminate`, `kill` and `send_signal(SIGTERM or
//! SIGKILL)` call `TerminateProcess(h, 1)`, so the returncode is 1.

mod child_io;
#[cfg(unix)]
mod pipes;
#[cfg(windows)]
#[path = "pipes_windows.rs"]
mod pipes;
#[cfg(unix)]
mod spawn;
#[cfg(windows)]
#[path = "spawn_windows.rs"]
mod spawn;
mod stream;

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::future::Future;
use std::io;
#[cfg(unix)]
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use slab::Slab;

pub use child_io::{ChildStderr, ChildStdin, ChildStdout};
use spawn::StdioKind;

use crate::event_loop::{EventLoop, get_running_loop};
use crate::watcher::{ChildWatcher, Pid, ReturnCode};

/// What to connect one of the child's standard streams to (asyncio's
/// `None`, `PIPE`, `DEVNULL` and `STDOUT`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Stdio(StdioKind);

impl Stdio {
    /// The parent's stream (asyncio's `None`); the default.
    pub fn inherit() -> Stdio {
        Stdio(StdioKind::Inherit)
    }
    /// A new pipe, available as `Process::stdin`/`stdout`/`stderr`
    /// (asyncio's `PIPE`).
    pub fn piped() -> Stdio {
        Stdio(StdioKind::Piped)
    }
    /// `/dev/null` (asyncio's `DEVNULL`).
    pub fn null() -> Stdio {
        Stdio(StdioKind::Null)
    }
    /// The child's stdout (asyncio's `STDOUT`): for `stderr` only, sends
    /// the child's stderr wherever its stdout goes.
    pub fn stdout() -> Stdio {
        Stdio(StdioKind::Stdout)
    }
}

impl Default for Stdio {
    /// [`Stdio::inherit`].
    fn default() -> Stdio {
        Stdio::inherit()
    }
}

impl fmt::Debug for Stdio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            StdioKind::Inherit => "Stdio::inherit()",
            StdioKind::Piped => "Stdio::piped()",
            StdioKind::Null => "Stdio::null()",
            StdioKind::Stdout => "Stdio::stdout()",
        })
    }
}

/// asyncio's `create_subprocess_exec`: a [`Command`] running `program` with
/// `args` (no shell). Call [`Command::spawn`] inside a running loop.
pub fn create_subprocess_exec<S, I>(program: S, args: I) -> Command
where
    S: AsRef<OsStr>,
    I: IntoIterator,
    I::Item: AsRef<OsStr>,
{
    let mut c = Command::new(program);
    c.args(args);
    c
}

/// asyncio's `create_subprocess_shell`: a [`Command`] running
/// `/bin/sh -c cmd` (on Windows `cmd.exe /c "cmd"`, the command line passed
/// verbatim, as CPython's `shell=True`).
pub fn create_subprocess_shell(cmd: &str) -> Command {
    #[cfg(unix)]
    {
        let mut c = Command::new("/bin/sh");
        c.arg("-c").arg(cmd);
        c
    }
    #[cfg(windows)]
    {
        let (program, args) = spawn::shell_command(cmd);
        let mut c = Command::new(program);
        c.args(args);
        c.shell = true;
        c
    }
}

/// A process builder, like `std::process::Command`, whose
/// [`spawn`](Command::spawn) starts the child under a child watcher.
pub struct Command {
    program: OsString,
    args: Vec<OsString>,
    env_clear: bool,
    /// In the order given; `None` removes the variable.
    env: Vec<(OsString, Option<OsString>)>,
    cwd: Option<PathBuf>,
    stdin: Stdio,
    stdout: Stdio,
    stderr: Stdio,
    new_session: bool,
    process_group: Option<Pid>,
    kill_on_drop: bool,
    watcher: Option<Arc<dyn ChildWatcher>>,
    /// Windows: `args` are a `cmd.exe /c` command line, passed verbatim.
    #[cfg(windows)]
    shell: bool,
}

impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Command")
            .field("program", &self.program)
            .field("args", &self.args)
            .field("env_clear", &self.env_clear)
            .field("env", &self.env)
            .field("current_dir", &self.cwd)
            .field("stdin", &self.stdin)
            .field("stdout", &self.stdout)
            .field("stderr", &self.stderr)
            .field("start_new_session", &self.new_session)
            .field("process_group", &self.process_group)
            .field("kill_on_drop", &self.kill_on_drop)
            .field("own_watcher", &self.watcher.is_some())
            .finish()
    }
}

impl Command {
    /// A command running `program` (looked up in `PATH` unless it contains a
    /// `/`), with no arguments, the parent's environment, working directory
    /// and standard streams.
    pub fn new(program: impl AsRef<OsStr>) -> Command {
        Command {
            program: program.as_ref().to_os_string(),
            args: Vec::new(),
            env_clear: false,
            env: Vec::new(),
            cwd: None,
            stdin: Stdio::inherit(),
            stdout: Stdio::inherit(),
            stderr: Stdio::inherit(),
            new_session: false,
            process_group: None,
            kill_on_drop: false,
            watcher: None,
            #[cfg(windows)]
            shell: false,
        }
    }

    /// Adds an argument.
    pub fn arg(&mut self, arg: impl AsRef<OsStr>) -> &mut Command {
        self.args.push(arg.as_ref().to_os_string());
        self
    }

    /// Adds arguments.
    pub fn args<I>(&mut self, args: I) -> &mut Command
    where
        I: IntoIterator,
        I::Item: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        self
    }

    /// Sets an environment variable for the child.
    pub fn env(&mut self, key: impl AsRef<OsStr>, val: impl AsRef<OsStr>) -> &mut Command {
        self.env.push((
            key.as_ref().to_os_string(),
            Some(val.as_ref().to_os_string()),
        ));
        self
    }

    /// Sets several environment variables for the child.
    pub fn envs<I, K, V>(&mut self, vars: I) -> &mut Command
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        for (k, v) in vars {
            self.env(k, v);
        }
        self
    }

    /// Removes an environment variable from the child's environment.
    pub fn env_remove(&mut self, key: impl AsRef<OsStr>) -> &mut Command {
        self.env.push((key.as_ref().to_os_string(), None));
        self
    }

    /// Starts the child with an empty environment (plus what `env` adds
    /// afterwards).
    pub fn env_clear(&mut self) -> &mut Command {
        self.env_clear = true;
        self.env.clear();
        self
    }

    /// The child's working directory. A relative program path is resolved
    /// from it.
    pub fn current_dir(&mut self, dir: impl AsRef<Path>) -> &mut Command {
        self.cwd = Some(dir.as_ref().to_path_buf());
        self
    }

    /// What the child's stdin is connected to.
    pub fn stdin(&mut self, cfg: Stdio) -> &mut Command {
        self.stdin = cfg;
        self
    }

    /// What the child's stdout is connected to.
    pub fn stdout(&mut self, cfg: Stdio) -> &mut Command {
        self.stdout = cfg;
        self
    }

    /// What the child's stderr is connected to ([`Stdio::stdout`] merges it
    /// into stdout).
    pub fn stderr(&mut self, cfg: Stdio) -> &mut Command {
        self.stderr = cfg;
        self
    }

    /// Runs the child in a new session (`setsid`), as asyncio's
    /// `start_new_session=True`; the child is then its own session and
    /// process-group leader.
    ///
    /// On Windows: `CREATE_NEW_PROCESS_GROUP` (the closest equivalent).
    pub fn start_new_session(&mut self, on: bool) -> &mut Command {
        self.new_session = on;
        self
    }

    /// Puts the child in process group `pgroup` (0: a new group led by the
    /// child), as asyncio's `process_group=`.
    ///
    /// On Windows only 0 is possible (`CREATE_NEW_PROCESS_GROUP`); another
    /// group is `InvalidInput` at spawn.
    pub fn process_group(&mut self, pgroup: Pid) -> &mut Command {
        self.process_group = Some(pgroup);
        self
    }

    /// Whether dropping the [`Process`] kills the child (SIGKILL, through its
    /// pidfd; on Windows `TerminateProcess`). Off by default: a dropped `Process` leaves the child running,
    /// and the watcher still reaps it when it exits.
    pub fn kill_on_drop(&mut self, on: bool) -> &mut Command {
        self.kill_on_drop = on;
        self
    }

    /// Uses `watcher` for this child instead of the policy's
    /// (`get_child_watcher()`). An addition to asyncio's API.
    pub fn watcher(&mut self, watcher: Arc<dyn ChildWatcher>) -> &mut Command {
        self.watcher = Some(watcher);
        self
    }

    /// Starts the child on the running loop and registers it with the child
    /// watcher.
    ///
    /// Errors: no running loop (`Other`), an inactive watcher (`Other`), an
    /// empty program name or a NUL byte in any string (`InvalidInput`), a
    /// missing `current_dir` (`NotFound`), a missing program (`NotFound`),
    /// a program that is not executable (`PermissionDenied`). On error no
    /// child is left running and no descriptor is left open.
    pub fn spawn(&mut self) -> io::Result<Process> {
        let lp = get_running_loop().ok_or_else(|| {
            io::Error::other(
                "spawn needs a running event loop: call it from a future run by \
                 EventLoop::run_until_complete or from a task",
            )
        })?;
        let prepared = spawn::prepare(&spawn::Spec {
            program: &self.program,
            args: &self.args,
            env_clear: self.env_clear,
            env: &self.env,
            cwd: self.cwd.as_deref(),
            stdin: self.stdin.0,
            stdout: self.stdout.0,
            stderr: self.stderr.0,
            new_session: self.new_session,
            process_group: self.process_group,
            #[cfg(windows)]
            shell: self.shell,
        })?;
        let watcher = match &self.watcher {
            Some(w) => Arc::clone(w),
            None => crate::policy::get_child_watcher(),
        };
        let _section = WatcherSection::enter(&*watcher);
        if !watcher.is_active() {
            return Err(io::Error::other(
                "the child watcher is not activated: attach it to the running loop \
                 (watcher.attach_loop(Some(&loop))) or use a watcher that needs no loop \
                 (ThreadedChildWatcher)",
            ));
        }
        let spawned = spawn::spawn(&prepared)?;
        let pid = spawned.pid;
        // What pins the child for signals: the gate its reap goes through
        // on Unix, its process handle on Windows.
        #[cfg(unix)]
        let os = crate::watcher::ChildHandle::new(pid)?; // a spawned pid is positive
        #[cfg(windows)]
        let os = spawned.child;
        let pipes = match wrap_pipes(&lp, spawned.stdin, spawned.stdout, spawned.stderr) {
            Ok(p) => p,
            Err(e) => {
                abandon_child(pid, &os);
                return Err(e);
            }
        };
        let exit = Arc::new(ExitSlot::default());
        let report = ExitReport {
            slot: Some(Arc::clone(&exit)),
        };
        let callback = Box::new(move |_pid: Pid, rc: ReturnCode| report.fire(rc));
        #[cfg(unix)]
        let added = watcher.add_child(&os, callback);
        #[cfg(windows)]
        let added = watcher.add_child_handler(pid, callback);
        if let Err(e) = added {
            drop(pipes);
            abandon_child(pid, &os);
            return Err(io::Error::new(
                e.kind(),
                format!("the child watcher refused pid {pid} ({e}); the child was killed"),
            ));
        }
        let (stdin, stdout, stderr) = pipes;
        Ok(Process {
            stdin,
            stdout,
            stderr,
            pid,
            #[cfg(unix)]
            child: os,
            #[cfg(windows)]
            child: os,
            exit,
            kill_on_drop: self.kill_on_drop,
            communicated: false,
        })
    }
}

/// Calls `exit()` when the spawn section ends, however it ends.
struct WatcherSection<'a>(&'a dyn ChildWatcher);

impl<'a> WatcherSection<'a> {
    fn enter(w: &'a dyn ChildWatcher) -> WatcherSection<'a> {
        w.enter();
        WatcherSection(w)
    }
}

impl Drop for WatcherSection<'_> {
    fn drop(&mut self) {
        self.0.exit();
    }
}

type Pipes = (Option<ChildStdin>, Option<ChildStdout>, Option<ChildStderr>);

/// The parent's end of a pipe: a descriptor, or a handle on Windows.
#[cfg(unix)]
type PipeEnd = OwnedFd;
/// The parent's end of a pipe: a descriptor, or a handle on Windows.
#[cfg(windows)]
type PipeEnd = std::os::windows::io::OwnedHandle;

fn wrap_pipes(
    lp: &EventLoop,
    stdin: Option<PipeEnd>,
    stdout: Option<PipeEnd>,
    stderr: Option<PipeEnd>,
) -> io::Result<Pipes> {
    let stdin = stdin.map(|fd| ChildStdin::new(lp, fd)).transpose()?;
    let stdout = stdout.map(|fd| ChildStdout::new(lp, fd)).transpose()?;
    let stderr = stderr.map(|fd| ChildStderr::new(lp, fd)).transpose()?;
    Ok((stdin, stdout, stderr))
}

/// Kills and reaps a child nobody else knows about (a spawn that failed
/// after the child started).
#[cfg(unix)]
fn abandon_child(_pid: Pid, child: &crate::watcher::ChildHandle) {
    let _ = child.send_signal(libc::SIGKILL);
    if let Err(e) = child.wait_blocking() {
        tracing::warn!("reaping the abandoned pid {}: {e}", child.pid());
    }
}

/// Terminates a child nobody else knows about (a spawn that failed after
/// the child started); Windows has nothing to reap.
#[cfg(windows)]
fn abandon_child(_pid: Pid, child: &std::process::Child) {
    let _ = spawn::terminate(child);
}

// ------------------------------------------------------------ exit slot

#[derive(Default)]
struct ExitState {
    rc: Option<ReturnCode>,
    /// The watcher dropped our callback without calling it.
    lost: bool,
    waiters: Slab<Waker>,
}

/// Where the watcher's callback records the exit; thread-safe because some
/// watchers may call back on another thread.
#[derive(Default)]
struct ExitSlot {
    state: Mutex<ExitState>,
}

impl ExitSlot {
    fn lock(&self) -> MutexGuard<'_, ExitState> {
        // Nothing panics under this lock; a poisoned one still holds valid data.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn finish(&self, rc: Option<ReturnCode>) {
        let wakers: Vec<Waker> = {
            let mut st = self.lock();
            match rc {
                Some(rc) => st.rc = Some(rc),
                None => st.lost = true,
            }
            st.waiters.drain().collect()
        };
        for w in wakers {
            w.wake();
        }
    }
}

/// Owned by the watcher's callback: records the exit when called, or marks
/// it lost when the watcher drops the callback without calling it (closed,
/// or the pid re-registered by someone else), so `wait` errors instead of
/// hanging.
struct ExitReport {
    slot: Option<Arc<ExitSlot>>,
}

impl ExitReport {
    fn fire(mut self, rc: ReturnCode) {
        if let Some(slot) = self.slot.take() {
            slot.finish(Some(rc));
        }
    }
}

impl Drop for ExitReport {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            slot.finish(None);
        }
    }
}

/// The future of [`Process::wait`].
struct WaitExit<'a> {
    slot: &'a ExitSlot,
    pid: Pid,
    key: Option<usize>,
}

impl Future for WaitExit<'_> {
    type Output = io::Result<ReturnCode>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let mut st = this.slot.lock();
        if let Some(rc) = st.rc {
            if let Some(k) = this.key.take() {
                st.waiters.try_remove(k);
            }
            return Poll::Ready(Ok(rc));
        }
        if st.lost {
            this.key = None;
            return Poll::Ready(Err(io::Error::other(format!(
                "the child watcher stopped watching pid {} (closed or replaced) before it \
                 exited; its status is lost",
                this.pid
            ))));
        }
        match this.key.and_then(|k| st.waiters.get_mut(k)) {
            Some(w) => {
                if !w.will_wake(cx.waker()) {
                    *w = cx.waker().clone();
                }
            }
            None => this.key = Some(st.waiters.insert(cx.waker().clone())),
        }
        Poll::Pending
    }
}

impl Drop for WaitExit<'_> {
    fn drop(&mut self) {
        if let Some(k) = self.key.take() {
            self.slot.lock().waiters.try_remove(k);
        }
    }
}

// ------------------------------------------------------------ Process

#[cfg(unix)]
const SIGTERM: i32 = libc::SIGTERM;
#[cfg(unix)]
const SIGKILL: i32 = libc::SIGKILL;
// asyncio accepts these numbers on Windows too; both terminate the process.
#[cfg(windows)]
const SIGTERM: i32 = 15;
#[cfg(windows)]
const SIGKILL: i32 = 9;

/// A running (or finished) child (asyncio's `asyncio.subprocess.Process`).
///
/// Dropping it leaves the child running unless the command asked for
/// [`Command::kill_on_drop`]; either way the watcher reaps the child when it
/// exits, so there is no zombie.
pub struct Process {
    /// The child's stdin, if it was [`Stdio::piped`].
    pub stdin: Option<ChildStdin>,
    /// The child's stdout, if it was [`Stdio::piped`].
    pub stdout: Option<ChildStdout>,
    /// The child's stderr, if it was [`Stdio::piped`].
    pub stderr: Option<ChildStderr>,
    pid: Pid,
    /// The gate the child's reap goes through (and its pidfd, if any).
    #[cfg(unix)]
    child: crate::watcher::ChildHandle,
    /// Windows: the process handle (never waited on through std).
    #[cfg(windows)]
    child: std::process::Child,
    exit: Arc<ExitSlot>,
    kill_on_drop: bool,
    communicated: bool,
}

impl fmt::Debug for Process {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Process");
        d.field("pid", &self.pid)
            .field("returncode", &self.returncode())
            .field("stdin", &self.stdin)
            .field("stdout", &self.stdout)
            .field("stderr", &self.stderr);
        #[cfg(unix)]
        d.field("pidfd", &self.child.pidfd().map(|f| f.as_raw_fd()));
        d.finish()
    }
}

impl Process {
    /// The child's pid.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// The child's pidfd, if its watcher opened one (Pidfd, or Uring
    /// within its descriptor budget) and the child is not reaped yet: it
    /// keeps naming this child, never a process that reused the pid. The
    /// child has at most one pidfd, shared by the watcher and the `Process`;
    /// it closes at the reap (once every holder of the `Arc` drops it).
    #[cfg(unix)]
    pub fn pidfd(&self) -> Option<Arc<OwnedFd>> {
        self.child.pidfd()
    }

    /// The child's [`ChildHandle`](crate::ChildHandle): the gate its reap
    /// and its signals go through.
    #[cfg(unix)]
    pub fn child_handle(&self) -> &crate::watcher::ChildHandle {
        &self.child
    }

    /// Windows: the child's process handle, held for the `Process`'s
    /// lifetime (so the pid is never reused while it lives). Usable with
    /// [`EventLoop::wait_for_handle`].
    #[cfg(windows)]
    pub fn process_handle(&self) -> std::os::windows::io::BorrowedHandle<'_> {
        std::os::windows::io::AsHandle::as_handle(&self.child)
    }

    /// The return code once the watcher reported the exit (exit code, or
    /// `-N` for signal `N`), else `None`.
    pub fn returncode(&self) -> Option<ReturnCode> {
        self.exit.lock().rc
    }

    /// Waits for the child to exit and returns its return code. Any number
    /// of `wait`s may run at once; a dropped `wait` can be started again.
    /// Never waits on the pipes.
    ///
    /// Errors only if the watcher stopped watching the child before it
    /// exited (it was closed).
    pub async fn wait(&self) -> io::Result<ReturnCode> {
        WaitExit {
            slot: &self.exit,
            pid: self.pid,
            key: None,
        }
        .await
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
    /// module docs).
    ///
    /// On Windows, as in asyncio, only SIGTERM (15) and SIGKILL (9) are
    /// accepted, and both call `TerminateProcess(h, 1)` through the held
    /// process handle; other numbers are `InvalidInput`.
    #[cfg(windows)]
    pub fn send_signal(&self, sig: i32) -> io::Result<()> {
        // Decided under the lock that records the exit.
        let st = self.exit.lock();
        if st.rc.is_some() {
            return Ok(());
        }
        spawn::send_signal(&self.child, sig)
    }

    /// Sends signal `sig` to the child. A no-op (`Ok`) once the child has
    /// exited; never reaches another process that reused the pid (see the
    /// module docs).
    #[cfg(unix)]
    pub fn send_signal(&self, sig: i32) -> io::Result<()> {
        if !(0..=64).contains(&sig) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid signal number {sig}"),
            ));
        }
        // Decided under the lock that records the exit.
        let st = self.exit.lock();
        if st.rc.is_some() {
            return Ok(());
        }
        if st.lost && self.child.pidfd().is_none() && self.child.returncode().is_none() {
            // The watcher stopped watching: whoever reaps the child now may
            // not use its gate, so kill(2) could hit a recycled pid. Pin the
            // child with a pidfd (checked to name our unreaped child) first.
            if let Err(e) = self.child.open_pidfd() {
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "the child watcher stopped watching pid {} and no pidfd can be opened \
                         ({e}); refusing to signal a pid that may have been recycled",
                        self.pid
                    ),
                ));
            }
        }
        // Decided under the child's gate: a no-op once it is reaped.
        self.child.send_signal(sig)
    }

    /// Sends SIGTERM (Windows: `TerminateProcess(h, 1)`).
    pub fn terminate(&self) -> io::Result<()> {
        self.send_signal(SIGTERM)
    }

    /// Sends SIGKILL (Windows: `TerminateProcess(h, 1)`).
    pub fn kill(&self) -> io::Result<()> {
        self.send_signal(SIGKILL)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn waker() -> (Arc<Count>, Waker) {
        let c = Arc::new(Count(AtomicUsize::new(0)));
        (Arc::clone(&c), Waker::from(c))
    }

    fn wait(slot: &ExitSlot) -> WaitExit<'_> {
        WaitExit {
            slot,
            pid: 42,
            key: None,
        }
    }

    #[test]
    fn every_waiter_is_woken_once_and_sees_the_code() {
        let slot = Arc::new(ExitSlot::default());
        let report = ExitReport {
            slot: Some(Arc::clone(&slot)),
        };
        let (counts, wakers): (Vec<_>, Vec<_>) = (0..3).map(|_| waker()).unzip();
        let mut waits: Vec<_> = (0..3).map(|_| Box::pin(wait(&slot))).collect();
        for (w, wk) in waits.iter_mut().zip(&wakers) {
            assert!(w.as_mut().poll(&mut Context::from_waker(wk)).is_pending());
        }
        // A cancelled waiter leaves no waker behind.
        let (c4, w4) = waker();
        {
            let mut extra = Box::pin(wait(&slot));
            assert!(
                extra
                    .as_mut()
                    .poll(&mut Context::from_waker(&w4))
                    .is_pending()
            );
        }
        assert_eq!(slot.lock().waiters.len(), 3);
        report.fire(-9);
        for c in &counts {
            assert_eq!(c.0.load(Ordering::SeqCst), 1);
        }
        assert_eq!(c4.0.load(Ordering::SeqCst), 0);
        for (w, wk) in waits.iter_mut().zip(&wakers) {
            match w.as_mut().poll(&mut Context::from_waker(wk)) {
                Poll::Ready(Ok(rc)) => assert_eq!(rc, -9),
                other => panic!("expected the code, got {other:?}"),
            }
        }
        // A wait started after the exit resolves at once.
        let mut late = Box::pin(wait(&slot));
        assert!(matches!(
            late.as_mut().poll(&mut Context::from_waker(&w4)),
            Poll::Ready(Ok(-9))
        ));
    }

    #[test]
    fn a_dropped_callback_fails_the_waiters() {
        let slot = Arc::new(ExitSlot::default());
        let report = ExitReport {
            slot: Some(Arc::clone(&slot)),
        };
        let (c, w) = waker();
        let mut fut = Box::pin(wait(&slot));
        assert!(fut.as_mut().poll(&mut Context::from_waker(&w)).is_pending());
        drop(report); // the watcher closed without calling back
        assert_eq!(c.0.load(Ordering::SeqCst), 1);
        match fut.as_mut().poll(&mut Context::from_waker(&w)) {
            Poll::Ready(Err(e)) => assert_eq!(e.kind(), io::ErrorKind::Other),
            other => panic!("expected an error, got {other:?}"),
        }
    }
}
