//! The design's performance targets, judged against a run's figures with
//! their spread: a target is "met" when every repeat meets it, "NOT met"
//! when none does, and "within noise" when the repeats fall on both sides.

use serde::Serialize;

use super::Who;
use super::measure::Stat;
use super::report::{LeftOut, Row};
use crate::watchers::{self, WatcherName};

/// How a target came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Every repeat meets it.
    Met,
    /// No repeat meets it.
    NotMet,
    /// Some repeats do, some do not.
    WithinNoise,
    /// The runner could not be measured here.
    NotMeasured,
}

impl Outcome {
    /// As printed.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Met => "met",
            Outcome::NotMet => "NOT met",
            Outcome::WithinNoise => "within noise",
            Outcome::NotMeasured => "not measured",
        }
    }

    /// Both must hold.
    fn and(self, other: Outcome) -> Outcome {
        use Outcome::*;
        match (self, other) {
            (NotMeasured, _) | (_, NotMeasured) => NotMeasured,
            (NotMet, _) | (_, NotMet) => NotMet,
            (WithinNoise, _) | (_, WithinNoise) => WithinNoise,
            (Met, Met) => Met,
        }
    }

    fn from_bool(b: bool) -> Outcome {
        if b { Outcome::Met } else { Outcome::NotMet }
    }
}

/// `s` at least `bound` (or at most, with `at_most`), judged over its range.
pub fn judge(s: &Stat, bound: f64, at_most: bool) -> Outcome {
    let (good_all, good_none) = if at_most {
        (s.max <= bound, s.min > bound)
    } else {
        (s.min >= bound, s.max < bound)
    };
    if good_all {
        Outcome::Met
    } else if good_none {
        Outcome::NotMet
    } else {
        Outcome::WithinNoise
    }
}

/// `a` ahead of (not below) `b`: met when a's worst is at least b's best.
fn ahead(a: &Stat, b: &Stat) -> Outcome {
    if a.min >= b.max {
        Outcome::Met
    } else if a.max < b.min {
        Outcome::NotMet
    } else {
        Outcome::WithinNoise
    }
}

/// Whether one runner met one of the design's targets.
#[derive(Debug, Serialize)]
pub struct Verdict {
    /// The target.
    pub target: &'static str,
    /// The runner's name.
    pub runner: String,
    /// The outcome.
    pub outcome: Outcome,
    /// The figures behind it.
    pub detail: String,
}

fn f2(v: Option<&Stat>) -> String {
    v.map(|s| format!("{:.2}", s.median))
        .unwrap_or_else(|| "-".into())
}

