//! The ring core: every io_uring operation the crate submits is built and
//! pushed here, and every `unsafe` that takes lives in this module (the
//! operations themselves are in `ops.rs`).
//!
//! # What the kernel may touch, and for how long
//!
//! An io_uring entry may point into user memory (a read buffer, the
//! `siginfo_t` a `WAITID` fills) that the kernel uses until it posts the
//! operation's completion. Pushing an entry is `unsafe` because nothing in
//! `io_uring` ties that memory's life to the operation's. Here types do:
//!
//! * Operations are values of sealed types ([`RingOp`]): [`Plain`] ones,
//!   whose entries carry no pointer, and [`WaitIdAll`], [`Read`] and
//!   [`Write`], which *own* the heap memory their entry points into. Only
//!   the ring core can build an entry.
//! * [`PlainRing`] is a bare ring (the child watcher's own) that takes only
//!   [`Plain`] operations, with any `user_data`: nothing must be kept alive.
//! * [`OpRing`] (the proactor's ring) takes any operation and moves it into
//!   its table, where it stays until the kernel posts its completion. What
//!   its submitter gets back on completion is the operation (or what it
//!   turns into) itself. Removing a slot early leaves a tombstone holding the
//!   memory until the completion; closing (or dropping) the ring leaks
//!   whatever the kernel did not finish rather than freeing it under the
//!   kernel's feet. A closed ring keeps its table, so that operations
//!   submitted after it (which never reach a kernel) still hand back what
//!   they own.
//!   Every operation is one-shot: after its completion the kernel never
//!   touches its memory again.
//!
//! # Descriptors
//!
//! An entry names a descriptor by number. That is not a memory-safety
//! matter: the kernel resolves the number when it issues the operation and
//! holds its own reference to the file until the completion, so a closed
//! descriptor gives `EBADF`. A number closed and *reused* before the issue
//! would make the operation act on the wrong file, a logic error; whoever
//! submits keeps the descriptor open until the operation completes or its
//! cancel is queued (the proactor's callers keep their fds open while the
//! `Op` lives; the watcher keeps each pidfd until it cancels or completes).

use std::any::Any;
use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use io_uring::{IoUring, squeue, types};
use slab::Slab;

mod ops;

use ops::sealed::Sealed;
pub(crate) use ops::{Plain, Read, RingOp, WaitIdAll, Write};

/// `user_data` from here up is reserved for [`OpRing::push_tagged`]; the
/// table's keys stay below it (a slab cannot hold 2^64 - 256 slots).
pub(crate) const FIRST_TAG: u64 = u64::MAX - 255;

/// How long [`OpRing::enter`] waits for a completion.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Wait {
    /// Submit only (no system call if nothing is queued).
    No,
    /// Until at least one completion.
    Forever,
    /// Until at least one completion or this long.
    Upto(Duration),
}

/// An io_uring with a backlog for entries its submission queue cannot take
/// yet; the one place entries are pushed.
struct Queue {
    ring: IoUring,
    backlog: VecDeque<squeue::Entry>,
}

impl Queue {
    /// A ring with `sq_entries` submission and `cq_entries` completion
    /// entries, and an empty backlog.
    fn new(sq_entries: u32, cq_entries: u32) -> io::Result<Queue> {
        let ring = IoUring::builder()
            .setup_cqsize(cq_entries)
            .build(sq_entries)?;
        Ok(Queue {
            ring,
            backlog: VecDeque::new(),
        })
    }

    /// Queues `entry` (the submission queue, else the backlog, in order).
    ///
    /// # Safety
    ///
    /// Every pointer in `entry` stays valid, and is not otherwise accessed,
    /// until the ring posts the completion of `entry`'s `user_data` (or the
    /// ring is gone and the memory leaked).
    unsafe fn push(&mut self, entry: squeue::Entry) {
        if self.backlog.is_empty() {
            // SAFETY: forwarded from this function's contract.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
            let _ = self.ring.submit();
            // SAFETY: as above.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
        }
        self.backlog.push_back(entry);
    }

