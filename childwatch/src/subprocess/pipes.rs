//! The Unix `Reader` and `Writer` behind the public `ChildStdin`
//! (`AsyncWrite`), `ChildStdout` and `ChildStderr` (`AsyncRead`) of
//! `child_io.rs`.
//!
//! How: our end of each pipe is non-blocking, and every read or write is one
//! `read(2)`/`write(2)` straight between the pipe and the caller's buffer —
//! no intermediate buffer, no copy (one measured exception below). Only when
//! the pipe is empty (or full) does the pipe wait, in its loop's own style:
//! an io_uring `POLL_ADD` on the proactor (one entry, kept across polls), a
//! one-shot epoll interest on the selector.
//!
//! [`Reader::poll_read_spare`], under `ChildStdout::read_to_end`, reads into
//! a `Vec`'s uninitialised spare capacity, growing it geometrically. Once the
//! `Vec` holds bulk data (capacity of [`BULK_VEC`] or more) it reads through
//! a small bounce buffer that stays in the CPU cache and copies from there,
//! and on Linux faults the `Vec`'s pages in a chunk ahead of the reads (see
//! [`Prefault`]): at 1 GiB that takes about 40 % less CPU (0.75-0.85 s
//! against 1.2-1.6 s, Linux 6.18) than letting the kernel copy into, and
//! fault in, fresh memory page by page.
//!
//! Why not a completion-based `READ` on the proactor: the kernel would write
//! into memory the operation must own until it completes, so a borrowed
//! `&mut [u8]` cannot be the target, and every byte would be copied once
//! more out of an owned buffer; each completion would also be a
//! `Pending`/wake-up round trip per chunk. The readiness wait costs one ring
//! entry per time the pipe runs dry, and a large transfer is a few
//! `read(2)` calls per megabyte (one per pipe-full).
//!
//! Cost: the same system calls as a blocking pipe, plus one wait per time
//! the pipe is empty (full). A `poll_read` that returns `Pending` loses
//! nothing: no bytes are taken from the pipe until they can be handed out.
//! Once a pipe carries bulk data (a write of 256 KiB or more would block, a
//! read comes back with a full default pipe), it is grown to 1 MiB, so each
//! wait moves up to 16 times more bytes. Grown pipes count against the
//! user's `pipe-user-pages-soft`, past which Linux gives *every* new pipe of
//! that user two pages: at most [`MAX_GROWN`] pipes of this process are grown
//! at once, a quarter of the default limit.
//!
//! Every descriptor is `O_CLOEXEC`, so no pipe end leaks into other children.
//! A write to a pipe whose reader is gone (or after `poll_close`) is a
//! `BrokenPipe` error. `poll_close` on `ChildStdin` closes the descriptor,
//! which is how the child sees end-of-file. A pipe belongs to its loop's
//! thread (it is `!Send`, like the loop).

use std::fmt;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};

use crate::event_loop::EventLoop;
use crate::event_loop::proactor::{Op, Proactor};
use crate::event_loop::selector::{Interest, Source};

/// The least spare capacity a read into a growing `Vec` offers the kernel
/// (a default pipe's capacity).
pub(crate) const MIN_READ: usize = 64 * 1024;

/// The capacity a bulk pipe is grown to.
const BIG_PIPE: usize = 1 << 20;
/// Pipes of this process grown at once, at most: 16 × 256 pages is a quarter
/// of Linux's default `pipe-user-pages-soft` (16384 pages).
const MAX_GROWN: usize = 16;
/// A write at least this large that would block marks a bulk transfer.
const BULK_WRITE: usize = 256 * 1024;
/// Pipes grown now (process-wide).
static GROWN: AtomicUsize = AtomicUsize::new(0);

/// A `Vec` that [`Reader::poll_read_spare`] reads into counts as bulk once
/// its capacity reaches this (32 MiB): from then on it is read through the
/// bounce buffer and pre-faulted. Past 32 MiB a `Vec` outgrows a typical L3
/// cache, and glibc maps it afresh (its largest dynamic `mmap` threshold),
/// so its pages fault and miss the cache. A smaller one is often heap memory
/// reused while still mapped and cached: there the extra copy and system
/// calls cost more than they save (measured at 10 MiB: 7 ms of CPU against
/// 4-5 ms with a 2 MiB threshold).
const BULK_VEC: usize = 32 << 20;
/// The bounce buffer of a bulk read (256 KiB, allocated for the transfer
/// and freed at end-of-file or with the pipe): it stays in the CPU's cache
/// (a quarter of the 1 MiB L2 measured on), and costs at most 16 reads per
/// MiB. 64 KiB to 4 MiB measured alike.
const BOUNCE: usize = 256 * 1024;
/// How much of the spare capacity one pre-fault covers: small enough that
/// the freshly zeroed pages are still in the cache when the pipe's bytes are
/// copied over them, large enough to be a few hundred system calls per GiB.
#[cfg(target_os = "linux")]
const PREFAULT_CHUNK: usize = 2 << 20;

