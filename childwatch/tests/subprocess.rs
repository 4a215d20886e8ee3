//! Integration tests of the subprocess layer with real children, after
//! CPython's `Lib/test/test_asyncio/test_subprocess.py`.
//!
//! Every case in `cases` runs on both loop kinds (proactor and selector) and
//! under every watcher of the matrix at the bottom of this file: adding a
//! watcher is one line in `matrix!`. A watcher that reaps every child of the
//! process (Fast) must be marked `exclusive`, so that its tests do not run
//! beside tests whose children it would steal.
#![cfg(target_os = "linux")]

use std::io;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use childwatch::{
    ChildWatcher, Command, EventLoop, FastChildWatcher, LoopKind, MultiLoopChildWatcher,
    PidfdChildWatcher, Process, SafeChildWatcher, Stdio, ThreadedChildWatcher, UringChildWatcher,
    create_subprocess_exec, create_subprocess_shell, sleep,
};
use futures_util::future::{Either, join_all, select};
use futures_util::{AsyncReadExt, AsyncWriteExt};

/// Makes a watcher for one test.
type Factory = fn() -> io::Result<Arc<dyn ChildWatcher>>;

/// What a case gets: a loop (not running yet) and a watcher attached to it.
struct Ctx {
    lp: EventLoop,
    watcher: Arc<dyn ChildWatcher>,
    make: Factory,
}

impl Ctx {
    fn exec<I, S>(&self, program: &str, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut c = create_subprocess_exec(program, args);
        c.watcher(Arc::clone(&self.watcher));
        c
    }

    fn shell(&self, cmd: &str) -> Command {
        let mut c = create_subprocess_shell(cmd);
        c.watcher(Arc::clone(&self.watcher));
        c
    }

    fn run<F: std::future::Future>(&self, f: F) -> F::Output {
        self.lp.run_until_complete(f).expect("the loop ran")
    }
}

/// Shared by all tests; exclusive for the cases (and watchers) that need the
/// process to themselves.
static SERIAL: RwLock<()> = RwLock::new(());

/// Cases that count process-wide resources and so run alone.
const SERIAL_CASES: &[&str] = &["no_fd_leak"];

fn run_case(kind: LoopKind, make: Factory, exclusive: bool, name: &str, case: fn(&Ctx)) {
    let exclusive = exclusive || SERIAL_CASES.contains(&name);
    let (_r, _w) = if exclusive {
        (
            None,
            Some(SERIAL.write().unwrap_or_else(|p| p.into_inner())),
        )
    } else {
        (Some(SERIAL.read().unwrap_or_else(|p| p.into_inner())), None)
    };
    let lp = match EventLoop::new(kind) {
        Ok(lp) => lp,
        Err(e) if e.kind() == io::ErrorKind::Unsupported => {
            eprintln!("skipped: {kind} loop unavailable here: {e}");
            return;
        }
        Err(e) => panic!("cannot create a {kind} loop: {e}"),
    };
    let watcher = make().expect("watcher");
    watcher.attach_loop(Some(&lp));
    let ctx = Ctx { lp, watcher, make };
    case(&ctx);
    ctx.watcher.close();
    ctx.lp.close().expect("close the loop");
}

async fn read_all<R: futures_util::AsyncRead + Unpin>(r: &mut R) -> Vec<u8> {
    let mut v = Vec::new();
    r.read_to_end(&mut v).await.expect("read to end");
    v
}

/// Waits (bounded) until `pid` no longer exists, not even as a zombie. Async,
/// so that watchers which reap from the loop (on SIGCHLD) keep working.
async fn gone(pid: i32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            return true;
        }
        sleep(Duration::from_millis(5)).await;
    }
    false
}

/// Our zombie children, after giving the watcher (bounded) time to reap
/// any that are exiting right now.
async fn no_zombie_children() -> Vec<i32> {
    let me = std::process::id() as i32;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let zombies: Vec<i32> = std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                    return false;
                };
                let Some(close) = stat.rfind(')') else {
                    return false;
                };
                let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
                f.len() > 1 && f[0] == "Z" && f[1].parse() == Ok(me)
            })
            .collect();
        if zombies.is_empty() || Instant::now() >= deadline {
            return zombies;
        }
        sleep(Duration::from_millis(10)).await;
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

