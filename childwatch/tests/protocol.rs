//! Event-order tests of `EventLoop::subprocess_exec` / `subprocess_shell`
//! (asyncio's `SubprocessProtocol` / `SubprocessTransport`), with real
//! children, on both loop kinds and under every watcher. Each case records
//! every callback and checks asyncio's order (CPython's `base_subprocess.py`):
//! `connection_made` first, each pipe's data before its
//! `pipe_connection_lost`, one `process_exited`, and `connection_lost` last,
//! after the exit and every pipe, with nothing after it.
#![cfg(target_os = "linux")]

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::rc::Rc;
use std::sync::{Arc, RwLock};
use std::task::{Poll, Waker};
use std::time::Duration;

use childwatch::{
    ChildWatcher, Command, EventLoop, FastChildWatcher, LoopKind, MultiLoopChildWatcher,
    PidfdChildWatcher, SafeChildWatcher, Stdio, SubprocessProtocol, SubprocessTransport,
    ThreadedChildWatcher, UringChildWatcher, create_subprocess_exec, create_subprocess_shell,
    sleep,
};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Ev {
    Made,
    Data(i32),
    PipeLost(i32, bool),
    Exited(Option<i32>),
    Lost(bool),
}

/// Records every callback; optionally pauses stdout after `pause_every`
/// bytes and resumes it a moment later.
#[derive(Default)]
struct Rec {
    events: Vec<Ev>,
    out: Vec<u8>,
    err: Vec<u8>,
    transport: Option<SubprocessTransport>,
    done: bool,
    waker: Option<Waker>,
    pause_every: Option<usize>,
    since_pause: usize,
    pauses: usize,
}

impl SubprocessProtocol for Rec {
    fn connection_made(&mut self, transport: &SubprocessTransport) {
        assert!(!self.done);
        self.events.push(Ev::Made);
        self.transport = Some(transport.clone());
    }
    fn pipe_data_received(&mut self, fd: i32, data: &[u8]) {
        assert!(!self.done, "data after connection_lost");
        // Consecutive chunks of one pipe are recorded once.
        if self.events.last() != Some(&Ev::Data(fd)) {
            self.events.push(Ev::Data(fd));
        }
        match fd {
            1 => self.out.extend_from_slice(data),
            2 => self.err.extend_from_slice(data),
            _ => panic!("data on fd {fd}"),
        }
        if let (Some(every), 1) = (self.pause_every, fd) {
            self.since_pause += data.len();
            if self.since_pause >= every {
                self.since_pause = 0;
                self.pauses += 1;
                let t = self.transport.clone().unwrap();
                let pipe = t.get_pipe_transport(1).unwrap();
                pipe.pause_reading();
                let lp = childwatch::get_running_loop().unwrap();
                lp.call_later(Duration::from_millis(2), move || pipe.resume_reading());
            }
        }
    }
    fn pipe_connection_lost(&mut self, fd: i32, exc: Option<io::Error>) {
        assert!(!self.done);
        self.events.push(Ev::PipeLost(fd, exc.is_some()));
    }
    fn process_exited(&mut self) {
        assert!(!self.done);
        let rc = self.transport.as_ref().and_then(|t| t.get_returncode());
        self.events.push(Ev::Exited(rc));
    }
    fn connection_lost(&mut self, exc: Option<io::Error>) {
        assert!(!self.done, "connection_lost twice");
        self.events.push(Ev::Lost(exc.is_some()));
        self.done = true;
        self.transport = None;
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}

/// Waits (bounded) for `connection_lost`.
async fn lost(rec: &Rc<RefCell<Rec>>) {
    let wait = poll_fn(|cx| {
        let mut r = rec.borrow_mut();
        if r.done {
            Poll::Ready(())
        } else {
            r.waker = Some(cx.waker().clone());
            Poll::Pending
        }
    });
    let timeout = sleep(Duration::from_secs(30));
    futures_util::pin_mut!(wait);
    futures_util::pin_mut!(timeout);
    if let futures_util::future::Either::Right(_) =
        futures_util::future::select(wait, timeout).await
    {
        panic!("no connection_lost within 30 s: {:?}", rec.borrow().events);
    }
}

fn pos(ev: &[Ev], what: &Ev) -> usize {
    ev.iter()
        .position(|e| e == what)
        .unwrap_or_else(|| panic!("{what:?} missing in {ev:?}"))
}

/// asyncio's order, whatever the case.
fn check_order(ev: &[Ev], pipes: &[i32]) {
    assert_eq!(ev.first(), Some(&Ev::Made), "{ev:?}");
    assert!(matches!(ev.last(), Some(Ev::Lost(_))), "{ev:?}");
    assert_eq!(ev.iter().filter(|e| matches!(e, Ev::Made)).count(), 1);
    assert_eq!(ev.iter().filter(|e| matches!(e, Ev::Exited(_))).count(), 1);
    assert_eq!(ev.iter().filter(|e| matches!(e, Ev::Lost(_))).count(), 1);
    for &fd in pipes {
        let lost_at = ev
            .iter()
            .position(|e| matches!(e, Ev::PipeLost(f, _) if *f == fd))
            .unwrap_or_else(|| panic!("pipe {fd} never lost: {ev:?}"));
        assert!(
            ev[lost_at..].iter().all(|e| *e != Ev::Data(fd)),
            "data on {fd} after its pipe_connection_lost: {ev:?}"
        );
    }
    let n_lost = ev.iter().filter(|e| matches!(e, Ev::PipeLost(..))).count();
    assert_eq!(n_lost, pipes.len(), "{ev:?}");
}

fn exited_rc(ev: &[Ev]) -> Option<i32> {
    ev.iter()
        .find_map(|e| match e {
            Ev::Exited(rc) => Some(*rc),
            _ => None,
        })
        .flatten()
}

type Factory = fn() -> io::Result<Arc<dyn ChildWatcher>>;

struct Ctx {
    lp: EventLoop,
    watcher: Arc<dyn ChildWatcher>,
}

impl Ctx {
    fn cmd(&self, mut c: Command) -> Command {
        c.watcher(Arc::clone(&self.watcher));
        c
    }

