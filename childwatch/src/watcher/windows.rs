//! `WindowsChildWatcher`: child exits on Windows through the OS thread pool.
//!
//! How it learns of an exit: `add_child_handler` opens the process
//! (`OpenProcess` with `SYNCHRONIZE | PROCESS_QUERY_LIMITED_INFORMATION`) and
//! registers a one-shot thread-pool wait on it (`RegisterWaitForSingleObject`
//! with `WT_EXECUTEONLYONCE`). When the process ends its handle is
//! signalled, the pool runs our callback, which reads the exit code
//! (`GetExitCodeProcess`) and hands it to the shared registry, which
//! delivers it to the loop that was running at registration (asyncio's
//! `call_soon_threadsafe` rule) — the same path CPython's
//! `IocpProactor.wait_for_handle` uses, without needing any loop: the watcher
//! works with no loop at all.
//!
//! Cost: one process handle and one pool wait per live child, O(1) per exit;
//! Windows multiplexes up to 63 waits per pool thread, so 1,000 children
//! cost about 16 pool threads, none of them ours. Choose it always on
//! Windows: it is the default there (`get_child_watcher()`).
//!
//! The returncode is the process's exit code (`TerminateProcess(h, 1)` gives
//! 1); codes above `i32::MAX` (NTSTATUS crash codes such as `0xC0000005`)
//! wrap to negative numbers. A pid that names no process (unknown, or gone
//! with no handle left open) gives 255 with a warning; one that exists but
//! cannot be opened (access denied) is an error of `add_child_handler`.
//!
//! Races: the pool callback, `close`/`remove_child_handler` and the
//! registering thread agree through a small lock on each wait which of them
//! unregisters it and closes the process handle, so that happens exactly
//! once and never while a callback runs; a callback never blocks on its own
//! wait.

use std::collections::HashMap;
use std::ffi::c_void;
use std::io;
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use windows_sys::Win32::Foundation::{
    CloseHandle, ERROR_INVALID_PARAMETER, HANDLE, INVALID_HANDLE_VALUE,
};
use windows_sys::Win32::System::Threading::{
    GetExitCodeProcess, INFINITE, OpenProcess, PROCESS_QUERY_LIMITED_INFORMATION,
    PROCESS_SYNCHRONIZE, RegisterWaitForSingleObject, UnregisterWaitEx, WT_EXECUTEONLYONCE,
};

use super::registry::{Added, Registry, Target};
use super::status::lost;
use super::{ChildCallback, ChildWatcher, Pid};
use crate::event_loop::EventLoop;

/// Who still has to act on one wait.
#[derive(Default)]
struct WaitState {
    /// The pool wait handle, once `RegisterWaitForSingleObject` returned it
    /// and until someone takes it to unregister.
    wait: Option<usize>,
    /// Claimed by the callback (the child exited) or a canceller.
    done: bool,
}

/// One watched child: its process handle and its pool wait.
struct Wait {
    pid: Pid,
    /// Process handle (as an address: `HANDLE` is a raw pointer).
    process: usize,
    watcher: Weak<Inner>,
    state: Mutex<WaitState>,
}

impl Wait {
    fn lock(&self) -> MutexGuard<'_, WaitState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Closes the process handle, forgets the wait, and releases the reference
/// the registration held. Runs exactly once per registered wait, by whoever
/// unregistered it.
///
/// # Safety
/// `raw` is the registration's `Arc::into_raw` reference; the wait is
/// unregistered (no callback can start any more).
unsafe fn finish(raw: *const Wait) {
    // SAFETY: the registration's reference, released exactly once here.
    let w = unsafe { Arc::from_raw(raw) };
    // SAFETY: we own the process handle; nothing waits on it any more.
    unsafe { CloseHandle(w.process as HANDLE) };
    if let Some(inner) = w.watcher.upgrade() {
        let mut waits = inner.lock_waits();
        if waits.get(&w.pid).is_some_and(|x| Arc::ptr_eq(x, &w)) {
            waits.remove(&w.pid);
        }
    }
}

/// Unregisters `wait` and blocks until a callback in progress returned.
/// Never call it from the wait's own callback.
fn unregister_blocking(wait: usize) {
    // SAFETY: a wait handle from a successful registration, used once.
    if unsafe { UnregisterWaitEx(wait as HANDLE, INVALID_HANDLE_VALUE) } == 0 {
        tracing::warn!("UnregisterWaitEx failed: {}", io::Error::last_os_error());
    }
}

/// The pool callback: the process ended.
///
/// # Safety
/// Only called by Windows, with the context given at registration.
unsafe extern "system" fn on_exit(ctx: *mut c_void, _timed_out: bool) {
    let raw = ctx as *const Wait;
    // SAFETY: the registration's reference keeps the Wait alive until
    // `finish`, which runs after this point in every path.
    let w = unsafe { &*raw };
    let wait = {
        let mut st = w.lock();
        if st.done {
            return; // cancelled: the canceller finishes
        }
        st.done = true;
        st.wait.take()
    };
    let mut code: u32 = 0;
    // SAFETY: the process handle is open until `finish`.
    let rc = if unsafe { GetExitCodeProcess(w.process as HANDLE, &mut code) } != 0 {
        code as i32
    } else {
        lost(w.pid)
    };
    let pid = w.pid;
    let watcher = w.watcher.upgrade();
    if let Some(wait) = wait {
        // Our own wait: only the non-blocking unregister is allowed here.
        // SAFETY: the handle came from the registration and is used once.
        unsafe { UnregisterWaitEx(wait as HANDLE, ptr::null_mut()) };
        // SAFETY: unregistered, and this is the registration's reference.
        unsafe { finish(raw) };
    }
    // Else the registering thread has not stored the wait handle yet: it
    // sees `done` and unregisters and finishes (after we return).
    if let Some(inner) = watcher {
        if !inner.closed.load(Ordering::SeqCst) {
            inner.registry.exited(pid, rc, false);
        }
    }
}

#[derive(Default)]
struct Inner {
    registry: Registry,
    closed: AtomicBool,
    waits: Mutex<HashMap<Pid, Arc<Wait>>>,
}

impl Inner {
    fn lock_waits(&self) -> MutexGuard<'_, HashMap<Pid, Arc<Wait>>> {
        self.waits.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops waiting for `w` unless its callback already claimed it.
    fn cancel(w: &Arc<Wait>) {
        let wait = {
            let mut st = w.lock();
            if st.done {
                return;
            }
            st.done = true;
            st.wait.take()
        };
        if let Some(wait) = wait {
            unregister_blocking(wait);
            // SAFETY: unregistered; the registration's reference is still
            // outstanding (the callback did not claim it).
            unsafe { finish(Arc::as_ptr(w)) };
        }
        // Else the registering thread finishes when it sees `done`.
    }
}

impl Drop for Inner {
    /// A watcher dropped without `close()` still releases its waits and
    /// process handles (callbacks already claimed finish on their own).
    fn drop(&mut self) {
        let waits: Vec<Arc<Wait>> = self
            .waits
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(_, w)| w)
            .collect();
        for w in waits {
            Inner::cancel(&w);
        }
    }
}

