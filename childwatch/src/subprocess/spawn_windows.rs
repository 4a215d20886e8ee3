//! The spawn path on Windows: `std::process::Command` (`CreateProcessW`)
//! with our own overlapped pipes.
//!
//! Windows has no zombies and no reaping, so a `std::process::Child` cannot
//! steal an exit status from the watcher: we keep it for its process handle,
//! which pins the process object (its pid cannot be reused while we hold
//! it) and is what `terminate`/`kill` use (`TerminateProcess(h, 1)`, so the
//! returncode is 1, as in asyncio). The exit itself is reported by the
//! child watcher (`WindowsChildWatcher`, a thread-pool wait on the process).
//!
//! The child's pipe ends ([`super::pipes::pipe`]) are blocking handles that
//! std duplicates into the child as inheritable; ours are overlapped and
//! never inherited. `create_subprocess_shell` runs `cmd.exe /c "<cmd>"` with
//! the command line passed verbatim (CPython's `shell=True`), since cmd.exe
//! does not understand the quoting other programs use.
//!
//! `start_new_session` and `process_group` have no exact Windows meaning;
//! both ask for `CREATE_NEW_PROCESS_GROUP` (the child leads a new console
//! process group, as a new session would), and a non-zero `process_group`
//! (joining another group) is `InvalidInput`.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::windows::io::{AsHandle, AsRawHandle, OwnedHandle};
use std::os::windows::process::CommandExt;
use std::path::Path;
use std::process::{Child, Stdio};

use windows_sys::Win32::Foundation::STILL_ACTIVE;
use windows_sys::Win32::System::Threading::{
    CREATE_NEW_PROCESS_GROUP, GetExitCodeProcess, TerminateProcess,
};

use super::args::{self, invalid};
pub(crate) use super::args::{Spec, StdioKind};
use super::pipes::{Flow, pipe};
use crate::watcher::Pid;

/// A validated spawn request.
#[derive(Debug)]
pub(crate) struct Prepared {
    program: OsString,
    args: Vec<OsString>,
    env_clear: bool,
    env: Vec<(OsString, Option<OsString>)>,
    cwd: Option<std::path::PathBuf>,
    stdin: StdioKind,
    stdout: StdioKind,
    stderr: StdioKind,
    new_group: bool,
    shell: bool,
}

/// A started child: its pid, its process handle, and the parent's ends of
/// its pipes.
#[derive(Debug)]
pub(crate) struct Spawned {
    pub(crate) pid: Pid,
    pub(crate) child: Child,
    pub(crate) stdin: Option<OwnedHandle>,
    pub(crate) stdout: Option<OwnedHandle>,
    pub(crate) stderr: Option<OwnedHandle>,
}

fn has_nul(s: &OsStr) -> bool {
    use std::os::windows::ffi::OsStrExt;
    s.encode_wide().any(|c| c == 0)
}

/// Validates a spawn request. Every bad input is an `InvalidInput` (a
/// missing `cwd`: `NotFound`) error here, before anything is created.
pub(crate) fn prepare(spec: &Spec<'_>) -> io::Result<Prepared> {
    args::check(spec)?;
    let strings = std::iter::once(spec.program)
        .chain(spec.args.iter().map(OsString::as_os_str))
        .chain(spec.env.iter().flat_map(|(k, v)| {
            std::iter::once(k.as_os_str()).chain(v.as_ref().map(OsString::as_os_str))
        }));
    for s in strings {
        if has_nul(s) {
            return Err(invalid(format!(
                "{s:?} contains a NUL character, which cannot be passed to a program"
            )));
        }
    }
    for (k, _) in spec.env {
        let name = k.to_string_lossy();
        // A leading '=' is allowed (cmd.exe's per-drive "=C:" variables).
        if name.is_empty() || name.chars().skip(1).any(|c| c == '=') {
            return Err(invalid(format!(
                "invalid environment variable name {k:?} (empty, or containing '=')"
            )));
        }
    }
    let new_group = match spec.process_group {
        None | Some(0) => spec.new_session || spec.process_group.is_some(),
        Some(g) => {
            return Err(invalid(format!(
                "process_group({g}): joining an existing process group is not possible on \
                 Windows; use process_group(0) or start_new_session(true) for a new one"
            )));
        }
    };
    Ok(Prepared {
        program: spec.program.to_os_string(),
        args: spec.args.to_vec(),
        env_clear: spec.env_clear,
        env: spec.env.to_vec(),
        cwd: spec.cwd.map(Path::to_path_buf),
        stdin: spec.stdin,
        stdout: spec.stdout,
        stderr: spec.stderr,
        new_group,
        shell: spec.shell,
    })
}

