//! The shared suite every child watcher must pass, with real children, on
//! both loop kinds. `watcher_suite!` instantiates it for one watcher; adding
//! a watcher is one line at the bottom.
//!
//! Fast reaps every child of the process, so it cannot share this binary
//! with other tests: its tests live in `fast_watcher.rs`. Descriptor and
//! thread counts need a quiet process: they live in `watcher_resources.rs`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use childwatch::{
    ChildWatcher, EventLoop, LoopKind, MultiLoopChildWatcher, PidfdChildWatcher, ReturnCode,
    SafeChildWatcher, ThreadedChildWatcher, sleep,
};
use common::*;

type Make = fn() -> Arc<dyn ChildWatcher>;

/// Every exit code 0..=255, 64 children at a time.
fn exit_codes(kind: LoopKind, make: Make) {
    let Some(env) = Env::new(kind, make()) else {
        return;
    };
    let rcs: Vec<ReturnCode> = (0..=255).collect();
    env.run(run_batch(&env.w, &rcs, 64));
}

/// SIGTERM → -15, SIGKILL → -9 (sent by us), SIGSEGV → -11 (raised by the
/// child itself).
fn signals(kind: LoopKind, make: Make) {
    let Some(env) = Env::new(kind, make()) else {
        return;
    };
    env.run(async {
        let log = Log::default();
        let term = sh("exec sleep 30");
        let killed = sh("exec sleep 30");
        let segv = sh("ulimit -c 0; kill -SEGV $$; sleep 5");
        for pid in [term, killed, segv] {
            env.w.add_child_handler(pid, log.cb()).unwrap();
        }
        kill(term, libc::SIGTERM);
        kill(killed, libc::SIGKILL);
        log.wait_for(3).await;
        let got = log.by_pid();
        assert_eq!(got[&term], vec![-15]);
        assert_eq!(got[&killed], vec![-9]);
        assert_eq!(got[&segv], vec![-11]);
    });
}

/// A child that is already a zombie when its handler is added.
fn exited_before_add(kind: LoopKind, make: Make) {
    let Some(env) = Env::new(kind, make()) else {
        return;
    };
    env.run(async {
        let log = Log::default();
        let pid = sh("exit 42");
        wait_zombie(pid);
        env.w.add_child_handler(pid, log.cb()).unwrap();
        log.wait_for(1).await;
        assert_eq!(log.by_pid()[&pid], vec![42]);
    });
}

/// Registering a pid again replaces its callback; only the last one runs,
/// once.
fn replace_handler(kind: LoopKind, make: Make) {
    let Some(env) = Env::new(kind, make()) else {
        return;
    };
    env.run(async {
        let log = Log::default();
        let pid = sh("exec sleep 30");
        env.w.add_child_handler(pid, log.tagged("first")).unwrap();
        env.w.add_child_handler(pid, log.tagged("second")).unwrap();
        kill(pid, libc::SIGTERM);
        log.wait_for(1).await;
        sleep(Duration::from_millis(50)).await;
        let e = log.entries();
        assert_eq!(e.len(), 1, "exactly one callback: {e:?}");
        assert_eq!((e[0].0, e[0].1, e[0].3), (pid, -15, "second"));
    });
}

/// A removed handler never runs; removing twice or an unknown pid is false.
fn remove_handler(kind: LoopKind, make: Make) {
    let Some(env) = Env::new(kind, make()) else {
        return;
    };
    let pid = env.run(async {
        let log = Log::default();
        let pid = sh("exec sleep 30");
        let other = sh("exit 5");
        env.w.add_child_handler(pid, log.tagged("removed")).unwrap();
        env.w.add_child_handler(other, log.tagged("kept")).unwrap();
        assert!(env.w.remove_child_handler(pid));
        assert!(!env.w.remove_child_handler(pid));
        assert!(!env.w.remove_child_handler(999_999));
        kill(pid, libc::SIGKILL);
        log.wait_for(1).await;
        sleep(Duration::from_millis(50)).await;
        let e = log.entries();
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!((e[0].0, e[0].1, e[0].3), (other, 5, "kept"));
        pid
    });
    // The removed child is ours to reap, unless a waiter that cannot be
    // cancelled (Threaded) does it: either way no zombie stays.
    let _ = reap(pid);
}