/// Each open descriptor and what it points to, for leak reports.
fn fd_targets() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|e| e.ok())
        .map(|e| {
            let target = std::fs::read_link(e.path()).unwrap_or_default();
            format!(
                "{} -> {}",
                e.file_name().to_string_lossy(),
                target.display()
            )
        })
        .collect();
    v.sort();
    v
}

/// Fields after the command name of /proc/<pid>/stat: state, ppid, pgrp, session.
fn pgrp_and_session(stat: &str) -> (i32, i32) {
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    (f[2].parse().unwrap(), f[3].parse().unwrap())
}

mod cases {
    use super::*;

    pub fn stdin_stdout_roundtrip(cx: &Ctx) {
        cx.run(async {
            let mut p = cx
                .exec("cat", [] as [&str; 0])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let mut stdin = p.stdin.take().unwrap();
            stdin.write_all(b"hello through cat\n").await.unwrap();
            stdin.close().await.unwrap();
            let out = read_all(p.stdout.as_mut().unwrap()).await;
            assert_eq!(out, b"hello through cat\n");
            assert_eq!(p.wait().await.unwrap(), 0);
            assert_eq!(p.returncode(), Some(0));
        });
    }

    pub fn communicate_with_input(cx: &Ctx) {
        cx.run(async {
            let mut p = cx
                .exec("cat", [] as [&str; 0])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let (out, err) = p.communicate(Some(b"some input")).await.unwrap();
            assert_eq!(out, b"some input");
            assert!(err.is_empty());
            assert_eq!(p.returncode(), Some(0));
        });
    }

    pub fn communicate_without_input(cx: &Ctx) {
        cx.run(async {
            let mut p = cx
                .shell("echo out; echo err >&2; exit 4")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let (out, err) = p.communicate(None).await.unwrap();
            assert_eq!(out, b"out\n");
            assert_eq!(err, b"err\n");
            assert_eq!(p.returncode(), Some(4));
        });
    }

    pub fn communicate_empty_input(cx: &Ctx) {
        cx.run(async {
            let mut p = cx
                .exec("cat", [] as [&str; 0])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let (out, err) = p.communicate(Some(b"")).await.unwrap();
            assert!(out.is_empty());
            assert!(err.is_empty(), "stderr was not piped: empty");
            assert_eq!(p.returncode(), Some(0));
        });
    }

