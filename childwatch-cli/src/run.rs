//! `childwatch run`: a parallel job runner in the spirit of `xargs -P` and
//! GNU parallel, on one childwatch event loop.
//!
//! A reader thread streams the input sources into a bounded channel
//! (`input.rs`); `-j N` worker tasks on the loop — one per job slot — each
//! take the next record, build the command from the template
//! (`template.rs`), spawn it in its own process group with stdout and
//! stderr piped, and wait for its exit through the chosen child watcher.
//! A job is over when its process exits: its pipes are then read for at
//! most [`DRAIN`] more, so a background child that keeps them open cannot
//! hold the run. Output goes out as `output.rs` says (grouped by default,
//! in completion order or job order with `--keep-order`).
//!
//! `--timeout` sends SIGTERM to the job's process group, then SIGKILL after
//! the grace period. SIGINT/SIGTERM/SIGHUP to `childwatch` stop new jobs
//! and are forwarded to the running ones (a second one kills them); SIGTSTP
//! (Ctrl-Z) stops the jobs and then childwatch, SIGCONT resumes both. A
//! closed stdout (`| head`) stops the run with status 141, as a pipeline
//! killed by SIGPIPE. Exit status, GNU parallel's: 0 when every job
//! succeeded, else the number of failed jobs capped at 101, or as `--halt`
//! says; 128+signal when interrupted; 255 for errors before any job ran.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsString;
use std::io::IsTerminal;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;
use std::pin::pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use childwatch::{EventLoop, Handle, ReturnCode};
use futures_lite::{AsyncReadExt, FutureExt};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::input::{self, Grouping, Record, Source};
use crate::joblog::{self, Entry, JobLog};
use crate::output::{self, Mode, Stream, Which};
use crate::proc_api::{Command, Process, Stdio};
use crate::template::{self, Fill, Multi, Template};
use crate::watchers::{self, LoopName, WatcherName};

/// How long a job's pipes are still read after its process exited.
pub const DRAIN: Duration = Duration::from_millis(500);

const ABOUT_RS: &str = "\
Replacement strings (GNU parallel's), in any word of COMMAND:
  {}     the argument              {.}   without extension (dir/a.txt -> dir/a)
  {/}    base name (a.txt)         {//}  directory (dir)
  {/.}   base name, no extension   {#}   job sequence number   {%}  job slot
  {N} {N.} {N/} {N//} {N/.}        the same for the N-th input source (or
                                   the N-th argument with -n)
Without any, the arguments are appended. A value is never searched again for
replacement strings. A {...} made of digits . / # % + that is none of these is
an error; other braces ({print $1}) are kept as they are.

Input sources: ::: VALUES, :::: FILE, -a FILE; else standard input, one
argument per line (per NUL with -0). Several sources: every combination, the
last varying fastest. With no COMMAND each input line is a shell command.

Quoting: COMMAND's words run directly, without a shell, and values need no
quoting there. Where a shell will parse a value -- the SCRIPT of
`sh -c SCRIPT` (also bash, dash, zsh, ksh) or a COMMAND given as one word
with shell syntax ('gzip -dc {} | wc -l', run by /bin/sh -c) -- the value is
quoted as one shell word, as GNU parallel does. A SCRIPT that is only {}
(sh -c {}) runs the value as a script. -q pastes values in as they are.

Environment of each job: PARALLEL_SEQ, PARALLEL_JOBSLOT, PARALLEL_PID.

Examples:
  childwatch run -j 8 gzip -k ::: *.log
  childwatch run convert {} {.}.png ::: *.jpg
  find . -name '*.c' -print0 | childwatch run -0 -X wc -l
  printf 'make -C a\\nmake -C b\\n' | childwatch run --tag";

/// Options of `childwatch run`.
#[derive(Debug, clap::Args)]
#[command(after_help = ABOUT_RS, after_long_help = ABOUT_RS)]
pub struct RunArgs {
    /// Jobs to run at once: N, +N/-N (CPUs plus/minus N), N% (of the CPUs),
    /// or 0 (as many as possible). Default: the number of CPUs.
    #[arg(short = 'j', long = "jobs", value_name = "N", allow_hyphen_values = true, value_parser = parse_jobs)]
    pub jobs: Option<JobsSpec>,
    /// Child watcher.
    #[arg(long, value_enum, default_value = "auto")]
    pub watcher: WatcherName,
    /// Event loop kind.
    #[arg(long = "loop", value_enum, default_value = "auto")]
    pub loop_kind: LoopName,
    /// Per-job time limit in seconds (SIGTERM, then SIGKILL after --grace).
    #[arg(long, value_name = "SECS", allow_hyphen_values = true, value_parser = parse_secs)]
    pub timeout: Option<Duration>,
    /// Seconds between SIGTERM and SIGKILL for --timeout and --halt now.
    #[arg(long, value_name = "SECS", value_parser = parse_secs, default_value = "2")]
    pub grace: Duration,
    /// Print output in job order instead of completion order.
    #[arg(short = 'k', long)]
    pub keep_order: bool,
    /// Prefix each output line with the job's arguments (space-separated)
    /// and a tab.
    #[arg(long)]
    pub tag: bool,
    /// Write a GNU-parallel-style joblog to FILE.
    #[arg(long, value_name = "FILE")]
    pub joblog: Option<PathBuf>,
    /// Skip the jobs the --joblog records as run, and append to it.
    #[arg(long, requires = "joblog")]
    pub resume: bool,
    /// Run again the jobs the --joblog records as failed, skip the ones that
    /// succeeded, run the rest; append to it.
    #[arg(long, requires = "joblog", conflicts_with = "resume")]
    pub resume_failed: bool,
    /// When to stop: never, now|soon,fail=N|fail=N%|success=N|success=N%|done=N
    /// ("now" kills running jobs, "soon" lets them finish). A bare
    /// --halt-on-error is soon,fail=1.
    #[arg(long, alias = "halt-on-error", value_name = "WHEN", value_parser = parse_halt,
          num_args = 0..=1, default_missing_value = "soon,fail=1")]
    pub halt: Option<Halt>,
    /// Input records are separated by NUL, not newline (find -print0).
    #[arg(short = '0', long = "null")]
    pub null: bool,
    /// Give each job at most N arguments (xargs -n).
    #[arg(short = 'n', long = "max-args", value_name = "N", value_parser = parse_count)]
    pub max_args: Option<usize>,
    /// Give each job at most N input lines (xargs -L).
    #[arg(short = 'L', long = "max-lines", value_name = "N", value_parser = parse_count, conflicts_with = "max_args")]
    pub max_lines: Option<usize>,
    /// Fill each command with as many arguments as fit, repeating a word
    /// that holds {} once per argument (GNU parallel -X).
    #[arg(short = 'X')]
    pub xargs: bool,
    /// Read arguments from FILE (like :::: FILE; may be repeated).
    #[arg(short = 'a', long = "arg-file", value_name = "FILE")]
    pub arg_file: Vec<PathBuf>,
    /// Print the commands instead of running them.
    #[arg(long)]
    pub dry_run: bool,
    /// Run a failing job up to N times in all.
    #[arg(long, value_name = "N", value_parser = parse_count)]
    pub retries: Option<usize>,
    /// Print whole lines as they come (lines of jobs interleave).
    #[arg(long, conflicts_with = "ungroup")]
    pub line_buffer: bool,
    /// Print output as it comes, not grouped per job.
    #[arg(short = 'u', long)]
    pub ungroup: bool,
    /// Write each job's stdout, stderr and seq to DIR/1/<arg>/… instead of
    /// printing them.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["ungroup", "line_buffer"])]
    pub results: Option<PathBuf>,
    /// Wait SECS between job starts.
    #[arg(long, value_name = "SECS", allow_hyphen_values = true, value_parser = parse_secs)]
    pub delay: Option<Duration>,
    /// Show a progress bar (default: when stderr is a terminal).
    #[arg(long, overrides_with = "no_bar")]
    pub bar: bool,
    /// Never show the progress bar.
    #[arg(long)]
    pub no_bar: bool,
    /// Show the estimated time left in the progress bar.
    #[arg(long)]
    pub eta: bool,
    /// Split standard input (or the -a/:::: file) into blocks and give each
    /// job one block on its stdin, instead of arguments (GNU parallel
    /// --pipe).
    #[arg(long)]
    pub pipe: bool,
    /// Largest --pipe block: bytes, or with k, M, G (default 1M); blocks
    /// are whole records (lines, or NUL-ended with -0).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, requires = "pipe")]
    pub block: Option<usize>,
    /// Paste values into shell scripts as they are, unquoted.
    #[arg(short = 'q', long)]
    pub quote: bool,
    /// [COMMAND [ARGS...]] [::: VALUES... | :::: FILES...]...
    #[arg(trailing_var_arg = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

/// `-j` as given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobsSpec {
    /// N jobs.
    Exact(usize),
    /// CPUs plus (or minus) N.
    Relative(i64),
    /// N percent of the CPUs.
    Percent(u64),
    /// As many as possible.
    Max,
}

