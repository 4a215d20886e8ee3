//! `childwatch run`: a parallel job runner in the spirit of `xargs -P` and
//! GNU parallel, on one childwatch event loop.
//!
//! `-j N` worker tasks on the loop each take the next job, spawn it in its
//! own process group with stdout and stderr piped, read both to the end and
//! wait for the exit through the chosen child watcher. A finished job's
//! output is printed whole (stdout to stdout, stderr to stderr), so lines of
//! different jobs never interleave — in completion order, or in job order
//! with `--keep-order`.
//!
//! `--timeout` sends SIGTERM to the job's process group, then SIGKILL after
//! the grace period. SIGINT/SIGTERM to `childwatch` (the loop's signal
//! handlers) stop new jobs and are forwarded to the running ones; a second
//! one kills them. Exit status: 0 when every job succeeded, else the number
//! of failed jobs capped at 101 (GNU parallel's convention), 128+signal when
//! interrupted, 255 for errors before any job ran.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use childwatch::{EventLoop, Handle, ReturnCode};
use indicatif::{ProgressBar, ProgressStyle};

use crate::joblog::{Entry, JobLog};
use crate::jobs::{self, Job};
use crate::proc_api::{self, Command, Process, Stdio};
use crate::watchers::{self, LoopName, WatcherName};

/// Options of `childwatch run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Jobs to run at once (default: the number of CPUs).
    #[arg(short = 'j', long = "jobs", value_name = "N", value_parser = parse_jobs)]
    pub jobs: Option<usize>,
    /// Child watcher.
    #[arg(long, value_enum, default_value = "auto")]
    pub watcher: WatcherName,
    /// Event loop kind.
    #[arg(long = "loop", value_enum, default_value = "auto")]
    pub loop_kind: LoopName,
    /// Per-job time limit in seconds (SIGTERM, then SIGKILL after --grace).
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    pub timeout: Option<Duration>,
    /// Seconds between SIGTERM and SIGKILL for --timeout.
    #[arg(long, value_name = "SECS", value_parser = parse_secs, default_value = "2")]
    pub grace: Duration,
    /// Print output in job order instead of completion order.
    #[arg(short = 'k', long)]
    pub keep_order: bool,
    /// Prefix each output line with the job's argument and a tab.
    #[arg(long)]
    pub tag: bool,
    /// Write a GNU-parallel-style joblog to FILE.
    #[arg(long, value_name = "FILE")]
    pub joblog: Option<PathBuf>,
    /// Start no new job after the first failure (running ones finish).
    #[arg(long)]
    pub halt_on_error: bool,
    /// CMD [ARGS...] [::: VALUES...]; without ':::' values come from stdin
    /// lines; with no CMD each stdin line is a /bin/sh -c command.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "COMMAND"
    )]
    pub command: Vec<String>,
}

fn parse_jobs(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("'{s}' is not a positive number")),
    }
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v < 1e9 => Ok(Duration::from_secs_f64(v)),
        _ => Err(format!("'{s}' is not a positive number of seconds")),
    }
}

/// A job in flight: its process and how many of its output pipes are still
/// open (someone in its process group may hold them after it exited).
struct Running {
    process: Process,
    open_pipes: Cell<u8>,
    sent_signal: Cell<i32>,
}

/// Why no new jobs start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    Halt,
    Signal(i32),
}

/// How one job ended.
#[derive(Debug)]
struct Outcome {
    start: SystemTime,
    runtime: Duration,
    rc: ReturnCode,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    /// We sent the signal that ended it (timeout or interrupt).
    killed: bool,
    timed_out: bool,
    /// The last signal we sent to the job's group (0: none).
    sent_signal: i32,
}

#[derive(Debug, Default)]
struct Counts {
    done: usize,
    failed: usize,
    timed_out: usize,
}

