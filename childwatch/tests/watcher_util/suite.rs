//! The cases of the shared watcher suite, each a plain function over a loop
//! kind and a watcher factory, so that every test binary can instantiate
//! them (see `watcher_suite!` in `watchers.rs`).

use std::sync::Arc;
use std::time::Duration;

use childwatch::{ChildWatcher, EventLoop, LoopKind, ReturnCode, sleep};

use super::*;

pub type Make = fn() -> Arc<dyn ChildWatcher>;

/// Every exit code 0..=255, 64 children at a time.
pub fn exit_codes(kind: LoopKind, make: Make) {
    let Some(env) = Env::new(kind, make()) else {
        return;
    };
    let rcs: Vec<ReturnCode> = (0..=255).collect();
    env.run(run_batch(&env.w, &rcs, 64));
}

/// SIGTERM → -15, SIGKILL → -9 (sent by us), SIGSEGV → -11 (raised by the
/// child itself).
pub fn signals(kind: LoopKind, make: Make) {
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
pub fn exited_before_add(kind: LoopKind, make: Make) {
    let Some(env) = Env::new(kind, make()) else {
        return;
    };
    env.run(async {
        let log = Log::default();
        // asyncio's `with watcher:` around the spawn (Fast keeps the exit).
        env.w.enter();
        let pid = sh("exit 42");
        wait_zombie(pid);
        // Let the loop take in the SIGCHLD while nothing is registered.
        sleep(Duration::from_millis(20)).await;
        env.w.add_child_handler(pid, log.cb()).unwrap();
        env.w.exit();
        log.wait_for(1).await;
        assert_eq!(log.by_pid()[&pid], vec![42]);
    });
}

/// Registering a pid again replaces its callback; only the last one runs,
/// once.
pub fn replace_handler(kind: LoopKind, make: Make) {
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
pub fn remove_handler(kind: LoopKind, make: Make) {
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
pub fn unknown_pid(kind: LoopKind, make: Make) {
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
pub fn reaped_elsewhere(kind: LoopKind, make: Make) {
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
pub fn many_random(kind: LoopKind, make: Make) {
    let Some(env) = Env::new(kind, make()) else {
        return;
    };
    let mut rng = Rng::new(0x5eed ^ kind as u64);
    let rcs: Vec<ReturnCode> = (0..500).map(|_| rng.returncode()).collect();
    env.run(run_batch(&env.w, &rcs, 128));
}

/// A stop and a continue are not exits: only the final exit is reported.
pub fn stopped_then_continued(kind: LoopKind, make: Make) {
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
pub fn spawned_from_four_loops(kind: LoopKind, make: Make) {
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
                assert!(
                    e.iter().all(|x| x.2 == me),
                    "callback ran on another thread"
                );
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    w.close();
}

/// After close the watcher refuses new children and is inactive.
pub fn closed_refuses(kind: LoopKind, make: Make) {
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