fn parse_jobs(s: &str) -> Result<JobsSpec, String> {
    let bad = || format!("'{s}' is not a number of jobs; use N, +N, -N, N% or 0");
    if let Some(p) = s.strip_suffix('%') {
        return match p.parse::<u64>() {
            Ok(0) => Err("a percentage of the CPUs must be at least 1%".into()),
            Ok(n) => Ok(JobsSpec::Percent(n)),
            Err(_) => Err(bad()),
        };
    }
    if s.starts_with('+') || s.starts_with('-') {
        return s.parse::<i64>().map(JobsSpec::Relative).map_err(|_| bad());
    }
    match s.parse::<usize>() {
        Ok(0) => Ok(JobsSpec::Max),
        Ok(n) => Ok(JobsSpec::Exact(n)),
        Err(_) => Err(bad()),
    }
}

/// The number of jobs `spec` means on a machine with `cpus` CPUs (at least
/// one), `max` standing for "as many as possible".
fn jobs_for(spec: JobsSpec, cpus: usize, max: usize) -> usize {
    match spec {
        JobsSpec::Exact(n) => n,
        JobsSpec::Relative(d) => (cpus as i64 + d).max(1) as usize,
        JobsSpec::Percent(p) => ((cpus as u64 * p).div_ceil(100)).max(1) as usize,
        JobsSpec::Max => max,
    }
}

fn parse_count(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("'{s}' is not a positive number")),
    }
}

fn parse_size(s: &str) -> Result<usize, String> {
    let bad = || format!("'{s}' is not a size; use bytes or a number with k, M or G (1M)");
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 1usize << 10),
        Some((i, 'm' | 'M')) => (&s[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    let n: f64 = num.parse().map_err(|_| bad())?;
    if !(n.is_finite() && n >= 1.0) || n * mult as f64 > (1u64 << 40) as f64 {
        return Err(bad());
    }
    Ok((n * mult as f64) as usize)
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v < 1e9 => Ok(Duration::from_secs_f64(v)),
        _ => Err(format!("'{s}' is not a positive number of seconds")),
    }
}

