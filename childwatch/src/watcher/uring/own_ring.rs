//! The own-ring driver: an io_uring the watcher owns, for children
//! registered with no proactor loop running (a selector loop, no loop) or
//! handed over by a closing proactor loop.
//!
//! How: each child has one operation on the ring (a `POLL_ADD` on its
//! pidfd, or a per-pid `WAITID(WNOWAIT)`); whoever harvests the ring runs
//! the state machine for each completion (outside the ring's lock, since
//! the reap delivers) and applies its step. Harvesters: a task on each
//! selector loop that registered a child here (waiting for the ring's
//! descriptor to turn readable: no thread), else one reaper thread that
//! sleeps in `poll(2)` and ends when nothing is in flight. Cost: one ring
//! (plus its eventfd: two descriptors, made on first need); a per-pid `WAITID` is
//! O(pending) kernel work per exit.
//!
//! When no harvester is left and no reaper thread can start, the ring's
//! children move to waiter threads (then the overflow poller), and the ring
//! is also harvested at every registration: a child is never dropped.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::event::{EventfdFlags, PollFd, PollFlags, Timespec, eventfd};

use super::harvester;
use super::loop_ring::Token;
use super::machine::{Arm, Machine, Step};
use super::{Counted, How, Inner, Pidfd, Reap, Watch};
use crate::event_loop::ring::{Plain, PlainRing};
use crate::event_loop::{EventLoop, LoopHandle};
use crate::watcher::child::ChildHandle;

/// `user_data` of the no-op that wakes the reaper thread.
const WAKE_TAG: u64 = u64::MAX;
/// `user_data` of cancellation requests; their completions are ignored.
const CANCEL_TAG: u64 = u64::MAX - 1;
/// Submission queue entries (operations in flight are not limited by it).
const SQ_ENTRIES: u32 = 256;
/// Completion queue entries; the kernel buffers beyond it.
const CQ_ENTRIES: u32 = 8192;
/// How long `close()` waits for its cancelled operations to complete.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// What an operation holds while the kernel works on it.
enum Kind {
    Poll(Pidfd),
    /// Counted in `waitids_pending` while in flight.
    Wait(#[allow(dead_code)] Counted),
    /// Cancelled: its pidfd and count are released already.
    Gone,
}

pub(super) struct OwnOp {
    child: ChildHandle,
    machine: Machine,
    kind: Kind,
    cancelled: bool,
}

pub(super) struct Core {
    /// Takes only pointer-free operations (the ring core's `Plain`), so the
    /// watcher keeps no buffer alive for the kernel.
    ring: PlainRing,
    pub(super) ops: HashMap<u64, OwnOp>,
    /// Harvesting tasks alive on selector loops.
    pub(super) harvesters: Vec<(LoopHandle, Arc<Token>)>,
    /// A reaper thread is running.
    reaper: bool,
    /// Host drivers alive: a host loop harvests, so no reaper is needed.
    pub(super) hosts: usize,
    threads: Vec<JoinHandle<()>>,
    pub(super) closing: bool,
    /// The selector loops that harvest this ring and have a flush queued as
    /// a callback: registrations made on such a loop in one iteration reach
    /// the kernel in one `io_uring_enter`. Per loop: a flush queued on an
    /// idle loop must not hold back another loop's registrations.
    flush_queued: Vec<LoopHandle>,
}

/// The watcher's own io_uring, shared by whoever harvests it.
pub(super) struct OwnRing {
    /// An eventfd the ring signals at each completion: waited on without
    /// the ring's lock.
    pub(super) efd: OwnedFd,
    core: Mutex<Core>,
}

impl OwnRing {
    fn new() -> io::Result<OwnRing> {
        let ring = PlainRing::new(SQ_ENTRIES, CQ_ENTRIES).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot create the watcher's io_uring: {e}"),
            )
        })?;
        let efd = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        ring.register_eventfd(efd.as_raw_fd())?;
        Ok(OwnRing {
            efd,
            core: Mutex::new(Core {
                ring,
                ops: HashMap::new(),
                harvesters: Vec::new(),
                reaper: false,
                hosts: 0,
                threads: Vec::new(),
                closing: false,
                flush_queued: Vec::new(),
            }),
        })
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Core> {
        // No callback runs under this lock; its data stays consistent.
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits (bounded) for the ring's descriptor to turn readable.
    fn wait(&self, timeout: Option<Duration>) {
        let mut fds = [PollFd::new(&self.efd, PollFlags::IN)];
        let ts = timeout.map(|t| Timespec {
            tv_sec: t.as_secs() as _,
            tv_nsec: t.subsec_nanos() as _,
        });
        let _ = rustix::event::poll(&mut fds, ts.as_ref());
    }

    /// Resets the eventfd (before the completion queue is drained, so a
    /// later completion signals it again).
    fn reset(&self) {
        let mut buf = [0u8; 8];
        let _ = rustix::io::read(&self.efd, &mut buf);
    }

    /// Cancels operation `id` (remove_child_handler).
    pub(super) fn cancel(&self, id: u64) {
        let mut core = self.lock();
        core.cancel(id);
        core.flush();
    }
}

