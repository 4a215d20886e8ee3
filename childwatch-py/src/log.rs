//! Forwards the library's `tracing` events to the Python logger `childwatch`.
//!
//! A minimal `tracing` subscriber (no spans, levels INFO and above) installed
//! as the process-wide default when the module is imported, unless the
//! process already has one. Each event becomes one record of the logger
//! `childwatch` (the message, and the Rust target as `record.rust_target`),
//! logged from the thread that emitted it with the GIL taken for that call
//! only, through the package's `_log_from_rust` helper.
//! That is safe because the binding never holds the GIL while it calls into
//! the library (see the crate docs). While the interpreter shuts down, when
//! Python can no longer be called, the event goes to stderr.

use std::fmt::{self, Write as _};

use pyo3::prelude::*;
use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

/// The subscriber; see the module docs.
struct PyLog;

/// Collects an event's `message` and other fields into one line.
#[derive(Default)]
struct Line(String);

impl Visit for Line {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if !self.0.is_empty() {
            self.0.push(' ');
        }
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, "{}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            if !self.0.is_empty() {
                self.0.push(' ');
            }
            self.0.push_str(value);
        } else {
            self.record_debug(field, &value);
        }
    }
}

fn python_level(level: &Level) -> i32 {
    match *level {
        Level::ERROR => 40,
        Level::WARN => 30,
        Level::INFO => 20,
        Level::DEBUG => 10,
        Level::TRACE => 5,
    }
}

fn forward(level: &Level, target: &str, message: &str) {
    let sent = Python::try_attach(|py| -> PyResult<()> {
        // The package's helper drops the `_DummyThread` that logging would
        // otherwise leave behind for a Rust thread; plain logging if the
        // package is not importable (the native module used on its own).
        let args = (python_level(level), message.to_owned(), target.to_owned());
        match py.import("childwatch._watchers") {
            Ok(m) => m.call_method1("_log_from_rust", args)?,
            Err(_) => py
                .import("logging")?
                .call_method1("getLogger", ("childwatch",))?
                .call_method1("log", (args.0, "%s", args.1))?,
        };
        Ok(())
    });
    match sent {
        Some(Ok(())) => {}
        Some(Err(_)) | None => eprintln!("childwatch: {level}: {message} ({target})"),
    }
}

impl Subscriber for PyLog {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.is_event() && *metadata.level() <= Level::INFO
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(LevelFilter::INFO)
    }

    fn new_span(&self, _span: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }

    fn record(&self, _span: &Id, _values: &Record<'_>) {}

    fn record_follows_from(&self, _span: &Id, _follows: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut line = Line::default();
        event.record(&mut line);
        let meta = event.metadata();
        forward(meta.level(), meta.target(), &line.0);
    }

    fn enter(&self, _span: &Id) {}

    fn exit(&self, _span: &Id) {}
}

/// Installs [`PyLog`] as the process-wide default subscriber (once; a
/// subscriber the process already has is kept).
pub(crate) fn install() {
    let _ = tracing::subscriber::set_global_default(PyLog);
}

/// Emits one `tracing` event at `level` ("error", "warn", "info"), as the
/// library would: lets the tests check the forwarding.
#[pyfunction]
pub(crate) fn _emit_log(py: Python<'_>, level: &str, message: String) {
    py.detach(|| match level {
        "error" => tracing::error!("{message}"),
        "info" => tracing::info!("{message}"),
        _ => tracing::warn!("{message}"),
    });
}