/// What `--halt` counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HaltOn {
    /// Failed jobs.
    Fail,
    /// Succeeded jobs.
    Success,
    /// Finished jobs.
    Done,
}

/// `--halt WHEN`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Halt {
    /// Kill running jobs (now) or let them finish (soon).
    pub now: bool,
    /// What is counted.
    pub on: HaltOn,
    /// How many (or which percentage, with `percent`).
    pub count: u64,
    /// `count` is a percentage of all jobs.
    pub percent: bool,
}

fn parse_halt(s: &str) -> Result<Halt, String> {
    let usage = || {
        format!(
            "'{s}' is not a halt condition; use never, now,fail=N, soon,fail=N, now,fail=N%, success=N, done=N (also 0, 1, 2)"
        )
    };
    // GNU parallel's old numeric forms.
    match s {
        "0" | "never" => {
            return Ok(Halt {
                now: false,
                on: HaltOn::Fail,
                count: u64::MAX,
                percent: false,
            });
        }
        "1" => {
            return Ok(Halt {
                now: false,
                on: HaltOn::Fail,
                count: 1,
                percent: false,
            });
        }
        "2" => {
            return Ok(Halt {
                now: true,
                on: HaltOn::Fail,
                count: 1,
                percent: false,
            });
        }
        _ => {}
    }
    let (when, cond) = s.split_once(',').ok_or_else(usage)?;
    let now = match when {
        "now" => true,
        "soon" => false,
        _ => return Err(usage()),
    };
    let (what, n) = cond.split_once('=').ok_or_else(usage)?;
    let on = match what {
        "fail" => HaltOn::Fail,
        "success" => HaltOn::Success,
        "done" => HaltOn::Done,
        _ => return Err(usage()),
    };
    let (n, percent) = match n.strip_suffix('%') {
        Some(p) => (p, true),
        None => (n, false),
    };
    let count: u64 = n.parse().map_err(|_| usage())?;
    if count == 0 || (percent && count > 100) {
        return Err(usage());
    }
    Ok(Halt {
        now,
        on,
        count,
        percent,
    })
}

/// A job in flight: its process and how many of its output pipes are still
/// open (someone in its process group may hold them after it exited).
struct Running {
    process: Process,
    open_pipes: Cell<u8>,
    sent_signal: Cell<i32>,
    seq: u64,
}

/// Why no new jobs start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    Halt,
    Signal(i32),
    /// Our stdout was closed.
    Pipe,
}

/// How one job ended.
struct Outcome {
    start: SystemTime,
    runtime: Duration,
    rc: ReturnCode,
    out: Stream,
    err: Stream,
    /// We sent the signal that ended it (timeout, interrupt, halt).
    killed: bool,
    timed_out: bool,
    /// The last signal we sent to the job's group (0: none).
    sent_signal: i32,
}

impl Outcome {
    fn failed(&self) -> bool {
        self.rc != 0 || self.timed_out
    }
}

/// A finished job waiting for its turn to print (`--keep-order`).
struct Done {
    out: Stream,
    err: Stream,
}

#[derive(Debug, Default)]
struct Counts {
    done: u64,
    failed: u64,
    timed_out: u64,
}

struct State {
    lp: EventLoop,
    rx: async_channel::Receiver<Record>,
    template: Template,
    /// Records received so far (the order output is printed in with -k).
    received: Cell<u64>,
    /// All records, once the input is read to its end.
    total: Arc<Mutex<Option<u64>>>,
    stop: Cell<Option<Stop>>,
    signals_seen: Cell<u32>,
    running: RefCell<HashMap<u64, Rc<Running>>>,
    pending_output: RefCell<BTreeMap<u64, Done>>,
    next_to_print: Cell<u64>,
    counts: RefCell<Counts>,
    joblog: RefCell<Option<JobLog>>,
    error: RefCell<Option<anyhow::Error>>,
    progress: Option<ProgressBar>,
    next_start: Cell<Instant>,
    /// The exit status `--halt` decided.
    halt_status: Cell<Option<i32>>,
    opts: Opts,
}

/// The options the workers need.
struct Opts {
    timeout: Option<Duration>,
    grace: Duration,
    keep_order: bool,
    tag: bool,
    mode: Mode,
    results: Option<PathBuf>,
    dry_run: bool,
    retries: usize,
    delay: Option<Duration>,
    halt: Option<Halt>,
}

