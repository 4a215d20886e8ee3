//! Windows only (run under wine in CI): the policies' Windows names, the
//! completion-port loop's `wait_for_handle`, and the `WindowsChildWatcher`
//! with real `cmd.exe` children — exit codes, no loop needed, unknown pids,
//! remove/close, and no process handle left behind.
#![cfg(windows)]

use std::os::windows::io::AsHandle;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use childwatch::{
    ChildWatcher, DefaultEventLoopPolicy, EventLoop, EventLoopPolicy, LoopKind, Pid, ReturnCode,
    WindowsChildWatcher, WindowsProactorEventLoopPolicy, WindowsSelectorEventLoopPolicy,
};
use windows_sys::Win32::Foundation::{GetHandleInformation, HANDLE};
use windows_sys::Win32::System::Threading::{GetCurrentProcess, GetProcessHandleCount};

/// Handle-count checks need the process to themselves: every test here takes
/// this lock, so none opens handles while another counts them.
static EXCLUSIVE: Mutex<()> = Mutex::new(());

fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    EXCLUSIVE.lock().unwrap_or_else(|p| p.into_inner())
}

fn exit_with(code: i32) -> Child {
    Command::new("cmd.exe")
        .args(["/C", &format!("exit {code}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn cmd.exe")
}

/// A child that runs until its stdin closes (or it is killed).
fn long_running() -> (Child, ChildStdin) {
    let mut c = Command::new("cmd.exe")
        .args(["/C", "set /p x="])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn cmd.exe");
    let stdin = c.stdin.take().expect("piped stdin");
    (c, stdin)
}

fn pid_of(c: &Child) -> Pid {
    c.id() as Pid
}

/// Open handles of this process: `GetProcessHandleCount`, or where that
/// reports nothing (wine 8's is a stub returning 0) the number of handle
/// values below 16384 that `GetHandleInformation` accepts (wine hands out
/// small values; each probe is a wineserver round trip).
fn handle_count() -> u32 {
    let mut n = 0;
    // SAFETY: the pseudo-handle of this process and a valid out pointer.
    let ok = unsafe { GetProcessHandleCount(GetCurrentProcess(), &mut n) };
    if ok != 0 && n > 0 {
        return n;
    }
    (1..=4096u32)
        .filter(|v| {
            let mut flags = 0;
            // SAFETY: querying a handle value we do not own only reads the
            // handle table; an unused value fails.
            unsafe { GetHandleInformation((v * 4) as usize as HANDLE, &mut flags) != 0 }
        })
        .count() as u32
}

/// Waits (bounded) until `cond` holds; false if it never did.
fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}

#[test]
fn the_default_policy_is_the_windows_proactor_policy() {
    let _g = exclusive();
    assert!(childwatch::proactor_supported());
    let lp = DefaultEventLoopPolicy::new().new_event_loop().unwrap();
    assert_eq!(lp.kind(), LoopKind::Proactor);
    let p = WindowsProactorEventLoopPolicy::new();
    assert_eq!(p.new_event_loop().unwrap().kind(), LoopKind::Proactor);
    let s = WindowsSelectorEventLoopPolicy::new();
    assert_eq!(s.new_event_loop().unwrap().kind(), LoopKind::Selector);
    let w = p.get_child_watcher();
    assert!(w.is_active());
    assert!(format!("{p:?}").contains("Proactor"));
}

#[test]
fn wait_for_handle_reports_a_process_exit_and_a_timeout() {
    let _g = exclusive();
    let lp = EventLoop::proactor().unwrap();
    let mut child = exit_with(3);
    let signalled = lp
        .run_until_complete(lp.wait_for_handle(child.as_handle(), None))
        .unwrap()
        .unwrap();
    assert!(signalled);
    assert_eq!(child.try_wait().unwrap().and_then(|s| s.code()), Some(3));

    let (mut child, stdin) = long_running();
    let signalled = lp
        .run_until_complete(lp.wait_for_handle(child.as_handle(), Some(Duration::from_millis(20))))
        .unwrap()
        .unwrap();
    assert!(!signalled, "still running: the wait timed out");
    // Closing its stdin ends the child; the wait sees it.
    drop(stdin);
    let signalled = lp
        .run_until_complete(lp.wait_for_handle(child.as_handle(), None))
        .unwrap()
        .unwrap();
    assert!(signalled);
    child.wait().unwrap();
    lp.close().unwrap();
}

#[test]
fn wait_for_handle_needs_a_proactor_loop() {
    let _g = exclusive();
    let lp = EventLoop::selector().unwrap();
    let mut child = exit_with(0);
    let e = lp
        .run_until_complete(lp.wait_for_handle(child.as_handle(), None))
        .unwrap()
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::Unsupported);
    child.wait().unwrap();
}