struct State {
    jobs: Vec<Job>,
    next: Cell<usize>,
    stop: Cell<Option<Stop>>,
    signals_seen: Cell<u32>,
    running: RefCell<HashMap<usize, Rc<Running>>>,
    pending_output: RefCell<BTreeMap<usize, Outcome>>,
    next_to_print: Cell<usize>,
    counts: RefCell<Counts>,
    joblog: RefCell<Option<JobLog>>,
    error: RefCell<Option<anyhow::Error>>,
    progress: Option<ProgressBar>,
    timeout: Option<Duration>,
    grace: Duration,
    keep_order: bool,
    tag: bool,
    halt_on_error: bool,
}

/// Runs `childwatch run`; returns the exit status.
pub fn command(args: RunArgs) -> Result<i32> {
    let jobs = jobs::expand(&args.command, std::io::stdin().lock())?;
    let kind = watchers::loop_kind(args.loop_kind)?;
    let joblog = args.joblog.as_deref().map(JobLog::create).transpose()?;
    let mut width = args.jobs.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let fd_cap = max_width_for_descriptors();
    if width > fd_cap {
        eprintln!(
            "childwatch: -j {width} needs more descriptors than RLIMIT_NOFILE allows; running {fd_cap} at once (raise it with ulimit -n)"
        );
        width = fd_cap;
    }
    let (lp, watcher) = watchers::setup(kind, args.watcher)?;
    let progress = std::io::stderr().is_terminal().then(|| {
        let pb = ProgressBar::new(jobs.len() as u64);
        if let Ok(style) = ProgressStyle::with_template(
            "[{elapsed}] {bar:30.cyan/blue} {pos}/{len} jobs, {wide_msg}",
        ) {
            pb.set_style(style);
        }
        pb
    });
    let st = Rc::new(State {
        jobs,
        next: Cell::new(0),
        stop: Cell::new(None),
        signals_seen: Cell::new(0),
        running: RefCell::new(HashMap::new()),
        pending_output: RefCell::new(BTreeMap::new()),
        next_to_print: Cell::new(0),
        counts: RefCell::new(Counts::default()),
        joblog: RefCell::new(joblog),
        error: RefCell::new(None),
        progress,
        timeout: args.timeout,
        grace: args.grace,
        keep_order: args.keep_order,
        tag: args.tag,
        halt_on_error: args.halt_on_error,
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
    let counts = st.counts.borrow();
    let total = st.jobs.len();
    let not_started = total - st.next.get();
    if counts.failed > 0 || st.stop.get().is_some() {
        let mut msg = format!(
            "childwatch: {total} jobs: {} succeeded, {} failed",
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
        _ => counts.failed.min(101) as i32,
    })
}

/// Descriptors a running job holds in this process: two pipe read ends, a
/// pidfd for the process and up to one for the watcher, plus the pipe ends
/// that exist for a moment while it is spawned.
const FDS_PER_JOB: u64 = 6;

/// How many jobs the descriptor limit lets run at once.
fn max_width_for_descriptors() -> usize {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return usize::MAX;
    }
    let spare = r.rlim_cur.saturating_sub(64);
    (spare / FDS_PER_JOB).clamp(1, usize::MAX as u64) as usize
}

fn run_all(lp: &EventLoop, st: &Rc<State>, width: usize) -> Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let st2 = Rc::clone(st);
        lp.add_signal_handler(sig, move || on_signal(&st2, sig))
            .with_context(|| format!("cannot handle signal {sig}"))?;
    }
    let workers = width.min(st.jobs.len()).max(1);
    lp.run_until_complete(async {
        let tasks: Vec<_> = (0..workers)
            .map(|_| lp.create_task(worker(Rc::clone(st), lp.clone())))
            .collect();
        for t in tasks {
            t.await;
        }
    })
    .context("the event loop failed")?;
    for sig in [libc::SIGINT, libc::SIGTERM] {
        lp.remove_signal_handler(sig);
    }
    // Whatever --keep-order still holds (jobs after a gap left by a halt).
    let rest = std::mem::take(&mut *st.pending_output.borrow_mut());
    for (k, o) in rest {
        print_output(st, &st.jobs[k], &o);
    }
    Ok(())
}