/// Runs `childwatch run`; returns the exit status.
pub fn command(args: RunArgs) -> Result<i32> {
    let split = input::split_words(&args.command)?;
    // -a files are the first sources, before ::: and :::: (GNU parallel).
    let mut sources = Vec::new();
    for f in &args.arg_file {
        sources.push(Source::open(f)?);
    }
    sources.extend(split.sources);
    if sources.is_empty() {
        sources.push(Source::stdin());
    }
    let per_job =
        args.max_args
            .or(args.max_lines)
            .unwrap_or(if args.xargs { usize::MAX } else { 1 });
    let multi = if args.xargs {
        Multi::Context
    } else {
        Multi::Separate
    };
    let max_args = sources.len().saturating_mul(per_job.min(1 << 20));
    let template = Template::parse(&split.template, !args.quote, multi, max_args)?;
    if args.pipe {
        if template.is_empty() {
            bail!("--pipe needs a command to feed the blocks to (childwatch run --pipe CMD)");
        }
        if sources.iter().any(|s| matches!(s, Source::Values(_))) {
            bail!(
                "--pipe reads one input (standard input, or one -a/:::: file); ::: values do not apply"
            );
        }
    }
    let grouping = Grouping {
        sep: if args.null { 0 } else { b'\n' },
        per_job: if template.is_empty() { 1 } else { per_job },
        max_bytes: (args.xargs && !template.is_empty()).then_some(arg_bytes_budget()),
        commands: template.is_empty(),
    };
    let kind = watchers::loop_kind(args.loop_kind)?;
    let skip: HashSet<u64> = match (&args.joblog, args.resume || args.resume_failed) {
        (Some(p), true) => joblog::finished(p, args.resume_failed)?,
        _ => HashSet::new(),
    };
    let joblog = match &args.joblog {
        Some(p) if args.resume || args.resume_failed => Some(JobLog::append(p)?),
        Some(p) => Some(JobLog::create(p)?),
        None => None,
    };
    if let Some(dir) = &args.results {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the --results directory {}", dir.display()))?;
    }
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let fd_cap = max_width_for_descriptors();
    let asked = jobs_for(args.jobs.unwrap_or(JobsSpec::Exact(cpus)), cpus, fd_cap);
    let mut width = asked;
    if width > fd_cap {
        eprintln!(
            "childwatch: -j {width} needs more descriptors than RLIMIT_NOFILE allows; running {fd_cap} at once (raise it with ulimit -n)"
        );
        width = fd_cap;
    }
    if args.dry_run {
        width = 1;
    }
    let show_bar =
        !args.no_bar && !args.dry_run && (args.bar || args.eta || std::io::stderr().is_terminal());
    let progress = show_bar.then(|| {
        let pb = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        let eta = if args.eta { " ETA {eta}," } else { "" };
        if let Ok(style) = ProgressStyle::with_template(&format!(
            "[{{elapsed}}] {{bar:30.cyan/blue}} {{pos}}/{{len}} jobs,{eta} {{wide_msg}}"
        )) {
            pb.set_style(style);
        }
        pb
    });
    let mode = if args.results.is_some() {
        Mode::Results
    } else if args.ungroup {
        Mode::Ungroup
    } else if args.line_buffer {
        Mode::LineBuffer
    } else {
        Mode::Group
    };

    // The reader thread: input sources -> records, as they arrive.
    let (tx, rx) = async_channel::bounded::<Record>(width.saturating_mul(2).clamp(16, 4096));
    let total = Arc::new(Mutex::new(None));
    let total2 = Arc::clone(&total);
    let pipe_block = args.pipe.then(|| args.block.unwrap_or(1 << 20));
    let reader = std::thread::Builder::new()
        .name("childwatch-input".into())
        .spawn(move || {
            let r = match pipe_block {
                Some(size) => {
                    input::produce_blocks(sources, grouping.sep, size, |s| skip.contains(&s), tx)
                }
                None => input::produce(sources, grouping, |s| skip.contains(&s), tx),
            };
            if let Ok(n) = &r {
                if let Ok(mut t) = total2.lock() {
                    *t = Some(*n);
                }
            }
            r
        })
        .context("cannot start the input reader thread")?;

    let (lp, watcher) = watchers::setup(kind, args.watcher)?;
    let st = Rc::new(State {
        lp: lp.clone(),
        rx,
        template,
        received: Cell::new(0),
        total,
        stop: Cell::new(None),
        signals_seen: Cell::new(0),
        running: RefCell::new(HashMap::new()),
        pending_output: RefCell::new(BTreeMap::new()),
        next_to_print: Cell::new(0),
        counts: RefCell::new(Counts::default()),
        joblog: RefCell::new(joblog),
        error: RefCell::new(None),
        progress,
        next_start: Cell::new(Instant::now()),
        halt_status: Cell::new(None),
        opts: Opts {
            timeout: args.timeout,
            grace: args.grace,
            keep_order: args.keep_order && mode == Mode::Group,
            tag: args.tag,
            mode,
            results: args.results.clone(),
            dry_run: args.dry_run,
            retries: args.retries.unwrap_or(1),
            delay: args.delay,
            halt: args.halt.filter(|h| h.count != u64::MAX),
        },
    });
    let result = run_all(&lp, &st, width);
    watchers::teardown(&lp, &watcher);
    result?;
    if let Some(pb) = &st.progress {
        pb.finish_and_clear();
    }
    if let Some(e) = st.error.borrow_mut().take() {
        return Err(e);
    }
    // The reader ends on its own once every record is taken; after a halt
    // it may still be blocked on a terminal or a pipe: we do not wait.
    st.rx.close();
    let read_error = if reader.is_finished() {
        reader.join().ok().and_then(|r| r.err())
    } else {
        None
    };
    if let Some(e) = read_error {
        if st.counts.borrow().done == 0 {
            return Err(e);
        }
        eprintln!("childwatch: {e:#}");
    }
    let counts = st.counts.borrow();
    let received = st.received.get();
    if received == 0 && st.stop.get().is_none() {
        if skip_all_done(&st) {
            return Ok(0);
        }
        bail!(
            "no jobs to run: the input had no arguments (give values after ':::', a file with -a, or lines on standard input)"
        );
    }
    let not_started = st
        .total_known()
        .map(|t| t.saturating_sub(received))
        .unwrap_or(0);
    if (counts.failed > 0 || st.stop.get().is_some()) && st.stop.get() != Some(Stop::Pipe) {
        let mut msg = format!(
            "childwatch: {}: {} succeeded, {} failed",
            plural(counts.done, "job"),
            counts.done - counts.failed,
            counts.failed
        );
        if counts.timed_out > 0 {
            msg.push_str(&format!(" ({} timed out)", counts.timed_out));
        }
        if not_started > 0 {
            msg.push_str(&format!(", {not_started} not started"));
        }
        eprintln!("{msg}");
    }
    Ok(match st.stop.get() {
        Some(Stop::Signal(sig)) => 128 + sig,
        Some(Stop::Pipe) => 128 + libc::SIGPIPE,
        _ => match (st.halt_status.get(), st.opts.halt) {
            (Some(s), _) => s,
            // With a percentage, GNU parallel's status is the percentage of
            // jobs that failed, whether or not the halt was reached.
            (None, Some(h)) if h.percent => {
                let total = st.total_known().unwrap_or(received).max(1);
                (counts.failed * 100).div_ceil(total).min(100) as i32
            }
            _ => counts.failed.min(101) as i32,
        },
    })
}

