//! Pipe throughput: bytes from a child's stdout read to the end, and bytes
//! written to a child's stdin, on both loop kinds, beside the same transfer
//! through blocking `std::process` pipes in a thread — all in one run, so the
//! ratios compare like with like on a shared machine.
//!
//! ```text
//! cargo bench -p childwatch --bench pipes              # 10 MiB and 1 GiB
//! cargo bench -p childwatch --bench pipes -- 100M 1G   # chosen sizes
//! cargo bench -p childwatch --bench pipes -- 1G read proactor  # a subset
//! ```
//!
//! Read: `head -c N /dev/zero`, read with `read_to_end` (the method-call
//! form users write with `futures_util::io::AsyncReadExt` in scope).
//! Stream: the same child, read with `read` into one reused 1 MiB buffer
//! (the pipe path alone, without a growing `Vec`'s page faults).
//! Write: `cat > /dev/null`, fed with `write_all` from a 1 MiB buffer.
//! The ways take turns within each repetition (so a busy machine slows all
//! of them alike); each figure is the median over the repetitions. "vs
//! blocking" divides the loop's wall time by the blocking pipe's at the same
//! size; "CPU" is this process's user + system time (all its threads), which
//! a loaded machine disturbs less than wall time; "faults" its minor page
//! faults (including pages populated ahead with `madvise`), which tell a
//! transfer into fresh memory from one into reused heap memory.
//!
//! Not criterion: a 1 GiB transfer takes about a second, and criterion's
//! sampling would make one run take minutes.

#[cfg(target_os = "linux")]
fn main() {
    linux::main();
}

/// Elsewhere there is nothing to measure: the children are `head` and `cat`.
#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("the pipes bench runs on Linux only");
}

#[cfg(target_os = "linux")]
mod linux {
    use std::io::{Read, Write};
    use std::process::Stdio as StdStdio;
    use std::time::{Duration, Instant};

    use childwatch::{Command, EventLoop, LoopKind, Stdio};
    use futures_util::io::{AsyncReadExt, AsyncWriteExt};

    const CHUNK: usize = 1 << 20;

    #[derive(Clone, Copy, PartialEq)]
    enum Way {
        Blocking,
        Loop(LoopKind),
        /// The extension trait's generic `read_to_end`, for contrast.
        TraitPath(LoopKind),
    }

    impl Way {
        fn name(self) -> String {
            match self {
                Way::Blocking => "blocking std::process".into(),
                Way::Loop(k) => format!("{k} loop"),
                Way::TraitPath(k) => format!("{k} loop, AsyncReadExt::read_to_end (UFCS)"),
            }
        }
    }

    /// `head -c n /dev/zero` with its stdout piped, through `std::process`.
    fn spawn_head_blocking(n: usize) -> std::process::Child {
        std::process::Command::new("head")
            .arg("-c")
            .arg(n.to_string())
            .arg("/dev/zero")
            .stdout(StdStdio::piped())
            .spawn()
            .expect("spawn head")
    }

    fn read_blocking(n: usize) -> Duration {
        let t = Instant::now();
        let mut child = spawn_head_blocking(n);
        let mut out = child.stdout.take().expect("piped");
        let reader = std::thread::spawn(move || {
            let mut buf = Vec::new();
            out.read_to_end(&mut buf).expect("read");
            buf.len()
        });
        let got = reader.join().expect("reader thread");
        child.wait().expect("wait");
        assert_eq!(got, n);
        t.elapsed()
    }

