//! The selector backend: a readiness-based loop on epoll (through `polling`).
//!
//! The analog of asyncio's `SelectorEventLoop`: the loop asks the kernel which
//! descriptors are *ready*, then does the non-blocking IO itself. Every
//! descriptor is registered one-shot; a [`Source`] re-arms its interest each
//! time a reader or writer has to wait, so a descriptor nobody waits on costs
//! nothing per iteration.
//!
//! Closing the loop ([`Selector::shutdown`]) closes the epoll instance at
//! once, as asyncio's `close()` closes its selector: waiting or registering
//! afterwards fails with a closed-loop error, and a [`Source`] dropped later
//! just forgets its slot.
//!
//! Choose it when io_uring is unavailable (old kernels, seccomp sandboxes,
//! `kernel.io_uring_disabled`) or when readiness semantics are wanted.
//!
//! On Windows `polling` emulates readiness for sockets on an I/O completion
//! port (AFD polling), and the loop is woken with `Poller::notify` instead of
//! an eventfd: the selector loop runs callbacks, timers, tasks and sockets
//! there, as asyncio's `WindowsSelectorEventLoopPolicy` does (no pipes, no
//! subprocesses: use the proactor).

use std::cell::RefCell;
use std::io;
#[cfg(unix)]
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
#[cfg(windows)]
use std::os::windows::io::{BorrowedSocket, RawSocket};
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use polling::{Event, Events, Poller};
use slab::Slab;

use super::notify::Notifier;

/// What a source is: a descriptor on Unix, a socket on Windows.
#[cfg(unix)]
pub(crate) type RawSource = RawFd;
/// What a source is: a descriptor on Unix, a socket on Windows.
#[cfg(windows)]
pub(crate) type RawSource = RawSocket;

/// # Safety
/// `raw` must be open for as long as the result is used.
#[cfg(unix)]
unsafe fn borrow_raw(raw: RawSource) -> BorrowedFd<'static> {
    // SAFETY: forwarded from the caller.
    unsafe { BorrowedFd::borrow_raw(raw) }
}

/// # Safety
/// `raw` must be open for as long as the result is used.
#[cfg(windows)]
unsafe fn borrow_raw(raw: RawSource) -> BorrowedSocket<'static> {
    // SAFETY: forwarded from the caller.
    unsafe { BorrowedSocket::borrow_raw(raw) }
}

/// Key of the notifier eventfd in the poller.
#[cfg(unix)]
const NOTIFY_KEY: usize = usize::MAX - 1; // polling reserves usize::MAX

#[derive(Default)]
struct SourceState {
    fd: RawSource,
    reader: Option<Waker>,
    writer: Option<Waker>,
    read_ready: bool,
    write_ready: bool,
}

struct Inner {
    /// `None` once the loop is closed (the epoll instance is closed then).
    poller: RefCell<Option<Arc<Poller>>>,
    events: RefCell<Events>,
    sources: RefCell<Slab<SourceState>>,
    #[cfg(unix)]
    notify_fd: RawFd,
    shut_down: std::cell::Cell<bool>,
}

/// One loop's epoll instance and the sources registered with it.
#[derive(Clone)]
pub(crate) struct Selector {
    inner: Rc<Inner>,
}

impl std::fmt::Debug for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Selector")
            .field("sources", &self.inner.sources.borrow().len())
            .finish()
    }
}

/// Direction of interest.
#[cfg_attr(windows, allow(dead_code))] // no socket API uses it on Windows yet
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Interest {
    /// Wait until the descriptor is readable (or hung up).
    Read,
    /// Wait until the descriptor is writable (or in error).
    Write,
}

impl Selector {
    /// Creates the epoll instance and registers the loop's notifier on it.
    pub(crate) fn new(notifier: &Notifier) -> io::Result<Selector> {
        let poller = Arc::new(Poller::new().map_err(|e| {
            io::Error::new(e.kind(), format!("cannot create an epoll instance: {e}"))
        })?);
        #[cfg(windows)]
        {
            notifier.set_target(super::notify::WakeTarget::Poller(Arc::clone(&poller)));
            Ok(Selector {
                inner: Rc::new(Inner {
                    poller: RefCell::new(Some(poller)),
                    events: RefCell::new(Events::new()),
                    sources: RefCell::new(Slab::new()),
                    shut_down: std::cell::Cell::new(false),
                }),
            })
        }
        #[cfg(unix)]
        {
            Selector::with_notify_fd(poller, notifier.as_raw_fd())
        }
    }

