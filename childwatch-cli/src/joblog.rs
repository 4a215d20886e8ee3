//! `--joblog FILE`: one tab-separated line per finished job, in GNU
//! parallel's format, so tools that read parallel's joblog read ours.
//!
//! Columns: `Seq Host Starttime JobRuntime Send Receive Exitval Signal
//! Command`. Host is `:` (this machine), Starttime is seconds since the
//! epoch with millisecond precision, Send and Receive (bytes of files
//! transferred to remote hosts) are 0. As in GNU parallel, Exitval is -1
//! for a job that we killed (timeout, Ctrl-C) and Signal the signal that
//! ended it.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

/// GNU parallel's joblog header.
pub const HEADER: &str =
    "Seq\tHost\tStarttime\tJobRuntime\tSend\tReceive\tExitval\tSignal\tCommand";

/// An open joblog.
#[derive(Debug)]
pub struct JobLog {
    path: PathBuf,
    out: BufWriter<File>,
}

/// One finished job, as the joblog records it.
#[derive(Debug)]
pub struct Entry<'a> {
    /// Sequence number.
    pub seq: usize,
    /// When the job started.
    pub start: SystemTime,
    /// How long it ran.
    pub runtime: Duration,
    /// Exit code; -1 when we killed it.
    pub exitval: i32,
    /// The signal that ended it, else 0.
    pub signal: i32,
    /// The command line.
    pub command: &'a str,
}

impl JobLog {
    /// Creates (truncates) `path` and writes the header, so that a bad path
    /// fails before any job starts.
    pub fn create(path: &Path) -> Result<JobLog> {
        let file = File::create(path)
            .with_context(|| format!("cannot write the joblog {}", path.display()))?;
        let mut log = JobLog {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
        };
        writeln!(log.out, "{HEADER}")
            .and_then(|_| log.out.flush())
            .with_context(|| format!("cannot write the joblog {}", path.display()))?;
        Ok(log)
    }

    /// Appends one line and flushes it.
    pub fn record(&mut self, e: &Entry<'_>) -> Result<()> {
        let start = e
            .start
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        writeln!(
            self.out,
            "{}\t:\t{:14.3}\t{:10.3}\t0\t0\t{}\t{}\t{}",
            e.seq,
            start,
            e.runtime.as_secs_f64(),
            e.exitval,
            e.signal,
            e.command.replace(['\n', '\t'], " ")
        )
        .and_then(|_| self.out.flush())
        .with_context(|| format!("cannot write the joblog {}", self.path.display()))
    }
}
