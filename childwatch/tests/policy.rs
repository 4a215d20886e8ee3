//! The policy layer: per-thread loops, the default's choice of loop kind,
//! explicit `None`, the process-wide policy, and the child watcher slot.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use childwatch::{
    ChildCallback, ChildWatcher, DefaultEventLoopPolicy, EventLoop, EventLoopPolicy, LoopKind, Pid,
    ProactorEventLoopPolicy, SelectorEventLoopPolicy,
};

/// The process-wide policy is global state: tests touching it run one at a time.
static GLOBAL: Mutex<()> = Mutex::new(());

#[test]
fn each_thread_gets_its_own_loop_created_on_first_use() {
    let policy = Arc::new(SelectorEventLoopPolicy::new());
    let a = policy.get_event_loop().unwrap();
    let b = policy.get_event_loop().unwrap();
    assert_eq!(a, b, "same thread, same loop");
    assert_eq!(a.kind(), LoopKind::Selector);
    let p2 = Arc::clone(&policy);
    let other_is_distinct = std::thread::spawn(move || {
        let lp = p2.get_event_loop().unwrap();
        // A different loop object on another thread: it runs there.
        lp.run_until_complete(async { 1 }).unwrap() == 1
    })
    .join()
    .unwrap();
    assert!(other_is_distinct);
}

#[test]
fn set_none_then_get_is_an_error_until_a_loop_is_set() {
    let policy = SelectorEventLoopPolicy::new();
    policy.set_event_loop(None);
    let e = policy.get_event_loop().unwrap_err();
    assert!(e.to_string().contains("no current event loop"));
    let lp = policy.new_event_loop().unwrap();
    policy.set_event_loop(Some(lp.clone()));
    assert_eq!(policy.get_event_loop().unwrap(), lp);
}

#[test]
fn policies_create_their_kind() {
    assert_eq!(
        SelectorEventLoopPolicy::default()
            .new_event_loop()
            .unwrap()
            .kind(),
        LoopKind::Selector
    );
    assert_eq!(
        ProactorEventLoopPolicy::default()
            .new_event_loop()
            .unwrap()
            .kind(),
        LoopKind::Proactor
    );
    // The default picks the proactor exactly when io_uring works here.
    let expected = if EventLoop::proactor().is_ok() {
        LoopKind::Proactor
    } else {
        LoopKind::Selector
    };
    assert_eq!(
        childwatch::proactor_supported(),
        expected == LoopKind::Proactor
    );
    assert_eq!(
        DefaultEventLoopPolicy::new()
            .new_event_loop()
            .unwrap()
            .kind(),
        expected
    );
}

#[test]
fn module_functions_follow_the_global_policy() {
    let _g = GLOBAL.lock().unwrap_or_else(|p| p.into_inner());
    childwatch::set_event_loop_policy(Some(Arc::new(SelectorEventLoopPolicy::new())));
    assert_eq!(
        childwatch::new_event_loop().unwrap().kind(),
        LoopKind::Selector
    );
    let lp = childwatch::get_event_loop().unwrap();
    assert_eq!(childwatch::get_event_loop().unwrap(), lp);
    // Inside a running loop, get_event_loop returns the running one.
    let other = EventLoop::selector().unwrap();
    let o = other.clone();
    let inside = other
        .run_until_complete(async move { childwatch::get_event_loop().unwrap() == o })
        .unwrap();
    assert!(inside);
    childwatch::set_event_loop_policy(None);
    let fresh = childwatch::get_event_loop().unwrap();
    assert_ne!(fresh, lp, "None restores a fresh default policy");
}

#[derive(Default)]
struct CountingWatcher {
    closed: AtomicUsize,
}

impl ChildWatcher for CountingWatcher {
    fn add_child_handler(&self, _pid: Pid, _cb: ChildCallback) -> std::io::Result<()> {
        Ok(())
    }
    fn remove_child_handler(&self, _pid: Pid) -> bool {
        false
    }
    fn attach_loop(&self, _lp: Option<&EventLoop>) {}
    fn is_active(&self) -> bool {
        self.closed.load(Ordering::SeqCst) == 0
    }
    fn close(&self) {
        self.closed.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn set_child_watcher_closes_the_old_one() {
    let policy = SelectorEventLoopPolicy::new();
    let default = policy.get_child_watcher();
    assert!(
        default.is_active(),
        "the lazily created default watcher is active"
    );
    assert!(Arc::ptr_eq(&default, &policy.get_child_watcher()));
    let a = Arc::new(CountingWatcher::default());
    let b = Arc::new(CountingWatcher::default());
    policy.set_child_watcher(Some(a.clone()));
    assert!(!default.is_active(), "replaced default watcher was closed");
    policy.set_child_watcher(Some(a.clone()));
    assert_eq!(
        a.closed.load(Ordering::SeqCst),
        0,
        "setting the same watcher keeps it"
    );
    policy.set_child_watcher(Some(b.clone()));
    assert_eq!(a.closed.load(Ordering::SeqCst), 1);
    policy.set_child_watcher(None);
    assert_eq!(b.closed.load(Ordering::SeqCst), 1);
}

#[test]
fn a_dropped_policy_releases_the_loops_it_held() {
    let _g = GLOBAL.lock().unwrap_or_else(|p| p.into_inner());
    // Replaced through set_event_loop_policy: this thread's loop closes at
    // once, another thread's at its next use of a policy.
    childwatch::set_event_loop_policy(Some(Arc::new(SelectorEventLoopPolicy::new())));
    let here = childwatch::get_event_loop().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let policy = childwatch::get_event_loop_policy();
    let t = std::thread::spawn(move || {
        let there = policy.get_event_loop().unwrap();
        drop(policy);
        tx.send(()).unwrap();
        go_rx.recv().unwrap();
        assert!(
            !there.is_closed(),
            "released before the thread used a policy"
        );
        let _ = childwatch::get_event_loop_policy().get_event_loop();
        there.is_closed()
    });
    rx.recv().unwrap();
    childwatch::set_event_loop_policy(None);
    assert!(here.is_closed(), "the dropped policy's loop on this thread");
    go_tx.send(()).unwrap();
    assert!(
        t.join().unwrap(),
        "the dropped policy's loop on another thread"
    );
    // 100 policies in a row, each with a loop: none is left open.
    let loops: Vec<EventLoop> = (0..100)
        .map(|_| {
            let p = SelectorEventLoopPolicy::new();
            p.get_event_loop().unwrap()
        })
        .collect();
    assert!(loops.iter().all(EventLoop::is_closed));
    childwatch::set_event_loop_policy(None);
}
