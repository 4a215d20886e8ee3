//! Running the plan: every runner through its scenarios, `--repeat` times,
//! each figure kept as all its samples ([`Stat`]: median, min, max), and
//! the scale scenario in a fresh process per measurement.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use indicatif::ProgressBar;
use serde::Serialize;

use super::plan::{Plan, Sizes};
use super::report::{Latency, Mixed, Row, Scale, Throughput};
use super::{Programs, Runner, Scenario, Who, make_runner, sys};

/// One figure measured one or more times.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct Stat {
    /// The median of the samples (the mean of the middle two for an even
    /// count).
    pub median: f64,
    /// The smallest sample.
    pub min: f64,
    /// The largest sample.
    pub max: f64,
    /// Every sample, in measurement order.
    pub samples: Vec<f64>,
}

impl Stat {
    /// The statistics of `samples` (None when there are none).
    pub fn of(samples: Vec<f64>) -> Option<Stat> {
        if samples.is_empty() {
            return None;
        }
        let mut s = samples.clone();
        s.sort_by(f64::total_cmp);
        let n = s.len();
        let median = if n % 2 == 1 {
            s[n / 2]
        } else {
            (s[n / 2 - 1] + s[n / 2]) / 2.0
        };
        Some(Stat {
            median,
            min: s[0],
            max: s[n - 1],
            samples,
        })
    }

    /// Applies `f` to every sample.
    pub fn map(&self, f: impl Fn(f64) -> f64) -> Stat {
        Stat::of(self.samples.iter().map(|&x| f(x)).collect()).expect("not empty")
    }

    /// Half the min–max range relative to the median, in percent.
    pub fn spread_pct(&self) -> f64 {
        if self.median == 0.0 {
            return 0.0;
        }
        (self.max - self.min) / 2.0 / self.median.abs() * 100.0
    }
}

/// One scale measurement, as the fresh process reports it.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct ScaleRun {
    /// Live children.
    pub n: usize,
    /// Time to start (and register) all of them.
    pub start_secs: f64,
    /// RLIMIT_NOFILE during the run.
    pub nofile_limit: u64,
    /// Exits reported with the right status.
    pub reported: usize,
    /// Most descriptors open at once.
    pub peak_fds: usize,
    /// Threads beyond those before the children.
    pub extra_threads: usize,
    /// Resident memory per child.
    pub kib_per_child: f64,
    /// SIGKILL all → every exit reported.
    pub kill_reap_secs: f64,
}

/// Batches a timed run is split into; the fastest batch, scaled to the
/// whole run, is the figure (this machine is shared: a batch that was
/// slowed down by someone else's work is discarded, not averaged in).
pub const BATCHES: usize = 4;

/// Runs `n` short children as [`BATCHES`] batches and returns the best
/// batch's time scaled to `n`.
pub fn best_batch(r: &mut dyn Runner, n: usize, inflight: usize) -> Result<Duration> {
    let k = BATCHES.min(n).max(1);
    let per = n / k;
    let mut best = Duration::MAX;
    for _ in 0..k {
        best = best.min(r.run_short(per, inflight)?);
    }
    Ok(best.mul_f64(n as f64 / per as f64))
}

/// The `p` percentile of `v`, in microseconds.
pub fn percentile(v: &mut [Duration], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    Some(v[i.min(v.len() - 1)].as_secs_f64() * 1e6)
}

/// Samples of one runner, gathered over the repeats.
#[derive(Default)]
struct Samples {
    throughput: Vec<f64>,
    mixed_base: Vec<f64>,
    mixed_watched: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    p50_others: Vec<f64>,
    p99_others: Vec<f64>,
    others: usize,
}

/// Measures every runner of the plan.
pub fn run(plan: &Plan, programs: &Programs, pb: Option<&ProgressBar>) -> Vec<Row> {
    let tick = || {
        if let Some(pb) = pb {
            pb.inc(1);
        }
    };
    let step = |msg: String| {
        if let Some(pb) = pb {
            pb.set_message(msg);
        }
    };
    let mut rows = Vec::new();
    for &who in &plan.whos {
        let mut row = Row::new(who);
        if plan.loops_apply(who) {
            step(who.label());
            match make_runner(who, programs) {
                Ok(mut r) => {
                    let mut s = Samples::default();
                    for _ in 0..plan.repeat {
                        measure_once(&mut *r, &mut row, &mut s, &plan.sizes, plan, &tick);
                    }
                    fill(&mut row, s, &plan.sizes);
                }
                Err(e) => row.unavailable = Some(format!("{e:#}")),
            }
        }
        if plan.scales(who) && row.unavailable.is_none() {
            step(format!(
                "{}: scale ({} children)",
                who.label(),
                plan.sizes.scale
            ));
            let mut runs = Vec::new();
            for _ in 0..plan.repeat {
                match scale(who, plan.sizes.scale) {
                    Ok(s) => runs.push(s),
                    Err(e) => row.errors.push(format!("scale: {e:#}")),
                }
                tick();
            }
            row.scale = Scale::combine(runs);
        }
        rows.push(row);
    }
    // The baseline once more at the end, as one more sample, so that a busy
    // moment at the start does not flatter everyone else's ratio.
    if plan.has(Scenario::Throughput) {
        step("raw baseline again".into());
        if let Ok(mut r) = make_runner(Who::Raw, programs) {
            if let (Ok(t), Some(row)) = (
                best_batch(&mut *r, plan.sizes.throughput, plan.sizes.inflight),
                rows.iter_mut().find(|r| r.who == Who::Raw),
            ) {
                if let Some(tp) = row.throughput.as_mut() {
                    let mut v = tp.secs.samples.clone();
                    v.push(t.as_secs_f64());
                    if let Some(st) = Stat::of(v) {
                        tp.per_sec = tp.n as f64 / st.median;
                        tp.secs = st;
                    }
                }
            }
        }
    }
    super::report::compute_ratios(&mut rows);
    rows
}