/// Pre-faulting the spare capacity of the `Vec` that
/// [`Reader::poll_read_spare`] reads into (Linux).
///
/// Why: a large `read_to_end` fills memory the allocator has just mapped, so
/// every 4 KiB page of it is first touched by the kernel's copy out of the
/// pipe: one page fault per page, taken inside `read(2)` while the pipe is
/// locked. `madvise(MADV_POPULATE_WRITE)` on the next [`PREFAULT_CHUNK`] of
/// spare capacity allocates the same pages in one system call, without a
/// fault per page (measured on Linux 6.18 in a VM: 10-20 % less CPU for a
/// 1 GiB read, with or without the bounce buffer; the kernel must still
/// allocate and zero every page, which bounds the gain).
///
/// What was not done, measured: `MADV_HUGEPAGE` on the spare capacity splits
/// the allocator's mapping, after which glibc can no longer grow it with
/// `mremap` (`EFAULT`) and copies the whole `Vec` on every growth instead;
/// `MADV_COLLAPSE` into huge pages cost more CPU than it saved; and huge
/// pages took anywhere from a third to ten times the time of 4 KiB ones to
/// populate, depending on whether the kernel had to compact memory first.
///
/// Bounds: only whole pages inside the `Vec`'s own spare capacity are
/// advised; at most `PREFAULT_CHUNK` + [`BIG_PIPE`] bytes past what is read
/// are ever populated (RSS, not data); the first error (e.g. `EINVAL` before
/// Linux 5.14) turns it off for this pipe. It is only a hint: what lands in
/// the `Vec` does not depend on it.
#[cfg(target_os = "linux")]
struct Prefault {
    enabled: bool,
    /// The buffer last pre-faulted (address, capacity): another one (or the
    /// same one moved by a reallocation) starts again from its length.
    buf: (usize, usize),
    /// Offset into that buffer up to which its pages were populated.
    upto: usize,
}

#[cfg(target_os = "linux")]
impl Prefault {
    fn new() -> Prefault {
        Prefault {
            enabled: true,
            buf: (0, 0),
            upto: 0,
        }
    }

    /// Populates the next [`PREFAULT_CHUNK`] of `buf`'s spare capacity when
    /// less than one read's worth ([`BIG_PIPE`]) lies populated ahead.
    fn ahead(&mut self, buf: &mut Vec<u8>) {
        if !self.enabled || buf.capacity() < BULK_VEC {
            return;
        }
        let (len, cap) = (buf.len(), buf.capacity());
        let addr = buf.as_ptr() as usize;
        if self.buf != (addr, cap) || self.upto < len {
            self.buf = (addr, cap);
            self.upto = len;
        }
        if self.upto - len >= BIG_PIPE || self.upto >= cap {
            return;
        }
        // End on a 4 KiB boundary of the address, so the next chunk starts
        // on a whole page (a larger page size only costs a fault per chunk).
        let end = ((addr + self.upto + PREFAULT_CHUNK) & !4095).saturating_sub(addr);
        let end = end.clamp(self.upto, cap);
        let spare = &mut buf.spare_capacity_mut()[self.upto - len..end - len];
        match crate::sys::populate_write(spare) {
            Ok(()) => self.upto = end,
            Err(_) => self.enabled = false,
        }
    }
}

/// Whether this end grew its pipe: `Tried` once an attempt was made (grown
/// or not), so each pipe tries once.
enum Growth {
    Default,
    Tried,
    Grown,
}