impl Core {
    /// Queues `op` tagged `tag` (handed to the kernel at the next flush, or
    /// at once if the submission queue is full).
    fn push(&mut self, op: Plain, tag: u64) {
        self.ring.push(op, tag);
    }

    /// Hands queued entries to the kernel.
    pub(super) fn flush(&mut self) {
        if let Err(e) = self.ring.flush() {
            if !matches!(
                e.raw_os_error(),
                Some(libc::EBUSY | libc::EAGAIN | libc::EINTR)
            ) {
                tracing::error!("io_uring submit failed in the child watcher: {e}");
            }
        }
    }

    /// Queues the operation `op` under `id`.
    fn start(&mut self, id: u64, op: OwnOp) {
        let entry = match &op.kind {
            // Readable once the child exited.
            Kind::Poll(fd) => Plain::PollAdd {
                fd: fd.raw(),
                events: libc::POLLIN as u32,
            },
            Kind::Wait(_) => Plain::WaitIdPid {
                pid: op.child.pid(),
            },
            Kind::Gone => return,
        };
        self.ops.insert(id, op);
        self.push(entry, id);
    }

    /// Cancels operation `id`, releasing its pidfd at once (the kernel
    /// holds its own reference to the file).
    fn cancel(&mut self, id: u64) {
        let Some(op) = self.ops.get_mut(&id) else {
            return;
        };
        if op.cancelled {
            return;
        }
        op.cancelled = true;
        op.kind = Kind::Gone;
        self.push(Plain::Cancel { user_data: id }, CANCEL_TAG);
    }

    /// Cancels every operation; returns their children.
    pub(super) fn cancel_all(&mut self) -> Vec<ChildHandle> {
        let ids: Vec<u64> = self.ops.keys().copied().collect();
        let mut children = Vec::new();
        for id in ids {
            if let Some(op) = self.ops.get(&id).filter(|op| !op.cancelled) {
                children.push(op.child.clone());
            }
            self.cancel(id);
        }
        children
    }

    pub(super) fn unharvested(&self) -> bool {
        !self.ops.is_empty()
            && self.harvesters.is_empty()
            && self.hosts == 0
            && !self.reaper
            && !self.closing
    }
}

/// The watcher's own ring, created on first need.
pub(super) fn get_or_create(inner: &Arc<Inner>) -> io::Result<Arc<OwnRing>> {
    let mut st = inner.state();
    if inner.is_closed() {
        return Err(Inner::closed_error());
    }
    Ok(match &st.own {
        Some(r) => Arc::clone(r),
        None => {
            let r = Arc::new(OwnRing::new()?);
            st.own = Some(Arc::clone(&r));
            r
        }
    })
}

