//! Pipes at volume, on both loop kinds, with real children: `read_to_end`
//! with the usual extension trait in scope is ours (linear, reading straight
//! into the caller's buffer), the generic trait path still gives the right
//! bytes, large reads take few system calls per megabyte, and writes to stdin
//! arrive whole. Speed itself is measured by `cargo bench --bench pipes`,
//! not here.

#![cfg(target_os = "linux")]

use std::sync::Mutex;

use childwatch::{Command, EventLoop, LoopKind, Stdio, get_running_loop};
use futures_util::io::{AsyncReadExt, AsyncWriteExt};

/// `/proc/self/io` counts are process-wide: one counting test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn kinds() -> Vec<LoopKind> {
    let mut v = vec![LoopKind::Selector];
    if EventLoop::proactor().is_ok() {
        v.push(LoopKind::Proactor);
    }
    v
}

fn run<F: std::future::Future>(kind: LoopKind, f: impl FnOnce() -> F) -> F::Output {
    let lp = EventLoop::new(kind).expect("loop");
    let out = lp.run_until_complete(f()).expect("run");
    lp.close().expect("close");
    out
}

fn head(bytes: usize) -> Command {
    let mut c = Command::new("head");
    c.arg("-c").arg(bytes.to_string()).arg("/dev/zero");
    c.stdout(Stdio::piped());
    c
}

/// Read system calls of this process so far (`syscr` in `/proc/self/io`).
fn read_syscalls() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("syscr:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn type_name_of<T>(_: &T) -> &'static str {
    std::any::type_name::<T>()
}

#[test]
fn method_call_read_to_end_is_ours_even_with_the_trait_in_scope() {
    for kind in kinds() {
        run(kind, || async {
            let mut p = head(10).spawn().expect("spawn");
            let mut buf = Vec::new();
            let out = p.stdout.as_mut().expect("piped");
            // Through `&mut ChildStdout`, as users write it.
            let fut = out.read_to_end(&mut buf);
            let name = type_name_of(&fut);
            assert!(
                !name.starts_with("futures_util"),
                "the extension trait's read_to_end was picked: {name}"
            );
            assert_eq!(fut.await.expect("read"), 10);
            let mut s = String::new();
            let mut q = head(3).spawn().expect("spawn");
            let mut stdout = q.stdout.take().expect("piped");
            let fut = stdout.read_to_string(&mut s);
            assert!(!type_name_of(&fut).starts_with("futures_util"));
            assert_eq!(fut.await.expect("read"), 3);
            assert_eq!(s, "\0\0\0");
            p.wait().await.expect("wait");
            q.wait().await.expect("wait");
        });
    }
}

#[test]
fn read_to_end_reads_every_byte_with_few_read_calls_per_megabyte() {
    let _s = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    const N: usize = 256 << 20;
    for kind in kinds() {
        let (n, calls) = run(kind, || async {
            let mut p = head(N).spawn().expect("spawn");
            let mut out = p.stdout.take().expect("piped");
            let mut buf = Vec::new();
            let before = read_syscalls();
            let n = out.read_to_end(&mut buf).await.expect("read");
            let calls = read_syscalls() - before;
            assert!(buf.iter().all(|&b| b == 0));
            assert_eq!(p.wait().await.expect("wait"), 0);
            (n, calls)
        });
        assert_eq!(n, N);
        // The writer (head) writes 4-8 KiB at a time; reads are bounded by
        // what the pipe holds (64 KiB). What must not happen is a read per
        // few bytes or per `Pending`-and-retry: allow 2 reads per 4 KiB.
        let per_mib = calls as f64 / (N >> 20) as f64;
        eprintln!(
            "{kind}: {calls} read calls for {} MiB ({per_mib:.1}/MiB)",
            N >> 20
        );
        assert!(per_mib <= 512.0, "{kind}: {per_mib:.1} read calls per MiB");
    }
}