    fn sh(&self, script: &str) -> Command {
        let mut c = self.cmd(create_subprocess_shell(script));
        c.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    /// Spawns `c` with a fresh recorder and runs `drive` on the transport;
    /// returns the recorder once `connection_lost` came.
    fn run(
        &self,
        mut c: Command,
        setup: impl FnOnce(&mut Rec),
        drive: impl AsyncFnOnce(&SubprocessTransport),
    ) -> Rc<RefCell<Rec>> {
        let lp = self.lp.clone();
        self.lp
            .run_until_complete(async move {
                let mut rec = Rec::default();
                setup(&mut rec);
                let (t, rec) = lp.subprocess_exec(move || rec, &mut c).await.unwrap();
                drive(&t).await;
                lost(&rec).await;
                drop(t);
                assert_eq!(
                    Rc::strong_count(&rec),
                    1,
                    "the transport drops the protocol after connection_lost"
                );
                rec
            })
            .unwrap()
    }
}

static SERIAL: RwLock<()> = RwLock::new(());

fn run_case(kind: LoopKind, make: Factory, exclusive: bool, case: fn(&Ctx)) {
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
    let cx = Ctx { lp, watcher };
    case(&cx);
    cx.watcher.close();
    cx.lp.close().expect("close the loop");
}

mod cases {
    use super::*;

    /// Output on both pipes, then the exit.
    pub fn output_then_exit(cx: &Ctx) {
        let rec = cx.run(
            cx.sh("echo out; echo err >&2; exit 4"),
            |_| {},
            async |_| {},
        );
        let r = rec.borrow();
        check_order(&r.events, &[1, 2]);
        assert_eq!(r.out, b"out\n");
        assert_eq!(r.err, b"err\n");
        assert_eq!(exited_rc(&r.events), Some(4));
    }

    /// The child exits while a grandchild still writes: `process_exited`
    /// comes first, the late data and end-of-file after it.
    pub fn exit_before_eof(cx: &Ctx) {
        let rec = cx.run(
            cx.sh("(sleep 0.3; echo late) & exit 0"),
            |_| {},
            async |_| {},
        );
        let r = rec.borrow();
        check_order(&r.events, &[1, 2]);
        assert!(pos(&r.events, &Ev::Exited(Some(0))) < pos(&r.events, &Ev::Data(1)));
        assert_eq!(r.out, b"late\n");
    }

    /// Both pipes close before the child exits.
    pub fn eof_before_exit(cx: &Ctx) {
        let rec = cx.run(
            cx.sh("exec >&- 2>&-; sleep 0.3; exit 3"),
            |_| {},
            async |_| {},
        );
        let r = rec.borrow();
        check_order(&r.events, &[1, 2]);
        let exited = pos(&r.events, &Ev::Exited(Some(3)));
        assert!(
            pos(&r.events, &Ev::PipeLost(1, false)) < exited,
            "{:?}",
            r.events
        );
        assert!(
            pos(&r.events, &Ev::PipeLost(2, false)) < exited,
            "{:?}",
            r.events
        );
    }

