"""Behaviour of childwatch's Python watchers and loop (asyncio's contract)."""

import asyncio
import gc
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import pytest

import childwatch

URING = childwatch.uring_supported()
HAS_WATCHER_API = hasattr(asyncio, "AbstractChildWatcher")

FACTORIES = [pytest.param(childwatch.ThreadedChildWatcher, id="threaded")]
if URING:
    FACTORIES += [
        pytest.param(childwatch.UringChildWatcher, id="uring"),
        pytest.param(lambda: childwatch.UringChildWatcher(fd_budget=0), id="uring-budget0"),
    ]


@pytest.fixture(params=FACTORIES)
def watcher(request):
    w = request.param()
    yield w
    w.close()


def _spawn(*args):
    return subprocess.Popen(list(args))


def _wait_for(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.005)
    return False


def _os_threads():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return -1


@pytest.mark.skipif(not HAS_WATCHER_API, reason="no asyncio.AbstractChildWatcher (3.14+)")
def test_is_an_asyncio_child_watcher(watcher):
    assert isinstance(watcher, asyncio.AbstractChildWatcher)


def test_active_until_closed_and_attach_loop_does_not_matter(watcher):
    assert watcher.is_active()
    watcher.attach_loop(None)
    assert watcher.is_active()
    with watcher as w:
        assert w is watcher
    watcher.close()
    assert not watcher.is_active()
    watcher.close()  # idempotent
    with pytest.raises(RuntimeError):
        watcher.add_child_handler(os.getpid(), lambda *a: None)


def test_callback_on_the_registering_loop_with_args(watcher):
    got = []

    async def main():
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        p = _spawn("/bin/sh", "-c", "exit 7")

        def cb(pid, rc, a, b):
            got.append((pid, rc, a, b, threading.get_ident()))
            done.set_result(None)

        watcher.add_child_handler(p.pid, cb, "a", "b")
        await asyncio.wait_for(done, 10)
        return p.pid

    pid = asyncio.run(main())
    assert got == [(pid, 7, "a", "b", threading.get_ident())]


def test_killed_child_gives_minus_signal(watcher):
    async def main():
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        p = _spawn("/bin/sleep", "30")
        watcher.add_child_handler(p.pid, lambda pid, rc: done.set_result(rc))
        os.kill(p.pid, signal.SIGKILL)
        return await asyncio.wait_for(done, 10)

    assert asyncio.run(main()) == -signal.SIGKILL


def test_child_that_exited_before_registration(watcher):
    p = _spawn("/bin/true")
    # It is a zombie by now (nobody reaps it).
    assert _wait_for(lambda: open(f"/proc/{p.pid}/stat").read().split(")")[1].split()[0] == "Z")

    async def main():
        done = asyncio.get_running_loop().create_future()
        watcher.add_child_handler(p.pid, lambda pid, rc: done.set_result(rc))
        return await asyncio.wait_for(done, 10)

    assert asyncio.run(main()) == 0


def test_no_loop_runs_inline_on_some_thread(watcher):
    got = []
    ev = threading.Event()
    p = _spawn("/bin/sh", "-c", "exit 3")

    def cb(pid, rc):
        got.append((pid, rc))
        ev.set()

    watcher.add_child_handler(p.pid, cb)
    assert ev.wait(10)
    assert got == [(p.pid, 3)]


def test_closed_loop_gives_a_warning_not_an_error(watcher, caplog):
    p = _spawn("/bin/sleep", "30")

    async def register():
        watcher.add_child_handler(p.pid, lambda *a: pytest.fail("called on a closed loop"))

    loop = asyncio.new_event_loop()
    loop.run_until_complete(register())
    loop.close()
    with caplog.at_level(logging.WARNING, logger="childwatch"):
        os.kill(p.pid, signal.SIGKILL)
        assert _wait_for(lambda: any("is closed" in r.getMessage() for r in caplog.records))
    rec = [r for r in caplog.records if "is closed" in r.getMessage()][0]
    assert rec.name == "childwatch" and rec.levelno == logging.WARNING
    # Logged from a Rust thread without leaving a _DummyThread behind.
    assert not [t for t in threading.enumerate() if isinstance(t, threading._DummyThread)]


def test_remove_child_handler(watcher):
    p = _spawn("/bin/sleep", "30")
    called = []
    watcher.add_child_handler(p.pid, lambda *a: called.append(a))
    assert watcher.remove_child_handler(p.pid) is True
    assert watcher.remove_child_handler(p.pid) is False
    os.kill(p.pid, signal.SIGKILL)
    p.wait()  # still ours to reap
    time.sleep(0.1)
    assert called == []


def test_same_pid_again_replaces(watcher):
    async def main():
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        p = _spawn("/bin/sleep", "30")
        watcher.add_child_handler(p.pid, lambda *a: done.set_result("old"))
        watcher.add_child_handler(p.pid, lambda *a: done.set_result("new"))
        os.kill(p.pid, signal.SIGKILL)
        r = await asyncio.wait_for(done, 10)
        await asyncio.sleep(0.05)
        return r

    assert asyncio.run(main()) == "new"


