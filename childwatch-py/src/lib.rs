//! `childwatch._native`: the Rust half of the `childwatch` Python package.
//!
//! This module is deliberately thin. It owns one childwatch watcher per
//! [`Watcher`] object and hands each child's exit to a Python callable; the
//! asyncio contract (which loop a callback goes to, what happens when that
//! loop is closed, `with watcher:`, `atexit`, `fork`) lives in the Python
//! half (`python/childwatch/_watchers.py`), where asyncio's own objects are.
//!
//! Two rules keep the two halves from deadlocking each other:
//!
//! * every call into the watcher runs with the GIL released
//!   ([`Python::detach`]): a watcher may block (joining its reaper thread in
//!   `close`) or take a lock that one of its threads holds while it waits for
//!   the GIL to deliver an exit;
//! * a watcher thread that delivers an exit attaches to the interpreter only
//!   for the Python call, and not at all once the interpreter is shutting
//!   down ([`Python::try_attach`]).
//!
//! The library reports unusual events (an unknown child reported as 255, a
//! watcher closed with children still running) through `tracing`; the `log`
//! module forwards them to the Python logger `childwatch`.

use std::sync::{Arc, Mutex, MutexGuard};

use childwatch::{ChildWatcher, Pid, ReturnCode, ThreadedChildWatcher};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

mod log;

/// The childwatch watcher behind a [`Watcher`].
#[derive(Debug)]
enum Native {
    #[cfg(target_os = "linux")]
    Uring(childwatch::UringChildWatcher),
    Threaded(ThreadedChildWatcher),
}

impl Native {
    fn watcher(&self) -> &dyn ChildWatcher {
        match self {
            #[cfg(target_os = "linux")]
            Native::Uring(w) => w,
            Native::Threaded(w) => w,
        }
    }
}

/// One childwatch watcher, seen from Python. Created by [`Watcher::uring`]
/// or [`Watcher::threaded`]; `None` inside once closed or forgotten.
#[pyclass(frozen, module = "childwatch._native")]
struct Watcher {
    kind: &'static str,
    native: Mutex<Option<Arc<Native>>>,
}

impl Watcher {
    fn new(kind: &'static str, native: Native) -> Watcher {
        Watcher {
            kind,
            native: Mutex::new(Some(Arc::new(native))),
        }
    }

    fn slot(&self) -> MutexGuard<'_, Option<Arc<Native>>> {
        self.native.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The watcher, or `None` once closed; the slot's lock is not held after.
    fn get(&self) -> Option<Arc<Native>> {
        self.slot().clone()
    }

    fn closed_error(&self) -> PyErr {
        PyRuntimeError::new_err(format!("this {} child watcher is closed", self.kind))
    }
}

/// Runs `deliver(pid, returncode)` from whichever thread learnt of the exit.
/// An exception it raises is reported through `sys.unraisablehook`; the
/// Python half catches everything it expects, so this is a last resort.
fn deliver(callback: Py<PyAny>, pid: Pid, rc: ReturnCode) {
    let mut callback = Some(callback);
    let ran = Python::try_attach(|py| {
        let cb = callback.take().expect("taken once");
        if let Err(e) = cb.call1(py, (pid, rc)) {
            e.write_unraisable(py, Some(cb.bind(py)));
        }
    });
    if ran.is_none() {
        // The interpreter is shutting down: nobody is left to tell, and
        // touching a reference count now is not allowed.
        std::mem::forget(callback);
    }
}

#[pymethods]
impl Watcher {
    /// A Uring watcher (io_uring pidfd polls within `fd_budget` descriptors,
    /// `IORING_OP_WAITID` beyond); `fd_budget=None` keeps the library's
    /// default (half of the soft `RLIMIT_NOFILE`).
    #[staticmethod]
    #[pyo3(signature = (fd_budget=None))]
    fn uring(py: Python<'_>, fd_budget: Option<usize>) -> PyResult<Watcher> {
        #[cfg(target_os = "linux")]
        {
            let w = py.detach(childwatch::UringChildWatcher::new)?;
            if let Some(n) = fd_budget {
                w.set_fd_budget(n);
            }
            Ok(Watcher::new("Uring", Native::Uring(w)))
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = (py, fd_budget);
            Err(pyo3::exceptions::PyNotImplementedError::new_err(
                "UringChildWatcher needs Linux",
            ))
        }
    }

    /// A Threaded watcher: one small Rust thread per child, blocked in
    /// `waitid(pid, WNOWAIT)`.
    #[staticmethod]
    fn threaded() -> PyResult<Watcher> {
        Ok(Watcher::new(
            "Threaded",
            Native::Threaded(ThreadedChildWatcher::new()?),
        ))
    }

