//! What a `childwatch bench` run will measure: the scenarios, their sizes,
//! how many repeats, and the runners each scenario applies to. Runners this
//! machine cannot run are left out here, with the reason, so the tables
//! show only rows that have figures.

use anyhow::{Result, bail};
use childwatch::LoopKind;

use super::{BenchArgs, PEERS, Scenario, Who, sys};
use crate::watchers::{self, LoopName, WatcherName};

/// Sizes of the scenarios.
#[derive(Clone, Debug)]
pub struct Sizes {
    /// Children spawned for throughput.
    pub throughput: usize,
    /// Children in flight at once.
    pub inflight: usize,
    /// Long-lived and short children for mixed.
    pub mixed: usize,
    /// Live children for scale.
    pub scale: usize,
    /// Latency samples.
    pub latency_samples: usize,
    /// Other watched children for latency.
    pub latency_others: usize,
}

/// A bench run, decided before anything is measured.
#[derive(Debug)]
pub struct Plan {
    /// Scenarios, in order.
    pub scenarios: Vec<Scenario>,
    /// Their sizes.
    pub sizes: Sizes,
    /// Runners, in table order.
    pub whos: Vec<Who>,
    /// The loop kind scale uses for our watchers unless --full.
    pub scale_loop: LoopKind,
    /// --full: scale on both loop kinds.
    pub full: bool,
    /// Measurements per figure.
    pub repeat: usize,
    /// Notes printed once above the tables.
    pub notes: Vec<String>,
    /// Runners left out, and why.
    pub left_out: Vec<(Who, String)>,
}

impl Plan {
    /// Whether `s` is measured.
    pub fn has(&self, s: Scenario) -> bool {
        self.scenarios.contains(&s)
    }

    /// Whether the scale scenario runs for `who`.
    pub fn scales(&self, who: Who) -> bool {
        self.has(Scenario::Scale) && who.does_scale(self.scale_loop, self.full)
    }

    /// Whether throughput, mixed or latency run for `who` (all but the raw
    /// pidfd loop, which is scale's baseline only).
    pub fn loops_apply(&self, who: Who) -> bool {
        who != Who::RawPidfd
            && (self.has(Scenario::Throughput)
                || self.has(Scenario::Mixed)
                || self.has(Scenario::Latency))
    }

    /// Progress steps.
    pub fn steps(&self) -> usize {
        let per = |w: Who| {
            let mut s = 0;
            if w != Who::RawPidfd {
                s += self.has(Scenario::Throughput) as usize
                    + self.has(Scenario::Mixed) as usize
                    + self.has(Scenario::Latency) as usize;
            }
            s * self.repeat + self.scales(w) as usize * self.repeat
        };
        self.whos.iter().map(|&w| per(w)).sum()
    }
}

/// Decides the run from the options.
pub fn plan(args: &BenchArgs) -> Result<Plan> {
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
    let repeat = args.repeat.unwrap_or(if args.quick { 1 } else { 3 });
    let mut notes = Vec::new();
    let mut left_out = Vec::new();

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
        vec![LoopName::Proactor, LoopName::Selector]
    } else {
        args.loops.clone()
    };
    for l in loops {
        let k = match l {
            LoopName::Auto => watchers::loop_kind(l)?,
            LoopName::Proactor => LoopKind::Proactor,
            LoopName::Selector => LoopKind::Selector,
        };
        if !kinds.contains(&k) {
            kinds.push(k);
        }
    }
    let scale_loop = kinds.first().copied().unwrap_or(LoopKind::Selector);
    let mut whos = vec![Who::Raw];
    for w in WatcherName::ALL {
        if !want(w.as_str()) {
            continue;
        }
        for &k in &kinds {
            let who = Who::Ours(w, k);
            match watchers::watcher_support(w) {
                Ok(()) => whos.push(who),
                Err(why) => left_out.push((who, why)),
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
        notes.push(format!(
            "scale: only the runners built for many live children run it: the uring, pidfd and threaded watchers{}, tokio and the raw pidfd loop; the others poll every child on each exit, so they are left out of that table",
            if args.full { "" } else { " (on the first loop kind; both with --full)" }
        ));
    }
    if repeat > 1 {
        notes.push(format!(
            "each figure is measured {repeat} times: the median, with the spread (min–max) around it; a target inside the spread is \"within noise\""
        ));
    }
    Ok(Plan {
        scenarios,
        sizes,
        whos,
        scale_loop,
        full: args.full,
        repeat,
        notes,
        left_out,
    })
}
