//! What the benchmark reads from the kernel about this process: descriptors,
//! threads and resident memory (from /proc/self), resource limits, and the
//! raw spawning primitives the baselines use (`posix_spawn`, `kill`,
//! `pidfd_open`) written against libc directly.

use std::ffi::CString;
use std::io;
use std::path::Path;

use anyhow::{Result, bail};

/// Reads this process's descriptor count, threads and resident memory even
/// when the descriptor limit is exhausted: /proc/self/status is opened once,
/// up front, and re-read in place; descriptors are counted with `fcntl`.
#[derive(Debug)]
pub struct Probe {
    status: std::fs::File,
}

/// One reading of a [`Probe`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    /// Open descriptors.
    pub fds: usize,
    /// Threads.
    pub threads: usize,
    /// Resident memory (VmRSS), KiB.
    pub rss_kib: u64,
}

impl Probe {
    /// Opens /proc/self/status.
    pub fn new() -> io::Result<Probe> {
        Ok(Probe {
            status: std::fs::File::open("/proc/self/status")?,
        })
    }

    /// Reads the current usage.
    pub fn read(&self) -> Usage {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; 8192];
        let n = self.status.read_at(&mut buf, 0).unwrap_or(0);
        let text = String::from_utf8_lossy(&buf[..n]);
        let field = |name: &str| -> u64 {
            text.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Usage {
            fds: open_fds() - 1, // our own status descriptor
            threads: field("Threads:") as usize,
            rss_kib: field("VmRSS:"),
        }
    }
}

/// Descriptors open in this process now (probing each number below the
/// soft limit, which needs no descriptor of its own).
fn open_fds() -> usize {
    let limit = nofile().map(|(soft, _)| soft).unwrap_or(1024).min(1 << 20);
    (0..limit as i32)
        // SAFETY: F_GETFD only queries the descriptor table.
        .filter(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1)
        .count()
}

fn read_num(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// How many more tasks (processes and threads) this machine lets us create,
/// keeping a safety margin for everything else running.
pub fn task_headroom() -> u64 {
    let pid_max = read_num("/proc/sys/kernel/pid_max").unwrap_or(32768);
    let threads_max = read_num("/proc/sys/kernel/threads-max").unwrap_or(u64::MAX);
    let mut limit = pid_max.min(threads_max);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        if let Ok((soft, _)) = get_rlimit(libc::RLIMIT_NPROC) {
            limit = limit.min(soft);
        }
    }
    // Tasks in use system-wide: the 4th field of /proc/loadavg is "running/total".
    let in_use = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(3)
                .and_then(|f| f.split('/').nth(1))
                .and_then(|t| t.parse::<u64>().ok())
        })
        .unwrap_or(limit / 2);
    limit.saturating_sub(in_use).saturating_sub(2000)
}

fn get_rlimit(res: libc::__rlimit_resource_t) -> io::Result<(u64, u64)> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid, writable rlimit.
    if unsafe { libc::getrlimit(res, &mut r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((r.rlim_cur, r.rlim_max))
}

/// The soft and hard RLIMIT_NOFILE.
pub fn nofile() -> io::Result<(u64, u64)> {
    get_rlimit(libc::RLIMIT_NOFILE)
}

/// Sets the soft RLIMIT_NOFILE while alive, restoring the old one on drop.
#[derive(Debug)]
pub struct NofileGuard {
    old: (u64, u64),
}

impl NofileGuard {
    /// Sets the soft limit to `soft`, raising the hard limit too when it
    /// is lower and we may (CAP_SYS_RESOURCE); otherwise clamps to it.
    pub fn set(soft: u64) -> io::Result<NofileGuard> {
        let old = nofile()?;
        if soft > old.1 && set_nofile(soft, soft).is_ok() {
            return Ok(NofileGuard { old });
        }
        set_nofile(soft.min(old.1), old.1)?;
        Ok(NofileGuard { old })
    }
}

fn set_nofile(soft: u64, hard: u64) -> io::Result<()> {
    let r = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: `r` is a valid rlimit; lowering or restoring our own soft limit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for NofileGuard {
    fn drop(&mut self) {
        // Restoring a raised hard limit is a lowering: always allowed.
        let _ = set_nofile(self.old.0, self.old.1);
    }
}

unsafe extern "C" {
    static environ: *const *mut libc::c_char;
}

/// A program and its argv, prepared once for `posix_spawn`.
#[derive(Clone, Debug)]
pub struct Program {
    path: CString,
    args: Vec<CString>,
}

impl Program {
    /// The first of `candidates` that exists, with `args` (`argv[0]` included).
    pub fn find(candidates: &[&str], args: &[&str]) -> Result<Program> {
        let Some(path) = candidates.iter().find(|p| Path::new(p).exists()) else {
            bail!("none of {candidates:?} exists; the benchmark needs it");
        };
        Ok(Program {
            path: CString::new(*path)?,
            args: args
                .iter()
                .map(|a| CString::new(*a))
                .collect::<Result<_, _>>()?,
        })
    }

    /// The program's path.
    pub fn path(&self) -> &str {
        self.path.to_str().unwrap_or_default()
    }

    /// The arguments after `argv[0]`.
    pub fn rest(&self) -> Vec<&str> {
        self.args[1..]
            .iter()
            .map(|a| a.to_str().unwrap_or_default())
            .collect()
    }

    /// `posix_spawn`s the program with the parent's environment and stdio.
    pub fn spawn(&self) -> io::Result<libc::pid_t> {
        let mut argv: Vec<*mut libc::c_char> = self
            .args
            .iter()
            .map(|a| a.as_ptr() as *mut libc::c_char)
            .collect();
        argv.push(std::ptr::null_mut());
        let mut pid: libc::pid_t = 0;
        // SAFETY: `path` and every argv entry are NUL-terminated strings that
        // outlive the call, argv ends with NULL, the file actions and
        // attributes are NULL (defaults) and `environ` is the process's
        // environment block, which posix_spawn only reads.
        let rc = unsafe {
            libc::posix_spawn(
                &mut pid,
                self.path.as_ptr(),
                std::ptr::null(),
                std::ptr::null(),
                argv.as_ptr(),
                environ,
            )
        };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(pid)
    }
}

/// Sends `sig` to `pid`, which the caller knows is its unreaped child.
pub fn kill(pid: libc::pid_t, sig: i32) {
    // SAFETY: kill(2) takes plain integers; the caller has not reaped `pid`.
    unsafe { libc::kill(pid, sig) };
}

/// `waitpid(pid, 0)`, retried on EINTR; returns (pid, raw status).
pub fn waitpid(pid: libc::pid_t) -> io::Result<(libc::pid_t, i32)> {
    loop {
        let mut status = 0;
        // SAFETY: `status` is a valid, writable int.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r >= 0 {
            return Ok((r, status));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `pidfd_open(pid, 0)`.
pub fn pidfd_open(pid: libc::pid_t) -> io::Result<i32> {
    // SAFETY: pidfd_open takes plain integers and returns a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd as i32)
}

/// The kernel release (uname -r).
pub fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Decodes a wait status into asyncio's return code.
pub fn returncode(status: i32) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        -libc::WTERMSIG(status)
    } else {
        255
    }
}
