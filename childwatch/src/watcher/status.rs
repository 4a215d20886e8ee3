//! Turning what the kernel says about a dead child into asyncio's returncode.
//!
//! asyncio's convention: the exit code for a normal exit, `-N` for a child
//! killed by signal `N`, and 255 when the status was lost because something
//! else reaped the child first (with a warning, never a hang). Stops and
//! continues are not exits and give `None`.
//!
//! On Windows only [`LOST_STATUS`] applies: a process's returncode there is
//! its exit code (`GetExitCodeProcess`), which needs no decoding.

#[cfg(unix)]
use std::io;

#[cfg(unix)]
use rustix::process::Pid as RPid;

use super::{Pid, ReturnCode};

/// The returncode reported when a child's status was lost.
pub const LOST_STATUS: ReturnCode = 255;

/// Logs the lost status of `pid` and returns [`LOST_STATUS`].
pub(crate) fn lost(pid: Pid) -> ReturnCode {
    tracing::warn!(
        "unknown child pid {pid} (already reaped by someone else?), reporting returncode 255"
    );
    LOST_STATUS
}

#[cfg(unix)]
/// The returncode of a raw `waitpid` status word; `None` for a stop or continue.
pub fn from_raw_wait_status(raw: i32) -> Option<ReturnCode> {
    if libc::WIFEXITED(raw) {
        Some(libc::WEXITSTATUS(raw))
    } else if libc::WIFSIGNALED(raw) {
        Some(-libc::WTERMSIG(raw))
    } else {
        None
    }
}

#[cfg(unix)]
/// The returncode from a raw siginfo (`si_code`, `si_status`), as filled by
/// io_uring's WAITID; `None` for a stop, trap or continue.
pub fn from_siginfo(code: i32, status: i32) -> Option<ReturnCode> {
    match code {
        libc::CLD_EXITED => Some(status),
        libc::CLD_KILLED | libc::CLD_DUMPED => Some(-status),
        _ => None,
    }
}

#[cfg(unix)]
/// A rustix pid for a positive `pid` (rustix panics on negative raw pids).
pub(crate) fn rpid(pid: Pid) -> io::Result<RPid> {
    let invalid = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid pid {pid}: a child pid is a positive number"),
        )
    };
    if pid <= 0 {
        return Err(invalid());
    }
    RPid::from_raw(pid).ok_or_else(invalid)
}

#[cfg(unix)]
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn siginfo_codes() {
        assert_eq!(from_siginfo(libc::CLD_EXITED, 7), Some(7));
        assert_eq!(from_siginfo(libc::CLD_KILLED, 9), Some(-9));
        assert_eq!(from_siginfo(libc::CLD_DUMPED, 11), Some(-11));
        assert_eq!(from_siginfo(libc::CLD_STOPPED, 19), None);
        assert_eq!(from_siginfo(libc::CLD_CONTINUED, 18), None);
    }

    #[test]
    fn raw_wait_status() {
        assert_eq!(from_raw_wait_status(3 << 8), Some(3));
        assert_eq!(from_raw_wait_status(15), Some(-15));
        assert_eq!(from_raw_wait_status(0x137f), None); // stopped by SIGSTOP
    }
}
