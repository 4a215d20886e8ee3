//! After `close()` a watcher leaves no thread, descriptor or zombie behind.
//!
//! Counting `/proc/self/fd` and `/proc/self/task` needs a quiet process, so
//! this binary holds ONE test that visits every watcher and loop kind in
//! turn (the test harness's own threads then stay put while we count), and
//! compares before/after with a settle loop rather than a single reading.

mod watcher_util;

use std::sync::Arc;
use std::time::{Duration, Instant};

use childwatch::{
    ChildWatcher, EventLoop, LoopKind, MultiLoopChildWatcher, PidfdChildWatcher, ReturnCode,
    SafeChildWatcher, ThreadedChildWatcher, sleep,
};
use watcher_util::*;

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

fn fds() -> usize {
    count("/proc/self/fd")
}

fn threads() -> usize {
    count("/proc/self/task")
}

/// Runs `lp` until the fd and thread counts are back to `base` (a hang
/// guard of PATIENCE), and returns the last counts seen.
fn settle(lp: &EventLoop, base: (usize, usize)) -> (usize, usize) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        lp.run_until_complete(sleep(Duration::from_millis(2)))
            .unwrap();
        let now = (fds(), threads());
        if now == base || Instant::now() > deadline {
            return now;
        }
    }
}

type Make = fn() -> Arc<dyn ChildWatcher>;

/// Children that all exit before `close()`.
fn after_exits(name: &str, kind: LoopKind, make: Make) {
    let Some(lp) = new_loop(kind) else { return };
    let base = settle(&lp, (fds(), threads()));
    let w = make();
    w.attach_loop(Some(&lp));
    let mut rng = Rng::new(77);
    let rcs: Vec<ReturnCode> = (0..100).map(|_| rng.returncode()).collect();
    lp.run_until_complete(run_batch(&w, &rcs, 32)).unwrap();
    w.close();
    drop(w);
    assert_eq!(
        settle(&lp, base),
        base,
        "{name}/{kind}: (fds, threads) after close"
    );
    assert_eq!(
        zombie_children(),
        Vec::<i32>::new(),
        "{name}/{kind}: zombies"
    );
    lp.close().unwrap();
}

/// `close()` while children still run: the watcher lets go of them (no fd,
/// no thread of its own stays once they are gone); we then kill and reap
/// them, unless the watcher's uncancellable waiter threads do.
fn with_live_children(name: &str, kind: LoopKind, make: Make) {
    let Some(lp) = new_loop(kind) else { return };
    let base = settle(&lp, (fds(), threads()));
    let w = make();
    w.attach_loop(Some(&lp));
    let log = Log::default();
    let pids: Vec<i32> = lp
        .run_until_complete(async {
            let pids: Vec<i32> = (0..10).map(|_| sh("exec sleep 30")).collect();
            for &pid in &pids {
                w.add_child_handler(pid, log.cb()).unwrap();
            }
            sleep(Duration::from_millis(5)).await;
            pids
        })
        .unwrap();
    w.close();
    drop(w);
    // Descriptors go at close, while the children still run (waiter threads
    // of Threaded stay until their child exits).
    let deadline = Instant::now() + PATIENCE;
    while fds() != base.0 && Instant::now() < deadline {
        lp.run_until_complete(sleep(Duration::from_millis(2)))
            .unwrap();
    }
    assert_eq!(
        fds(),
        base.0,
        "{name}/{kind}: descriptors right after close"
    );
    for &pid in &pids {
        kill(pid, libc::SIGKILL);
        let _ = reap(pid);
    }
    assert_eq!(
        settle(&lp, base),
        base,
        "{name}/{kind}: (fds, threads) after close"
    );
    assert_eq!(log.len(), 0, "{name}/{kind}: no callback after close");
    assert_eq!(
        zombie_children(),
        Vec::<i32>::new(),
        "{name}/{kind}: zombies"
    );
    lp.close().unwrap();
}

/// Pidfd: one descriptor per live child, closed again by
/// remove_child_handler.
fn pidfd_remove_closes_descriptors(kind: LoopKind) {
    let Some(lp) = new_loop(kind) else { return };
    let w = PidfdChildWatcher::new().unwrap();
    let base = settle(&lp, (fds(), threads()));
    let pids: Vec<i32> = lp
        .run_until_complete(async {
            let pids: Vec<i32> = (0..10).map(|_| sh("exec sleep 30")).collect();
            for &pid in &pids {
                w.add_child_handler(pid, Box::new(|_, _| panic!("replaced")))
                    .unwrap();
                // Same pid again: the callback is replaced, no second wait.
                w.add_child_handler(pid, Box::new(|_, _| panic!("removed")))
                    .unwrap();
            }
            pids
        })
        .unwrap();
    assert_eq!(w.watched(), 10);
    assert_eq!(fds(), base.0 + 10, "one pidfd per live child");
    for &pid in &pids {
        assert!(w.remove_child_handler(pid));
    }
    assert_eq!(settle(&lp, base), base, "{kind}: pidfds closed by remove");
    for &pid in &pids {
        kill(pid, libc::SIGKILL);
        assert!(
            reap(pid).is_some(),
            "a removed child is not reaped by the watcher"
        );
    }
    w.close();
    lp.close().unwrap();
}

#[test]
fn close_leaves_nothing_behind() {
    let watchers: [(&str, Make); 4] = [
        ("threaded", || {
            Arc::new(ThreadedChildWatcher::new().unwrap())
        }),
        ("safe", || Arc::new(SafeChildWatcher::new().unwrap())),
        ("multi_loop", || {
            Arc::new(MultiLoopChildWatcher::new().unwrap())
        }),
        ("pidfd", || Arc::new(PidfdChildWatcher::new().unwrap())),
    ];
    for kind in [LoopKind::Selector, LoopKind::Proactor] {
        for (name, make) in watchers {
            after_exits(name, kind, make);
            with_live_children(name, kind, make);
        }
        pidfd_remove_closes_descriptors(kind);
    }
}