#[test]
fn a_dropped_wait_for_handle_unregisters_and_a_closed_loop_refuses() {
    let _g = exclusive();
    let lp = EventLoop::proactor().unwrap();
    let (mut child, stdin) = long_running();
    // Give up on the wait after a timer: the wait future is dropped pending.
    let lp2 = lp.clone();
    let won = lp
        .run_until_complete(async {
            let wait = lp2.wait_for_handle(child.as_handle(), None);
            let timer = childwatch::sleep(Duration::from_millis(20));
            futures_util::pin_mut!(wait, timer);
            matches!(
                futures_util::future::select(wait, timer).await,
                futures_util::future::Either::Right(_)
            )
        })
        .unwrap();
    assert!(won, "the timer won: the child still runs");
    drop(stdin);
    child.wait().unwrap();
    lp.close().unwrap();
    let (mut child, _stdin) = long_running();
    // A closed loop cannot run anything, and its handle refuses calls.
    assert!(lp.handle().call_soon_threadsafe(|| {}).is_err());
    child.kill().unwrap();
    child.wait().unwrap();
}

type Log = Arc<Mutex<Vec<(Pid, ReturnCode, std::thread::ThreadId)>>>;

fn recorder(log: &Log) -> childwatch::ChildCallback {
    let log = Arc::clone(log);
    Box::new(move |pid, rc| {
        log.lock()
            .unwrap()
            .push((pid, rc, std::thread::current().id()))
    })
}

#[test]
fn the_watcher_delivers_exit_codes_on_the_registering_loop() {
    let _g = exclusive();
    let w = Arc::new(WindowsChildWatcher::new().unwrap());
    let lp = EventLoop::proactor().unwrap();
    let log: Log = Arc::default();
    let codes = [0, 1, 2, 3, 42, 255, 1000];
    let children: Vec<Child> = codes.iter().map(|&c| exit_with(c)).collect();
    let expected: Vec<(Pid, ReturnCode)> = children
        .iter()
        .zip(codes)
        .map(|(c, code)| (pid_of(c), code))
        .collect();
    let (w2, l2) = (Arc::clone(&w), Arc::clone(&log));
    let pids: Vec<Pid> = children.iter().map(pid_of).collect();
    lp.run_until_complete(async move {
        for pid in pids {
            w2.add_child_handler(pid, recorder(&l2)).unwrap();
        }
        while l2.lock().unwrap().len() < codes.len() {
            childwatch::sleep(Duration::from_millis(5)).await;
        }
    })
    .unwrap();
    let me = std::thread::current().id();
    let mut got: Vec<(Pid, ReturnCode)> = log
        .lock()
        .unwrap()
        .iter()
        .map(|&(p, rc, t)| {
            assert_eq!(t, me, "callbacks run on the loop's thread");
            (p, rc)
        })
        .collect();
    got.sort();
    let mut expected = expected;
    expected.sort();
    assert_eq!(got, expected, "every exit reported exactly once");
    assert!(eventually(|| w.watched() == 0));
    for mut c in children {
        c.wait().unwrap();
    }
    w.close();
}

#[test]
fn the_watcher_needs_no_loop_and_reports_kills() {
    let _g = exclusive();
    let w = WindowsChildWatcher::new().unwrap();
    let (tx, rx) = mpsc::channel();
    let (mut child, _stdin) = long_running();
    let pid = pid_of(&child);
    let tx2 = tx.clone();
    w.add_child_handler(pid, Box::new(move |p, rc| tx2.send((p, rc)).unwrap()))
        .unwrap();
    assert_eq!(w.watched(), 1);
    // Registering the same pid again replaces the callback.
    w.add_child_handler(pid, Box::new(move |p, rc| tx.send((p, rc + 1000)).unwrap()))
        .unwrap();
    assert_eq!(w.watched(), 1);
    child.kill().unwrap(); // TerminateProcess(h, 1)
    let (p, rc) = rx.recv_timeout(Duration::from_secs(20)).unwrap();
    assert_eq!((p, rc), (pid, 1001));
    assert!(rx.recv_timeout(Duration::from_millis(50)).is_err(), "once");
    child.wait().unwrap();
    assert!(eventually(|| w.watched() == 0));
    w.close();
}

