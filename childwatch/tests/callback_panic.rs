//! Issue 9, "a panicking user callback never kills a watcher's helper or
//! reaper thread" (MultiLoop's helper stopped delivering after one panic):
//! with no running loop, callbacks run on the watcher's own threads
//! (Threaded's waiters, MultiLoop's helper, Uring's reaper thread, Pidfd's
//! fallback waiter). One callback panics; a child registered before the
//! panic and still running, and a child registered after it, must both get
//! their exact statuses, and `is_active()` stays true.
#![cfg(target_os = "linux")]

mod fault_util;
mod watcher_util;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use childwatch::{ChildWatcher, Pid};
use fault_util::{HANG, Wk, block_until};
use watcher_util::{Log, proc_state, sh};

/// Registers `pid` with a callback that panics (after noting it ran).
fn add_panicking(w: &Arc<dyn ChildWatcher>, pid: Pid, ran: &Arc<AtomicBool>) {
    let ran = Arc::clone(ran);
    w.add_child_handler(
        pid,
        Box::new(move |pid, rc| {
            ran.store(true, Ordering::SeqCst);
            panic!("user callback for pid {pid} (rc {rc}) panics (on purpose, issue 9 test)");
        }),
    )
    .expect("add_child_handler");
}

fn case(wk: Wk) {
    let Some(w) = wk.make() else { return };
    let log = Log::default();
    // Registered before the panic, exits after it.
    let pending = sh("sleep 1; exit 4");
    w.add_child_handler(pending, log.cb())
        .expect("add_child_handler");
    let ran = Arc::new(AtomicBool::new(false));
    let bad = sh("sleep 0.2; exit 1");
    add_panicking(&w, bad, &ran);
    assert!(
        block_until(HANG, || ran.load(Ordering::SeqCst)),
        "{wk:?}: the panicking callback never ran"
    );
    assert!(w.is_active(), "{wk:?}: inactive after a callback panicked");
    // Registered after the panic.
    let later = sh("sleep 0.2; exit 2");
    w.add_child_handler(later, log.cb())
        .expect("add_child_handler after a panic");
    // A second panic, then more children: the thread must survive again.
    let ran2 = Arc::new(AtomicBool::new(false));
    let bad2 = sh("sleep 0.2; exit 6");
    add_panicking(&w, bad2, &ran2);
    assert!(
        block_until(HANG, || log.len() >= 2 && ran2.load(Ordering::SeqCst)),
        "{wk:?}: after a callback panicked, {} of 2 later callbacks ran within {HANG:?} ({:?})",
        log.len(),
        log.by_pid()
    );
    let last = sh("sleep 0.2; exit 9");
    w.add_child_handler(last, log.cb())
        .expect("add_child_handler after two panics");
    assert!(
        block_until(HANG, || log.len() >= 3),
        "{wk:?}: after two callbacks panicked, the next child was not reported within {HANG:?}"
    );
    let got = log.by_pid();
    assert_eq!(
        got[&pending],
        vec![4],
        "{wk:?}: the child pending during the panic"
    );
    assert_eq!(
        got[&later],
        vec![2],
        "{wk:?}: a child registered after the panic"
    );
    assert_eq!(
        got[&last],
        vec![9],
        "{wk:?}: a child registered after two panics"
    );
    assert!(w.is_active(), "{wk:?}: inactive after callbacks panicked");
    // The panicking callbacks' children were reaped too (only ours: the
    // tests of this binary run in parallel).
    let mine = [pending, bad, later, bad2, last];
    assert!(
        block_until(HANG, || mine.iter().all(|&p| proc_state(p).is_none())),
        "{wk:?}: our children left as zombies: {:?}",
        mine.iter()
            .filter(|&&p| proc_state(p) == Some('Z'))
            .collect::<Vec<_>>()
    );
    w.close();
}

/// Threaded: the callbacks run on per-child waiter threads.
#[test]
fn threaded_waiter_thread() {
    case(Wk::Threaded)
}

/// MultiLoop: the callbacks run on the helper thread (with no running loop).
#[test]
fn multiloop_helper_thread() {
    case(Wk::MultiLoop)
}

/// Pidfd with no running loop: its fallback waiter thread.
#[test]
fn pidfd_fallback_thread() {
    case(Wk::Pidfd)
}

/// Uring with no running loop: its own ring, driven by its reaper thread.
#[test]
fn uring_reaper_thread() {
    case(Wk::Uring)
}

/// Uring without pidfds (WAITID only), no running loop: the reaper thread.
#[test]
fn uring_nofd_reaper_thread() {
    case(Wk::UringNoFd)
}