    #[cfg(unix)]
    fn with_notify_fd(poller: Arc<Poller>, notify_fd: RawFd) -> io::Result<Selector> {
        // SAFETY: the notifier's eventfd stays open until the loop closes,
        // which closes this poller first (`shutdown`); a poller dropped
        // otherwise removes the registration in `Drop for Inner`.
        unsafe { poller.add(notify_fd, Event::readable(NOTIFY_KEY))? };
        Ok(Selector {
            inner: Rc::new(Inner {
                poller: RefCell::new(Some(poller)),
                events: RefCell::new(Events::new()),
                sources: RefCell::new(Slab::new()),
                notify_fd,
                shut_down: std::cell::Cell::new(false),
            }),
        })
    }

    /// The epoll instance, or the closed-loop error once it is closed.
    fn poller(&self, doing: &str) -> io::Result<Arc<Poller>> {
        self.inner
            .poller
            .borrow()
            .clone()
            .ok_or_else(|| closed_error(doing))
    }

    /// Waits up to `timeout` (forever if `None`) and wakes every reader and
    /// writer whose descriptor became ready. Fails once the loop is closed.
    pub(crate) fn poll(&self, timeout: Option<Duration>, notifier: &Notifier) -> io::Result<()> {
        let poller = self.poller("cannot wait for IO")?;
        let mut events = self.inner.events.borrow_mut();
        events.clear();
        poller
            .wait(&mut events, timeout)
            .map_err(|e| io::Error::new(e.kind(), format!("epoll_wait failed: {e}")))?;
        let mut wakers = Vec::new();
        // `Poller::notify` shows as no event at all on Windows: re-open the
        // notifier after every wait (anything queued before is seen next).
        #[cfg(windows)]
        notifier.reset();
        #[cfg(unix)]
        let mut woke = false;
        {
            let mut sources = self.inner.sources.borrow_mut();
            for ev in events.iter() {
                #[cfg(unix)]
                if ev.key == NOTIFY_KEY {
                    woke = true;
                    continue;
                }
                let Some(st) = sources.get_mut(ev.key) else {
                    continue;
                };
                // Hang-up and error show as readable and writable in polling.
                if ev.readable {
                    st.read_ready = true;
                    wakers.extend(st.reader.take());
                }
                if ev.writable {
                    st.write_ready = true;
                    wakers.extend(st.writer.take());
                }
                // One-shot disarmed the whole descriptor: re-arm for whoever
                // is still waiting.
                if st.reader.is_some() || st.writer.is_some() {
                    let interest = interest_of(ev.key, st);
                    // SAFETY: the fd is registered and open while its Source lives.
                    let fd = unsafe { borrow_raw(st.fd) };
                    let _ = poller.modify(fd, interest);
                }
            }
        }
        drop(events);
        #[cfg(unix)]
        if woke {
            notifier.reset();
            // SAFETY: the notifier fd is open until the loop closes, and a
            // closed loop's selector never gets here (no poller).
            let fd = unsafe { BorrowedFd::borrow_raw(self.inner.notify_fd) };
            poller
                .modify(fd, Event::readable(NOTIFY_KEY))
                .map_err(|e| {
                    io::Error::new(e.kind(), format!("cannot re-arm the wake-up fd: {e}"))
                })?;
        }
        for w in wakers {
            w.wake();
        }
        Ok(())
    }

    /// The loop is closing: wakes every reader and writer still waiting, so
    /// that their tasks are dropped (their loop refuses to run them) and
    /// release their sources. Without this, a task waiting on a descriptor
    /// and the selector would keep each other alive forever through the
    /// stored waker. Then closes the epoll instance (its descriptor does not
    /// wait for the last handle to the loop). Waiting or registering
    /// afterwards fails at once.
    pub(crate) fn shutdown(&self) {
        self.inner.shut_down.set(true);
        // No need to deregister anything: closing the instance drops every
        // registration (the notifier's and the sources' still alive).
        let poller = self.inner.poller.borrow_mut().take();
        drop(poller);
        let wakers: Vec<Waker> = self
            .inner
            .sources
            .borrow_mut()
            .iter_mut()
            .flat_map(|(_, st)| [st.reader.take(), st.writer.take()])
            .flatten()
            .collect();
        for w in wakers {
            w.wake();
        }
    }

