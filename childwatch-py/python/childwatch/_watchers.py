"""asyncio child watchers backed by childwatch's Rust watchers.

asyncio's contract (``asyncio.AbstractChildWatcher``, Python 3.9-3.13):

* ``add_child_handler(pid, callback, *args)``: ``callback(pid, returncode,
  *args)`` runs once the child exits, on the loop that was running when the
  handler was added (through ``loop.call_soon_threadsafe``, so an exception
  it raises goes to ``loop.call_exception_handler`` like any callback); if
  that loop is closed by then, a warning is logged instead; with no running
  loop, the callback runs inline on the thread that learnt of the exit.
* ``remove_child_handler(pid)``, ``attach_loop(loop)`` (these watchers need
  no loop: active from creation until ``close()``), ``is_active()``,
  ``close()``, and ``with watcher:`` around a spawn.

Every watcher still open is closed at interpreter exit, and in a forked
child every watcher inherited from the parent is disabled (its threads do
not exist there; its ring and descriptors are the parent's).

How exits are harvested: on an asyncio loop the Uring watcher uses the
library's *host driver* (``UringChildWatcher::host_driver``): its ring's
descriptor is registered with ``loop.add_reader`` on the loop running at
registration, and reaping and delivery happen there, with no thread at all
(see ``_HostHarvest``). With no loop running it falls back to its own
reaper thread, started lazily and only while children are pending. The
Threaded watcher keeps one small Rust thread per child.
"""

import asyncio
import atexit
import functools
import logging
import os
import threading
import warnings
import weakref

from . import _native

__all__ = ["UringChildWatcher", "ThreadedChildWatcher", "uring_supported"]

logger = logging.getLogger("childwatch")

uring_supported = _native.uring_supported

# asyncio.AbstractChildWatcher exists on 3.9-3.13 and warns when subclassed
# on 3.12-3.13 (deprecated there); Python 3.14 removed it, and our watchers
# are plain classes there (use childwatch.new_event_loop instead).
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    _AbstractChildWatcher = getattr(asyncio, "AbstractChildWatcher", object)

    class _Base(_AbstractChildWatcher):
        # 3.12-3.13 warn in AbstractChildWatcher.__init_subclass__ for every
        # subclass; users already get the deprecation from
        # asyncio.set_child_watcher, so our own classes do not repeat it.
        def __init_subclass__(cls, **kwargs):
            pass


_live = weakref.WeakSet()
_live_lock = threading.Lock()


def _running_loop():
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class _ForeignThread:
    """Stands in ``threading._active`` for a Rust thread while it logs."""

    __slots__ = ("name", "ident")
    daemon = True

    def __init__(self, ident):
        self.ident = ident
        self.name = f"childwatch-{ident}"

    def is_alive(self):
        return True

    def __repr__(self):
        return f"<childwatch Rust thread {self.ident}>"


def _log(level, msg, *args, **kwargs):
    """``logger.log`` from any thread, Rust threads included.

    On a thread that ``threading`` does not know (a watcher's Rust thread),
    a log record's ``threading.current_thread()`` would create a
    ``_DummyThread``: it stays in ``threading._active`` for good and counts
    as a leaked thread (``threading._dangling``) in test suites. A plain
    stand-in entry is put there for the duration of the call instead; it is
    not a ``Thread``, so thread counts never see it.
    """
    ident = threading.get_ident()
    active = getattr(threading, "_active", None)
    foreign = active is not None and ident not in active
    if foreign:
        active[ident] = _ForeignThread(ident)
    try:
        logger.log(level, msg, *args, **kwargs)
    finally:
        if foreign:
            active.pop(ident, None)


def _log_from_rust(level, message, target):
    # Called by the native module's tracing subscriber.
    _log(level, "%s", message, extra={"rust_target": target})


def _report_inline_error(callback, pid, exc):
    _log(
        logging.ERROR,
        "Exception in child handler %r for pid %d (no event loop was running "
        "when it was registered)",
        callback,
        pid,
        exc_info=exc,
    )


class _HostHarvest:
    """Drives a native watcher's ring from one asyncio loop.

    Wraps a native *host driver* (``Watcher.host_driver()``): ``fileno()``
    turns readable when completions wait on the ring, ``harvest()`` reaps
    and delivers them without blocking, on the loop's thread, and ``add()``
    registers a child whose wait goes on that ring. Registered with
    ``loop.add_reader`` the first time a child is added while the loop runs;
    closed with the watcher, or dropped with the loop (the driver then hands
    its pending children to the watcher's reaper thread).

    Only the Uring watcher has a host driver; for Threaded
    (``host_driver()`` returns ``None``) its waiter threads deliver and this
    class is not used.
    """

    def __init__(self, driver, loop):
        self.driver = driver
        # Weak: the watcher's WeakKeyDictionary of harvests is keyed by loop.
        self._loop = weakref.ref(loop)
        self.fd = driver.fileno()
        # Hand the driver back before the loop closes: its pending children
        # then go to the watcher's reaper thread (asyncio has no close hook,
        # so the loop's close is wrapped on this instance).
        original_close = loop.close

        def close():
            self.close()
            original_close()

        loop.close = close
        loop.add_reader(self.fd, self._ready)

    def _ready(self):
        try:
            self.driver.harvest()
        except Exception as exc:  # the watcher closed meanwhile, or a bug
            loop = self._loop()
            if loop is not None:
                loop.call_exception_handler(
                    {"message": "childwatch harvest failed", "exception": exc}
                )

    def add(self, pid, deliver):
        self.driver.add(pid, deliver)

    def close(self):
        loop = self._loop()
        if loop is not None and not loop.is_closed():
            try:
                loop.remove_reader(self.fd)
            except RuntimeError:  # closed on another thread meanwhile
                pass
        self.driver.close()