#[test]
fn the_generic_trait_path_and_communicate_give_every_byte() {
    const N: usize = 3 << 20;
    for kind in kinds() {
        run(kind, || async {
            let mut p = head(N).spawn().expect("spawn");
            let mut out = p.stdout.take().expect("piped");
            let mut buf = Vec::new();
            // Fully qualified: the trait's own, quadratic but correct.
            let n = AsyncReadExt::read_to_end(&mut out, &mut buf)
                .await
                .expect("read");
            assert_eq!(n, N);
            p.wait().await.expect("wait");

            let mut p = head(N).spawn().expect("spawn");
            let (o, e) = p.communicate(None).await.expect("communicate");
            assert_eq!((o.len(), e.len()), (N, 0));
        });
    }
}

#[test]
fn large_writes_to_stdin_arrive_whole() {
    const N: usize = 64 << 20;
    for kind in kinds() {
        let counted = run(kind, || async {
            let mut p = Command::new("wc")
                .arg("-c")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn wc");
            let mut stdin = p.stdin.take().expect("piped");
            let mut stdout = p.stdout.take().expect("piped");
            let lp = get_running_loop().expect("running");
            let reader = lp.create_task(async move {
                let mut s = String::new();
                stdout.read_to_string(&mut s).await.map(|_| s)
            });
            let data = vec![7u8; N];
            stdin.write_all(&data).await.expect("write");
            stdin.close().await.expect("close");
            let s = reader.await.expect("read");
            assert_eq!(p.wait().await.expect("wait"), 0);
            s.trim().parse::<usize>().expect("a count")
        });
        assert_eq!(counted, N, "{kind}");
    }
}

#[test]
fn a_cancelled_read_loses_nothing() {
    for kind in kinds() {
        run(kind, || async {
            let mut p = Command::new("sh")
                .arg("-c")
                .arg("sleep 0.05; printf hello")
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn");
            let mut out = p.stdout.take().expect("piped");
            let mut buf = Vec::new();
            {
                // Polled once while the pipe is empty, then dropped.
                let mut fut = Box::pin(out.read_to_end(&mut buf));
                assert!(futures_util::poll!(fut.as_mut()).is_pending());
            }
            out.read_to_end(&mut buf).await.expect("read");
            assert_eq!(buf, b"hello");
            p.wait().await.expect("wait");
        });
    }
}

#[test]
fn a_pipe_that_outlives_its_loop_errors_instead_of_hanging() {
    for kind in kinds() {
        let first = EventLoop::new(kind).expect("loop");
        let (p, mut out) = first
            .run_until_complete(async {
                let mut p = Command::new("sleep")
                    .arg("3600")
                    .kill_on_drop(true)
                    .stdout(Stdio::piped())
                    .spawn()
                    .expect("spawn");
                let out = p.stdout.take().expect("piped");
                (p, out)
            })
            .expect("run");
        first.close().expect("close");
        // The pipe is empty and its loop is gone: waiting would never end.
        let second = EventLoop::new(kind).expect("loop");
        let res = second
            .run_until_complete(async {
                let mut v = Vec::new();
                out.read_to_end(&mut v).await
            })
            .expect("run");
        let err = res.expect_err("reading through a closed loop");
        assert!(err.to_string().contains("closed"), "{kind}: {err}");
        drop(p);
    }
}

/// The capacity of the pipe behind `fd`.
fn pipe_size(fd: std::os::fd::RawFd) -> usize {
    // SAFETY: F_GETPIPE_SZ only reads the pipe's size; `fd` is open.
    let n = unsafe { libc::fcntl(fd, libc::F_GETPIPE_SZ) };
    usize::try_from(n).unwrap_or(0)
}

#[test]
fn bulk_pipes_grow_within_a_process_wide_budget() {
    use std::os::fd::AsRawFd;
    const CHILDREN: usize = 24;
    for kind in kinds() {
        let sizes = run(kind, || async {
            let lp = get_running_loop().expect("running");
            let mut tasks = Vec::new();
            for _ in 0..CHILDREN {
                let mut p = head(16 << 20).spawn().expect("spawn");
                let mut out = p.stdout.take().expect("piped");
                tasks.push(lp.create_task(async move {
                    let mut buf = Vec::new();
                    out.read_to_end(&mut buf).await.expect("read");
                    p.wait().await.expect("wait");
                    (buf.len(), out)
                }));
            }
            let mut sizes = Vec::new();
            // Every reader is still open here, so every growth still counts.
            let mut keep = Vec::new();
            for t in tasks {
                let (n, out) = t.await;
                assert_eq!(n, 16 << 20);
                sizes.push(pipe_size(out.as_raw_fd()));
                keep.push(out);
            }
            sizes
        });
        let grown = sizes.iter().filter(|&&s| s > 64 * 1024).count();
        eprintln!("{kind}: {grown} of {CHILDREN} pipes grown");
        assert!(
            grown <= 16,
            "{kind}: {grown} pipes grown, over the budget of 16"
        );
    }
}

