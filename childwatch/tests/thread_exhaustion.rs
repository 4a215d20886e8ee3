//! Issue 9, failing input 5 (kind): no thread can start. As root, each test
//! re-executes this binary as uid/gid 65534 (`setpriv --reuid=65534
//! --regid=65534 --clear-groups`, from a 0755 copy of the binary); inside,
//! `RLIMIT_NPROC` is lowered to the number of tasks that user has now, so
//! neither a thread nor a process can start (checked). Skipped, with a
//! message, when not root or without `setpriv`.
//!
//! - Children registered while no thread can start are still reported
//!   exactly, with no zombie left (Threaded, Pidfd, Uring, Uring without
//!   pidfds; both loop kinds).
//! - A proactor loop with Uring children pending is closed while no thread
//!   can start; the program then runs its next loop (attached to the
//!   watcher, as asyncio's `set_event_loop` does): all 10 statuses arrive,
//!   exact, and no zombie is left.
#![cfg(target_os = "linux")]

mod fault_util;
mod watcher_util;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use childwatch::{EventLoop, LoopKind, Pid};
use fault_util::{HANG, Wk, reexec, within};
use watcher_util::{Log, new_loop, zombie_children};

const TAG: &str = "nproc";
const NOBODY: u32 = 65534;

/// Call first: true inside the unprivileged run (run the body); false in
/// the outer run, which ran `test` as uid 65534 and checked it (or printed
/// why it was skipped).
fn enter(test: &str) -> bool {
    if reexec::inside(TAG) {
        // SAFETY: plain getters.
        let (uid, euid) = unsafe { (libc::getuid(), libc::geteuid()) };
        assert!(
            uid == NOBODY && euid == NOBODY,
            "not running as uid {NOBODY}"
        );
        return true;
    }
    // SAFETY: plain getter.
    if unsafe { libc::geteuid() } != 0 {
        println!("skipped: {test} needs root to run itself as uid {NOBODY}; passes vacuously");
        eprintln!("skipped: not root, no thread-exhaustion run for {test}");
        return false;
    }
    let have_setpriv = Command::new("setpriv")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !have_setpriv {
        println!("skipped: no `setpriv` here; {test} passes vacuously");
        eprintln!("skipped: no setpriv for {test}");
        return false;
    }
    // One unprivileged run at a time: RLIMIT_NPROC counts every task of
    // uid 65534, so a parallel run could free a slot for this one.
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let exe = readable_copy();
    let uid = format!("--reuid={NOBODY}");
    let gid = format!("--regid={NOBODY}");
    reexec::run(
        &["setpriv", &uid, &gid, "--clear-groups"],
        &exe,
        TAG,
        test,
        &[],
        Duration::from_secs(300),
    );
    false
}

/// This test binary, or a copy of it, that uid 65534 can read and execute
/// (copied to a 0755 temp dir only when the original is not).
fn readable_copy() -> PathBuf {
    static COPY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    COPY.get_or_init(|| {
        let exe = std::env::current_exe().expect("current_exe");
        let mode = |p: &std::path::Path| {
            std::fs::metadata(p)
                .map(|m| m.permissions().mode())
                .unwrap_or(0)
        };
        let file_ok = mode(&exe) & 0o005 == 0o005;
        let dirs_ok = exe.ancestors().skip(1).all(|d| mode(d) & 0o001 != 0);
        if file_ok && dirs_ok {
            return exe;
        }
        let dir = std::env::temp_dir().join(format!("childwatch-nproc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let copy = dir.join("thread_exhaustion");
        std::fs::copy(&exe, &copy).expect("copy the test binary");
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
        copy
    })
    .clone()
}

/// Tasks (threads included) whose real uid is ours, as RLIMIT_NPROC counts
/// them (those visible in /proc).
fn tasks_of_my_uid() -> u64 {
    // SAFETY: plain getter.
    let me = unsafe { libc::getuid() };
    let mut n = 0;
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return 0;
    };
    for p in procs.flatten() {
        if p.file_name().to_string_lossy().parse::<u32>().is_err() {
            continue;
        }
        let Ok(tasks) = std::fs::read_dir(p.path().join("task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let Ok(s) = std::fs::read_to_string(t.path().join("status")) else {
                continue;
            };
            let ruid = s
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().next())
                .and_then(|u| u.parse::<u32>().ok());
            if ruid == Some(me) {
                n += 1;
            }
        }
    }
    n
}