    /// Registers `fd` (a socket on Windows) with no interest yet.
    ///
    /// # Safety
    ///
    /// `fd` must stay open until the returned [`Source`] is dropped.
    #[cfg_attr(windows, allow(dead_code))] // no socket API uses it on Windows yet
    pub(crate) unsafe fn register(&self, fd: RawSource) -> io::Result<Source> {
        let poller = self.poller("cannot register a descriptor")?;
        let key = self.inner.sources.borrow_mut().insert(SourceState {
            fd,
            ..SourceState::default()
        });
        // SAFETY: forwarded from this function's contract.
        if let Err(e) = unsafe { poller.add(fd, Event::none(key)) } {
            self.inner.sources.borrow_mut().remove(key);
            return Err(io::Error::new(
                e.kind(),
                format!("cannot register fd {fd} with epoll: {e}"),
            ));
        }
        Ok(Source {
            selector: self.clone(),
            key,
        })
    }
}

fn interest_of(key: usize, st: &SourceState) -> Event {
    let mut ev = Event::none(key);
    ev.readable = st.reader.is_some();
    ev.writable = st.writer.is_some();
    ev
}

/// The error for using a selector whose loop is closed.
fn closed_error(doing: &str) -> io::Error {
    io::Error::other(format!(
        "{doing}: the event loop is closed (its epoll instance was released)"
    ))
}

#[cfg(unix)]
impl Drop for Inner {
    fn drop(&mut self) {
        // Only a selector dropped without its loop closing still has its
        // poller; the notifier fd is then still open (the loop's shared
        // state is dropped after its backend).
        if let Some(poller) = self.poller.get_mut().take() {
            // SAFETY: see above.
            let fd = unsafe { BorrowedFd::borrow_raw(self.notify_fd) };
            let _ = poller.delete(fd);
        }
    }
}

/// A descriptor registered with a selector loop.
#[cfg_attr(windows, allow(dead_code))] // no socket API uses it on Windows yet
pub(crate) struct Source {
    selector: Selector,
    key: usize,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source").field("key", &self.key).finish()
    }
}

#[cfg_attr(windows, allow(dead_code))] // no socket API uses it on Windows yet
impl Source {
    /// Ready if an event in direction `dir` arrived since the last time this
    /// returned ready; otherwise arms interest and stores the waker.
    pub(crate) fn poll_ready(&self, cx: &mut Context<'_>, dir: Interest) -> Poll<io::Result<()>> {
        if self.selector.inner.shut_down.get() {
            return Poll::Ready(Err(io::Error::other("the event loop is closed")));
        }
        let mut sources = self.selector.inner.sources.borrow_mut();
        let Some(st) = sources.get_mut(self.key) else {
            return Poll::Ready(Err(io::Error::other("source is no longer registered")));
        };
        let (ready, slot) = match dir {
            Interest::Read => (&mut st.read_ready, &mut st.reader),
            Interest::Write => (&mut st.write_ready, &mut st.writer),
        };
        if std::mem::take(ready) {
            return Poll::Ready(Ok(()));
        }
        let was_waiting = slot.is_some();
        *slot = Some(cx.waker().clone());
        if !was_waiting {
            let interest = interest_of(self.key, st);
            // SAFETY: the fd is open while this Source lives (register's contract).
            let fd = unsafe { borrow_raw(st.fd) };
            let poller = self.selector.inner.poller.borrow();
            let Some(poller) = poller.as_ref() else {
                return Poll::Ready(Err(closed_error("cannot wait for IO")));
            };
            if let Err(e) = poller.modify(fd, interest) {
                return Poll::Ready(Err(io::Error::new(
                    e.kind(),
                    format!("cannot arm epoll interest: {e}"),
                )));
            }
        }
        Poll::Pending
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        let st = self
            .selector
            .inner
            .sources
            .borrow_mut()
            .try_remove(self.key);
        // A closed loop's epoll instance is gone, and its registrations
        // with it: nothing to deregister.
        let poller = self.selector.inner.poller.borrow();
        if let (Some(st), Some(poller)) = (st, poller.as_ref()) {
            // SAFETY: the fd is still open (register's contract).
            let fd = unsafe { borrow_raw(st.fd) };
            let _ = poller.delete(fd);
        }
    }
}