/// Watches `child` on the watcher's own ring, harvested by a task on the
/// selector loop `lp`, else by the reaper thread. `Err` if neither can
/// harvest it (the caller falls back to a waiter thread).
pub(super) fn watch(
    inner: &Arc<Inner>,
    child: &ChildHandle,
    pidfd: Option<Pidfd>,
    lp: Option<&EventLoop>,
) -> io::Result<()> {
    let ring = get_or_create(inner)?;
    let id = inner.next_id();
    let mut st = inner.state();
    if inner.is_closed() {
        return Err(Inner::closed_error());
    }
    let mut core = ring.lock();
    if core.closing {
        return Err(Inner::closed_error());
    }
    let (arm, kind) = match pidfd {
        Some(fd) => (Arm::Poll, Kind::Poll(fd)),
        None => (Arm::WaitId, Kind::Wait(Counted::new(&inner.waitids))),
    };
    let op = OwnOp {
        child: child.clone(),
        machine: Machine::new(arm),
        kind,
        cancelled: false,
    };
    core.start(id, op);
    let harvested = match lp {
        Some(lp) => harvester::start(inner, &ring, &mut core, lp),
        None => Err(io::Error::other("no loop")),
    };
    // A host driver harvests this ring: no reaper thread needed.
    if harvested.is_err() && core.hosts == 0 {
        if let Err(e) = ensure_reaper(inner, &ring, &mut core) {
            core.cancel(id);
            core.flush();
            return Err(io::Error::new(
                e.kind(),
                format!("cannot start the io_uring reaper thread: {e}"),
            ));
        }
    }
    match (lp, &harvested) {
        // Harvested on this selector loop: submit once per loop iteration
        // (a callback runs before the loop sleeps again), not once per
        // child. Anyone else who flushes meanwhile submits it too.
        (Some(lp), Ok(())) => {
            let h = lp.handle();
            if !core.flush_queued.iter().any(|l| l.same_loop(&h)) {
                core.flush_queued.push(h.clone());
                let flush = QueuedFlush(Arc::clone(&ring), h);
                lp.call_soon(move || drop(flush));
            }
        }
        _ => core.flush(),
    }
    drop(core);
    st.watches.insert(
        child.pid(),
        Watch {
            child: child.clone(),
            how: How::Own(id),
        },
    );
    Ok(())
}

/// The flush a selector loop runs at its next iteration. It flushes when
/// dropped, so a loop that stops or closes before running it still hands
/// the queued entries to the kernel.
struct QueuedFlush(Arc<OwnRing>, LoopHandle);

impl Drop for QueuedFlush {
    fn drop(&mut self) {
        let mut core = self.0.lock();
        core.flush_queued.retain(|l| !l.same_loop(&self.1));
        core.flush();
    }
}

/// Drains the ring's completions and applies the state machine's steps.
pub(super) fn harvest(inner: &Arc<Inner>, ring: &OwnRing) {
    loop {
        ring.reset();
        let done: Vec<(u64, i32, OwnOp)> = {
            let mut core = ring.lock();
            core.flush();
            let mut cqes = Vec::new();
            core.ring.drain(&mut cqes);
            if cqes.is_empty() {
                return;
            }
            cqes.into_iter()
                .filter(|&(tag, _)| tag != WAKE_TAG && tag != CANCEL_TAG)
                .filter_map(|(tag, res)| Some((tag, res, core.ops.remove(&tag)?)))
                .filter(|(_, _, op)| !op.cancelled)
                .collect()
        };
        for (id, res, mut op) in done {
            let step = op.machine.complete(
                res,
                &mut Reap {
                    inner,
                    child: &op.child,
                },
            );
            match step {
                Step::Done => inner.forget(&op.child),
                Step::Arm(arm) => rearm(inner, ring, id, op, arm),
                Step::HandOver => {
                    drop(std::mem::replace(&mut op.kind, Kind::Gone));
                    inner.to_thread(&op.child);
                }
            }
        }
    }
}

/// Submits `op` again as `arm`, unless its watch went away meanwhile.
fn rearm(inner: &Inner, ring: &OwnRing, id: u64, mut op: OwnOp, arm: Arm) {
    let st = inner.state();
    let current = st
        .watches
        .get(&op.child.pid())
        .is_some_and(|w| w.child.same(&op.child) && matches!(w.how, How::Own(i) if i == id));
    if !current {
        return;
    }
    let mut core = ring.lock();
    if core.closing {
        return;
    }
    if arm == Arm::WaitId && !matches!(op.kind, Kind::Wait(_)) {
        // Releases the pidfd: a WAITID needs no descriptor.
        op.kind = Kind::Wait(Counted::new(&inner.waitids));
    }
    core.start(id, op);
}

