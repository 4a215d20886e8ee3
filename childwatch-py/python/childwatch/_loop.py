"""An asyncio event loop whose subprocesses are watched by childwatch.

Python 3.14 removed child watchers: each Unix loop watches its own children
(a pidfd per child, or a thread per child). ``new_event_loop()`` returns a
``SelectorEventLoop`` subclass whose ``subprocess_exec``/``subprocess_shell``
(and so ``asyncio.create_subprocess_exec``/``_shell``) hand every child to a
childwatch watcher instead, for

    asyncio.run(main(), loop_factory=childwatch.new_event_loop)       # 3.12+
    with asyncio.Runner(loop_factory=childwatch.new_event_loop) as r:  # 3.11+
        r.run(main())

It works the same on 3.9-3.13, where it needs no child watcher set.

The private hooks it relies on (the same from Python 3.8 through 3.14;
tested on 3.9-3.13, 3.14 checked against its source only):

* ``BaseEventLoop._make_subprocess_transport(protocol, args, shell, stdin,
  stdout, stderr, bufsize, extra=None, **kwargs)``, the coroutine that
  ``subprocess_exec``/``subprocess_shell`` await: overridden here;
* ``asyncio.unix_events._UnixSubprocessTransport`` (constructed as the base
  class does, with ``waiter=`` and ``extra=``), and its ``get_pid()``,
  ``_process_exited(returncode)``, ``close()`` and ``_wait()``.

If a future Python changes either, ``new_event_loop()`` raises at creation
(see ``_check_hooks``) rather than spawning children nobody watches.
"""

import asyncio
import os
import sys
import threading

from ._watchers import UringChildWatcher, ThreadedChildWatcher, uring_supported

__all__ = ["ChildwatchEventLoop", "new_event_loop", "default_watcher"]

try:
    from asyncio import unix_events as _unix_events
except ImportError:  # Windows
    _unix_events = None

_default = None
_default_lock = threading.Lock()


def default_watcher():
    """The process-wide watcher used by loops created without one: a
    ``UringChildWatcher`` where the kernel supports it, else a
    ``ThreadedChildWatcher``. Created on first use, closed at exit."""
    global _default
    with _default_lock:
        if _default is None or not _default.is_active():
            if uring_supported():
                _default = UringChildWatcher()
            else:
                _default = ThreadedChildWatcher()
        return _default


def _check_hooks():
    if _unix_events is None:
        raise RuntimeError("childwatch.new_event_loop() needs a Unix asyncio")
    transport = getattr(_unix_events, "_UnixSubprocessTransport", None)
    base = getattr(asyncio.base_events.BaseEventLoop, "_make_subprocess_transport", None)
    if transport is None or base is None:
        raise RuntimeError(
            "this Python's asyncio lacks the private hooks childwatch.new_event_loop() "
            f"relies on (_make_subprocess_transport, _UnixSubprocessTransport); "
            f"Python {sys.version_info[0]}.{sys.version_info[1]} is not supported"
        )
    return transport


_Selector = getattr(asyncio, "SelectorEventLoop", object)


class ChildwatchEventLoop(_Selector):
    """asyncio's Unix selector loop, with subprocesses watched by a
    childwatch watcher (``watcher=None``: ``default_watcher()``)."""

    def __init__(self, selector=None, *, watcher=None):
        self._cw_transport_class = _check_hooks()
        super().__init__(selector)
        self._cw_watcher = watcher

    @property
    def child_watcher(self):
        """The childwatch watcher this loop's subprocesses use."""
        return self._cw_watcher if self._cw_watcher is not None else default_watcher()

    async def _make_subprocess_transport(
        self, protocol, args, shell, stdin, stdout, stderr, bufsize, extra=None, **kwargs
    ):
        watcher = self.child_watcher
        if not watcher.is_active():
            raise RuntimeError(f"{watcher!r} is closed; subprocess support is not installed")
        waiter = self.create_future()
        transp = self._cw_transport_class(
            self, protocol, args, shell, stdin, stdout, stderr, bufsize,
            waiter=waiter, extra=extra, **kwargs,
        )
        pid = transp.get_pid()
        try:
            # Registered while this loop runs, so the exit comes back to this
            # loop through call_soon_threadsafe.
            watcher.add_child_handler(pid, self._cw_child_exited, transp)
        except BaseException:
            # Nobody watches this child: kill and reap it here.
            transp.close()
            try:
                _, status = os.waitpid(pid, 0)
                transp._process_exited(os.waitstatus_to_exitcode(status))
            except ChildProcessError:
                transp._process_exited(255)
            raise
        try:
            await waiter
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException:
            transp.close()
            await transp._wait()
            raise
        return transp

    def _cw_child_exited(self, pid, returncode, transp):
        # Already on this loop's thread (see _make_subprocess_transport).
        transp._process_exited(returncode)


def new_event_loop(*, watcher=None):
    """A new ``ChildwatchEventLoop``: pass it as ``loop_factory`` to
    ``asyncio.run`` (3.12+) or ``asyncio.Runner`` (3.11+)."""
    return ChildwatchEventLoop(watcher=watcher)