impl Growth {
    /// Grows `fd`'s pipe to [`BIG_PIPE`] if no attempt was made yet and the
    /// process-wide budget allows; failure (EPERM past the user's limit) is
    /// fine: the pipe keeps working at its size.
    fn grow(&mut self, fd: &OwnedFd) {
        if !matches!(self, Growth::Default) {
            return;
        }
        *self = Growth::Tried;
        if GROWN.fetch_add(1, Ordering::Relaxed) >= MAX_GROWN {
            GROWN.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        match rustix::pipe::fcntl_setpipe_size(fd, BIG_PIPE) {
            Ok(_) => *self = Growth::Grown,
            Err(_) => {
                GROWN.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

impl Drop for Growth {
    fn drop(&mut self) {
        if matches!(self, Growth::Grown) {
            GROWN.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// How a pipe waits when its descriptor would block.
enum Wait {
    /// io_uring: the `POLL_ADD` in flight, kept across polls so a
    /// re-poll with another waker does not submit again.
    Proactor {
        proactor: Proactor,
        op: Option<Op<()>>,
    },
    /// epoll: the descriptor's registration with the loop.
    Selector(Source),
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    use rustix::fs::{OFlags, fcntl_getfl, fcntl_setfl};
    let fl = fcntl_getfl(fd)?;
    fcntl_setfl(fd, fl | OFlags::NONBLOCK)?;
    Ok(())
}

impl Wait {
    fn new(lp: &EventLoop, fd: &OwnedFd) -> io::Result<Wait> {
        set_nonblocking(fd).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot make a pipe non-blocking: {e}"))
        })?;
        if let Some(p) = lp.proactor_backend() {
            return Ok(Wait::Proactor {
                proactor: p.clone(),
                op: None,
            });
        }
        if let Some(s) = lp.selector_backend() {
            // SAFETY: the Source is stored beside `fd` and dropped before it
            // (field order in Reader and WriterState).
            return Ok(Wait::Selector(unsafe { s.register(fd.as_raw_fd())? }));
        }
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this event loop has no backend that can drive pipes",
        ))
    }

    /// Ready when `fd` may no longer block in direction `dir` (or is hung
    /// up, or in error): the caller then retries its system call.
    fn poll_ready(
        &mut self,
        cx: &mut Context<'_>,
        fd: RawFd,
        dir: Interest,
    ) -> Poll<io::Result<()>> {
        match self {
            Wait::Proactor { proactor, op } => {
                let events = match dir {
                    Interest::Read => libc::POLLIN,
                    Interest::Write => libc::POLLOUT,
                };
                let current = op.get_or_insert_with(|| proactor.poll_add(fd, events as u32));
                let (res, ()) = ready!(Pin::new(current).poll(cx));
                *op = None;
                Poll::Ready(match res {
                    Ok(_) => Ok(()),
                    Err(e) if e.raw_os_error() == Some(libc::ECANCELED) => {
                        Err(io::Error::other("the event loop is closed"))
                    }
                    Err(e) => Err(e),
                })
            }
            Wait::Selector(src) => src.poll_ready(cx, dir),
        }
    }

    fn is_proactor(&self) -> bool {
        matches!(self, Wait::Proactor { .. })
    }
}

/// The reading end, shared by stdout and stderr.
pub(crate) struct Reader {
    // Field order matters: the wait (an in-flight poll, an epoll
    // registration) is dropped before the descriptor it refers to.
    wait: Wait,
    growth: Growth,
    #[cfg(target_os = "linux")]
    prefault: Prefault,
    /// [`BOUNCE`] bytes while a bulk `read_to_end` is under way.
    bounce: Option<Box<[u8]>>,
    fd: OwnedFd,
}

impl Reader {
    pub(crate) fn new(lp: &EventLoop, fd: OwnedFd) -> io::Result<Reader> {
        Ok(Reader {
            wait: Wait::new(lp, &fd)?,
            growth: Growth::Default,
            #[cfg(target_os = "linux")]
            prefault: Prefault::new(),
            bounce: None,
            fd,
        })
    }

    /// Reads into `out`; `Ok(0)` is end-of-file (or an empty `out`).
    pub(crate) fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        if out.is_empty() {
            return Poll::Ready(Ok(0));
        }
        loop {
            match rustix::io::read(&self.fd, &mut *out) {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::AGAIN) => {
                    ready!(
                        self.wait
                            .poll_ready(cx, self.fd.as_raw_fd(), Interest::Read)
                    )?;
                }
                Err(e) => return Poll::Ready(Err(e.into())),
            }
        }
    }

    /// Reads into `buf`'s spare capacity and extends its length by what was
    /// read; `Ok(0)` is end-of-file. Nothing in `buf` is initialised first.
    ///
    /// Copy: below [`BULK_VEC`] of capacity the kernel writes straight into
    /// the spare capacity. From there on, each `read(2)` goes into a
    /// [`BOUNCE`]-byte buffer and is copied on into the `Vec` (at most
    /// `BOUNCE` bytes a call). That is one copy more, yet it measured about
    /// a quarter less CPU for a 1 GiB read on Linux 6.18 (x86-64 VM, AMD
    /// EPYC): the kernel's copy out of the pipe is slow into memory that is
    /// not in the cache, the bounce buffer always is, and the copy on from
    /// it into fresh memory is cheap.
    ///
    /// Growth: when less than [`MIN_READ`] (64 KiB) is spare, the capacity
    /// grows by the larger of 64 KiB and the current length, i.e. it at
    /// least doubles (64 KiB, 128 KiB, ... 1 GiB), so the reallocations are
    /// logarithmic in the size and their copies (if the allocator copies;
    /// glibc moves large blocks with `mremap` instead) linear. Untouched
    /// capacity costs address space, not memory. On Linux, once the
    /// capacity reaches [`BULK_VEC`], the pages just ahead of the reads are
    /// faulted in a chunk at a time (see [`Prefault`]).
    pub(crate) fn poll_read_spare(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut Vec<u8>,
    ) -> Poll<io::Result<usize>> {
        if buf.capacity() - buf.len() < MIN_READ {
            buf.reserve(MIN_READ.max(buf.len()));
        }
        let bulk = buf.capacity() >= BULK_VEC;
        #[cfg(target_os = "linux")]
        self.prefault.ahead(buf);
        loop {
            let res = if bulk {
                let bounce = self
                    .bounce
                    .get_or_insert_with(|| vec![0u8; BOUNCE].into_boxed_slice());
                let room = (buf.capacity() - buf.len()).min(BOUNCE);
                rustix::io::read(&self.fd, &mut bounce[..room]).inspect(|&n| {
                    // Within the spare capacity: no reallocation.
                    buf.extend_from_slice(&bounce[..n]);
                })
            } else {
                rustix::io::read(&self.fd, rustix::buffer::spare_capacity(buf))
            };
            match res {
                Ok(n) => {
                    // A full default pipe: the child writes faster than we
                    // read, in bulk.
                    if n >= MIN_READ {
                        self.growth.grow(&self.fd);
                    }
                    if n == 0 {
                        self.bounce = None;
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::AGAIN) => {
                    ready!(
                        self.wait
                            .poll_ready(cx, self.fd.as_raw_fd(), Interest::Read)
                    )?;
                }
                Err(e) => return Poll::Ready(Err(e.into())),
            }
        }
    }
}

struct WriterState {
    // Field order: the wait before the descriptor (see Reader).
    wait: Wait,
    growth: Growth,
    fd: OwnedFd,
}

/// The writing end of stdin; `None` once closed.
pub(crate) struct Writer {
    state: Option<WriterState>,
}

fn closed_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        "the child's stdin was closed; nothing more can be written to it",
    )
}

impl Writer {
    /// Whether `poll_close` closed the pipe.
    pub(crate) fn is_closed(&self) -> bool {
        self.state.is_none()
    }

