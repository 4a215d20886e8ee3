"""Benchmark: childwatch's watchers beside CPython's own and uvloop, from Python.

    python -m childwatch.bench                 # both scenarios, 3 runs each
    python -m childwatch.bench --quick         # small sizes, 1 run (smoke test)
    python -m childwatch.bench --scenario scale --scale-n 1000 --nofile 512

Scenarios (the same workloads as the Rust ``childwatch bench``):

* **throughput**: ``--n`` (2,000) x ``/bin/true`` through
  ``asyncio.create_subprocess_exec``, ``--inflight`` (64) at a time.
* **scale**: ``--scale-n`` (400) sleeping children started with the soft
  ``RLIMIT_NOFILE`` lowered to ``--nofile`` (256); then SIGKILL all and wait
  for all. Reports whether every child was started and reaped, the extra OS
  threads and the descriptors held at the peak, the start time and the
  kill + reap time.

Every run of every runner is a fresh Python process (so one runner's
threads, descriptors or SIGCHLD handler never touch the next), the runners
take turns run after run, and each figure is the median of ``--runs`` runs.
A runner that fails (CPython's Pidfd watcher at the descriptor limit, a
status lost by MultiLoop, a timeout) is reported with its reason instead of
a figure.
"""

import argparse
import asyncio
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
import warnings

# ---------------------------------------------------------------- runners --

RUNNERS = [
    # name, description
    ("raw", "subprocess.Popen + os.waitpid(-1), no asyncio (throughput only)"),
    ("childwatch-uring", "childwatch.UringChildWatcher via asyncio.set_child_watcher"),
    ("childwatch-uring-b0", "childwatch.UringChildWatcher(fd_budget=0): WAITID only"),
    ("childwatch-threaded", "childwatch.ThreadedChildWatcher via asyncio.set_child_watcher"),
    ("childwatch-loop", "childwatch.new_event_loop() (its default watcher)"),
    ("asyncio-threaded", "CPython's ThreadedChildWatcher"),
    ("asyncio-pidfd", "CPython's PidfdChildWatcher"),
    ("asyncio-safe", "CPython's SafeChildWatcher"),
    ("asyncio-fast", "CPython's FastChildWatcher"),
    ("asyncio-multiloop", "CPython's MultiLoopChildWatcher"),
    ("asyncio-default", "CPython's default loop (3.14+: its own pidfd/thread watching)"),
    ("uvloop", "uvloop's loop (libuv's SIGCHLD handling)"),
]
DESCRIPTIONS = dict(RUNNERS)


def _has_watchers():
    return hasattr(asyncio, "AbstractChildWatcher")


def available_runners():
    """Runner names usable in this Python, and why the others are not."""
    ok, skipped = [], {}
    uring = None
    try:
        import childwatch

        uring = childwatch.uring_supported()
    except ImportError as exc:  # pragma: no cover
        skipped["childwatch-*"] = f"childwatch not importable: {exc}"
    for name, _ in RUNNERS:
        if name.startswith("childwatch-uring") and not uring:
            skipped[name] = "io_uring WAITID (Linux 6.7+) unsupported here"
        elif name.startswith("childwatch-") and name != "childwatch-loop" and not _has_watchers():
            skipped[name] = "no child watchers in this Python (3.14+)"
        elif name.startswith("asyncio-") and name != "asyncio-default" and not _has_watchers():
            skipped[name] = "removed in Python 3.14"
        elif name == "asyncio-default" and _has_watchers():
            skipped[name] = "same as asyncio-threaded before 3.14"
        elif name == "asyncio-pidfd" and not _pidfd_ok():
            skipped[name] = "pidfd_open unsupported"
        elif name == "uvloop" and not _importable("uvloop"):
            skipped[name] = "uvloop not installed"
        else:
            ok.append(name)
    return ok, skipped


def _importable(mod):
    try:
        __import__(mod)
        return True
    except ImportError:
        return False


def _pidfd_ok():
    if not hasattr(os, "pidfd_open") or not hasattr(asyncio, "PidfdChildWatcher"):
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))
        return True
    except OSError:
        return False


def _make_watcher(name):
    import childwatch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return {
            "childwatch-uring": lambda: childwatch.UringChildWatcher(),
            "childwatch-uring-b0": lambda: childwatch.UringChildWatcher(fd_budget=0),
            "childwatch-threaded": childwatch.ThreadedChildWatcher,
            "asyncio-threaded": lambda: asyncio.ThreadedChildWatcher(),
            "asyncio-pidfd": lambda: asyncio.PidfdChildWatcher(),
            "asyncio-safe": lambda: asyncio.SafeChildWatcher(),
            "asyncio-fast": lambda: asyncio.FastChildWatcher(),
            "asyncio-multiloop": lambda: asyncio.MultiLoopChildWatcher(),
        }[name]()