def test_callback_exception_goes_to_the_loop_exception_handler(watcher):
    async def main():
        loop = asyncio.get_running_loop()
        seen = loop.create_future()
        loop.set_exception_handler(lambda lp, ctx: seen.set_result(ctx))
        p = _spawn("/bin/true")

        def boom(pid, rc):
            raise ValueError("boom")

        watcher.add_child_handler(p.pid, boom)
        return await asyncio.wait_for(seen, 10)

    ctx = asyncio.run(main())
    assert isinstance(ctx["exception"], ValueError)


def test_inline_callback_exception_is_logged(watcher, caplog):
    p = _spawn("/bin/true")
    ev = threading.Event()

    def boom(pid, rc):
        ev.set()
        raise ValueError("boom")

    with caplog.at_level(logging.ERROR, logger="childwatch"):
        watcher.add_child_handler(p.pid, boom)
        assert ev.wait(10)
        assert _wait_for(lambda: any(r.exc_info for r in caplog.records))


@pytest.mark.skipif(not HAS_WATCHER_API, reason="no child watcher API (3.14+)")
@pytest.mark.parametrize("n", [1, 50])
def test_with_asyncio_create_subprocess_exec(watcher, n):
    async def main():
        async def one(i):
            p = await asyncio.create_subprocess_exec(
                sys.executable, "-c", f"print({i}); raise SystemExit({i % 5})",
                stdout=asyncio.subprocess.PIPE,
            )
            out, _ = await p.communicate()
            return int(out), p.returncode

        return await asyncio.gather(*(one(i) for i in range(n)))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        policy = asyncio.get_event_loop_policy()
        policy.set_child_watcher(watcher)
        try:
            res = asyncio.run(main())
        finally:
            policy.set_child_watcher(None)
    assert res == [(i, i % 5) for i in range(n)]


@pytest.mark.skipif(not URING, reason="io_uring WAITID unsupported here")
def test_uring_fd_budget():
    w = childwatch.UringChildWatcher(fd_budget=2)
    try:
        ps = [_spawn("/bin/sleep", "30") for _ in range(5)]
        ev = threading.Event()
        got = []

        def cb(pid, rc):
            got.append(rc)
            if len(got) == len(ps):
                ev.set()

        for p in ps:
            w.add_child_handler(p.pid, cb)
        st = w.stats()
        assert st["fd_budget"] == 2
        assert st["pidfds_held"] <= 2
        assert st["watched"] == 5
        for p in ps:
            os.kill(p.pid, signal.SIGKILL)
        assert ev.wait(10)
        assert got == [-9] * 5
    finally:
        w.close()
    with pytest.raises(ValueError):
        childwatch.UringChildWatcher(fd_budget=-1)


@pytest.mark.skipif(not URING, reason="io_uring WAITID unsupported here")
def test_uring_no_thread_per_child():
    w = childwatch.UringChildWatcher()
    try:
        before = _os_threads()
        ps = [_spawn("/bin/sleep", "30") for _ in range(40)]
        for p in ps:
            w.add_child_handler(p.pid, lambda *a: None)
        # No loop runs: at most the one lazily started reaper thread.
        assert _os_threads() - before <= 1
        for p in ps:
            os.kill(p.pid, signal.SIGKILL)
        assert _wait_for(lambda: w.stats()["watched"] == 0)
    finally:
        w.close()


def test_close_with_children_pending_delivers_nothing_and_leaves_no_zombie(watcher):
    p = _spawn("/bin/sleep", "30")
    called = []
    watcher.add_child_handler(p.pid, lambda *a: called.append(a))
    kind = watcher.stats()["kind"]
    watcher.close()
    assert not watcher.is_active()
    os.kill(p.pid, signal.SIGKILL)
    rc = p.wait(timeout=10)
    if kind == "Uring":
        # Uring cancels its waits: a live child becomes the caller's to reap.
        assert rc == -signal.SIGKILL
    # Threaded's waiter thread cannot be interrupted: it still reaps the
    # child (so Popen may find it gone and report 0) but calls nothing.
    time.sleep(0.1)
    assert called == []


def test_tracing_warnings_reach_the_python_logger(caplog):
    with caplog.at_level(logging.INFO, logger="childwatch"):
        childwatch._native._emit_log("warn", "a warning from Rust")
        childwatch._native._emit_log("error", "an error from Rust")
    recs = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    assert ("childwatch", logging.WARNING, "a warning from Rust") in recs
    assert ("childwatch", logging.ERROR, "an error from Rust") in recs


def _run_script(code, timeout=60):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=timeout,
    )


def test_closed_at_interpreter_exit():
    r = _run_script(
        """
        import atexit, subprocess
        state = {}
        # Registered before childwatch's own handler: runs after it (LIFO).
        atexit.register(lambda: print("active at exit", state["w"].is_active(), flush=True))
        import childwatch
        factory = childwatch.UringChildWatcher if childwatch.uring_supported() else childwatch.ThreadedChildWatcher
        state["w"] = w = factory()
        p = subprocess.Popen(["/bin/true"])
        w.add_child_handler(p.pid, lambda *a: None)
        print("active", w.is_active(), flush=True)
        """
    )
    assert r.returncode == 0, r.stderr
    assert "active True" in r.stdout
    assert "active at exit False" in r.stdout


