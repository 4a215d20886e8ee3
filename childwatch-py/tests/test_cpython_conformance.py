"""CPython's own subprocess tests, run against childwatch.

Imports the installed ``test.test_asyncio.test_subprocess`` and runs its
whole ``SubprocessWatcherMixin`` once per childwatch watcher (Uring with the
default descriptor budget, Uring with ``fd_budget=0`` so every child goes
through ``IORING_OP_WAITID``, Threaded), and its ``SubprocessMixin`` on
``childwatch.new_event_loop()``. On 3.11 the mixin holds 29 tests.

The test base (``test_utils.TestCase``) checks for leaked threads and a
changed environment; ``test_environment_unaltered`` at the end fails if any
of these tests altered it (what CPython's runner prints as "Warning --").
"""

import asyncio
import sys
import warnings

import pytest

import childwatch

try:
    from test import support
    from test.test_asyncio import test_subprocess as _cpy
    from test.test_asyncio import utils as _test_utils
except Exception as exc:  # pragma: no cover - depends on the Python build
    pytest.skip(
        f"CPython's test package is not installed for this Python ({exc!r}); "
        "install it (e.g. Debian's libpython3.X-testsuite) to run the conformance tests",
        allow_module_level=True,
    )

if sys.platform == "win32":  # pragma: no cover
    pytest.skip("Unix only", allow_module_level=True)

_Mixin = getattr(_cpy, "SubprocessWatcherMixin", None)
_HAS_WATCHERS = _Mixin is not None and hasattr(asyncio, "AbstractChildWatcher")
_URING = childwatch.uring_supported()


def _watcher_case(name, factory):
    """A TestCase class running the whole SubprocessWatcherMixin with
    ``factory()`` as the watcher (3.9-3.11 read ``Watcher``, 3.12-3.13 call
    ``_get_watcher``)."""

    def _get_watcher(self):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return factory()

    return type(
        name,
        (_Mixin, _test_utils.TestCase),
        {
            "Watcher": staticmethod(factory),
            "_get_watcher": _get_watcher,
            "__module__": __name__,
        },
    )


if _HAS_WATCHERS:
    if _URING:
        TestUringWatcher = _watcher_case("TestUringWatcher", childwatch.UringChildWatcher)
        TestUringWatcherBudget0 = _watcher_case(
            "TestUringWatcherBudget0", lambda: childwatch.UringChildWatcher(fd_budget=0)
        )
    TestThreadedWatcher = _watcher_case("TestThreadedWatcher", childwatch.ThreadedChildWatcher)


class TestChildwatchLoop(_cpy.SubprocessMixin, _test_utils.TestCase):
    """SubprocessMixin on childwatch.new_event_loop() (no child watcher set)."""

    def setUp(self):
        super().setUp()
        self.loop = childwatch.new_event_loop()
        self.set_event_loop(self.loop)


_altered_by = []


@pytest.fixture(autouse=True)
def _note_environment_changes(request):
    before = support.environment_altered
    yield
    if support.environment_altered and not before:
        _altered_by.append(request.node.nodeid)


def teardown_module():
    asyncio.set_event_loop_policy(None)


def test_environment_unaltered():
    # Runs after the classes above (pytest keeps definition order).
    assert not support.environment_altered, (
        "these tests altered the environment (a leaked thread, child or file; "
        f"run them with -s to see the 'Warning --' lines): {_altered_by}"
    )
