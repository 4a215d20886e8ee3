//! `UringChildWatcher` with real children, on a proactor loop, a selector
//! loop and with no running loop, through both of its paths: `POLL_ADD` on
//! pidfds (within the descriptor budget) and `WAITID` (budget 0, or beyond
//! it).
//!
//! Tests that count the process's descriptors and threads take the global
//! lock for writing; every other test takes it for reading, so the counts are
//! never disturbed by a test running in parallel.
#![cfg(target_os = "linux")]

use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

use childwatch::{ChildCallback, ChildWatcher, EventLoop, Pid, ReturnCode, UringChildWatcher};

static PROCESS: RwLock<()> = RwLock::new(());

fn shared() -> RwLockReadGuard<'static, ()> {
    PROCESS.read().unwrap_or_else(|p| p.into_inner())
}

fn exclusive() -> RwLockWriteGuard<'static, ()> {
    PROCESS.write().unwrap_or_else(|p| p.into_inner())
}

/// A guard against hangs, not a timing assertion.
const HANG: Duration = Duration::from_secs(90);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Proactor,
    Selector,
    NoLoop,
}

const MODES: [Mode; 3] = [Mode::Proactor, Mode::Selector, Mode::NoLoop];

/// Descriptor budgets exercising the pidfd path (large) and the WAITID path (0).
const BUDGETS: [usize; 2] = [1 << 16, 0];

fn watcher(budget: usize) -> UringChildWatcher {
    assert!(
        UringChildWatcher::is_supported(),
        "this kernel lacks io_uring WAITID"
    );
    UringChildWatcher::new().unwrap().with_fd_budget(budget)
}

/// Where a test runs: inside a running loop of `mode` (one loop for the
/// whole test, closed when the `Env` drops) or on this thread with no loop.
struct Env {
    lp: Option<EventLoop>,
}

impl Env {
    fn new(mode: Mode) -> Env {
        let lp = match mode {
            Mode::Proactor => Some(EventLoop::proactor().unwrap()),
            Mode::Selector => Some(EventLoop::selector().unwrap()),
            Mode::NoLoop => None,
        };
        Env { lp }
    }

    /// Runs `setup`, then waits until `done()`.
    fn drive(&self, setup: impl FnOnce(), done: impl Fn() -> bool) {
        let start = Instant::now();
        match &self.lp {
            None => {
                setup();
                while !done() {
                    assert!(start.elapsed() < HANG, "timed out: a callback never came");
                    thread::sleep(Duration::from_millis(2));
                }
            }
            Some(lp) => {
                lp.run_until_complete(async {
                    setup();
                    while !done() {
                        assert!(start.elapsed() < HANG, "timed out: a callback never came");
                        childwatch::sleep(Duration::from_millis(2)).await;
                    }
                })
                .unwrap();
            }
        }
    }

    /// Lets the loop (or this thread) run for `d`.
    fn idle(&self, d: Duration) {
        let t = Instant::now();
        self.drive(|| {}, || t.elapsed() >= d);
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(lp) = self.lp.take() {
            let _ = lp.close();
        }
    }
}

fn drive(mode: Mode, setup: impl FnOnce(), done: impl Fn() -> bool) {
    Env::new(mode).drive(setup, done);
}

/// Exit statuses received, with the thread each callback ran on.
#[derive(Default)]
struct Results {
    map: Mutex<HashMap<Pid, Vec<(ReturnCode, ThreadId)>>>,
    /// Callbacks run (pids can be reused within a long run).
    total: std::sync::atomic::AtomicUsize,
}

impl Results {
    fn new() -> Arc<Results> {
        Arc::new(Results::default())
    }
    fn callback(self: &Arc<Self>) -> ChildCallback {
        let r = Arc::clone(self);
        Box::new(move |pid, rc| {
            r.map
                .lock()
                .unwrap()
                .entry(pid)
                .or_default()
                .push((rc, thread::current().id()));
            r.total.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        })
    }
    fn tagged(self: &Arc<Self>, tag: ReturnCode) -> ChildCallback {
        let r = Arc::clone(self);
        Box::new(move |pid, rc| {
            r.map
                .lock()
                .unwrap()
                .entry(pid)
                .or_default()
                .push((rc * 1000 + tag, thread::current().id()));
        })
    }
    fn len(&self) -> usize {
        self.map.lock().unwrap().len()
    }
    fn total(&self) -> usize {
        self.total.load(std::sync::atomic::Ordering::SeqCst)
    }
    fn get(&self, pid: Pid) -> Vec<ReturnCode> {
        self.map
            .lock()
            .unwrap()
            .get(&pid)
            .map(|v| v.iter().map(|x| x.0).collect())
            .unwrap_or_default()
    }
    fn threads(&self) -> Vec<ThreadId> {
        self.map
            .lock()
            .unwrap()
            .values()
            .flat_map(|v| v.iter().map(|x| x.1))
            .collect()
    }
}

// The watcher under test does the waiting, not std.
#[allow(clippy::zombie_processes)]
fn sh(script: &str) -> Pid {
    let child = Command::new("/bin/sh")
        .arg("-c")
        .arg(script)
        .spawn()
        .unwrap();
    // std does not wait on drop: the watcher owns the reaping.
    child.id() as Pid
}

fn exits_with(code: i32) -> Pid {
    sh(&format!("exit {code}"))
}

fn killed_by(sig: i32) -> Pid {
    sh(&format!("kill -{sig} $$; sleep 5"))
}

#[allow(clippy::zombie_processes)]
fn sleeper() -> Pid {
    let child = Command::new("sleep").arg("60").spawn().unwrap();
    child.id() as Pid
}

fn kill(pid: Pid, sig: i32) {
    // SAFETY: plain syscall; the pid is our own child, not yet reaped.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
}

/// The state letter of /proc/<pid>/stat, `None` once the pid is gone.
fn proc_state(pid: Pid) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = s.rfind(')')?;
    s[after + 1..].trim_start().chars().next()
}

/// Waits until `pid` is gone from /proc. A WAITID completion can arrive a
/// moment before the kernel has finished releasing the reaped child, so this
/// settles instead of checking once; a zombie left behind never goes away.
fn assert_gone(pid: Pid) {
    let t = Instant::now();
    while let Some(st) = proc_state(pid) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "pid {pid} left behind in state {st}"
        );
        thread::sleep(Duration::from_millis(1));
    }
}

fn wait_state(pid: Pid, want: char) {
    let t = Instant::now();
    while proc_state(pid) != Some(want) {
        assert!(t.elapsed() < HANG, "pid {pid} never reached state {want}");
        thread::sleep(Duration::from_millis(1));
    }
}

