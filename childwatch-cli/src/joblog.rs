//! `--joblog FILE`: one tab-separated line per finished job, in GNU
//! parallel's format, so tools that read parallel's joblog read ours.
//!
//! Columns: `Seq Host Starttime JobRuntime Send Receive Exitval Signal
//! Command`. Host is `:` (this machine), Starttime is seconds since the
//! epoch with millisecond precision, Send the bytes of the job's `--pipe`
//! block (else 0: no remote hosts) and Receive the bytes the job wrote to
//! stdout, as in GNU parallel. As there,
//! Exitval is -1 for a job that we killed (timeout, Ctrl-C) and Signal the
//! signal that ended it.
//!
//! `--resume` and `--resume-failed` read an existing joblog back
//! ([`finished`]) and append to it.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
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
    pub seq: u64,
    /// When the job started.
    pub start: SystemTime,
    /// How long it ran.
    pub runtime: Duration,
    /// Exit code; -1 when we killed it.
    pub exitval: i32,
    /// The signal that ended it, else 0.
    pub signal: i32,
    /// Bytes given to the job's stdin (`--pipe`), else 0.
    pub send: u64,
    /// Bytes of stdout.
    pub receive: u64,
    /// The command line (bytes: arguments need not be UTF-8).
    pub command: &'a [u8],
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

    /// Opens `path` to append to it (`--resume`), writing the header when
    /// the file is new or empty.
    pub fn append(path: &Path) -> Result<JobLog> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot write the joblog {}", path.display()))?;
        let empty = file.metadata().map(|m| m.len() == 0).unwrap_or(true);
        let mut log = JobLog {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
        };
        if empty {
            writeln!(log.out, "{HEADER}")
                .and_then(|_| log.out.flush())
                .with_context(|| format!("cannot write the joblog {}", path.display()))?;
        }
        Ok(log)
    }

    /// Appends one line and flushes it.
    pub fn record(&mut self, e: &Entry<'_>) -> Result<()> {
        let start = e
            .start
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let command: Vec<u8> = e
            .command
            .iter()
            .map(|&b| if b == b'\n' || b == b'\t' { b' ' } else { b })
            .collect();
        write!(
            self.out,
            "{}\t:\t{:14.3}\t{:10.3}\t{}\t{}\t{}\t{}\t",
            e.seq,
            start,
            e.runtime.as_secs_f64(),
            e.send,
            e.receive,
            e.exitval,
            e.signal,
        )
        .and_then(|_| self.out.write_all(&command))
        .and_then(|_| self.out.write_all(b"\n"))
        .and_then(|_| self.out.flush())
        .with_context(|| format!("cannot write the joblog {}", self.path.display()))
    }
}

/// The sequence numbers a previous run's joblog at `path` records as done:
/// every one (`--resume`), or only those that succeeded (`--resume-failed`,
/// so failed ones run again). A missing file means nothing was done.
pub fn finished(path: &Path, only_succeeded: bool) -> Result<HashSet<u64>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashSet::new()),
        Err(e) => {
            return Err(e).with_context(|| format!("cannot read the joblog {}", path.display()));
        }
    };
    let mut done = HashSet::new();
    for line in BufReader::new(file).split(b'\n') {
        let line = line.with_context(|| format!("cannot read the joblog {}", path.display()))?;
        let cols: Vec<&[u8]> = line.split(|&b| b == b'\t').collect();
        let num = |i: usize| -> Option<i64> {
            std::str::from_utf8(cols.get(i)?).ok()?.trim().parse().ok()
        };
        let Some(seq) = num(0) else { continue };
        let ok = num(6) == Some(0) && num(7) == Some(0);
        if seq > 0 && (ok || !only_succeeded) {
            done.insert(seq as u64);
        }
    }
    Ok(done)
}
