//! Closing or dropping a loop releases everything tied to it: parked tasks
//! (their futures are dropped, so their destructors run), timers, IO
//! registrations and descriptors. Checked from the outside, the way a user
//! would notice a leak: descriptors in `/proc/self/fd`, threads in
//! `/proc/self/task`, resident memory in `/proc/self/status`, counters bumped
//! by destructors, and a `kill_on_drop` child that must be gone.
//!
//! Each test runs in its own process image state only as far as the test
//! harness allows: the tests share one process, so they run one at a time
//! (`SERIAL`) and compare counts before and after their own churn.

#![cfg(target_os = "linux")]

use std::cell::Cell;
use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use childwatch::{
    ChildWatcher, Command, EventLoop, FastChildWatcher, LoopKind, MultiLoopChildWatcher,
    PidfdChildWatcher, SafeChildWatcher, ThreadedChildWatcher, UringChildWatcher, get_running_loop,
    sleep,
};

/// The counts below are process-wide: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0)
}

fn rss_kib() -> usize {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn kinds() -> Vec<LoopKind> {
    let mut v = vec![LoopKind::Selector];
    if EventLoop::proactor().is_ok() {
        v.push(LoopKind::Proactor);
    }
    v
}

/// Counts how many of its values were dropped.
struct DropCount(Rc<Cell<usize>>);
impl Drop for DropCount {
    fn drop(&mut self) {
        self.0.set(self.0.get() + 1);
    }
}

/// Whether `pid` still exists (a zombie counts as gone: it was killed and
/// only waits to be reaped).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// Whether `pid` is gone (or a zombie) before `patience` runs out.
fn gone_within(pid: i32, patience: Duration) -> bool {
    let deadline = std::time::Instant::now() + patience;
    while alive(pid) {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    true
}

/// Whether our child `pid` is reaped: no such process, or (its pid reused)
/// not our child any more. A zombie of ours is not reaped.
fn reaped(pid: i32) -> bool {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    let Some((_, rest)) = s.rsplit_once(')') else {
        return true;
    };
    let ppid = rest.split_whitespace().nth(1);
    ppid != Some(std::process::id().to_string().as_str())
}

/// Whether every pid in `pids` is reaped before `patience` runs out; the
/// ones that are not.
fn unreaped_after(pids: &[i32], patience: Duration) -> Vec<i32> {
    let deadline = std::time::Instant::now() + patience;
    loop {
        let left: Vec<i32> = pids.iter().copied().filter(|&p| !reaped(p)).collect();
        if left.is_empty() || std::time::Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Runs the loop until `fut` completes, then lets it run briefly more so
/// tasks created on it park.
fn run_briefly<F: Future>(lp: &EventLoop, fut: F) -> F::Output {
    let out = lp.run_until_complete(fut).expect("run");
    lp.run_until_complete(sleep(Duration::from_millis(1)))
        .expect("run");
    out
}

enum End {
    Close,
    Drop,
}

/// One loop with parked tasks and a pending timer, ended by `end`; with
/// `hold_clone`, a task and the timer hold a clone of the owning handle
/// (before issue 10 that was a reference cycle). Returns the number of
/// parked futures and callbacks dropped by then.
fn one_parked_loop(kind: LoopKind, end: &End, hold_clone: bool) -> usize {
    let dropped = Rc::new(Cell::new(0));
    let lp = EventLoop::new(kind).expect("loop");
    let token = DropCount(Rc::clone(&dropped));
    let held = if hold_clone { Some(lp.clone()) } else { None };
    lp.create_task(async move {
        let _keep = (token, held);
        sleep(Duration::from_secs(3600)).await;
    })
    .detach();
    // A second task that takes its loop the asyncio way.
    let token = DropCount(Rc::clone(&dropped));
    lp.create_task(async move {
        let _keep = (token, get_running_loop());
        sleep(Duration::from_secs(3600)).await;
    })
    .detach();
    // A pending timer whose callback holds a handle to its loop: a clone of
    // the owner, or the explicitly non-owning kind.
    let l2 = if hold_clone {
        lp.clone()
    } else {
        lp.non_owning()
    };
    let token = DropCount(Rc::clone(&dropped));
    lp.call_later(Duration::from_secs(3600), move || {
        let _ = (&l2, &token);
    });
    run_briefly(&lp, async {});
    match end {
        End::Close => lp.close().expect("close"),
        End::Drop => drop(lp),
    }
    dropped.get()
}

fn churn_parked(kind: LoopKind, end: End, hold_clone: bool) {
    // Warm up: first use creates lazily-built process-wide state.
    for _ in 0..20 {
        one_parked_loop(kind, &end, hold_clone);
    }
    let (fds, threads, rss) = (fd_count(), thread_count(), rss_kib());
    let mut dropped = 0;
    const N: usize = 1000;
    for _ in 0..N {
        dropped += one_parked_loop(kind, &end, hold_clone);
    }
    let (fds2, threads2, rss2) = (fd_count(), thread_count(), rss_kib());
    eprintln!(
        "{kind} {}: fds {fds} -> {fds2}, threads {threads} -> {threads2}, \
         rss {rss} -> {rss2} KiB, dropped {dropped}/{}",
        match end {
            End::Close => "close",
            End::Drop => "drop",
        },
        3 * N
    );
    assert_eq!(dropped, 3 * N, "every parked future and timer is dropped");
    assert!(fds2 <= fds, "descriptors leaked: {fds} -> {fds2}");
    assert!(
        threads2 <= threads,
        "threads leaked: {threads} -> {threads2}"
    );
    // 1,000 leaked loops cost tens of MB; allow allocator noise only.
    assert!(rss2 < rss + 4096, "memory grew: {rss} -> {rss2} KiB");
}

#[test]
fn close_releases_parked_tasks_timers_and_descriptors() {
    let _s = serial();
    for kind in kinds() {
        churn_parked(kind, End::Close, true);
    }
}

#[test]
fn dropping_a_loop_releases_parked_tasks_timers_and_descriptors() {
    let _s = serial();
    for kind in kinds() {
        churn_parked(kind, End::Drop, false);
    }
}

/// Issue 10: a task holding a clone of its own loop used to be a reference
/// cycle, so dropping the loop without `close()` leaked it. A clone does not
/// keep the loop open: dropping the owner releases all of it.
#[test]
fn dropping_a_loop_whose_tasks_hold_clones_of_it_releases_everything() {
    let _s = serial();
    for kind in kinds() {
        churn_parked(kind, End::Drop, true);
    }
}

#[test]
fn a_clone_used_after_its_owner_is_dropped_errors_clearly() {
    let _s = serial();
    for kind in kinds() {
        let lp = EventLoop::new(kind).expect("loop");
        let copy = lp.clone();
        assert!(lp.is_owning() && !copy.is_owning());
        let dropped = Rc::new(Cell::new(0));
        let token = DropCount(Rc::clone(&dropped));
        let inner = copy.clone();
        copy.create_task(async move {
            let _keep = (token, inner);
            sleep(Duration::from_secs(3600)).await;
        })
        .detach();
        run_briefly(&copy, async {});
        drop(lp);
        assert_eq!(
            dropped.get(),
            1,
            "the parked task was dropped with the owner"
        );
        assert!(copy.is_closed());
        let err = copy
            .run_until_complete(async {})
            .expect_err("running a closed loop");
        let msg = err.to_string();
        assert!(
            msg.contains("owning handle") && msg.contains("set_event_loop"),
            "the error says what to do: {msg}"
        );
        let err = copy.run_forever().expect_err("running a closed loop");
        assert!(err.to_string().contains("owning handle"), "{err}");
        assert!(copy.share_ownership().is_err());
        // Scheduling does nothing and keeps nothing, without a panic.
        let token = DropCount(Rc::clone(&dropped));
        let h = copy.call_soon(move || drop(token));
        assert!(h.cancelled());
        assert_eq!(dropped.get(), 2, "the refused callback is dropped at once");
        let token = DropCount(Rc::clone(&dropped));
        let t = copy.create_task(async move { drop(token) });
        assert!(t.is_finished());
        assert_eq!(dropped.get(), 3, "the refused task is dropped at once");
        assert!(copy.handle().call_soon_threadsafe(|| {}).is_err());
        copy.close().expect("closing a closed loop is fine");
    }
}

#[test]
fn shared_ownership_keeps_the_loop_open_until_the_last_owner_goes() {
    let _s = serial();
    for kind in kinds() {
        let lp = EventLoop::new(kind).expect("loop");
        let owner = lp.clone().share_ownership().expect("open loop");
        drop(lp);
        assert!(!owner.is_closed());
        assert_eq!(owner.run_until_complete(async { 7 }).expect("run"), 7);
        let copy = owner.clone();
        drop(owner);
        assert!(copy.is_closed());
    }
}

#[test]
fn the_policy_owns_the_loop_set_for_its_thread() {
    let _s = serial();
    for kind in kinds() {
        let lp = EventLoop::new(kind).expect("loop");
        childwatch::set_event_loop(Some(lp.clone()));
        drop(lp);
        let got = childwatch::get_event_loop().expect("this thread's loop");
        assert_eq!(got.kind(), kind);
        assert!(!got.is_closed(), "the policy keeps the loop open");
        assert!(!got.is_owning(), "get_event_loop hands out a clone");
        let dropped = Rc::new(Cell::new(0));
        let token = DropCount(Rc::clone(&dropped));
        let inner = got.clone();
        got.create_task(async move {
            let _keep = (token, inner);
            sleep(Duration::from_secs(3600)).await;
        })
        .detach();
        assert_eq!(
            got.run_until_complete(async {
                sleep(Duration::from_millis(1)).await;
                5
            })
            .expect("run"),
            5
        );
        drop(got);
        let again = childwatch::get_event_loop().expect("still set");
        assert!(!again.is_closed());
        // Clearing the slot drops the last owner: the loop closes and its
        // parked task is dropped.
        childwatch::set_event_loop(None);
        assert!(again.is_closed());
        assert_eq!(dropped.get(), 1);
        assert!(childwatch::get_event_loop().is_err(), "None was set");
    }
    // A loop the policy created on first use is owned by the policy too.
    let policy = childwatch::SelectorEventLoopPolicy::new();
    let first = childwatch::EventLoopPolicy::get_event_loop(&policy).expect("created");
    assert!(!first.is_owning() && !first.is_closed());
    assert_eq!(first.run_until_complete(async { 1 }).expect("run"), 1);
    childwatch::EventLoopPolicy::set_event_loop(&policy, None);
    assert!(first.is_closed());
}

// ---------------------------------------------------------------- with children

/// Zombies among our children (killed, not yet reaped).
fn zombie_children() -> usize {
    let me = std::process::id().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|s| {
            let Some((_, rest)) = s.rsplit_once(')') else {
                return false;
            };
            let mut f = rest.split_whitespace();
            f.next() == Some("Z") && f.next() == Some(me.as_str())
        })
        .count()
}

/// What the task parked on a child holds of its loop besides the `Process`.
#[derive(Clone, Copy)]
enum Holds {
    /// `get_running_loop()`, taken inside the loop.
    RunningLoop,
    /// A clone of the owning handle, taken outside (issue 10: this was a
    /// reference cycle when clones owned the loop).
    OwnerClone,
}

/// One loop that spawns a `kill_on_drop` child whose `wait` is parked in a
/// task (holding a clone of the loop, see [`Holds`]) and whose stdout is a
/// pipe, then is closed or dropped. Returns the child's pid.
fn one_loop_with_child(
    kind: LoopKind,
    end: &End,
    watcher: Option<&Arc<dyn ChildWatcher>>,
    holds: Holds,
) -> i32 {
    let lp = EventLoop::new(kind).expect("loop");
    let outer = lp.clone();
    let pid = lp
        .run_until_complete(async {
            let mut cmd = Command::new("sleep");
            cmd.arg("3600")
                .kill_on_drop(true)
                .stdout(childwatch::Stdio::piped());
            if let Some(w) = watcher {
                cmd.watcher(Arc::clone(w));
            }
            let p = cmd.spawn().expect("spawn sleep");
            let pid = p.pid();
            let me = get_running_loop().expect("running");
            let held = match holds {
                Holds::RunningLoop => me_clone(&p),
                Holds::OwnerClone => Some(outer),
            };
            me.create_task(async move {
                let _keep = held;
                let _ = p.wait().await;
            })
            .detach();
            pid
        })
        .expect("run");
    lp.run_until_complete(sleep(Duration::from_millis(1)))
        .expect("run");
    assert!(alive(pid), "the child runs while its loop is open");
    match end {
        End::Close => lp.close().expect("close"),
        End::Drop => drop(lp),
    }
    pid
}

/// What a parked task typically also holds besides its `Process`.
fn me_clone(_p: &childwatch::Process) -> Option<EventLoop> {
    get_running_loop()
}

fn churn_children(
    kind: LoopKind,
    end: End,
    (name, watcher): (&str, Option<Arc<dyn ChildWatcher>>),
    n: usize,
    holds: Holds,
) {
    for _ in 0..5 {
        one_loop_with_child(kind, &end, watcher.as_ref(), holds);
    }
    let (fds, threads, rss) = (fd_count(), thread_count(), rss_kib());
    // Zombies left by other tests (Safe and Fast do not reap after close).
    let zombies = zombie_children();
    let mut pids = Vec::with_capacity(n);
    for _ in 0..n {
        pids.push(one_loop_with_child(kind, &end, watcher.as_ref(), holds));
        // Killed by the loop's end: the future that owned the Process was
        // dropped, and `kill_on_drop` acted at once.
        // SIGKILL is delivered asynchronously: give the kernel a moment (a
        // hang guard, not a timing assertion).
        let pid = *pids.last().unwrap_or(&0);
        assert!(
            gone_within(pid, Duration::from_secs(10)),
            "kill_on_drop child {pid} still running after its loop ended"
        );
    }
    // The watcher reaps the killed children on its own schedule (a helper
    // thread, a SIGCHLD): let it catch up before counting what it holds per
    // child. A hang guard, not a timing assertion.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while zombie_children() > zombies && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    // Every child got its status: none is left running or a zombie.
    let left = unreaped_after(&pids, Duration::from_secs(20));
    assert!(
        left.is_empty(),
        "{kind} {name}: {} of {n} children not reaped after their loop ended: {:?}",
        left.len(),
        &left[..left.len().min(10)]
    );
    let (fds2, threads2, rss2) = (fd_count(), thread_count(), rss_kib());
    eprintln!(
        "{kind} {name} {}: fds {fds} -> {fds2}, threads {threads} -> {threads2}, \
         rss {rss} -> {rss2} KiB, zombies {}",
        match end {
            End::Close => "close",
            End::Drop => "drop",
        },
        zombie_children()
    );
    assert!(fds2 <= fds + 2, "descriptors leaked: {fds} -> {fds2}");
    assert!(
        threads2 <= threads + 2,
        "threads leaked: {threads} -> {threads2}"
    );
    assert!(rss2 < rss + 4096, "memory grew: {rss} -> {rss2} KiB");
}

#[test]
fn close_kills_kill_on_drop_children_and_leaks_nothing_default_watcher() {
    let _s = serial();
    for kind in kinds() {
        churn_children(
            kind,
            End::Close,
            ("default", None),
            1000,
            Holds::RunningLoop,
        );
    }
}

#[test]
fn dropping_a_loop_kills_kill_on_drop_children_and_leaks_nothing_default_watcher() {
    let _s = serial();
    for kind in kinds() {
        churn_children(kind, End::Drop, ("default", None), 1000, Holds::RunningLoop);
    }
}

fn loop_free_watchers() -> Vec<(&'static str, Arc<dyn ChildWatcher>)> {
    let mut v: Vec<(&'static str, Arc<dyn ChildWatcher>)> = vec![
        (
            "threaded",
            Arc::new(ThreadedChildWatcher::new().expect("threaded")),
        ),
        (
            "multiloop",
            Arc::new(MultiLoopChildWatcher::new().expect("multiloop")),
        ),
    ];
    if PidfdChildWatcher::is_supported() {
        v.push(("pidfd", Arc::new(PidfdChildWatcher::new().expect("pidfd"))));
    }
    if UringChildWatcher::is_supported() {
        v.push(("uring", Arc::new(UringChildWatcher::new().expect("uring"))));
    }
    v
}

/// Issue 10 with children: the task parked on a `kill_on_drop` child holds
/// a clone of its loop's owning handle, and the loop is dropped without
/// `close()`. The task is dropped, so the child is killed and reaped.
#[test]
fn dropping_a_loop_whose_task_holds_a_clone_kills_and_reaps_its_child_default_watcher() {
    let _s = serial();
    for kind in kinds() {
        churn_children(kind, End::Drop, ("default", None), 200, Holds::OwnerClone);
    }
}

#[test]
fn dropping_a_loop_whose_task_holds_a_clone_kills_and_reaps_its_child_every_loop_free_watcher() {
    let _s = serial();
    for (name, w) in loop_free_watchers() {
        for kind in kinds() {
            churn_children(
                kind,
                End::Drop,
                (name, Some(Arc::clone(&w))),
                200,
                Holds::OwnerClone,
            );
        }
        w.close();
    }
}

#[test]
fn close_and_drop_release_everything_with_every_loop_free_watcher() {
    let _s = serial();
    for (name, w) in loop_free_watchers() {
        for kind in kinds() {
            churn_children(
                kind,
                End::Close,
                (name, Some(Arc::clone(&w))),
                200,
                Holds::RunningLoop,
            );
            churn_children(
                kind,
                End::Drop,
                (name, Some(Arc::clone(&w))),
                200,
                Holds::RunningLoop,
            );
        }
        w.close();
    }
}

/// Safe and Fast work through the loop they are attached to: attach each
/// new loop before its spawn.
fn churn_attached(kind: LoopKind, end: End, w: &Arc<dyn ChildWatcher>, n: usize, holds: Holds) {
    let one = |end: &End| {
        let lp = EventLoop::new(kind).expect("loop");
        w.attach_loop(Some(&lp));
        let outer = lp.clone();
        let pid = lp
            .run_until_complete(async {
                let p = Command::new("sleep")
                    .arg("3600")
                    .kill_on_drop(true)
                    .watcher(Arc::clone(w))
                    .spawn()
                    .expect("spawn sleep");
                let pid = p.pid();
                let held = match holds {
                    Holds::RunningLoop => None,
                    Holds::OwnerClone => Some(outer),
                };
                get_running_loop()
                    .expect("running")
                    .create_task(async move {
                        let _keep = held;
                        let _ = p.wait().await;
                    })
                    .detach();
                pid
            })
            .expect("run");
        match end {
            End::Close => lp.close().expect("close"),
            End::Drop => drop(lp),
        }
        assert!(
            gone_within(pid, Duration::from_secs(10)),
            "child {pid} survived"
        );
    };
    for _ in 0..5 {
        one(&end);
    }
    let (fds, threads, rss) = (fd_count(), thread_count(), rss_kib());
    for _ in 0..n {
        one(&end);
    }
    let (fds2, threads2, rss2) = (fd_count(), thread_count(), rss_kib());
    eprintln!(
        "{kind} attached: fds {fds} -> {fds2}, threads {threads} -> {threads2}, \
         rss {rss} -> {rss2} KiB, zombies {}",
        zombie_children()
    );
    assert!(fds2 <= fds + 2, "descriptors leaked: {fds} -> {fds2}");
    assert!(
        threads2 <= threads + 2,
        "threads leaked: {threads} -> {threads2}"
    );
    assert!(rss2 < rss + 4096, "memory grew: {rss} -> {rss2} KiB");
}

#[test]
fn closing_loops_with_the_safe_and_fast_watchers_attached_leaks_nothing() {
    let _s = serial();
    for kind in kinds() {
        let safe: Arc<dyn ChildWatcher> = Arc::new(SafeChildWatcher::new().expect("safe"));
        churn_attached(kind, End::Close, &safe, 200, Holds::RunningLoop);
        safe.close();
        let fast: Arc<dyn ChildWatcher> = Arc::new(FastChildWatcher::new().expect("fast"));
        churn_attached(kind, End::Close, &fast, 200, Holds::RunningLoop);
        fast.close();
    }
}

#[test]
fn dropping_loops_with_the_safe_and_fast_watchers_attached_leaks_nothing() {
    let _s = serial();
    for kind in kinds() {
        let safe: Arc<dyn ChildWatcher> = Arc::new(SafeChildWatcher::new().expect("safe"));
        churn_attached(kind, End::Drop, &safe, 200, Holds::RunningLoop);
        safe.close();
        let fast: Arc<dyn ChildWatcher> = Arc::new(FastChildWatcher::new().expect("fast"));
        churn_attached(kind, End::Drop, &fast, 200, Holds::RunningLoop);
        fast.close();
    }
}

#[test]
fn dropping_loops_whose_tasks_hold_clones_with_the_safe_and_fast_watchers_attached() {
    let _s = serial();
    for kind in kinds() {
        let safe: Arc<dyn ChildWatcher> = Arc::new(SafeChildWatcher::new().expect("safe"));
        churn_attached(kind, End::Drop, &safe, 200, Holds::OwnerClone);
        safe.close();
        let fast: Arc<dyn ChildWatcher> = Arc::new(FastChildWatcher::new().expect("fast"));
        churn_attached(kind, End::Drop, &fast, 200, Holds::OwnerClone);
        fast.close();
    }
}

/// A loop the policy owns for a thread is released when the thread exits,
/// with its parked tasks; a destructor that then asks the policy for the
/// thread's loop gets an error, not a panic (which would abort there).
#[test]
fn a_policy_owned_loop_is_released_at_thread_exit() {
    let _s = serial();
    struct AsksForTheLoop(Arc<Mutex<Option<bool>>>);
    impl Drop for AsksForTheLoop {
        fn drop(&mut self) {
            let got = childwatch::get_event_loop();
            *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(got.is_err());
        }
    }
    let (fds, threads) = (fd_count(), thread_count());
    let mut tids = Vec::new();
    for _ in 0..50 {
        let seen = Arc::new(Mutex::new(None));
        let seen2 = Arc::clone(&seen);
        let tid = std::thread::spawn(move || {
            let lp = childwatch::get_event_loop().expect("created on first use");
            let inner = lp.clone();
            let guard = AsksForTheLoop(seen2);
            lp.create_task(async move {
                let _keep = (guard, inner);
                sleep(Duration::from_secs(3600)).await;
            })
            .detach();
            run_briefly(&lp, async {});
            // Neither closed nor cleared: the thread's end releases it.
            // SAFETY: gettid has no preconditions.
            unsafe { libc::gettid() }
        })
        .join()
        .expect("the thread ends cleanly");
        tids.push(tid);
        let seen = *seen.lock().unwrap_or_else(|p| p.into_inner());
        assert_eq!(seen, Some(true), "the task was dropped at thread exit");
    }
    // Each thread is gone for good (its tid leaves /proc/self/task shortly
    // after join): nothing of its loop kept it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let task_left = |t: &i32| std::path::Path::new(&format!("/proc/self/task/{t}")).exists();
    while tids.iter().any(task_left) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let left: Vec<i32> = tids.iter().copied().filter(task_left).collect();
    assert!(left.is_empty(), "threads still there: {left:?}");
    let (fds2, threads2) = (fd_count(), thread_count());
    assert!(fds2 <= fds + 2, "descriptors leaked: {fds} -> {fds2}");
    // The test harness may start another test thread meanwhile.
    assert!(
        threads2 <= threads + 2,
        "threads leaked: {threads} -> {threads2}"
    );
}

// ---------------------------------------------------------------- descriptors at close

/// Waits (a hang guard, not a timing assertion) until the process holds no
/// more than `fds` descriptors; the count then.
fn settle_fds(fds: usize) -> usize {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while fd_count() > fds && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    fd_count()
}

/// A loop that did some work: a task parked on a timer, a callback run, a
/// wake-up from another thread (so the backend watches its eventfd).
fn busy_loop(kind: LoopKind) -> EventLoop {
    let lp = EventLoop::new(kind).expect("loop");
    lp.create_task(sleep(Duration::from_secs(3600))).detach();
    lp.call_soon(|| {});
    let h = lp.handle();
    run_briefly(&lp, async move {
        std::thread::spawn(move || h.call_soon_threadsafe(|| {}).expect("open loop"))
            .join()
            .expect("thread");
    });
    lp
}

/// What every handle to a closed loop does: errors or nothing, no panic.
fn use_after_close(copy: &EventLoop, handle: &childwatch::LoopHandle) {
    assert!(copy.is_closed() && handle.is_closed());
    let err = copy
        .run_until_complete(async {})
        .expect_err("running a closed loop");
    assert!(err.to_string().contains("closed"), "{err}");
    assert!(copy.run_forever().is_err());
    assert!(copy.call_soon(|| {}).cancelled());
    assert!(copy.call_later(Duration::from_millis(1), || {}).cancelled());
    assert!(copy.create_task(async {}).is_finished());
    assert!(copy.add_signal_handler(libc::SIGUSR2, || {}).is_err());
    assert!(copy.share_ownership().is_err());
    let err = handle
        .call_soon_threadsafe(|| {})
        .expect_err("scheduling on a closed loop");
    assert!(err.to_string().contains("closed"), "{err}");
    // From another thread too, where a wake-up would write the eventfd.
    let h = handle.clone();
    std::thread::spawn(move || {
        assert!(h.call_soon_threadsafe(|| {}).is_err());
        h.stop();
    })
    .join()
    .expect("no panic on another thread");
    handle.stop();
    copy.stop();
    copy.close().expect("closing a closed loop is fine");
}

/// Issue 10: closing (or dropping) the owner frees the loop's own
/// descriptors — the io_uring or epoll instance and the wake-up eventfd —
/// at once, while a clone and a `LoopHandle` of it are still alive (before,
/// they were freed with the last handle of any kind).
#[test]
fn close_frees_the_loops_descriptors_while_a_clone_and_a_loop_handle_live() {
    let _s = serial();
    for kind in kinds() {
        for end in [End::Close, End::Drop] {
            drop(busy_loop(kind)); // warm-up: lazily-built process-wide state
            let fds = fd_count();
            let lp = busy_loop(kind);
            assert!(fd_count() > fds, "{kind}: the loop holds descriptors");
            let (copy, handle) = (lp.clone(), lp.handle());
            let seen = copy.clone();
            match end {
                End::Close => lp.close().expect("close"),
                End::Drop => drop(lp),
            }
            let after = settle_fds(fds);
            assert_eq!(
                after, fds,
                "{kind}: the closed loop's descriptors are freed while handles live"
            );
            use_after_close(&copy, &handle);
            assert_eq!(fd_count(), fds, "{kind}: using the handles opened nothing");
            drop((copy, handle, seen));
            assert_eq!(fd_count(), fds);
        }
    }
}

/// 1,000 loops closed (or dropped) while a clone and a `LoopHandle` of each
/// are kept: descriptors stay flat (before issue 10's fix, each kept 2–4).
#[test]
fn a_thousand_closed_loops_whose_handles_are_kept_hold_no_descriptor() {
    let _s = serial();
    for kind in kinds() {
        for end in [End::Close, End::Drop] {
            drop(busy_loop(kind));
            let fds = fd_count();
            let mut kept = Vec::with_capacity(1000);
            for _ in 0..1000 {
                let lp = EventLoop::new(kind).expect("loop");
                lp.run_until_complete(sleep(Duration::from_micros(100)))
                    .expect("run");
                kept.push((lp.clone(), lp.handle()));
                match end {
                    End::Close => lp.close().expect("close"),
                    End::Drop => drop(lp),
                }
            }
            let after = settle_fds(fds);
            eprintln!("{kind}: 1000 closed loops with handles kept: fds {fds} -> {after}");
            assert!(after <= fds, "{kind}: descriptors leaked: {fds} -> {after}");
            for (copy, handle) in &kept {
                assert!(copy.run_until_complete(async {}).is_err());
                assert!(handle.call_soon_threadsafe(|| {}).is_err());
            }
            drop(kept);
            assert!(fd_count() <= fds);
        }
    }
}

/// A `UringChildWatcher` watching children through a proactor loop (their
/// pidfds polled on the loop's ring, or the loop's sentinel `WAITID`) when
/// that loop is closed while a clone of it lives: the ring is closed at
/// once, the children move to the watcher's own ring, and their statuses
/// still come.
#[test]
fn a_uring_watchers_children_get_their_status_after_their_proactor_loop_closes() {
    let _s = serial();
    if !UringChildWatcher::is_supported() || EventLoop::proactor().is_err() {
        eprintln!("skipped: no io_uring WAITID here");
        return;
    }
    for budget in [1 << 16, 0] {
        for end in [End::Close, End::Drop] {
            let fds = fd_count();
            let w: Arc<dyn ChildWatcher> = Arc::new(
                UringChildWatcher::new()
                    .expect("uring watcher")
                    .with_fd_budget(budget),
            );
            let got: Arc<Mutex<Vec<(i32, i32)>>> = Arc::default();
            let pids: Vec<i32> = (0..3)
                .map(|_| {
                    #[allow(clippy::zombie_processes)] // the watcher reaps it
                    let c = std::process::Command::new("sleep")
                        .arg("3600")
                        .spawn()
                        .expect("spawn sleep");
                    c.id() as i32
                })
                .collect();
            let lp = EventLoop::proactor().expect("proactor");
            let copy = lp.clone();
            run_briefly(&lp, async {
                for &pid in &pids {
                    let got = Arc::clone(&got);
                    w.add_child_handler(
                        pid,
                        Box::new(move |pid, rc| {
                            got.lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push((pid, rc))
                        }),
                    )
                    .expect("add_child_handler");
                }
            });
            match end {
                End::Close => lp.close().expect("close"),
                End::Drop => drop(lp),
            }
            assert!(copy.is_closed());
            for &pid in &pids {
                // SAFETY: our own child, not reaped yet (nothing exited).
                assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
            }
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while got.lock().unwrap_or_else(|p| p.into_inner()).len() < pids.len()
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(2));
            }
            let mut got = got.lock().unwrap_or_else(|p| p.into_inner()).clone();
            got.sort();
            let mut want: Vec<(i32, i32)> = pids.iter().map(|&p| (p, -9)).collect();
            want.sort();
            assert_eq!(got, want, "budget {budget}: every status after the close");
            assert!(unreaped_after(&pids, Duration::from_secs(10)).is_empty());
            // The loop's ring and eventfd went at close, the pidfds with the
            // statuses, the watcher's own ring (which took the children
            // over) with the watcher. Only the clone of the loop is left.
            w.close();
            drop(w);
            let after = settle_fds(fds);
            assert!(
                after <= fds,
                "budget {budget}: descriptors {fds} -> {after}"
            );
            drop(copy);
        }
    }
}

/// Safe or Fast attached to a loop that is dropped while a task holds a
/// `kill_on_drop` child: the child is killed with the task, and closing the
/// watcher (which drops the child's callback uncalled) reaps it — no zombie.
#[test]
fn closing_safe_and_fast_after_their_loop_went_reaps_its_dropped_children() {
    let _g = serial();
    for kind in kinds() {
        let watchers: [(&str, Arc<dyn ChildWatcher>); 2] = [
            ("safe", Arc::new(SafeChildWatcher::new().unwrap())),
            ("fast", Arc::new(FastChildWatcher::new().unwrap())),
        ];
        for (name, w) in watchers {
            let lp = EventLoop::new(kind).unwrap();
            w.attach_loop(Some(&lp));
            let (lp2, w2) = (lp.clone(), Arc::clone(&w));
            let pid = lp
                .run_until_complete(async move {
                    let p = Command::new("sleep")
                        .arg("30")
                        .kill_on_drop(true)
                        .watcher(w2)
                        .spawn()
                        .unwrap();
                    let pid = p.pid();
                    lp2.create_task(async move {
                        let _ = p.wait().await;
                    })
                    .detach();
                    pid
                })
                .unwrap();
            drop(lp);
            w.close();
            assert_eq!(
                unreaped_after(&[pid], Duration::from_secs(30)),
                Vec::<i32>::new(),
                "{name} on {kind:?}: the killed child stayed a zombie"
            );
        }
    }
}

/// asyncio's `remove_child_handler`: the caller takes the child back and
/// reaps it. That holds when its `Process` was dropped first: the removed
/// callback must not give the child to the orphan reaper.
#[test]
fn remove_child_handler_after_the_process_went_leaves_the_child_to_the_caller() {
    let _g = serial();
    for kind in kinds() {
        // Not Threaded: as in CPython, its waiter thread reaps the child
        // whether or not the handler is still there.
        let watchers: [(&str, Arc<dyn ChildWatcher>); 5] = [
            ("safe", Arc::new(SafeChildWatcher::new().unwrap())),
            ("fast", Arc::new(FastChildWatcher::new().unwrap())),
            ("multiloop", Arc::new(MultiLoopChildWatcher::new().unwrap())),
            ("pidfd", Arc::new(PidfdChildWatcher::new().unwrap())),
            ("uring", Arc::new(UringChildWatcher::new().unwrap())),
        ];
        for (name, w) in watchers {
            let lp = EventLoop::new(kind).unwrap();
            w.attach_loop(Some(&lp));
            let w2 = Arc::clone(&w);
            // Exits only once it reads a line: removed while surely running.
            let (pid, stdin) = lp
                .run_until_complete(async move {
                    let mut p = Command::new("sh")
                        .args(["-c", "read x; exit 9"])
                        .stdin(childwatch::Stdio::piped())
                        .watcher(w2)
                        .spawn()
                        .unwrap();
                    (p.pid(), p.stdin.take())
                })
                .unwrap();
            assert!(w.remove_child_handler(pid), "{name}");
            drop(stdin);
            let mut status = 0;
            // SAFETY: waiting for our own child.
            let r = unsafe { libc::waitpid(pid, &mut status, 0) };
            assert_eq!(
                r, pid,
                "{name} on {kind:?}: the child was reaped behind the caller's back"
            );
            assert!(
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 9,
                "{name}"
            );
            w.close();
        }
    }
}
