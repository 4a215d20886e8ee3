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

mod watcher_util;

use std::sync::Arc;
use std::time::Instant;

use childwatch::{
    ChildWatcher, FastChildWatcher, LoopKind, MultiLoopChildWatcher, PidfdChildWatcher, ReturnCode,
    SafeChildWatcher, ThreadedChildWatcher,
};
use watcher_util::*;

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

/// Spawns `n` × `/bin/true` with `in_flight` alive at a time through `w` on
/// `kind`; returns the elapsed time.
fn true_run(w: Arc<dyn ChildWatcher>, kind: LoopKind, n: usize, in_flight: usize) -> f64 {
    let env = Env::new(kind, w).expect("loop");
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t0 = Instant::now();
    env.run(async {
        for i in 0..n {
            if i >= in_flight {
                let need = i - in_flight + 1;
                until(
                    || done.load(std::sync::atomic::Ordering::SeqCst) >= need,
                    "exits",
                )
                .await;
            }
            #[allow(clippy::zombie_processes)] // the watcher reaps it
            let child = std::process::Command::new("/bin/true").spawn().unwrap();
            let d = Arc::clone(&done);
            env.w
                .add_child_handler(
                    child.id() as i32,
                    Box::new(move |_, rc| {
                        assert_eq!(rc, 0);
                        d.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }),
                )
                .unwrap();
        }
        until(
            || done.load(std::sync::atomic::Ordering::SeqCst) >= n,
            "all",
        )
        .await;
    });
    t0.elapsed().as_secs_f64()
}

/// `waitpid(-1)`: reaps any one child.
fn wait_any() {
    let mut status = 0;
    // SAFETY: waitpid(2) with a valid out-pointer.
    let r = unsafe { libc::waitpid(-1, &mut status, 0) };
    assert!(r > 0, "waitpid(-1)");
}

/// Rough throughput of each watcher (2,000 × /bin/true, 64 in flight)
/// against a plain spawn + `waitpid(-1)` loop. Prints, asserts only
/// correctness; run alone (Fast reaps everything):
/// `cargo test --release --test watcher_stress -- --ignored --nocapture throughput`
#[test]
#[ignore = "measurement; run alone with --release --nocapture"]
fn throughput() {
    const N: usize = 2000;
    const IN_FLIGHT: usize = 64;
    let t0 = Instant::now();
    let mut live = 0;
    for _ in 0..N {
        if live == IN_FLIGHT {
            wait_any();
            live -= 1;
        }
        #[allow(clippy::zombie_processes)] // reaped by waitpid(-1) below
        let _child = std::process::Command::new("/bin/true").spawn().unwrap();
        live += 1;
    }
    while live > 0 {
        wait_any();
        live -= 1;
    }
    let raw = t0.elapsed().as_secs_f64();
    eprintln!("raw spawn + waitpid(-1): {N} in {raw:.3} s");
    let watchers: [(&str, fn() -> Arc<dyn ChildWatcher>); 5] = [
        ("threaded", || {
            Arc::new(ThreadedChildWatcher::new().unwrap())
        }),
        ("safe", || Arc::new(SafeChildWatcher::new().unwrap())),
        ("fast", || Arc::new(FastChildWatcher::new().unwrap())),
        ("multi_loop", || {
            Arc::new(MultiLoopChildWatcher::new().unwrap())
        }),
        ("pidfd", || Arc::new(PidfdChildWatcher::new().unwrap())),
    ];
    for kind in [LoopKind::Proactor, LoopKind::Selector] {
        for (name, make) in watchers {
            let t = true_run(make(), kind, N, IN_FLIGHT);
            eprintln!(
                "{name:>10} on {kind}: {N} in {t:.3} s = {:.2} x raw throughput",
                raw / t
            );
        }
    }
}