    fn stream_blocking(n: usize) -> Duration {
        let t = Instant::now();
        let mut child = spawn_head_blocking(n);
        let mut out = child.stdout.take().expect("piped");
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; CHUNK];
            let mut total = 0;
            loop {
                match out.read(&mut buf).expect("read") {
                    0 => return total,
                    k => total += k,
                }
            }
        });
        let got = reader.join().expect("reader thread");
        child.wait().expect("wait");
        assert_eq!(got, n);
        t.elapsed()
    }

    /// `head -c n /dev/zero` with its stdout piped, on the running loop.
    fn spawn_head(n: usize) -> childwatch::Process {
        Command::new("head")
            .arg("-c")
            .arg(n.to_string())
            .arg("/dev/zero")
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn head")
    }

    fn stream_loop(kind: LoopKind, n: usize) -> Duration {
        let lp = EventLoop::new(kind).expect("loop");
        let t = Instant::now();
        let got = lp
            .run_until_complete(async {
                let mut p = spawn_head(n);
                let mut out = p.stdout.take().expect("piped");
                let mut buf = vec![0u8; CHUNK];
                let mut total = 0;
                loop {
                    match out.read(&mut buf).await.expect("read") {
                        0 => break,
                        k => total += k,
                    }
                }
                p.wait().await.expect("wait");
                total
            })
            .expect("run");
        let el = t.elapsed();
        lp.close().expect("close");
        assert_eq!(got, n);
        el
    }

    fn write_blocking(n: usize) -> Duration {
        let data = vec![1u8; CHUNK];
        let t = Instant::now();
        let mut child = std::process::Command::new("cat")
            .stdin(StdStdio::piped())
            .stdout(StdStdio::null())
            .spawn()
            .expect("spawn cat");
        let mut stdin = child.stdin.take().expect("piped");
        let writer = std::thread::spawn(move || {
            let mut left = n;
            while left > 0 {
                let k = left.min(CHUNK);
                stdin.write_all(&data[..k]).expect("write");
                left -= k;
            }
        });
        writer.join().expect("writer thread");
        assert!(child.wait().expect("wait").success());
        t.elapsed()
    }

    fn read_loop(kind: LoopKind, n: usize, trait_path: bool) -> Duration {
        let lp = EventLoop::new(kind).expect("loop");
        let t = Instant::now();
        let got = lp
            .run_until_complete(async {
                let mut p = spawn_head(n);
                let mut out = p.stdout.take().expect("piped");
                let mut buf = Vec::new();
                if trait_path {
                    AsyncReadExt::read_to_end(&mut out, &mut buf)
                        .await
                        .expect("read");
                } else {
                    out.read_to_end(&mut buf).await.expect("read");
                }
                p.wait().await.expect("wait");
                buf.len()
            })
            .expect("run");
        let el = t.elapsed();
        lp.close().expect("close");
        assert_eq!(got, n);
        el
    }

    fn write_loop(kind: LoopKind, n: usize) -> Duration {
        let lp = EventLoop::new(kind).expect("loop");
        let data = vec![1u8; CHUNK];
        let t = Instant::now();
        let rc = lp
            .run_until_complete(async {
                let mut p = Command::new("cat")
                    .stdin(Stdio::piped())
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("spawn cat");
                let mut stdin = p.stdin.take().expect("piped");
                let mut left = n;
                while left > 0 {
                    let k = left.min(CHUNK);
                    stdin.write_all(&data[..k]).await.expect("write");
                    left -= k;
                }
                stdin.close().await.expect("close");
                p.wait().await.expect("wait")
            })
            .expect("run");
        let el = t.elapsed();
        lp.close().expect("close");
        assert_eq!(rc, 0);
        el
    }

    fn median(mut v: Vec<Duration>) -> Duration {
        v.sort();
        v.get(v.len() / 2).copied().unwrap_or_default()
    }

    /// User + system time and minor page faults of this process so far.
    fn usage() -> (Duration, u64) {
        // SAFETY: getrusage only writes into the struct we pass.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: RUSAGE_SELF with a valid pointer.
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
        let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
        (tv(ru.ru_utime) + tv(ru.ru_stime), ru.ru_minflt as u64)
    }

    /// Wall time, CPU time and minor page faults of one transfer.
    fn measure(f: impl FnOnce() -> Duration) -> (Duration, Duration, u64) {
        let (c0, f0) = usage();
        let wall = f();
        let (c1, f1) = usage();
        (wall, c1.saturating_sub(c0), f1.saturating_sub(f0))
    }

    fn parse_size(s: &str) -> Option<usize> {
        let (num, mul) = match s.chars().last()? {
            'K' | 'k' => (&s[..s.len() - 1], 1 << 10),
            'M' | 'm' => (&s[..s.len() - 1], 1 << 20),
            'G' | 'g' => (&s[..s.len() - 1], 1 << 30),
            _ => (s, 1),
        };
        num.parse::<usize>().ok().map(|n| n * mul)
    }

    fn human(n: usize) -> String {
        if n >= 1 << 30 {
            format!("{} GiB", n >> 30)
        } else {
            format!("{} MiB", n >> 20)
        }
    }

    pub fn main() {
        // `cargo bench` passes `--bench`; sizes are the other arguments.
        let args: Vec<String> = std::env::args()
            .skip(1)
            .filter(|a| !a.starts_with('-'))
            .collect();
        let mut sizes: Vec<usize> = args.iter().filter_map(|a| parse_size(a)).collect();
        // Other words keep only the directions and ways they name.
        let words: Vec<&str> = args
            .iter()
            .filter(|a| parse_size(a).is_none())
            .map(|a| a.as_str())
            .collect();
        let wanted = |dir: &str, way: Way| {
            let dirs = ["read", "stream", "write"];
            let dir_ok = !words.iter().any(|w| dirs.contains(w)) || words.contains(&dir);
            let name = way.name();
            let way_words: Vec<&&str> = words.iter().filter(|w| !dirs.contains(*w)).collect();
            dir_ok && (way_words.is_empty() || way_words.iter().any(|w| name.starts_with(**w)))
        };
        if sizes.is_empty() {
            sizes = vec![10 << 20, 1 << 30];
        }
        let mut kinds = vec![LoopKind::Selector];
        if childwatch::proactor_supported() {
            kinds.insert(0, LoopKind::Proactor);
        }
        let mut ways = vec![Way::Blocking];
        ways.extend(kinds.iter().map(|&k| Way::Loop(k)));

        // (direction, way, size) -> median wall time, CPU time and faults
        let mut rows: Vec<(&str, Way, usize, Duration, Duration, u64)> = Vec::new();
        for &n in &sizes {
            // A 10 MiB transfer takes about 10 ms, a few scheduler slices
            // of whatever else runs: more repetitions steady its median.
            let runs = if n >= 256 << 20 { 5 } else { 31 };
            let mut plan: Vec<(&str, Way)> = Vec::new();
            for dir in ["read", "stream", "write"] {
                plan.extend(ways.iter().map(|&w| (dir, w)));
            }
            // The generic trait path is quadratic: shown at small sizes only.
            if n <= 64 << 20 {
                plan.extend(kinds.iter().map(|&k| ("read", Way::TraitPath(k))));
            }
            plan.retain(|&(dir, way)| wanted(dir, way));
            let mut times: Vec<Vec<(Duration, Duration, u64)>> = vec![Vec::new(); plan.len()];
            for _ in 0..runs {
                for (i, &(dir, way)) in plan.iter().enumerate() {
                    times[i].push(measure(|| match (dir, way) {
                        ("read", Way::Blocking) => read_blocking(n),
                        ("read", Way::Loop(k)) => read_loop(k, n, false),
                        ("read", Way::TraitPath(k)) => read_loop(k, n, true),
                        ("stream", Way::Loop(k)) => stream_loop(k, n),
                        ("stream", _) => stream_blocking(n),
                        (_, Way::Loop(k)) => write_loop(k, n),
                        _ => write_blocking(n),
                    }));
                }
            }
            for (i, &(dir, way)) in plan.iter().enumerate() {
                let wall = median(times[i].iter().map(|t| t.0).collect());
                let cpu = median(times[i].iter().map(|t| t.1).collect());
                let mut faults: Vec<u64> = times[i].iter().map(|t| t.2).collect();
                faults.sort();
                let faults = faults.get(faults.len() / 2).copied().unwrap_or(0);
                rows.push((dir, way, n, wall, cpu, faults));
            }
        }

        println!(
            "| direction | way | size | wall (s) | MiB/s | vs blocking | MiB/s vs smallest size | CPU (s) | faults |"
        );
        println!("|---|---|---|---|---|---|---|---|---|");
        for &(dir, way, n, t, cpu, faults) in &rows {
            let mibs = (n as f64 / (1 << 20) as f64) / t.as_secs_f64();
            let base = rows
                .iter()
                .find(|r| r.0 == dir && r.1 == Way::Blocking && r.2 == n)
                .map(|r| t.as_secs_f64() / r.3.as_secs_f64())
                .unwrap_or(f64::NAN);
            let small = rows
                .iter()
                .find(|r| r.0 == dir && r.1 == way)
                .map(|r| {
                    let m0 = (r.2 as f64 / (1 << 20) as f64) / r.3.as_secs_f64();
                    mibs / m0
                })
                .unwrap_or(f64::NAN);
            println!(
                "| {dir} | {} | {} | {:.3} | {:.0} | {:.2}x | {:.2} | {:.3} | {faults} |",
                way.name(),
                human(n),
                t.as_secs_f64(),
                mibs,
                base,
                small,
                cpu.as_secs_f64()
            );
        }
    }
}