/// `RLIMIT_NPROC` at the current task count: no new thread or process can
/// start (checked) until dropped.
struct NoThreads {
    old: libc::rlimit,
}

impl NoThreads {
    fn new() -> NoThreads {
        let mut old = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit with valid pointers.
        unsafe {
            assert_eq!(libc::getrlimit(libc::RLIMIT_NPROC, &mut old), 0);
            let low = libc::rlimit {
                rlim_cur: tasks_of_my_uid().max(1) as libc::rlim_t,
                rlim_max: old.rlim_max,
            };
            assert_eq!(libc::setrlimit(libc::RLIMIT_NPROC, &low), 0);
        }
        let t = std::thread::Builder::new().spawn(|| ());
        match t {
            Err(_) => {}
            Ok(h) => {
                let _ = h.join();
                panic!("RLIMIT_NPROC does not stop new threads here (is uid {NOBODY} exempt?)");
            }
        }
        NoThreads { old }
    }
}

impl Drop for NoThreads {
    fn drop(&mut self) {
        // SAFETY: setrlimit with a valid pointer (raising the soft limit up
        // to the unchanged hard limit needs no privilege).
        unsafe { libc::setrlimit(libc::RLIMIT_NPROC, &self.old) };
    }
}

/// `n` children `sh -c 'read x; exit <10+i>'`, each waiting for its stdin
/// to close (so they exit only when told, which needs no new task).
#[allow(clippy::zombie_processes)] // the watcher under test reaps them
fn held_children(n: usize) -> Vec<(Pid, i32, ChildStdin)> {
    (0..n)
        .map(|i| {
            let code = 10 + i as i32;
            let mut c: Child = Command::new("/bin/sh")
                .arg("-c")
                .arg(format!("read x; exit {code}"))
                .stdin(Stdio::piped())
                .spawn()
                .expect("spawn sh");
            let stdin = c.stdin.take().unwrap();
            (c.id() as Pid, code, stdin)
        })
        .collect()
}

/// One child through the watcher first, so whatever it creates on first
/// use (its own ring, a helper thread) exists before threads run out.
fn warm_up(lp: &EventLoop, w: &std::sync::Arc<dyn childwatch::ChildWatcher>) {
    lp.run_until_complete(async {
        let log = Log::default();
        let (pid, _, stdin) = held_children(1).pop().unwrap();
        w.add_child_handler(pid, log.cb()).unwrap();
        drop(stdin);
        assert!(
            within(HANG, log.wait_for(1)).await.is_some(),
            "warm-up hung"
        );
        assert_eq!(log.by_pid()[&pid], vec![10]);
    })
    .expect("loop ran");
}

fn check(log: &Log, kids: &[(Pid, i32)], what: &str) {
    let got = log.by_pid();
    for &(pid, code) in kids {
        assert_eq!(
            got.get(&pid),
            Some(&vec![code]),
            "{what}: pid {pid} (exit {code})"
        );
    }
}

/// Children registered while no thread can start are reported exactly,
/// with no zombie left.
fn registered_without_threads(wk: Wk, kind: LoopKind) {
    let Some(w) = wk.make() else { return };
    let Some(lp) = new_loop(kind) else { return };
    w.attach_loop(Some(&lp));
    warm_up(&lp, &w);
    let kids = held_children(10);
    let ids: Vec<(Pid, i32)> = kids.iter().map(|k| (k.0, k.1)).collect();
    let log = Log::default();
    let no_threads = NoThreads::new();
    lp.run_until_complete(async {
        for &(pid, _) in &ids {
            w.add_child_handler(pid, log.cb())
                .unwrap_or_else(|e| panic!("{wk:?}/{kind}: add_child_handler({pid}): {e}"));
        }
        for (_, _, mut stdin) in kids {
            let _ = stdin.write_all(b"\n");
        }
        let done = within(HANG, log.wait_for(10)).await;
        assert!(
            done.is_some(),
            "{wk:?}/{kind}: {} of 10 children registered while no thread can start were \
             reported within {HANG:?}; zombies: {:?}",
            log.len(),
            zombie_children()
        );
        let z = fault_util::zombies_after(Duration::from_secs(5)).await;
        assert!(z.is_empty(), "{wk:?}/{kind}: zombies left: {z:?}");
    })
    .expect("loop ran");
    drop(no_threads);
    check(&log, &ids, &format!("{wk:?}/{kind}"));
    w.close();
    lp.close().unwrap();
}