def test_interpreter_exit_with_pending_children_does_not_hang():
    r = _run_script(
        """
        import asyncio, childwatch, subprocess
        w = childwatch.ThreadedChildWatcher()
        ps = [subprocess.Popen(["/bin/sleep", "0.2"]) for _ in range(5)]
        for p in ps:
            w.add_child_handler(p.pid, print)
        if childwatch.uring_supported():
            u = childwatch.UringChildWatcher()
            q = subprocess.Popen(["/bin/sleep", "0.2"])
            u.add_child_handler(q.pid, print)
        print("exiting", flush=True)
        """,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    assert "exiting" in r.stdout
    assert "Traceback" not in r.stderr, r.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_disabled_in_a_forked_child(watcher):
    p = _spawn("/bin/sleep", "30")
    watcher.add_child_handler(p.pid, lambda *a: None)
    r, wfd = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads, 3.12+
        child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            ok = not watcher.is_active()
            try:
                watcher.add_child_handler(os.getpid(), lambda *a: None)
                ok = False
            except RuntimeError:
                pass
            watcher.close()  # must not hang on the parent's threads
            os.write(wfd, b"ok" if ok else b"no")
        finally:
            os._exit(0)
    os.close(wfd)
    _, status = os.waitpid(child, 0)
    assert os.read(r, 2) == b"ok"
    os.close(r)
    assert os.waitstatus_to_exitcode(status) == 0
    assert watcher.is_active()  # the parent's watcher is untouched
    os.kill(p.pid, signal.SIGKILL)


def test_new_event_loop_runs_subprocesses():
    async def main():
        p = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "import sys; sys.stdout.write(sys.stdin.read().upper())",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await p.communicate(b"hello")
        q = await asyncio.create_subprocess_shell("exit 4")
        return out, p.returncode, await q.wait(), type(asyncio.get_running_loop())

    loop = childwatch.new_event_loop()
    try:
        out, rc, rc2, kind = loop.run_until_complete(main())
    finally:
        loop.close()
    assert (out, rc, rc2) == (b"HELLO", 0, 4)
    assert kind is childwatch.ChildwatchEventLoop


@pytest.mark.skipif(sys.version_info < (3, 12), reason="asyncio.run(loop_factory=) is 3.12+")
def test_asyncio_run_with_loop_factory():
    async def main():
        p = await asyncio.create_subprocess_exec("/bin/sh", "-c", "exit 9")
        return await p.wait()

    assert asyncio.run(main(), loop_factory=childwatch.new_event_loop) == 9


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.Runner is 3.11+")
def test_asyncio_runner_with_loop_factory():
    async def main():
        p = await asyncio.create_subprocess_shell("kill -9 $$")
        return await p.wait()

    with asyncio.Runner(loop_factory=childwatch.new_event_loop) as runner:
        assert runner.run(main()) == -signal.SIGKILL
        assert isinstance(runner.get_loop(), childwatch.ChildwatchEventLoop)


def test_new_event_loop_with_its_own_watcher():
    w = childwatch.ThreadedChildWatcher()

    async def main():
        p = await asyncio.create_subprocess_exec("/bin/sh", "-c", "exit 2")
        return await p.wait()

    loop = childwatch.new_event_loop(watcher=w)
    try:
        assert loop.child_watcher is w
        assert loop.run_until_complete(main()) == 2
        w.close()
        with pytest.raises(RuntimeError):
            loop.run_until_complete(main())
    finally:
        loop.close()
    gc.collect()


@pytest.mark.skipif(not URING, reason="io_uring WAITID unsupported here")
@pytest.mark.skipif(not HAS_WATCHER_API, reason="no child watcher API (3.14+)")
def test_uring_400_children_at_ulimit_256():
    # The scale target, in a fresh process (the limit is per process):
    # CPython's Pidfd watcher fails near child 250 here.
    r = _run_script(
        """
        import asyncio, os, resource, signal, subprocess, warnings, childwatch
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        def threads():
            return int([l for l in open("/proc/self/status") if l.startswith("Threads:")][0].split()[1])
        async def main():
            t0 = threads()
            ps = [await asyncio.create_subprocess_exec("/bin/sleep", "1000",
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                  for _ in range(400)]
            extra = threads() - t0
            fds = len(os.listdir("/proc/self/fd"))
            for p in ps:
                p.kill()
            rcs = await asyncio.wait_for(asyncio.gather(*(p.wait() for p in ps)), 60)
            print("extra_threads", extra, "fds", fds, "ok", rcs == [-signal.SIGKILL] * 400, flush=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            asyncio.set_child_watcher(childwatch.UringChildWatcher())
        asyncio.run(main())
        """,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    words = r.stdout.split()
    assert words[words.index("ok") + 1] == "True", r.stdout
    assert int(words[words.index("fds") + 1]) < 256
    # On an asyncio loop the host driver harvests: no thread at all.
    assert int(words[words.index("extra_threads") + 1]) == 0
