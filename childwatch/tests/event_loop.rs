//! The event-loop suite, run on both loop kinds: callback and timer order,
//! cancellation, stop/restart, tasks, cross-thread calls and wake-ups,
//! signals, and every misuse the API must refuse without panicking.
//!
//! The same suite runs on Windows (under wine in CI): there the proactor is
//! the completion-port loop, and signal handlers are refused as unsupported.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use childwatch::{EventLoop, LoopKind, get_running_loop, sleep};

/// Signal tests share the process's signal dispositions: one at a time.
#[cfg(unix)]
static SIGNALS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn new_loop(kind: LoopKind) -> EventLoop {
    EventLoop::new(kind).unwrap_or_else(|e| panic!("cannot create a {kind} loop: {e}"))
}

fn stop_soon(lp: &EventLoop) {
    let l = lp.clone();
    lp.call_soon(move || l.stop());
}

fn callbacks_run_fifo(kind: LoopKind) {
    let lp = new_loop(kind);
    let log = Rc::new(RefCell::new(Vec::new()));
    for i in 0..100 {
        let l = Rc::clone(&log);
        lp.call_soon(move || l.borrow_mut().push(i));
    }
    stop_soon(&lp);
    lp.run_forever().unwrap();
    assert_eq!(*log.borrow(), (0..100).collect::<Vec<_>>());
}

fn callbacks_scheduled_by_callbacks_run_next_iteration(kind: LoopKind) {
    let lp = new_loop(kind);
    let log = Rc::new(RefCell::new(Vec::new()));
    let (l1, lp1) = (Rc::clone(&log), lp.clone());
    lp.call_soon(move || {
        l1.borrow_mut().push("a");
        let l = Rc::clone(&l1);
        lp1.call_soon(move || l.borrow_mut().push("c"));
    });
    let l2 = Rc::clone(&log);
    lp.call_soon(move || l2.borrow_mut().push("b"));
    // stop() inside the first iteration: "c" was scheduled during it and
    // must not run before the loop returns.
    stop_soon(&lp);
    lp.run_forever().unwrap();
    assert_eq!(*log.borrow(), vec!["a", "b"]);
    stop_soon(&lp);
    lp.run_forever().unwrap();
    assert_eq!(*log.borrow(), vec!["a", "b", "c"]);
}

fn timers_run_in_deadline_then_insertion_order(kind: LoopKind) {
    let lp = new_loop(kind);
    let log = Rc::new(RefCell::new(Vec::new()));
    let base = lp.time() + Duration::from_millis(20);
    let plan = [(30, "d"), (10, "b"), (0, "a"), (10, "c"), (30, "e")];
    for (ms, tag) in plan {
        let l = Rc::clone(&log);
        lp.call_at(base + Duration::from_millis(ms), move || {
            l.borrow_mut().push(tag)
        });
    }
    let l = lp.clone();
    lp.call_at(base + Duration::from_millis(40), move || l.stop());
    let start = Instant::now();
    lp.run_forever().unwrap();
    assert!(start.elapsed() >= Duration::from_millis(55));
    assert_eq!(*log.borrow(), vec!["a", "b", "c", "d", "e"]);
}

fn cancelled_timers_and_callbacks_never_run(kind: LoopKind) {
    let lp = new_loop(kind);
    let ran = Rc::new(Cell::new(0));
    let mut handles = Vec::new();
    for i in 0..1000u64 {
        let r = Rc::clone(&ran);
        handles.push(lp.call_later(Duration::from_micros(i), move || r.set(r.get() + 1)));
    }
    let r = Rc::clone(&ran);
    let h = lp.call_soon(move || r.set(r.get() + 1000));
    h.cancel();
    assert!(h.cancelled());
    for h in handles.iter().step_by(2) {
        h.cancel();
    }
    let l = lp.clone();
    lp.call_later(Duration::from_millis(10), move || l.stop());
    lp.run_forever().unwrap();
    assert_eq!(ran.get(), 500);
}

fn stop_and_restart(kind: LoopKind) {
    let lp = new_loop(kind);
    let n = Rc::new(Cell::new(0));
    for _ in 0..3 {
        let (n2, l) = (Rc::clone(&n), lp.clone());
        lp.call_soon(move || {
            n2.set(n2.get() + 1);
            l.stop();
        });
        lp.run_forever().unwrap();
        assert!(!lp.is_running());
    }
    assert_eq!(n.get(), 3);
    // stop() before run_forever(): one iteration, then return.
    lp.stop();
    let n2 = Rc::clone(&n);
    lp.call_soon(move || n2.set(n2.get() + 10));
    lp.run_forever().unwrap();
    assert_eq!(n.get(), 13);
}

