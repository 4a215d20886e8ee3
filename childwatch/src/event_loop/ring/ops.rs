//! The operations the ring core submits: sealed types, so that only the
//! ring core builds io_uring entries. [`Plain`] ones carry no pointer;
//! [`WaitIdAll`], [`Read`] and [`Write`] own the heap memory their entry
//! points into, and come back to the submitter after the completion.

use std::os::fd::RawFd;

use io_uring::{opcode, squeue, types};

pub(super) mod sealed {
    /// Only the ring core can name it, so only the types below implement
    /// it and only the ring core builds entries.
    pub trait Sealed: 'static {
        /// What the submitter gets back at completion.
        type Output: 'static;
        /// The entry, without `user_data`. Every pointer in it points into
        /// heap memory owned by `self`, which does not move when `self`
        /// moves, stays valid until `self` is dropped, and is not touched
        /// through `self` until [`into_output`](Self::into_output).
        fn entry(&mut self) -> io_uring::squeue::Entry;
        /// The output once the kernel posted the completion `res` (>= 0, or
        /// a negative errno), or never ran the operation.
        fn into_output(self, res: i32) -> Self::Output;
    }
}

/// An operation the ring core knows how to submit (sealed: the types below).
pub(crate) trait RingOp: sealed::Sealed {}

impl<T: sealed::Sealed> RingOp for T {}

/// An operation whose entry carries no pointer: nothing to keep alive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Plain {
    /// One-shot `POLL_ADD` for `events` (e.g. `POLLIN`) on `fd`.
    PollAdd {
        /// The polled descriptor.
        fd: RawFd,
        /// `poll(2)` event bits.
        events: u32,
    },
    /// `WAITID(P_PID, WEXITED | WNOWAIT)` with no siginfo: completes once
    /// the child is a zombie; reaps nothing and writes nothing.
    WaitIdPid {
        /// The child.
        pid: libc::pid_t,
    },
    /// `ASYNC_CANCEL` of the operation tagged `user_data`.
    Cancel {
        /// The tag of the operation to cancel.
        user_data: u64,
    },
    /// Does nothing; its completion wakes whoever waits on the ring.
    Nop,
}

impl sealed::Sealed for Plain {
    type Output = ();

    fn entry(&mut self) -> squeue::Entry {
        match *self {
            Plain::PollAdd { fd, events } => opcode::PollAdd::new(types::Fd(fd), events).build(),
            Plain::WaitIdPid { pid } => opcode::WaitId::new(
                libc::P_PID,
                pid as libc::id_t,
                libc::WEXITED | libc::WNOWAIT,
            )
            .build(),
            Plain::Cancel { user_data } => opcode::AsyncCancel::new(user_data).build(),
            Plain::Nop => opcode::Nop::new().build(),
        }
    }

    fn into_output(self, _res: i32) {}
}

/// `WAITID(P_ALL, WEXITED | WNOWAIT)`: completes once some child is a
/// zombie and writes its pid into a `siginfo_t` this value owns (boxed, so
/// it does not move). It reaps nothing.
pub(crate) struct WaitIdAll {
    info: Box<libc::siginfo_t>,
}

impl WaitIdAll {
    /// A new wait with a zeroed siginfo.
    pub(crate) fn new() -> WaitIdAll {
        // SAFETY: siginfo_t is plain old data; all zeroes is a valid value.
        let info = unsafe { std::mem::zeroed::<libc::siginfo_t>() };
        WaitIdAll {
            info: Box::new(info),
        }
    }

    /// The pid the kernel reported (0: none, e.g. the wait failed).
    pub(crate) fn pid(&self) -> libc::pid_t {
        // SAFETY: reading si_pid reads an int of plain data that the kernel
        // filled for a child-state change or left zeroed; `&self` means the
        // kernel is done with it (in flight, the ring owns this value).
        unsafe { self.info.si_pid() }
    }
}

impl sealed::Sealed for WaitIdAll {
    type Output = WaitIdAll;

    fn entry(&mut self) -> squeue::Entry {
        let ptr: *mut libc::siginfo_t = &mut *self.info;
        opcode::WaitId::new(libc::P_ALL, 0, libc::WEXITED | libc::WNOWAIT)
            .infop(ptr.cast_const())
            .build()
    }

    fn into_output(self, _res: i32) -> WaitIdAll {
        self
    }
}

/// A read from `fd` (at its file position) into the spare capacity of an
/// owned buffer; the output is the buffer with its length extended by what
/// the kernel wrote.
pub(crate) struct Read {
    fd: RawFd,
    buf: Vec<u8>,
}

impl Read {
    /// Reads up to `buf.capacity() - buf.len()` bytes, appended to `buf`.
    pub(crate) fn new(fd: RawFd, buf: Vec<u8>) -> Read {
        Read { fd, buf }
    }
}

impl sealed::Sealed for Read {
    type Output = Vec<u8>;

    fn entry(&mut self) -> squeue::Entry {
        let spare = self.buf.spare_capacity_mut();
        let len = spare.len().min(u32::MAX as usize) as u32;
        opcode::Read::new(types::Fd(self.fd), spare.as_mut_ptr().cast::<u8>(), len)
            .offset(u64::MAX)
            .build()
    }

    fn into_output(mut self, res: i32) -> Vec<u8> {
        let len = self.buf.len();
        let spare = self.buf.capacity() - len;
        if res > 0 && res as usize <= spare {
            // SAFETY: the kernel reported `res` bytes written at the start of
            // the spare capacity the entry pointed at, so they are
            // initialised, and `len + res` is within the capacity.
            unsafe { self.buf.set_len(len + res as usize) };
        }
        self.buf
    }
}

/// A write of `buf[offset..]` to `fd` (at its file position); the output is
/// the buffer, unchanged.
pub(crate) struct Write {
    fd: RawFd,
    buf: Vec<u8>,
    offset: usize,
}

impl Write {
    /// Writes `buf[offset..]` (nothing if `offset` is past the end).
    pub(crate) fn new(fd: RawFd, buf: Vec<u8>, offset: usize) -> Write {
        Write { fd, buf, offset }
    }
}

impl sealed::Sealed for Write {
    type Output = Vec<u8>;

    fn entry(&mut self) -> squeue::Entry {
        let rest = &self.buf[self.offset.min(self.buf.len())..];
        let len = rest.len().min(u32::MAX as usize) as u32;
        opcode::Write::new(types::Fd(self.fd), rest.as_ptr(), len)
            .offset(u64::MAX)
            .build()
    }

    fn into_output(self, _res: i32) -> Vec<u8> {
        self.buf
    }
}
