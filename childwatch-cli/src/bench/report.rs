//! The bench's results as people and programs read them: rows keyed by
//! runner, ratios to the raw baselines, tables that show only the runners
//! a scenario applies to (the others are named once, with the reason), JSON
//! and CSV that carry the version, kernel and a timestamp, and an SVG chart
//! (plotters) with one panel per scenario.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use super::measure::{BATCHES, ScaleRun, Stat};
use super::plan::{Plan, Sizes};
use super::targets::{self, Verdict};
use super::{Scenario, Who, sys};

/// One runner's figures.
#[derive(Debug, Serialize)]
pub struct Row {
    /// The runner (tables and lookups use this, never the label).
    #[serde(skip)]
    pub who: Who,
    /// Stable id: `raw`, `raw-pidfd`, `WATCHER/LOOP`, `tokio`, `async-process`, `std-threads`.
    pub id: String,
    /// Human-readable name.
    pub runner: String,
    /// Why it could not run here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
    /// Throughput figures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throughput: Option<Throughput>,
    /// Mixed figures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mixed: Option<Mixed>,
    /// Latency figures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency: Option<Latency>,
    /// Scale figures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scale: Option<Scale>,
    /// What failed while measuring.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

impl Row {
    /// An empty row for `who`.
    pub fn new(who: Who) -> Row {
        Row {
            who,
            id: who.id(),
            runner: who.label(),
            unavailable: None,
            throughput: None,
            mixed: None,
            latency: None,
            scale: None,
            errors: Vec::new(),
        }
    }
}

/// N × /bin/true.
#[derive(Debug, Serialize)]
pub struct Throughput {
    /// Children.
    pub n: usize,
    /// In flight at once.
    pub inflight: usize,
    /// Wall time.
    pub secs: Stat,
    /// Spawns per second at the median.
    pub per_sec: f64,
    /// Throughput relative to the raw baseline's median (higher is faster).
    pub vs_raw: Option<Stat>,
}

/// Short children while long-lived ones are watched.
#[derive(Debug, Serialize)]
pub struct Mixed {
    /// Long-lived children watched.
    pub long_lived: usize,
    /// Short children run.
    pub short: usize,
    /// Time with none watched.
    pub none_watched_secs: Stat,
    /// Time while they are watched.
    pub watched_secs: Stat,
    /// watched / none watched − 1, in percent, per repeat.
    pub slowdown_pct: Stat,
}

/// kill → exit reported.
#[derive(Debug, Serialize)]
pub struct Latency {
    /// Samples per measurement.
    pub samples: usize,
    /// Other children watched in the second measurement.
    pub others: usize,
    /// Median latency alone, µs.
    pub p50_us_alone: Option<Stat>,
    /// p99 alone, µs.
    pub p99_us_alone: Option<Stat>,
    /// Median with the others watched, µs.
    pub p50_us_with_others: Option<Stat>,
    /// p99 with the others watched, µs.
    pub p99_us_with_others: Option<Stat>,
    /// p50 alone relative to the raw baseline's (lower is better).
    pub p50_vs_raw: Option<Stat>,
}

/// N live children under RLIMIT_NOFILE 1024; kill + reap all.
#[derive(Debug, Serialize)]
pub struct Scale {
    /// Live children.
    pub n: usize,
    /// Start time (median).
    pub start_secs: f64,
    /// RLIMIT_NOFILE during the run.
    pub nofile_limit: u64,
    /// Every run reported every exit.
    pub completed: bool,
    /// Fewest exits reported in a run.
    pub reported: usize,
    /// Most descriptors open at once (worst run).
    pub peak_fds: usize,
    /// Extra threads (worst run).
    pub extra_threads: usize,
    /// Memory per child (median).
    pub kib_per_child: f64,
    /// Kill + reap time.
    pub kill_reap_secs: Stat,
    /// Kill + reap relative to the raw pidfd loop's median (lower is faster).
    pub vs_raw_pidfd: Option<Stat>,
}

impl Scale {
    /// Combines the repeats of one runner.
    pub fn combine(runs: Vec<ScaleRun>) -> Option<Scale> {
        let first = runs.first()?;
        let med = |f: &dyn Fn(&ScaleRun) -> f64| {
            Stat::of(runs.iter().map(f).collect()).map_or(0.0, |s| s.median)
        };
        Some(Scale {
            n: first.n,
            start_secs: med(&|r| r.start_secs),
            nofile_limit: first.nofile_limit,
            completed: runs.iter().all(|r| r.reported == r.n),
            reported: runs.iter().map(|r| r.reported).min().unwrap_or(0),
            peak_fds: runs.iter().map(|r| r.peak_fds).max().unwrap_or(0),
            extra_threads: runs.iter().map(|r| r.extra_threads).max().unwrap_or(0),
            kib_per_child: med(&|r| r.kib_per_child),
            kill_reap_secs: Stat::of(runs.iter().map(|r| r.kill_reap_secs).collect())?,
            vs_raw_pidfd: None,
        })
    }
}

/// A whole bench run.
#[derive(Debug, Serialize)]
pub struct Report {
    /// childwatch's version.
    pub version: &'static str,
    /// `uname -r`.
    pub kernel: String,
    /// CPUs available.
    pub cpus: usize,
    /// When the report was made (UTC, RFC 3339).
    pub timestamp: String,
    /// Measurements per figure.
    pub repeat: usize,
    /// What ran.
    pub scenarios: Vec<Scenario>,
    /// Notes shown once.
    pub notes: Vec<String>,
    /// Runners left out, with the reason.
    pub left_out: Vec<LeftOut>,
    /// One row per runner that ran.
    pub rows: Vec<Row>,
    /// The design's targets.
    pub targets: Vec<Verdict>,
}

/// A runner that did not run here.
#[derive(Debug, Serialize)]
pub struct LeftOut {
    /// Its id.
    pub id: String,
    /// Why.
    pub why: String,
}

impl Report {
    /// Builds the report; rows of runners that could not run move to
    /// `left_out`.
    pub fn new(plan: &Plan, rows: Vec<Row>) -> Report {
        let mut left_out: Vec<LeftOut> = plan
            .left_out
            .iter()
            .map(|(w, why)| LeftOut {
                id: w.id(),
                why: why.clone(),
            })
            .collect();
        let (gone, rows): (Vec<Row>, Vec<Row>) =
            rows.into_iter().partition(|r| r.unavailable.is_some());
        left_out.extend(gone.into_iter().map(|r| LeftOut {
            id: r.id,
            why: r.unavailable.unwrap_or_default(),
        }));
        Report {
            version: env!("CARGO_PKG_VERSION"),
            kernel: sys::kernel(),
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            timestamp: utc_now(),
            repeat: plan.repeat,
            scenarios: plan.scenarios.clone(),
            targets: targets::evaluate(&rows, &left_out),
            notes: plan.notes.clone(),
            left_out,
            rows,
        }
    }

