//! The few raw syscalls that rustix does not wrap the way the exit pipeline
//! needs: `waitid` returning the child's pid and status from its `siginfo_t`
//! (for `P_ALL`, `P_PID` and `P_PIDFD`, with or without `WNOWAIT`),
//! `pidfd_send_signal` and `kill` with any signal number, and reading the
//! current `SIGCHLD` disposition. Everything `unsafe` about them lives here,
//! behind safe functions that return `io::Result`.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use crate::watcher::status::from_siginfo;
use crate::watcher::{Pid, ReturnCode};

/// Which children a [`waitid`] asks about.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Which<'a> {
    /// Any child (`P_ALL`).
    All,
    /// The child with this pid (`P_PID`).
    Pid(Pid),
    /// The child this pidfd refers to (`P_PIDFD`, Linux 5.4+).
    PidFd(BorrowedFd<'a>),
}

/// What [`waitid`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Found {
    /// No child in the asked state now (`WNOHANG`), or only a stop or
    /// continue was reported.
    Nothing,
    /// `pid` exited with `rc` (asyncio's returncode).
    Exited(Pid, ReturnCode),
}

/// `waitid(which, WEXITED | flags)` with `EINTR` retried. `flags` may add
/// `WNOHANG` and `WNOWAIT`; `ECHILD` comes back as an error of raw OS code
/// `ECHILD` for the caller to decide on.
pub(crate) fn waitid(which: Which<'_>, flags: i32) -> io::Result<Found> {
    let (idtype, id) = match which {
        Which::All => (libc::P_ALL, 0),
        Which::Pid(pid) => {
            if pid <= 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("invalid pid {pid}: a child pid is a positive number"),
                ));
            }
            (libc::P_PID, pid as libc::id_t)
        }
        Which::PidFd(fd) => (libc::P_PIDFD, fd.as_raw_fd() as libc::id_t),
    };
    loop {
        // SAFETY: siginfo_t is plain old data; all zeroes is a valid value
        // (and what waitid leaves when WNOHANG finds nothing).
        let mut si: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `si` is a valid, writable siginfo_t for the whole call;
        // the other arguments are integers.
        let r = unsafe { libc::waitid(idtype, id, &mut si, libc::WEXITED | flags) };
        if r == 0 {
            // SAFETY: waitid filled a SIGCHLD siginfo, or left it zeroed.
            let (pid, status) = unsafe { (si.si_pid(), si.si_status()) };
            if pid <= 0 {
                return Ok(Found::Nothing);
            }
            return Ok(match from_siginfo(si.si_code, status) {
                Some(rc) => Found::Exited(pid, rc),
                None => Found::Nothing,
            });
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// Whether `e` is `ECHILD` (no such child: never ours, or already reaped).
pub(crate) fn is_echild(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ECHILD)
}

/// Sends `sig` through `pidfd` (`pidfd_send_signal(2)`) when given, else
/// with `kill(pid, sig)`. `ESRCH` (the process is gone) is `Ok`.
pub(crate) fn send_signal(pid: Pid, pidfd: Option<BorrowedFd<'_>>, sig: i32) -> io::Result<()> {
    // SAFETY: plain syscalls with integer arguments; a null siginfo asks the
    // kernel to fill it in as kill(2) would.
    let rc = unsafe {
        match pidfd {
            Some(fd) => libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd.as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0u32,
            ) as i32,
            None => libc::kill(pid, sig),
        }
    };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ESRCH) => Ok(()),
        _ => Err(io::Error::new(
            e.kind(),
            format!("cannot send signal {sig} to pid {pid}: {e}"),
        )),
    }
}

/// How `SIGCHLD` is handled in this process right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SigchldDisposition {
    /// The default action (children stay zombies until waited for).
    Default,
    /// `SIG_IGN`, or `SA_NOCLDWAIT`: the kernel reaps children by itself and
    /// their statuses are lost.
    AutoReap,
    /// A handler is installed (`handler` is its address, to compare with
    /// the one we expect).
    Handler(usize),
}

/// Reads the current `SIGCHLD` disposition (`sigaction(SIGCHLD, NULL, &old)`).
pub(crate) fn sigchld_disposition() -> io::Result<SigchldDisposition> {
    // SAFETY: sigaction is plain old data; all zeroes is valid.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: a null new action only reads the current one into `old`.
    let r = unsafe { libc::sigaction(libc::SIGCHLD, std::ptr::null(), &mut old) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(
        if old.sa_sigaction == libc::SIG_IGN || old.sa_flags & libc::SA_NOCLDWAIT != 0 {
            SigchldDisposition::AutoReap
        } else if old.sa_sigaction == libc::SIG_DFL {
            SigchldDisposition::Default
        } else {
            SigchldDisposition::Handler(old.sa_sigaction)
        },
    )
}

/// Faults in, as a write would, every whole page inside `spare`
/// (`madvise(MADV_POPULATE_WRITE)`, Linux 5.14+), so that a later `read(2)`
/// into it takes no page fault per page. The partial pages at either end are
/// left alone: they may hold other data. Purely a speed hint: the bytes in
/// `spare` (uninitialised to the caller anyway) are not read, and an error
/// (`EINVAL` on older kernels, `ENOMEM`, ...) changes nothing.
#[cfg(target_os = "linux")]
pub(crate) fn populate_write(spare: &mut [std::mem::MaybeUninit<u8>]) -> io::Result<()> {
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let start = spare.as_mut_ptr() as usize;
    let lo = start.next_multiple_of(page);
    let hi = (start + spare.len()) / page * page;
    if hi <= lo {
        return Ok(());
    }
    // SAFETY: [lo, hi) is whole pages inside `spare`, which we borrow
    // exclusively, so no other code's memory is touched. MADV_POPULATE_WRITE
    // neither changes the mapping nor the bytes of pages already present; it
    // only allocates (zeroed) the absent ones, as a write fault would.
    let r = unsafe { libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_POPULATE_WRITE) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::zombie_processes)] // reaped through waitid under test
    fn waitid_reports_exit_code_and_signal() {
        let a = std::process::Command::new("/bin/sh")
            .args(["-c", "exit 7"])
            .spawn()
            .unwrap();
        let pid = a.id() as Pid;
        // Peek without reaping, then reap.
        assert_eq!(
            waitid(Which::Pid(pid), libc::WNOWAIT).unwrap(),
            Found::Exited(pid, 7)
        );
        assert_eq!(waitid(Which::Pid(pid), 0).unwrap(), Found::Exited(pid, 7));
        let e = waitid(Which::Pid(pid), libc::WNOHANG).unwrap_err();
        assert!(is_echild(&e), "{e}");

        let mut b = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = b.id() as Pid;
        assert_eq!(
            waitid(Which::Pid(pid), libc::WNOHANG).unwrap(),
            Found::Nothing
        );
        send_signal(pid, None, libc::SIGKILL).unwrap();
        assert_eq!(waitid(Which::Pid(pid), 0).unwrap(), Found::Exited(pid, -9));
        // Already reaped through waitid: std's wait then sees ECHILD.
        assert!(b.wait().is_err());
    }

    #[test]
    fn bad_pid_is_invalid_input() {
        let e = waitid(Which::Pid(-3), libc::WNOHANG).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}
