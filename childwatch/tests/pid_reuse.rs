//! Issue 9, failing inputs 1 and 2 (and the 20,000-child stress of input
//! 2): pid reuse. Each test re-executes itself inside a private pid
//! namespace with `pid_max` 400 (see `fault_util::pidns`), where a freed pid
//! comes back within ~100 spawns (we steer it back at once through
//! `ns_last_pid`). Skipped, with a message, where `unshare` is not
//! permitted.
//!
//! Every case runs for every watcher on both loop kinds. The "busy loop"
//! is the future itself blocking the loop thread (as a slow callback
//! would) right after the child exits: threads of the watcher may reap in
//! that window, but the loop cannot deliver the status.
//!
//! Run the ignored stress (20,000 children per watcher and loop, minutes):
//! `cargo test -p childwatch --test pid_reuse -- --ignored stress`
//! (`CHILDWATCH_STRESS_N=2000` for a shorter run).
#![cfg(target_os = "linux")]

mod fault_util;
mod watcher_util;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use childwatch::{
    ChildWatcher, LoopKind, Pid, Process, create_subprocess_exec, create_subprocess_shell, sleep,
};
use fault_util::{FdFill, HANG, Strangers, Wk, pidns, within};
use watcher_util::{Rng, new_loop, proc_state, script_for, zombie_children};

/// The outer run's limit for one namespace run (a hang guard).
const NS_LIMIT: Duration = Duration::from_secs(300);
/// ... and for one stress run.
const STRESS_LIMIT: Duration = Duration::from_secs(3 * 3600);