    /// The row of `who`.
    pub fn row(&self, who: Who) -> Option<&Row> {
        self.rows.iter().find(|r| r.who == who)
    }
}

/// The current time as RFC 3339 UTC.
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as libc::time_t)
        .unwrap_or(0);
    // SAFETY: gmtime_r writes into the tm we own; both pointers are valid.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    if unsafe { libc::gmtime_r(&secs, &mut tm) }.is_null() {
        return secs.to_string();
    }
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// Fills in every ratio to the raw baselines' medians.
pub fn compute_ratios(rows: &mut [Row]) {
    let raw = rows.iter().find(|r| r.who == Who::Raw);
    let raw_tp = raw.and_then(|r| r.throughput.as_ref().map(|t| t.secs.median));
    let raw_p50 = raw.and_then(|r| {
        r.latency
            .as_ref()
            .and_then(|l| l.p50_us_alone.as_ref().map(|s| s.median))
    });
    let raw_scale = rows
        .iter()
        .find(|r| r.who == Who::RawPidfd)
        .and_then(|r| r.scale.as_ref().map(|s| s.kill_reap_secs.median));
    for r in rows {
        if let (Some(t), Some(raw)) = (r.throughput.as_mut(), raw_tp) {
            t.vs_raw = Some(t.secs.map(|s| raw / s));
        }
        if let (Some(l), Some(raw)) = (r.latency.as_mut(), raw_p50) {
            l.p50_vs_raw = l.p50_us_alone.as_ref().map(|p| p.map(|x| x / raw));
        }
        if let (Some(s), Some(raw)) = (r.scale.as_mut(), raw_scale) {
            s.vs_raw_pidfd = Some(s.kill_reap_secs.map(|t| t / raw));
        }
    }
}

// ------------------------------------------------------------------ tables

fn f2(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into())
}

fn us(x: f64) -> String {
    if x >= 10_000.0 {
        format!("{:.1}ms", x / 1000.0)
    } else {
        format!("{x:.0}µs")
    }
}