/// Starts the child. On error nothing is left running or open.
pub(crate) fn spawn(p: &Prepared) -> io::Result<Spawned> {
    let mut cmd = std::process::Command::new(&p.program);
    if p.shell {
        for a in &p.args {
            cmd.raw_arg(a);
        }
    } else {
        cmd.args(&p.args);
    }
    if p.env_clear {
        cmd.env_clear();
    }
    for (k, v) in &p.env {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    if let Some(dir) = &p.cwd {
        cmd.current_dir(dir);
    }
    if p.new_group {
        cmd.creation_flags(CREATE_NEW_PROCESS_GROUP);
    }
    let (mut stdin, mut stdout, mut stderr) = (None, None, None);
    let mut child_stdout: Option<OwnedHandle> = None;
    // `copy`: also keep a duplicate of the child's end (stdout, for a
    // stderr that goes to the same place).
    let stdio = |kind: StdioKind, flow: Flow, ours: &mut Option<OwnedHandle>, copy: bool| {
        Ok::<_, io::Error>(match kind {
            StdioKind::Inherit | StdioKind::Stdout => (Stdio::inherit(), None),
            StdioKind::Null => (Stdio::null(), None),
            StdioKind::Piped => {
                let (mine, theirs) = pipe(flow)?;
                *ours = Some(mine);
                let dup = if copy {
                    Some(theirs.try_clone()?)
                } else {
                    None
                };
                (Stdio::from(theirs), dup)
            }
        })
    };
    let (s, _) = stdio(p.stdin, Flow::ToChild, &mut stdin, false)?;
    cmd.stdin(s);
    let merge = p.stderr == StdioKind::Stdout;
    let (s, theirs) = stdio(p.stdout, Flow::FromChild, &mut stdout, merge)?;
    cmd.stdout(s);
    child_stdout = theirs.or(child_stdout);
    let (s, _) = stdio(p.stderr, Flow::FromChild, &mut stderr, false)?;
    cmd.stderr(s);
    if p.stderr == StdioKind::Stdout {
        // Wherever the child's stdout goes: our pipe, NUL, or our stdout.
        let target = match (p.stdout, child_stdout) {
            (StdioKind::Piped, Some(h)) => Stdio::from(h),
            (StdioKind::Null, _) => Stdio::null(),
            _ => match std::io::stdout().as_handle().try_clone_to_owned() {
                Ok(h) => Stdio::from(h),
                Err(_) => Stdio::inherit(),
            },
        };
        cmd.stderr(target);
    }
    let child = cmd
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run {:?}: {e}", p.program)))?;
    // `cmd` (dropped here) held the child's pipe ends: only the child has
    // them now, so our reads see end-of-file when it exits.
    drop(cmd);
    Ok(Spawned {
        pid: child.id() as Pid,
        child,
        stdin,
        stdout,
        stderr,
    })
}

/// `TerminateProcess(child, 1)`: asyncio's `terminate()` and `kill()` on
/// Windows. A process that already exited is not an error.
pub(crate) fn terminate(child: &Child) -> io::Result<()> {
    let h = child.as_raw_handle();
    // SAFETY: `child` owns the process handle for this call's duration.
    if unsafe { TerminateProcess(h, 1) } != 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    let mut code = 0u32;
    // SAFETY: as above.
    let got = unsafe { GetExitCodeProcess(h, &mut code) };
    if got != 0 && code != STILL_ACTIVE as u32 {
        return Ok(()); // already exited: access denied is expected
    }
    Err(io::Error::new(
        e.kind(),
        format!("cannot terminate pid {}: {e}", child.id()),
    ))
}

/// asyncio's `send_signal` on Windows: SIGTERM (15) and SIGKILL (9) both
/// terminate the process; anything else is `InvalidInput`.
pub(crate) fn send_signal(child: &Child, sig: i32) -> io::Result<()> {
    match sig {
        9 | 15 => terminate(child),
        _ => Err(invalid(format!(
            "signal {sig} is not supported on Windows; only SIGTERM (15) and SIGKILL (9), \
             which both terminate the process"
        ))),
    }
}

/// The shell command line for `create_subprocess_shell`: `cmd.exe /c "cmd"`,
/// with `%COMSPEC%` when set (CPython's `shell=True`).
pub(crate) fn shell_command(cmd: &str) -> (OsString, Vec<OsString>) {
    let comspec = std::env::var_os("COMSPEC").unwrap_or_else(|| "cmd.exe".into());
    (comspec, vec![format!("/c \"{cmd}\"").into()])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EventLoop;
    use crate::subprocess::ChildStdout;

    fn spec<'a>(program: &'a OsStr, args: &'a [OsString]) -> Spec<'a> {
        Spec {
            program,
            args,
            env_clear: false,
            env: &[],
            cwd: None,
            stdin: StdioKind::Null,
            stdout: StdioKind::Piped,
            stderr: StdioKind::Stdout,
            new_session: false,
            process_group: None,
            shell: false,
        }
    }

    #[test]
    fn a_shell_child_writes_both_streams_into_one_pipe() {
        let lp = EventLoop::proactor().unwrap();
        let (prog, args) = shell_command("echo out& echo \"err here\" 1>&2& exit 3");
        let mut sp = spec(&prog, &args);
        sp.shell = true;
        let mut s = spawn(&prepare(&sp).unwrap()).unwrap();
        assert!(s.stdin.is_none() && s.stderr.is_none());
        let mut out = ChildStdout::new(&lp, s.stdout.take().unwrap()).unwrap();
        let text = lp
            .run_until_complete(async {
                let mut v = Vec::new();
                out.read_to_end(&mut v).await.unwrap();
                String::from_utf8_lossy(&v).into_owned()
            })
            .unwrap();
        assert!(text.contains("out"), "{text:?}");
        assert!(text.contains("\"err here\""), "{text:?}");
        assert_eq!(s.child.wait().unwrap().code(), Some(3));
        assert!(
            terminate(&s.child).is_ok(),
            "terminating an exited child is a no-op"
        );
    }

    #[test]
    fn bad_requests_are_clear_errors() {
        let none: [OsString; 0] = [];
        let e =
            spawn(&prepare(&spec(OsStr::new("no-such-program-here"), &none)).unwrap()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        let e = prepare(&spec(OsStr::new(""), &none)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let bad = [OsString::from("a\0b")];
        let e = prepare(&spec(OsStr::new("cmd.exe"), &bad)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let mut sp = spec(OsStr::new("cmd.exe"), &none);
        let missing = Path::new("C:\\no\\such\\dir");
        sp.cwd = Some(missing);
        assert_eq!(prepare(&sp).unwrap_err().kind(), io::ErrorKind::NotFound);
        let mut sp = spec(OsStr::new("cmd.exe"), &none);
        sp.process_group = Some(1234);
        assert_eq!(
            prepare(&sp).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }

    #[test]
    fn terminate_gives_returncode_one() {
        let args = [OsString::from("/c"), OsString::from("set /p x=")];
        let mut sp = spec(OsStr::new("cmd.exe"), &args);
        sp.stdin = StdioKind::Piped;
        let mut s = spawn(&prepare(&sp).unwrap()).unwrap();
        send_signal(&s.child, 15).unwrap();
        assert_eq!(s.child.wait().unwrap().code(), Some(1));
        let e = send_signal(&s.child, 2).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}