/// Failing input 5: a proactor loop with 10 Uring children pending is
/// closed while no thread can start; the children exit; the program's next
/// loop (attached to the watcher) runs: all 10 statuses arrive, exact, and
/// no zombie is left.
fn loop_closed_with_children_pending(wk: Wk, next: LoopKind) {
    let Some(w) = wk.make() else { return };
    let Some(lp) = new_loop(LoopKind::Proactor) else {
        return;
    };
    w.attach_loop(Some(&lp));
    warm_up(&lp, &w);
    let kids = held_children(10);
    let ids: Vec<(Pid, i32)> = kids.iter().map(|k| (k.0, k.1)).collect();
    let log = Log::default();
    lp.run_until_complete(async {
        for &(pid, _) in &ids {
            w.add_child_handler(pid, log.cb()).unwrap();
        }
    })
    .expect("loop ran");
    let no_threads = NoThreads::new();
    lp.close().expect("close the proactor loop");
    for (_, _, mut stdin) in kids {
        let _ = stdin.write_all(b"\n");
    }
    let Some(lp2) = new_loop(next) else { return };
    w.attach_loop(Some(&lp2));
    lp2.run_until_complete(async {
        let done = within(HANG, log.wait_for(10)).await;
        assert!(
            done.is_some(),
            "{wk:?}: {} of 10 statuses arrived within {HANG:?} after the proactor loop holding \
             them closed with no thread available (next loop: {next}); zombies: {:?}",
            log.len(),
            zombie_children()
        );
        let z = fault_util::zombies_after(Duration::from_secs(5)).await;
        assert!(z.is_empty(), "{wk:?}: zombies left: {z:?}");
    })
    .expect("loop ran");
    drop(no_threads);
    check(&log, &ids, &format!("{wk:?}, loop closed"));
    w.close();
    lp2.close().unwrap();
}

macro_rules! tests {
    ($($name:ident: $f:ident($wk:expr, $kind:expr);)*) => {
        $(
            #[test]
            fn $name() {
                if enter(stringify!($name)) {
                    $f($wk, $kind);
                }
            }
        )*
    };
}

tests! {
    threaded_proactor_registered: registered_without_threads(Wk::Threaded, LoopKind::Proactor);
    threaded_selector_registered: registered_without_threads(Wk::Threaded, LoopKind::Selector);
    pidfd_proactor_registered: registered_without_threads(Wk::Pidfd, LoopKind::Proactor);
    pidfd_selector_registered: registered_without_threads(Wk::Pidfd, LoopKind::Selector);
    uring_proactor_registered: registered_without_threads(Wk::Uring, LoopKind::Proactor);
    uring_selector_registered: registered_without_threads(Wk::Uring, LoopKind::Selector);
    uring_nofd_proactor_registered: registered_without_threads(Wk::UringNoFd, LoopKind::Proactor);
    uring_nofd_selector_registered: registered_without_threads(Wk::UringNoFd, LoopKind::Selector);
    uring_loop_closed_next_proactor: loop_closed_with_children_pending(Wk::Uring, LoopKind::Proactor);
    uring_loop_closed_next_selector: loop_closed_with_children_pending(Wk::Uring, LoopKind::Selector);
    uring_nofd_loop_closed_next_proactor: loop_closed_with_children_pending(Wk::UringNoFd, LoopKind::Proactor);
    uring_nofd_loop_closed_next_selector: loop_closed_with_children_pending(Wk::UringNoFd, LoopKind::Selector);
}