    /// Moves the backlog into the submission queue, submitting whenever it
    /// fills; what does not fit stays for the next flush.
    fn flush_backlog(&mut self) -> io::Result<()> {
        while let Some(entry) = self.backlog.front() {
            // SAFETY: every backlog entry came through `push`, whose caller
            // keeps its memory valid until its completion, which cannot have
            // come: the kernel has not seen the entry yet.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                self.backlog.pop_front();
                continue;
            }
            self.ring.submit()?;
            if self.ring.submission().is_full() {
                break;
            }
        }
        Ok(())
    }

    /// Hands what is queued to the kernel and waits as `wait` says.
    fn enter(&mut self, wait: Wait) -> io::Result<usize> {
        self.flush_backlog()?;
        match wait {
            Wait::No if self.ring.submission().is_empty() => Ok(0),
            Wait::No => self.ring.submit(),
            Wait::Forever => self.ring.submit_and_wait(1),
            Wait::Upto(t) => {
                let ts = types::Timespec::new()
                    .sec(t.as_secs())
                    .nsec(t.subsec_nanos());
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
        }
    }

    /// Appends every completion available as `(user_data, result)`.
    fn drain(&mut self, out: &mut Vec<(u64, i32)>) {
        out.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
    }
}

/// A bare ring taking only [`Plain`] operations, tagged with any
/// `user_data`: the child watcher's own ring.
pub(crate) struct PlainRing {
    queue: Queue,
}

impl PlainRing {
    /// A ring with `sq_entries` submission and `cq_entries` completion
    /// entries (the kernel buffers completions beyond it).
    pub(crate) fn new(sq_entries: u32, cq_entries: u32) -> io::Result<PlainRing> {
        Ok(PlainRing {
            queue: Queue::new(sq_entries, cq_entries)?,
        })
    }

    /// Has the ring signal `fd` (an eventfd) at each completion.
    pub(crate) fn register_eventfd(&self, fd: RawFd) -> io::Result<()> {
        self.queue.ring.submitter().register_eventfd(fd)
    }

    /// Queues `op` tagged `user_data` (handed to the kernel at the next
    /// [`flush`](Self::flush), or at once if the submission queue is full).
    pub(crate) fn push(&mut self, mut op: Plain, user_data: u64) {
        let entry = op.entry().user_data(user_data);
        // SAFETY: a `Plain` entry carries no pointer (see its `entry`).
        unsafe { self.queue.push(entry) };
    }

    /// Hands everything queued to the kernel. Enters the kernel even with
    /// nothing queued, which also moves completions it buffered beyond the
    /// completion queue (overflow) into it.
    pub(crate) fn flush(&mut self) -> io::Result<usize> {
        self.queue.flush_backlog()?;
        self.queue.ring.submit()
    }

    /// Appends every completion available as `(user_data, result)`.
    pub(crate) fn drain(&mut self, out: &mut Vec<(u64, i32)>) {
        self.queue.drain(out);
    }
}

/// One operation in an [`OpRing`]'s table.
struct Slot<S> {
    /// The submitter's state; `None` for a tombstone (removed early).
    state: Option<S>,
    /// The operation (and what its submitter keeps with it), type-erased.
    held: Option<Box<dyn Any>>,
    /// The kernel may still use `held`: no completion seen yet.
    in_kernel: bool,
}

/// What an [`OpRing`] gives back for one operation: its key and how to turn
/// what the slot held into `R`.
pub(crate) struct Ticket<R> {
    key: usize,
    finish: fn(Box<dyn Any>, i32) -> Option<R>,
}

impl<R> Ticket<R> {
    /// The operation's key (its `user_data`).
    pub(crate) fn key(&self) -> usize {
        self.key
    }
}

