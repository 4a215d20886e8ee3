//! `add_signal_handler` / `remove_signal_handler`.
//!
//! Unix only: on Windows every `add` is `ErrorKind::Unsupported`, as asyncio
//! raises `NotImplementedError` there (see the `cfg(windows)` part at the end).
//!
//! Signals are received through `signal-hook-registry`, which chains with any
//! other handler in the process instead of replacing it. The low-level action
//! only sets a bit in the loop's pending mask and writes the loop's eventfd
//! (both async-signal-safe); the user's callback then runs on the loop's own
//! thread at its next iteration, like asyncio's `_handle_signal`.
//!
//! Every loop that registers a signal gets it: two loops each with a SIGCHLD
//! handler are both called. Removing the last handler for a signal leaves
//! `signal-hook-registry`'s own (empty) handler installed, which then ignores
//! the signal: this is that crate's documented behaviour.

use std::cell::RefCell;
#[cfg(unix)]
use std::collections::HashMap;
use std::io;
use std::rc::Rc;
use std::sync::Arc;
#[cfg(unix)]
use std::sync::atomic::Ordering;

#[cfg(unix)]
use signal_hook_registry::SigId;

use super::Shared;

/// The highest signal number a handler can be installed for.
#[cfg(unix)]
const MAX_SIGNAL: i32 = 64;

type Callback = Rc<RefCell<Box<dyn FnMut()>>>;

#[cfg(unix)]
struct Registered {
    id: SigId,
    callback: Callback,
}

/// The signal handlers of one loop.
#[cfg(unix)]
#[derive(Default)]
pub(crate) struct SignalHandlers {
    map: HashMap<i32, Registered>,
}

#[cfg(unix)]
fn check_signal(sig: i32) -> io::Result<()> {
    if !(1..=MAX_SIGNAL).contains(&sig) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("signal number {sig} is out of range 1..={MAX_SIGNAL}"),
        ));
    }
    if [libc::SIGKILL, libc::SIGSTOP].contains(&sig) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("signal {sig} (SIGKILL/SIGSTOP) cannot be caught"),
        ));
    }
    if [libc::SIGILL, libc::SIGFPE, libc::SIGSEGV, libc::SIGBUS].contains(&sig) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("signal {sig} is a synchronous fault signal and cannot be handled on a loop"),
        ));
    }
    Ok(())
}

#[cfg(unix)]
impl SignalHandlers {
    /// Installs (or replaces) the handler for `sig`.
    pub(crate) fn add(
        &mut self,
        shared: &Arc<Shared>,
        sig: i32,
        f: Box<dyn FnMut()>,
    ) -> io::Result<()> {
        check_signal(sig)?;
        if let Some(reg) = self.map.get_mut(&sig) {
            reg.callback = Rc::new(RefCell::new(f));
            return Ok(());
        }
        let shared2 = Arc::clone(shared);
        let bit = 1u64 << (sig - 1);
        let action = move || {
            shared2.signals_pending.fetch_or(bit, Ordering::SeqCst);
            shared2.notifier.notify();
        };
        // SAFETY: the action is async-signal-safe: one atomic RMW on a
        // lock-free AtomicU64 and the notifier's atomic swap plus write(2).
        let id = unsafe { signal_hook_registry::register(sig, action) }.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot install a handler for signal {sig}: {e}"),
            )
        })?;
        self.map.insert(
            sig,
            Registered {
                id,
                callback: Rc::new(RefCell::new(f)),
            },
        );
        Ok(())
    }

    /// Removes the handler for `sig`; false if there was none.
    pub(crate) fn remove(&mut self, sig: i32) -> bool {
        match self.map.remove(&sig) {
            Some(reg) => {
                signal_hook_registry::unregister(reg.id);
                true
            }
            None => false,
        }
    }

    /// Removes every handler (loop close).
    pub(crate) fn clear(&mut self) {
        for (_, reg) in self.map.drain() {
            signal_hook_registry::unregister(reg.id);
        }
    }

    /// The callbacks to run for the signals in `pending` (a bit per signal).
    pub(crate) fn collect(&self, pending: u64, out: &mut impl FnMut(Callback)) {
        for sig in 1..=MAX_SIGNAL {
            if pending & (1u64 << (sig - 1)) != 0 {
                if let Some(reg) = self.map.get(&sig) {
                    out(Rc::clone(&reg.callback));
                }
            }
        }
    }

    /// Whether any handler is installed.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Windows: no handlers can be installed (asyncio's `NotImplementedError`).
#[cfg(windows)]
#[derive(Default)]
pub(crate) struct SignalHandlers {
    _none: (),
}

#[cfg(windows)]
impl SignalHandlers {
    /// Always `ErrorKind::Unsupported`.
    pub(crate) fn add(
        &mut self,
        _shared: &Arc<Shared>,
        sig: i32,
        _f: Box<dyn FnMut()>,
    ) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "add_signal_handler({sig}) is not supported on Windows (as in asyncio); \
                 use a console control handler or another IPC mechanism"
            ),
        ))
    }

    /// Nothing is ever installed.
    pub(crate) fn remove(&mut self, _sig: i32) -> bool {
        false
    }

    /// Nothing to clear.
    pub(crate) fn clear(&mut self) {}

    /// No signal is ever pending.
    pub(crate) fn collect(&self, _pending: u64, _out: &mut impl FnMut(Callback)) {}

    /// Always empty.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        true
    }
}
