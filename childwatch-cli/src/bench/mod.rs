//! `childwatch bench`: the performance scenarios of the design (throughput,
//! mixed, latency, scale) for every watcher on both loop kinds and for the
//! peers, in one run, each figure shown next to its ratio to the raw
//! baseline measured in the same run.
//!
//! Every runner implements [`Runner`]: start short children with N in
//! flight, hold long-lived ones while watched, kill and reap the held ones,
//! and time kill → exit notification. The scenarios are built from those
//! steps, so every runner is measured by the same procedure.
//!
//! The parts: `plan.rs` decides which runners and scenarios apply and at
//! which sizes; `measure.rs` runs them (`--repeat` times); `report.rs`
//! turns the figures into tables, JSON, CSV and an SVG chart; `targets.rs`
//! judges the design's targets (met, NOT met, within noise). This file
//! holds the runner interface and the command that ties them together.

mod measure;
mod ours;
mod peers;
mod plan;
mod raw;
mod report;
mod sys;
mod targets;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use childwatch::LoopKind;
use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::watchers::WatcherName;
use sys::Program;

pub use measure::scale_one;

/// What one runner must do; each scenario is a sequence of these steps.
pub trait Runner {
    /// Runs `n` short children (`/bin/true`) with `inflight` at once; the
    /// wall time until all were reaped.
    fn run_short(&mut self, n: usize, inflight: usize) -> Result<Duration>;
    /// Starts `k` long-lived children and watches them.
    fn hold(&mut self, k: usize) -> Result<()>;
    /// SIGKILLs every held child and waits until each exit was reported.
    fn release(&mut self) -> Result<Released>;
    /// Kill → exit-notification time, once per sample (a fresh child each).
    fn latency(&mut self, samples: usize) -> Result<Vec<Duration>>;
}

/// What [`Runner::release`] measured.
#[derive(Debug)]
pub struct Released {
    /// From the first kill to the last reported exit.
    pub time: Duration,
    /// Exits reported with the right status (-SIGKILL).
    pub reported: usize,
    /// Children that were held.
    pub held: usize,
}

/// A scenario of the design's performance targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// N × /bin/true, 64 in flight.
    Throughput,
    /// Short children while N long-lived ones are watched.
    Mixed,
    /// N live children under RLIMIT_NOFILE 1024; kill + reap all.
    Scale,
    /// kill → callback, with 0 and N other children watched.
    Latency,
}

/// Options of `childwatch bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Scenarios to run (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub scenario: Vec<Scenario>,
    /// Size of every selected scenario: children spawned (throughput),
    /// long-lived and short children (mixed), live children (scale), other
    /// watched children (latency).
    #[arg(long, value_parser = parse_n)]
    pub n: Option<usize>,
    /// Runners to measure, comma-separated: threaded, safe, fast, multiloop,
    /// pidfd, uring, tokio, async-process, std-threads (default: all; the raw
    /// baselines always run).
    #[arg(long, value_delimiter = ',')]
    pub watchers: Vec<String>,
    /// Loop kinds for the childwatch watchers (default: both).
    #[arg(long = "loop", value_enum, value_delimiter = ',')]
    pub loops: Vec<crate::watchers::LoopName>,
    /// Print the results as JSON on stdout instead of the tables.
    #[arg(long, conflicts_with = "csv")]
    pub json: bool,
    /// Print the results as CSV on stdout (one line per runner, scenario
    /// and figure) instead of the tables.
    #[arg(long)]
    pub csv: bool,
    /// Also draw the results as an SVG chart to FILE: one panel per
    /// scenario, the runners side by side with their spread, the raw
    /// baseline as a line.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Measure each figure N times and report the median and the spread
    /// (default: 3; 1 with --quick).
    #[arg(long, value_name = "N", value_parser = parse_n)]
    pub repeat: Option<usize>,
    /// Tiny sizes (for tests and a first look).
    #[arg(long, conflicts_with = "full")]
    pub quick: bool,
    /// The design's sizes (2,000 spawns; 1,000 + 1,000 mixed; 1,000 others
    /// for latency; 10,000 live children for scale, on both loop kinds).
    /// Takes a few minutes, where the default run takes about a minute.
    #[arg(long)]
    pub full: bool,
}

fn parse_n(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("'{s}' is not a positive number")),
    }
}

pub(crate) const PEERS: [&str; 3] = ["tokio", "async-process", "std-threads"];

/// A runner the bench measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Who {
    Raw,
    RawPidfd,
    Ours(WatcherName, LoopKind),
    Tokio,
    AsyncProcess,
    StdThreads,
}

