//! `Command` and `Stdio`: asyncio's `create_subprocess_exec` /
//! `create_subprocess_shell` arguments as a builder, and the one spawn path
//! (`Command::spawn_child`) that both [`Process`] and the protocol-level
//! `EventLoop::subprocess_exec` start from.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io;
#[cfg(unix)]
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::child_io::{ChildStderr, ChildStdin, ChildStdout};
use super::exit::{ChildCore, ExitReport, ExitSlot};
use super::process::Process;
use super::spawn::{self, StdioKind};
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
        let spawned = self.spawn_child()?;
        Ok(Process::new(spawned, self.kill_on_drop))
    }

    /// The one path from spawn to exit notification that [`Process`] and
    /// the protocol-level [`EventLoop::subprocess_exec`] share: starts the
    /// child, wraps its pipes for the running loop and registers it with
    /// the watcher, whose callback records the exit in the child's
    /// [`ChildCore`].
    pub(crate) fn spawn_child(&mut self) -> io::Result<Spawned> {
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
        #[cfg(unix)]
        let report = ExitReport::pinning(&exit, &os);
        #[cfg(windows)]
        let report = ExitReport::new(&exit);
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
        Ok(Spawned {
            core: ChildCore::new(pid, os, exit),
            stdin,
            stdout,
            stderr,
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

/// A child just started by [`Command::spawn_child`]: its core (pid, exit,
/// signals) and the parent's ends of its pipes.
pub(crate) struct Spawned {
    pub(crate) core: ChildCore,
    pub(crate) stdin: Option<ChildStdin>,
    pub(crate) stdout: Option<ChildStdout>,
    pub(crate) stderr: Option<ChildStderr>,
}
