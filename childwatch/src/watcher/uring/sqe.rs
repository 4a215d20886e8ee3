//! The io_uring submission entries of the watcher's own ring. Every
//! `unsafe` of the watcher is here, next to the entry it builds: the entries
//! ([`Sqe`]) carry no pointer, so pushing them is safe. Operations on a
//! loop's ring go through the event loop's ring core instead.

use std::os::fd::RawFd;

use io_uring::{IoUring, opcode, squeue, types};

use crate::watcher::Pid;

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

/// `WAITID(P_PID, WEXITED | WNOWAIT)` with no siginfo: completes when the
/// child is a zombie, reaps nothing and writes nothing.
pub(super) fn waitid(pid: Pid) -> Sqe {
    Sqe(opcode::WaitId::new(
        libc::P_PID,
        pid as libc::id_t,
        libc::WEXITED | libc::WNOWAIT,
    )
    .build())
}

/// Cancels the operation tagged `id`.
pub(super) fn cancel(id: u64) -> Sqe {
    Sqe(opcode::AsyncCancel::new(id).build())
}

/// Does nothing; its completion wakes whoever waits on the ring.
pub(super) fn nop() -> Sqe {
    Sqe(opcode::Nop::new().build())
}