    /// `"Uring"` or `"Threaded"`.
    #[getter]
    fn kind(&self) -> &'static str {
        self.kind
    }

    /// Watches `pid`; `deliver(pid, returncode)` is called once, from the
    /// thread that learns of the exit (inline if the child already exited).
    /// The same pid again replaces the callback.
    fn add(&self, py: Python<'_>, pid: Pid, deliver_cb: Py<PyAny>) -> PyResult<()> {
        let native = self.get().ok_or_else(|| self.closed_error())?;
        py.detach(move || {
            native
                .watcher()
                .add_child_handler(pid, Box::new(move |pid, rc| deliver(deliver_cb, pid, rc)))
        })?;
        Ok(())
    }

    /// Stops watching `pid`; `True` if it was watched.
    fn remove(&self, py: Python<'_>, pid: Pid) -> bool {
        match self.get() {
            Some(native) => py.detach(move || native.watcher().remove_child_handler(pid)),
            None => false,
        }
    }

    fn is_active(&self) -> bool {
        self.get().is_some_and(|n| n.watcher().is_active())
    }

    /// Closes the watcher (idempotent): cancels its waits, stops its threads,
    /// drops the callbacks not yet delivered.
    fn close(&self, py: Python<'_>) {
        let native = self.slot().take();
        if let Some(native) = native {
            py.detach(move || native.watcher().close());
        }
    }

    /// In a forked child: lets go of the watcher without closing it. Its
    /// threads do not exist in this process and its ring and descriptors are
    /// the parent's; closing would wait for threads that never end.
    fn forget(&self) {
        if let Some(native) = self.slot().take() {
            std::mem::forget(native);
        }
    }

    /// A host driver for this watcher: an object whose `fileno()` a host
    /// loop watches (`loop.add_reader`), whose `harvest()` reaps and
    /// delivers without blocking on the calling thread, and whose
    /// `add(pid, deliver)` registers a child whose wait that harvest
    /// completes. Uring only (`UringChildWatcher::host_driver`); `None` for
    /// Threaded, whose waiter threads deliver through `deliver`.
    fn host_driver(&self, py: Python<'_>) -> PyResult<Option<HostDriver>> {
        let Some(native) = self.get() else {
            return Err(self.closed_error());
        };
        #[cfg(target_os = "linux")]
        if let Native::Uring(w) = &*native {
            let driver = py.detach(|| w.host_driver())?;
            return Ok(Some(HostDriver {
                native: Arc::clone(&native),
                driver: Mutex::new(Some(driver)),
            }));
        }
        let _ = py;
        Ok(None)
    }

    /// Counters, for tests and the benchmark: `fd_budget`, `pidfds_held`,
    /// `waitids_pending`, `watched` (Uring); `waiter_threads` (Threaded).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("kind", self.kind)?;
        let Some(native) = self.get() else {
            d.set_item("closed", true)?;
            return Ok(d);
        };
        d.set_item("closed", false)?;
        match &*native {
            #[cfg(target_os = "linux")]
            Native::Uring(w) => {
                d.set_item("fd_budget", w.fd_budget())?;
                d.set_item("pidfds_held", w.pidfds_held())?;
                d.set_item("waitids_pending", w.waitids_pending())?;
                d.set_item("watched", w.watched())?;
            }
            Native::Threaded(w) => {
                d.set_item("waiter_threads", w.waiter_threads())?;
            }
        }
        Ok(d)
    }

    fn __repr__(&self) -> String {
        match self.get() {
            Some(n) => format!("<childwatch._native.Watcher {:?}>", n),
            None => format!("<childwatch._native.Watcher {} closed>", self.kind),
        }
    }
}

/// Whether this kernel supports the Uring watcher (io_uring with
/// `IORING_OP_WAITID`, Linux 6.7+, and pidfds). Probed once.
#[pyfunction]
fn uring_supported(py: Python<'_>) -> bool {
    #[cfg(target_os = "linux")]
    {
        py.detach(childwatch::UringChildWatcher::is_supported)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = py;
        false
    }
}

/// A Uring watcher's host driver, seen from Python (see
/// [`Watcher::host_driver`]): one per asyncio loop, harvested from that
/// loop's thread with `loop.add_reader(driver.fileno(), driver.harvest)`.
#[pyclass(frozen, module = "childwatch._native")]
struct HostDriver {
    native: Arc<Native>,
    #[cfg(target_os = "linux")]
    driver: Mutex<Option<childwatch::HostDriver>>,
}

impl HostDriver {
    #[cfg(target_os = "linux")]
    fn slot(&self) -> MutexGuard<'_, Option<childwatch::HostDriver>> {
        self.driver.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[pymethods]
impl HostDriver {
    /// The descriptor to watch: readable while completions wait.
    fn fileno(&self) -> PyResult<i32> {
        #[cfg(target_os = "linux")]
        if let Some(d) = self.slot().as_ref() {
            use std::os::fd::AsRawFd;
            return Ok(d.as_raw_fd());
        }
        Err(PyRuntimeError::new_err("this host driver is closed"))
    }

    /// Reaps and delivers what completed; never blocks. The callbacks run
    /// on this thread (they take the GIL themselves).
    fn harvest(&self, py: Python<'_>) {
        #[cfg(target_os = "linux")]
        py.detach(|| {
            if let Some(d) = self.slot().as_ref() {
                d.harvest();
            }
        });
    }

    /// Registers `pid` with the watcher; its wait is harvested by this
    /// driver while it lives.
    fn add(&self, py: Python<'_>, pid: Pid, deliver_cb: Py<PyAny>) -> PyResult<()> {
        let native = Arc::clone(&self.native);
        py.detach(move || {
            native
                .watcher()
                .add_child_handler(pid, Box::new(move |pid, rc| deliver(deliver_cb, pid, rc)))
        })?;
        Ok(())
    }

    /// Lets go of the driver: pending children go to the watcher's reaper
    /// thread. Idempotent.
    fn close(&self, py: Python<'_>) {
        #[cfg(target_os = "linux")]
        {
            let d = self.slot().take();
            py.detach(move || drop(d));
        }
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    log::install();
    m.add_class::<Watcher>()?;
    m.add_class::<HostDriver>()?;
    m.add_function(wrap_pyfunction!(uring_supported, m)?)?;
    m.add_function(wrap_pyfunction!(log::_emit_log, m)?)?;
    Ok(())
}