/// Blocking waitpid by the test itself; the returncode.
fn reap_myself(pid: Pid) -> ReturnCode {
    let mut st = 0;
    // SAFETY: plain syscall on our own child.
    let r = unsafe { libc::waitpid(pid, &mut st, 0) };
    assert_eq!(
        r, pid,
        "waitpid({pid}) failed: the child was reaped by someone else"
    );
    childwatch::watcher::status::from_raw_wait_status(st).unwrap()
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// A child with a random expected returncode.
fn random_child(rng: &mut Rng) -> (Pid, ReturnCode) {
    const SIGS: [i32; 5] = [
        libc::SIGTERM,
        libc::SIGKILL,
        libc::SIGINT,
        libc::SIGUSR1,
        libc::SIGHUP,
    ];
    let r = rng.next();
    if r % 4 == 0 {
        let sig = SIGS[(r / 4 % SIGS.len() as u64) as usize];
        (killed_by(sig), -sig)
    } else {
        let code = (r / 4 % 256) as i32;
        (exits_with(code), code)
    }
}

// ---------------------------------------------------------------- tests

#[test]
fn supported_and_active_until_close() {
    let _g = shared();
    assert!(UringChildWatcher::is_supported());
    let w = watcher(4);
    assert_eq!(w.fd_budget(), 4);
    assert!(w.is_active());
    w.attach_loop(None);
    assert!(w.is_active(), "attach_loop never deactivates");
    w.close();
    assert!(!w.is_active());
    let err = w.add_child_handler(1, Box::new(|_, _| {})).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::Other);
    let w = UringChildWatcher::new().unwrap();
    assert!(
        w.fd_budget() > 0,
        "default budget is half the soft RLIMIT_NOFILE"
    );
    let bad = w.add_child_handler(-3, Box::new(|_, _| {})).unwrap_err();
    assert_eq!(bad.kind(), std::io::ErrorKind::InvalidInput);
    w.close();
}

#[test]
fn exit_codes_and_signals() {
    let _g = shared();
    for mode in MODES {
        for budget in BUDGETS {
            let w = watcher(budget);
            let res = Results::new();
            let mut expected = Vec::new();
            drive(
                mode,
                || {
                    for code in [0, 1, 7, 255] {
                        expected.push((exits_with(code), code));
                    }
                    for sig in [libc::SIGTERM, libc::SIGKILL, libc::SIGSEGV] {
                        expected.push((killed_by(sig), -sig));
                    }
                    for &(pid, _) in &expected {
                        w.add_child_handler(pid, res.callback()).unwrap();
                    }
                },
                || res.len() == 7,
            );
            for &(pid, rc) in &expected {
                assert_eq!(res.get(pid), vec![rc], "{mode:?} budget {budget} pid {pid}");
                assert_gone(pid);
            }
            if mode != Mode::NoLoop {
                let me = thread::current().id();
                assert!(
                    res.threads().iter().all(|&t| t == me),
                    "{mode:?}: callback off the loop thread"
                );
            }
            assert_eq!(w.pidfds_held(), 0);
            assert_eq!(w.waitids_pending(), 0);
            w.close();
        }
    }
}

#[test]
fn child_exited_before_add() {
    let _g = shared();
    for mode in MODES {
        for budget in BUDGETS {
            let w = watcher(budget);
            let res = Results::new();
            let (a, b) = (exits_with(5), killed_by(libc::SIGKILL));
            wait_state(a, 'Z');
            wait_state(b, 'Z');
            drive(
                mode,
                || {
                    w.add_child_handler(a, res.callback()).unwrap();
                    w.add_child_handler(b, res.callback()).unwrap();
                },
                || res.len() == 2,
            );
            assert_eq!(res.get(a), vec![5]);
            assert_eq!(res.get(b), vec![-9]);
            assert_gone(a);
            assert_gone(b);
            w.close();
        }
    }
}

#[test]
fn same_pid_again_replaces_the_callback() {
    let _g = shared();
    for mode in MODES {
        for budget in BUDGETS {
            let w = watcher(budget);
            let res = Results::new();
            let pid = sleeper();
            let env = Env::new(mode);
            env.drive(
                || {
                    w.add_child_handler(pid, res.tagged(1)).unwrap();
                    w.add_child_handler(pid, res.tagged(2)).unwrap();
                    // One operation, not two.
                    assert_eq!(
                        w.pidfds_held() + w.waitids_pending(),
                        1,
                        "{mode:?} {budget}"
                    );
                    kill(pid, libc::SIGKILL);
                },
                || res.len() == 1,
            );
            env.idle(Duration::from_millis(20));
            assert_eq!(
                res.get(pid),
                vec![-9 * 1000 + 2],
                "{mode:?} budget {budget}"
            );
            w.close();
        }
    }
}

#[test]
fn remove_cancels_and_leaves_the_child_alone() {
    let _g = shared();
    for mode in MODES {
        for budget in BUDGETS {
            let w = watcher(budget);
            let res = Results::new();
            let pid = sleeper();
            let env = Env::new(mode);
            env.drive(
                || {
                    w.add_child_handler(pid, res.callback()).unwrap();
                    assert!(w.remove_child_handler(pid));
                    assert!(!w.remove_child_handler(pid));
                    assert_eq!(w.pidfds_held(), 0, "the pidfd is closed at once");
                },
                || true,
            );
            // Let the cancellation reach the kernel, then kill: the child is
            // ours to reap, with its real status.
            env.idle(Duration::from_millis(20));
            kill(pid, libc::SIGKILL);
            assert_eq!(reap_myself(pid), -9, "{mode:?} budget {budget}");
            env.idle(Duration::from_millis(20));
            assert_eq!(res.len(), 0, "a removed handler never runs");
            assert_eq!(w.waitids_pending(), 0);
            assert!(!w.remove_child_handler(12345678));
            w.close();
        }
    }
}

#[test]
fn unknown_and_foreign_pids_give_255() {
    let _g = shared();
    for mode in MODES {
        for budget in BUDGETS {
            let w = watcher(budget);
            let res = Results::new();
            // Reaped elsewhere (by the test), so no longer anyone's child.
            let gone = exits_with(3);
            assert_eq!(reap_myself(gone), 3);
            // Alive but not our child.
            let foreign = 1;
            drive(
                mode,
                || {
                    w.add_child_handler(gone, res.callback()).unwrap();
                    w.add_child_handler(foreign, res.callback()).unwrap();
                },
                || res.len() == 2,
            );
            assert_eq!(res.get(gone), vec![255], "{mode:?} budget {budget}");
            assert_eq!(res.get(foreign), vec![255], "{mode:?} budget {budget}");
            w.close();
        }
    }
}

