//! What both spawn backends (`spawn.rs`, `posix_spawnp`; `spawn_windows.rs`,
//! `CreateProcessW`) take and check the same way: the stream settings, the
//! borrowed spawn request, and the platform-neutral checks of it. Each
//! backend adds only what its platform needs (C strings and `PATH` lookup on
//! Unix; `cmd.exe` quoting and process groups on Windows).

use std::ffi::{OsStr, OsString};
use std::io;
use std::path::Path;

use crate::watcher::Pid;

/// What happens to one of the child's standard streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StdioKind {
    /// The parent's stream.
    Inherit,
    /// A new pipe; the parent keeps the other end.
    Piped,
    /// `/dev/null` (Windows: `NUL`).
    Null,
    /// The child's stdout (asyncio's `STDOUT`, for stderr only).
    Stdout,
}

/// A spawn request, borrowed from a `Command`.
pub(crate) struct Spec<'a> {
    pub(crate) program: &'a OsStr,
    pub(crate) args: &'a [OsString],
    pub(crate) env_clear: bool,
    pub(crate) env: &'a [(OsString, Option<OsString>)],
    pub(crate) cwd: Option<&'a Path>,
    pub(crate) stdin: StdioKind,
    pub(crate) stdout: StdioKind,
    pub(crate) stderr: StdioKind,
    pub(crate) new_session: bool,
    pub(crate) process_group: Option<Pid>,
    /// Windows: `args` is one shell command line for `cmd.exe /c`, passed
    /// verbatim.
    #[cfg(windows)]
    pub(crate) shell: bool,
}

/// An `InvalidInput` error with `msg`.
pub(crate) fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// The checks every platform makes before creating anything: a program
/// name, `Stdio::stdout()` only for stderr, environment names that are not
/// empty, a working directory that exists and is a directory.
pub(crate) fn check(spec: &Spec<'_>) -> io::Result<()> {
    if spec.program.is_empty() {
        return Err(invalid(
            "the program name is empty; give the name or path of a program to run".into(),
        ));
    }
    if spec.stdin == StdioKind::Stdout || spec.stdout == StdioKind::Stdout {
        return Err(invalid(
            "Stdio::stdout() only makes sense for stderr (it sends stderr into stdout)".into(),
        ));
    }
    if let Some((k, _)) = spec.env.iter().find(|(k, _)| k.is_empty()) {
        return Err(invalid(format!(
            "invalid environment variable name {k:?}: it must be non-empty"
        )));
    }
    if let Some(dir) = spec.cwd {
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::NotADirectory,
                    format!("current_dir {} is not a directory", dir.display()),
                ));
            }
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("current_dir {} cannot be used: {e}", dir.display()),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec<'a>(program: &'a OsStr, env: &'a [(OsString, Option<OsString>)]) -> Spec<'a> {
        Spec {
            program,
            args: &[],
            env_clear: false,
            env,
            cwd: None,
            stdin: StdioKind::Inherit,
            stdout: StdioKind::Inherit,
            stderr: StdioKind::Inherit,
            new_session: false,
            process_group: None,
            #[cfg(windows)]
            shell: false,
        }
    }

    #[test]
    fn common_checks() {
        let kind = |s: &Spec<'_>| check(s).unwrap_err().kind();
        assert_eq!(
            kind(&spec(OsStr::new(""), &[])),
            io::ErrorKind::InvalidInput
        );
        let mut s = spec(OsStr::new("x"), &[]);
        s.stdout = StdioKind::Stdout;
        assert_eq!(kind(&s), io::ErrorKind::InvalidInput);
        let env = [(OsString::new(), None)];
        assert_eq!(
            kind(&spec(OsStr::new("x"), &env)),
            io::ErrorKind::InvalidInput
        );
        let mut s = spec(OsStr::new("x"), &[]);
        let missing = Path::new("/nonexistent/childwatch-test-dir");
        s.cwd = Some(missing);
        assert_eq!(kind(&s), io::ErrorKind::NotFound);
        assert!(check(&spec(OsStr::new("x"), &[])).is_ok());
    }
}