/// The first `n` bytes `yes abcdefg` writes (the line, repeated).
fn yes_bytes(n: usize) -> Vec<u8> {
    b"abcdefg\n".iter().copied().cycle().take(n).collect()
}

/// A child writing `n` bytes of `yes abcdefg` to a piped stdout.
fn yes(n: usize) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c").arg(format!("yes abcdefg | head -c {n}"));
    c.stdout(Stdio::piped());
    c
}

/// Reads `p`'s stdout to the end into `buf`, returns the count, waits for it.
async fn read_all(mut p: childwatch::Process, buf: &mut Vec<u8>) -> usize {
    let mut out = p.stdout.take().expect("piped");
    let n = out.read_to_end(buf).await.expect("read");
    assert_eq!(p.wait().await.expect("wait"), 0);
    n
}

#[test]
fn large_read_to_end_gives_exactly_the_bytes_into_any_vec() {
    // Past the sizes where the reader goes through a bounce buffer and
    // pre-faults the Vec's spare capacity: what lands in the Vec (and what
    // was in it before) must not depend on that, whatever the Vec's length
    // and capacity when the read starts, and wherever the switch happens.
    const N: usize = (80 << 20) + 12345;
    let want = yes_bytes(N);
    for kind in kinds() {
        run(kind, || async {
            // An empty Vec.
            let mut buf = Vec::new();
            assert_eq!(read_all(yes(N).spawn().expect("spawn"), &mut buf).await, N);
            assert!(buf == want, "{kind}: wrong bytes into an empty Vec");

            // Appending: an odd-length prefix, so the spare capacity starts
            // mid-page, in a Vec already past the bulk threshold (32 MiB).
            let prefix: Vec<u8> = (0..(40 << 20) + 7).map(|i| (i % 251) as u8).collect();
            let mut buf = prefix.clone();
            assert_eq!(read_all(yes(N).spawn().expect("spawn"), &mut buf).await, N);
            assert_eq!(buf.len(), prefix.len() + N, "{kind}");
            assert!(buf[..prefix.len()] == prefix[..], "{kind}: prefix changed");
            assert!(
                buf[prefix.len()..] == want[..],
                "{kind}: wrong bytes after a prefix"
            );

            // Spare capacity already there, large enough for all of it.
            let mut buf = Vec::with_capacity(N + (5 << 20) + 1);
            buf.extend_from_slice(b"head:");
            let cap = buf.capacity();
            assert_eq!(read_all(yes(N).spawn().expect("spawn"), &mut buf).await, N);
            assert_eq!(buf.capacity(), cap, "{kind}: grew a Vec that had room");
            assert!(buf[..5] == *b"head:" && buf[5..] == want[..], "{kind}");
        });
    }
}

#[test]
fn read_to_end_of_a_silent_child_leaves_the_vec_alone() {
    for kind in kinds() {
        run(kind, || async {
            let silent = || {
                let mut c = Command::new("true");
                c.stdout(Stdio::piped());
                c.spawn().expect("spawn true")
            };
            let mut buf = Vec::new();
            assert_eq!(read_all(silent(), &mut buf).await, 0);
            assert!(buf.is_empty(), "{kind}");

            // A big Vec with room (the bulk path runs) and some bytes.
            let mut buf = Vec::with_capacity(40 << 20);
            buf.extend_from_slice(b"kept");
            assert_eq!(read_all(silent(), &mut buf).await, 0);
            assert_eq!(buf, b"kept", "{kind}");
        });
    }
}