/// The input had records, but `--resume` skipped every one.
fn skip_all_done(st: &State) -> bool {
    st.total_known().is_some_and(|t| t > 0)
}

impl State {
    fn total_known(&self) -> Option<u64> {
        self.total.lock().ok().and_then(|t| *t)
    }
}

/// "1 job", "2 jobs".
pub fn plural(n: u64, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// Bytes of arguments `-X` puts in one command: well under the kernel's
/// limit for argv plus environment.
fn arg_bytes_budget() -> usize {
    // SAFETY: sysconf takes a plain integer.
    let max = unsafe { libc::sysconf(libc::_SC_ARG_MAX) };
    let max = if max > 0 { max as usize } else { 131_072 };
    (max / 4).clamp(4096, 128 * 1024)
}

/// Descriptors a running job holds in this process: two pipe read ends, a
/// pidfd for the process and up to one for the watcher, plus the pipe ends
/// that exist for a moment while it is spawned, and a spill file per stream.
const FDS_PER_JOB: u64 = 8;

/// How many jobs the descriptor limit lets run at once.
fn max_width_for_descriptors() -> usize {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return 1024;
    }
    let spare = r.rlim_cur.saturating_sub(64);
    (spare / FDS_PER_JOB).clamp(1, 4096) as usize
}

const FORWARDED: [i32; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

fn run_all(lp: &EventLoop, st: &Rc<State>, width: usize) -> Result<()> {
    for sig in FORWARDED {
        let st2 = Rc::clone(st);
        lp.add_signal_handler(sig, move || on_signal(&st2, sig))
            .with_context(|| format!("cannot handle signal {sig}"))?;
    }
    for sig in [libc::SIGTSTP, libc::SIGCONT] {
        let st2 = Rc::clone(st);
        lp.add_signal_handler(sig, move || on_stop_signal(&st2, sig))
            .with_context(|| format!("cannot handle signal {sig}"))?;
    }
    lp.run_until_complete(async {
        let tasks: Vec<_> = (1..=width.max(1))
            .map(|slot| lp.create_task(worker(Rc::clone(st), lp.clone(), slot)))
            .collect();
        for t in tasks {
            t.await;
        }
    })
    .context("the event loop failed")?;
    for sig in FORWARDED.into_iter().chain([libc::SIGTSTP, libc::SIGCONT]) {
        lp.remove_signal_handler(sig);
    }
    // Whatever --keep-order still holds (jobs after a gap left by a halt).
    let rest = std::mem::take(&mut *st.pending_output.borrow_mut());
    for (_, mut d) in rest {
        print_done(st, &mut d);
    }
    Ok(())
}

fn on_signal(st: &State, sig: i32) {
    let n = st.signals_seen.get() + 1;
    st.signals_seen.set(n);
    if !matches!(st.stop.get(), Some(Stop::Signal(_))) {
        st.stop.set(Some(Stop::Signal(sig)));
    }
    let running: Vec<Rc<Running>> = st.running.borrow().values().cloned().collect();
    let fwd = if n == 1 { sig } else { libc::SIGKILL };
    let msg = if n == 1 {
        format!(
            "childwatch: got signal {sig}; forwarded it to {} and waiting for them (send it again to kill them)",
            plural(running.len() as u64, "running job")
        )
    } else {
        format!(
            "childwatch: killing {}",
            plural(running.len() as u64, "running job")
        )
    };
    say(st, &msg);
    for p in running {
        signal_job(&p, fwd);
    }
}

/// Ctrl-Z: stop every job's group, then ourselves; SIGCONT: resume them.
fn on_stop_signal(st: &State, sig: i32) {
    let running: Vec<Rc<Running>> = st.running.borrow().values().cloned().collect();
    for p in &running {
        // SAFETY: killpg takes plain integers and has no memory effects.
        if p.process.returncode().is_none() || p.open_pipes.get() > 0 {
            unsafe { libc::killpg(p.process.pid() as libc::pid_t, sig) };
        }
    }
    if sig == libc::SIGTSTP {
        // SAFETY: raise takes a plain integer; SIGSTOP cannot be caught.
        unsafe { libc::raise(libc::SIGSTOP) };
    }
}

/// Signals the job and its process group (it leads its own group).
///
/// The group is signalled only while its pgid cannot belong to anyone else:
/// while the leader is unreaped (its pid is taken), or while its output
/// pipes are still open after it exited, which means other members of the
/// group are alive (and a pid stays reserved while it names a live group).
fn signal_job(r: &Running, sig: i32) {
    let p = &r.process;
    r.sent_signal.set(sig);
    let leader_alive = p.returncode().is_none();
    if leader_alive {
        let _ = p.send_signal(sig);
    }
    if leader_alive || r.open_pipes.get() > 0 {
        // SAFETY: killpg takes plain integers and has no memory effects.
        unsafe { libc::killpg(p.pid() as libc::pid_t, sig) };
    }
}

/// Prints a message of ours on stderr without breaking the progress bar.
fn say(st: &State, msg: &str) {
    match &st.progress {
        Some(pb) => pb.suspend(|| eprintln!("{msg}")),
        None => eprintln!("{msg}"),
    }
}

/// Our stdout is closed (`| head`): stop starting jobs and end the running
/// ones, as a pipeline does with SIGPIPE.
fn stdout_closed(st: &State) {
    if st.stop.get() == Some(Stop::Pipe) {
        return;
    }
    st.stop.set(Some(Stop::Pipe));
    let running: Vec<Rc<Running>> = st.running.borrow().values().cloned().collect();
    for p in running {
        signal_job(&p, libc::SIGTERM);
    }
}

/// Handles an error writing output: a closed stdout ends the run; any other
/// error is reported once and ends it too.
fn output_error(st: &State, e: std::io::Error) {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        stdout_closed(st);
    } else if st.error.borrow().is_none() {
        *st.error.borrow_mut() = Some(anyhow::Error::new(e).context("cannot write output"));
        st.stop.set(Some(Stop::Halt));
    }
}

