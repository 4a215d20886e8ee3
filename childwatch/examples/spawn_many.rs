//! Spawns `N` × `/bin/true`, `J` in flight, under the default watcher, and
//! prints the rate: the throughput shape of `childwatch bench`, small enough
//! to run under `strace -c -f` to count syscalls per spawn.
//!
//! `cargo run --release -p childwatch --example spawn_many -- [N] [J] [proactor|selector]`

#[cfg(target_os = "linux")]
fn main() -> std::io::Result<()> {
    use std::collections::VecDeque;
    use std::time::Instant;

    use childwatch::{EventLoop, create_subprocess_exec};

    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2000);
    let j: usize = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(64)
        .max(1);
    let lp = match args.next().as_deref() {
        Some("selector") => EventLoop::selector()?,
        Some("proactor") => EventLoop::proactor()?,
        _ => childwatch::new_event_loop()?,
    };
    let lp2 = lp.clone();
    let started = Instant::now();
    let failed = lp.run_until_complete(async move {
        let mut inflight = VecDeque::new();
        let mut failed = 0usize;
        for _ in 0..n {
            if inflight.len() == j {
                let t: childwatch::Task<std::io::Result<i32>> = inflight.pop_front().unwrap();
                failed += usize::from(!matches!(t.await, Ok(0)));
            }
            inflight.push_back(lp2.create_task(async {
                create_subprocess_exec("/bin/true", [] as [&str; 0])
                    .spawn()?
                    .wait()
                    .await
            }));
        }
        for t in inflight {
            failed += usize::from(!matches!(t.await, Ok(0)));
        }
        failed
    })?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{n} spawns ({j} in flight, {:?} loop): {secs:.3} s, {:.0} spawns/s, {failed} failed",
        lp.kind(),
        n as f64 / secs
    );
    lp.close()
}

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("the subprocess layer is Linux-only for now");
}
