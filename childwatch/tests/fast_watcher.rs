//! `FastChildWatcher` reaps every child of the process, so its tests live
//! alone in this binary and run one at a time (a global lock): a test's
//! children would otherwise be reaped by another test's watcher.

mod watcher_util;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use childwatch::{ChildWatcher, EventLoop, FastChildWatcher, LoopKind, sleep};
use watcher_util::*;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn make() -> Arc<dyn ChildWatcher> {
    Arc::new(FastChildWatcher::new().unwrap())
}

/// The shared suite's cases, one at a time.
macro_rules! serial_cases {
    ($kind:expr; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                let _g = crate::serial();
                crate::watcher_util::suite::$case($kind, crate::make)
            }
        )*
    };
}

mod proactor {
    serial_cases!(childwatch::LoopKind::Proactor;
        exit_codes, signals, exited_before_add, replace_handler, remove_handler,
        unknown_pid, reaped_elsewhere, many_random, stopped_then_continued, closed_refuses);
}

mod selector {
    serial_cases!(childwatch::LoopKind::Selector;
        exit_codes, signals, exited_before_add, replace_handler, remove_handler,
        unknown_pid, reaped_elsewhere, many_random, stopped_then_continued, closed_refuses);
}

#[test]
fn inactive_without_loop() {
    let _g = serial();
    let w = FastChildWatcher::new().unwrap();
    assert!(!w.is_active());
    let err = w.add_child_handler(12345, Box::new(|_, _| {})).unwrap_err();
    assert!(err.to_string().contains("not activated"), "{err}");
    let lp = EventLoop::selector().unwrap();
    w.attach_loop(Some(&lp));
    assert!(w.is_active());
    w.attach_loop(None);
    assert!(!w.is_active());
    w.close();
    lp.close().unwrap();
}

/// A child reaped by the sweep inside `enter()`/`exit()` before its
/// handler is added is kept and delivered when the handler comes.
#[test]
fn zombie_kept_inside_enter_exit() {
    let _g = serial();
    for kind in [LoopKind::Selector, LoopKind::Proactor] {
        let Some(env) = Env::new(kind, make()) else {
            continue;
        };
        env.run(async {
            let log = Log::default();
            env.w.enter();
            let pid = sh("exit 4");
            // Let the SIGCHLD sweep reap it while no handler exists.
            until(|| proc_state(pid).is_none(), "the sweep to reap the child").await;
            env.w.add_child_handler(pid, log.cb()).unwrap();
            env.w.exit();
            log.wait_for(1).await;
            assert_eq!(log.by_pid()[&pid], vec![4]);
        });
    }
}

/// Outside `enter()`/`exit()` an unregistered exit is dropped (logged); a
/// handler added afterwards gets 255 rather than waiting forever.
#[test]
fn exit_outside_enter_is_lost_not_hung() {
    let _g = serial();
    let Some(env) = Env::new(LoopKind::Selector, make()) else {
        return;
    };
    env.run(async {
        let log = Log::default();
        let pid = sh("exit 4");
        until(|| proc_state(pid).is_none(), "the sweep to reap the child").await;
        env.w.add_child_handler(pid, log.cb()).unwrap();
        log.wait_for(1).await;
        assert_eq!(log.by_pid()[&pid], vec![255]);
    });
}

/// Nested `enter()`s keep zombies until the outermost `exit()`.
#[test]
fn nested_enter_keeps_until_outermost_exit() {
    let _g = serial();
    let Some(env) = Env::new(LoopKind::Selector, make()) else {
        return;
    };
    env.run(async {
        let log = Log::default();
        env.w.enter();
        env.w.enter();
        let pid = sh("exit 6");
        until(|| proc_state(pid).is_none(), "the sweep to reap the child").await;
        env.w.exit();
        env.w.add_child_handler(pid, log.cb()).unwrap();
        env.w.exit();
        log.wait_for(1).await;
        assert_eq!(log.by_pid()[&pid], vec![6]);
    });
}

/// What the docs warn about: a child nobody registered is reaped too, so
/// `std::process::Child::wait` then fails.
#[test]
fn reaps_children_it_was_not_given() {
    let _g = serial();
    let Some(env) = Env::new(LoopKind::Selector, make()) else {
        return;
    };
    let mut child = std::process::Command::new("/bin/true").spawn().unwrap();
    let pid = child.id() as i32;
    env.run(until(
        || proc_state(pid).is_none(),
        "Fast to reap a foreign child",
    ));
    assert!(child.wait().is_err(), "the status was taken by the watcher");
}

/// Exits during a detach are delivered after re-attaching, on the new loop.
#[test]
fn detach_and_reattach_delivers() {
    let _g = serial();
    for kind in [LoopKind::Selector, LoopKind::Proactor] {
        let Some(lp1) = new_loop(kind) else { continue };
        let w = FastChildWatcher::new().unwrap();
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
        w.close();
        lp1.close().unwrap();
        lp2.close().unwrap();
    }
}

/// After close: no zombie among our children.
#[test]
fn no_zombies_after_close() {
    let _g = serial();
    let Some(env) = Env::new(LoopKind::Proactor, make()) else {
        return;
    };
    let mut rng = Rng::new(9);
    let rcs: Vec<_> = (0..100).map(|_| rng.returncode()).collect();
    env.run(run_batch(&env.w, &rcs, 32));
    env.w.close();
    assert_eq!(zombie_children(), Vec::<i32>::new());
}
