//! A host driver: lets an event loop that childwatch does not run (asyncio
//! through the Python package, a GUI loop, another runtime) harvest the
//! Uring watcher's own ring, so no reaper thread is needed there.
//!
//! How: while a [`HostDriver`] lives, children registered with no
//! childwatch loop running go on the watcher's own ring and no reaper
//! thread is started for them. The host watches the driver's descriptor
//! (an eventfd the ring signals at each completion: readable, level-
//! triggered, while completions wait) and calls [`HostDriver::harvest`],
//! which reaps through each child's gate and runs the callbacks on the
//! calling thread. Dropping the last driver hands whatever is still pending
//! to the reaper thread (or, with no thread to be had, to waiter threads).

use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;

use super::own_ring::{self, OwnRing};
use super::{Inner, UringChildWatcher};

/// A host loop's handle on a [`UringChildWatcher`]'s own ring. `Send`;
/// meant to be harvested from the host loop's thread. Its descriptor stays
/// open as long as it lives, even after the watcher's `close()`.
pub struct HostDriver {
    inner: Arc<Inner>,
    ring: Arc<OwnRing>,
}

impl fmt::Debug for HostDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostDriver")
            .field("fd", &self.ring.efd.as_raw_fd())
            .finish()
    }
}

impl UringChildWatcher {
    /// A driver for a host event loop (see [`HostDriver`]). While one
    /// lives, children registered with no childwatch loop running are
    /// harvested by the host calling [`HostDriver::harvest`] when the
    /// driver's descriptor turns readable, instead of by a reaper thread.
    /// Errors: the watcher is closed (`Other`), or its io_uring cannot be
    /// created.
    pub fn host_driver(&self) -> std::io::Result<HostDriver> {
        let ring = own_ring::get_or_create(&self.inner)?;
        ring.lock().hosts += 1;
        Ok(HostDriver {
            inner: Arc::clone(&self.inner),
            ring,
        })
    }
}

impl HostDriver {
    /// Never blocks: drains the ring's completions, reaps through each
    /// child's gate, re-arms what is still running and runs the exit
    /// callbacks on the calling thread (no watcher lock is held while they
    /// run). A no-op after the watcher closed.
    pub fn harvest(&self) {
        own_ring::harvest(&self.inner, &self.ring);
    }
}

impl AsFd for HostDriver {
    /// Readable while completions wait on the ring.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ring.efd.as_fd()
    }
}

impl AsRawFd for HostDriver {
    fn as_raw_fd(&self) -> RawFd {
        self.ring.efd.as_raw_fd()
    }
}

impl Drop for HostDriver {
    /// With no host left, pending children go to the reaper thread (else
    /// to waiter threads): nothing is left unharvested.
    fn drop(&mut self) {
        let orphans = {
            let mut core = self.ring.lock();
            core.hosts = core.hosts.saturating_sub(1);
            own_ring::hand_off_unharvested(&self.inner, &self.ring, &mut core)
        };
        for child in orphans {
            self.inner.to_thread(&child);
        }
    }
}