/// One test per watcher and loop kind, each in its own namespace.
macro_rules! matrix {
    ($(#[$m:meta])* $case:ident, $limit:expr) => {
        mod $case {
            use super::*;
            matrix!(@one $(#[$m])* $case, $limit, threaded_proactor, Wk::Threaded, LoopKind::Proactor);
            matrix!(@one $(#[$m])* $case, $limit, threaded_selector, Wk::Threaded, LoopKind::Selector);
            matrix!(@one $(#[$m])* $case, $limit, safe_proactor, Wk::Safe, LoopKind::Proactor);
            matrix!(@one $(#[$m])* $case, $limit, safe_selector, Wk::Safe, LoopKind::Selector);
            matrix!(@one $(#[$m])* $case, $limit, fast_proactor, Wk::Fast, LoopKind::Proactor);
            matrix!(@one $(#[$m])* $case, $limit, fast_selector, Wk::Fast, LoopKind::Selector);
            matrix!(@one $(#[$m])* $case, $limit, multiloop_proactor, Wk::MultiLoop, LoopKind::Proactor);
            matrix!(@one $(#[$m])* $case, $limit, multiloop_selector, Wk::MultiLoop, LoopKind::Selector);
            matrix!(@one $(#[$m])* $case, $limit, pidfd_proactor, Wk::Pidfd, LoopKind::Proactor);
            matrix!(@one $(#[$m])* $case, $limit, pidfd_selector, Wk::Pidfd, LoopKind::Selector);
            matrix!(@one $(#[$m])* $case, $limit, uring_proactor, Wk::Uring, LoopKind::Proactor);
            matrix!(@one $(#[$m])* $case, $limit, uring_selector, Wk::Uring, LoopKind::Selector);
            matrix!(@one $(#[$m])* $case, $limit, uring_nofd_proactor, Wk::UringNoFd, LoopKind::Proactor);
            matrix!(@one $(#[$m])* $case, $limit, uring_nofd_selector, Wk::UringNoFd, LoopKind::Selector);
        }
    };
    (@one $(#[$m:meta])* $case:ident, $limit:expr, $name:ident, $wk:expr, $kind:expr) => {
        #[test]
        $(#[$m])*
        fn $name() {
            let test = fault_util::reexec::test_name(module_path!(), stringify!($name));
            if pidns::enter(&test, $limit) {
                super::$case($wk, $kind);
            }
        }
    };
}

/// A watcher attached to a new loop of `kind` (every watcher accepts
/// `attach_loop`; Safe and Fast need it).
fn setup(wk: Wk, kind: LoopKind) -> Option<(childwatch::EventLoop, Arc<dyn ChildWatcher>)> {
    let w = wk.make()?;
    let lp = new_loop(kind)?;
    w.attach_loop(Some(&lp));
    // Warm up: whatever the watcher creates on first use (its own ring, a
    // helper thread) exists before a case fills the descriptor table, so
    // the cases test pid reuse, not first use (see `fd_exhaustion.rs`).
    lp.run_until_complete(async {
        let p = create_subprocess_exec("true", [] as [&str; 0])
            .watcher(Arc::clone(&w))
            .spawn()
            .expect("warm-up spawn");
        let rc = within(HANG, p.wait()).await.expect("warm-up wait hung");
        assert_eq!(rc.expect("warm-up wait"), 0);
    })
    .expect("loop ran");
    Some((lp, w))
}

/// Spawns with the descriptor table full when `full` (no pidfd can exist
/// for the child, neither in `Process` nor in the watcher).
fn spawn_maybe_full(
    w: &Arc<dyn ChildWatcher>,
    full: bool,
    program: &str,
    args: &[&str],
) -> Process {
    let fill = full.then(FdFill::new);
    let p = create_subprocess_exec(program, args)
        .watcher(Arc::clone(w))
        .spawn();
    drop(fill);
    p.unwrap_or_else(|e| panic!("spawn {program} {args:?} (table full: {full}): {e}"))
}

/// Fails if the stranger died (a signal meant for our exited child hit it).
/// Gives a wrongly sent signal time to land; a slow machine can only make
/// this pass wrongly, never fail wrongly.
fn assert_stranger_alive(s: &mut std::process::Child, what: &str) {
    let pid = s.id() as Pid;
    let died = fault_util::block_until(
        Duration::from_millis(300),
        || !matches!(proc_state(pid), Some(c) if c != 'Z'),
    );
    match s.try_wait() {
        Ok(None) if !died => {}
        Ok(None) => panic!("{what}: the stranger with the recycled pid {pid} is a zombie"),
        Ok(Some(st)) => panic!(
            "{what}: the unrelated `sleep 30` that reused pid {pid} died ({st}): a signal \
             for our exited child hit a recycled pid"
        ),
        Err(e) => panic!("{what}: the stranger with the recycled pid {pid} is gone ({e})"),
    }
    // SAFETY: kill(2) with signal 0 only checks.
    assert_eq!(
        unsafe { libc::kill(pid, 0) },
        0,
        "{what}: stranger {pid} gone"
    );
}

/// Failing input 1 (kind): `kill()` / `send_signal()` on a `Process` whose
/// child (`true`, no pipes) exited while the loop thread is busy for 200 ms
/// (a watcher thread may already have reaped it), then after an unrelated
/// `sleep 30` (std, not watched) took over the pid: each call is `Ok(())`
/// and the stranger keeps running; after the loop delivers, `wait()` is
/// `Ok(0)` and signals stay harmless.
fn signal_after_exit_common(wk: Wk, kind: LoopKind, full: bool) {
    let Some((lp, w)) = setup(wk, kind) else {
        return;
    };
    let mut strangers = Strangers::default();
    lp.run_until_complete(async {
        let old = spawn_maybe_full(&w, full, "true", &[]);
        let pid = old.pid();
        // The loop thread is busy from here until the `wait` below.
        fault_util::wait_exited(pid);
        std::thread::sleep(Duration::from_millis(200));
        old.kill().expect("kill() after exit, loop busy");
        old.send_signal(libc::SIGTERM)
            .expect("send_signal(SIGTERM) after exit, loop busy");
        if let Some(s) = pidns::stranger_with_pid(pid) {
            strangers.0.push(s);
            let s = strangers.0.last_mut().unwrap();
            old.kill()
                .expect("kill() after the pid was reused, loop busy");
            old.send_signal(libc::SIGTERM)
                .expect("send_signal(SIGTERM) after the pid was reused, loop busy");
            old.send_signal(0)
                .expect("send_signal(0) after the pid was reused, loop busy");
            assert_stranger_alive(s, "signals while the loop was busy");
        } else {
            println!("{wk:?}/{kind}: pid {pid} still taken while the loop is busy (unreaped)");
        }
        let rc = within(HANG, old.wait())
            .await
            .unwrap_or_else(|| panic!("old.wait() hung for {HANG:?}"));
        assert_eq!(rc.expect("old.wait()"), 0, "`true` exits 0");
        old.kill().expect("kill() after wait");
        if strangers.0.is_empty() {
            // The loop was idle in between: reuse now.
            let s = pidns::stranger_with_pid(pid)
                .unwrap_or_else(|| panic!("pid {pid} never came back after wait()"));
            strangers.0.push(s);
            old.kill().expect("kill() after wait and reuse");
            old.terminate().expect("terminate() after wait and reuse");
        }
        for s in &mut strangers.0 {
            assert_stranger_alive(s, "after wait()");
        }
        drop(old);
    })
    .expect("loop ran");
    drop(strangers);
    w.close();
    lp.close().expect("close loop");
    let z = zombie_children();
    assert!(z.is_empty(), "zombies left: {z:?}");
}

fn signal_after_exit(wk: Wk, kind: LoopKind) {
    signal_after_exit_common(wk, kind, false)
}

/// Failing input 1 exactly: as `signal_after_exit`, with the descriptor
/// table full when the child is spawned, so no pidfd exists for it.
fn signal_after_exit_no_pidfd(wk: Wk, kind: LoopKind) {
    signal_after_exit_common(wk, kind, true)
}

/// Failing input 1 through `Command::kill_on_drop(true)`: the `Process` of
/// an exited child (no pidfd: the table was full at spawn) is dropped while
/// the loop is busy and an unrelated `sleep 30` holds the recycled pid; the
/// drop's SIGKILL must not reach it.
fn kill_on_drop_after_exit_no_pidfd(wk: Wk, kind: LoopKind) {
    let Some((lp, w)) = setup(wk, kind) else {
        return;
    };
    let mut strangers = Strangers::default();
    lp.run_until_complete(async {
        let fill = FdFill::new();
        let old = create_subprocess_exec("true", [] as [&str; 0])
            .watcher(Arc::clone(&w))
            .kill_on_drop(true)
            .spawn();
        drop(fill);
        let old = old.expect("spawn true (table full)");
        let pid = old.pid();
        fault_util::wait_exited(pid);
        std::thread::sleep(Duration::from_millis(200));
        match pidns::stranger_with_pid(pid) {
            Some(s) => {
                strangers.0.push(s);
                drop(old);
                assert_stranger_alive(strangers.0.last_mut().unwrap(), "kill_on_drop");
            }
            None => {
                println!("{wk:?}/{kind}: pid {pid} still taken while the loop is busy");
                drop(old);
            }
        }
        let z = fault_util::zombies_after(Duration::from_secs(5)).await;
        assert!(z.is_empty(), "zombies left: {z:?}");
        for s in &mut strangers.0 {
            assert_stranger_alive(s, "kill_on_drop, after the loop ran");
        }
    })
    .expect("loop ran");
    drop(strangers);
    w.close();
    lp.close().expect("close loop");
}

/// asyncio's "remove the handler, then reap it yourself": after
/// `remove_child_handler` and a `waitpid` by hand, the pid is reused by an
/// unrelated `sleep 30`; `Process::kill()` must not reach it (the gate was
/// pinned with a pidfd when the watcher dropped the callback). Also checks
/// that `add_child_handler(pid)` by hand shares the `Process`'s gate: its
/// callback gets the exit code, and the `Process` sees the same.
fn remove_then_reap_by_hand(wk: Wk, kind: LoopKind) {
    let Some((lp, w)) = setup(wk, kind) else {
        return;
    };
    let mut strangers = Strangers::default();
    lp.run_until_complete(async {
        let p = create_subprocess_exec("sh", ["-c", "sleep 0.1; exit 3"])
            .watcher(Arc::clone(&w))
            .spawn()
            .expect("spawn");
        let pid = p.pid();
        assert!(w.remove_child_handler(pid));
        fault_util::wait_exited(pid);
        // SAFETY: our own child, reaped by hand as the caller took it over.
        // (Threaded's waiter cannot be cancelled and may reap it first,
        // through the gate: then this is ECHILD.)
        let r = unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        assert!(r == pid || (r == -1 && wk == Wk::Threaded), "waitpid: {r}");
        match pidns::stranger_with_pid(pid) {
            Some(s) => {
                strangers.0.push(s);
                p.kill().expect("kill after a reap by hand is a no-op");
                assert_stranger_alive(strangers.0.last_mut().unwrap(), "remove + reap by hand");
            }
            None => println!("{wk:?}/{kind}: pid {pid} not reused in time"),
        }
        drop(p);
        // The same pid through add_child_handler shares the Process's gate.
        let q = create_subprocess_exec("sh", ["-c", "sleep 0.1; exit 4"])
            .watcher(Arc::clone(&w))
            .spawn()
            .expect("spawn");
        let (tx, rx) = std::sync::mpsc::channel();
        w.add_child_handler(q.pid(), Box::new(move |_, rc| tx.send(rc).unwrap()))
            .unwrap();
        // The same pid on the same watcher replaces the Process's callback
        // (asyncio's rule); the status still reaches the gate both share.
        let mut got = None;
        for _ in 0..3000 {
            if let Ok(rc) = rx.try_recv() {
                got = Some(rc);
                break;
            }
            sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(got, Some(4));
        assert_eq!(
            q.returncode(),
            Some(4),
            "the Process sees its gate's status"
        );
        let z = fault_util::zombies_after(Duration::from_secs(5)).await;
        assert!(z.is_empty(), "zombies left: {z:?}");
    })
    .expect("loop ran");
    drop(strangers);
    w.close();
    lp.close().expect("close loop");
}

matrix!(remove_then_reap_by_hand, NS_LIMIT);
matrix!(signal_after_exit, NS_LIMIT);
matrix!(kill_on_drop_after_exit_no_pidfd, NS_LIMIT);
matrix!(signal_after_exit_no_pidfd, NS_LIMIT);

/// Failing input 2 (kind): child A exits 7; while the loop is busy (before
/// the watcher's report of A is processed) a new watched `sleep 30` B is
/// spawned until one gets A's pid. A's `wait()` must be `Ok(7)`, B must keep
/// running with no status, `B.kill()` then gives `Ok(-9)`, and no zombie
/// is left.
fn recycled_pid_common(wk: Wk, kind: LoopKind, full: bool) {
    let Some((lp, w)) = setup(wk, kind) else {
        return;
    };
    lp.run_until_complete(async {
        let a = spawn_maybe_full(&w, full, "sh", &["-c", "exit 7"]);
        let pid = a.pid();
        // Loop thread busy from here.
        fault_util::wait_exited(pid);
        std::thread::sleep(Duration::from_millis(200));
        let mut others: Vec<Process> = Vec::new();
        let mut b: Option<Process> = None;
        for _ in 0..8 {
            if fault_util::pid_exists(pid) {
                break; // A is unreaped: its pid cannot be reused yet
            }
            pidns::aim_next_pid(pid);
            let p = spawn_maybe_full(&w, full, "sleep", &["30"]);
            if p.pid() == pid {
                b = Some(p);
                break;
            }
            others.push(p);
        }
        if b.is_none() {
            println!("{wk:?}/{kind}: pid {pid} was not reused while the loop was busy");
        }
        let rc = within(HANG, a.wait())
            .await
            .unwrap_or_else(|| panic!("A.wait() hung for {HANG:?}"));
        assert_eq!(
            rc.as_ref().ok(),
            Some(&7),
            "A (pid {pid}, exit 7) must get its own status, got {rc:?} (B reused the pid: {})",
            b.is_some()
        );
        // Let any wrong delivery to B show up.
        sleep(Duration::from_millis(100)).await;
        for p in b.iter().chain(&others) {
            assert_eq!(
                p.returncode(),
                None,
                "pid {} (`sleep 30`, running) was given a status",
                p.pid()
            );
            assert!(
                matches!(proc_state(p.pid()), Some(c) if c != 'Z'),
                "pid {} (`sleep 30`) is not running",
                p.pid()
            );
        }
        for p in b.iter().chain(&others) {
            p.kill().expect("kill B");
            let rc = within(HANG, p.wait())
                .await
                .unwrap_or_else(|| panic!("B (pid {}).wait() hung for {HANG:?}", p.pid()));
            assert_eq!(rc.ok(), Some(-9), "B (pid {}) killed with SIGKILL", p.pid());
        }
        let z = fault_util::zombies_after(Duration::from_secs(5)).await;
        assert!(z.is_empty(), "zombies left: {z:?}");
    })
    .expect("loop ran");
    w.close();
    lp.close().expect("close loop");
}

fn recycled_pid_own_status(wk: Wk, kind: LoopKind) {
    recycled_pid_common(wk, kind, false)
}

/// As `recycled_pid_own_status`, with the descriptor table full at each
/// spawn (no pidfd for A or B anywhere).
fn recycled_pid_own_status_no_pidfd(wk: Wk, kind: LoopKind) {
    recycled_pid_common(wk, kind, true)
}

matrix!(recycled_pid_own_status, NS_LIMIT);
matrix!(recycled_pid_own_status_no_pidfd, NS_LIMIT);

/// The stress of failing input 2: `CHILDWATCH_STRESS_N` (default 20,000)
/// children with random exit codes and signals (some raised by the child,
/// some sent through `Process::send_signal` while it runs), 32 in flight,
/// pids recycling: every status exact, exactly once, no zombie.
fn stress_common(wk: Wk, kind: LoopKind, nofile: Option<libc::rlim_t>) {
    let old_limit = nofile.map(fault_util::set_nofile);
    let Some((lp, w)) = setup(wk, kind) else {
        return;
    };
    let n: usize = std::env::var("CHILDWATCH_STRESS_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    let next = Rc::new(Cell::new(0usize));
    let done = Rc::new(Cell::new(0usize));
    let wrong: Rc<RefCell<Vec<String>>> = Rc::default();
    let zombies = lp.run_until_complete(async {
        let workers: Vec<_> = (0..32)
            .map(|_| {
                let (next, done, wrong, w) = (next.clone(), done.clone(), wrong.clone(), w.clone());
                childwatch::get_running_loop()
                    .unwrap()
                    .create_task(async move {
                        loop {
                            let i = next.get();
                            if i >= n {
                                break;
                            }
                            next.set(i + 1);
                            let mut rng = Rng::new(0x9_0000 + i as u64);
                            let rc = rng.returncode();
                            let sent = rc < 0 && rng.next() % 2 == 0;
                            let script = if sent {
                                "exec sleep 30".to_string()
                            } else {
                                script_for(rc)
                            };
                            let p = match create_subprocess_shell(&script)
                                .watcher(Arc::clone(&w))
                                .spawn()
                            {
                                Ok(p) => p,
                                Err(e) => {
                                    wrong.borrow_mut().push(format!("#{i}: spawn: {e}"));
                                    done.set(done.get() + 1);
                                    continue;
                                }
                            };
                            if sent {
                                if let Err(e) = p.send_signal(-rc) {
                                    wrong.borrow_mut().push(format!("#{i}: send_signal: {e}"));
                                }
                            }
                            match within(HANG, p.wait()).await {
                                Some(Ok(got)) if got == rc => {}
                                other => wrong.borrow_mut().push(format!(
                                    "#{i} (pid {}): expected {rc}, got {other:?}",
                                    p.pid()
                                )),
                            }
                            done.set(done.get() + 1);
                        }
                    })
            })
            .collect();
        for t in workers {
            t.await;
        }
        fault_util::zombies_after(Duration::from_secs(5)).await
    });
    let zombies = zombies.expect("loop ran");
    w.close();
    lp.close().expect("close loop");
    if let Some(old) = old_limit {
        // SAFETY: setrlimit with a valid pointer.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &old) };
    }
    let wrong = wrong.borrow();
    assert_eq!(done.get(), n, "children finished");
    assert!(
        wrong.is_empty(),
        "{} of {n} statuses wrong or lost, e.g.:\n{}",
        wrong.len(),
        wrong
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        zombies.is_empty(),
        "every status exact, but zombies left: {zombies:?}"
    );
    println!("{wk:?}/{kind}: {n} children, every status exact");
}

fn stress(wk: Wk, kind: LoopKind) {
    stress_common(wk, kind, None)
}

matrix!(
    #[ignore = "20,000 children per run; run before resolving issue 9"]
    stress,
    STRESS_LIMIT
);

/// The stress of failing input 2 as reported: default Uring with
/// `ulimit -n 48` (its descriptor budget is then 24, so most children are
/// waited for by WAITID / the sentinel).
mod stress_nofile_48 {
    use super::*;

    fn run(kind: LoopKind, name: &str) {
        let test = fault_util::reexec::test_name(module_path!(), name);
        if pidns::enter(&test, STRESS_LIMIT) {
            stress_common(Wk::Uring, kind, Some(48));
        }
    }

    #[test]
    #[ignore = "20,000 children; run before resolving issue 9"]
    fn uring_selector() {
        run(LoopKind::Selector, "uring_selector")
    }

    #[test]
    #[ignore = "20,000 children; run before resolving issue 9"]
    fn uring_proactor() {
        run(LoopKind::Proactor, "uring_proactor")
    }
}
