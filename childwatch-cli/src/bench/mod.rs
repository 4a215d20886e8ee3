//! `childwatch bench`: the performance scenarios of the design (throughput,
//! mixed, latency, scale) for every watcher on both loop kinds and for the
//! peers, in one run, each figure shown next to its ratio to the raw
//! baseline measured in the same run.
//!
//! Every runner implements [`Runner`]: start short children with N in
//! flight, hold long-lived ones while watched, kill and reap the held ones,
//! and time kill → exit notification. The scenarios are built from those
//! steps, so every runner is measured by the same procedure.

mod ours;
mod peers;
mod raw;
mod sys;

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use childwatch::LoopKind;
use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::watchers::{self, WatcherName};
use sys::Program;

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
    #[arg(long)]
    pub json: bool,
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

const PEERS: [&str; 3] = ["tokio", "async-process", "std-threads"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Raw,
    RawPidfd,
    Ours(WatcherName, LoopKind),
    Tokio,
    AsyncProcess,
    StdThreads,
}

impl Who {
    fn label(self) -> String {
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
    fn id(self) -> String {
        match self {
            Who::Raw => "raw".into(),
            Who::RawPidfd => "raw-pidfd".into(),
            Who::Ours(w, k) => format!("{w}/{k}"),
            Who::Tokio => "tokio".into(),
            Who::AsyncProcess => "async-process".into(),
            Who::StdThreads => "std-threads".into(),
        }
    }

    fn from_id(id: &str) -> Option<Who> {
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

    fn does_scale(self, scale_loop: LoopKind, all_loops: bool) -> bool {
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

struct Programs {
    short: Program,
    long: Program,
}

fn make_runner(who: Who, p: &Programs) -> Result<Box<dyn Runner>> {
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

// ------------------------------------------------------------------ results

#[derive(Debug, Default, Serialize)]
struct Row {
    /// Stable id: `raw`, `raw-pidfd`, `WATCHER/LOOP`, `tokio`, `async-process`, `std-threads`.
    id: String,
    /// Human-readable name.
    runner: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    unavailable: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    throughput: Option<Throughput>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mixed: Option<Mixed>,
    #[serde(skip_serializing_if = "Option::is_none")]
    latency: Option<Latency>,
    #[serde(skip_serializing_if = "Option::is_none")]
    scale: Option<Scale>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    errors: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Throughput {
    n: usize,
    inflight: usize,
    secs: f64,
    per_sec: f64,
    /// Throughput relative to the raw baseline (1.0 = as fast; higher is faster).
    vs_raw: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Mixed {
    long_lived: usize,
    short: usize,
    none_watched_secs: f64,
    watched_secs: f64,
    /// watched / none_watched - 1.
    slowdown: f64,
}

#[derive(Debug, Serialize)]
struct Latency {
    samples: usize,
    others: usize,
    p50_us_alone: Option<f64>,
    p99_us_alone: Option<f64>,
    p50_us_with_others: Option<f64>,
    p99_us_with_others: Option<f64>,
    /// p50 (alone) relative to the raw baseline's (lower is better).
    p50_vs_raw: Option<f64>,
}

#[derive(Debug, Serialize, serde::Deserialize)]
struct Scale {
    n: usize,
    /// Time to start (and register) all the children.
    start_secs: f64,
    nofile_limit: u64,
    completed: bool,
    reported: usize,
    peak_fds: usize,
    extra_threads: usize,
    kib_per_child: f64,
    kill_reap_secs: Option<f64>,
    /// kill + reap time relative to the raw pidfd-poll loop (lower is better).
    vs_raw_pidfd: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Report {
    kernel: String,
    cpus: usize,
    scenarios: Vec<Scenario>,
    notes: Vec<String>,
    rows: Vec<Row>,
    targets: Vec<Verdict>,
}

/// Whether one runner met one of the design's performance targets.
#[derive(Debug, Serialize)]
struct Verdict {
    target: &'static str,
    runner: String,
    /// `None` when it could not be measured in this run.
    met: Option<bool>,
    detail: String,
}

// ------------------------------------------------------------------ running

struct Sizes {
    throughput: usize,
    inflight: usize,
    mixed: usize,
    scale: usize,
    latency_samples: usize,
    latency_others: usize,
}

fn percentile(v: &mut [Duration], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    Some(v[i.min(v.len() - 1)].as_secs_f64() * 1e6)
}

/// Runs `childwatch bench`.
pub fn command(args: BenchArgs) -> Result<i32> {
    let scenarios = if args.scenario.is_empty() {
        vec![
            Scenario::Throughput,
            Scenario::Mixed,
            Scenario::Latency,
            Scenario::Scale,
        ]
    } else {
        args.scenario.clone()
    };
    let has = |s| scenarios.contains(&s);
    let mut sizes = if args.quick {
        Sizes {
            throughput: 40,
            inflight: 8,
            mixed: 20,
            scale: 100,
            latency_samples: 10,
            latency_others: 20,
        }
    } else if args.full {
        Sizes {
            throughput: 2000,
            inflight: 64,
            mixed: 1000,
            scale: 10_000,
            latency_samples: 100,
            latency_others: 1000,
        }
    } else {
        Sizes {
            throughput: 800,
            inflight: 64,
            mixed: 400,
            scale: 2000,
            latency_samples: 40,
            latency_others: 400,
        }
    };
    if let Some(n) = args.n {
        sizes.throughput = n;
        sizes.mixed = n;
        sizes.scale = n;
        sizes.latency_others = n;
    }
    let mut notes = Vec::new();

    // Which runners.
    let known: Vec<&str> = WatcherName::ALL
        .iter()
        .map(|w| w.as_str())
        .chain(PEERS)
        .collect();
    for w in &args.watchers {
        if !known.contains(&w.as_str()) {
            bail!(
                "unknown runner '{w}' in --watchers; choose from {}",
                known.join(", ")
            );
        }
    }
    let want = |name: &str| args.watchers.is_empty() || args.watchers.iter().any(|w| w == name);
    let mut kinds = Vec::new();
    let loops = if args.loops.is_empty() {
        vec![
            crate::watchers::LoopName::Proactor,
            crate::watchers::LoopName::Selector,
        ]
    } else {
        args.loops.clone()
    };
    for l in loops {
        let k = match l {
            crate::watchers::LoopName::Auto => watchers::loop_kind(l)?,
            crate::watchers::LoopName::Proactor => LoopKind::Proactor,
            crate::watchers::LoopName::Selector => LoopKind::Selector,
        };
        if !kinds.contains(&k) {
            kinds.push(k);
        }
    }
    let scale_loop = kinds.first().copied().unwrap_or(LoopKind::Selector);
    let mut whos = vec![Who::Raw];
    for w in WatcherName::ALL {
        if want(w.as_str()) {
            for &k in &kinds {
                whos.push(Who::Ours(w, k));
            }
        }
    }
    for (name, who) in PEERS
        .iter()
        .zip([Who::Tokio, Who::AsyncProcess, Who::StdThreads])
    {
        if want(name) {
            whos.push(who);
        }
    }
    if has(Scenario::Scale) {
        whos.insert(1, Who::RawPidfd);
        let head = sys::task_headroom() as usize;
        // Threaded watchers need a thread per child too.
        let max = head / 2;
        if sizes.scale > max {
            notes.push(format!(
                "scale: reduced from {} to {} live children: pid_max/threads-max/RLIMIT_NPROC leave room for {} more tasks here",
                sizes.scale, max, head
            ));
            sizes.scale = max.max(1);
        }
    }

    let programs = Programs {
        short: Program::find(&["/bin/true", "/usr/bin/true"], &["true"])?,
        long: Program::find(&["/bin/sleep", "/usr/bin/sleep"], &["sleep", "1000"])?,
    };

    let steps: usize = whos
        .iter()
        .map(|w| {
            let mut s = 0;
            if *w != Who::RawPidfd {
                s += has(Scenario::Throughput) as usize
                    + has(Scenario::Mixed) as usize
                    + has(Scenario::Latency) as usize;
            }
            if has(Scenario::Scale) && w.does_scale(scale_loop, args.full) {
                s += 1;
            }
            s
        })
        .sum();
    let progress = std::io::stderr().is_terminal().then(|| {
        let pb = ProgressBar::new(steps as u64);
        if let Ok(style) =
            ProgressStyle::with_template("[{elapsed}] {bar:30.cyan/blue} {pos}/{len} {wide_msg}")
        {
            pb.set_style(style);
        }
        pb
    });
    let step = |msg: String| {
        if let Some(pb) = &progress {
            pb.set_message(msg);
        }
    };
    let tick = || {
        if let Some(pb) = &progress {
            pb.inc(1);
        }
    };

    let mut rows = Vec::new();
    for &who in &whos {
        let mut row = Row {
            id: who.id(),
            runner: who.label(),
            ..Row::default()
        };
        if let Who::Ours(w, _) = who {
            if let Err(why) = watchers::watcher_support(w) {
                row.unavailable = Some(why);
                rows.push(row);
                for _ in 0..(has(Scenario::Throughput) as usize
                    + has(Scenario::Mixed) as usize
                    + has(Scenario::Latency) as usize
                    + (has(Scenario::Scale) && who.does_scale(scale_loop, args.full)) as usize)
                {
                    tick();
                }
                continue;
            }
        }
        if who != Who::RawPidfd
            && (has(Scenario::Throughput) || has(Scenario::Mixed) || has(Scenario::Latency))
        {
            step(who.label());
            match make_runner(who, &programs) {
                Ok(mut r) => {
                    measure(&mut *r, &mut row, &sizes, &scenarios, &tick);
                }
                Err(e) => {
                    row.unavailable = Some(format!("{e:#}"));
                }
            }
        }
        if has(Scenario::Scale)
            && who.does_scale(scale_loop, args.full)
            && row.unavailable.is_none()
        {
            step(format!("{}: scale ({} children)", who.label(), sizes.scale));
            match scale(who, sizes.scale) {
                Ok(s) => row.scale = Some(s),
                Err(e) => row.errors.push(format!("scale: {e:#}")),
            }
            tick();
        }
        rows.push(row);
    }
    // The baseline once more at the end, keeping its better figure, so that
    // a busy moment at the start does not flatter everyone else's ratio.
    if has(Scenario::Throughput) {
        step("raw baseline again".into());
        if let Ok(mut r) = make_runner(Who::Raw, &programs) {
            if let (Ok(t), Some(row)) = (
                best_batch(&mut *r, sizes.throughput, sizes.inflight),
                rows.iter_mut().find(|r| r.runner == Who::Raw.label()),
            ) {
                if let Some(tp) = row.throughput.as_mut() {
                    if t.as_secs_f64() < tp.secs {
                        tp.secs = t.as_secs_f64();
                        tp.per_sec = sizes.throughput as f64 / tp.secs;
                    }
                }
            }
        }
    }
    if let Some(pb) = &progress {
        pb.finish_and_clear();
    }
    compute_ratios(&mut rows);
    if has(Scenario::Scale) {
        notes.push(
            "scale: each runner runs in a fresh process with RLIMIT_NOFILE lowered to 1024, except the raw pidfd loop, which needs a descriptor per child"
                .to_string(),
        );
    }
    let report = Report {
        kernel: sys::kernel(),
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        scenarios: scenarios.clone(),
        targets: evaluate(&rows),
        notes,
        rows,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_tables(&report, &sizes);
    }
    Ok(0)
}

/// Batches a timed run is split into; the fastest batch, scaled to the
/// whole run, is the figure (this machine is shared: a batch that was
/// slowed down by someone else's work is discarded, not averaged in).
const BATCHES: usize = 4;

/// Runs `n` short children as [`BATCHES`] batches and returns the best
/// batch's time scaled to `n`.
fn best_batch(r: &mut dyn Runner, n: usize, inflight: usize) -> Result<Duration> {
    let k = BATCHES.min(n).max(1);
    let per = n / k;
    let mut best = Duration::MAX;
    for _ in 0..k {
        best = best.min(r.run_short(per, inflight)?);
    }
    Ok(best.mul_f64(n as f64 / per as f64))
}

fn measure(r: &mut dyn Runner, row: &mut Row, sz: &Sizes, sc: &[Scenario], tick: &dyn Fn()) {
    let has = |s| sc.contains(&s);
    let mut err = |what: &str, e: anyhow::Error| row.errors.push(format!("{what}: {e:#}"));
    let mut throughput = None;
    if has(Scenario::Throughput) {
        match best_batch(r, sz.throughput, sz.inflight) {
            Ok(t) => {
                throughput = Some(Throughput {
                    n: sz.throughput,
                    inflight: sz.inflight,
                    secs: t.as_secs_f64(),
                    per_sec: sz.throughput as f64 / t.as_secs_f64(),
                    vs_raw: None,
                })
            }
            Err(e) => err("throughput", e),
        }
        tick();
    }
    let mut lat0 = None;
    if has(Scenario::Latency) {
        match r.latency(sz.latency_samples) {
            Ok(v) => lat0 = Some(v),
            Err(e) => err("latency", e),
        }
    }
    let mut base = None;
    if has(Scenario::Mixed) {
        match best_batch(r, sz.mixed, sz.inflight) {
            Ok(t) => base = Some(t),
            Err(e) => err("mixed", e),
        }
    }
    let others = if has(Scenario::Mixed) {
        sz.mixed
    } else {
        sz.latency_others
    };
    let mut mixed = None;
    let mut lat1 = None;
    if has(Scenario::Mixed) || has(Scenario::Latency) {
        match r.hold(others) {
            Ok(()) => {
                if let (true, Some(b)) = (has(Scenario::Mixed), base) {
                    match best_batch(r, sz.mixed, sz.inflight) {
                        Ok(t) => {
                            mixed = Some(Mixed {
                                long_lived: others,
                                short: sz.mixed,
                                none_watched_secs: b.as_secs_f64(),
                                watched_secs: t.as_secs_f64(),
                                slowdown: t.as_secs_f64() / b.as_secs_f64() - 1.0,
                            })
                        }
                        Err(e) => err("mixed", e),
                    }
                }
                if has(Scenario::Latency) {
                    match r.latency(sz.latency_samples) {
                        Ok(v) => lat1 = Some(v),
                        Err(e) => err("latency", e),
                    }
                }
            }
            Err(e) => err("holding long-lived children", e),
        }
        match r.release() {
            Ok(rel) if rel.reported != rel.held => err(
                "release",
                anyhow::anyhow!(
                    "only {} of {} killed children were reported with -SIGKILL",
                    rel.reported,
                    rel.held
                ),
            ),
            Ok(_) => {}
            Err(e) => err("release", e),
        }
        if has(Scenario::Mixed) {
            tick();
        }
        if has(Scenario::Latency) {
            tick();
        }
    }
    row.throughput = throughput;
    row.mixed = mixed;
    if lat0.is_some() || lat1.is_some() {
        let (mut a, mut b) = (lat0.unwrap_or_default(), lat1.unwrap_or_default());
        row.latency = Some(Latency {
            samples: sz.latency_samples,
            others,
            p50_us_alone: percentile(&mut a, 0.5),
            p99_us_alone: percentile(&mut a, 0.99),
            p50_us_with_others: percentile(&mut b, 0.5),
            p99_us_with_others: percentile(&mut b, 0.99),
            p50_vs_raw: None,
        });
    }
}

/// Runs one runner's scale measurement in a fresh `childwatch` process, so
/// that its memory, threads and descriptors are its own and nothing of an
/// earlier runner (heap, threads, handlers) is counted.
fn scale(who: Who, n: usize) -> Result<Scale> {
    let exe = std::env::current_exe().context("cannot find the childwatch executable")?;
    let out = std::process::Command::new(exe)
        .args(["bench-scale-one", &who.id(), &n.to_string()])
        .stdin(std::process::Stdio::null())
        .output()
        .context("cannot start the scale measurement process")?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let line = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        bail!(
            "{} ({})",
            line.trim_start_matches("childwatch: error: "),
            out.status
        );
    }
    serde_json::from_slice(&out.stdout).context("unreadable scale measurement")
}

/// The hidden `bench-scale-one WHO N` command: one scale measurement, as JSON.
pub fn scale_one(who: &str, n: usize) -> Result<i32> {
    let Some(who) = Who::from_id(who) else {
        bail!("unknown runner '{who}'");
    };
    let programs = Programs {
        short: Program::find(&["/bin/true", "/usr/bin/true"], &["true"])?,
        long: Program::find(&["/bin/sleep", "/usr/bin/sleep"], &["sleep", "1000"])?,
    };
    let s = scale_here(who, &programs, n)?;
    println!("{}", serde_json::to_string(&s)?);
    Ok(0)
}

fn scale_here(who: Who, programs: &Programs, n: usize) -> Result<Scale> {
    let limit = if who == Who::RawPidfd {
        (n as u64 + 256).max(sys::nofile()?.0)
    } else {
        1024
    };
    let probe = sys::Probe::new()?;
    let _guard = sys::NofileGuard::set(limit)?;
    let got = sys::nofile()?.0;
    if got < limit.min(1024) || (who == Who::RawPidfd && got < limit) {
        bail!(
            "needs RLIMIT_NOFILE {limit} but only {got} is allowed here (raise the hard limit, or use a smaller --n)"
        );
    }
    let mut r = make_runner(who, programs)?;
    let before = probe.read();
    let t0 = std::time::Instant::now();
    let held = r.hold(n);
    let start_secs = t0.elapsed().as_secs_f64();
    let peak = probe.read();
    let rel = r.release();
    drop(r);
    let rel = match (held, rel) {
        (Ok(()), Ok(rel)) => rel,
        (Err(e), _) => return Err(e.context("while starting the children")),
        (Ok(()), Err(e)) => return Err(e.context("while killing and reaping")),
    };
    Ok(Scale {
        n,
        start_secs,
        nofile_limit: limit,
        completed: rel.reported == n,
        reported: rel.reported,
        peak_fds: peak.fds,
        extra_threads: peak.threads.saturating_sub(before.threads),
        kib_per_child: peak.rss_kib.saturating_sub(before.rss_kib) as f64 / n as f64,
        kill_reap_secs: Some(rel.time.as_secs_f64()),
        vs_raw_pidfd: None,
    })
}

fn compute_ratios(rows: &mut [Row]) {
    let raw_tp = rows
        .iter()
        .find(|r| r.runner == Who::Raw.label())
        .and_then(|r| r.throughput.as_ref().map(|t| t.secs));
    let raw_p50 = rows
        .iter()
        .find(|r| r.runner == Who::Raw.label())
        .and_then(|r| r.latency.as_ref().and_then(|l| l.p50_us_alone));
    let raw_scale = rows
        .iter()
        .find(|r| r.runner == Who::RawPidfd.label())
        .and_then(|r| r.scale.as_ref().and_then(|s| s.kill_reap_secs));
    for r in rows {
        if let (Some(t), Some(raw)) = (r.throughput.as_mut(), raw_tp) {
            t.vs_raw = Some(raw / t.secs);
        }
        if let (Some(l), Some(raw)) = (r.latency.as_mut(), raw_p50) {
            l.p50_vs_raw = l.p50_us_alone.map(|p| p / raw);
        }
        if let (Some(s), Some(raw)) = (r.scale.as_mut(), raw_scale) {
            s.vs_raw_pidfd = s.kill_reap_secs.map(|t| t / raw);
        }
    }
}

// ------------------------------------------------------------------ targets

fn find<'a>(rows: &'a [Row], label: &str) -> Option<&'a Row> {
    rows.iter().find(|r| r.runner == label)
}

/// Checks the design's performance targets against this run's figures.
fn evaluate(rows: &[Row]) -> Vec<Verdict> {
    let mut out = Vec::new();
    let tokio = find(rows, &Who::Tokio.label());
    let asyncp = find(rows, &Who::AsyncProcess.label());
    let tput = |r: Option<&Row>| r.and_then(|r| r.throughput.as_ref()).and_then(|t| t.vs_raw);
    for r in rows {
        let Some(kind) = rows_watcher(r) else {
            continue;
        };
        // Throughput is the default watcher's promise (and Uring's).
        let headline = kind == watchers::default_pick() || kind == WatcherName::Uring;
        if let (Some(v), true) = (tput(Some(r)), headline) {
            let (tk, ap) = (tput(tokio), tput(asyncp));
            let ahead = tk.is_none_or(|t| v >= t) && ap.is_none_or(|a| v >= a);
            out.push(Verdict {
                target: "throughput >= 0.97x raw and >= tokio, async-process",
                runner: r.runner.clone(),
                met: Some(v >= 0.97 && ahead),
                detail: format!("{v:.2}x raw; tokio {}, async-process {}", f2(tk), f2(ap)),
            });
        }
        if let (Some(m), true) = (
            &r.mixed,
            matches!(
                kind,
                WatcherName::Fast | WatcherName::Pidfd | WatcherName::Uring
            ),
        ) {
            out.push(Verdict {
                target: "mixed: O(1) watcher slows <= 10%",
                runner: r.runner.clone(),
                met: Some(m.slowdown <= 0.10),
                detail: format!("{:+.1}%", m.slowdown * 100.0),
            });
        }
        if kind == WatcherName::Uring {
            let t_scale = |r: Option<&Row>| {
                r.and_then(|r| r.scale.as_ref())
                    .and_then(|s| s.kill_reap_secs)
            };
            if let Some(s) = &r.scale {
                let budget = s.nofile_limit / 2;
                let ok = s.completed
                    && s.peak_fds as u64 <= budget + 16
                    && s.extra_threads == 0
                    && s.kib_per_child <= 2.0
                    && s.vs_raw_pidfd.is_some_and(|v| v <= 1.5);
                out.push(Verdict {
                    target: "scale: all exits, <= fd budget, 0 threads, <= 2 KiB/child, <= 1.5x raw pidfd",
                    runner: r.runner.clone(),
                    met: Some(ok),
                    detail: format!(
                        "completed {}, peak fds {} (budget {budget}; each Process holds a pidfd too), {} extra threads, {:.2} KiB/child, {}x raw pidfd",
                        s.completed,
                        s.peak_fds,
                        s.extra_threads,
                        s.kib_per_child,
                        f2(s.vs_raw_pidfd)
                    ),
                });
            }
            if let (Some(u), Some(t)) = (t_scale(Some(r)), t_scale(tokio)) {
                out.push(Verdict {
                    target: "scale: ahead of tokio",
                    runner: r.runner.clone(),
                    met: Some(u < t),
                    detail: format!("kill+reap {u:.3}s vs tokio {t:.3}s"),
                });
            }
        }
    }
    let uring_rows = rows
        .iter()
        .filter(|r| rows_watcher(r) == Some(WatcherName::Uring));
    for r in uring_rows {
        if let Some(why) = &r.unavailable {
            out.push(Verdict {
                target: "uring targets",
                runner: r.runner.clone(),
                met: None,
                detail: format!("not measured: {why}"),
            });
        }
    }
    out
}

/// The childwatch watcher a row measures, if it is one.
fn rows_watcher(r: &Row) -> Option<WatcherName> {
    let (w, _) = r.runner.split_once('/')?;
    WatcherName::from_str(w, false).ok()
}

// ------------------------------------------------------------------ tables

fn f2(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into())
}

fn us(v: Option<f64>) -> String {
    v.map(|x| {
        if x >= 10_000.0 {
            format!("{:.1}ms", x / 1000.0)
        } else {
            format!("{x:.0}µs")
        }
    })
    .unwrap_or_else(|| "-".into())
}

fn print_tables(rep: &Report, sz: &Sizes) {
    println!(
        "childwatch bench — Linux {}, {} CPUs; ratios are to the raw baselines of this run",
        rep.kernel, rep.cpus
    );
    for n in &rep.notes {
        println!("note: {n}");
    }
    let w = rep
        .rows
        .iter()
        .map(|r| r.runner.len())
        .max()
        .unwrap_or(10)
        .max(24);
    let na = |r: &Row| -> Option<String> {
        r.unavailable
            .as_ref()
            .map(|u| format!("{:<w$}  n/a: {u}", r.runner))
    };
    let errs = |r: &Row, what: &str| -> Option<String> {
        r.errors
            .iter()
            .find(|e| e.starts_with(what))
            .map(|e| format!("{:<w$}  error: {e}", r.runner))
    };
    if rep.scenarios.contains(&Scenario::Throughput) {
        println!(
            "\nthroughput: {} × /bin/true, {} in flight, best of {BATCHES} batches (raw: best of a run at the start and one at the end; vs raw: higher is faster)",
            sz.throughput, sz.inflight
        );
        println!(
            "{:<w$}  {:>9}  {:>10}  {:>7}",
            "runner", "time", "spawns/s", "vs raw"
        );
        for r in &rep.rows {
            if r.runner == Who::RawPidfd.label() {
                continue;
            }
            if let Some(t) = &r.throughput {
                println!(
                    "{:<w$}  {:>8.3}s  {:>10.0}  {:>7}",
                    r.runner,
                    t.secs,
                    t.per_sec,
                    f2(t.vs_raw)
                );
            } else if let Some(l) = na(r).or_else(|| errs(r, "throughput")) {
                println!("{l}");
            }
        }
    }
    if rep.scenarios.contains(&Scenario::Mixed) {
        println!(
            "\nmixed: {} short children while {} long-lived ones are watched, best of {BATCHES} batches (slowdown vs none watched)",
            sz.mixed, sz.mixed
        );
        println!(
            "{:<w$}  {:>10}  {:>10}  {:>9}",
            "runner", "none", "watched", "slowdown"
        );
        for r in &rep.rows {
            if r.runner == Who::RawPidfd.label() {
                continue;
            }
            if let Some(m) = &r.mixed {
                println!(
                    "{:<w$}  {:>9.3}s  {:>9.3}s  {:>+8.1}%",
                    r.runner,
                    m.none_watched_secs,
                    m.watched_secs,
                    m.slowdown * 100.0
                );
            } else if let Some(l) =
                na(r).or_else(|| errs(r, "mixed").or_else(|| errs(r, "holding")))
            {
                println!("{l}");
            }
        }
    }
    if rep.scenarios.contains(&Scenario::Latency) {
        let others = rep
            .rows
            .iter()
            .find_map(|r| r.latency.as_ref().map(|l| l.others))
            .unwrap_or(sz.latency_others);
        println!(
            "\nlatency: kill → exit reported, {} samples, alone and with {} other children watched",
            sz.latency_samples, others
        );
        println!(
            "{:<w$}  {:>8}  {:>8}  {:>8}  {:>8}  {:>10}",
            "runner", "p50", "p99", "p50+", "p99+", "p50 vs raw"
        );
        for r in &rep.rows {
            if r.runner == Who::RawPidfd.label() {
                continue;
            }
            if let Some(l) = &r.latency {
                println!(
                    "{:<w$}  {:>8}  {:>8}  {:>8}  {:>8}  {:>10}",
                    r.runner,
                    us(l.p50_us_alone),
                    us(l.p99_us_alone),
                    us(l.p50_us_with_others),
                    us(l.p99_us_with_others),
                    f2(l.p50_vs_raw)
                );
            } else if let Some(l) = na(r).or_else(|| errs(r, "latency")) {
                println!("{l}");
            }
        }
    }
    if rep.scenarios.contains(&Scenario::Scale) {
        let n = rep
            .rows
            .iter()
            .find_map(|r| r.scale.as_ref().map(|s| s.n))
            .unwrap_or(sz.scale);
        println!(
            "\nscale: {n} live children (RLIMIT_NOFILE 1024), SIGKILL all, reap all (vs raw pidfd: lower is faster)"
        );
        println!(
            "{:<w$}  {:>9}  {:>8}  {:>8}  {:>10}  {:>9}  {:>10}  {:>8}",
            "runner",
            "completed",
            "peak fds",
            "threads",
            "KiB/child",
            "start",
            "kill+reap",
            "vs pidfd"
        );
        for r in &rep.rows {
            if let Some(s) = &r.scale {
                println!(
                    "{:<w$}  {:>9}  {:>8}  {:>8}  {:>10.2}  {:>8.2}s  {:>9.3}s  {:>8}",
                    r.runner,
                    if s.completed {
                        "yes".to_string()
                    } else {
                        format!("{}/{}", s.reported, s.n)
                    },
                    s.peak_fds,
                    s.extra_threads,
                    s.kib_per_child,
                    s.start_secs,
                    s.kill_reap_secs.unwrap_or(f64::NAN),
                    f2(s.vs_raw_pidfd)
                );
            } else if let Some(l) = na(r).or_else(|| errs(r, "scale")) {
                println!("{l}");
            } else {
                println!("{:<w$}  n/a", r.runner);
            }
        }
    }
    if !rep.targets.is_empty() {
        println!("\ndesign targets (this run):");
        for t in &rep.targets {
            let mark = match t.met {
                Some(true) => "met    ",
                Some(false) => "NOT met",
                None => "-      ",
            };
            println!("  {mark}  {:<w$}  {}: {}", t.runner, t.target, t.detail);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A runner whose short runs take the given times, in order.
    struct Scripted(Vec<Duration>);

    impl Runner for Scripted {
        fn run_short(&mut self, _n: usize, _inflight: usize) -> Result<Duration> {
            Ok(self.0.remove(0))
        }
        fn hold(&mut self, _k: usize) -> Result<()> {
            Ok(())
        }
        fn release(&mut self) -> Result<Released> {
            bail!("not scripted")
        }
        fn latency(&mut self, _samples: usize) -> Result<Vec<Duration>> {
            bail!("not scripted")
        }
    }

    #[test]
    fn the_best_batch_is_scaled_to_the_whole_run() {
        let ms = Duration::from_millis;
        let mut r = Scripted(vec![ms(40), ms(10), ms(90), ms(12)]);
        assert_eq!(best_batch(&mut r, 100, 8).unwrap(), ms(40));
        assert!(r.0.is_empty(), "four batches ran");
    }

    #[test]
    fn percentiles_pick_from_the_sorted_samples() {
        let mut v: Vec<Duration> = (1..=100).rev().map(Duration::from_micros).collect();
        assert_eq!(percentile(&mut v, 0.5), Some(51.0));
        assert_eq!(percentile(&mut v, 0.99), Some(99.0));
        assert_eq!(percentile(&mut [], 0.5), None);
    }

    fn row(who: Who, secs: f64) -> Row {
        Row {
            id: who.id(),
            runner: who.label(),
            throughput: Some(Throughput {
                n: 100,
                inflight: 8,
                secs,
                per_sec: 100.0 / secs,
                vs_raw: None,
            }),
            ..Row::default()
        }
    }

    #[test]
    fn ratios_and_targets_come_from_the_same_run() {
        let pick = watchers::default_pick();
        let mut rows = vec![
            row(Who::Raw, 1.0),
            row(Who::Ours(pick, LoopKind::Selector), 1.0),
            row(Who::Ours(pick, LoopKind::Proactor), 2.0),
            row(Who::Tokio, 1.25),
        ];
        compute_ratios(&mut rows);
        let ratio = |i: usize| rows[i].throughput.as_ref().unwrap().vs_raw.unwrap();
        assert_eq!(
            (ratio(0), ratio(1), ratio(2), ratio(3)),
            (1.0, 1.0, 0.5, 0.8)
        );
        let verdicts = evaluate(&rows);
        let met = |id: &str| {
            verdicts
                .iter()
                .find(|v| v.runner == id && v.target.starts_with("throughput"))
                .and_then(|v| v.met)
        };
        assert_eq!(met(&format!("{pick}/selector")), Some(true));
        assert_eq!(met(&format!("{pick}/proactor")), Some(false));
    }

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