/// A figure with its spread when there was more than one sample.
fn spread(s: &Stat) -> String {
    if s.samples.len() > 1 {
        format!("±{:.0}%", s.spread_pct())
    } else {
        String::new()
    }
}

/// Prints the tables.
pub fn print_tables(rep: &Report, sz: &Sizes) {
    println!(
        "childwatch {} bench — Linux {}, {} CPUs, {}; ratios are to the raw baselines of this run",
        rep.version, rep.kernel, rep.cpus, rep.timestamp
    );
    for n in &rep.notes {
        println!("note: {n}");
    }
    if !rep.left_out.is_empty() {
        let names: Vec<String> = rep
            .left_out
            .iter()
            .map(|l| format!("{} ({})", l.id, l.why))
            .collect();
        println!("left out, not available here: {}", names.join("; "));
    }
    let w = rep
        .rows
        .iter()
        .map(|r| r.runner.len())
        .max()
        .unwrap_or(10)
        .max(24);
    let errs = |r: &Row, what: &str| -> Option<String> {
        r.errors
            .iter()
            .find(|e| e.starts_with(what))
            .map(|e| format!("{:<w$}  error: {e}", r.runner))
    };
    let times = if rep.repeat > 1 {
        format!("median of {} runs, ", rep.repeat)
    } else {
        String::new()
    };
    if rep.scenarios.contains(&Scenario::Throughput) {
        println!(
            "\nthroughput: {} × /bin/true, {} in flight, {times}each the best of {BATCHES} batches (vs raw: higher is faster)",
            sz.throughput, sz.inflight
        );
        println!(
            "{:<w$}  {:>9}  {:>6}  {:>10}  {:>7}",
            "runner", "time", "spread", "spawns/s", "vs raw"
        );
        for r in &rep.rows {
            if let Some(t) = &r.throughput {
                println!(
                    "{:<w$}  {:>8.3}s  {:>6}  {:>10.0}  {:>7}",
                    r.runner,
                    t.secs.median,
                    spread(&t.secs),
                    t.per_sec,
                    f2(t.vs_raw.as_ref().map(|v| v.median))
                );
            } else if let Some(l) = errs(r, "throughput") {
                println!("{l}");
            }
        }
    }
    if rep.scenarios.contains(&Scenario::Mixed) {
        println!(
            "\nmixed: {} short children while {} long-lived ones are watched, {times}each the best of {BATCHES} batches",
            sz.mixed, sz.mixed
        );
        println!(
            "{:<w$}  {:>10}  {:>10}  {:>9}  {:>12}",
            "runner", "none", "watched", "slowdown", "range"
        );
        for r in &rep.rows {
            if let Some(m) = &r.mixed {
                println!(
                    "{:<w$}  {:>9.3}s  {:>9.3}s  {:>+8.1}%  {:>12}",
                    r.runner,
                    m.none_watched_secs.median,
                    m.watched_secs.median,
                    m.slowdown_pct.median,
                    if m.slowdown_pct.samples.len() > 1 {
                        format!("{:+.1}–{:+.1}", m.slowdown_pct.min, m.slowdown_pct.max)
                    } else {
                        String::new()
                    }
                );
            } else if let Some(l) = errs(r, "mixed").or_else(|| errs(r, "holding")) {
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
            "\nlatency: kill → exit reported, {} samples, alone and with {} other children watched ({times}of p50 and p99)",
            sz.latency_samples, others
        );
        println!(
            "{:<w$}  {:>8}  {:>6}  {:>8}  {:>8}  {:>8}  {:>10}",
            "runner", "p50", "spread", "p99", "p50+", "p99+", "p50 vs raw"
        );
        let m = |s: &Option<Stat>| s.as_ref().map(|s| us(s.median)).unwrap_or("-".into());
        for r in &rep.rows {
            if let Some(l) = &r.latency {
                println!(
                    "{:<w$}  {:>8}  {:>6}  {:>8}  {:>8}  {:>8}  {:>10}",
                    r.runner,
                    m(&l.p50_us_alone),
                    l.p50_us_alone.as_ref().map(spread).unwrap_or_default(),
                    m(&l.p99_us_alone),
                    m(&l.p50_us_with_others),
                    m(&l.p99_us_with_others),
                    f2(l.p50_vs_raw.as_ref().map(|v| v.median))
                );
            } else if let Some(l) = errs(r, "latency") {
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
            "{:<w$}  {:>9}  {:>8}  {:>8}  {:>10}  {:>9}  {:>10}  {:>6}  {:>8}",
            "runner",
            "completed",
            "peak fds",
            "threads",
            "KiB/child",
            "start",
            "kill+reap",
            "spread",
            "vs pidfd"
        );
        for r in &rep.rows {
            if let Some(s) = &r.scale {
                println!(
                    "{:<w$}  {:>9}  {:>8}  {:>8}  {:>10.2}  {:>8.2}s  {:>9.3}s  {:>6}  {:>8}",
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
                    s.kill_reap_secs.median,
                    spread(&s.kill_reap_secs),
                    f2(s.vs_raw_pidfd.as_ref().map(|v| v.median))
                );
            } else if let Some(l) = errs(r, "scale") {
                println!("{l}");
            }
        }
    }
    if !rep.targets.is_empty() {
        println!("\ndesign targets (this run):");
        for t in &rep.targets {
            println!(
                "  {:<13}  {:<w$}  {}: {}",
                t.outcome.as_str(),
                t.runner,
                t.target,
                t.detail
            );
        }
    }
}

// ------------------------------------------------------------------ CSV

/// Writes one CSV line per runner, scenario and figure, each with the
/// version, kernel and timestamp of the run.
pub fn write_csv(rep: &Report, out: impl Write) -> Result<()> {
    let mut w = csv::Writer::from_writer(out);
    w.write_record([
        "version",
        "kernel",
        "timestamp",
        "runner",
        "scenario",
        "figure",
        "unit",
        "median",
        "min",
        "max",
        "samples",
    ])?;
    let mut line = |r: &Row, scenario: &str, figure: &str, unit: &str, s: &Stat| {
        w.write_record([
            rep.version,
            &rep.kernel,
            &rep.timestamp,
            &r.id,
            scenario,
            figure,
            unit,
            &s.median.to_string(),
            &s.min.to_string(),
            &s.max.to_string(),
            &s.samples.len().to_string(),
        ])
    };
    for r in &rep.rows {
        if let Some(t) = &r.throughput {
            line(r, "throughput", "time", "s", &t.secs)?;
            if let Some(v) = &t.vs_raw {
                line(r, "throughput", "vs_raw", "x", v)?;
            }
        }
        if let Some(m) = &r.mixed {
            line(r, "mixed", "none_watched", "s", &m.none_watched_secs)?;
            line(r, "mixed", "watched", "s", &m.watched_secs)?;
            line(r, "mixed", "slowdown", "%", &m.slowdown_pct)?;
        }
        if let Some(l) = &r.latency {
            for (name, s) in [
                ("p50_alone", &l.p50_us_alone),
                ("p99_alone", &l.p99_us_alone),
                ("p50_with_others", &l.p50_us_with_others),
                ("p99_with_others", &l.p99_us_with_others),
            ] {
                if let Some(s) = s {
                    line(r, "latency", name, "us", s)?;
                }
            }
        }
        if let Some(s) = &r.scale {
            line(r, "scale", "kill_reap", "s", &s.kill_reap_secs)?;
            if let Some(v) = &s.vs_raw_pidfd {
                line(r, "scale", "vs_raw_pidfd", "x", v)?;
            }
        }
    }
    w.flush()?;
    Ok(())
}

// ------------------------------------------------------------------ chart

/// One panel's bars: runner label, median, min, max.
type Bars = Vec<(String, f64, f64, f64)>;

/// Draws one panel per scenario into an SVG file: each runner's median as
/// a bar with its min–max as an error bar, the raw baseline as a line.
pub fn plot(rep: &Report, path: &Path) -> Result<()> {
    use plotters::prelude::*;

    let mut panels: Vec<(String, Bars, Option<f64>)> = Vec::new();
    let bar = |r: &Row, s: &Stat| (r.runner.clone(), s.median, s.min, s.max);
    let tp: Bars = rep
        .rows
        .iter()
        .filter_map(|r| {
            r.throughput
                .as_ref()
                .map(|t| bar(r, &t.secs.map(|x| t.n as f64 / x)))
        })
        .collect();
    if !tp.is_empty() {
        let raw = rep
            .row(Who::Raw)
            .and_then(|r| r.throughput.as_ref().map(|t| t.per_sec));
        panels.push(("throughput: spawns/s (higher is better)".into(), tp, raw));
    }
    let mx: Bars = rep
        .rows
        .iter()
        .filter_map(|r| r.mixed.as_ref().map(|m| bar(r, &m.slowdown_pct)))
        .collect();
    if !mx.is_empty() {
        let raw = rep
            .row(Who::Raw)
            .and_then(|r| r.mixed.as_ref().map(|m| m.slowdown_pct.median));
        panels.push((
            "mixed: slowdown % while others are watched (lower is better)".into(),
            mx,
            raw,
        ));
    }
    let lat: Bars = rep
        .rows
        .iter()
        .filter_map(|r| {
            r.latency
                .as_ref()
                .and_then(|l| l.p50_us_alone.as_ref().map(|s| bar(r, s)))
        })
        .collect();
    if !lat.is_empty() {
        let raw = rep.row(Who::Raw).and_then(|r| {
            r.latency
                .as_ref()
                .and_then(|l| l.p50_us_alone.as_ref().map(|s| s.median))
        });
        panels.push((
            "latency: kill → exit reported, p50 µs (lower is better)".into(),
            lat,
            raw,
        ));
    }
    let sc: Bars = rep
        .rows
        .iter()
        .filter_map(|r| r.scale.as_ref().map(|s| bar(r, &s.kill_reap_secs)))
        .collect();
    if !sc.is_empty() {
        let raw = rep
            .row(Who::RawPidfd)
            .and_then(|r| r.scale.as_ref().map(|s| s.kill_reap_secs.median));
        panels.push((
            "scale: kill + reap all, s (lower is better)".into(),
            sc,
            raw,
        ));
    }
    if panels.is_empty() {
        anyhow::bail!("nothing to plot: no scenario produced figures");
    }
    let height = panels
        .iter()
        .map(|p| 120 + 22 * p.1.len() as u32)
        .sum::<u32>();
    let root = SVGBackend::new(path, (900, height)).into_drawing_area();
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        root.fill(&WHITE)?;
        let sizes: Vec<u32> = panels.iter().map(|p| 120 + 22 * p.1.len() as u32).collect();
        let mut areas = Vec::new();
        let mut rest = root.clone();
        for (i, h) in sizes.iter().enumerate() {
            if i + 1 == sizes.len() {
                areas.push(rest.clone());
                break;
            }
            let (a, b) = rest.split_vertically(*h);
            areas.push(a);
            rest = b;
        }
        for ((title, bars, raw), area) in panels.iter().zip(areas) {
            let hi = bars
                .iter()
                .map(|b| b.3)
                .chain(raw.iter().copied())
                .fold(0.0f64, f64::max)
                * 1.1;
            let lo = bars
                .iter()
                .map(|b| b.2)
                .chain(raw.iter().copied())
                .fold(0.0f64, f64::min);
            let n = bars.len();
            let mut chart = ChartBuilder::on(&area)
                .caption(title, ("sans-serif", 16))
                .margin(8)
                .x_label_area_size(28)
                .y_label_area_size(200)
                .build_cartesian_2d(lo..hi.max(lo + 1e-9), (0..n).into_segmented())?;
            // Row i (top to bottom) sits in segment n-1-i.
            let labels: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
            chart
                .configure_mesh()
                .disable_y_mesh()
                .y_labels(n + 1)
                .y_label_formatter(&|v| match v {
                    SegmentValue::CenterOf(i) if *i < n => labels[n - 1 - *i].clone(),
                    _ => String::new(),
                })
                .draw()?;
            chart.draw_series(bars.iter().enumerate().map(|(i, b)| {
                let y = n - 1 - i;
                let mut r = Rectangle::new(
                    [
                        (0.0f64.max(lo), SegmentValue::Exact(y)),
                        (b.1, SegmentValue::Exact(y + 1)),
                    ],
                    BLUE.mix(0.5).filled(),
                );
                r.set_margin(3, 3, 0, 0);
                r
            }))?;
            chart.draw_series(bars.iter().enumerate().map(|(i, b)| {
                let y = SegmentValue::CenterOf(n - 1 - i);
                PathElement::new(vec![(b.2, y.clone()), (b.3, y)], BLACK.stroke_width(2))
            }))?;
            if let Some(r) = raw {
                chart
                    .draw_series(std::iter::once(PathElement::new(
                        vec![(*r, SegmentValue::Exact(0)), (*r, SegmentValue::Exact(n))],
                        RED.stroke_width(2),
                    )))?
                    .label("raw baseline")
                    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED));
                chart
                    .configure_series_labels()
                    .background_style(WHITE.mix(0.8))
                    .border_style(BLACK)
                    .draw()?;
            }
        }
        root.present()?;
        Ok(())
    };
    draw()
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("cannot draw the chart {}", path.display()))
}
