//! The io_uring submission entries the watcher uses, and the one buffer the
//! kernel writes into (the sentinel's `siginfo_t`). Every `unsafe` of the
//! watcher is here, next to the entry it builds: the entries for the own
//! ring ([`Sqe`]) carry no pointer, so pushing them is safe.

use std::os::fd::RawFd;

use io_uring::{IoUring, opcode, squeue, types};

use super::Counted;
use crate::event_loop::proactor::{Op, Proactor};
use crate::watcher::Pid;

/// The `siginfo_t` the kernel fills for the sentinel, boxed so that it does
/// not move while the operation is in flight.
pub(super) struct SigInfo(Box<libc::siginfo_t>);

// SAFETY: siginfo_t is plain data; its only pointer fields (si_addr,
// si_value) are never dereferenced here, only si_pid is read.
unsafe impl Send for SigInfo {}

impl SigInfo {
    pub(super) fn new() -> SigInfo {
        // SAFETY: siginfo_t is plain old data; all zeroes is a valid value.
        SigInfo(Box::new(unsafe { std::mem::zeroed() }))
    }

    /// The pid the kernel reported (0: none).
    pub(super) fn pid(&self) -> Pid {
        // SAFETY: the kernel filled a child-state siginfo (or left it
        // zeroed); reading si_pid is reading plain data.
        unsafe { self.0.si_pid() }
    }
}

/// An entry for the watcher's own ring that carries no pointer: only the
/// builders below make one.
pub(super) struct Sqe(squeue::Entry);

impl Sqe {
    /// Tags the entry with `user_data`.
    pub(super) fn user_data(self, data: u64) -> Sqe {
        Sqe(self.0.user_data(data))
    }

    /// Queues the entry on `ring`; `false` if its submission queue is full.
    pub(super) fn push(&self, ring: &mut IoUring) -> bool {
        // SAFETY: the entry carries no pointer (see the builders); a poll
        // names a descriptor that its operation keeps open until it is
        // cancelled, and the kernel takes its own reference at submission.
        unsafe { ring.submission().push(&self.0) }.is_ok()
    }
}

/// `POLL_ADD(POLLIN)` on a pidfd: readable once the child exited.
pub(super) fn poll(fd: RawFd) -> Sqe {
    Sqe(opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32).build())
}

fn waitid_entry(pid: Pid) -> squeue::Entry {
    opcode::WaitId::new(
        libc::P_PID,
        pid as libc::id_t,
        libc::WEXITED | libc::WNOWAIT,
    )
    .build()
}

/// `WAITID(P_PID, WEXITED | WNOWAIT)` with no siginfo: completes when the
/// child is a zombie, reaps nothing and writes nothing.
pub(super) fn waitid(pid: Pid) -> Sqe {
    Sqe(waitid_entry(pid))
}

/// Cancels the operation tagged `id`.
pub(super) fn cancel(id: u64) -> Sqe {
    Sqe(opcode::AsyncCancel::new(id).build())
}

/// Does nothing; its completion wakes whoever waits on the ring.
pub(super) fn nop() -> Sqe {
    Sqe(opcode::Nop::new().build())
}

/// The sentinel: `WAITID(P_ALL, WEXITED | WNOWAIT)` writing the pid of some
/// zombie child into `si`. It reaps nothing.
fn sentinel(si: &mut SigInfo) -> squeue::Entry {
    let ptr: *mut libc::siginfo_t = &mut *si.0;
    opcode::WaitId::new(libc::P_ALL, 0, libc::WEXITED | libc::WNOWAIT)
        .infop(ptr.cast_const())
        .build()
}

/// A per-pid `WAITID(WNOWAIT)` on a loop's ring, holding `count` until it
/// completes.
pub(super) fn loop_waitid(p: &Proactor, pid: Pid, count: Counted) -> Op<Counted> {
    // SAFETY: the entry carries no pointer (no siginfo) and names no
    // descriptor.
    unsafe { p.submit(waitid_entry(pid), count) }
}

/// The sentinel on a loop's ring.
pub(super) fn loop_sentinel(p: &Proactor, count: Counted) -> Op<(SigInfo, Counted)> {
    let mut si = SigInfo::new();
    let entry = sentinel(&mut si);
    // SAFETY: the entry points into the boxed siginfo, which the op owns (in
    // the proactor's table) until its completion, wherever the box moves.
    unsafe { p.submit(entry, (si, count)) }
}