#[test]
fn stopped_and_continued_is_not_an_exit() {
    let _g = shared();
    for mode in MODES {
        for budget in BUDGETS {
            let w = watcher(budget);
            let res = Results::new();
            let pid = sleeper();
            let env = Env::new(mode);
            env.drive(
                || {
                    w.add_child_handler(pid, res.callback()).unwrap();
                    kill(pid, libc::SIGSTOP);
                    wait_state(pid, 'T');
                    kill(pid, libc::SIGCONT);
                },
                || true,
            );
            env.idle(Duration::from_millis(30));
            assert_eq!(
                res.len(),
                0,
                "{mode:?} budget {budget}: stop/continue reported"
            );
            env.drive(|| kill(pid, libc::SIGTERM), || res.len() == 1);
            assert_eq!(res.get(pid), vec![-15]);
            w.close();
        }
    }
}

#[test]
fn five_hundred_random_children_all_exact() {
    let _g = shared();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for mode in MODES {
        // Budget 100: both paths at once.
        let w = watcher(100);
        let res = Results::new();
        let mut expected = Vec::new();
        drive(
            mode,
            || {
                for _ in 0..500 {
                    let (pid, rc) = random_child(&mut rng);
                    w.add_child_handler(pid, res.callback()).unwrap();
                    expected.push((pid, rc));
                }
            },
            || res.len() == 500,
        );
        for &(pid, rc) in &expected {
            assert_eq!(res.get(pid), vec![rc], "{mode:?} pid {pid}");
        }
        w.close();
    }
}

#[test]
fn small_budget_with_many_live_children() {
    let _g = shared();
    const SIGS: [i32; 4] = [libc::SIGTERM, libc::SIGKILL, libc::SIGINT, libc::SIGHUP];
    for mode in MODES {
        let w = watcher(8);
        let res = Results::new();
        let pids: Vec<Pid> = (0..200).map(|_| sleeper()).collect();
        let max_held = Mutex::new(0usize);
        let note = || {
            let mut m = max_held.lock().unwrap();
            *m = (*m).max(w.pidfds_held());
        };
        drive(
            mode,
            || {
                for &pid in &pids {
                    w.add_child_handler(pid, res.callback()).unwrap();
                    note();
                }
                assert_eq!(w.pidfds_held(), 8);
                // On a proactor loop one sentinel WAITID watches all 192
                // overflow children; elsewhere each has its own WAITID.
                let waits = if matches!(mode, Mode::Proactor) {
                    1
                } else {
                    192
                };
                assert_eq!(
                    w.waitids_pending(),
                    waits,
                    "{mode:?}: beyond the budget is WAITID"
                );
                for (i, &pid) in pids.iter().enumerate() {
                    kill(pid, SIGS[i % SIGS.len()]);
                    note();
                }
            },
            || {
                note();
                res.len() == 200
            },
        );
        assert!(*max_held.lock().unwrap() <= 8);
        for (i, &pid) in pids.iter().enumerate() {
            assert_eq!(
                res.get(pid),
                vec![-SIGS[i % SIGS.len()]],
                "{mode:?} pid {pid}"
            );
        }
        assert_eq!(w.pidfds_held(), 0);
        assert_eq!(w.waitids_pending(), 0);
        w.close();
    }
}