fn on_signal(st: &State, sig: i32) {
    let n = st.signals_seen.get() + 1;
    st.signals_seen.set(n);
    if st.stop.get().is_none() || matches!(st.stop.get(), Some(Stop::Halt)) {
        st.stop.set(Some(Stop::Signal(sig)));
    }
    let running: Vec<Rc<Running>> = st.running.borrow().values().cloned().collect();
    let fwd = if n == 1 { sig } else { libc::SIGKILL };
    let msg = if n == 1 {
        format!(
            "childwatch: got signal {sig}; forwarded it to {} running jobs and waiting for them (send it again to kill them)",
            running.len()
        )
    } else {
        format!("childwatch: killing {} running jobs", running.len())
    };
    say(st, &msg);
    for p in running {
        signal_job(&p, fwd);
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

async fn worker(st: Rc<State>, lp: EventLoop) {
    loop {
        if st.stop.get().is_some() {
            break;
        }
        let i = st.next.get();
        if i >= st.jobs.len() {
            break;
        }
        st.next.set(i + 1);
        let outcome = run_one(&st, &lp, i).await;
        finish(&st, i, outcome);
    }
}

fn spawn_error_rc(e: &std::io::Error) -> ReturnCode {
    match e.kind() {
        std::io::ErrorKind::NotFound => 127,
        std::io::ErrorKind::PermissionDenied => 126,
        _ => 255,
    }
}

async fn run_one(st: &Rc<State>, lp: &EventLoop, i: usize) -> Outcome {
    let job = &st.jobs[i];
    let start = SystemTime::now();
    let t0 = Instant::now();
    let mut cmd = Command::new(&job.argv[0]);
    cmd.args(&job.argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut p = match cmd.spawn() {
        Ok(p) => p,
        Err(e) => {
            return Outcome {
                start,
                runtime: t0.elapsed(),
                rc: spawn_error_rc(&e),
                stdout: Vec::new(),
                stderr: format!("childwatch: cannot run {}: {e}\n", job.argv[0]).into_bytes(),
                killed: false,
                timed_out: false,
                sent_signal: 0,
            };
        }
    };
    let out_pipe = p.stdout.take();
    let err_pipe = p.stderr.take();
    let p = Rc::new(Running {
        process: p,
        open_pipes: Cell::new(2),
        sent_signal: Cell::new(0),
    });
    st.running.borrow_mut().insert(i, Rc::clone(&p));
    show_progress(st);
    // A signal sent by a Ctrl-C while the job runs counts as "killed by us".
    let signals_before = st.signals_seen.get();
    let timed_out = Rc::new(Cell::new(false));
    let timers: Rc<RefCell<Vec<Handle>>> = Rc::new(RefCell::new(Vec::new()));
    if let Some(limit) = st.timeout {
        let (p2, to2, timers2, lp2, grace) = (
            Rc::clone(&p),
            Rc::clone(&timed_out),
            Rc::clone(&timers),
            lp.clone(),
            st.grace,
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
    let (stdout, (stderr, rc)) = futures_lite::future::zip(
        read_counted(out_pipe, &p),
        futures_lite::future::zip(read_counted(err_pipe, &p), p.process.wait()),
    )
    .await;
    for h in timers.borrow_mut().drain(..) {
        h.cancel();
    }
    st.running.borrow_mut().remove(&i);
    let mut stderr =
        stderr.unwrap_or_else(|e| format!("childwatch: reading stderr: {e}\n").into_bytes());
    let stdout = stdout.unwrap_or_else(|e| {
        stderr.extend_from_slice(format!("childwatch: reading stdout: {e}\n").as_bytes());
        Vec::new()
    });
    let rc = rc.unwrap_or_else(|e| {
        stderr.extend_from_slice(
            format!("childwatch: waiting for pid {}: {e}\n", p.process.pid()).as_bytes(),
        );
        255
    });
    if timed_out.get() {
        stderr.extend_from_slice(
            format!(
                "childwatch: job {} timed out after {:?}: {}\n",
                job.seq,
                st.timeout.unwrap_or_default(),
                job.command_line()
            )
            .as_bytes(),
        );
    }
    Outcome {
        start,
        runtime: t0.elapsed(),
        rc,
        stdout,
        stderr,
        killed: rc < 0 && (timed_out.get() || st.signals_seen.get() > signals_before),
        timed_out: timed_out.get(),
        sent_signal: p.sent_signal.get(),
    }
}

/// Updates the progress bar's message (failed and running jobs).
fn show_progress(st: &State) {
    if let Some(pb) = &st.progress {
        let failed = st.counts.borrow().failed;
        pb.set_message(format!(
            "{failed} failed, {} running",
            st.running.borrow().len()
        ));
    }
}

/// Reads a pipe to its end, then counts it as closed.
async fn read_counted<R: futures_lite::AsyncRead + Unpin>(
    pipe: Option<R>,
    job: &Running,
) -> std::io::Result<Vec<u8>> {
    let r = proc_api::read_all(pipe).await;
    job.open_pipes.set(job.open_pipes.get().saturating_sub(1));
    r
}

fn finish(st: &State, i: usize, o: Outcome) {
    let job = &st.jobs[i];
    // A job that outlived its timeout failed, even if its leader exited 0
    // (something it started kept its output open).
    let failed = o.rc != 0 || o.timed_out;
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
            command: &job.command_line(),
        };
        if let Err(e) = log.record(&entry) {
            if st.error.borrow().is_none() {
                *st.error.borrow_mut() = Some(e);
                st.stop.set(Some(Stop::Halt));
            }
        }
    }
    if failed && st.halt_on_error && st.stop.get().is_none() {
        st.stop.set(Some(Stop::Halt));
        say(
            st,
            &format!(
                "childwatch: job {} failed (returncode {}); starting no new jobs, waiting for {} running",
                job.seq,
                o.rc,
                st.running.borrow().len()
            ),
        );
    }
    if !st.keep_order {
        print_output(st, job, &o);
        return;
    }
    st.pending_output.borrow_mut().insert(i, o);
    loop {
        let k = st.next_to_print.get();
        let Some(o) = st.pending_output.borrow_mut().remove(&k) else {
            break;
        };
        print_output(st, &st.jobs[k], &o);
        st.next_to_print.set(k + 1);
    }
}

fn print_output(st: &State, job: &Job, o: &Outcome) {
    let write = || {
        if !o.stdout.is_empty() {
            let mut out = std::io::stdout().lock();
            let _ = write_block(&mut out, &o.stdout, st.tag.then_some(&job.tag));
            let _ = out.flush();
        }
        if !o.stderr.is_empty() {
            let mut err = std::io::stderr().lock();
            let _ = write_block(&mut err, &o.stderr, st.tag.then_some(&job.tag));
            let _ = err.flush();
        }
    };
    match &st.progress {
        Some(pb) => pb.suspend(write),
        None => write(),
    }
}

fn write_block(w: &mut impl Write, data: &[u8], tag: Option<&String>) -> std::io::Result<()> {
    let Some(tag) = tag else {
        return w.write_all(data);
    };
    let mut buf = Vec::with_capacity(data.len() + 64);
    for line in data.split_inclusive(|&b| b == b'\n') {
        buf.extend_from_slice(tag.as_bytes());
        buf.push(b'\t');
        buf.extend_from_slice(line);
    }
    if !buf.ends_with(b"\n") {
        buf.push(b'\n');
    }
    w.write_all(&buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_prefix_every_line_and_end_it() {
        let mut out = Vec::new();
        write_block(&mut out, b"a\nb\nc", Some(&"t".to_string())).unwrap();
        assert_eq!(out, b"t\ta\nt\tb\nt\tc\n");
        let mut out = Vec::new();
        write_block(&mut out, b"a\nb", None).unwrap();
        assert_eq!(out, b"a\nb", "untagged output is passed through as is");
    }

    #[test]
    fn option_values_are_checked() {
        assert_eq!(parse_jobs("3"), Ok(3));
        assert!(parse_jobs("0").is_err());
        assert!(parse_jobs("-1").is_err());
        assert_eq!(parse_secs("0.5"), Ok(Duration::from_millis(500)));
        for bad in ["0", "-2", "nan", "inf", "x"] {
            assert!(parse_secs(bad).is_err(), "{bad}");
        }
    }
}