/// The output of `O`, submitted alone, from its slot's `held`.
fn finish_op<O: RingOp>(held: Box<dyn Any>, res: i32) -> Option<O::Output> {
    let (op, ()) = *held.downcast::<(O, ())>().ok()?;
    Some(op.into_output(res))
}

/// The output of `O` and what was kept with it, from its slot's `held`.
fn finish_keeping<O: RingOp, K: 'static>(held: Box<dyn Any>, res: i32) -> Option<(O::Output, K)> {
    let (op, keep) = *held.downcast::<(O, K)>().ok()?;
    Some((op.into_output(res), keep))
}

/// A ring with a table owning each operation until its completion, and a
/// per-operation state `S` for the submitter (the proactor's wakers).
pub(crate) struct OpRing<S> {
    /// The io_uring itself; `None` once [`close`](Self::close)d.
    queue: Option<Queue>,
    table: Slab<Slot<S>>,
}

impl<S> OpRing<S> {
    /// A ring with `sq_entries` submission and `cq_entries` completion
    /// entries (the kernel buffers completions beyond it).
    pub(crate) fn new(sq_entries: u32, cq_entries: u32) -> io::Result<OpRing<S>> {
        Ok(OpRing {
            queue: Some(Queue::new(sq_entries, cq_entries)?),
            table: Slab::with_capacity(64),
        })
    }

    /// Closes the io_uring now (its descriptor and mappings) and keeps the
    /// table. Memory of operations the kernel did not finish is leaked: the
    /// kernel tears a closed ring down asynchronously and may still write
    /// into it. Their slots stay, with nothing left to give back; every
    /// later operation must be submitted with `to_kernel` false.
    pub(crate) fn close(&mut self) {
        if self.queue.is_none() {
            return;
        }
        self.leak_in_kernel();
        self.queue = None;
    }

    /// Leaks the memory of every operation the kernel may still use, and
    /// frees the tombstones among them (nobody is waiting for those).
    fn leak_in_kernel(&mut self) {
        let mut tombstones = Vec::new();
        for (key, slot) in self.table.iter_mut() {
            if slot.in_kernel {
                if let Some(h) = slot.held.take() {
                    std::mem::forget(h);
                }
                slot.in_kernel = false;
                if slot.state.is_none() {
                    tombstones.push(key);
                }
            }
        }
        for key in tombstones {
            self.table.remove(key);
        }
    }

    /// Moves `op` into the table with `state` and, if `to_kernel`, queues
    /// it (else it stays a completed-looking slot the kernel never sees).
    pub(crate) fn submit<O: RingOp>(
        &mut self,
        op: O,
        state: S,
        to_kernel: bool,
    ) -> Ticket<O::Output> {
        let key = self.insert(op, (), state, to_kernel);
        Ticket {
            key,
            finish: finish_op::<O>,
        }
    }