#[test]
fn unknown_and_invalid_pids() {
    let _g = exclusive();
    let w = WindowsChildWatcher::new().unwrap();
    // Windows pids are multiples of 4: this one is never a process.
    let (tx, rx) = mpsc::channel();
    w.add_child_handler(
        0x7fff_fffd,
        Box::new(move |p, rc| tx.send((p, rc)).unwrap()),
    )
    .unwrap();
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(5)).unwrap(),
        (0x7fff_fffd, 255)
    );
    assert_eq!(w.watched(), 0);
    for pid in [0, -1, i32::MIN] {
        let e = w.add_child_handler(pid, Box::new(|_, _| {})).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "pid {pid}");
    }
    w.close();
    let e = w.add_child_handler(4, Box::new(|_, _| {})).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::Other);
    assert!(!w.is_active());
}

#[test]
fn remove_and_close_release_the_waits() {
    let _g = exclusive();
    let w = WindowsChildWatcher::new().unwrap();
    let (tx, rx) = mpsc::channel::<(Pid, ReturnCode)>();
    let (mut a, a_in) = long_running();
    let (mut b, b_in) = long_running();
    let tx2 = tx.clone();
    w.add_child_handler(
        pid_of(&a),
        Box::new(move |p, rc| tx2.send((p, rc)).unwrap()),
    )
    .unwrap();
    w.add_child_handler(pid_of(&b), Box::new(move |p, rc| tx.send((p, rc)).unwrap()))
        .unwrap();
    assert_eq!(w.watched(), 2);
    assert!(w.remove_child_handler(pid_of(&a)));
    assert!(!w.remove_child_handler(pid_of(&a)));
    assert_eq!(w.watched(), 1, "the removed child's wait is gone");
    w.close();
    assert_eq!(w.watched(), 0, "close unregistered every wait");
    assert!(!w.is_active());
    drop((a_in, b_in));
    a.wait().unwrap();
    b.wait().unwrap();
    assert!(
        rx.recv_timeout(Duration::from_millis(100)).is_err(),
        "no callback after remove or close"
    );
}

#[test]
fn a_dropped_watcher_releases_its_handles() {
    let _g = exclusive();
    let (mut child, stdin) = long_running();
    let before = handle_count();
    let w = WindowsChildWatcher::new().unwrap();
    w.add_child_handler(pid_of(&child), Box::new(|_, _| {}))
        .unwrap();
    assert_eq!(w.watched(), 1);
    drop(w);
    assert!(
        eventually(|| handle_count() <= before),
        "handles before: {before}, after: {}",
        handle_count()
    );
    drop(stdin);
    child.wait().unwrap();
}

#[test]
fn the_policy_watcher_is_the_windows_watcher() {
    let _g = exclusive();
    let w = childwatch::get_child_watcher();
    let mut child = exit_with(7);
    let (tx, rx) = mpsc::channel();
    w.add_child_handler(
        pid_of(&child),
        Box::new(move |p, rc| tx.send((p, rc)).unwrap()),
    )
    .unwrap();
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(20)).unwrap(),
        (pid_of(&child), 7)
    );
    child.wait().unwrap();
}

#[test]
fn no_process_handle_is_left_behind() {
    let _g = exclusive();
    let lp = EventLoop::proactor().unwrap();
    let w = WindowsChildWatcher::new().unwrap();
    let run = |n: usize| {
        let log: Log = Arc::default();
        let mut children: Vec<Child> = (0..n).map(|i| exit_with(i as i32)).collect();
        for c in &children {
            w.add_child_handler(pid_of(c), recorder(&log)).unwrap();
        }
        // Half of them also through the loop's wait_for_handle.
        lp.run_until_complete(async {
            for c in children.iter().step_by(2) {
                assert!(lp.wait_for_handle(c.as_handle(), None).await.unwrap());
            }
        })
        .unwrap();
        assert!(eventually(|| log.lock().unwrap().len() == n));
        assert!(eventually(|| w.watched() == 0));
        for c in &mut children {
            c.wait().unwrap();
        }
    };
    run(4); // warm up the thread pool and the loop
    let before = handle_count();
    assert!(before > 0, "handles are counted");
    run(16);
    // Pool threads come and go on their own schedule; our handles must not stay.
    let settled = eventually(|| handle_count() <= before);
    assert!(
        settled,
        "handles before: {before}, after: {}",
        handle_count()
    );
    lp.close().unwrap();
    w.close();
}