fn measure_once(
    r: &mut dyn Runner,
    row: &mut Row,
    s: &mut Samples,
    sz: &Sizes,
    plan: &Plan,
    tick: &dyn Fn(),
) {
    let has = |x| plan.has(x);
    let mut err = |what: &str, e: anyhow::Error| {
        let msg = format!("{what}: {e:#}");
        if !row.errors.contains(&msg) {
            row.errors.push(msg);
        }
    };
    if has(Scenario::Throughput) {
        match best_batch(r, sz.throughput, sz.inflight) {
            Ok(t) => s.throughput.push(t.as_secs_f64()),
            Err(e) => err("throughput", e),
        }
        tick();
    }
    if has(Scenario::Latency) {
        match r.latency(sz.latency_samples) {
            Ok(mut v) => {
                s.p50.extend(percentile(&mut v, 0.5));
                s.p99.extend(percentile(&mut v, 0.99));
            }
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
    s.others = others;
    if has(Scenario::Mixed) || has(Scenario::Latency) {
        match r.hold(others) {
            Ok(()) => {
                if let (true, Some(b)) = (has(Scenario::Mixed), base) {
                    match best_batch(r, sz.mixed, sz.inflight) {
                        Ok(t) => {
                            s.mixed_base.push(b.as_secs_f64());
                            s.mixed_watched.push(t.as_secs_f64());
                        }
                        Err(e) => err("mixed", e),
                    }
                }
                if has(Scenario::Latency) {
                    match r.latency(sz.latency_samples) {
                        Ok(mut v) => {
                            s.p50_others.extend(percentile(&mut v, 0.5));
                            s.p99_others.extend(percentile(&mut v, 0.99));
                        }
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
}

/// Turns the samples into the row's figures.
fn fill(row: &mut Row, s: Samples, sz: &Sizes) {
    if let Some(secs) = Stat::of(s.throughput) {
        row.throughput = Some(Throughput {
            n: sz.throughput,
            inflight: sz.inflight,
            per_sec: sz.throughput as f64 / secs.median,
            secs,
            vs_raw: None,
        });
    }
    if let (Some(base), Some(watched)) = (
        Stat::of(s.mixed_base.clone()),
        Stat::of(s.mixed_watched.clone()),
    ) {
        let slow: Vec<f64> = s
            .mixed_watched
            .iter()
            .zip(&s.mixed_base)
            .map(|(w, b)| (w / b - 1.0) * 100.0)
            .collect();
        row.mixed = Some(Mixed {
            long_lived: s.others,
            short: sz.mixed,
            none_watched_secs: base,
            watched_secs: watched,
            slowdown_pct: Stat::of(slow).expect("as many as the base"),
        });
    }
    if !s.p50.is_empty() || !s.p50_others.is_empty() {
        row.latency = Some(Latency {
            samples: sz.latency_samples,
            others: s.others,
            p50_us_alone: Stat::of(s.p50),
            p99_us_alone: Stat::of(s.p99),
            p50_us_with_others: Stat::of(s.p50_others),
            p99_us_with_others: Stat::of(s.p99_others),
            p50_vs_raw: None,
        });
    }
}

/// Runs one runner's scale measurement in a fresh `childwatch` process, so
/// that its memory, threads and descriptors are its own and nothing of an
/// earlier runner (heap, threads, handlers) is counted.
fn scale(who: Who, n: usize) -> Result<ScaleRun> {
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
    let s = scale_here(who, &Programs::find()?, n)?;
    println!("{}", serde_json::to_string(&s)?);
    Ok(0)
}

fn scale_here(who: Who, programs: &Programs, n: usize) -> Result<ScaleRun> {
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
    Ok(ScaleRun {
        n,
        start_secs,
        nofile_limit: limit,
        reported: rel.reported,
        peak_fds: peak.fds,
        extra_threads: peak.threads.saturating_sub(before.threads),
        kib_per_child: peak.rss_kib.saturating_sub(before.rss_kib) as f64 / n as f64,
        kill_reap_secs: rel.time.as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::Released;

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

    #[test]
    fn stats_median_and_range() {
        let s = Stat::of(vec![3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(s.samples, [3.0, 1.0, 2.0], "kept in measurement order");
        let s = Stat::of(vec![4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!(s.median, 2.5);
        assert_eq!(s.spread_pct(), 60.0);
        assert!(Stat::of(vec![]).is_none());
    }
}
