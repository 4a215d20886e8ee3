//! `childwatch run`: a parallel job runner in the spirit of `xargs -P` and
//! GNU parallel, on one childwatch event loop.
//!
//! A reader thread streams the input sources into a bounded channel
//! (`input.rs`); `-j N` worker tasks on the loop — one per job slot — each
//! take the next record, build the command from the template
//! (`template.rs`), spawn it in its own process group with stdout and
//! stderr piped, and wait for its exit through the chosen child watcher.
//! A job is over when its process exits: its pipes are then read for at
//! most `job::DRAIN` more, so a background child that keeps them open
//! cannot hold the run (`job.rs`). Output goes out as `output.rs` says
//! (grouped by default, in completion order or job order with
//! `--keep-order`). The options and their parsers are in `args.rs`.
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
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use childwatch::EventLoop;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::input::{self, Grouping, Record, Source};
use crate::joblog::{self, Entry, JobLog};
use crate::output::{self, Mode, Stream, Which};
use crate::template::{Fill, Multi, Template};
use crate::watchers;

mod args;
mod job;

pub use args::RunArgs;
use args::{Halt, HaltOn, JobsSpec, jobs_for};
use job::{Job, Outcome, Running, run_one, signal_job};

/// Why no new jobs start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    Halt,
    Signal(i32),
    /// Our stdout was closed.
    Pipe,
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
    plain_progress: Option<PlainProgress>,
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
    let fill = args.xargs || args.multi;
    let per_job = args
        .max_args
        .or(args.max_lines)
        .unwrap_or(if fill { usize::MAX } else { 1 });
    let multi = if args.xargs {
        Multi::Context
    } else {
        Multi::Separate
    };
    // With --colsep the number of columns is known only from the input.
    let max_args = if args.colsep.is_some() {
        usize::MAX
    } else {
        sources.len().saturating_mul(per_job.min(1 << 20))
    };
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
        max_bytes: (fill && !template.is_empty()).then_some(arg_bytes_budget()),
        commands: template.is_empty(),
        colsep: args.colsep.clone().map(|c| c.0),
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
    let on_terminal = std::io::stderr().is_terminal();
    let show_bar = !args.no_bar && !args.dry_run && (args.bar || args.eta || on_terminal);
    // Off a terminal the bar cannot be drawn: --bar/--eta then print a
    // plain progress line at most once a second (and at the end).
    let plain_progress = (show_bar && !on_terminal).then(|| PlainProgress {
        start: Instant::now(),
        last: Cell::new(None),
        shown: Cell::new(0),
        eta: args.eta,
    });
    let progress = (show_bar && on_terminal).then(|| {
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
        plain_progress,
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
    report_plain_progress(&st, true);
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

/// `--bar`/`--eta` when stderr is not a terminal.
struct PlainProgress {
    start: Instant,
    last: Cell<Option<Instant>>,
    /// Jobs done at the last line printed.
    shown: Cell<u64>,
    eta: bool,
}

/// Prints "N/M jobs done" off a terminal, at most once a second and when
/// the last job is done.
fn report_plain_progress(st: &State, at_end: bool) {
    let Some(pp) = &st.plain_progress else { return };
    let (done, failed) = {
        let c = st.counts.borrow();
        (c.done, c.failed)
    };
    let total = st.total_known();
    let now = Instant::now();
    let last_one = total == Some(done) || at_end;
    let recent = pp
        .last
        .get()
        .is_some_and(|t| now - t < Duration::from_secs(1));
    if done == 0 || pp.shown.get() == done || (recent && !last_one) {
        return;
    }
    pp.last.set(Some(now));
    pp.shown.set(done);
    let total_s = total.map_or("?".to_string(), |t| t.to_string());
    let mut line = format!("childwatch: {done}/{total_s} jobs done, {failed} failed");
    if let (true, Some(t)) = (pp.eta, total) {
        let per = (now - pp.start).as_secs_f64() / done.max(1) as f64;
        line.push_str(&format!(
            ", ETA {:.0}s",
            per * t.saturating_sub(done) as f64
        ));
    }
    eprintln!("{line}");
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
    report_plain_progress(st, false);
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
            send: job.block.as_ref().map_or(0, |b| b.len() as u64),
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