/// Checks the design's performance targets against this run's figures.
pub fn evaluate(rows: &[Row], left_out: &[LeftOut]) -> Vec<Verdict> {
    let mut out = Vec::new();
    let find = |who: Who| rows.iter().find(|r| r.who == who);
    let tokio = find(Who::Tokio);
    let asyncp = find(Who::AsyncProcess);
    fn tput(r: Option<&Row>) -> Option<&Stat> {
        r.and_then(|r| r.throughput.as_ref())
            .and_then(|t| t.vs_raw.as_ref())
    }
    fn t_scale(r: Option<&Row>) -> Option<&Stat> {
        r.and_then(|r| r.scale.as_ref()).map(|s| &s.kill_reap_secs)
    }
    for r in rows {
        let Who::Ours(kind, _) = r.who else { continue };
        // Throughput is the default watcher's promise (and Uring's).
        let headline = kind == watchers::default_pick() || kind == WatcherName::Uring;
        if let (Some(v), true) = (tput(Some(r)), headline) {
            let (tk, ap) = (tput(tokio), tput(asyncp));
            let mut o = judge(v, 0.97, false);
            if let Some(t) = tk {
                o = o.and(ahead(v, t));
            }
            if let Some(a) = ap {
                o = o.and(ahead(v, a));
            }
            out.push(Verdict {
                target: "throughput >= 0.97x raw and >= tokio, async-process",
                runner: r.runner.clone(),
                outcome: o,
                detail: format!(
                    "{:.2}x raw ({:.2}–{:.2}); tokio {}, async-process {}",
                    v.median,
                    v.min,
                    v.max,
                    f2(tk),
                    f2(ap)
                ),
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
                outcome: judge(&m.slowdown_pct, 10.0, true),
                detail: format!(
                    "{:+.1}% ({:+.1}–{:+.1})",
                    m.slowdown_pct.median, m.slowdown_pct.min, m.slowdown_pct.max
                ),
            });
        }
        if kind == WatcherName::Uring {
            if let Some(s) = &r.scale {
                let budget = s.nofile_limit / 2;
                let fixed = Outcome::from_bool(
                    s.completed
                        && s.peak_fds as u64 <= budget + 32
                        && s.extra_threads == 0
                        && s.kib_per_child <= 2.0,
                );
                let speed = s
                    .vs_raw_pidfd
                    .as_ref()
                    .map_or(Outcome::NotMeasured, |v| judge(v, 1.5, true));
                out.push(Verdict {
                    target: "scale: all exits, whole process <= fd budget + 32, 0 threads, <= 2 KiB/child, <= 1.5x raw pidfd",
                    runner: r.runner.clone(),
                    outcome: fixed.and(speed),
                    detail: format!(
                        "completed {}, peak fds of the whole process {} (watcher budget {budget}), {} extra threads, {:.2} KiB/child, {}x raw pidfd",
                        s.completed,
                        s.peak_fds,
                        s.extra_threads,
                        s.kib_per_child,
                        f2(s.vs_raw_pidfd.as_ref())
                    ),
                });
            }
            if let (Some(u), Some(t)) = (t_scale(Some(r)), t_scale(tokio)) {
                // Lower is better: ahead when our slowest beats tokio's fastest.
                let o = if u.max < t.min {
                    Outcome::Met
                } else if u.min >= t.max {
                    Outcome::NotMet
                } else {
                    Outcome::WithinNoise
                };
                out.push(Verdict {
                    target: "scale: ahead of tokio",
                    runner: r.runner.clone(),
                    outcome: o,
                    detail: format!(
                        "kill+reap {:.3}s vs tokio {:.3}s (medians)",
                        u.median, t.median
                    ),
                });
            }
        }
    }
    for l in left_out {
        if l.id.starts_with("uring/") {
            out.push(Verdict {
                target: "uring targets",
                runner: l.id.clone(),
                outcome: Outcome::NotMeasured,
                detail: format!("not measured: {}", l.why),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::report::{Throughput, compute_ratios};
    use childwatch::LoopKind;

    fn st(v: &[f64]) -> Stat {
        Stat::of(v.to_vec()).unwrap()
    }

    #[test]
    fn noise_decides_between_met_and_not_met() {
        assert_eq!(judge(&st(&[1.0, 1.1]), 0.97, false), Outcome::Met);
        assert_eq!(judge(&st(&[0.9, 0.95]), 0.97, false), Outcome::NotMet);
        assert_eq!(judge(&st(&[0.95, 1.0]), 0.97, false), Outcome::WithinNoise);
        assert_eq!(judge(&st(&[4.0, 12.0]), 10.0, true), Outcome::WithinNoise);
        assert_eq!(judge(&st(&[4.0, 9.0]), 10.0, true), Outcome::Met);
    }

    fn row(who: Who, secs: &[f64]) -> Row {
        let mut r = Row::new(who);
        r.throughput = Some(Throughput {
            n: 100,
            inflight: 8,
            secs: st(secs),
            per_sec: 0.0,
            vs_raw: None,
        });
        r
    }

    #[test]
    fn ratios_and_targets_come_from_the_same_run() {
        let pick = watchers::default_pick();
        let mut rows = vec![
            row(Who::Raw, &[1.0]),
            row(Who::Ours(pick, LoopKind::Selector), &[1.0]),
            row(Who::Ours(pick, LoopKind::Proactor), &[2.0]),
            row(Who::Tokio, &[1.25]),
        ];
        compute_ratios(&mut rows);
        let ratio = |i: usize| {
            rows[i]
                .throughput
                .as_ref()
                .unwrap()
                .vs_raw
                .as_ref()
                .unwrap()
                .median
        };
        assert_eq!(
            (ratio(0), ratio(1), ratio(2), ratio(3)),
            (1.0, 1.0, 0.5, 0.8)
        );
        let verdicts = evaluate(&rows, &[]);
        let outcome = |id: &str| {
            verdicts
                .iter()
                .find(|v| v.runner == id && v.target.starts_with("throughput"))
                .map(|v| v.outcome)
        };
        assert_eq!(outcome(&format!("{pick}/selector")), Some(Outcome::Met));
        assert_eq!(outcome(&format!("{pick}/proactor")), Some(Outcome::NotMet));
        // Repeats on both sides of tokio: within noise.
        let mut rows = vec![
            row(Who::Raw, &[1.0]),
            row(Who::Ours(pick, LoopKind::Selector), &[0.9, 1.0, 1.02]),
            row(Who::Tokio, &[0.98]),
        ];
        compute_ratios(&mut rows);
        let v = evaluate(&rows, &[]);
        assert_eq!(v[0].outcome, Outcome::WithinNoise, "{v:?}");
    }
}