// ------------------------------------------------------------ subprocesses

use childwatch::{Stdio as CwStdio, create_subprocess_exec, create_subprocess_shell};

/// Runs `f` as the main future of a fresh proactor loop.
fn on_proactor<T>(f: impl AsyncFnOnce() -> T) -> T {
    let lp = EventLoop::proactor().unwrap();
    let out = lp.run_until_complete(f()).unwrap();
    lp.close().unwrap();
    out
}

#[test]
fn subprocesses_report_exit_codes() {
    let _g = exclusive();
    let (a, b, c) = on_proactor(async || {
        let p = create_subprocess_exec("cmd.exe", ["/c", "exit 5"])
            .spawn()
            .unwrap();
        assert!(p.pid() > 0);
        let a = p.wait().await.unwrap();
        // A new process group (Windows' analog of a new session) works too.
        let g = create_subprocess_exec("cmd.exe", ["/c", "exit 9"])
            .start_new_session(true)
            .spawn()
            .unwrap();
        assert_eq!(g.wait().await.unwrap(), 9);
        let p = create_subprocess_shell("exit 3").spawn().unwrap();
        // Two concurrent waits see the same code.
        let (b1, b2) = futures_util::future::join(p.wait(), p.wait()).await;
        assert_eq!(b1.unwrap(), b2.unwrap());
        let c = p.returncode();
        (a, p.wait().await.unwrap(), c)
    });
    assert_eq!((a, b, c), (5, 3, Some(3)));
}

#[test]
fn communicate_feeds_stdin_and_collects_both_streams() {
    let _g = exclusive();
    // `find "line"` copies every line of its stdin that contains "line" (all
    // of them) to its stdout: a `cat` present on Windows and in wine.
    let input: Vec<u8> = (0..4000)
        .flat_map(|i| format!("line {i}\r\n").into_bytes())
        .collect();
    let (out, err, rc) = on_proactor(async || {
        let mut p = create_subprocess_exec("find.exe", ["line"])
            .stdin(CwStdio::piped())
            .stdout(CwStdio::piped())
            .stderr(CwStdio::piped())
            .spawn()
            .unwrap();
        let (out, err) = p.communicate(Some(&input)).await.unwrap();
        let again = p.communicate(None).await.unwrap_err();
        assert_eq!(again.kind(), std::io::ErrorKind::Other);
        (out, err, p.returncode())
    });
    assert_eq!(rc, Some(0), "stderr: {}", String::from_utf8_lossy(&err));
    let out = String::from_utf8_lossy(&out);
    let lines: Vec<&str> = out.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 4000, "{:?}", &lines[..lines.len().min(5)]);
    assert_eq!(lines[0], "line 0");
    assert_eq!(lines[3999], "line 3999");
}

