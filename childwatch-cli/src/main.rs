//! The `childwatch` command: `run` (a parallel job runner on one childwatch
//! event loop), `bench` (every watcher and the peers against raw baselines)
//! and `watchers` (what this machine supports).
//!
//! Errors are one line on stderr and a non-zero exit status: 2 for bad
//! usage (from clap), 255 for anything that stops a command before it runs;
//! `run` otherwise exits with its jobs' status.

// The command drives Linux child processes (posix_spawn, pidfds, process
// groups, io_uring); elsewhere it only says so.
#[cfg(target_os = "linux")]
mod bench;
#[cfg(target_os = "linux")]
mod input;
#[cfg(target_os = "linux")]
mod joblog;
#[cfg(target_os = "linux")]
mod output;
#[cfg(target_os = "linux")]
mod proc_api;
#[cfg(target_os = "linux")]
mod run;
#[cfg(target_os = "linux")]
mod template;
#[cfg(target_os = "linux")]
mod watchers;

use std::process::ExitCode;

#[cfg(not(target_os = "linux"))]
fn main() -> ExitCode {
    eprintln!("childwatch: error: this command is only available on Linux");
    ExitCode::from(255)
}

#[cfg(target_os = "linux")]
use clap::{Parser, Subcommand};

#[cfg(target_os = "linux")]
#[derive(Debug, Parser)]
#[command(
    name = "childwatch",
    version,
    about = "Run jobs in parallel and benchmark child watchers"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[cfg(target_os = "linux")]
#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run jobs in parallel (like xargs -P / GNU parallel).
    ///
    /// Replacement strings, input sources and quoting are explained at the
    /// end of `childwatch run --help`.
    Run(run::RunArgs),
    /// Benchmark every watcher, both loop kinds and the peers.
    Bench(bench::BenchArgs),
    /// List the watchers and loop kinds this machine supports.
    Watchers,
    /// One scale measurement in a fresh process (used by `bench`).
    #[command(hide = true)]
    BenchScaleOne {
        /// Runner id.
        who: String,
        /// Live children.
        n: usize,
    },
}

#[cfg(target_os = "linux")]
fn main() -> ExitCode {
    std::panic::set_hook(Box::new(|info| {
        eprintln!("childwatch: internal error: {info}");
    }));
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Run(a) => run::command(a),
        Cmd::Bench(a) => bench::command(a),
        Cmd::Watchers => watchers::command().map(|()| 0),
        Cmd::BenchScaleOne { who, n } => bench::scale_one(&who, n),
    };
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("childwatch: error: {msg}");
            ExitCode::from(255)
        }
    }
}