    /// As [`submit`](Self::submit), also keeping `keep` in the slot until
    /// the completion (a count of operations in the kernel, say).
    pub(crate) fn submit_keeping<O: RingOp, K: 'static>(
        &mut self,
        op: O,
        keep: K,
        state: S,
        to_kernel: bool,
    ) -> Ticket<(O::Output, K)> {
        let key = self.insert(op, keep, state, to_kernel);
        Ticket {
            key,
            finish: finish_keeping::<O, K>,
        }
    }

    /// Puts `(op, keep)` in a new slot and, if `to_kernel`, queues its
    /// entry tagged with the slot's key.
    fn insert<O: RingOp, K: 'static>(
        &mut self,
        op: O,
        keep: K,
        state: S,
        to_kernel: bool,
    ) -> usize {
        debug_assert!(
            !to_kernel || self.queue.is_some(),
            "an operation submitted to a closed ring"
        );
        let to_kernel = to_kernel && self.queue.is_some();
        let mut held = Box::new((op, keep));
        let entry = held.0.entry();
        let key = self.table.insert(Slot {
            state: Some(state),
            held: Some(held),
            in_kernel: to_kernel,
        });
        assert!(
            (key as u64) < FIRST_TAG,
            "io_uring operation table overflow"
        );
        if let (true, Some(queue)) = (to_kernel, self.queue.as_mut()) {
            // SAFETY: the entry points only into heap memory owned by the
            // operation (`Sealed::entry`), which now lives in the table under
            // `key` (moving the box does not move that memory) and leaves it
            // only once a completion tagged `key` was seen (`drain`), or is
            // leaked when the ring closes. Keys below FIRST_TAG are never
            // used by tagged entries, so no other completion can carry `key`.
            unsafe { queue.push(entry.user_data(key as u64)) };
        }
        key
    }

    /// Queues a plain operation tagged `tag`, which must be `>= FIRST_TAG`
    /// so that its completion cannot be taken for a table operation's. On
    /// a closed ring it is dropped (nothing runs it).
    pub(crate) fn push_tagged(&mut self, mut op: Plain, tag: u64) {
        assert!(tag >= FIRST_TAG, "tag {tag} collides with operation keys");
        let Some(queue) = self.queue.as_mut() else {
            return;
        };
        let entry = op.entry().user_data(tag);
        // SAFETY: a `Plain` entry carries no pointer.
        unsafe { queue.push(entry) };
    }

    /// Hands what is queued to the kernel and waits as `wait` says. A
    /// closed ring fails with `EBADF`.
    pub(crate) fn enter(&mut self, wait: Wait) -> io::Result<usize> {
        match self.queue.as_mut() {
            Some(queue) => queue.enter(wait),
            None => Err(io::Error::from_raw_os_error(libc::EBADF)),
        }
    }

    /// Appends every completion available as `(user_data, result)`; the
    /// operations completed are the kernel's no more, and tombstones among
    /// them are freed.
    pub(crate) fn drain(&mut self, out: &mut Vec<(u64, i32)>) {
        let Some(queue) = self.queue.as_mut() else {
            return;
        };
        let start = out.len();
        queue.drain(out);
        for &(tag, _) in &out[start..] {
            if tag >= FIRST_TAG {
                continue;
            }
            let key = tag as usize;
            let Some(slot) = self.table.get_mut(key) else {
                continue;
            };
            slot.in_kernel = false;
            if slot.state.is_none() {
                self.table.remove(key);
            }
        }
    }

    /// The state of operation `key` (not of a tombstone).
    pub(crate) fn state_mut(&mut self, key: usize) -> Option<&mut S> {
        self.table.get_mut(key)?.state.as_mut()
    }

    /// Every operation's key and state.
    pub(crate) fn states(&self) -> impl Iterator<Item = (usize, &S)> {
        self.table
            .iter()
            .filter_map(|(k, s)| Some((k, s.state.as_ref()?)))
    }

    /// Removes operation `key`. If the kernel may still use it, its memory
    /// stays as a tombstone until its completion.
    pub(crate) fn remove(&mut self, key: usize) -> Option<S> {
        let slot = self.table.get_mut(key)?;
        let state = slot.state.take()?;
        if !slot.in_kernel {
            self.table.remove(key);
        }
        Some(state)
    }

    /// Removes the ticket's operation and returns its state and, once the
    /// kernel is done with it, its output for the result `res`.
    pub(crate) fn take<R>(&mut self, ticket: &Ticket<R>, res: i32) -> Option<(S, Option<R>)> {
        let slot = self.table.get_mut(ticket.key)?;
        slot.state.as_ref()?;
        if slot.in_kernel {
            return Some((self.remove(ticket.key)?, None));
        }
        let slot = self.table.remove(ticket.key);
        let out = slot.held.and_then(|h| (ticket.finish)(h, res));
        Some((slot.state?, out))
    }
}

impl<S> Drop for OpRing<S> {
    fn drop(&mut self) {
        // The kernel may still write into these after the ring is closed:
        // never free them (the queue, a field, closes after this).
        self.leak_in_kernel();
    }
}

#[cfg(test)]
mod tests;
