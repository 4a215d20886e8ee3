"""childwatch for Python: asyncio child watchers and a loop, from Rust.

Two ways to use it:

* Python 3.9-3.13, with asyncio's child-watcher API::

      import asyncio, childwatch
      asyncio.set_child_watcher(childwatch.UringChildWatcher())
      # asyncio.create_subprocess_exec(...) now uses it

* Any Python from 3.9 (the only way on 3.14+, where child watchers are
  gone), with a loop factory::

      asyncio.run(main(), loop_factory=childwatch.new_event_loop)

``UringChildWatcher`` watches children through io_uring (pidfd polls within
a descriptor budget, ``IORING_OP_WAITID`` beyond it; Linux 6.7+): no thread
per child and no failure at the descriptor limit. ``ThreadedChildWatcher``
uses one small Rust thread per child and works on any Linux. The library's
warnings go to the logger ``childwatch``.
"""

from ._watchers import ThreadedChildWatcher, UringChildWatcher, uring_supported
from ._loop import ChildwatchEventLoop, default_watcher, new_event_loop

__all__ = [
    "UringChildWatcher",
    "ThreadedChildWatcher",
    "uring_supported",
    "ChildwatchEventLoop",
    "new_event_loop",
    "default_watcher",
]
