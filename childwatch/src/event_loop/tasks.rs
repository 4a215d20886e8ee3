//! The table of a loop's live tasks, so that closing the loop can drop the
//! future of every task that is still parked.
//!
//! Why: a parked task is owned by whoever holds its waker — a timer, an
//! io_uring operation, an epoll source, or a thread of a child watcher.
//! Dropping the loop's own queues releases the first three, but a waker held
//! elsewhere would keep the task (and everything its future owns: a
//! `kill_on_drop` child, pipes, a clone of the loop) alive after `close()`.
//! So each task's future lives in a cell the loop can reach: `close()` takes
//! every future out and drops it on the loop's thread, running its
//! destructors; what stays behind is an empty shell of a few words, freed
//! when its last waker goes.
//!
//! Cost: one allocation (the boxed future) and one slab entry per task;
//! O(1) to add and remove, O(live tasks) once at close.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::task::{Context, Poll};

use slab::Slab;

/// Something the table can cancel: one task's future.
trait Cancel {
    /// Drops the future now (a no-op if it completed or is being polled).
    fn cancel(&self);
    /// Identity, to tell slots apart after a slab key was reused.
    fn id(&self) -> *const ();
}

struct Cell<F> {
    fut: RefCell<Option<Pin<Box<F>>>>,
}

impl<F> Cancel for Cell<F> {
    fn cancel(&self) {
        // Busy means it is being polled right now, which cannot happen while
        // the loop closes (closing a running loop is refused).
        let fut = match self.fut.try_borrow_mut() {
            Ok(mut slot) => slot.take(),
            Err(_) => None,
        };
        // Dropped after the borrow ends: its destructor may do anything.
        drop(fut);
    }

    fn id(&self) -> *const () {
        (self as *const Self).cast()
    }
}

/// The live tasks of one loop.
#[derive(Default)]
pub(crate) struct TaskTable {
    slots: RefCell<Slab<Rc<dyn Cancel>>>,
}

impl TaskTable {
    /// Wraps `fut` so that the table can drop it; the wrapper unregisters
    /// itself when the future completes or the task is dropped.
    pub(crate) fn register<F: Future + 'static>(self: &Rc<Self>, fut: F) -> Tracked<F> {
        let cell = Rc::new(Cell {
            fut: RefCell::new(Some(Box::pin(fut))),
        });
        let key = self
            .slots
            .borrow_mut()
            .insert(cell.clone() as Rc<dyn Cancel>);
        Tracked {
            cell,
            key,
            table: Rc::downgrade(self),
        }
    }

    /// Drops the future of every live task, on the calling (the loop's)
    /// thread. Tasks created by those destructors are cancelled too.
    pub(crate) fn cancel_all(&self) {
        loop {
            let slots = match self.slots.try_borrow_mut() {
                Ok(mut s) => std::mem::take(&mut *s),
                Err(_) => return,
            };
            if slots.is_empty() {
                return;
            }
            for (_, cell) in slots {
                cell.cancel();
            }
        }
    }

    /// Number of live tasks.
    pub(crate) fn len(&self) -> usize {
        self.slots.borrow().len()
    }

    fn unregister(&self, key: usize, id: *const ()) {
        let removed = match self.slots.try_borrow_mut() {
            Ok(mut s) if s.get(key).is_some_and(|c| std::ptr::eq(c.id(), id)) => {
                Some(s.remove(key))
            }
            _ => None,
        };
        drop(removed);
    }
}

/// A task's future as the loop runs it: polls the future in its cell, and
/// is pending forever once the loop dropped that future.
pub(crate) struct Tracked<F> {
    cell: Rc<Cell<F>>,
    key: usize,
    table: Weak<TaskTable>,
}

impl<F> Tracked<F> {
    fn release(&self) {
        let fut = match self.cell.fut.try_borrow_mut() {
            Ok(mut slot) => slot.take(),
            Err(_) => None,
        };
        drop(fut);
        if let Some(table) = self.table.upgrade() {
            table.unregister(self.key, self.cell.id());
        }
    }
}

impl<F: Future> Future for Tracked<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        let out = {
            let Ok(mut slot) = this.cell.fut.try_borrow_mut() else {
                return Poll::Pending;
            };
            let Some(fut) = slot.as_mut() else {
                // Cancelled by the loop's close: this task never completes.
                return Poll::Pending;
            };
            fut.as_mut().poll(cx)
        };
        if out.is_ready() {
            this.release();
        }
        out
    }
}

impl<F> Drop for Tracked<F> {
    fn drop(&mut self) {
        self.release();
    }
}