fn run_until_complete_with_borrowed_future(kind: LoopKind) {
    let lp = new_loop(kind);
    let mut local = vec![1, 2, 3];
    let borrowed = &mut local;
    let out = lp
        .run_until_complete(async {
            sleep(Duration::from_millis(2)).await;
            borrowed.push(4);
            borrowed.len()
        })
        .unwrap();
    assert_eq!(out, 4);
    assert_eq!(local, vec![1, 2, 3, 4]);
}

fn tasks_await_timers_and_each_other(kind: LoopKind) {
    let lp = new_loop(kind);
    let lp2 = lp.clone();
    let order = Rc::new(RefCell::new(Vec::new()));
    let o = Rc::clone(&order);
    let total = lp
        .run_until_complete(async move {
            let mut tasks = Vec::new();
            for i in (0..5u64).rev() {
                let o = Rc::clone(&o);
                tasks.push(lp2.create_task(async move {
                    sleep(Duration::from_millis(3 * i)).await;
                    o.borrow_mut().push(i);
                    i * 10
                }));
            }
            let mut sum = 0;
            for t in tasks {
                sum += t.await;
            }
            sum
        })
        .unwrap();
    assert_eq!(total, 100);
    assert_eq!(*order.borrow(), vec![0, 1, 2, 3, 4]);
}

fn dropping_a_task_cancels_it(kind: LoopKind) {
    let lp = new_loop(kind);
    let ran = Rc::new(Cell::new(false));
    let r = Rc::clone(&ran);
    let t = lp.create_task(async move {
        sleep(Duration::from_millis(5)).await;
        r.set(true);
    });
    drop(t);
    lp.run_until_complete(sleep(Duration::from_millis(20)))
        .unwrap();
    assert!(!ran.get());
    let r = Rc::clone(&ran);
    lp.create_task(async move { r.set(true) }).detach();
    lp.run_until_complete(sleep(Duration::from_millis(1)))
        .unwrap();
    assert!(ran.get());
}

fn call_soon_threadsafe_from_8_threads_loses_nothing(kind: LoopKind) {
    const THREADS: usize = 8;
    const CALLS: usize = 10_000;
    let lp = new_loop(kind);
    let count = Arc::new(AtomicUsize::new(0));
    let handle = lp.handle();
    let barrier = Arc::new(Barrier::new(THREADS));
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            let (h, c, b) = (handle.clone(), Arc::clone(&count), Arc::clone(&barrier));
            std::thread::spawn(move || {
                b.wait();
                for _ in 0..CALLS {
                    let c = Arc::clone(&c);
                    h.call_soon_threadsafe(move || {
                        c.fetch_add(1, Ordering::Relaxed);
                    })
                    .unwrap();
                }
            })
        })
        .collect();
    let c = Arc::clone(&count);
    lp.run_until_complete(async move {
        while c.load(Ordering::Relaxed) < THREADS * CALLS {
            sleep(Duration::from_millis(1)).await;
        }
    })
    .unwrap();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(count.load(Ordering::SeqCst), THREADS * CALLS);
}

fn sleeping_loop_wakes_for_another_thread(kind: LoopKind) {
    let lp = new_loop(kind);
    let h = lp.handle();
    let got = Rc::new(Cell::new(false));
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        h.stop();
    });
    // No timers, no IO: without a wake-up this would sleep forever.
    let start = Instant::now();
    lp.run_forever().unwrap();
    assert!(start.elapsed() >= Duration::from_millis(40));
    t.join().unwrap();

    // A cross-thread waker (channel-like) wakes a task.
    let (tx, rx) = std::sync::mpsc::channel::<std::task::Waker>();
    let flag = Arc::new(AtomicUsize::new(0));
    let f2 = Arc::clone(&flag);
    let t = std::thread::spawn(move || {
        let w = rx.recv().unwrap();
        std::thread::sleep(Duration::from_millis(30));
        f2.store(1, Ordering::SeqCst);
        w.wake();
    });
    let g = Rc::clone(&got);
    lp.run_until_complete(std::future::poll_fn(move |cx| {
        if flag.load(Ordering::SeqCst) == 1 {
            g.set(true);
            return std::task::Poll::Ready(());
        }
        let _ = tx.send(cx.waker().clone());
        std::task::Poll::Pending
    }))
    .unwrap();
    t.join().unwrap();
    assert!(got.get());
}