    pub fn ten_megabytes_both_ways(cx: &Ctx) {
        let data: Vec<u8> = (0..10 * 1024 * 1024u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        cx.run(async {
            let mut p = cx
                .exec("cat", [] as [&str; 0])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let (out, _) = p.communicate(Some(&data)).await.unwrap();
            assert_eq!(out.len(), data.len());
            assert!(out == data, "the bytes came back unchanged");
        });
    }

    pub fn shell_command(cx: &Ctx) {
        cx.run(async {
            let mut p = cx
                .shell("x=$((40 + 2)); echo \"$x\" | tr 4 z")
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let (out, _) = p.communicate(None).await.unwrap();
            assert_eq!(out, b"z2\n");
        });
    }

    pub fn env_and_cwd(cx: &Ctx) {
        let dir = std::fs::canonicalize(std::env::temp_dir()).unwrap();
        cx.run(async {
            let mut p = cx
                .shell("echo \"$CW_A|$CW_B|${CW_GONE-unset}\"; pwd")
                .env("CW_A", "alpha")
                .envs([("CW_B", "beta"), ("CW_GONE", "x")])
                .env_remove("CW_GONE")
                .current_dir(&dir)
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let (out, _) = p.communicate(None).await.unwrap();
            let expected = format!("alpha|beta|unset\n{}\n", dir.display());
            assert_eq!(String::from_utf8(out).unwrap(), expected);

            let mut p = cx
                .exec("/usr/bin/env", [] as [&str; 0])
                .env_clear()
                .env("ONLY", "1")
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let (out, _) = p.communicate(None).await.unwrap();
            assert_eq!(out, b"ONLY=1\n");
        });
    }

    pub fn stderr_into_stdout_and_null(cx: &Ctx) {
        cx.run(async {
            let mut p = cx
                .shell("echo one; echo two >&2")
                .stdout(Stdio::piped())
                .stderr(Stdio::stdout())
                .spawn()
                .unwrap();
            let (out, err) = p.communicate(None).await.unwrap();
            assert_eq!(out, b"one\ntwo\n");
            assert!(err.is_empty());

            let mut p = cx
                .shell("echo hidden; read x; echo \"[$x]\" >&2")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            assert!(p.stdout.is_none() && p.stdin.is_none());
            let (out, err) = p.communicate(None).await.unwrap();
            assert!(out.is_empty());
            assert_eq!(err, b"[]\n");
        });
    }

    pub fn start_new_session(cx: &Ctx) {
        cx.run(async {
            let mut p = cx
                .shell("cat /proc/$$/stat")
                .start_new_session(true)
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let (out, _) = p.communicate(None).await.unwrap();
            let (pgrp, sid) = pgrp_and_session(&String::from_utf8(out).unwrap());
            assert_eq!(sid, p.pid(), "the child leads its own session");
            assert_eq!(pgrp, p.pid());

            let mut p = cx
                .shell("cat /proc/$$/stat")
                .process_group(0)
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let (out, _) = p.communicate(None).await.unwrap();
            let (pgrp, sid) = pgrp_and_session(&String::from_utf8(out).unwrap());
            assert_eq!(pgrp, p.pid(), "the child leads a new process group");
            assert_ne!(sid, p.pid(), "but not a new session");
        });
    }

    fn long_sleeper(cx: &Ctx) -> Process {
        cx.exec("sleep", ["30"]).spawn().unwrap()
    }

    pub fn kill_gives_minus_9(cx: &Ctx) {
        cx.run(async {
            let p = long_sleeper(cx);
            assert_eq!(p.returncode(), None);
            p.kill().unwrap();
            assert_eq!(p.wait().await.unwrap(), -9);
            // Signalling an exited process is a no-op.
            p.kill().unwrap();
            p.terminate().unwrap();
            assert_eq!(p.returncode(), Some(-9));
        });
    }

    pub fn terminate_gives_minus_15(cx: &Ctx) {
        cx.run(async {
            let p = long_sleeper(cx);
            p.terminate().unwrap();
            assert_eq!(p.wait().await.unwrap(), -15);
        });
    }

    pub fn send_signal_sighup(cx: &Ctx) {
        cx.run(async {
            let p = long_sleeper(cx);
            p.send_signal(libc::SIGHUP).unwrap();
            assert_eq!(p.wait().await.unwrap(), -1);
            assert_eq!(
                p.send_signal(-3).unwrap_err().kind(),
                io::ErrorKind::InvalidInput
            );
        });
    }

    pub fn exit_code_7(cx: &Ctx) {
        cx.run(async {
            let p = cx.shell("exit 7").spawn().unwrap();
            assert!(p.pid() > 0);
            assert_eq!(p.wait().await.unwrap(), 7);
            assert_eq!(p.wait().await.unwrap(), 7, "wait again after the exit");
        });
    }

    pub fn ten_concurrent_waits(cx: &Ctx) {
        cx.run(async {
            let p = cx.exec("sleep", ["0.05"]).spawn().unwrap();
            let all = join_all((0..10).map(|_| p.wait())).await;
            assert_eq!(all.len(), 10);
            for rc in all {
                assert_eq!(rc.unwrap(), 0);
            }
        });
    }

    pub fn cancelled_wait_then_wait_again(cx: &Ctx) {
        cx.run(async {
            let p = cx.exec("sleep", ["0.2"]).spawn().unwrap();
            {
                let w = Box::pin(p.wait());
                let t = Box::pin(sleep(Duration::from_millis(10)));
                match select(w, t).await {
                    Either::Left(_) => panic!("sleep 0.2 ended before a 10 ms timer"),
                    Either::Right(((), w)) => drop(w),
                }
            }
            assert_eq!(p.returncode(), None);
            assert_eq!(p.wait().await.unwrap(), 0);
        });
    }

    pub fn cancelled_read_loses_nothing(cx: &Ctx) {
        cx.run(async {
            let mut p = cx
                .shell("sleep 0.2; echo late data")
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let stdout = p.stdout.as_mut().unwrap();
            let mut buf = [0u8; 64];
            {
                let r = stdout.read(&mut buf);
                let t = Box::pin(sleep(Duration::from_millis(10)));
                match select(r, t).await {
                    Either::Left(_) => panic!("the read finished before the child wrote"),
                    Either::Right(_) => {}
                }
            }
            let out = read_all(stdout).await;
            assert_eq!(out, b"late data\n");
            assert_eq!(p.wait().await.unwrap(), 0);
        });
    }

    pub fn read_stdout_after_exit(cx: &Ctx) {
        cx.run(async {
            let mut p = cx
                .exec("echo", ["written", "before", "exit"])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            assert_eq!(p.wait().await.unwrap(), 0);
            let out = read_all(p.stdout.as_mut().unwrap()).await;
            assert_eq!(out, b"written before exit\n");
        });
    }

    /// CPython gh-119710: wait() must not wait for the pipes.
    pub fn grandchild_keeps_stdout_open(cx: &Ctx) {
        cx.run(async {
            let mut p = cx
                .shell("sleep 30 & echo hi")
                .start_new_session(true)
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let pgid = p.pid();
            let mut line = [0u8; 3];
            p.stdout
                .as_mut()
                .unwrap()
                .read_exact(&mut line)
                .await
                .unwrap();
            assert_eq!(&line, b"hi\n");
            let w = Box::pin(p.wait());
            let t = Box::pin(sleep(Duration::from_secs(10)));
            let res = select(w, t).await;
            // SAFETY: the grandchild leads no group of its own: it is in the
            // session (and group) the child created, which only we started.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            match res {
                Either::Left((rc, _)) => assert_eq!(rc.unwrap(), 0),
                Either::Right(_) => panic!("wait() hung on a pipe held by a grandchild"),
            }
        });
    }