/// A job, ready to run.
struct Job {
    seq: u64,
    slot: usize,
    /// Keep-order position.
    order: u64,
    args: Vec<Vec<u8>>,
    argv: Vec<OsString>,
    /// `--pipe`: what the job reads on stdin.
    block: Option<Vec<u8>>,
}

impl Job {
    fn command_line(&self) -> Vec<u8> {
        template::command_line(&self.argv)
    }
    fn tag(&self) -> Vec<u8> {
        // GNU parallel: the arguments separated by spaces.
        self.args.join(&b' ')
    }
}

async fn worker(st: Rc<State>, lp: EventLoop, slot: usize) {
    loop {
        if st.stop.get().is_some() {
            break;
        }
        let Ok(rec) = st.rx.recv().await else { break };
        if st.stop.get().is_some() {
            break;
        }
        let order = st.received.get();
        st.received.set(order + 1);
        let argv = if st.template.is_empty() {
            let line = rec.args.concat();
            vec!["/bin/sh".into(), "-c".into(), OsString::from_vec(line)]
        } else {
            st.template.build(&Fill {
                args: &rec.args,
                seq: rec.seq,
                slot,
            })
        };
        let job = Job {
            seq: rec.seq,
            slot,
            order,
            args: rec.args,
            argv,
            block: rec.block,
        };
        if st.opts.dry_run {
            let mut line = job.command_line();
            line.push(b'\n');
            if let Err(e) = output::emit(None, Which::Out, &mut |w| w.write_all(&line)) {
                output_error(&st, e);
            }
            continue;
        }
        if let Some(d) = st.opts.delay {
            let now = Instant::now();
            let at = st.next_start.get().max(now);
            st.next_start.set(at + d);
            if at > now {
                childwatch::sleep(at - now).await;
            }
        }
        let mut attempt = 1;
        let outcome = loop {
            let o = run_one(&st, &lp, &job).await;
            if o.failed() && attempt < st.opts.retries && st.stop.get().is_none() {
                attempt += 1;
                continue;
            }
            break o;
        };
        finish(&st, &job, outcome);
    }
}

fn spawn_error_rc(e: &std::io::Error) -> ReturnCode {
    match e.kind() {
        std::io::ErrorKind::NotFound => 127,
        std::io::ErrorKind::PermissionDenied => 126,
        _ => 255,
    }
}

/// `--pipe`: writes the job's block to its stdin and closes it. A job that
/// exits without reading it all is not an error (GNU parallel's `head`).
async fn feed<W: futures_lite::AsyncWrite + Unpin>(pipe: Option<W>, block: Option<&[u8]>) {
    use futures_lite::AsyncWriteExt;
    if let (Some(mut w), Some(b)) = (pipe, block) {
        let _ = w.write_all(b).await;
        let _ = w.close().await;
    }
}

/// Reads a job's pipe into its stream until end-of-file, then counts the
/// pipe as closed.
async fn pump<R: futures_lite::AsyncRead + Unpin>(
    st: &State,
    pipe: Option<R>,
    stream: &mut Stream,
    job: &Running,
) {
    if let Some(mut r) = pipe {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match r.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => {
                    if let Err(e) = stream.push(st.progress.as_ref(), &buf[..n]) {
                        output_error(st, e);
                    }
                }
                Err(e) => {
                    stream.note(
                        st.progress.as_ref(),
                        &format!("childwatch: reading output of job {}: {e}\n", job.seq),
                    );
                    break;
                }
            }
        }
    }
    job.open_pipes.set(job.open_pipes.get().saturating_sub(1));
}

fn results_files(
    st: &State,
    job: &Job,
) -> std::io::Result<(Option<std::fs::File>, Option<std::fs::File>)> {
    let Some(root) = &st.opts.results else {
        return Ok((None, None));
    };
    let dir = output::results_dir(root, &job.args);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("seq"), job.seq.to_string())?;
    Ok((
        Some(std::fs::File::create(dir.join("stdout"))?),
        Some(std::fs::File::create(dir.join("stderr"))?),
    ))
}