#[test]
fn shell_quoting_and_stderr_into_stdout() {
    let _g = exclusive();
    let (out, rc) = on_proactor(async || {
        let mut p = create_subprocess_shell(r#"echo plain& echo "quoted & kept" 1>&2& exit 4"#)
            .stdout(CwStdio::piped())
            .stderr(CwStdio::stdout())
            .spawn()
            .unwrap();
        assert!(p.stderr.is_none());
        let (out, err) = p.communicate(None).await.unwrap();
        assert!(err.is_empty());
        (String::from_utf8_lossy(&out).into_owned(), p.returncode())
    });
    assert!(out.contains("plain"), "{out:?}");
    assert!(out.contains("\"quoted & kept\""), "{out:?}");
    assert_eq!(rc, Some(4));
}

#[test]
fn terminate_kill_and_signals() {
    let _g = exclusive();
    on_proactor(async || {
        let p = create_subprocess_exec("cmd.exe", ["/c", "set /p x="])
            .stdin(CwStdio::piped())
            .spawn()
            .unwrap();
        let e = p.send_signal(2).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
        assert_eq!(p.returncode(), None);
        p.terminate().unwrap();
        assert_eq!(p.wait().await.unwrap(), 1);
        // Once it exited these are no-ops.
        p.kill().unwrap();
        p.terminate().unwrap();
        p.send_signal(15).unwrap();

        let p = create_subprocess_exec("cmd.exe", ["/c", "set /p x="])
            .stdin(CwStdio::piped())
            .spawn()
            .unwrap();
        p.send_signal(9).unwrap();
        assert_eq!(p.wait().await.unwrap(), 1);

        // kill_on_drop: the child dies with its Process.
        let p = create_subprocess_exec("cmd.exe", ["/c", "set /p x="])
            .stdin(CwStdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let pid = p.pid();
        let (tx, rx) = mpsc::channel();
        let w = WindowsChildWatcher::new().unwrap();
        w.add_child_handler(pid, Box::new(move |_, rc| tx.send(rc).unwrap()))
            .unwrap();
        drop(p);
        // The callback comes to this (running) loop: wait for it here.
        let deadline = Instant::now() + Duration::from_secs(20);
        let rc = loop {
            if let Ok(rc) = rx.try_recv() {
                break rc;
            }
            assert!(
                Instant::now() < deadline,
                "no exit reported after kill_on_drop"
            );
            childwatch::sleep(Duration::from_millis(5)).await;
        };
        assert_eq!(rc, 1);
        w.close();
    });
}

#[test]
fn bad_spawns_are_clear_errors() {
    let _g = exclusive();
    // No running loop.
    let e = create_subprocess_exec("cmd.exe", ["/c", "exit 0"])
        .spawn()
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::Other);
    on_proactor(async || {
        let e = create_subprocess_exec("no-such-program-anywhere", ["x"])
            .spawn()
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
        let e = create_subprocess_exec("", [""; 0]).spawn().unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
        let e = create_subprocess_exec("cmd.exe", ["a\0b"])
            .spawn()
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
        let e = create_subprocess_exec("cmd.exe", ["/c", "exit 0"])
            .current_dir(r"C:\no\such\directory")
            .spawn()
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    });
    // Pipes need the proactor (asyncio's selector loop has no subprocesses
    // on Windows); without pipes the selector loop can still run a child.
    let lp = EventLoop::selector().unwrap();
    lp.run_until_complete(async {
        let e = create_subprocess_exec("cmd.exe", ["/c", "exit 0"])
            .stdout(CwStdio::piped())
            .spawn()
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::Unsupported);
        let p = create_subprocess_exec("cmd.exe", ["/c", "exit 6"])
            .spawn()
            .unwrap();
        assert_eq!(p.wait().await.unwrap(), 6);
    })
    .unwrap();
}

#[test]
fn subprocesses_leave_no_handle_behind() {
    let _g = exclusive();
    let lp = EventLoop::proactor().unwrap();
    let run = |n: usize| {
        lp.run_until_complete(async {
            for i in 0..n {
                let mut p = create_subprocess_shell(&format!("echo {i}& exit {i}"))
                    .stdin(CwStdio::piped())
                    .stdout(CwStdio::piped())
                    .stderr(CwStdio::piped())
                    .spawn()
                    .unwrap();
                let (out, _) = p.communicate(Some(b"ignored")).await.unwrap();
                assert!(String::from_utf8_lossy(&out).contains(&i.to_string()));
                assert_eq!(p.returncode(), Some(i as i32));
                // A failed spawn with pipes leaves nothing open either.
                let e = create_subprocess_exec("no-such-program-anywhere", [""; 0])
                    .stdin(CwStdio::piped())
                    .stdout(CwStdio::piped())
                    .stderr(CwStdio::stdout())
                    .spawn()
                    .unwrap_err();
                assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
            }
        })
        .unwrap();
    };
    run(3); // warm up
    let before = handle_count();
    run(10);
    let settled = eventually(|| handle_count() <= before);
    assert!(
        settled,
        "handles before: {before}, after: {}",
        handle_count()
    );
    lp.close().unwrap();
}