    pub fn bad_inputs(cx: &Ctx) {
        cx.run(async {
            let e = cx
                .exec("no-such-program-cw", [] as [&str; 0])
                .spawn()
                .unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
            assert!(e.to_string().contains("no-such-program-cw"), "{e}");

            let e = cx.exec("", [] as [&str; 0]).spawn().unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");

            let e = cx.exec("echo", ["a\0b"]).spawn().unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");

            let e = cx.exec("echo", ["x"]).env("K", "v\0").spawn().unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");

            let e = cx
                .exec("pwd", [] as [&str; 0])
                .current_dir("/no/such/dir-cw")
                .spawn()
                .unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
            assert!(e.to_string().contains("/no/such/dir-cw"), "{e}");

            static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let name = format!("cw-noexec-{}-{n}", std::process::id());
            let file = std::env::temp_dir().join(name);
            std::fs::write(&file, "#!/bin/sh\n").unwrap();
            let e = cx
                .exec(file.to_str().unwrap(), [] as [&str; 0])
                .spawn()
                .unwrap_err();
            std::fs::remove_file(&file).unwrap();
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");

            let e = cx
                .exec("cat", [] as [&str; 0])
                .stdin(Stdio::stdout())
                .spawn()
                .unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");

            let mut p = cx
                .exec("cat", [] as [&str; 0])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            p.communicate(Some(b"x")).await.unwrap();
            let e = p.communicate(None).await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::Other, "{e}");
        });
    }

    pub fn write_to_closed_stdin(cx: &Ctx) {
        cx.run(async {
            // We closed it.
            let mut p = cx
                .exec("cat", [] as [&str; 0])
                .stdin(Stdio::piped())
                .spawn()
                .unwrap();
            let stdin = p.stdin.as_mut().unwrap();
            stdin.close().await.unwrap();
            let e = stdin.write_all(b"late").await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::BrokenPipe, "{e}");
            assert_eq!(p.wait().await.unwrap(), 0);

            // The child closed it (it exited without reading).
            let mut p = cx
                .exec("true", [] as [&str; 0])
                .stdin(Stdio::piped())
                .spawn()
                .unwrap();
            assert_eq!(p.wait().await.unwrap(), 0);
            let stdin = p.stdin.as_mut().unwrap();
            let chunk = vec![b'x'; 4096];
            let mut err = None;
            for _ in 0..64 {
                let r = match stdin.write_all(&chunk).await {
                    Ok(()) => stdin.flush().await,
                    Err(e) => Err(e),
                };
                if let Err(e) = r {
                    err = Some(e);
                    break;
                }
            }
            let e = err.expect("writing to a pipe with no reader fails");
            assert_eq!(e.kind(), io::ErrorKind::BrokenPipe, "{e}");
        });
    }

    pub fn spawn_needs_running_loop(cx: &Ctx) {
        let e = cx.exec("true", [] as [&str; 0]).spawn().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Other, "{e}");
        assert!(e.to_string().contains("running event loop"), "{e}");
    }

    pub fn inactive_watcher_is_refused(cx: &Ctx) {
        let w = (cx.make)().unwrap();
        w.close();
        cx.run(async {
            let e = create_subprocess_exec("true", [] as [&str; 0])
                .watcher(w)
                .spawn()
                .unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::Other, "{e}");
            assert!(e.to_string().contains("not activated"), "{e}");
        });
    }

    pub fn no_fd_leak(cx: &Ctx) {
        // Warm up whatever the loop and watcher open lazily (Uring's own
        // ring on a selector loop is made for the first child still alive at
        // registration: `cat` waits for its input, `true` might not).
        cx.run(async {
            let mut p = cx
                .exec("cat", [] as [&str; 0])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            p.communicate(Some(b"warm")).await.unwrap();
        });
        let before = open_fds();
        let before_targets = fd_targets();
        cx.run(async {
            for _ in 0..5 {
                let mut p = cx
                    .exec("cat", [] as [&str; 0])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap();
                p.communicate(Some(b"abc")).await.unwrap();
            }
            let p = cx
                .exec("sleep", ["0.05"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            p.wait().await.unwrap();
            drop(p);
            for bad in ["no-such-program-cw", ""] {
                cx.exec(bad, [] as [&str; 0])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap_err();
            }
        });
        // Watchers of earlier tests may still be releasing their own
        // descriptors on background threads; a leak of ours persists.
        let deadline = Instant::now() + Duration::from_secs(2);
        while open_fds() != before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            open_fds(),
            before,
            "descriptors leaked by spawn: before {before_targets:?}, after {:?}",
            fd_targets()
        );
        let zombies = cx.run(no_zombie_children());
        assert!(zombies.is_empty(), "zombie children left: {zombies:?}");
    }

    /// The child sees only 0, 1 and 2 of ours (plus whatever the test
    /// process itself holds without CLOEXEC), even while other pipes are open.
    pub fn no_fd_inherited(cx: &Ctx) {
        cx.run(async {
            let mut other = cx
                .exec("cat", [] as [&str; 0])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let inheritable: Vec<i32> = std::fs::read_dir("/proc/self/fd")
                .unwrap()
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                // SAFETY: F_GETFD only reads the flags of a descriptor number.
                .filter(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } == 0)
                .collect();
            let mut p = cx
                .exec("ls", ["/proc/self/fd"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let (out, _) = p.communicate(None).await.unwrap();
            let extra: Vec<i32> = String::from_utf8(out)
                .unwrap()
                .split_whitespace()
                .map(|s| s.parse().unwrap())
                .filter(|fd| *fd > 2 && !inheritable.contains(fd))
                .collect();
            // ls itself holds one descriptor: the directory it lists.
            assert!(
                extra.len() <= 1,
                "descriptors leaked into the child: {extra:?}"
            );
            other.communicate(None).await.unwrap();
        });
    }

    /// A watcher closed before the child exits: wait() fails, never hangs.
    pub fn closed_watcher_fails_wait(cx: &Ctx) {
        let w = (cx.make)().unwrap();
        w.attach_loop(Some(&cx.lp));
        let pid = cx.run(async {
            let p = create_subprocess_exec("sleep", ["30"])
                .watcher(Arc::clone(&w))
                .spawn()
                .unwrap();
            w.close();
            let e = p.wait().await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::Other, "{e}");
            p.kill().unwrap_or_else(|e| panic!("{e}"));
            p.pid()
        });
        // SAFETY: our own child; a watcher that still reaps it races us
        // harmlessly (one of us gets ECHILD).
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        assert!(cx.run(gone(pid)));
    }

    /// CPython's test_communicate_ignore_broken_pipe: the child exits
    /// without reading a large input.
    pub fn communicate_ignores_broken_pipe(cx: &Ctx) {
        let input = vec![b'z'; 1024 * 1024];
        cx.run(async {
            let mut p = cx
                .exec("true", [] as [&str; 0])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let (out, err) = p.communicate(Some(&input)).await.unwrap();
            assert!(out.is_empty() && err.is_empty());
            assert_eq!(p.returncode(), Some(0));
        });
    }

    /// A bare program name is looked up in the child's PATH when the
    /// command sets one.
    pub fn program_found_in_child_path(cx: &Ctx) {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("cw-path-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("cw-hello");
        std::fs::write(&script, "#!/bin/sh\necho hello from \"$0\"\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let out = cx.run(async {
            // A spawn on another test thread may still hold a copy of the
            // descriptor that wrote the script (between its clone and its
            // exec): ETXTBSY, the classic race; it clears at that exec.
            let mut tries = 0;
            let mut p = loop {
                match cx
                    .exec("cw-hello", [] as [&str; 0])
                    .env("PATH", &dir)
                    .stdout(Stdio::piped())
                    .spawn()
                {
                    Err(e) if e.kind() == io::ErrorKind::ExecutableFileBusy && tries < 100 => {
                        tries += 1;
                        sleep(Duration::from_millis(10)).await;
                    }
                    other => break other.unwrap(),
                }
            };
            p.communicate(None).await.unwrap().0
        });
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("hello from {}\n", script.display())
        );
    }

    pub fn kill_on_drop(cx: &Ctx) {
        cx.run(async {
            let p = cx.exec("sleep", ["30"]).kill_on_drop(true).spawn().unwrap();
            let killed = p.pid();
            drop(p);
            // Without kill_on_drop the child runs on and is still reaped.
            let p = cx.exec("sleep", ["0.1"]).spawn().unwrap();
            let left = p.pid();
            drop(p);
            assert!(
                gone(killed).await,
                "kill_on_drop killed and reaped pid {killed}"
            );
            assert!(
                gone(left).await,
                "a dropped process is still reaped (pid {left})"
            );
        });
    }
}