async fn run_one(st: &Rc<State>, lp: &EventLoop, job: &Job) -> Outcome {
    let start = SystemTime::now();
    let t0 = Instant::now();
    let tag = st.opts.tag.then(|| job.tag());
    let (fout, ferr) = match results_files(st, job) {
        Ok(f) => f,
        Err(e) => {
            output_error(st, e);
            (None, None)
        }
    };
    let mut out = Stream::new(st.opts.mode, Which::Out, tag.clone(), fout);
    let mut err = Stream::new(st.opts.mode, Which::Err, tag, ferr);
    let mut cmd = Command::new(&job.argv[0]);
    cmd.args(&job.argv[1..])
        .env("PARALLEL_SEQ", job.seq.to_string())
        .env("PARALLEL_JOBSLOT", job.slot.to_string())
        .env("PARALLEL_PID", std::process::id().to_string())
        .stdin(if job.block.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut p = match cmd.spawn() {
        Ok(p) => p,
        Err(e) => {
            err.note(
                st.progress.as_ref(),
                &format!(
                    "childwatch: cannot run {}: {e}\n",
                    job.argv[0].to_string_lossy()
                ),
            );
            let _ = err.close(st.progress.as_ref());
            return Outcome {
                start,
                runtime: t0.elapsed(),
                rc: spawn_error_rc(&e),
                out,
                err,
                killed: false,
                timed_out: false,
                sent_signal: 0,
            };
        }
    };
    let out_pipe = p.stdout.take();
    let err_pipe = p.stderr.take();
    let in_pipe = p.stdin.take();
    let p = Rc::new(Running {
        process: p,
        open_pipes: Cell::new(2),
        sent_signal: Cell::new(0),
        seq: job.seq,
    });
    st.running.borrow_mut().insert(job.seq, Rc::clone(&p));
    show_progress(st);
    // A signal sent by a Ctrl-C while the job runs counts as "killed by us".
    let signals_before = st.signals_seen.get();
    let timed_out = Rc::new(Cell::new(false));
    let timers: Rc<RefCell<Vec<Handle>>> = Rc::new(RefCell::new(Vec::new()));
    if let Some(limit) = st.opts.timeout {
        let (p2, to2, timers2, lp2, grace) = (
            Rc::clone(&p),
            Rc::clone(&timed_out),
            Rc::clone(&timers),
            lp.clone(),
            st.opts.grace,
        );
        let h = lp.call_later(limit, move || {
            to2.set(true);
            signal_job(&p2, libc::SIGTERM);
            let p3 = Rc::clone(&p2);
            let h = lp2.call_later(grace, move || signal_job(&p3, libc::SIGKILL));
            timers2.borrow_mut().push(h);
        });
        timers.borrow_mut().push(h);
    }
    let rc = {
        let mut reads = pin!(futures_lite::future::zip(
            futures_lite::future::zip(
                pump(st, out_pipe, &mut out, &p),
                pump(st, err_pipe, &mut err, &p),
            ),
            feed(in_pipe, job.block.as_deref()),
        ));
        let mut wait = pin!(p.process.wait());
        enum First {
            Eof,
            Exit(std::io::Result<ReturnCode>),
        }
        let first = async {
            reads.as_mut().await;
            First::Eof
        }
        .or(async { First::Exit(wait.as_mut().await) })
        .await;
        match first {
            First::Eof => wait.as_mut().await,
            First::Exit(rc) => {
                // The job is over; what it left running may keep the pipes
                // open: read what is there for a moment, then let go.
                async {
                    reads.as_mut().await;
                }
                .or(async {
                    childwatch::sleep(DRAIN).await;
                })
                .await;
                rc
            }
        }
    };
    for h in timers.borrow_mut().drain(..) {
        h.cancel();
    }
    st.running.borrow_mut().remove(&job.seq);
    let pb = st.progress.as_ref();
    let rc = rc.unwrap_or_else(|e| {
        err.note(
            pb,
            &format!("childwatch: waiting for pid {}: {e}\n", p.process.pid()),
        );
        255
    });
    if timed_out.get() {
        err.note(
            pb,
            &format!(
                "childwatch: job {} timed out after {:?}: {}\n",
                job.seq,
                st.opts.timeout.unwrap_or_default(),
                String::from_utf8_lossy(&job.command_line())
            ),
        );
    }
    for s in [&mut out, &mut err] {
        if let Err(e) = s.close(pb) {
            output_error(st, e);
        }
    }
    Outcome {
        start,
        runtime: t0.elapsed(),
        rc,
        out,
        err,
        killed: rc < 0
            && (timed_out.get()
                || st.signals_seen.get() > signals_before
                || p.sent_signal.get() != 0),
        timed_out: timed_out.get(),
        sent_signal: p.sent_signal.get(),
    }
}

/// Updates the progress bar's message (failed and running jobs).
fn show_progress(st: &State) {
    if let Some(pb) = &st.progress {
        let failed = st.counts.borrow().failed;
        if let Some(t) = st.total_known() {
            pb.set_length(t);
        } else {
            pb.set_length(st.received.get());
        }
        pb.set_message(format!(
            "{failed} failed, {} running",
            st.running.borrow().len()
        ));
    }
}

fn finish(st: &State, job: &Job, o: Outcome) {
    // A job that outlived its timeout failed, even if its leader exited 0
    // (something it started kept its output open).
    let failed = o.failed();
    {
        let mut c = st.counts.borrow_mut();
        c.done += 1;
        if failed {
            c.failed += 1;
        }
        if o.timed_out {
            c.timed_out += 1;
        }
        if let Some(pb) = &st.progress {
            pb.inc(1);
        }
    }
    show_progress(st);
    if let Some(log) = st.joblog.borrow_mut().as_mut() {
        let (exitval, signal) = if o.rc < 0 && o.killed {
            (-1, -o.rc)
        } else if o.rc < 0 {
            (0, -o.rc)
        } else if o.timed_out {
            (-1, o.sent_signal)
        } else {
            (o.rc, 0)
        };
        let entry = Entry {
            seq: job.seq,
            start: o.start,
            runtime: o.runtime,
            exitval,
            signal,
            receive: o.out.bytes,
            command: &job.command_line(),
        };
        if let Err(e) = log.record(&entry) {
            if st.error.borrow().is_none() {
                *st.error.borrow_mut() = Some(e);
                st.stop.set(Some(Stop::Halt));
            }
        }
    }
    check_halt(st, job, &o);
    let mut done = Done {
        out: o.out,
        err: o.err,
    };
    if !st.opts.keep_order {
        print_done(st, &mut done);
        return;
    }
    st.pending_output.borrow_mut().insert(job.order, done);
    loop {
        let k = st.next_to_print.get();
        let Some(mut d) = st.pending_output.borrow_mut().remove(&k) else {
            break;
        };
        print_done(st, &mut d);
        st.next_to_print.set(k + 1);
    }
}

/// `--halt`: whether this job's end reaches the condition, and then what
/// the exit status will be (GNU parallel's rules).
fn check_halt(st: &State, job: &Job, o: &Outcome) {
    let Some(h) = st.opts.halt else { return };
    if st.stop.get().is_some() {
        return;
    }
    let c = st.counts.borrow();
    let n = match h.on {
        HaltOn::Fail => c.failed,
        HaltOn::Success => c.done - c.failed,
        HaltOn::Done => c.done,
    };
    let total = st.total_known().unwrap_or(st.received.get()).max(1);
    let reached = if h.percent {
        n * 100 >= h.count * total
    } else {
        n >= h.count
    };
    if !reached {
        return;
    }
    let status = match (h.on, h.percent) {
        (HaltOn::Success, _) => 0,
        (HaltOn::Fail, false) if h.count == 1 => {
            if o.rc > 0 {
                o.rc
            } else {
                1
            }
        }
        (_, true) => (c.failed * 100).div_ceil(total).min(100) as i32,
        _ => c.failed.min(101) as i32,
    };
    st.halt_status.set(Some(status));
    st.stop.set(Some(Stop::Halt));
    let running: Vec<Rc<Running>> = st.running.borrow().values().cloned().collect();
    let why = match h.on {
        HaltOn::Fail => format!("job {} failed (returncode {})", job.seq, o.rc),
        HaltOn::Success => format!("job {} succeeded", job.seq),
        HaltOn::Done => format!("job {} finished", job.seq),
    };
    drop(c);
    if running.is_empty() {
        say(
            st,
            &format!("childwatch: {why}; --halt: starting no new jobs"),
        );
    } else if h.now {
        say(
            st,
            &format!(
                "childwatch: {why}; --halt now: killing {}",
                plural(running.len() as u64, "running job")
            ),
        );
        for p in running {
            signal_job(&p, libc::SIGTERM);
            // Then SIGKILL after the grace, for jobs that ignore SIGTERM
            // (a no-op for those gone by then: see signal_job).
            st.lp
                .call_later(st.opts.grace, move || signal_job(&p, libc::SIGKILL));
        }
    } else {
        say(
            st,
            &format!(
                "childwatch: {why}; starting no new jobs, waiting for {}",
                plural(running.len() as u64, "running job")
            ),
        );
    }
}

fn print_done(st: &State, d: &mut Done) {
    let pb = st.progress.as_ref();
    if st.stop.get() != Some(Stop::Pipe) {
        if let Err(e) = d.out.print(pb) {
            output_error(st, e);
        }
    }
    if let Err(e) = d.err.print(pb) {
        output_error(st, e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_values_are_checked() {
        assert_eq!(parse_jobs("3"), Ok(JobsSpec::Exact(3)));
        assert_eq!(parse_jobs("0"), Ok(JobsSpec::Max));
        assert_eq!(parse_jobs("+1"), Ok(JobsSpec::Relative(1)));
        assert_eq!(parse_jobs("-1"), Ok(JobsSpec::Relative(-1)));
        assert_eq!(parse_jobs("50%"), Ok(JobsSpec::Percent(50)));
        assert!(parse_jobs("x").is_err());
        assert!(parse_jobs("0%").is_err());
        assert_eq!(jobs_for(JobsSpec::Relative(1), 2, 99), 3);
        assert_eq!(jobs_for(JobsSpec::Relative(-4), 2, 99), 1);
        assert_eq!(jobs_for(JobsSpec::Percent(50), 3, 99), 2);
        assert_eq!(jobs_for(JobsSpec::Max, 3, 99), 99);
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("10k"), Ok(10240));
        assert_eq!(parse_size("6"), Ok(6));
        for bad in ["0", "x", "1T", "-1k"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_secs("0.5"), Ok(Duration::from_millis(500)));
        for bad in ["0", "-2", "nan", "inf", "x"] {
            assert!(parse_secs(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn halt_conditions() {
        assert_eq!(
            parse_halt("now,fail=1"),
            Ok(Halt {
                now: true,
                on: HaltOn::Fail,
                count: 1,
                percent: false
            })
        );
        assert_eq!(
            parse_halt("soon,success=30%"),
            Ok(Halt {
                now: false,
                on: HaltOn::Success,
                count: 30,
                percent: true
            })
        );
        for bad in [
            "later,fail=1",
            "now",
            "now,fail=0",
            "now,fail=x",
            "now,fail=101%",
            "now,oops=1",
        ] {
            assert!(parse_halt(bad).is_err(), "{bad}");
        }
    }
}
