//! The own ring's harvester on a selector loop: a task that waits for the
//! ring's eventfd to turn readable and harvests, so a selector loop needs
//! no thread. If the task is dropped with its loop while work remains, the
//! reaper thread takes over, else waiter threads.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use super::Inner;
use super::loop_ring::Token;
use super::own_ring::{Core, OwnRing, hand_off_unharvested, harvest};
use crate::event_loop::EventLoop;

/// Starts a harvesting task for `ring` on the selector loop `lp` unless one
/// is there already.
pub(super) fn start(
    inner: &Arc<Inner>,
    ring: &Arc<OwnRing>,
    core: &mut Core,
    lp: &EventLoop,
) -> io::Result<()> {
    let h = lp.handle();
    if core.harvesters.iter().any(|(l, _)| l.same_loop(&h)) {
        return Ok(());
    }
    if lp.selector_backend().is_none() {
        return Err(io::Error::other("not a selector loop"));
    }
    let token = Arc::new(Token::default());
    core.harvesters.push((h, Arc::clone(&token)));
    let guard = Harvester {
        inner: Arc::clone(inner),
        ring: Arc::clone(ring),
        token,
        done: false,
    };
    lp.create_task(harvester(guard)).detach();
    Ok(())
}

/// A selector loop's harvesting task, seen from its `Drop`: if dropped
/// with its loop while work remains, the reaper (or waiter threads) take
/// over.
struct Harvester {
    inner: Arc<Inner>,
    ring: Arc<OwnRing>,
    token: Arc<Token>,
    done: bool,
}

impl Harvester {
    /// Leaves the ring's list of harvesters; work that nobody else
    /// harvests goes to the reaper, else to waiter threads.
    fn retire(&mut self) {
        self.done = true;
        let orphans = {
            let mut core = self.ring.lock();
            core.harvesters
                .retain(|(_, t)| !Arc::ptr_eq(t, &self.token));
            hand_off_unharvested(&self.inner, &self.ring, &mut core)
        };
        for child in orphans {
            self.inner.to_thread(&child);
        }
    }
}

impl Drop for Harvester {
    fn drop(&mut self) {
        if !self.done {
            // Dropped with its loop: someone else must harvest now.
            self.retire();
        }
    }
}

/// Harvests whenever the ring's descriptor turns readable; ends once
/// nothing is in flight, or when cancelled.
async fn harvester(mut h: Harvester) {
    let fd = h.ring.efd.as_raw_fd();
    let Some(lp) = crate::event_loop::get_running_loop() else {
        return; // only runs on its loop; the guard's Drop hands over
    };
    loop {
        let token = Arc::clone(&h.token);
        let ready = {
            let mut wait = std::pin::pin!(lp.wait_readable(fd));
            std::future::poll_fn(|cx| {
                if token.is_cancelled() {
                    return std::task::Poll::Ready(None);
                }
                token.set_waker(cx.waker());
                std::future::Future::poll(wait.as_mut(), cx).map(Some)
            })
            .await
        };
        match ready {
            None => {
                h.retire();
                return;
            }
            Some(Err(e)) => {
                tracing::warn!("cannot wait for the child watcher's io_uring: {e}");
                h.retire();
                return;
            }
            Some(Ok(())) => {}
        }
        harvest(&h.inner, &h.ring);
        let mut core = h.ring.lock();
        if core.closing || core.ops.is_empty() {
            core.harvesters.retain(|(_, t)| !Arc::ptr_eq(t, &h.token));
            h.done = true;
            return;
        }
    }
}