    /// A grandchild keeps stdout open: `process_exited` arrives at once,
    /// `connection_lost` waits for the pipes; closing the transport ends it.
    pub fn grandchild_holds_pipe(cx: &Ctx) {
        let rec = cx.run(
            cx.sh("sleep 3 & echo started"),
            |_| {},
            async |t| {
                let t = t.clone();
                // Until the exit is seen, nothing else is asked of the transport.
                for _ in 0..3000 {
                    if t.get_returncode().is_some() {
                        break;
                    }
                    sleep(Duration::from_millis(1)).await;
                }
                assert_eq!(t.get_returncode(), Some(0));
                assert!(!t.is_closing());
                t.close();
                assert!(t.is_closing());
            },
        );
        let r = rec.borrow();
        check_order(&r.events, &[1, 2]);
        assert!(pos(&r.events, &Ev::Exited(Some(0))) < pos(&r.events, &Ev::PipeLost(1, false)));
        assert_eq!(r.out, b"started\n");
    }

    /// `kill()` through the transport: -9, then the pipes, then the end.
    pub fn kill(cx: &Ctx) {
        let mut c = cx.cmd(create_subprocess_exec("sleep", ["30"]));
        c.stdout(Stdio::piped());
        let rec = cx.run(c, |_| {}, async |t| t.kill().unwrap());
        let r = rec.borrow();
        check_order(&r.events, &[1]);
        assert_eq!(exited_rc(&r.events), Some(-9));
        assert_eq!(r.events.last(), Some(&Ev::Lost(false)));
    }

    /// `close()` while the child runs kills it (asyncio sends SIGKILL);
    /// `connection_lost` still comes, once.
    pub fn close_while_running(cx: &Ctx) {
        let mut c = cx.cmd(create_subprocess_exec("sleep", ["30"]));
        c.stdin(Stdio::piped()).stdout(Stdio::piped());
        let rec = cx.run(
            c,
            |_| {},
            async |t| {
                t.close();
                t.close(); // twice is fine
                assert!(t.get_pipe_transport(0).unwrap().is_closing());
            },
        );
        let r = rec.borrow();
        check_order(&r.events, &[0, 1]);
        assert_eq!(exited_rc(&r.events), Some(-9));
    }

    /// stdin written in pieces, then `write_eof`: `cat` echoes all of it.
    pub fn stdin_in_pieces_then_eof(cx: &Ctx) {
        let mut c = cx.cmd(create_subprocess_exec("cat", [] as [&str; 0]));
        c.stdin(Stdio::piped()).stdout(Stdio::piped());
        let rec = cx.run(
            c,
            |_| {},
            async |t| {
                let stdin = t.get_pipe_transport(0).unwrap();
                for piece in [&b"a"[..], b"bc", b"", b"def"] {
                    stdin.write(piece).unwrap();
                    sleep(Duration::from_millis(1)).await;
                }
                stdin.write_eof().unwrap();
                assert!(stdin.write(b"late").is_err(), "no write after write_eof");
                let stdout = t.get_pipe_transport(1).unwrap();
                assert_eq!(
                    stdout.write(b"x").unwrap_err().kind(),
                    io::ErrorKind::InvalidInput
                );
                assert!(t.get_pipe_transport(2).is_none() && t.get_pipe_transport(7).is_none());
            },
        );
        let r = rec.borrow();
        check_order(&r.events, &[0, 1]);
        assert_eq!(r.out, b"abcdef");
        assert_eq!(exited_rc(&r.events), Some(0));
    }