def _run_on(name, coro_fn):
    """Runs ``coro_fn()`` the way runner ``name`` runs asyncio programs."""
    if name == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    elif name == "childwatch-loop":
        import childwatch

        factory = childwatch.new_event_loop
    else:
        factory = asyncio.new_event_loop
    loop = factory()
    watcher = None
    try:
        asyncio.set_event_loop(loop)
        if name.startswith(("childwatch-", "asyncio-")) and name not in (
            "childwatch-loop",
            "asyncio-default",
        ):
            watcher = _make_watcher(name)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                watcher.attach_loop(loop)
                asyncio.get_event_loop_policy().set_child_watcher(watcher)
        return loop.run_until_complete(coro_fn())
    finally:
        if watcher is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                asyncio.get_event_loop_policy().set_child_watcher(None)
        asyncio.set_event_loop(None)
        loop.close()


# -------------------------------------------------------------- scenarios --


def _os_threads():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


def _fds():
    return len(os.listdir("/proc/self/fd"))


def throughput_raw(n, inflight):
    # The same spawn path as asyncio (subprocess.Popen: vfork + exec), with
    # a blocking waitpid(-1) instead of a watcher and a loop.
    t0 = time.perf_counter()
    started = 0
    running = {}
    while started < n or running:
        while started < n and len(running) < inflight:
            p = subprocess.Popen(["/bin/true"])
            running[p.pid] = p
            started += 1
        pid, status = os.waitpid(-1, 0)
        p = running.pop(pid)
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            raise RuntimeError("a /bin/true failed")
    return {"time": time.perf_counter() - t0}


def throughput(name, n, inflight):
    if name == "raw":
        return throughput_raw(n, inflight)

    async def main():
        sem = asyncio.Semaphore(inflight)
        bad = 0

        async def one():
            nonlocal bad
            async with sem:
                p = await asyncio.create_subprocess_exec("/bin/true")
                if await p.wait() != 0:
                    bad += 1

        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(one() for _ in range(n))), 300)
        elapsed = time.perf_counter() - t0
        if bad:
            raise RuntimeError(f"{bad} of {n} exits reported with a wrong status")
        return {"time": elapsed}

    return _run_on(name, main)


def scale(name, n, nofile):
    if name == "raw":
        raise RuntimeError("not applicable")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(nofile, hard), hard))
    procs = []
    out = {"n": n, "nofile": nofile}

    async def main():
        threads0 = _os_threads()
        t0 = time.perf_counter()
        error = None
        for i in range(n):
            try:
                p = await asyncio.create_subprocess_exec(
                    "/bin/sleep", "1000",
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            except Exception as exc:
                error = f"failed at child {i + 1} of {n}: {type(exc).__name__}: {exc}"
                break
            procs.append(p)
        out["start"] = time.perf_counter() - t0
        out["started"] = len(procs)
        out["threads"] = _os_threads() - threads0
        out["fds"] = _fds()
        t1 = time.perf_counter()
        for p in procs:
            try:
                p.kill()
            except ProcessLookupError:
                pass
        try:
            rcs = await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), 60)
        except asyncio.TimeoutError:
            missing = sum(p.returncode is None for p in procs)
            raise RuntimeError(f"{missing} exits never reported within 60 s (lost statuses)")
        out["kill_reap"] = time.perf_counter() - t1
        wrong = sum(rc != -signal.SIGKILL for rc in rcs)
        if wrong:
            error = (error + "; " if error else "") + f"{wrong} wrong statuses (255: lost)"
        if error:
            out["error"] = error
        return out

    try:
        return _run_on(name, main)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _child_main(args):
    """One run of one runner, in this fresh process; prints one JSON line."""
    try:
        if args.scenario == "throughput":
            res = throughput(args.runner, args.n, args.inflight)
        else:
            res = scale(args.runner, args.scale_n, args.nofile)
    except BaseException as exc:
        res = {"error": f"{type(exc).__name__}: {exc}"}
    print("RESULT " + json.dumps(res), flush=True)
    sys.stdout.flush()
    os._exit(0)  # do not wait for anything left behind; the parent cleans up


# ----------------------------------------------------------------- parent --