/// A pid that is not our child (init) gives 255 at once, never a hang.
fn unknown_pid(kind: LoopKind, make: Make) {
    let Some(env) = Env::new(kind, make()) else {
        return;
    };
    env.run(async {
        let log = Log::default();
        env.w.add_child_handler(1, log.cb()).unwrap();
        log.wait_for(1).await;
        assert_eq!(log.by_pid()[&1], vec![255]);
        assert!(env.w.add_child_handler(0, log.cb()).is_err());
        assert!(env.w.add_child_handler(-3, log.cb()).is_err());
    });
}

/// A child we reaped ourselves before registering gives 255.
fn reaped_elsewhere(kind: LoopKind, make: Make) {
    let Some(env) = Env::new(kind, make()) else {
        return;
    };
    env.run(async {
        let log = Log::default();
        let pid = sh("exit 3");
        assert!(reap(pid).is_some());
        env.w.add_child_handler(pid, log.cb()).unwrap();
        log.wait_for(1).await;
        assert_eq!(log.by_pid()[&pid], vec![255]);
    });
}

/// 500 children with random exit codes and signals, 128 at a time.
fn many_random(kind: LoopKind, make: Make) {
    let Some(env) = Env::new(kind, make()) else {
        return;
    };
    let mut rng = Rng::new(0x5eed ^ kind as u64);
    let rcs: Vec<ReturnCode> = (0..500).map(|_| rng.returncode()).collect();
    env.run(run_batch(&env.w, &rcs, 128));
}

/// A stop and a continue are not exits: only the final exit is reported.
fn stopped_then_continued(kind: LoopKind, make: Make) {
    let Some(env) = Env::new(kind, make()) else {
        return;
    };
    env.run(async {
        let log = Log::default();
        let pid = sh("kill -STOP $$; exit 7");
        env.w.add_child_handler(pid, log.cb()).unwrap();
        wait_stopped(pid);
        sleep(Duration::from_millis(30)).await;
        assert_eq!(log.len(), 0, "a stop is not an exit");
        kill(pid, libc::SIGCONT);
        log.wait_for(1).await;
        sleep(Duration::from_millis(30)).await;
        assert_eq!(log.by_pid()[&pid], vec![7]);
    });
}

/// One watcher, four threads each running its own loop and spawning its
/// own children: each callback runs on the thread whose loop registered it.
fn spawned_from_four_loops(kind: LoopKind, make: Make) {
    if new_loop(kind).is_none() {
        return;
    }
    let w = make();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let w = Arc::clone(&w);
            std::thread::spawn(move || {
                let lp = EventLoop::new(kind).unwrap();
                let me = std::thread::current().id();
                let log = Log::default();
                lp.run_until_complete(async {
                    for i in 0..25 {
                        let pid = sh(&format!("exit {}", (t * 25 + i) % 256));
                        w.add_child_handler(pid, log.cb()).unwrap();
                    }
                    log.wait_for(25).await;
                })
                .unwrap();
                lp.close().unwrap();
                let e = log.entries();
                assert_eq!(e.len(), 25);
                assert!(e.iter().all(|x| x.2 == me), "callback ran on another thread");
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    w.close();
}

/// After close the watcher refuses new children and is inactive.
fn closed_refuses(kind: LoopKind, make: Make) {
    let Some(env) = Env::new(kind, make()) else {
        return;
    };
    env.run(async {
        let log = Log::default();
        let pid = sh("exit 1");
        env.w.add_child_handler(pid, log.cb()).unwrap();
        log.wait_for(1).await;
        assert!(env.w.is_active());
        env.w.close();
        assert!(!env.w.is_active());
        let pid2 = sh("exit 2");
        let err = env.w.add_child_handler(pid2, log.cb()).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::Other, "{err}");
        assert!(reap(pid2).is_some());
        assert!(zombie_children().iter().all(|z| *z != pid));
    });
}

macro_rules! cases {
    ($kind:expr; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                crate::$case($kind, super::make)
            }
        )*
    };
}