/// Spawning through the policy's own watcher (no `Command::watcher`).
#[test]
fn policy_watcher_is_used_by_default() {
    let _g = SERIAL.read().unwrap_or_else(|p| p.into_inner());
    let lp = EventLoop::selector().unwrap();
    let rc = lp
        .run_until_complete(async {
            let mut p = create_subprocess_shell("echo via policy")
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let (out, _) = p.communicate(None).await.unwrap();
            assert_eq!(out, b"via policy\n");
            p.returncode()
        })
        .unwrap();
    assert_eq!(rc, Some(0));
    lp.close().unwrap();
}

macro_rules! cases {
    ($make:ident, $excl:expr; $($case:ident),* $(,)?) => {$(
        mod $case {
            #[test]
            fn proactor() {
                crate::run_case(
                    childwatch::LoopKind::Proactor, super::$make, $excl,
                    stringify!($case), crate::cases::$case,
                )
            }
            #[test]
            fn selector() {
                crate::run_case(
                    childwatch::LoopKind::Selector, super::$make, $excl,
                    stringify!($case), crate::cases::$case,
                )
            }
        }
    )*};
}

macro_rules! matrix {
    ($($watcher:ident => $make:expr, exclusive: $excl:expr;)*) => {$(
        mod $watcher {
            use super::*;
            fn make() -> io::Result<Arc<dyn ChildWatcher>> {
                $make
            }
            cases!(make, $excl;
                stdin_stdout_roundtrip, communicate_with_input, communicate_without_input,
                communicate_empty_input, ten_megabytes_both_ways, shell_command, env_and_cwd,
                stderr_into_stdout_and_null, start_new_session, kill_gives_minus_9,
                terminate_gives_minus_15, send_signal_sighup, exit_code_7, ten_concurrent_waits,
                cancelled_wait_then_wait_again, cancelled_read_loses_nothing,
                read_stdout_after_exit, grandchild_keeps_stdout_open, bad_inputs,
                write_to_closed_stdin, spawn_needs_running_loop, inactive_watcher_is_refused,
                no_fd_leak, kill_on_drop, no_fd_inherited, closed_watcher_fails_wait,
                communicate_ignores_broken_pipe, program_found_in_child_path,
            );
        }
    )*};
}

