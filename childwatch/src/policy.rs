//! Event-loop policies: which loop a thread gets, and the child watcher.
//!
//! asyncio's policy layer. A policy owns, per thread, the loop that
//! [`get_event_loop`] returns (created on first use), and one process-wide
//! child watcher. Three policies differ only in the loop kind they create:
//!
//! * [`DefaultEventLoopPolicy`] — the proactor where io_uring works (probed
//!   once per process), else the selector;
//! * [`ProactorEventLoopPolicy`] — always the proactor (the analog of
//!   asyncio's `WindowsProactorEventLoopPolicy`);
//! * [`SelectorEventLoopPolicy`] — always the selector.
//!
//! As in asyncio, `set_event_loop` on the main thread attaches the policy's
//! watcher to that loop, and a thread that explicitly set `None` gets an
//! error from `get_event_loop` instead of a fresh loop.
//!
//! The policy owns the loop it holds for a thread (see
//! [`EventLoop`'s docs](crate::EventLoop#closing-and-dropping)): the one
//! `get_event_loop` creates on first use, and the one given to
//! `set_event_loop`, from whichever handle. That loop stays open while it is
//! set; the handles `get_event_loop` returns do not keep it open, so once it
//! is replaced or cleared (and no other owning handle is left) it closes.
//!
//! On Windows the proactor is an I/O completion port loop, which always
//! works, so the default policy *is* asyncio's (3.8+) default there:
//! `WindowsProactorEventLoopPolicy` (an alias of [`ProactorEventLoopPolicy`]
//! exported on Windows), with `WindowsSelectorEventLoopPolicy` (an alias of
//! [`SelectorEventLoopPolicy`]) beside it. The child watcher is then the
//! `WindowsChildWatcher`, and the main thread is the thread named `"main"`
//! (Rust's name for it; Windows has no direct "main thread" query).

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use crate::event_loop::{EventLoop, LoopKind, get_running_loop};
use crate::watcher::{ChildWatcher, default_watcher};

/// asyncio's `AbstractEventLoopPolicy`.
pub trait EventLoopPolicy: Send + Sync {
    /// This thread's loop, created on first use. The policy owns it; the
    /// handle returned does not keep it open.
    fn get_event_loop(&self) -> io::Result<EventLoop>;
    /// Sets (or with `None` clears) this thread's loop. The policy takes
    /// ownership of the loop, from whatever handle it is given, so it stays
    /// open while it is set; a loop replaced or cleared here closes unless
    /// another owning handle is left.
    fn set_event_loop(&self, lp: Option<EventLoop>);
    /// A new loop of this policy's kind (not made current).
    fn new_event_loop(&self) -> io::Result<EventLoop>;
    /// The process-wide child watcher, created lazily (Uring where the kernel
    /// supports it, else Pidfd, else Threaded).
    fn get_child_watcher(&self) -> Arc<dyn ChildWatcher>;
    /// Replaces the child watcher; the old one is closed.
    fn set_child_watcher(&self, w: Option<Arc<dyn ChildWatcher>>);
}

/// Whether the proactor loop works here: io_uring on Linux (probed once per
/// process), the completion port on Windows.
pub fn proactor_supported() -> bool {
    static PROBE: OnceLock<bool> = OnceLock::new();
    *PROBE.get_or_init(|| match EventLoop::proactor() {
        Ok(lp) => {
            let _ = lp.close();
            true
        }
        Err(e) => {
            tracing::info!("io_uring unavailable, the default policy uses the selector loop: {e}");
            false
        }
    })
}

#[derive(Default)]
struct LocalState {
    /// An owning handle: the policy keeps this thread's loop open.
    lp: Option<EventLoop>,
    set_called: bool,
}