/// Harvests the ring from the calling thread if nothing else does, and
/// tries again to start a reaper for it (a registration calls this).
pub(super) fn harvest_orphaned(inner: &Arc<Inner>) {
    let Some(ring) = inner.state().own.clone() else {
        return;
    };
    if !ring.lock().unharvested() {
        return;
    }
    harvest(inner, &ring);
    let mut core = ring.lock();
    if core.unharvested() {
        let _ = ensure_reaper(inner, &ring, &mut core);
    }
}

/// A harvester of `ring` (a selector loop's task, or a host driver) left:
/// what nobody else harvests goes to the reaper thread, or, if that cannot
/// start, is cancelled here. Returns those cancelled children, for the
/// caller to give to waiter threads (`Inner::to_thread`) once `core` is
/// unlocked.
pub(super) fn hand_off_unharvested(
    inner: &Arc<Inner>,
    ring: &Arc<OwnRing>,
    core: &mut Core,
) -> Vec<ChildHandle> {
    if !core.unharvested() {
        return Vec::new();
    }
    match ensure_reaper(inner, ring, core) {
        Ok(()) => Vec::new(),
        Err(e) => {
            tracing::warn!(
                "cannot start the io_uring reaper thread ({e}); {} child(ren) go to waiter \
                 threads",
                core.ops.len()
            );
            let orphans = core.cancel_all();
            core.flush();
            orphans
        }
    }
}

/// Starts the reaper thread unless one runs.
pub(super) fn ensure_reaper(
    inner: &Arc<Inner>,
    ring: &Arc<OwnRing>,
    core: &mut Core,
) -> io::Result<()> {
    if core.reaper || core.closing {
        return Ok(());
    }
    let (done, alive): (Vec<_>, Vec<_>) = core.threads.drain(..).partition(|t| t.is_finished());
    core.threads = alive;
    for t in done {
        let _ = t.join();
    }
    let (i2, r2) = (Arc::clone(inner), Arc::clone(ring));
    let handle = std::thread::Builder::new()
        .name("uring-reaper".into())
        .spawn(move || reaper_main(&i2, &r2))?;
    core.reaper = true;
    core.threads.push(handle);
    Ok(())
}

/// The reaper thread: harvest until nothing is in flight (or closing).
fn reaper_main(inner: &Arc<Inner>, ring: &OwnRing) {
    loop {
        ring.wait(None);
        harvest(inner, ring);
        let mut core = ring.lock();
        if core.closing || core.ops.is_empty() {
            core.reaper = false;
            return;
        }
    }
}

impl OwnRing {
    /// `close()`: cancel everything, wait (bounded) for the kernel to finish
    /// with it, stop the reaper.
    pub(super) fn close(self: &Arc<Self>, inner: &Arc<Inner>) {
        let threads = {
            let mut core = self.lock();
            core.closing = true;
            core.cancel_all();
            for (_, t) in core.harvesters.drain(..) {
                t.cancel();
            }
            core.flush();
            std::mem::take(&mut core.threads)
        };
        let deadline = Instant::now() + CLOSE_GRACE;
        loop {
            harvest(inner, self);
            let left = self.lock().ops.len();
            let now = Instant::now();
            if left == 0 || now >= deadline {
                if left > 0 {
                    tracing::warn!(
                        "{left} io_uring operation(s) of the child watcher did not finish"
                    );
                }
                break;
            }
            self.wait(Some((deadline - now).min(Duration::from_millis(50))));
        }
        let me = std::thread::current().id();
        for t in threads {
            if t.thread().id() == me {
                // close() from a callback on the reaper thread: it ends right
                // after this callback returns.
                continue;
            }
            // The reaper sleeps in poll(2) on the ring: post a no-op until
            // it has seen `closing` and ended (a harvester may eat a wake-up).
            while !t.is_finished() {
                {
                    let mut core = self.lock();
                    core.push(Plain::Nop, WAKE_TAG);
                    core.flush();
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            let _ = t.join();
        }
    }
}
