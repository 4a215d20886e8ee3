//! The baselines every figure is compared with, written against libc with
//! no runtime in between:
//!
//! * `raw`: `posix_spawn` + a blocking `waitpid(-1)` loop keeping N in
//!   flight — the cheapest way to run children, what a watcher should match;
//! * `raw-pidfd`: `pidfd_open` per child + one epoll set + `waitid(P_PIDFD)`
//!   per readable pidfd — the reference for killing and reaping many live
//!   children (each pidfd has its own wait queue, so an exit costs O(1)).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::sys::{self, Program};
use super::{Released, Runner};

/// `posix_spawn` + `waitpid`.
#[derive(Debug)]
pub struct Raw {
    short: Program,
    long: Program,
    held: Vec<libc::pid_t>,
}

impl Raw {
    /// A baseline spawning `short` and holding `long` children.
    pub fn new(short: Program, long: Program) -> Raw {
        Raw {
            short,
            long,
            held: Vec::new(),
        }
    }
}

impl Runner for Raw {
    fn run_short(&mut self, n: usize, inflight: usize) -> Result<Duration> {
        let t0 = Instant::now();
        let mut live: HashSet<libc::pid_t> = HashSet::new();
        let mut started = 0;
        let mut done = 0;
        while done < n {
            while started < n && live.len() < inflight {
                live.insert(self.short.spawn().context("posix_spawn")?);
                started += 1;
            }
            let (pid, _) = sys::waitpid(-1).context("waitpid(-1)")?;
            if live.remove(&pid) {
                done += 1;
            }
        }
        Ok(t0.elapsed())
    }

    fn hold(&mut self, k: usize) -> Result<()> {
        for _ in 0..k {
            self.held.push(self.long.spawn().context("posix_spawn")?);
        }
        Ok(())
    }

    fn release(&mut self) -> Result<Released> {
        let held = std::mem::take(&mut self.held);
        let t0 = Instant::now();
        for &pid in &held {
            sys::kill(pid, libc::SIGKILL);
        }
        let mut reported = 0;
        for &pid in &held {
            let (_, status) = sys::waitpid(pid).context("waitpid")?;
            if sys::returncode(status) == -libc::SIGKILL {
                reported += 1;
            }
        }
        Ok(Released {
            time: t0.elapsed(),
            reported,
            held: held.len(),
        })
    }

    fn latency(&mut self, samples: usize) -> Result<Vec<Duration>> {
        let mut out = Vec::with_capacity(samples);
        for _ in 0..samples {
            let pid = self.long.spawn().context("posix_spawn")?;
            let t0 = Instant::now();
            sys::kill(pid, libc::SIGKILL);
            sys::waitpid(pid).context("waitpid")?;
            out.push(t0.elapsed());
        }
        Ok(out)
    }
}

/// pidfd + epoll + `waitid(P_PIDFD)`: only the scale scenario uses it.
#[derive(Debug)]
pub struct RawPidfd {
    long: Program,
    epfd: i32,
    held: Vec<(libc::pid_t, i32)>,
}

impl RawPidfd {
    /// A new epoll set for the children's pidfds.
    pub fn new(long: Program) -> Result<RawPidfd> {
        // SAFETY: epoll_create1 takes a flag and returns a new descriptor.
        let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epfd < 0 {
            return Err(std::io::Error::last_os_error()).context("epoll_create1");
        }
        Ok(RawPidfd {
            long,
            epfd,
            held: Vec::new(),
        })
    }
}

impl Drop for RawPidfd {
    fn drop(&mut self) {
        for &(pid, fd) in &self.held {
            sys::kill(pid, libc::SIGKILL);
            let _ = sys::waitpid(pid);
            // SAFETY: `fd` is our pidfd, closed exactly once.
            unsafe { libc::close(fd) };
        }
        // SAFETY: `epfd` is ours, closed exactly once.
        unsafe { libc::close(self.epfd) };
    }
}

impl Runner for RawPidfd {
    fn run_short(&mut self, _n: usize, _inflight: usize) -> Result<Duration> {
        bail!("n/a: the raw pidfd loop is only the scale reference")
    }

    fn hold(&mut self, k: usize) -> Result<()> {
        for _ in 0..k {
            let pid = self.long.spawn().context("posix_spawn")?;
            let fd = match sys::pidfd_open(pid) {
                Ok(fd) => fd,
                Err(e) => {
                    sys::kill(pid, libc::SIGKILL);
                    let _ = sys::waitpid(pid);
                    return Err(e)
                        .context("pidfd_open (the raw pidfd loop needs one descriptor per child)");
                }
            };
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: self.held.len() as u64,
            };
            // SAFETY: `epfd` and `fd` are open descriptors of ours; `ev` is valid.
            if unsafe { libc::epoll_ctl(self.epfd, libc::EPOLL_CTL_ADD, fd, &mut ev) } != 0 {
                let e = std::io::Error::last_os_error();
                sys::kill(pid, libc::SIGKILL);
                let _ = sys::waitpid(pid);
                // SAFETY: `fd` is ours, closed once.
                unsafe { libc::close(fd) };
                return Err(e).context("epoll_ctl");
            }
            self.held.push((pid, fd));
        }
        Ok(())
    }

    fn release(&mut self) -> Result<Released> {
        let held = std::mem::take(&mut self.held);
        let t0 = Instant::now();
        for &(pid, _) in &held {
            sys::kill(pid, libc::SIGKILL);
        }
        let mut left = held.len();
        let mut reported = 0;
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
        while left > 0 {
            // SAFETY: `events` has room for `events.len()` entries.
            let n = unsafe {
                libc::epoll_wait(self.epfd, events.as_mut_ptr(), events.len() as i32, -1)
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e).context("epoll_wait");
            }
            for ev in &events[..n as usize] {
                let (_, fd) = held[ev.u64 as usize];
                // SAFETY: zeroed siginfo_t is a valid out-parameter.
                let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
                // SAFETY: `fd` is our pidfd of an exited child; `info` is writable.
                let r = unsafe {
                    libc::waitid(libc::P_PIDFD, fd as libc::id_t, &mut info, libc::WEXITED)
                };
                if r == 0 {
                    // SAFETY: waitid filled `info` for a CLD_* event.
                    let (code, status) = (info.si_code, unsafe { info.si_status() });
                    if code == libc::CLD_KILLED && status == libc::SIGKILL {
                        reported += 1;
                    }
                }
                // SAFETY: `fd` is ours; closing also removes it from the epoll set.
                unsafe { libc::close(fd) };
                left -= 1;
            }
        }
        Ok(Released {
            time: t0.elapsed(),
            reported,
            held: held.len(),
        })
    }

    fn latency(&mut self, _samples: usize) -> Result<Vec<Duration>> {
        bail!("n/a: the raw pidfd loop is only the scale reference")
    }
}
