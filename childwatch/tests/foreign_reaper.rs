//! Issue 9, failing input 3 (kind): a child of ours reaped by someone else
//! while it is registered. Every watcher, on both loop kinds, reports 255
//! when the other party got the status (or the exact status if the watcher
//! reaped first), exactly once, and never hangs (a 30 s hang guard turns a
//! hang into a failure).
//!
//! The foreign reapers reap every child of the process, so the tests of
//! this binary run one at a time (a static lock).
#![cfg(target_os = "linux")]

mod fault_util;
mod watcher_util;

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use childwatch::{ChildWatcher, LoopKind, Pid, create_subprocess_exec, sleep};
use fault_util::{HANG, Wk, within};
use watcher_util::{Log, new_loop, sh, zombie_children};

static SERIAL: Mutex<()> = Mutex::new(());

macro_rules! matrix {
    ($case:ident) => {
        mod $case {
            use super::*;
            matrix!(@one $case, threaded_proactor, Wk::Threaded, LoopKind::Proactor);
            matrix!(@one $case, threaded_selector, Wk::Threaded, LoopKind::Selector);
            matrix!(@one $case, safe_proactor, Wk::Safe, LoopKind::Proactor);
            matrix!(@one $case, safe_selector, Wk::Safe, LoopKind::Selector);
            matrix!(@one $case, fast_proactor, Wk::Fast, LoopKind::Proactor);
            matrix!(@one $case, fast_selector, Wk::Fast, LoopKind::Selector);
            matrix!(@one $case, multiloop_proactor, Wk::MultiLoop, LoopKind::Proactor);
            matrix!(@one $case, multiloop_selector, Wk::MultiLoop, LoopKind::Selector);
            matrix!(@one $case, pidfd_proactor, Wk::Pidfd, LoopKind::Proactor);
            matrix!(@one $case, pidfd_selector, Wk::Pidfd, LoopKind::Selector);
            matrix!(@one $case, uring_proactor, Wk::Uring, LoopKind::Proactor);
            matrix!(@one $case, uring_selector, Wk::Uring, LoopKind::Selector);
            matrix!(@one $case, uring_nofd_proactor, Wk::UringNoFd, LoopKind::Proactor);
            matrix!(@one $case, uring_nofd_selector, Wk::UringNoFd, LoopKind::Selector);
        }
    };
    (@one $case:ident, $name:ident, $wk:expr, $kind:expr) => {
        #[test]
        fn $name() {
            let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
            super::$case($wk, $kind);
        }
    };
}

/// `waitpid(pid, 0)` (`pid` -1: any child, retried until our child or
/// ECHILD); true if it reaped `target`.
fn thief(pid: Pid, target: Pid) -> bool {
    loop {
        let mut st = 0;
        // SAFETY: waitpid(2) with a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut st, 0) };
        if r == target {
            return true;
        }
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return false; // ECHILD: the watcher reaped it first
        }
    }
}

/// The right value: 255 if the thief got the status, else the real one.
fn expected(thief_won: bool, real: i32) -> i32 {
    if thief_won { 255 } else { real }
}

fn setup(wk: Wk, kind: LoopKind) -> Option<(childwatch::EventLoop, Arc<dyn ChildWatcher>)> {
    let w = wk.make()?;
    let lp = new_loop(kind)?;
    w.attach_loop(Some(&lp));
    Some((lp, w))
}

fn finish(lp: childwatch::EventLoop, w: Arc<dyn ChildWatcher>) {
    w.close();
    lp.close().expect("close loop");
    let z = zombie_children();
    assert!(z.is_empty(), "zombies left: {z:?}");
}

/// Failing input 3 as reported, for every watcher: a `Process` running
/// `sh -c 'sleep 0.2; exit 3'`; another thread calls `waitpid(pid, 0)` and
/// gets the status while the loop thread is busy (joined on it, so a
/// watcher that reaps on the loop thread always loses). `wait()` must give
/// `Ok(255)` (or `Ok(3)` where a watcher thread won the race), within 30 s.
fn waitpid_pid_thread(wk: Wk, kind: LoopKind) {
    let Some((lp, w)) = setup(wk, kind) else {
        return;
    };
    lp.run_until_complete(async {
        let p = create_subprocess_exec("sh", ["-c", "sleep 0.2; exit 3"])
            .watcher(Arc::clone(&w))
            .spawn()
            .expect("spawn");
        let pid = p.pid();
        let t = std::thread::spawn(move || thief(pid, pid));
        // The loop thread is busy until the thief is done.
        let thief_won = t.join().unwrap();
        let rc = within(HANG, p.wait())
            .await
            .unwrap_or_else(|| {
                panic!(
                    "{wk:?}/{kind}: wait() still pending after {HANG:?} for a child reaped \
                     by another thread (thief won: {thief_won})"
                )
            })
            .expect("wait()");
        assert_eq!(
            rc,
            expected(thief_won, 3),
            "{wk:?}/{kind}: thief won: {thief_won}"
        );
        assert!(w.is_active(), "the watcher stays active");
    })
    .expect("loop ran");
    finish(lp, w);
}

/// A thread blocked in `waitpid(-1, 0)` (a library that reaps every child)
/// while the loop runs: the registered child (`sleep 0.2; exit 3`) gets
/// exactly one callback, 255 if the thread took the status, else 3; and a
/// second child registered afterwards (the thread has ended) still gets its
/// exact status.
fn waitpid_any_thread(wk: Wk, kind: LoopKind) {
    let Some((lp, w)) = setup(wk, kind) else {
        return;
    };
    lp.run_until_complete(async {
        let log = Log::default();
        let pid = sh("sleep 0.2; exit 3");
        w.add_child_handler(pid, log.cb())
            .expect("add_child_handler");
        let t = std::thread::spawn(move || thief(-1, pid));
        let got = within(HANG, log.wait_for(1)).await;
        let thief_won = t.join().unwrap();
        assert!(
            got.is_some(),
            "{wk:?}/{kind}: no callback after {HANG:?} for a child reaped by a \
             waitpid(-1) thread (thief won: {thief_won})"
        );
        sleep(Duration::from_millis(50)).await;
        assert_eq!(
            log.by_pid()[&pid],
            vec![expected(thief_won, 3)],
            "{wk:?}/{kind}: thief won: {thief_won}"
        );
        let next = sh("exit 5");
        w.add_child_handler(next, log.cb())
            .expect("add_child_handler");
        assert!(
            within(HANG, log.wait_for(2)).await.is_some(),
            "{wk:?}/{kind}: no callback for a later child"
        );
        assert_eq!(log.by_pid()[&next], vec![5]);
        assert!(w.is_active(), "the watcher stays active");
    })
    .expect("loop ran");
    finish(lp, w);
}

matrix!(waitpid_pid_thread);
matrix!(waitpid_any_thread);
