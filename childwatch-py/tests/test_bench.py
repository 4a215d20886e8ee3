"""Smoke test of ``python -m childwatch.bench`` at tiny sizes."""

import subprocess
import sys

import childwatch


def test_bench_runs_and_reports():
    runners = "raw,childwatch-threaded,childwatch-loop"
    if childwatch.uring_supported():
        runners += ",childwatch-uring"
    r = subprocess.run(
        [
            sys.executable, "-m", "childwatch.bench", "--runs", "1", "--n", "40",
            "--inflight", "8", "--scale-n", "20", "--nofile", "256", "--runners", runners,
        ],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "throughput: 40 x /bin/true" in out and "scale: 20 sleeping children" in out
    for name in runners.split(","):
        assert name in out
    assert "failed" not in out, out


def test_bench_lists_runners():
    r = subprocess.run(
        [sys.executable, "-m", "childwatch.bench", "--list"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "childwatch-uring" in r.stdout and "asyncio-pidfd" in r.stdout