thread_local! {
    static LOCAL: RefCell<HashMap<u64, LocalState>> = RefCell::new(HashMap::new());
    /// The value of [`DROPPED_EPOCH`] this thread last purged at.
    static PURGED_AT: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Ids of the policies alive now. A thread's slots whose policy is not
/// among them are garbage (nobody can reach them again); each thread
/// releases its own, with the loops they own, at its next use of any policy
/// or at exit. Only live ids are kept, so the cost of a purge is the number
/// of this thread's slots, however many policies came and went.
static LIVE: Mutex<Option<HashSet<u64>>> = Mutex::new(None);
/// Bumped whenever a policy is dropped, so a thread looks at [`LIVE`] only
/// when something changed.
static DROPPED_EPOCH: AtomicU64 = AtomicU64::new(0);

fn live() -> std::sync::MutexGuard<'static, Option<HashSet<u64>>> {
    LIVE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Releases this thread's slots of dropped policies, and the loops they own
/// (closed with no borrow of the slots held: a task's destructor may call
/// into a policy).
fn purge_dropped_policies() {
    let epoch = DROPPED_EPOCH.load(Ordering::Acquire);
    if PURGED_AT.try_with(|p| p.replace(epoch)).unwrap_or(epoch) == epoch {
        return;
    }
    let released: Vec<LocalState> = LOCAL
        .try_with(|l| {
            let mut l = l.borrow_mut();
            let live = live();
            let dead: Vec<u64> = l
                .keys()
                .filter(|id| !live.as_ref().is_some_and(|s| s.contains(id)))
                .copied()
                .collect();
            drop(live);
            dead.iter().filter_map(|id| l.remove(id)).collect()
        })
        .unwrap_or_default();
    drop(released);
}

/// Whether the calling thread is the process's main thread.
fn is_main_thread() -> bool {
    #[cfg(target_os = "linux")]
    {
        rustix::thread::gettid() == rustix::process::getpid()
    }
    #[cfg(not(target_os = "linux"))]
    {
        std::thread::current().name() == Some("main")
    }
}

/// What the three policies share; they differ in `kind`.
struct PolicyCore {
    id: u64,
    kind: Option<LoopKind>,
    watcher: Mutex<Option<Arc<dyn ChildWatcher>>>,
}

impl Drop for PolicyCore {
    /// Marks this policy's per-thread slots as garbage (its id leaves
    /// [`LIVE`]), and releases the calling thread's one now (other threads
    /// release theirs lazily).
    fn drop(&mut self) {
        if let Some(ids) = live().as_mut() {
            ids.remove(&self.id);
        }
        DROPPED_EPOCH.fetch_add(1, Ordering::AcqRel);
        purge_dropped_policies();
    }
}

impl PolicyCore {
    fn new(kind: Option<LoopKind>) -> PolicyCore {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        live().get_or_insert_with(HashSet::new).insert(id);
        PolicyCore {
            id,
            kind,
            watcher: Mutex::new(None),
        }
    }

    fn kind(&self) -> LoopKind {
        self.kind.unwrap_or_else(|| {
            if proactor_supported() {
                LoopKind::Proactor
            } else {
                LoopKind::Selector
            }
        })
    }

    fn get_event_loop(&self) -> io::Result<EventLoop> {
        purge_dropped_policies();
        // At thread exit the slots are dropped, and with them the loops they
        // own: a destructor of one of their tasks that asks for the thread's
        // loop gets an error, not a panic in a destructor.
        let existing = LOCAL
            .try_with(|l| {
                let l = l.borrow();
                l.get(&self.id).map(|s| (s.lp.clone(), s.set_called))
            })
            .map_err(|_| {
                io::Error::other(
                    "this thread is exiting and its event loop is gone; there is no current \
                     event loop",
                )
            })?;
        match existing {
            Some((Some(lp), _)) => Ok(lp),
            Some((None, true)) => Err(io::Error::other(
                "there is no current event loop in this thread (set_event_loop(None) was \
                 called); call set_event_loop(Some(new_event_loop()?)) first",
            )),
            _ => {
                // The policy owns the loop it creates; the caller gets a
                // handle like the ones later calls return.
                let lp = self.new_event_loop()?;
                let handle = lp.clone();
                self.set_event_loop(Some(lp));
                Ok(handle)
            }
        }
    }

    fn set_event_loop(&self, lp: Option<EventLoop>) {
        purge_dropped_policies();
        // The slot owns the thread's loop, whatever handle it came from (a
        // clone does not keep a loop open): it stays open while it is set.
        let lp = lp.map(|l| if l.is_owning() { l } else { l.owning_handle() });
        let current = lp.as_ref().map(EventLoop::non_owning);
        let mut new = Some(lp);
        let old = LOCAL
            .try_with(|l| {
                let mut l = l.borrow_mut();
                let st = l.entry(self.id).or_default();
                st.set_called = true;
                std::mem::replace(&mut st.lp, new.take().flatten())
            })
            .unwrap_or_else(|_| {
                tracing::warn!("set_event_loop while this thread exits: there is no slot left");
                None
            });
        if is_main_thread() {
            let w = self.lock_watcher().clone();
            if let Some(w) = w {
                w.attach_loop(current.as_ref());
            }
        }
        // A replaced loop no other handle owns closes here, with no borrow of
        // the slots held: its tasks' destructors may call into the policy.
        drop(old);
        drop(new);
    }

    fn new_event_loop(&self) -> io::Result<EventLoop> {
        EventLoop::new(self.kind())
    }

    fn lock_watcher(&self) -> std::sync::MutexGuard<'_, Option<Arc<dyn ChildWatcher>>> {
        self.watcher.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get_child_watcher(&self) -> Arc<dyn ChildWatcher> {
        let mut slot = self.lock_watcher();
        if let Some(w) = slot.as_ref() {
            return Arc::clone(w);
        }
        let w = default_watcher();
        if is_main_thread() {
            let lp = get_running_loop().or_else(|| {
                LOCAL
                    .try_with(|l| l.borrow().get(&self.id).and_then(|s| s.lp.clone()))
                    .ok()
                    .flatten()
            });
            if let Some(lp) = lp {
                w.attach_loop(Some(&lp));
            }
        }
        *slot = Some(Arc::clone(&w));
        w
    }

    fn set_child_watcher(&self, w: Option<Arc<dyn ChildWatcher>>) {
        let old = std::mem::replace(&mut *self.lock_watcher(), w.clone());
        if let Some(old) = old {
            let same = w.as_ref().is_some_and(|n| Arc::ptr_eq(n, &old));
            if !same {
                old.close();
            }
        }
    }
}

macro_rules! policy {
    ($(#[$doc:meta])* $name:ident, $kind:expr) => {
        $(#[$doc])*
        pub struct $name {
            core: PolicyCore,
        }

        impl $name {
            /// A new policy with no loops and no watcher yet.
            pub fn new() -> $name {
                $name { core: PolicyCore::new($kind) }
            }
        }

        impl Default for $name {
            fn default() -> $name {
                $name::new()
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct(stringify!($name))
                    .field("kind", &self.core.kind())
                    .finish()
            }
        }

        impl EventLoopPolicy for $name {
            fn get_event_loop(&self) -> io::Result<EventLoop> {
                self.core.get_event_loop()
            }
            fn set_event_loop(&self, lp: Option<EventLoop>) {
                self.core.set_event_loop(lp)
            }
            fn new_event_loop(&self) -> io::Result<EventLoop> {
                self.core.new_event_loop()
            }
            fn get_child_watcher(&self) -> Arc<dyn ChildWatcher> {
                self.core.get_child_watcher()
            }
            fn set_child_watcher(&self, w: Option<Arc<dyn ChildWatcher>>) {
                self.core.set_child_watcher(w)
            }
        }
    };
}

policy!(
    /// The proactor where io_uring works (probed once), else the selector.
    DefaultEventLoopPolicy,
    None
);
policy!(
    /// Always the proactor loop: io_uring on Linux (`new_event_loop` errors
    /// with `Unsupported` where io_uring is unavailable), the I/O completion
    /// port on Windows, where it is asyncio's `WindowsProactorEventLoopPolicy`.
    ProactorEventLoopPolicy,
    Some(LoopKind::Proactor)
);
policy!(
    /// Always the selector loop (epoll on Linux; on Windows `polling`'s
    /// socket readiness, asyncio's `WindowsSelectorEventLoopPolicy`).
    SelectorEventLoopPolicy,
    Some(LoopKind::Selector)
);

/// asyncio's `WindowsProactorEventLoopPolicy` (the default on Windows since
/// Python 3.8): loops on I/O completion ports. The same type as
/// [`ProactorEventLoopPolicy`]; [`DefaultEventLoopPolicy`] creates the same
/// loops on Windows.
#[cfg(windows)]
pub type WindowsProactorEventLoopPolicy = ProactorEventLoopPolicy;

/// asyncio's `WindowsSelectorEventLoopPolicy`: readiness-based loops (no
/// subprocesses). The same type as [`SelectorEventLoopPolicy`].
#[cfg(windows)]
pub type WindowsSelectorEventLoopPolicy = SelectorEventLoopPolicy;

static POLICY: RwLock<Option<Arc<dyn EventLoopPolicy>>> = RwLock::new(None);

/// The process's current policy (a [`DefaultEventLoopPolicy`] until one is set).
pub fn get_event_loop_policy() -> Arc<dyn EventLoopPolicy> {
    if let Some(p) = POLICY.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
        return Arc::clone(p);
    }
    let mut w = POLICY.write().unwrap_or_else(|p| p.into_inner());
    Arc::clone(w.get_or_insert_with(|| Arc::new(DefaultEventLoopPolicy::new())))
}

/// Sets the process's policy; `None` restores a fresh default policy.
///
/// A policy that is dropped this way (the last `Arc` to it gone) releases
/// the loops it held: this thread's at once, other threads' at their next
/// use of a policy or at their exit.
pub fn set_event_loop_policy(p: Option<Arc<dyn EventLoopPolicy>>) {
    let old = std::mem::replace(&mut *POLICY.write().unwrap_or_else(|p| p.into_inner()), p);
    // Dropped with the lock released: its loops' tasks may ask for a policy.
    drop(old);
}

/// The running loop if there is one, else the policy's loop for this thread.
pub fn get_event_loop() -> io::Result<EventLoop> {
    match get_running_loop() {
        Some(lp) => Ok(lp),
        None => get_event_loop_policy().get_event_loop(),
    }
}

/// Sets this thread's loop in the current policy.
pub fn set_event_loop(lp: Option<EventLoop>) {
    get_event_loop_policy().set_event_loop(lp)
}

/// A new loop from the current policy.
pub fn new_event_loop() -> io::Result<EventLoop> {
    get_event_loop_policy().new_event_loop()
}

/// The current policy's child watcher.
pub fn get_child_watcher() -> Arc<dyn ChildWatcher> {
    get_event_loop_policy().get_child_watcher()
}

/// Sets the current policy's child watcher (closing the old one).
pub fn set_child_watcher(w: Option<Arc<dyn ChildWatcher>>) {
    get_event_loop_policy().set_child_watcher(w)
}
