//! The life of one completion-based operation, shared by the io_uring
//! proactor and the IOCP proactor: *pending* (with the waker of the future
//! awaiting it), *done* (with its result), or *abandoned* (its future was
//! dropped first). Each backend keeps a table of these beside the resources
//! the kernel writes into; this type only decides what a completion, a poll
//! and a drop do, so both backends follow the same rule: an operation's
//! resources are freed when its completion arrives, never earlier.

use std::task::{Context, Waker};

/// Where one operation stands.
pub(crate) enum OpState<T> {
    /// In the kernel; the future (if polled) left its waker.
    Pending(Option<Waker>),
    /// The completion arrived with this result.
    Done(T),
    /// The future was dropped before completion; free on completion.
    Abandoned,
}

/// What the backend does with a slot whose completion just arrived.
pub(crate) enum OnCompletion {
    /// Keep it for its future, which this waker (if any) wakes.
    Wake(Option<Waker>),
    /// Nobody awaits it any more: free the slot and its resources.
    Free,
}

/// What the backend does with a slot whose future is dropped.
pub(crate) enum OnDrop {
    /// Already complete: free the slot now.
    Free,
    /// Still in the kernel (now marked abandoned): ask for a cancel, and
    /// free it when the completion arrives.
    Cancel,
    /// Nothing more to do.
    Keep,
}

impl<T> OpState<T> {
    /// A fresh operation, just handed to the kernel.
    pub(crate) fn new() -> OpState<T> {
        OpState::Pending(None)
    }

    /// Whether the kernel may still write into the operation's resources.
    pub(crate) fn in_flight(&self) -> bool {
        !matches!(self, OpState::Done(_))
    }

    /// Records the completion `res`.
    pub(crate) fn complete(&mut self, res: T) -> OnCompletion {
        match std::mem::replace(self, OpState::Done(res)) {
            OpState::Pending(w) => OnCompletion::Wake(w),
            OpState::Abandoned => OnCompletion::Free,
            OpState::Done(_) => OnCompletion::Wake(None),
        }
    }

    /// For the future's `poll`: the result once done (the caller then frees
    /// the slot), else `None` after remembering `cx`'s waker.
    pub(crate) fn poll_done(&mut self, cx: &Context<'_>) -> Option<T> {
        match self {
            OpState::Done(_) => match std::mem::replace(self, OpState::Abandoned) {
                OpState::Done(res) => Some(res),
                _ => None,
            },
            OpState::Pending(w) => {
                match w {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => *w = Some(cx.waker().clone()),
                }
                None
            }
            OpState::Abandoned => None,
        }
    }

    /// For the future's `drop`.
    pub(crate) fn abandon(&mut self) -> OnDrop {
        match self {
            OpState::Done(_) => OnDrop::Free,
            OpState::Pending(_) => {
                *self = OpState::Abandoned;
                OnDrop::Cancel
            }
            OpState::Abandoned => OnDrop::Keep,
        }
    }

    /// Teardown of an operation the kernel never finished: it ends with
    /// `res`; returns the waker of its future, if one waits.
    pub(crate) fn fail(&mut self, res: T) -> Option<Waker> {
        if !self.in_flight() {
            return None;
        }
        match std::mem::replace(self, OpState::Done(res)) {
            OpState::Pending(w) => w,
            _ => None,
        }
    }
}