/// A signal number for calls that must fail before looking at it.
#[cfg(unix)]
const SOME_SIGNAL: i32 = libc::SIGUSR2;
#[cfg(windows)]
const SOME_SIGNAL: i32 = 2; // SIGINT

#[cfg(unix)]
fn signal_handler_runs_on_the_loop(kind: LoopKind) {
    let _g = SIGNALS.lock().unwrap_or_else(|p| p.into_inner());
    let lp = new_loop(kind);
    let hits = Rc::new(Cell::new(0));
    let h = Rc::clone(&hits);
    let l = lp.clone();
    lp.add_signal_handler(libc::SIGUSR1, move || {
        h.set(h.get() + 1);
        l.stop();
    })
    .unwrap();
    let me = std::thread::current().id();
    let on_loop_thread = Rc::new(Cell::new(false));
    let o = Rc::clone(&on_loop_thread);
    lp.call_soon(move || o.set(std::thread::current().id() == me));
    let t = std::thread::spawn(|| {
        std::thread::sleep(Duration::from_millis(20));
        // SAFETY: raising a signal in our own process.
        unsafe { libc::kill(libc::getpid(), libc::SIGUSR1) };
    });
    lp.run_forever().unwrap();
    t.join().unwrap();
    assert_eq!(hits.get(), 1);
    assert!(on_loop_thread.get());
    assert!(lp.remove_signal_handler(libc::SIGUSR1));
    assert!(!lp.remove_signal_handler(libc::SIGUSR1));
}

#[cfg(unix)]
fn bad_signals_are_refused(kind: LoopKind) {
    let lp = new_loop(kind);
    for sig in [0, -1, 65, libc::SIGKILL, libc::SIGSTOP, libc::SIGSEGV] {
        let e = lp.add_signal_handler(sig, || {}).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "signal {sig}");
    }
}

/// asyncio raises NotImplementedError for signal handlers on Windows.
#[cfg(windows)]
fn signal_handlers_are_unsupported(kind: LoopKind) {
    let lp = new_loop(kind);
    for sig in [2, 15, 0, 99] {
        let e = lp.add_signal_handler(sig, || {}).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::Unsupported, "signal {sig}");
        assert!(!lp.remove_signal_handler(sig));
    }
}

fn misuse_is_an_error_not_a_panic(kind: LoopKind) {
    let lp = new_loop(kind);
    // run_until_complete and run_forever inside a running loop.
    let l = lp.clone();
    let nested = lp
        .run_until_complete(async move {
            let a = l.run_until_complete(async {}).map(|_| ());
            let b = l.run_forever();
            let c = l.close();
            (a, b, c)
        })
        .unwrap();
    assert!(
        nested
            .0
            .unwrap_err()
            .to_string()
            .contains("already running")
    );
    assert!(nested.1.is_err());
    assert!(nested.2.unwrap_err().to_string().contains("running"));
    // Another loop cannot run while this one runs on the same thread.
    let other = new_loop(kind);
    let o = other.clone();
    let e = lp
        .run_until_complete(async move { o.run_until_complete(async {}).map(|_| ()) })
        .unwrap()
        .unwrap_err();
    assert!(e.to_string().contains("another loop"));
    // Stopping before the future completes is an error.
    let l = lp.clone();
    let e = lp
        .run_until_complete(async move {
            l.stop();
            sleep(Duration::from_secs(5)).await;
        })
        .unwrap_err();
    assert!(e.to_string().contains("stopped before"));
    // Closed loop.
    let h = lp.handle();
    lp.close().unwrap();
    lp.close().unwrap();
    assert!(lp.is_closed() && h.is_closed());
    assert!(lp.run_until_complete(async {}).is_err());
    assert!(lp.run_forever().is_err());
    assert!(h.call_soon_threadsafe(|| {}).is_err());
    assert!(lp.add_signal_handler(SOME_SIGNAL, || {}).is_err());
}

fn a_panicking_callback_does_not_wedge_the_loop(kind: LoopKind) {
    let lp = new_loop(kind);
    let after = Rc::new(Cell::new(false));
    lp.call_soon(|| panic!("boom in a callback"));
    let a = Rc::clone(&after);
    lp.call_soon(move || a.set(true));
    stop_soon(&lp);
    lp.run_forever().unwrap();
    assert!(after.get());
    // A panicking task: reported, the loop goes on, awaiting re-raises.
    let t = lp.create_task(async { panic!("boom in a task") });
    lp.run_until_complete(sleep(Duration::from_millis(1)))
        .unwrap();
    let joined =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| lp.run_until_complete(t)));
    assert!(joined.is_err());
    assert!(!lp.is_running(), "the loop was left consistent");
    assert_eq!(lp.run_until_complete(async { 5 }).unwrap(), 5);
}

