//! Helpers shared by the watcher test binaries: real children, a log of
//! callbacks, and loop plumbing.
#![allow(dead_code)]

pub mod suite;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use childwatch::{ChildCallback, ChildWatcher, EventLoop, LoopKind, Pid, ReturnCode, sleep};

/// How long a test waits for a callback before it fails (a hang guard, not a
/// timing assertion).
pub const PATIENCE: Duration = Duration::from_secs(60);

/// Starts `/bin/sh -c script` and returns its pid; std does not wait on drop,
/// so the child stays ours to reap.
#[allow(clippy::zombie_processes)] // the watcher under test reaps it
pub fn sh(script: &str) -> Pid {
    let child = Command::new("/bin/sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn /bin/sh");
    child.id() as Pid
}

/// A script that ends with returncode `rc` (negative: killed by signal).
pub fn script_for(rc: ReturnCode) -> String {
    if rc >= 0 {
        format!("exit {rc}")
    } else {
        format!("ulimit -c 0; kill -{} $$; sleep 5", -rc)
    }
}

/// Every callback that ran: pid, returncode, thread.
#[derive(Clone, Default)]
pub struct Log(Arc<Mutex<Vec<(Pid, ReturnCode, ThreadId, &'static str)>>>);

impl Log {
    pub fn cb(&self) -> ChildCallback {
        self.tagged("")
    }

    pub fn tagged(&self, tag: &'static str) -> ChildCallback {
        let l = Arc::clone(&self.0);
        Box::new(move |pid, rc| {
            l.lock()
                .unwrap()
                .push((pid, rc, std::thread::current().id(), tag))
        })
    }

    pub fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    pub fn entries(&self) -> Vec<(Pid, ReturnCode, ThreadId, &'static str)> {
        self.0.lock().unwrap().clone()
    }

    /// pid → returncodes seen (a pid reported twice shows two).
    pub fn by_pid(&self) -> HashMap<Pid, Vec<ReturnCode>> {
        let mut m: HashMap<Pid, Vec<ReturnCode>> = HashMap::new();
        for (pid, rc, _, _) in self.entries() {
            m.entry(pid).or_default().push(rc);
        }
        m
    }

    /// Runs the loop until `n` callbacks have run (panics after PATIENCE).
    pub async fn wait_for(&self, n: usize) {
        until(|| self.len() >= n, "callbacks").await
    }
}

/// Polls `f` on the running loop until it holds.
pub async fn until(mut f: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + PATIENCE;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(1)).await;
    }
}

/// A loop of `kind`, or None where the kernel lacks it (then the test is
/// skipped with a note).
pub fn new_loop(kind: LoopKind) -> Option<EventLoop> {
    match EventLoop::new(kind) {
        Ok(lp) => Some(lp),
        Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
            eprintln!("skipping: {kind} loop unsupported here: {e}");
            None
        }
        Err(e) => panic!("cannot create a {kind} loop: {e}"),
    }
}

/// A loop with `w` attached (asyncio's usual setup); closes both at the end.
pub struct Env {
    pub lp: EventLoop,
    pub w: Arc<dyn ChildWatcher>,
}

impl Env {
    pub fn new(kind: LoopKind, w: Arc<dyn ChildWatcher>) -> Option<Env> {
        let lp = new_loop(kind)?;
        w.attach_loop(Some(&lp));
        Some(Env { lp, w })
    }

    pub fn run<T>(&self, fut: impl std::future::Future<Output = T>) -> T {
        self.lp.run_until_complete(fut).expect("loop ran")
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.w.close();
        let _ = self.lp.close();
    }
}

/// The process state letter of `pid` from /proc (None once it is gone).
pub fn proc_state(pid: Pid) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &s[s.rfind(')')? + 2..];
    after.chars().next()
}

/// Our children that are zombies now.
pub fn zombie_children() -> Vec<Pid> {
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = s.rfind(')') else { continue };
        let mut f = s[close + 2..].split_whitespace();
        let state = f.next();
        let ppid = f.next().and_then(|p| p.parse::<i32>().ok());
        if state == Some("Z") && ppid == Some(me) {
            out.push(pid);
        }
    }
    out
}

/// Blocks until `pid` is a zombie (exited, not reaped).
pub fn wait_zombie(pid: Pid) {
    let deadline = Instant::now() + PATIENCE;
    while proc_state(pid) != Some('Z') {
        assert!(Instant::now() < deadline, "pid {pid} never exited");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Blocks until `pid` is stopped.
pub fn wait_stopped(pid: Pid) {
    let deadline = Instant::now() + PATIENCE;
    while proc_state(pid) != Some('T') {
        assert!(Instant::now() < deadline, "pid {pid} never stopped");
        std::thread::sleep(Duration::from_millis(1));
    }
}

pub fn kill(pid: Pid, sig: i32) {
    // SAFETY: plain kill(2) on a child we spawned and have not reaped.
    let r = unsafe { libc::kill(pid, sig) };
    assert_eq!(r, 0, "kill({pid}, {sig})");
}

/// Reaps `pid` ourselves; its raw status, or None if it was not ours to reap.
pub fn reap(pid: Pid) -> Option<i32> {
    let mut status = 0;
    // SAFETY: waitpid(2) with a valid out-pointer.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    (r == pid).then_some(status)
}

/// A small deterministic generator (xorshift), so failures reproduce.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    /// A random returncode: an exit code, or a deadly signal.
    pub fn returncode(&mut self) -> ReturnCode {
        const SIGNALS: [i32; 6] = [
            libc::SIGTERM,
            libc::SIGKILL,
            libc::SIGSEGV,
            libc::SIGHUP,
            libc::SIGUSR1,
            libc::SIGABRT,
        ];
        if self.next() % 4 == 0 {
            -SIGNALS[(self.next() % SIGNALS.len() as u64) as usize]
        } else {
            (self.next() % 256) as ReturnCode
        }
    }
}

/// Spawns one child per returncode with at most `in_flight` alive, registers
/// each with `w` on the running loop, and checks every status is exact and
/// reported exactly once (by spawn index: pids may be recycled).
pub async fn run_batch(w: &Arc<dyn ChildWatcher>, rcs: &[ReturnCode], in_flight: usize) {
    let got: Arc<Mutex<Vec<Vec<(Pid, ReturnCode)>>>> =
        Arc::new(Mutex::new(vec![Vec::new(); rcs.len()]));
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut pids = Vec::with_capacity(rcs.len());
    for (i, &rc) in rcs.iter().enumerate() {
        if i >= in_flight {
            let need = i - in_flight + 1;
            until(
                || done.load(std::sync::atomic::Ordering::SeqCst) >= need,
                "exits",
            )
            .await;
        }
        let pid = sh(&script_for(rc));
        pids.push(pid);
        let (g, d) = (Arc::clone(&got), Arc::clone(&done));
        w.add_child_handler(
            pid,
            Box::new(move |p, r| {
                g.lock().unwrap()[i].push((p, r));
                d.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }),
        )
        .expect("add_child_handler");
    }
    until(
        || done.load(std::sync::atomic::Ordering::SeqCst) >= rcs.len(),
        "all exits",
    )
    .await;
    // Let any duplicate delivery show up before checking.
    sleep(Duration::from_millis(20)).await;
    let got = got.lock().unwrap();
    for (i, &rc) in rcs.iter().enumerate() {
        assert_eq!(got[i], vec![(pids[i], rc)], "child #{i} (pid {})", pids[i]);
    }
}