/// A test watcher that calls back on its own waiter thread, never on the
/// loop: proves that a `Process` copes with callbacks from any thread.
#[derive(Default)]
struct ForeignThreadWatcher {
    inner: Arc<ForeignInner>,
}

#[derive(Default)]
struct ForeignInner {
    closed: std::sync::atomic::AtomicBool,
    handlers: std::sync::Mutex<std::collections::HashMap<i32, childwatch::ChildCallback>>,
}

impl ChildWatcher for ForeignThreadWatcher {
    fn add_child_handler(&self, pid: i32, cb: childwatch::ChildCallback) -> io::Result<()> {
        use std::sync::atomic::Ordering;
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(io::Error::other("closed"));
        }
        if self
            .inner
            .handlers
            .lock()
            .unwrap()
            .insert(pid, cb)
            .is_some()
        {
            return Ok(());
        }
        let inner = Arc::clone(&self.inner);
        std::thread::spawn(move || {
            let mut st = 0;
            // SAFETY: waiting for a child registered with us.
            let r = unsafe { libc::waitpid(pid, &mut st, 0) };
            let rc = if r == pid {
                childwatch::watcher::status::from_raw_wait_status(st).unwrap_or(255)
            } else {
                255
            };
            let cb = inner.handlers.lock().unwrap().remove(&pid);
            if let Some(cb) = cb {
                cb(pid, rc);
            }
        });
        Ok(())
    }
    fn remove_child_handler(&self, pid: i32) -> bool {
        self.inner.handlers.lock().unwrap().remove(&pid).is_some()
    }
    fn attach_loop(&self, _lp: Option<&EventLoop>) {}
    fn is_active(&self) -> bool {
        !self.inner.closed.load(std::sync::atomic::Ordering::SeqCst)
    }
    fn close(&self) {
        self.inner
            .closed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.inner.handlers.lock().unwrap().clear();
    }
}