def _one_run(runner, scenario, args):
    cmd = [
        sys.executable, "-m", "childwatch.bench", "--child", "--runner", runner,
        "--scenario", scenario, "--n", str(args.n), "--inflight", str(args.inflight),
        "--scale-n", str(args.scale_n), "--nofile", str(args.nofile),
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        out, err = "", ""
        res = {"error": f"timed out after {args.timeout} s"}
    else:
        lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        res = json.loads(lines[-1][7:]) if lines else {
            "error": f"no result (exit {proc.returncode}): {err.strip()[-300:]}"
        }
    # Whatever the run left (sleepers of a failed runner) is in its group.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    return res


def _median(runs, key):
    vals = [r[key] for r in runs if key in r]
    return statistics.median(vals) if vals else None


def _fmt_time(t):
    return "-" if t is None else f"{t:.3f}s"


def report(results, scenario, args, names):
    lines = []
    if scenario == "throughput":
        lines.append(
            f"throughput: {args.n} x /bin/true, {args.inflight} in flight, "
            f"median of {args.runs} runs (vs raw: higher is faster)"
        )
        lines.append(f"{'runner':<22} {'time':>9} {'spawns/s':>9} {'vs raw':>7}  note")
        raw = _median([r for r in results.get("raw", []) if "error" not in r], "time")
        for name in names:
            runs = results[name]
            good = [r for r in runs if "error" not in r]
            t = _median(good, "time")
            errs = sorted({r["error"] for r in runs if "error" in r})
            note = f"{len(runs) - len(good)}/{len(runs)} failed: {errs[0]}" if errs else ""
            rate = f"{args.n / t:.0f}" if t else "-"
            ratio = f"{raw / t:.2f}" if t and raw else "-"
            lines.append(f"{name:<22} {_fmt_time(t):>9} {rate:>9} {ratio:>7}  {note}".rstrip())
    else:
        lines.append(
            f"scale: {args.scale_n} sleeping children at RLIMIT_NOFILE {args.nofile}, "
            f"SIGKILL all, reap all, median of {args.runs} runs"
        )
        lines.append(
            f"{'runner':<22} {'started':>8} {'threads':>8} {'fds':>5} {'start':>8} "
            f"{'kill+reap':>10}  note"
        )
        for name in names:
            runs = results[name]
            done = [r for r in runs if "kill_reap" in r]
            errs = sorted({r["error"] for r in runs if "error" in r})
            note = f"{sum('error' in r for r in runs)}/{len(runs)} failed: {errs[0]}" if errs else ""
            def num(key):
                v = _median(done, key)
                return "-" if v is None else f"{v:.0f}"

            lines.append(
                f"{name:<22} {num('started'):>8} {num('threads'):>8} {num('fds'):>5} "
                f"{_fmt_time(_median(done, 'start')):>8} "
                f"{_fmt_time(_median(done, 'kill_reap')):>10}  {note}".rstrip()
            )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m childwatch.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", default="throughput,scale", help="throughput, scale or both (comma-separated)")
    p.add_argument("--runners", default="", help="comma-separated runner names (default: all available)")
    p.add_argument("--runs", type=int, default=3, help="runs per runner (median)")
    p.add_argument("--n", type=int, default=2000, help="throughput: children")
    p.add_argument("--inflight", type=int, default=64, help="throughput: children at a time")
    p.add_argument("--scale-n", type=int, default=400, help="scale: sleeping children")
    p.add_argument("--nofile", type=int, default=256, help="scale: soft RLIMIT_NOFILE")
    p.add_argument("--timeout", type=float, default=300, help="seconds per run before it counts as failed")
    p.add_argument("--quick", action="store_true", help="n=200, scale-n=100, 1 run")
    p.add_argument("--json", action="store_true", help="print the raw results as JSON")
    p.add_argument("--list", action="store_true", help="list the runners and exit")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--runner", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child_main(args)
        return 0
    if args.quick:
        args.n, args.scale_n, args.runs = 200, 100, 1

    ok, skipped = available_runners()
    if args.list:
        for name, desc in RUNNERS:
            state = "available" if name in ok else f"unavailable: {skipped.get(name, '?')}"
            print(f"{name:<22} {desc} [{state}]")
        return 0
    names = [r for r in args.runners.split(",") if r] or ok
    unknown = [r for r in names if r not in DESCRIPTIONS]
    if unknown:
        p.error(f"unknown runner(s): {', '.join(unknown)} (see --list)")
    scenarios = [s for s in args.scenario.split(",") if s]

    print(
        f"# Python {sys.version.split()[0]}, Linux {os.uname().release}, "
        f"{os.cpu_count()} CPUs; skipped: "
        + (", ".join(f"{k} ({v})" for k, v in skipped.items() if k not in names) or "none"),
        flush=True,
    )
    everything = {}
    for scenario in scenarios:
        these = [r for r in names if not (scenario == "scale" and r == "raw")]
        results = {r: [] for r in these}
        for _ in range(args.runs):
            for r in these:  # runners take turns, so drift hits all alike
                results[r].append(_one_run(r, scenario, args))
        everything[scenario] = results
        print(report(results, scenario, args, these), flush=True)
        print(flush=True)
    if args.json:
        print(json.dumps(everything, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
