//! The shared suite every child watcher must pass, with real children, on
//! both loop kinds. `watcher_suite!` instantiates it for one watcher; adding
//! a watcher is one line at the bottom.
//!
//! Fast reaps every child of the process, so it cannot share this binary
//! with other tests: its tests live in `fast_watcher.rs`. Descriptor and
//! thread counts need a quiet process: they live in `watcher_resources.rs`.

mod watcher_util;

use std::sync::Arc;
use std::time::Duration;

use childwatch::{
    ChildWatcher, EventLoop, LoopKind, MultiLoopChildWatcher, PidfdChildWatcher, SafeChildWatcher,
    ThreadedChildWatcher, sleep,
};
use watcher_util::*;

macro_rules! cases {
    ($kind:expr; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                crate::watcher_util::suite::$case($kind, super::make)
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
        assert!(
            !lp1.remove_signal_handler(libc::SIGCHLD),
            "detach removed it"
        );
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
    // The handler left lp1 and the watcher stays active on lp2.
    assert!(
        !lp1.remove_signal_handler(libc::SIGCHLD),
        "lp1 keeps no handler"
    );
    lp1.close().unwrap();
    assert!(w.is_active());
    w.close();
    assert!(!w.is_active());
    assert!(
        !lp2.remove_signal_handler(libc::SIGCHLD),
        "close removed it"
    );
    lp2.close().unwrap();
}

/// Closing Safe from another thread removes its SIGCHLD handler from the
/// loop's own thread (through the loop) at its next iteration.
#[test]
fn safe_close_from_another_thread_removes_the_handler() {
    let lp = EventLoop::selector().unwrap();
    let w = Arc::new(SafeChildWatcher::new().unwrap());
    w.attach_loop(Some(&lp));
    let w2 = Arc::clone(&w);
    std::thread::spawn(move || w2.close()).join().unwrap();
    assert!(!w.is_active());
    lp.run_until_complete(sleep(Duration::from_millis(5)))
        .unwrap();
    assert!(!lp.remove_signal_handler(libc::SIGCHLD));
    lp.close().unwrap();
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

/// Attaching Safe to the loop it is already on keeps one working handler,
/// which close() then removes.
#[test]
fn safe_reattach_same_loop() {
    let lp = EventLoop::proactor()
        .or_else(|_| EventLoop::selector())
        .unwrap();
    let w = SafeChildWatcher::new().unwrap();
    w.attach_loop(Some(&lp));
    w.attach_loop(Some(&lp));
    let log = Log::default();
    lp.run_until_complete(async {
        let pid = sh("exit 11");
        w.add_child_handler(pid, log.cb()).unwrap();
        log.wait_for(1).await;
        assert_eq!(log.by_pid()[&pid], vec![11]);
    })
    .unwrap();
    w.close();
    assert!(!lp.remove_signal_handler(libc::SIGCHLD));
    lp.close().unwrap();
}

/// Threaded: the same pid twice is one waiter thread.
#[test]
fn threaded_same_pid_one_waiter() {
    let w = ThreadedChildWatcher::new().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let pid = sh("exec sleep 30");
    let tx2 = tx.clone();
    w.add_child_handler(pid, Box::new(move |_, _| tx2.send("first").unwrap()))
        .unwrap();
    w.add_child_handler(
        pid,
        Box::new(move |_, rc| tx.send(if rc == -9 { "second" } else { "bad" }).unwrap()),
    )
    .unwrap();
    assert_eq!(w.waiter_threads(), 1);
    kill(pid, libc::SIGKILL);
    assert_eq!(rx.recv_timeout(PATIENCE).unwrap(), "second");
    assert!(rx.recv_timeout(Duration::from_millis(50)).is_err());
    w.close();
}