class _RustChildWatcher(_Base):
    """Shared part of the watchers below; see the module docs."""

    _kind = "?"

    def __init__(self, native):
        self._native = native
        self._closed = False
        self._forked = False
        # loop -> _HostHarvest (host-driven harvest only)
        self._harvests = weakref.WeakKeyDictionary()
        with _live_lock:
            _live.add(self)

    def __repr__(self):
        state = "closed" if self._closed else "active"
        return f"<{type(self).__name__} {state} {self.stats()}>"

    # -- asyncio's contract -------------------------------------------------

    def add_child_handler(self, pid, callback, *args):
        if self._forked:
            raise RuntimeError(
                f"{type(self).__name__} was inherited through fork(); create a new one"
            )
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed")
        loop = _running_loop()
        deliver = functools.partial(self._deliver, loop, callback, args)
        host = self._host_for(loop) if loop is not None else None
        if host is not None:
            host.add(pid, deliver)
        else:
            self._native.add(pid, deliver)

    def remove_child_handler(self, pid):
        return self._native.remove(pid)

    def attach_loop(self, loop):
        # Active without a loop; nothing to attach (asyncio's Threaded and
        # Pidfd watchers do the same).
        pass

    def is_active(self):
        return not self._closed and not self._forked and self._native.is_active()

    def close(self):
        if self._closed:
            return
        self._closed = True
        for h in self._harvests.values():
            if h is not None:
                h.close()
        self._harvests.clear()
        if not self._forked:
            self._native.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        pass

    # -- beyond asyncio's contract -------------------------------------------

    def stats(self):
        """Counters of the native watcher (see ``childwatch._native.Watcher.stats``)."""
        return self._native.stats()

    # -- internals ------------------------------------------------------------

    def _host_for(self, loop):
        """The loop's ``_HostHarvest``, or ``None`` when the native watcher
        offers no host driver (then its own thread harvests)."""
        try:
            return self._harvests[loop]
        except KeyError:
            pass
        driver = self._native.host_driver()
        host = None
        if driver is not None and not loop.is_closed():
            try:
                host = _HostHarvest(driver, loop)
            except (AttributeError, NotImplementedError, RuntimeError):
                # A loop whose close cannot be wrapped, or without
                # add_reader: the reaper thread harvests instead.
                driver.close()
                host = None
        self._harvests[loop] = host
        return host

    @staticmethod
    def _deliver(loop, callback, args, pid, returncode):
        # Runs on the thread that learnt of the exit (a watcher thread, or
        # the loop thread with the host-driven harvest), or inline in
        # add_child_handler when the child had already exited.
        if loop is None:
            try:
                callback(pid, returncode, *args)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                _report_inline_error(callback, pid, exc)
            return
        if loop.is_closed():
            _log(logging.WARNING, "Loop %r that handles pid %r is closed", loop, pid)
            return
        try:
            loop.call_soon_threadsafe(callback, pid, returncode, *args)
        except RuntimeError:
            # Closed between the check and the call.
            _log(logging.WARNING, "Loop %r that handles pid %r is closed", loop, pid)

    def _after_fork_in_child(self):
        self._forked = True
        self._harvests.clear()
        self._native.forget()


class UringChildWatcher(_RustChildWatcher):
    """Watches children through io_uring (Linux 6.7+), from Rust.

    Each child gets an ``IORING_OP_POLL_ADD`` on its pidfd while the watcher
    holds fewer than ``fd_budget`` pidfds (O(1) per exit), and an
    ``IORING_OP_WAITID`` beyond that budget: it never fails at the descriptor
    limit and starts no thread per child. ``fd_budget=None`` keeps the
    library's default, half of the soft ``RLIMIT_NOFILE``; ``0`` watches
    every child with ``WAITID``.

    Raises ``OSError`` (``ENOTSUP``-like) where the kernel lacks io_uring
    ``WAITID``; check ``childwatch.uring_supported()`` first.
    """

    _kind = "Uring"

    def __init__(self, fd_budget=None):
        if fd_budget is not None and fd_budget < 0:
            raise ValueError("fd_budget must be >= 0 or None")
        super().__init__(_native.Watcher.uring(fd_budget))


class ThreadedChildWatcher(_RustChildWatcher):
    """Watches each child with one small Rust thread (64 KiB stack) blocked
    in ``waitid(pid, WNOWAIT)``: O(1) per exit in user space, a thread per
    live child, works everywhere. asyncio's ThreadedChildWatcher, without a
    Python thread (and its 8 MiB default stack) per child."""

    _kind = "Threaded"

    def __init__(self):
        super().__init__(_native.Watcher.threaded())


def _close_all_at_exit():
    with _live_lock:
        watchers = list(_live)
    for w in watchers:
        try:
            w.close()
        except Exception:  # at exit, one failure must not stop the others
            logger.exception("closing %r at exit failed", w)


def _after_fork_in_child():
    # The lock may have been held by another thread at fork time.
    global _live_lock
    _live_lock = threading.Lock()
    for w in list(_live):
        w._after_fork_in_child()


atexit.register(_close_all_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
