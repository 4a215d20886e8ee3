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

/// One loop with a parked task that holds what `park` gives it, ended by
/// `end`. Returns the number of parked futures dropped by then.
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
    // A pending timer whose callback holds a clone (owning or not, as the
    // task above).
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

/// One loop that spawns a `kill_on_drop` child whose `wait` is parked in a
/// task (holding a non-owning clone of the loop) and whose stdout is a pipe,
/// then is closed or dropped. Returns the child's pid.
fn one_loop_with_child(kind: LoopKind, end: &End, watcher: Option<&Arc<dyn ChildWatcher>>) -> i32 {
    let lp = EventLoop::new(kind).expect("loop");
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
            me.create_task(async move {
                let _keep = me_clone(&p);
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
) {
    for _ in 0..5 {
        one_loop_with_child(kind, &end, watcher.as_ref());
    }
    let (fds, threads, rss) = (fd_count(), thread_count(), rss_kib());
    // Zombies left by other tests (Safe and Fast do not reap after close).
    let zombies = zombie_children();
    let mut pids = Vec::with_capacity(n);
    for _ in 0..n {
        pids.push(one_loop_with_child(kind, &end, watcher.as_ref()));
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
        churn_children(kind, End::Close, ("default", None), 1000);
    }
}

#[test]
fn dropping_a_loop_kills_kill_on_drop_children_and_leaks_nothing_default_watcher() {
    let _s = serial();
    for kind in kinds() {
        churn_children(kind, End::Drop, ("default", None), 1000);
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

#[test]
fn close_and_drop_release_everything_with_every_loop_free_watcher() {
    let _s = serial();
    for (name, w) in loop_free_watchers() {
        for kind in kinds() {
            churn_children(kind, End::Close, (name, Some(Arc::clone(&w))), 200);
            churn_children(kind, End::Drop, (name, Some(Arc::clone(&w))), 200);
        }
        w.close();
    }
}

/// Safe and Fast work through the loop they are attached to: attach each
/// new loop before its spawn.
fn churn_attached(kind: LoopKind, end: End, w: &Arc<dyn ChildWatcher>, n: usize) {
    let one = |end: &End| {
        let lp = EventLoop::new(kind).expect("loop");
        w.attach_loop(Some(&lp));
        let pid = lp
            .run_until_complete(async {
                let p = Command::new("sleep")
                    .arg("3600")
                    .kill_on_drop(true)
                    .watcher(Arc::clone(w))
                    .spawn()
                    .expect("spawn sleep");
                let pid = p.pid();
                get_running_loop()
                    .expect("running")
                    .create_task(async move {
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
        churn_attached(kind, End::Close, &safe, 200);
        safe.close();
        let fast: Arc<dyn ChildWatcher> = Arc::new(FastChildWatcher::new().expect("fast"));
        churn_attached(kind, End::Close, &fast, 200);
        fast.close();
    }
}

#[test]
fn dropping_loops_with_the_safe_and_fast_watchers_attached_leaks_nothing() {
    let _s = serial();
    for kind in kinds() {
        let safe: Arc<dyn ChildWatcher> = Arc::new(SafeChildWatcher::new().expect("safe"));
        churn_attached(kind, End::Drop, &safe, 200);
        safe.close();
        let fast: Arc<dyn ChildWatcher> = Arc::new(FastChildWatcher::new().expect("fast"));
        churn_attached(kind, End::Drop, &fast, 200);
        fast.close();
    }
}