// The watcher matrix: one line per watcher.
matrix! {
    threaded => Ok(Arc::new(ThreadedChildWatcher::new()?)), exclusive: false;
    safe => Ok(Arc::new(SafeChildWatcher::new()?)), exclusive: false;
    fast => Ok(Arc::new(FastChildWatcher::new()?)), exclusive: true;
    multi_loop => Ok(Arc::new(MultiLoopChildWatcher::new()?)), exclusive: false;
    pidfd => Ok(Arc::new(PidfdChildWatcher::new()?)), exclusive: false;
    uring => Ok(Arc::new(UringChildWatcher::new()?)), exclusive: false;
    uring_waitid_only => Ok(Arc::new(UringChildWatcher::new()?.with_fd_budget(0))), exclusive: false;
    foreign_thread => Ok(Arc::new(ForeignThreadWatcher::default())), exclusive: false;
}

/// Spawn + wait throughput through the whole stack (loop, watcher, Process):
/// `cargo test --release -p childwatch --test subprocess throughput -- --ignored --nocapture`
#[test]
#[ignore]
fn throughput_2000_true() {
    let _g = SERIAL.write().unwrap_or_else(|p| p.into_inner());
    const N: usize = 2000;
    const IN_FLIGHT: usize = 64;
    for kind in [LoopKind::Proactor, LoopKind::Selector] {
        let Ok(lp) = EventLoop::new(kind) else {
            continue;
        };
        let w: Arc<dyn ChildWatcher> = Arc::new(ThreadedChildWatcher::new().unwrap());
        let t = Instant::now();
        lp.run_until_complete(async {
            for _ in 0..N {
                let p = create_subprocess_exec("/bin/true", [] as [&str; 0])
                    .watcher(Arc::clone(&w))
                    .spawn()
                    .unwrap();
                assert_eq!(p.wait().await.unwrap(), 0);
            }
        })
        .unwrap();
        let seq = t.elapsed();
        let t = Instant::now();
        lp.run_until_complete(async {
            let mut done = 0;
            while done < N {
                let batch: Vec<Process> = (0..IN_FLIGHT.min(N - done))
                    .map(|_| {
                        create_subprocess_exec("/bin/true", [] as [&str; 0])
                            .watcher(Arc::clone(&w))
                            .spawn()
                            .unwrap()
                    })
                    .collect();
                for rc in join_all(batch.iter().map(|p| p.wait())).await {
                    assert_eq!(rc.unwrap(), 0);
                }
                done += batch.len();
            }
        })
        .unwrap();
        let par = t.elapsed();
        println!(
            "{kind} loop, Threaded watcher: {N} x /bin/true one at a time {:.3} s ({:.0}/s); \
             in batches of {IN_FLIGHT} {:.3} s ({:.0}/s)",
            seq.as_secs_f64(),
            N as f64 / seq.as_secs_f64(),
            par.as_secs_f64(),
            N as f64 / par.as_secs_f64()
        );
        w.close();
        lp.close().unwrap();
    }
}
