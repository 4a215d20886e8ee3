//! Issue 9, "one fallback chain ... never an ignored `spawn` error" and
//! DESIGN's "when a per-child resource runs out, the watcher falls back for
//! that child instead of failing the spawn": the descriptor table is full
//! at a watcher's *first* spawn (nothing created lazily yet: no own ring,
//! no pidfd, no pipe possible). The spawn must succeed, the status arrive
//! exactly, and no zombie be left; for every watcher on both loop kinds.
//! (In `pid_reuse.rs` the watchers are warmed up first, so those tests
//! isolate pid reuse from this.)
//!
//! The full table is process-wide, so this binary's tests run one at a
//! time.
#![cfg(target_os = "linux")]

mod fault_util;
mod watcher_util;

use std::sync::{Arc, Mutex};

use childwatch::{LoopKind, create_subprocess_exec};
use fault_util::{FdFill, HANG, Wk, within};
use watcher_util::{new_loop, zombie_children};

static SERIAL: Mutex<()> = Mutex::new(());

fn case(wk: Wk, kind: LoopKind) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(w) = wk.make() else { return };
    let Some(lp) = new_loop(kind) else { return };
    w.attach_loop(Some(&lp));
    lp.run_until_complete(async {
        let fill = FdFill::new();
        let p = create_subprocess_exec("sh", ["-c", "exit 7"])
            .watcher(Arc::clone(&w))
            .spawn();
        drop(fill);
        let p = p.unwrap_or_else(|e| {
            panic!("{wk:?}/{kind}: spawn with the descriptor table full at first use: {e}")
        });
        let rc = within(HANG, p.wait())
            .await
            .unwrap_or_else(|| panic!("{wk:?}/{kind}: wait() hung for {HANG:?}"));
        assert_eq!(rc.ok(), Some(7), "{wk:?}/{kind}");
        // Still fine afterwards, with descriptors available.
        let q = create_subprocess_exec("sh", ["-c", "exit 8"])
            .watcher(Arc::clone(&w))
            .spawn()
            .expect("spawn after the table was freed");
        let rc = within(HANG, q.wait()).await.expect("wait() hung");
        assert_eq!(rc.ok(), Some(8), "{wk:?}/{kind}");
        let z = fault_util::zombies_after(std::time::Duration::from_secs(5)).await;
        assert!(z.is_empty(), "{wk:?}/{kind}: zombies left: {z:?}");
    })
    .expect("loop ran");
    w.close();
    lp.close().unwrap();
    assert!(zombie_children().is_empty());
}

macro_rules! tests {
    ($($name:ident: $wk:expr, $kind:expr;)*) => {
        $( #[test] fn $name() { case($wk, $kind) } )*
    };
}

tests! {
    threaded_proactor: Wk::Threaded, LoopKind::Proactor;
    threaded_selector: Wk::Threaded, LoopKind::Selector;
    safe_proactor: Wk::Safe, LoopKind::Proactor;
    safe_selector: Wk::Safe, LoopKind::Selector;
    fast_proactor: Wk::Fast, LoopKind::Proactor;
    fast_selector: Wk::Fast, LoopKind::Selector;
    multiloop_proactor: Wk::MultiLoop, LoopKind::Proactor;
    multiloop_selector: Wk::MultiLoop, LoopKind::Selector;
    pidfd_proactor: Wk::Pidfd, LoopKind::Proactor;
    pidfd_selector: Wk::Pidfd, LoopKind::Selector;
    uring_proactor: Wk::Uring, LoopKind::Proactor;
    uring_selector: Wk::Uring, LoopKind::Selector;
    uring_nofd_proactor: Wk::UringNoFd, LoopKind::Proactor;
    uring_nofd_selector: Wk::UringNoFd, LoopKind::Selector;
}