    pub(crate) fn new(lp: &EventLoop, fd: OwnedFd) -> io::Result<Writer> {
        Ok(Writer {
            state: Some(WriterState {
                wait: Wait::new(lp, &fd)?,
                growth: Growth::Default,
                fd,
            }),
        })
    }

    /// Writes as much of `data` as the pipe takes now (at least one byte),
    /// straight from the caller's buffer.
    pub(crate) fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let Some(st) = &mut self.state else {
            return Poll::Ready(Err(closed_error()));
        };
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        loop {
            match rustix::io::write(&st.fd, data) {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::AGAIN) => {
                    if data.len() >= BULK_WRITE {
                        st.growth.grow(&st.fd);
                    }
                    ready!(st.wait.poll_ready(cx, st.fd.as_raw_fd(), Interest::Write))?;
                }
                Err(e) => return Poll::Ready(Err(e.into())),
            }
        }
    }

    /// Writes are never buffered: nothing to flush.
    pub(crate) fn poll_flush(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Closes the pipe: the child sees end-of-file.
    pub(crate) fn poll_close(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Drops the wait, then the descriptor.
        self.state = None;
        Poll::Ready(Ok(()))
    }
}

/// What a pipe end is made from on this platform.
pub(crate) type RawPipe = OwnedFd;

impl AsRawFd for Reader {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn io_kind(io_proactor: bool) -> &'static str {
    if io_proactor { "proactor" } else { "selector" }
}

impl fmt::Debug for Writer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Pipe");
        match &self.state {
            Some(st) => d
                .field("fd", &st.fd.as_raw_fd())
                .field("io", &io_kind(st.wait.is_proactor())),
            None => d.field("closed", &true),
        };
        d.finish()
    }
}

impl fmt::Debug for Reader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pipe")
            .field("fd", &self.fd.as_raw_fd())
            .field("io", &io_kind(self.wait.is_proactor()))
            .finish()
    }
}
