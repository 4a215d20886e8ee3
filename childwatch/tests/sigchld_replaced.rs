//! Issue 9, failing input 4 (kind): SIGCHLD replaced after setup. Safe,
//! Fast and MultiLoop (the watchers that learn of exits from SIGCHLD) are
//! attached and have already reported one child; then the program changes
//! SIGCHLD behind their back, and a registered child exits with 3:
//!
//! - `SIG_IGN`, or `SA_NOCLDWAIT`: the kernel reaps the child itself, so
//!   its status is gone: the right value is 255 (status lost);
//! - a foreign handler installed with `sigaction` that does not chain, or
//!   `SIG_DFL`: the child stays a zombie with its status: the right value
//!   is 3.
//!
//! Either way the watcher must notice and report, never hang (a 30 s hang
//! guard makes a hang a failure). The disposition is restored after each
//! case. SIGCHLD is process-wide, so this binary's tests run one at a time.
#![cfg(target_os = "linux")]

mod fault_util;
mod watcher_util;

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use childwatch::{LoopKind, sleep};
use fault_util::{HANG, Wk, within};
use watcher_util::{Log, new_loop, proc_state, reap, sh, zombie_children};

static SERIAL: Mutex<()> = Mutex::new(());
static FOREIGN_CALLS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn foreign_handler(_sig: libc::c_int) {
    FOREIGN_CALLS.fetch_add(1, Ordering::Relaxed);
}

/// What the program does to SIGCHLD after the watcher is set up.
#[derive(Clone, Copy, Debug)]
enum Disp {
    /// `signal(SIGCHLD, SIG_IGN)`: children are reaped by the kernel.
    Ignore,
    /// `SIG_DFL` with `SA_NOCLDWAIT`: children are reaped by the kernel.
    NoCldWait,
    /// Its own handler, not chaining to the previous one.
    Foreign,
    /// Back to `SIG_DFL` (the signal is discarded, children stay zombies).
    Default,
}

impl Disp {
    /// The returncode the watcher must report for `exit 3`.
    fn expected(self) -> i32 {
        match self {
            Disp::Ignore | Disp::NoCldWait => 255,
            Disp::Foreign | Disp::Default => 3,
        }
    }
}

/// The replaced disposition; dropping it restores the one saved.
struct Replaced {
    old: libc::sigaction,
}

impl Replaced {
    fn new(d: Disp) -> Replaced {
        // SAFETY: zeroed sigaction structs are valid; sigaction(2) with
        // valid pointers; the handler is async-signal-safe (an atomic add).
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            let mut new: libc::sigaction = std::mem::zeroed();
            libc::sigemptyset(&mut new.sa_mask);
            match d {
                Disp::Ignore => new.sa_sigaction = libc::SIG_IGN,
                Disp::NoCldWait => {
                    new.sa_sigaction = libc::SIG_DFL;
                    new.sa_flags = libc::SA_NOCLDWAIT;
                }
                Disp::Foreign => {
                    new.sa_sigaction = foreign_handler as *const () as libc::sighandler_t;
                    new.sa_flags = libc::SA_RESTART;
                }
                Disp::Default => new.sa_sigaction = libc::SIG_DFL,
            }
            assert_eq!(libc::sigaction(libc::SIGCHLD, &new, &mut old), 0);
            Replaced { old }
        }
    }
}

impl Drop for Replaced {
    fn drop(&mut self) {
        // SAFETY: restores the saved disposition.
        unsafe { libc::sigaction(libc::SIGCHLD, &self.old, std::ptr::null_mut()) };
    }
}

fn case(wk: Wk, kind: LoopKind, d: Disp) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(w) = wk.make() else { return };
    let Some(lp) = new_loop(kind) else { return };
    w.attach_loop(Some(&lp));
    let pid = std::cell::Cell::new(0);
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        lp.run_until_complete(async {
            // Set up and working: one child reported before the change.
            let log = Log::default();
            let first = sh("exit 1");
            w.add_child_handler(first, log.cb()).unwrap();
            assert!(
                within(HANG, log.wait_for(1)).await.is_some(),
                "warm-up hung"
            );
            assert_eq!(log.by_pid()[&first], vec![1]);

            let replaced = Replaced::new(d);
            let child = sh("sleep 0.1; exit 3");
            pid.set(child);
            w.add_child_handler(child, log.cb()).unwrap();
            let got = within(HANG, log.wait_for(2)).await;
            drop(replaced);
            assert!(
                got.is_some(),
                "{wk:?}/{kind}: SIGCHLD {d:?} after setup: the child (exit 3) was not reported \
             within {HANG:?}"
            );
            // Any second report shows up now.
            sleep(Duration::from_millis(50)).await;
            assert_eq!(
                log.by_pid()[&child],
                vec![d.expected()],
                "{wk:?}/{kind}: SIGCHLD {d:?} after setup"
            );
            // Restored: the watcher keeps working.
            let later = sh("exit 4");
            w.add_child_handler(later, log.cb()).unwrap();
            assert!(
                within(HANG, log.wait_for(3)).await.is_some(),
                "{wk:?}/{kind}: no report for a child after SIGCHLD was restored"
            );
            assert_eq!(log.by_pid()[&later], vec![4]);
        })
    }));
    w.close();
    let _ = lp.close();
    // After a failure, do not leave our zombie to the next case.
    let pid = pid.get();
    if pid > 0 && proc_state(pid) == Some('Z') {
        let _ = reap(pid);
    }
    match res {
        Err(panic) => std::panic::resume_unwind(panic),
        Ok(r) => r.expect("loop ran"),
    }
    let z = zombie_children();
    assert!(z.is_empty(), "zombies left: {z:?}");
}

macro_rules! matrix {
    ($($name:ident: $wk:expr, $kind:expr;)*) => {
        mod sig_ign {
            use super::*;
            $( #[test] fn $name() { case($wk, $kind, Disp::Ignore) } )*
        }
        mod sa_nocldwait {
            use super::*;
            $( #[test] fn $name() { case($wk, $kind, Disp::NoCldWait) } )*
        }
        mod foreign_handler {
            use super::*;
            $( #[test] fn $name() { case($wk, $kind, Disp::Foreign) } )*
        }
        mod sig_dfl {
            use super::*;
            $( #[test] fn $name() { case($wk, $kind, Disp::Default) } )*
        }
    };
}

matrix! {
    safe_proactor: Wk::Safe, LoopKind::Proactor;
    safe_selector: Wk::Safe, LoopKind::Selector;
    fast_proactor: Wk::Fast, LoopKind::Proactor;
    fast_selector: Wk::Fast, LoopKind::Selector;
    multiloop_proactor: Wk::MultiLoop, LoopKind::Proactor;
    multiloop_selector: Wk::MultiLoop, LoopKind::Selector;
}