#[test]
fn callbacks_run_on_the_loop_that_registered() {
    let _g = shared();
    let w = Arc::new(watcher(30));
    let kinds = [
        Mode::Proactor,
        Mode::Selector,
        Mode::Proactor,
        Mode::Selector,
    ];
    let handles: Vec<_> = kinds
        .into_iter()
        .enumerate()
        .map(|(i, mode)| {
            let w = Arc::clone(&w);
            thread::spawn(move || {
                let res = Results::new();
                let mut rng = Rng(0x1234_5678 + i as u64);
                let mut expected = Vec::new();
                drive(
                    mode,
                    || {
                        for _ in 0..25 {
                            let (pid, rc) = random_child(&mut rng);
                            w.add_child_handler(pid, res.callback()).unwrap();
                            expected.push((pid, rc));
                        }
                    },
                    || res.len() == 25,
                );
                let me = thread::current().id();
                assert!(
                    res.threads().iter().all(|&t| t == me),
                    "{mode:?}: wrong thread"
                );
                for &(pid, rc) in &expected {
                    assert_eq!(res.get(pid), vec![rc]);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    w.close();
}

#[test]
fn loop_closed_under_a_pending_child_still_reports() {
    let _g = shared();
    for mode in [Mode::Proactor, Mode::Selector] {
        for budget in BUDGETS {
            let w = watcher(budget);
            let res = Results::new();
            let pid = sleeper();
            let env = Env::new(mode);
            env.drive(
                || w.add_child_handler(pid, res.callback()).unwrap(),
                || true,
            );
            env.idle(Duration::from_millis(10));
            // The loop goes away with the child still running: the watcher
            // moves it to its own ring, harvested by its reaper thread.
            drop(env);
            kill(pid, libc::SIGKILL);
            drive(Mode::NoLoop, || {}, || res.len() == 1);
            assert_eq!(res.get(pid), vec![-9], "{mode:?} budget {budget}");
            assert_gone(pid);
            w.close();
        }
    }
}

// ---------------------------------------------------------------- close

fn count_dir(path: &str) -> usize {
    std::fs::read_dir(path).map(|d| d.count()).unwrap_or(0)
}

fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Waits for the process's descriptor count to come back to `fds` and for
/// the watcher's reaper thread to be gone. (Threads are compared by name:
/// the test harness starts its own threads for tests waiting on the lock.)
fn settle(fds: usize) {
    let t = Instant::now();
    loop {
        let f = count_dir("/proc/self/fd");
        let names = thread_names();
        let reapers = names.iter().filter(|n| n.trim() == "uring-reaper").count();
        if f <= fds && reapers == 0 {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "left behind: {f} fds (was {fds}), threads {names:?}"
        );
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn close_leaves_no_zombie_thread_or_descriptor() {
    let _g = exclusive();
    let fds = count_dir("/proc/self/fd");
    for mode in MODES {
        for budget in [1 << 16, 0, 4] {
            let w = watcher(budget);
            let res = Results::new();
            let mut done = Vec::new();
            drive(
                mode,
                || {
                    for code in 0..10 {
                        let pid = exits_with(code);
                        w.add_child_handler(pid, res.callback()).unwrap();
                        done.push(pid);
                    }
                },
                || res.len() == 10,
            );
            w.close();
            for &pid in &done {
                assert_gone(pid);
            }
            settle(fds);
        }
    }
}

#[test]
fn close_with_children_pending() {
    let _g = exclusive();
    let fds = count_dir("/proc/self/fd");
    for mode in MODES {
        for budget in [1 << 16, 0] {
            let w = watcher(budget);
            let res = Results::new();
            let env = Env::new(mode);
            let (live, dead) = (sleeper(), sleeper());
            let add = || {
                w.add_child_handler(live, res.callback()).unwrap();
                w.add_child_handler(dead, res.callback()).unwrap();
            };
            env.drive(add, || true);
            // With a loop that no longer runs, `dead` dies unreported; either
            // way it must not stay a zombie after close().
            kill(dead, libc::SIGKILL);
            // Dead (a zombie, or already reaped by a WAITID in the kernel).
            let t = Instant::now();
            while !matches!(proc_state(dead), Some('Z') | None) {
                assert!(t.elapsed() < HANG);
                thread::sleep(Duration::from_millis(1));
            }
            w.close();
            assert_gone(dead);
            assert!(res.get(live).is_empty());
            // The live child is the caller's now: nobody else reaps it.
            drop(env);
            kill(live, libc::SIGTERM);
            assert_eq!(reap_myself(live), -15, "{mode:?} {budget}");
            assert!(res.get(live).is_empty());
            settle(fds);
        }
    }
}

// ---------------------------------------------------------------- stress and measurements

/// `cargo test --release --test uring_watcher -- --ignored stress --nocapture`
#[test]
#[ignore]
fn stress_100k_children() {
    let _g = exclusive();
    let total: usize = std::env::var("URING_STRESS_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    let per_mode = total.div_ceil(3);
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    for mode in MODES {
        let w = watcher(64);
        let res = Results::new();
        let expected = Mutex::new(Vec::with_capacity(per_mode));
        let start = Instant::now();
        let spawn_some = |rng: &mut Rng| {
            let mut e = expected.lock().unwrap();
            while e.len() < per_mode && e.len() - res.total() < 256 {
                let (pid, rc) = random_child(rng);
                w.add_child_handler(pid, res.callback()).unwrap();
                e.push((pid, rc));
            }
        };
        match mode {
            Mode::NoLoop => {
                while res.total() < per_mode {
                    spawn_some(&mut rng);
                    thread::sleep(Duration::from_micros(200));
                }
            }
            _ => {
                let env = Env::new(mode);
                let Some(lp) = &env.lp else { unreachable!() };
                lp.run_until_complete(async {
                    while res.total() < per_mode {
                        spawn_some(&mut rng);
                        childwatch::sleep(Duration::from_micros(200)).await;
                    }
                })
                .unwrap();
            }
        }
        // A pid can be reused within one run: compare per pid, in order.
        let mut want: HashMap<Pid, Vec<ReturnCode>> = HashMap::new();
        for &(pid, rc) in expected.lock().unwrap().iter() {
            want.entry(pid).or_default().push(rc);
        }
        let wrong = want
            .iter()
            .filter(|&(&pid, rcs)| {
                let mut got = res.get(pid);
                let mut rcs = rcs.clone();
                got.sort_unstable();
                rcs.sort_unstable();
                got != rcs
            })
            .count();
        let delivered = res.total();
        println!(
            "{mode:?}: {per_mode} children in {:.1?}, {delivered} callbacks, {wrong} wrong",
            start.elapsed()
        );
        assert_eq!(
            delivered, per_mode,
            "{mode:?}: lost or duplicated callbacks"
        );
        assert_eq!(wrong, 0);
        w.close();
    }
}

/// Kill + reap of N live children, POLL_ADD path vs WAITID path:
/// `URING_BENCH_N=10000 cargo test --release --test uring_watcher -- --ignored kill_and_reap --nocapture`
#[test]
#[ignore]
fn kill_and_reap_poll_vs_waitid() {
    let _g = exclusive();
    let n: usize = std::env::var("URING_BENCH_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2_000);
    let default_budget = UringChildWatcher::new().unwrap().fd_budget();
    for (name, budget, foreign) in [
        ("POLL_ADD", usize::MAX, false),
        ("WAITID", 0, false),
        ("default budget", default_budget, false),
        // A foreign zombie at the kill, reaped by its owner 20 ms later: a
        // passing slowdown, not one for the rest of the run.
        ("WAITID+foreign", 0, true),
    ] {
        // URING_BENCH_CASE=name runs only that case.
        if std::env::var("URING_BENCH_CASE").is_ok_and(|c| c != name) {
            continue;
        }
        let w = watcher(budget);
        let res = Results::new();
        let lp = EventLoop::proactor().unwrap();
        // Older than the watched children, so every waitid(P_ALL) finds it
        // first.
        let zombie = foreign.then(|| exits_with(0));
        let pids: Vec<Pid> = (0..n).map(|_| sleeper()).collect();
        let owner = zombie.map(|z| {
            wait_state(z, 'Z');
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(20));
                reap_myself(z)
            })
        });
        let mut elapsed = Duration::ZERO;
        lp.run_until_complete(async {
            for &pid in &pids {
                w.add_child_handler(pid, res.callback()).unwrap();
            }
            let (held, waits) = (w.pidfds_held(), w.waitids_pending());
            let t = Instant::now();
            for &pid in &pids {
                kill(pid, libc::SIGKILL);
            }
            while res.len() < n {
                childwatch::sleep(Duration::from_micros(500)).await;
            }
            elapsed = t.elapsed();
            println!(
                "{name:>14}: kill + reap of {n} live children: {elapsed:.2?} \
                 ({held} pidfds, {waits} WAITIDs)"
            );
        })
        .unwrap();
        lp.close().unwrap();
        assert!(pids.iter().all(|&p| res.get(p) == vec![-9]));
        if let Some(owner) = owner {
            assert_eq!(
                owner.join().unwrap(),
                0,
                "the foreign zombie was reaped by us"
            );
        }
        w.close();
    }
}

#[test]
fn added_from_a_thread_that_exits_before_the_child() {
    let _g = shared();
    for (mode, budget) in MODES.into_iter().flat_map(|m| BUDGETS.map(|b| (m, b))) {
        let w = Arc::new(watcher(budget));
        let res = Results::new();
        let pids: Vec<Pid> = (0..4).map(|_| sleeper()).collect();
        let (w2, r2, p2) = (Arc::clone(&w), Arc::clone(&res), pids.clone());
        // The submitting thread (and its loop) is gone when the children
        // exit: their exits must still be reported exactly.
        thread::spawn(move || {
            Env::new(mode).drive(
                || {
                    for pid in p2 {
                        w2.add_child_handler(pid, r2.callback()).unwrap();
                    }
                },
                || true,
            );
        })
        .join()
        .unwrap();
        for &pid in &pids {
            kill(pid, libc::SIGTERM);
        }
        drive(Mode::NoLoop, || {}, || res.len() == pids.len());
        for &pid in &pids {
            assert_eq!(res.get(pid), vec![-15], "{mode:?} budget {budget}");
        }
        w.close();
    }
}

#[test]
fn emfile_falls_back_to_waitid() {
    let _g = exclusive();
    for mode in MODES {
        let w = watcher(usize::MAX);
        let res = Results::new();
        let env = Env::new(mode);
        let pids: Vec<Pid> = (0..12).map(|_| sleeper()).collect();
        // The first child also creates the watcher's own ring, if it needs one.
        env.drive(
            || w.add_child_handler(pids[0], res.callback()).unwrap(),
            || true,
        );
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: plain syscalls on a local struct.
        unsafe { assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0) };
        let low = libc::rlimit {
            rlim_cur: (count_dir("/proc/self/fd") + 3) as libc::rlim_t,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above; restored right after the registrations.
        unsafe { assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &low), 0) };
        let added = std::cell::RefCell::new(Ok(()));
        env.drive(
            || {
                for &pid in &pids[1..] {
                    let r = w.add_child_handler(pid, res.callback());
                    if r.is_err() {
                        *added.borrow_mut() = r;
                    }
                }
            },
            || true,
        );
        // SAFETY: as above.
        unsafe { assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0) };
        added.into_inner().unwrap();
        assert!(
            w.waitids_pending() > 0,
            "{mode:?}: no child fell back to WAITID"
        );
        assert!(w.pidfds_held() > 0);
        env.drive(
            || pids.iter().for_each(|&p| kill(p, libc::SIGKILL)),
            || res.len() == pids.len(),
        );
        for &pid in &pids {
            assert_eq!(res.get(pid), vec![-9], "{mode:?}");
        }
        w.close();
    }
}

// ---------------------------------------------------------------- the sentinel

/// Budget 0: every child is an overflow child. On a proactor loop one
/// sentinel `WAITID(P_ALL, WNOWAIT)` watches all 300 of them; every status
/// must still reach its own callback exactly once.
#[test]
fn sentinel_budget_zero_300_children_all_exact() {
    let _g = shared();
    const SIGS: [i32; 4] = [libc::SIGTERM, libc::SIGKILL, libc::SIGINT, libc::SIGHUP];
    for mode in MODES {
        let w = watcher(0);
        let res = Results::new();
        let pids: Vec<Pid> = (0..300).map(|_| sleeper()).collect();
        let env = Env::new(mode);
        env.drive(
            || {
                for &pid in &pids {
                    w.add_child_handler(pid, res.callback()).unwrap();
                }
                assert_eq!(w.pidfds_held(), 0);
                if mode == Mode::Proactor {
                    assert_eq!(w.waitids_pending(), 1, "one sentinel for all");
                }
                for (i, &pid) in pids.iter().enumerate() {
                    kill(pid, SIGS[i % SIGS.len()]);
                }
            },
            || res.len() == 300,
        );
        env.idle(Duration::from_millis(20));
        for (i, &pid) in pids.iter().enumerate() {
            assert_eq!(
                res.get(pid),
                vec![-SIGS[i % SIGS.len()]],
                "{mode:?} pid {pid}"
            );
            assert_gone(pid);
        }
        assert_eq!(res.total(), 300, "{mode:?}: a status delivered twice");
        assert_eq!(w.waitids_pending(), 0, "{mode:?}");
        w.close();
    }
}

/// A zombie child that is not registered (a foreign one) blocks the
/// sentinel: the watcher must fall back to one `WAITID` per child, report
/// all of its own children exactly, and never reap the foreign one — which
/// the test reaps itself at the end, with its real status.
#[test]
fn sentinel_foreign_zombie_is_never_reaped() {
    let _g = exclusive();
    for mode in MODES {
        let foreign = exits_with(7);
        wait_state(foreign, 'Z');
        let w = watcher(0);
        let res = Results::new();
        let pids: Vec<Pid> = (0..100).map(|_| sleeper()).collect();
        let env = Env::new(mode);
        env.drive(
            || {
                for &pid in &pids {
                    w.add_child_handler(pid, res.callback()).unwrap();
                }
                for &pid in &pids {
                    kill(pid, libc::SIGKILL);
                }
            },
            || res.len() == 100,
        );
        env.idle(Duration::from_millis(20));
        for &pid in &pids {
            assert_eq!(res.get(pid), vec![-9], "{mode:?} pid {pid}");
        }
        assert_eq!(res.total(), 100, "{mode:?}: a status delivered twice");
        assert_eq!(proc_state(foreign), Some('Z'), "{mode:?}: foreign reaped");
        // After the fallback, the overflow path still works (per pid or a
        // new sentinel once the per-pid operations are gone).
        let more: Vec<Pid> = (0..20).map(|_| sleeper()).collect();
        env.drive(
            || {
                for &pid in &more {
                    w.add_child_handler(pid, res.callback()).unwrap();
                    kill(pid, libc::SIGTERM);
                }
            },
            || res.len() == 120,
        );
        for &pid in &more {
            assert_eq!(res.get(pid), vec![-libc::SIGTERM], "{mode:?} pid {pid}");
        }
        assert_eq!(proc_state(foreign), Some('Z'), "{mode:?}: foreign reaped");
        w.close();
        drop(env);
        assert_eq!(reap_myself(foreign), 7, "{mode:?}");
    }
}

/// Budget 8 with 200 children killed at once: pidfd-mode children are
/// reaped by the sentinel's sweep before their `POLL_ADD` completes; that
/// completion must then only close the pidfd — one status per child.
#[test]
fn sentinel_mixed_pidfd_and_overflow_no_double_delivery() {
    let _g = shared();
    for mode in MODES {
        let w = watcher(8);
        let res = Results::new();
        let pids: Vec<Pid> = (0..200).map(|_| sleeper()).collect();
        let env = Env::new(mode);
        env.drive(
            || {
                for &pid in &pids {
                    w.add_child_handler(pid, res.callback()).unwrap();
                }
                assert_eq!(w.pidfds_held(), 8);
                for &pid in &pids {
                    kill(pid, libc::SIGKILL);
                }
            },
            || res.len() == 200,
        );
        // Let every late POLL_ADD completion arrive.
        let t = Instant::now();
        env.drive(
            || {},
            || w.pidfds_held() == 0 || t.elapsed() > Duration::from_secs(10),
        );
        env.idle(Duration::from_millis(20));
        for &pid in &pids {
            assert_eq!(res.get(pid), vec![-9], "{mode:?} pid {pid}");
            assert_gone(pid);
        }
        assert_eq!(res.total(), 200, "{mode:?}: a status delivered twice");
        assert_eq!(w.pidfds_held(), 0, "{mode:?}: a pidfd left open");
        w.close();
    }
}

/// Two proactor loops on two threads, each with its own sentinel and its
/// own overflow children: a sweep on one loop may reap the other loop's
/// children; each status must still reach its callback exactly once, on the
/// thread of the loop that registered it.
#[test]
fn sentinel_two_loops_each_gets_its_own_children() {
    let _g = shared();
    let w = Arc::new(watcher(0));
    let res = Results::new();
    let groups: Vec<Vec<Pid>> = (0..2)
        .map(|_| (0..60).map(|_| sleeper()).collect())
        .collect();
    let barrier = Arc::new(std::sync::Barrier::new(3));
    let handles: Vec<_> = groups
        .iter()
        .cloned()
        .map(|pids| {
            let (w, res, barrier) = (Arc::clone(&w), Arc::clone(&res), Arc::clone(&barrier));
            thread::spawn(move || {
                let env = Env::new(Mode::Proactor);
                env.drive(
                    || {
                        for &pid in &pids {
                            w.add_child_handler(pid, res.callback()).unwrap();
                        }
                        barrier.wait();
                    },
                    || pids.iter().all(|&p| !res.get(p).is_empty()),
                );
                env.idle(Duration::from_millis(20));
                thread::current().id()
            })
        })
        .collect();
    barrier.wait();
    for &pid in groups.iter().flatten() {
        kill(pid, libc::SIGKILL);
    }
    let tids: Vec<ThreadId> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let map = res.map.lock().unwrap();
    for (pids, tid) in groups.iter().zip(&tids) {
        for pid in pids {
            let got = &map[pid];
            assert_eq!(got.len(), 1, "pid {pid}: delivered {} times", got.len());
            assert_eq!(got[0].0, -9, "pid {pid}");
            assert_eq!(got[0].1, *tid, "pid {pid}: callback on the wrong loop");
        }
    }
    drop(map);
    assert_eq!(res.total(), 120);
    w.close();
}

// ---------------------------------------------------------------- the gate

/// An exit is only *seen* by io_uring (`WNOWAIT`, or a pidfd poll); the reap
/// happens when the completion is processed on the harvesting thread, under
/// the child's gate. Until then the child stays a zombie, so its pid cannot
/// be given to a new child that would then receive the old status (the
/// kernel used to reap in a per-pid `WAITID` before the status was
/// processed).
#[test]
fn an_exit_stays_unreaped_until_its_completion_is_processed() {
    let _g = shared();
    for mode in [Mode::Proactor, Mode::Selector] {
        for budget in BUDGETS {
            let w = watcher(budget);
            let res = Results::new();
            let pid = sleeper();
            let env = Env::new(mode);
            env.drive(
                || w.add_child_handler(pid, res.callback()).unwrap(),
                || true,
            );
            // The loop does not run: nothing processes the completion.
            kill(pid, libc::SIGKILL);
            wait_state(pid, 'Z');
            thread::sleep(Duration::from_millis(50));
            assert_eq!(
                proc_state(pid),
                Some('Z'),
                "{mode:?} budget {budget}: reaped before its status was processed"
            );
            assert!(res.get(pid).is_empty());
            env.drive(|| {}, || res.len() == 1);
            assert_eq!(res.get(pid), vec![-9], "{mode:?} budget {budget}");
            assert_gone(pid);
            w.close();
        }
    }
}

/// `add_child` with a `ChildHandle`: the watcher polls the child's one pidfd
/// (the gate's, shared with `Process`) within the budget, none beyond it;
/// the status is recorded in the gate, and signals after it are no-ops.
#[test]
fn add_child_shares_the_gates_pidfd_and_records_the_status() {
    let _g = shared();
    for mode in MODES {
        for budget in BUDGETS {
            let w = watcher(budget);
            let res = Results::new();
            let child = childwatch::ChildHandle::new(sleeper()).unwrap();
            let pid = child.pid();
            drive(
                mode,
                || {
                    w.add_child(&child, res.callback()).unwrap();
                    assert_eq!(
                        child.pidfd().is_some(),
                        budget > 0,
                        "{mode:?} budget {budget}: one pidfd, and only within the budget"
                    );
                    child.send_signal(libc::SIGTERM).unwrap();
                },
                || res.len() == 1,
            );
            assert_eq!(res.get(pid), vec![-15], "{mode:?} budget {budget}");
            assert_eq!(child.returncode(), Some(-15));
            assert!(child.pidfd().is_none(), "the pidfd closes at the reap");
            child.send_signal(libc::SIGKILL).unwrap();
            assert_gone(pid);
            assert_eq!(w.pidfds_held(), 0);
            w.close();
        }
    }
}

/// A child reaped behind the watcher's back (a foreign `waitpid`) is
/// reported as lost (255), through the gate, on every path.
#[test]
fn reaped_behind_our_back_is_255() {
    let _g = shared();
    for mode in MODES {
        for budget in BUDGETS {
            let w = watcher(budget);
            let res = Results::new();
            let pid = sh("sleep 0.2; exit 3");
            drive(
                mode,
                || {
                    w.add_child_handler(pid, res.callback()).unwrap();
                    assert_eq!(reap_myself(pid), 3);
                },
                || res.len() == 1,
            );
            assert_eq!(res.get(pid), vec![255], "{mode:?} budget {budget}");
            w.close();
        }
    }
}

/// Runs test `name` again inside a private pid namespace whose `pid_max` is
/// 400, where about a hundred pids recycle over and over: true when called
/// from inside (the caller runs its body), false outside (the run inside
/// passed, or the namespace cannot be made here: skipped with a message).
fn in_small_pid_namespace(name: &str) -> bool {
    if std::env::var_os("CW_IN_PID_NS").is_some() {
        return true;
    }
    let _g = exclusive();
    let ns = [
        "--user",
        "--map-root-user",
        "--pid",
        "--fork",
        "--mount-proc",
        "sh",
        "-c",
    ];
    let probe = Command::new("unshare")
        .args(ns)
        .arg("echo 400 > /proc/sys/kernel/pid_max")
        .output();
    if !probe.as_ref().is_ok_and(|o| o.status.success()) {
        eprintln!("skipped: cannot make a pid namespace with a small pid_max here ({probe:?})");
        return false;
    }
    // sh stays pid 1 of the namespace; the test runs as one of its children.
    let out = Command::new("unshare")
        .args(ns)
        .arg(format!(
            "echo 400 > /proc/sys/kernel/pid_max && \"$0\" --exact {name} --nocapture \
             --include-ignored --test-threads 1"
        ))
        .arg(std::env::current_exe().unwrap())
        .env("CW_IN_PID_NS", "1")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "inside the pid namespace:\n{text}");
    assert!(text.contains("1 passed"), "{text}");
    false
}

/// Failing input 2 of the pid-reuse issue, exactly: a child exits with 7
/// while nothing processes its completion (the loop does not run); then the
/// test spawns children until one takes that pid. The exit must not have
/// freed the pid before its status was processed (the kernel used to reap
/// in a per-pid `WAITID` at once, and the new child received 7), so no
/// spawn gets it, and the old child's callback gets 7.
#[test]
fn a_pid_is_not_freed_before_its_status_is_processed() {
    if !in_small_pid_namespace("a_pid_is_not_freed_before_its_status_is_processed") {
        return;
    }
    for (mode, budget) in [
        (Mode::Selector, 0),
        (Mode::Selector, 4),
        (Mode::Proactor, 0),
    ] {
        let w = watcher(budget);
        let res = Results::new();
        let env = Env::new(mode);
        // Into the band of pids that recycle (after the first wrap-around,
        // 300 and up).
        for _ in 0..1000 {
            let mut c = Command::new("true").spawn().unwrap();
            c.wait().unwrap();
            if c.id() >= 300 {
                break;
            }
        }
        let old = exits_with(7);
        assert!(old >= 300, "pid {old} is not in the recycled band");
        env.drive(|| w.add_child_handler(old, res.tagged(1)).unwrap(), || true);
        while !matches!(proc_state(old), Some('Z') | None) {
            thread::sleep(Duration::from_millis(1));
        }
        // The allocator hands out the lowest free pid of the recycled band
        // again and again: `old`'s pid at once, if it were free.
        let mut reused = None;
        for _ in 0..200 {
            let mut c = Command::new("sleep").arg("30").spawn().unwrap();
            if c.id() as Pid == old {
                reused = Some(c);
                break;
            }
            c.kill().unwrap();
            c.wait().unwrap();
        }
        if let Some(c) = &reused {
            // What a spawn would do with the recycled pid.
            w.add_child_handler(c.id() as Pid, res.tagged(2)).unwrap();
        }
        env.drive(|| {}, || !res.get(old).is_empty());
        if let Some(mut c) = reused {
            let _ = c.kill();
            let _ = c.wait();
            panic!(
                "{mode:?} budget {budget}: pid {old} was reused before its exit was processed; \
                 callbacks got {:?}",
                res.get(old)
            );
        }
        assert_eq!(res.get(old), vec![7 * 1000 + 1], "{mode:?} budget {budget}");
        assert_gone(old);
        w.close();
    }
}

/// Pid reuse under load, in the small pid namespace: random exit codes and
/// signals, 32 children in flight, on every path (proactor, selector, no
/// loop; budget 0, small, large): every status must reach the callback of
/// the child it came from, once. `URING_REUSE_N` sets the number of
/// children per path (default 2,000).
/// `cargo test --release --test uring_watcher -- --ignored pid_reuse_stress`
#[test]
#[ignore]
fn pid_reuse_stress() {
    if !in_small_pid_namespace("pid_reuse_stress") {
        return;
    }
    let n: usize = std::env::var("URING_REUSE_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let rng = std::cell::RefCell::new(Rng(0x9e37_79b9_7f4a_7c15));
    for mode in MODES {
        for budget in [0, 4, 1 << 16] {
            let w = watcher(budget);
            let wrong = Arc::new(Mutex::new(Vec::new()));
            let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let started = std::cell::Cell::new(0usize);
            let spawn_more = || {
                while started.get() < n
                    && started.get() - done.load(std::sync::atomic::Ordering::SeqCst) < 32
                {
                    let (pid, rc) = random_child(&mut rng.borrow_mut());
                    let (wrong, done) = (Arc::clone(&wrong), Arc::clone(&done));
                    w.add_child_handler(
                        pid,
                        Box::new(move |p, got| {
                            if (p, got) != (pid, rc) {
                                wrong.lock().unwrap().push((pid, rc, p, got));
                            }
                            done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }),
                    )
                    .unwrap();
                    started.set(started.get() + 1);
                }
            };
            let finished = || {
                spawn_more();
                done.load(std::sync::atomic::Ordering::SeqCst) == n
            };
            drive(mode, || {}, finished);
            thread::sleep(Duration::from_millis(20));
            assert_eq!(done.load(std::sync::atomic::Ordering::SeqCst), n);
            let wrong = wrong.lock().unwrap();
            assert!(
                wrong.is_empty(),
                "{mode:?} budget {budget}: {} wrong statuses (pid, expected, got pid, got): {:?}",
                wrong.len(),
                &wrong[..wrong.len().min(10)]
            );
            w.close();
        }
    }
}

/// Runs test `name` again as an unprivileged user (`setpriv`, uid 65534),
/// where `RLIMIT_NPROC` is enforced: true when called from there (the
/// caller runs its body), false here (it passed there, or `setpriv` cannot
/// run here: skipped with a message).
fn as_unprivileged_user(name: &str) -> bool {
    if std::env::var_os("CW_UNPRIVILEGED").is_some() {
        return true;
    }
    let _g = exclusive();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--include-ignored"])
        .args(["--test-threads", "1"])
        .env("CW_UNPRIVILEGED", "1")
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            eprintln!("skipped: cannot run setpriv here ({e})");
            return false;
        }
    };
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if text.contains("setpriv: ") {
        eprintln!("skipped: setpriv failed here:\n{text}");
        return false;
    }
    assert!(out.status.success(), "as an unprivileged user:\n{text}");
    assert!(text.contains("1 passed"), "{text}");
    false
}

/// Sets the soft `RLIMIT_NPROC` (the user's processes and threads).
fn set_nproc(n: libc::rlim_t) -> libc::rlim_t {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe { assert_eq!(libc::getrlimit(libc::RLIMIT_NPROC, &mut lim), 0) };
    let old = lim.rlim_cur;
    lim.rlim_cur = n.min(lim.rlim_max);
    // SAFETY: as above.
    unsafe { assert_eq!(libc::setrlimit(libc::RLIMIT_NPROC, &lim), 0) };
    old
}

/// Failing input 5 of the pid-reuse issue: a proactor loop with children
/// pending is closed while no thread can start at all (`RLIMIT_NPROC` 1,
/// unprivileged): neither the watcher's own reaper nor a waiter thread nor
/// the overflow poller. No status may be lost: the children stay zombies
/// (nobody reaps them behind the gate), and the next call into the watcher
/// reaps them and delivers every status.
#[test]
fn no_thread_and_the_loop_closed_loses_no_status() {
    if !as_unprivileged_user("no_thread_and_the_loop_closed_loses_no_status") {
        return;
    }
    if !UringChildWatcher::is_supported() {
        eprintln!("skipped: io_uring is not available to this user");
        return;
    }
    for budget in BUDGETS {
        let w = watcher(budget);
        let res = Results::new();
        let pids: Vec<Pid> = (0..10).map(|_| sleeper()).collect();
        let env = Env::new(Mode::Proactor);
        env.drive(
            || {
                for &pid in &pids {
                    w.add_child_handler(pid, res.callback()).unwrap();
                }
            },
            || true,
        );
        let old = set_nproc(1);
        assert!(
            thread::Builder::new().spawn(|| ()).is_err(),
            "a thread started"
        );
        // The loop's ring goes away: the own ring's reaper, a waiter thread
        // and the overflow poller all fail to start.
        drop(env);
        for &pid in &pids {
            kill(pid, libc::SIGKILL);
        }
        for &pid in &pids {
            wait_state(pid, 'Z');
        }
        thread::sleep(Duration::from_millis(50));
        assert_eq!(
            res.len(),
            0,
            "budget {budget}: delivered without any harvester?"
        );
        // Any registration checks the children nobody else can (our own
        // pid: not our child, reported lost at once).
        w.add_child_handler(std::process::id() as Pid, Box::new(|_, _| {}))
            .unwrap();
        assert_eq!(res.len(), 10, "budget {budget}");
        for &pid in &pids {
            assert_eq!(res.get(pid), vec![-9], "budget {budget}");
            assert_gone(pid);
        }
        set_nproc(old);
        w.close();
    }
}

// ---------------------------------------------------------------- host driver

/// A host loop (here: this thread polling the driver's descriptor) harvests
/// the watcher's own ring: every status exact, delivered on this thread,
/// and no reaper thread started. Dropping the driver with children pending
/// hands them to the reaper thread.
#[test]
fn a_host_driver_harvests_without_a_reaper_thread() {
    use std::os::fd::AsRawFd;
    let _g = exclusive();
    for budget in [None, Some(0)] {
        let w = UringChildWatcher::new().unwrap();
        if let Some(b) = budget {
            w.set_fd_budget(b);
        }
        let driver = w.host_driver().unwrap();
        let me = thread::current().id();
        let got: Arc<Mutex<HashMap<Pid, (ReturnCode, ThreadId)>>> = Arc::default();
        let mut want = HashMap::new();
        for code in [0, 3, 7, 42] {
            let pid = Command::new("/bin/sh")
                .args(["-c", &format!("sleep 0.05; exit {code}")])
                .spawn()
                .unwrap()
                .id() as Pid;
            want.insert(pid, code);
            let g = Arc::clone(&got);
            w.add_child_handler(
                pid,
                Box::new(move |pid, rc| {
                    g.lock().unwrap().insert(pid, (rc, thread::current().id()));
                }),
            )
            .unwrap();
        }
        assert!(
            !thread_names().iter().any(|n| n.contains("reaper")),
            "no reaper thread while a host driver harvests: {:?}",
            thread_names()
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while got.lock().unwrap().len() < want.len() && Instant::now() < deadline {
            let mut pfd = libc::pollfd {
                fd: driver.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut pfd, 1, 100) };
            driver.harvest();
        }
        let got = got.lock().unwrap();
        for (pid, code) in &want {
            assert_eq!(
                got.get(pid),
                Some(&(*code, me)),
                "pid {pid} (budget {budget:?})"
            );
        }
        assert!(!thread_names().iter().any(|n| n.contains("reaper")));
        drop(got);
        // A pending child when the driver goes: the reaper takes over.
        let (tx, rx) = std::sync::mpsc::channel();
        let pid = Command::new("/bin/sh")
            .args(["-c", "sleep 0.2; exit 9"])
            .spawn()
            .unwrap()
            .id() as Pid;
        w.add_child_handler(pid, Box::new(move |_, rc| tx.send(rc).unwrap()))
            .unwrap();
        drop(driver);
        assert_eq!(rx.recv_timeout(Duration::from_secs(30)).ok(), Some(9));
        w.close();
    }
}

/// Spawns `sh -c 'exit 7'` under `w` on the selector loop `b` and waits up to
/// 30 s for its status (`None`: never reported).
fn exit_7_on(b: &EventLoop, w: &Arc<UringChildWatcher>) -> Option<i32> {
    let w: Arc<dyn ChildWatcher> = Arc::clone(w) as Arc<dyn ChildWatcher>;
    b.run_until_complete(async move {
        let p = childwatch::create_subprocess_exec("sh", ["-c", "exit 7"])
            .watcher(w)
            .spawn()
            .unwrap();
        let wait = std::pin::pin!(p.wait());
        let limit = std::pin::pin!(childwatch::sleep(Duration::from_secs(30)));
        match futures_util::future::select(wait, limit).await {
            futures_util::future::Either::Left((r, _)) => Some(r.unwrap()),
            futures_util::future::Either::Right(_) => None,
        }
    })
    .unwrap()
}

/// Selector loop A registers a child and goes idle before its next
/// iteration; a registration on selector loop B (same thread or another)
/// must still reach the kernel at once, not when A runs again.
#[test]
fn an_idle_selector_loop_does_not_hold_back_another_loops_children() {
    let _g = shared();
    for budget in BUDGETS {
        let w = Arc::new(watcher(budget));
        let a = EventLoop::selector().unwrap();
        let wa: Arc<dyn ChildWatcher> = Arc::clone(&w) as Arc<dyn ChildWatcher>;
        let pa = a
            .run_until_complete(async move {
                childwatch::create_subprocess_exec("sh", ["-c", "exit 3"])
                    .watcher(wa)
                    .spawn()
                    .unwrap()
            })
            .unwrap();
        let b = EventLoop::selector().unwrap();
        assert_eq!(exit_7_on(&b, &w), Some(7), "same thread, budget {budget}");
        let w2 = Arc::clone(&w);
        let other = thread::spawn(move || exit_7_on(&EventLoop::selector().unwrap(), &w2));
        assert_eq!(
            other.join().unwrap(),
            Some(7),
            "other thread, budget {budget}"
        );
        // A's own child is reported once A runs again.
        assert_eq!(a.run_until_complete(pa.wait()).unwrap().unwrap(), 3);
        w.close();
    }
}