/// Stress (run with `--ignored`): 200 children in flight at once through
/// `create_subprocess_exec`; every exit reported once, with its own code.
#[test]
#[ignore]
fn stress_200_children_in_flight() {
    let _g = exclusive();
    let start = Instant::now();
    let codes = on_proactor(async || {
        let procs: Vec<_> = (0..200)
            .map(|i| {
                create_subprocess_exec("cmd.exe", ["/c", &format!("exit {i}")])
                    .spawn()
                    .unwrap()
            })
            .collect();
        let mut codes = Vec::new();
        for p in &procs {
            codes.push(p.wait().await.unwrap());
        }
        codes
    });
    assert_eq!(codes, (0..200).collect::<Vec<_>>());
    eprintln!("200 children: {:?}", start.elapsed());
}

// ------------------------------------------------------------ protocols

/// Records the order of asyncio's `SubprocessProtocol` callbacks.
#[derive(Default)]
struct Order {
    events: Vec<String>,
    out: Vec<u8>,
    done: bool,
    waker: Option<std::task::Waker>,
}

impl childwatch::SubprocessProtocol for Order {
    fn connection_made(&mut self, _t: &childwatch::SubprocessTransport) {
        self.events.push("made".into());
    }
    fn pipe_data_received(&mut self, fd: i32, data: &[u8]) {
        assert_eq!(fd, 1);
        assert!(!self.events.iter().any(|e| e == "lost 1"), "data after EOF");
        self.out.extend_from_slice(data);
    }
    fn pipe_connection_lost(&mut self, fd: i32, _exc: Option<std::io::Error>) {
        self.events.push(format!("lost {fd}"));
    }
    fn process_exited(&mut self) {
        self.events.push("exited".into());
    }
    fn connection_lost(&mut self, _exc: Option<std::io::Error>) {
        self.events.push("connection_lost".into());
        self.done = true;
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}

#[test]
fn subprocess_exec_calls_the_protocol_in_asyncio_order() {
    let _g = exclusive();
    let (events, out, rc) = on_proactor(async || {
        let lp = childwatch::get_running_loop().unwrap();
        let mut c = create_subprocess_exec("find.exe", ["x"]);
        c.stdin(CwStdio::piped()).stdout(CwStdio::piped());
        let (t, rec) = lp.subprocess_exec(Order::default, &mut c).await.unwrap();
        let stdin = t.get_pipe_transport(0).unwrap();
        stdin.write(b"x1\r\n").unwrap();
        stdin.write(b"y\r\nx2\r\n").unwrap();
        stdin.write_eof().unwrap();
        std::future::poll_fn(|cx| {
            let mut r = rec.borrow_mut();
            if r.done {
                std::task::Poll::Ready(())
            } else {
                r.waker = Some(cx.waker().clone());
                std::task::Poll::Pending
            }
        })
        .await;
        let r = rec.borrow();
        (r.events.clone(), r.out.clone(), t.get_returncode())
    });
    assert_eq!(events.first().map(String::as_str), Some("made"));
    assert_eq!(events.last().map(String::as_str), Some("connection_lost"));
    for e in ["lost 0", "lost 1", "exited"] {
        assert_eq!(events.iter().filter(|x| *x == e).count(), 1, "{events:?}");
    }
    assert_eq!(rc, Some(0));
    let out = String::from_utf8_lossy(&out);
    assert!(
        out.contains("x1") && out.contains("x2") && !out.contains('y'),
        "{out:?}"
    );
}

#[test]
fn closing_a_transport_kills_the_child() {
    let _g = exclusive();
    let (events, rc) = on_proactor(async || {
        let lp = childwatch::get_running_loop().unwrap();
        let mut c = create_subprocess_exec("cmd.exe", ["/c", "set /p x="]);
        c.stdin(CwStdio::piped()).stdout(CwStdio::piped());
        let (t, rec) = lp.subprocess_exec(Order::default, &mut c).await.unwrap();
        t.close();
        std::future::poll_fn(|cx| {
            let mut r = rec.borrow_mut();
            if r.done {
                std::task::Poll::Ready(())
            } else {
                r.waker = Some(cx.waker().clone());
                std::task::Poll::Pending
            }
        })
        .await;
        let r = rec.borrow();
        (r.events.clone(), t.get_returncode())
    });
    assert_eq!(events.last().map(String::as_str), Some("connection_lost"));
    assert_eq!(events.iter().filter(|x| *x == "exited").count(), 1);
    // TerminateProcess(h, 1), as asyncio's kill on Windows.
    assert_eq!(rc, Some(1));
}