/// The whole suite for one watcher, on the proactor and the selector.
/// `extra` names cases only some watchers support.
macro_rules! watcher_suite {
    ($name:ident, $make:expr $(, extra: [$($extra:ident),* $(,)?])?) => {
        mod $name {
            use super::*;

            fn make() -> Arc<dyn ChildWatcher> {
                Arc::new($make)
            }

            mod proactor {
                cases!(childwatch::LoopKind::Proactor;
                    exit_codes, signals, exited_before_add, replace_handler, remove_handler,
                    unknown_pid, reaped_elsewhere, many_random, stopped_then_continued,
                    closed_refuses $($(, $extra)*)?);
            }

            mod selector {
                cases!(childwatch::LoopKind::Selector;
                    exit_codes, signals, exited_before_add, replace_handler, remove_handler,
                    unknown_pid, reaped_elsewhere, many_random, stopped_then_continued,
                    closed_refuses $($(, $extra)*)?);
            }
        }
    };
}

watcher_suite!(threaded, ThreadedChildWatcher::new().unwrap(), extra: [spawned_from_four_loops]);
watcher_suite!(safe, SafeChildWatcher::new().unwrap());
watcher_suite!(multi_loop, MultiLoopChildWatcher::new().unwrap(), extra: [spawned_from_four_loops]);
watcher_suite!(pidfd, PidfdChildWatcher::new().unwrap(), extra: [spawned_from_four_loops]);

// ---- watcher-specific behaviour

/// Safe needs an attached loop: without one it refuses, clearly.
#[test]
fn safe_inactive_without_loop() {
    let w = SafeChildWatcher::new().unwrap();
    assert!(!w.is_active());
    let err = w.add_child_handler(12345, Box::new(|_, _| {})).unwrap_err();
    assert!(err.to_string().contains("not activated"), "{err}");
    let lp = EventLoop::selector().unwrap();
    w.attach_loop(Some(&lp));
    assert!(w.is_active());
    lp.close().unwrap();
    assert!(!w.is_active(), "a closed loop deactivates it");
    w.close();
}

/// Exits that happen while Safe is detached are delivered after it is
/// attached again, on the newly attached loop.
#[test]
fn safe_detach_and_reattach_delivers() {
    for kind in [LoopKind::Selector, LoopKind::Proactor] {
        let Some(lp1) = new_loop(kind) else { continue };
        let w = SafeChildWatcher::new().unwrap();
        w.attach_loop(Some(&lp1));
        let log = Log::default();
        let pid = lp1
            .run_until_complete(async {
                let pid = sh("exec sleep 30");
                w.add_child_handler(pid, log.cb()).unwrap();
                pid
            })
            .unwrap();
        w.attach_loop(None);
        assert!(!w.is_active());
        kill(pid, libc::SIGTERM);
        wait_zombie(pid);
        lp1.run_until_complete(sleep(Duration::from_millis(20)))
            .unwrap();
        assert_eq!(log.len(), 0, "nothing is reaped while detached");
        let lp2 = new_loop(kind).unwrap();
        w.attach_loop(Some(&lp2));
        lp2.run_until_complete(log.wait_for(1)).unwrap();
        let e = log.entries();
        assert_eq!((e[0].0, e[0].1), (pid, -15));
        assert_eq!(e[0].2, std::thread::current().id());
        w.close();
        lp1.close().unwrap();
        lp2.close().unwrap();
    }
}