fn running_loop_is_visible_only_while_running(kind: LoopKind) {
    let lp = new_loop(kind);
    assert!(get_running_loop().is_none());
    let l = lp.clone();
    let seen = lp
        .run_until_complete(async move { get_running_loop() == Some(l) })
        .unwrap();
    assert!(seen);
    assert!(get_running_loop().is_none());
}

fn loop_thread_affinity(kind: LoopKind) {
    let lp = new_loop(kind);
    assert_eq!(lp.kind(), kind);
    // A loop dropped without close releases everything (no leak, no panic);
    // a loop used from another thread is impossible (EventLoop is !Send),
    // so check the handle is Send + Sync.
    fn assert_send_sync<T: Send + Sync>(_: &T) {}
    assert_send_sync(&lp.handle());
    drop(lp);
}

fn work_queued_from_the_loop_thread_while_idle_is_not_slept_on(kind: LoopKind) {
    let lp = new_loop(kind);
    // call_soon_threadsafe from the loop's own thread, loop not running.
    let ran = Arc::new(AtomicUsize::new(0));
    let (r, l) = (Arc::clone(&ran), lp.handle());
    lp.handle()
        .call_soon_threadsafe(move || {
            r.fetch_add(1, Ordering::SeqCst);
            l.stop();
        })
        .unwrap();
    lp.run_forever().unwrap();
    assert_eq!(ran.load(Ordering::SeqCst), 1);
    // A task woken from the loop's thread between two runs.
    let waker: Rc<RefCell<Option<std::task::Waker>>> = Rc::new(RefCell::new(None));
    let done = Rc::new(Cell::new(false));
    let (w, d) = (Rc::clone(&waker), Rc::clone(&done));
    let t = lp.create_task(std::future::poll_fn(move |cx| {
        if w.borrow().is_some() {
            d.set(true);
            return std::task::Poll::Ready(());
        }
        *w.borrow_mut() = Some(cx.waker().clone());
        std::task::Poll::Pending
    }));
    lp.run_until_complete(sleep(Duration::from_millis(1)))
        .unwrap();
    assert!(!done.get());
    let w = waker.borrow().clone().unwrap();
    w.wake();
    // run_forever starts with nothing ready and no timer: it returns only if
    // it sees the queued runnable instead of sleeping. A watchdog turns a
    // hang into a failure.
    let l = lp.clone();
    lp.create_task(async move {
        t.await;
        l.stop();
    })
    .detach();
    let h = lp.handle();
    let watchdog = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(5));
        h.stop();
    });
    let start = Instant::now();
    lp.run_forever().unwrap();
    assert!(done.get());
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "the loop slept on queued work"
    );
    drop(watchdog);
}

macro_rules! both_kinds {
    ($($(#[$m:meta])* $name:ident),* $(,)?) => {
        mod proactor {
            $($(#[$m])* #[test] fn $name() { super::$name(childwatch::LoopKind::Proactor) })*
        }
        mod selector {
            $($(#[$m])* #[test] fn $name() { super::$name(childwatch::LoopKind::Selector) })*
        }
    };
}

both_kinds!(
    callbacks_run_fifo,
    callbacks_scheduled_by_callbacks_run_next_iteration,
    timers_run_in_deadline_then_insertion_order,
    cancelled_timers_and_callbacks_never_run,
    stop_and_restart,
    run_until_complete_with_borrowed_future,
    tasks_await_timers_and_each_other,
    dropping_a_task_cancels_it,
    call_soon_threadsafe_from_8_threads_loses_nothing,
    sleeping_loop_wakes_for_another_thread,
    #[cfg(unix)]
    signal_handler_runs_on_the_loop,
    #[cfg(unix)]
    bad_signals_are_refused,
    #[cfg(windows)]
    signal_handlers_are_unsupported,
    misuse_is_an_error_not_a_panic,
    a_panicking_callback_does_not_wedge_the_loop,
    running_loop_is_visible_only_while_running,
    loop_thread_affinity,
    work_queued_from_the_loop_thread_while_idle_is_not_slept_on,
);