impl Who {
    /// The name shown in tables.
    pub(crate) fn label(self) -> String {
        match self {
            Who::Raw => "raw posix_spawn+waitpid".into(),
            Who::RawPidfd => "raw pidfd+epoll".into(),
            Who::Ours(w, k) => format!("{w}/{k}"),
            Who::Tokio => "tokio (current_thread)".into(),
            Who::AsyncProcess => "async-process".into(),
            Who::StdThreads => "std::process + thread".into(),
        }
    }

    /// A stable id, for the scale child process's command line.
    pub(crate) fn id(self) -> String {
        match self {
            Who::Raw => "raw".into(),
            Who::RawPidfd => "raw-pidfd".into(),
            Who::Ours(w, k) => format!("{w}/{k}"),
            Who::Tokio => "tokio".into(),
            Who::AsyncProcess => "async-process".into(),
            Who::StdThreads => "std-threads".into(),
        }
    }

    /// The runner with this [`Who::id`].
    pub(crate) fn from_id(id: &str) -> Option<Who> {
        Some(match id {
            "raw" => Who::Raw,
            "raw-pidfd" => Who::RawPidfd,
            "tokio" => Who::Tokio,
            "async-process" => Who::AsyncProcess,
            "std-threads" => Who::StdThreads,
            _ => {
                let (w, k) = id.split_once('/')?;
                let w = WatcherName::from_str(w, false).ok()?;
                let k = match k {
                    "proactor" => LoopKind::Proactor,
                    "selector" => LoopKind::Selector,
                    _ => return None,
                };
                Who::Ours(w, k)
            }
        })
    }

    /// Whether the scale scenario applies (runners that hold neither a
    /// thread nor a descriptor per child beyond the budget, and the raw
    /// pidfd loop it is compared with).
    pub(crate) fn does_scale(self, scale_loop: LoopKind, all_loops: bool) -> bool {
        if let Who::Ours(_, k) = self {
            if !all_loops && k != scale_loop {
                return false;
            }
        }
        matches!(
            self,
            Who::RawPidfd
                | Who::Tokio
                | Who::Ours(
                    WatcherName::Uring | WatcherName::Pidfd | WatcherName::Threaded,
                    _
                )
        )
    }
}

/// The programs children run.
pub(crate) struct Programs {
    pub(crate) short: Program,
    pub(crate) long: Program,
}

impl Programs {
    /// `/bin/true` and `/bin/sleep 1000`.
    pub(crate) fn find() -> Result<Programs> {
        Ok(Programs {
            short: Program::find(&["/bin/true", "/usr/bin/true"], &["true"])?,
            long: Program::find(&["/bin/sleep", "/usr/bin/sleep"], &["sleep", "1000"])?,
        })
    }
}

pub(crate) fn make_runner(who: Who, p: &Programs) -> Result<Box<dyn Runner>> {
    let (s, l) = (&p.short, &p.long);
    Ok(match who {
        Who::Raw => Box::new(raw::Raw::new(s.clone(), l.clone())),
        Who::RawPidfd => Box::new(raw::RawPidfd::new(l.clone())?),
        Who::Ours(w, k) => Box::new(ours::Ours::new(k, w, s, l)?),
        Who::Tokio => Box::new(peers::Tokio::new(s, l)?),
        Who::AsyncProcess => Box::new(peers::AsyncProcess::new(s, l)),
        Who::StdThreads => Box::new(peers::StdThreads::new(s, l)),
    })
}

/// Runs `childwatch bench`.
pub fn command(args: BenchArgs) -> Result<i32> {
    let plan = plan::plan(&args)?;
    let programs = Programs::find()?;
    let progress = std::io::stderr().is_terminal().then(|| {
        let pb = ProgressBar::new(plan.steps() as u64);
        if let Ok(style) =
            ProgressStyle::with_template("[{elapsed}] {bar:30.cyan/blue} {pos}/{len} {wide_msg}")
        {
            pb.set_style(style);
        }
        pb
    });
    let rows = measure::run(&plan, &programs, progress.as_ref());
    if let Some(pb) = &progress {
        pb.finish_and_clear();
    }
    let report = report::Report::new(&plan, rows);
    if let Some(path) = &args.plot {
        report::plot(&report, path)?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if args.csv {
        report::write_csv(&report, std::io::stdout().lock())?;
    } else {
        report::print_tables(&report, &plan.sizes);
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runner_ids_round_trip() {
        for who in [
            Who::Raw,
            Who::RawPidfd,
            Who::Tokio,
            Who::AsyncProcess,
            Who::StdThreads,
            Who::Ours(WatcherName::MultiLoop, LoopKind::Proactor),
            Who::Ours(WatcherName::Pidfd, LoopKind::Selector),
        ] {
            assert_eq!(Who::from_id(&who.id()), Some(who));
        }
        assert_eq!(Who::from_id("pidfd/kqueue"), None);
    }
}