/// Watches each child with a one-shot wait on the OS thread pool; the
/// default watcher on Windows. See the module docs.
#[derive(Clone)]
pub struct WindowsChildWatcher {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for WindowsChildWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WindowsChildWatcher")
            .field("watched", &self.watched())
            .field("closed", &self.inner.closed.load(Ordering::SeqCst))
            .finish()
    }
}

impl WindowsChildWatcher {
    /// A new, active watcher.
    pub fn new() -> io::Result<WindowsChildWatcher> {
        Ok(WindowsChildWatcher {
            inner: Arc::new(Inner::default()),
        })
    }

    /// Number of children with an open process handle and a pending wait.
    pub fn watched(&self) -> usize {
        self.inner.lock_waits().len()
    }

    fn watch(&self, pid: Pid) -> io::Result<()> {
        // SAFETY: a plain call; the pid was checked to be positive.
        let process = unsafe {
            OpenProcess(
                PROCESS_SYNCHRONIZE | PROCESS_QUERY_LIMITED_INFORMATION,
                0,
                pid as u32,
            )
        };
        if process.is_null() {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(ERROR_INVALID_PARAMETER as i32) {
                // No such process (any more): its status is lost.
                self.inner.registry.exited(pid, lost(pid), false);
                return Ok(());
            }
            // It exists but cannot be watched (e.g. access denied): an
            // error for the caller rather than a made-up exit.
            self.inner.registry.remove(pid);
            return Err(io::Error::new(
                e.kind(),
                format!("cannot open pid {pid} to watch it (OpenProcess): {e}"),
            ));
        }
        let w = Arc::new(Wait {
            pid,
            process: process as usize,
            watcher: Arc::downgrade(&self.inner),
            state: Mutex::new(WaitState::default()),
        });
        self.inner.lock_waits().insert(pid, Arc::clone(&w));
        let raw = Arc::into_raw(Arc::clone(&w));
        let mut wait: HANDLE = ptr::null_mut();
        // SAFETY: `raw` stays valid until `finish`, after the wait is
        // unregistered; the process handle stays open until then too.
        let ok = unsafe {
            RegisterWaitForSingleObject(
                &mut wait,
                process,
                Some(on_exit),
                raw as *const c_void,
                INFINITE,
                WT_EXECUTEONLYONCE,
            )
        };
        if ok == 0 {
            let e = io::Error::last_os_error();
            // SAFETY: never registered: close the handle, drop the reference.
            unsafe { finish(raw) };
            self.inner.registry.remove(pid);
            return Err(io::Error::new(
                e.kind(),
                format!("cannot register a wait for pid {pid}: {e}"),
            ));
        }
        let mut st = w.lock();
        if st.done {
            // The child exited (or close/remove ran) before we could store
            // the wait handle: nobody else can unregister it.
            drop(st);
            unregister_blocking(wait as usize);
            // SAFETY: unregistered; the registration's reference is ours to release.
            unsafe { finish(raw) };
        } else {
            st.wait = Some(wait as usize);
        }
        Ok(())
    }
}

impl ChildWatcher for WindowsChildWatcher {
    fn add_child_handler(&self, pid: Pid, callback: ChildCallback) -> io::Result<()> {
        if pid <= 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid pid {pid}: a child pid is a positive number"),
            ));
        }
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(io::Error::other(
                "the WindowsChildWatcher is closed; set a new child watcher",
            ));
        }
        match self.inner.registry.add(pid, callback, Target::current()) {
            Added::New => self.watch(pid),
            Added::Replaced | Added::Delivered => Ok(()),
        }
    }

    fn remove_child_handler(&self, pid: Pid) -> bool {
        let removed = self.inner.registry.remove(pid);
        if removed {
            let w = self.inner.lock_waits().get(&pid).cloned();
            if let Some(w) = w {
                Inner::cancel(&w);
            }
        }
        removed
    }

    fn attach_loop(&self, _lp: Option<&EventLoop>) {}

    fn is_active(&self) -> bool {
        !self.inner.closed.load(Ordering::SeqCst)
    }

    fn close(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        self.inner.registry.clear();
        let waits: Vec<Arc<Wait>> = self.inner.lock_waits().values().cloned().collect();
        for w in waits {
            Inner::cancel(&w);
        }
    }
}
