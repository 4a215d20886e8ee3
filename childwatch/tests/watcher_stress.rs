//! Stress: 100,000 children per watcher (random exit codes and signals, 256
//! in flight), zero lost or wrong. Ignored by default; run one watcher at a
//! time, in release mode:
//!
//! ```text
//! cargo test --release --test watcher_stress -- --ignored --test-threads=1 pidfd
//! ```
//!
//! `CHILDWATCH_STRESS_N` changes the number of children and
//! `CHILDWATCH_STRESS_LOOP=selector` the loop kind (default: proactor).
//! FastChildWatcher reaps every child of the process: never run its test
//! alongside another.

mod common;

use std::sync::Arc;
use std::time::Instant;

use childwatch::{
    ChildWatcher, FastChildWatcher, LoopKind, MultiLoopChildWatcher, PidfdChildWatcher, ReturnCode,
    SafeChildWatcher, ThreadedChildWatcher,
};
use common::*;

fn stress(name: &str, w: Arc<dyn ChildWatcher>) {
    let n: usize = std::env::var("CHILDWATCH_STRESS_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let kind = match std::env::var("CHILDWATCH_STRESS_LOOP").as_deref() {
        Ok("selector") => LoopKind::Selector,
        _ => LoopKind::Proactor,
    };
    let Some(env) = Env::new(kind, w) else { return };
    let mut rng = Rng::new(0xdead_beef);
    let rcs: Vec<ReturnCode> = (0..n).map(|_| rng.returncode()).collect();
    let t0 = Instant::now();
    env.run(run_batch(&env.w, &rcs, 256));
    let dt = t0.elapsed();
    eprintln!(
        "stress {name} on {kind}: {n} children, all exact, in {:.1} s ({:.0} children/s)",
        dt.as_secs_f64(),
        n as f64 / dt.as_secs_f64()
    );
    assert_eq!(zombie_children(), Vec::<i32>::new());
}

macro_rules! stress_tests {
    ($($name:ident => $make:expr),* $(,)?) => {
        $(
            #[test]
            #[ignore = "stress: 100,000 children; run alone with --release"]
            fn $name() {
                stress(stringify!($name), Arc::new($make));
            }
        )*
    };
}

stress_tests!(
    threaded => ThreadedChildWatcher::new().unwrap(),
    safe => SafeChildWatcher::new().unwrap(),
    fast => FastChildWatcher::new().unwrap(),
    multi_loop => MultiLoopChildWatcher::new().unwrap(),
    pidfd => PidfdChildWatcher::new().unwrap(),
);
