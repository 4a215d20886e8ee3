//! `PidfdChildWatcher` out of descriptors: `pidfd_open` fails with EMFILE,
//! and those children fall back to waiter threads instead of failing or
//! being lost. Lowering RLIMIT_NOFILE affects the whole process, so this
//! binary holds this one test.

mod watcher_util;

use std::time::Duration;

use childwatch::{ChildWatcher, LoopKind, PidfdChildWatcher, sleep};
use watcher_util::*;

fn fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn emfile_falls_back_to_threads() {
    for kind in [LoopKind::Selector, LoopKind::Proactor] {
        let Some(lp) = new_loop(kind) else { continue };
        let w = PidfdChildWatcher::new().unwrap();
        let pids: Vec<i32> = (0..30).map(|_| sh("exec sleep 30")).collect();
        let mut old = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit with valid pointers.
        unsafe { assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut old), 0) };
        let tight = libc::rlimit {
            rlim_cur: (fds() + 6) as libc::rlim_t,
            rlim_max: old.rlim_max,
        };
        // SAFETY: as above.
        unsafe { assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &tight), 0) };
        let threads_before = threads();
        let log = Log::default();
        lp.run_until_complete(async {
            for &pid in &pids {
                w.add_child_handler(pid, log.cb()).unwrap();
            }
            // Measuring needs descriptors: restore the limit first.
            // SAFETY: as above.
            unsafe { assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &old), 0) };
            assert_eq!(w.watched(), 30, "every child is watched");
            let extra = threads() - threads_before;
            assert!(
                (20..=30).contains(&extra),
                "children without a pidfd have waiter threads ({extra} threads)"
            );
            for &pid in &pids {
                kill(pid, libc::SIGTERM);
            }
            log.wait_for(30).await;
            sleep(Duration::from_millis(20)).await;
        })
        .unwrap();
        let got = log.by_pid();
        for pid in &pids {
            assert_eq!(got.get(pid), Some(&vec![-15]), "{kind}: pid {pid}");
        }
        w.close();
        lp.close().unwrap();
    }
}