/// Moving Safe from one loop to another keeps it working on the new one,
/// and the old loop no longer reaps.
#[test]
fn safe_moves_between_loops() {
    let lp1 = EventLoop::selector().unwrap();
    let lp2 = EventLoop::selector().unwrap();
    let w = SafeChildWatcher::new().unwrap();
    w.attach_loop(Some(&lp1));
    w.attach_loop(Some(&lp2));
    let log = Log::default();
    lp2.run_until_complete(async {
        let pid = sh("exit 9");
        w.add_child_handler(pid, log.cb()).unwrap();
        log.wait_for(1).await;
        assert_eq!(log.by_pid()[&pid], vec![9]);
    })
    .unwrap();
    // The handler was removed from lp1: closing it is unaffected, and the
    // watcher stays active on lp2.
    lp1.close().unwrap();
    assert!(w.is_active());
    w.close();
    assert!(!w.is_active());
    lp2.close().unwrap();
}

/// MultiLoop and Pidfd are active from new() until close(), loop or not;
/// attach_loop(None) does not deactivate them.
#[test]
fn loopless_watchers_are_active_until_close() {
    let ws: Vec<Arc<dyn ChildWatcher>> = vec![
        Arc::new(MultiLoopChildWatcher::new().unwrap()),
        Arc::new(PidfdChildWatcher::new().unwrap()),
        Arc::new(ThreadedChildWatcher::new().unwrap()),
    ];
    for w in ws {
        assert!(w.is_active());
        w.attach_loop(None);
        assert!(w.is_active());
        // With no loop running the callback runs on some other thread.
        let (tx, rx) = std::sync::mpsc::channel();
        let pid = sh("exit 17");
        w.add_child_handler(pid, Box::new(move |p, rc| tx.send((p, rc)).unwrap()))
            .unwrap();
        assert_eq!(rx.recv_timeout(PATIENCE).unwrap(), (pid, 17));
        w.close();
        assert!(!w.is_active());
        w.close();
    }
}

#[test]
fn pidfd_is_supported_here() {
    // The machines this crate targets run Linux 5.4+.
    assert!(PidfdChildWatcher::is_supported());
}

/// A Pidfd child whose loop closes before it exits is still reported (a
/// waiter thread takes over).
#[test]
fn pidfd_survives_its_loop_closing() {
    let w = PidfdChildWatcher::new().unwrap();
    for kind in [LoopKind::Selector, LoopKind::Proactor] {
        let Some(lp) = new_loop(kind) else { continue };
        let (tx, rx) = std::sync::mpsc::channel();
        let pid = lp
            .run_until_complete(async {
                let pid = sh("exec sleep 30");
                w.add_child_handler(pid, Box::new(move |p, rc| tx.send((p, rc)).unwrap()))
                    .unwrap();
                pid
            })
            .unwrap();
        lp.close().unwrap();
        drop(lp);
        kill(pid, libc::SIGKILL);
        assert_eq!(rx.recv_timeout(PATIENCE).unwrap(), (pid, -9));
    }
    w.close();
}

/// Children still running when a Pidfd watcher closes are left for another
/// watcher, which gets their real status.
#[test]
fn pidfd_close_leaves_live_children_for_a_new_watcher() {
    let lp = EventLoop::selector().unwrap();
    let w1 = PidfdChildWatcher::new().unwrap();
    let w2 = PidfdChildWatcher::new().unwrap();
    let log = Log::default();
    lp.run_until_complete(async {
        let pid = sh("exec sleep 30");
        w1.add_child_handler(pid, log.tagged("old")).unwrap();
        w1.close();
        assert_eq!(w1.watched(), 0);
        w2.add_child_handler(pid, log.tagged("new")).unwrap();
        kill(pid, libc::SIGTERM);
        log.wait_for(1).await;
        sleep(Duration::from_millis(30)).await;
        let e = log.entries();
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!((e[0].0, e[0].1, e[0].3), (pid, -15, "new"));
    })
    .unwrap();
    w2.close();
    lp.close().unwrap();
}