    /// 10 MB through `cat`, with stdout paused after every MiB and resumed
    /// a moment later: every byte arrives, in order.
    pub fn ten_megabytes_with_pause_resume(cx: &Ctx) {
        let data: Vec<u8> = (0..10 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        let input = data.clone();
        let mut c = cx.cmd(create_subprocess_exec("cat", [] as [&str; 0]));
        c.stdin(Stdio::piped()).stdout(Stdio::piped());
        let rec = cx.run(
            c,
            |r| r.pause_every = Some(1024 * 1024),
            async move |t| {
                let stdin = t.get_pipe_transport(0).unwrap();
                stdin.write(&input).unwrap();
                assert!(stdin.get_write_buffer_size() > 0);
                stdin.write_eof().unwrap();
            },
        );
        let r = rec.borrow();
        check_order(&r.events, &[0, 1]);
        assert!(r.out == data, "{} bytes of {}", r.out.len(), data.len());
        assert!(r.pauses >= 5, "paused {} times", r.pauses);
    }

    /// The shell form pipes every stream, as asyncio's default.
    pub fn subprocess_shell_pipes_all(cx: &Ctx) {
        let lp = cx.lp.clone();
        // subprocess_shell uses the policy's watcher, so only run it where
        // that is the watcher under test's kind of default.
        let _ = &cx.watcher;
        let r = cx
            .lp
            .run_until_complete(async move {
                let (t, rec) = lp
                    .subprocess_shell(Rec::default, "read x; echo got $x; echo e >&2")
                    .await
                    .unwrap();
                let stdin = t.get_pipe_transport(0).unwrap();
                stdin.write(b"hi\n").unwrap();
                stdin.write_eof().unwrap();
                lost(&rec).await;
                let r = rec.borrow();
                (r.events.clone(), r.out.clone(), r.err.clone())
            })
            .unwrap();
        check_order(&r.0, &[0, 1, 2]);
        assert_eq!(r.1, b"got hi\n");
        assert_eq!(r.2, b"e\n");
    }

    /// Dropping the last transport without `close()` does not kill a running
    /// child (asyncio's transport lives while its child runs): the output
    /// and the exit still arrive, then the transport closes.
    pub fn drop_without_close(cx: &Ctx) {
        let lp = cx.lp.clone();
        let mut c = cx.sh("sleep 0.2; echo hi; exit 6");
        let (events, out) = cx
            .lp
            .run_until_complete(async move {
                /// Forwards to a shared recorder; keeps no transport.
                struct Fwd(Rc<RefCell<Rec>>);
                impl SubprocessProtocol for Fwd {
                    fn pipe_data_received(&mut self, fd: i32, data: &[u8]) {
                        self.0.borrow_mut().pipe_data_received(fd, data);
                    }
                    fn pipe_connection_lost(&mut self, fd: i32, exc: Option<io::Error>) {
                        self.0.borrow_mut().pipe_connection_lost(fd, exc);
                    }
                    fn process_exited(&mut self) {
                        self.0.borrow_mut().events.push(Ev::Exited(None));
                    }
                    fn connection_lost(&mut self, exc: Option<io::Error>) {
                        self.0.borrow_mut().connection_lost(exc);
                    }
                }
                let rec = Rc::new(RefCell::new(Rec::default()));
                let r2 = Rc::clone(&rec);
                let (_, _p) = lp.subprocess_exec(move || Fwd(r2), &mut c).await.unwrap();
                lost(&rec).await;
                let r = rec.borrow();
                (r.events.clone(), r.out.clone())
            })
            .unwrap();
        assert_eq!(out, b"hi\n", "{events:?}");
        assert_eq!(events.iter().filter(|e| **e == Ev::Exited(None)).count(), 1);
        assert_eq!(events.last(), Some(&Ev::Lost(false)), "{events:?}");
    }

    /// A piped stdin nobody closes does not hold `connection_lost` back:
    /// it closes when the child exits (asyncio sees the reader hang up).
    pub fn unclosed_stdin_closes_at_exit(cx: &Ctx) {
        let mut c = cx.sh("echo hi");
        c.stdin(Stdio::piped());
        let rec = cx.run(c, |_| {}, async |_| {});
        let r = rec.borrow();
        check_order(&r.events, &[0, 1, 2]);
        assert_eq!(r.out, b"hi\n");
    }

    /// A protocol borrowed elsewhere across an `.await`: events wait, in
    /// order, and none is lost (nothing overtakes a waiting event).
    #[allow(clippy::await_holding_refcell_ref)] // on purpose: what the transport must survive
    pub fn busy_protocol_keeps_order(cx: &Ctx) {
        let lp = cx.lp.clone();
        let mut c = cx.sh("echo a; sleep 0.1; echo b; sleep 0.1 & exit 0");
        let (events, out) = cx
            .lp
            .run_until_complete(async move {
                let (_t, rec) = lp.subprocess_exec(Rec::default, &mut c).await.unwrap();
                // Hold the protocol through the child's whole life (on
                // purpose: what the transport must survive).
                {
                    let _g = rec.borrow_mut();
                    sleep(Duration::from_millis(400)).await;
                }
                lost(&rec).await;
                let r = rec.borrow();
                (r.events.clone(), r.out.clone())
            })
            .unwrap();
        check_order(&events, &[1, 2]);
        assert_eq!(out, b"a\nb\n", "{events:?}");
        assert_eq!(exited_rc(&events), Some(0));
    }

    /// A panic in a callback is logged; every later event still comes.
    pub fn panicking_callback_goes_on(cx: &Ctx) {
        #[derive(Default)]
        struct Boom(Rec, bool);
        impl SubprocessProtocol for Boom {
            fn connection_made(&mut self, t: &SubprocessTransport) {
                self.0.connection_made(t);
            }
            fn pipe_data_received(&mut self, fd: i32, data: &[u8]) {
                self.0.pipe_data_received(fd, data);
                if !self.1 {
                    self.1 = true;
                    panic!("a protocol bug");
                }
            }
            fn pipe_connection_lost(&mut self, fd: i32, exc: Option<io::Error>) {
                self.0.pipe_connection_lost(fd, exc);
            }
            fn process_exited(&mut self) {
                self.0.process_exited();
                panic!("another protocol bug");
            }
            fn connection_lost(&mut self, exc: Option<io::Error>) {
                self.0.connection_lost(exc);
            }
        }
        let lp = cx.lp.clone();
        let mut c = cx.sh("echo a; sleep 0.05; echo b");
        let (events, out) = cx
            .lp
            .run_until_complete(async move {
                let (_t, p) = lp.subprocess_exec(Boom::default, &mut c).await.unwrap();
                for _ in 0..3000 {
                    if p.borrow().0.done {
                        break;
                    }
                    sleep(Duration::from_millis(10)).await;
                }
                let r = &p.borrow().0;
                (r.events.clone(), r.out.clone())
            })
            .unwrap();
        check_order(&events, &[1, 2]);
        assert_eq!(out, b"a\nb\n");
    }

    /// `subprocess_exec` on a loop that is not running is an error.
    pub fn needs_its_running_loop(cx: &Ctx) {
        let other = EventLoop::selector().unwrap();
        let mut c = cx.cmd(create_subprocess_exec("true", [] as [&str; 0]));
        let err = cx
            .lp
            .run_until_complete(async move {
                other
                    .subprocess_exec(Rec::default, &mut c)
                    .await
                    .map(|_| ())
                    .unwrap_err()
            })
            .unwrap();
        assert_eq!(err.kind(), io::ErrorKind::Other);
    }
}

macro_rules! cases {
    ($make:ident, $excl:expr; $($case:ident),* $(,)?) => {$(
        mod $case {
            #[test]
            fn proactor() {
                crate::run_case(LoopKind::Proactor, super::$make, $excl, crate::cases::$case)
            }
            #[test]
            fn selector() {
                crate::run_case(LoopKind::Selector, super::$make, $excl, crate::cases::$case)
            }
            use super::LoopKind;
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
                output_then_exit, exit_before_eof, eof_before_exit, grandchild_holds_pipe,
                kill, close_while_running, stdin_in_pieces_then_eof,
                ten_megabytes_with_pause_resume, drop_without_close, needs_its_running_loop,
                unclosed_stdin_closes_at_exit, busy_protocol_keeps_order,
                panicking_callback_goes_on,
            );
        }
    )*};
}

matrix! {
    threaded => Ok(Arc::new(ThreadedChildWatcher::new()?)), exclusive: false;
    safe => Ok(Arc::new(SafeChildWatcher::new()?)), exclusive: false;
    fast => Ok(Arc::new(FastChildWatcher::new()?)), exclusive: true;
    multi_loop => Ok(Arc::new(MultiLoopChildWatcher::new()?)), exclusive: false;
    pidfd => Ok(Arc::new(PidfdChildWatcher::new()?)), exclusive: false;
    uring => Ok(Arc::new(UringChildWatcher::new()?)), exclusive: false;
    uring_waitid_only => Ok(Arc::new(UringChildWatcher::new()?.with_fd_budget(0))), exclusive: false;
}

/// The shell form with the policy's default watcher, on both loop kinds.
#[test]
fn subprocess_shell_with_default_watcher() {
    let _r = SERIAL.read().unwrap_or_else(|p| p.into_inner());
    for kind in [LoopKind::Proactor, LoopKind::Selector] {
        let Ok(lp) = EventLoop::new(kind) else {
            continue;
        };
        let cx = Ctx {
            lp,
            watcher: childwatch::get_child_watcher(),
        };
        cases::subprocess_shell_pipes_all(&cx);
        cx.lp.close().unwrap();
    }
}
