//! Runs 100 commands concurrently, one task each, and checks that every
//! exit status and output arrives: the job-runner shape this crate is for.
//!
//! `cargo run -p childwatch --example concurrent`

#[cfg(target_os = "linux")]
use std::time::Instant;

#[cfg(target_os = "linux")]
use childwatch::{Stdio, create_subprocess_shell, new_event_loop};

#[cfg(target_os = "linux")]
fn main() -> std::io::Result<()> {
    const N: usize = 100;
    let lp = new_event_loop()?;
    let started = Instant::now();
    let lp2 = lp.clone();
    let results = lp.run_until_complete(async move {
        let tasks: Vec<_> = (0..N)
            .map(|i| {
                lp2.create_task(async move {
                    let mut p = create_subprocess_shell(&format!("echo job {i}; exit {}", i % 4))
                        .stdout(Stdio::piped())
                        .spawn()?;
                    let (out, _) = p.communicate(None).await?;
                    Ok::<_, std::io::Error>((i, p.returncode(), out))
                })
            })
            .collect();
        let mut results = Vec::with_capacity(N);
        for t in tasks {
            results.push(t.await);
        }
        results
    })?;
    let mut ok = 0;
    for r in results {
        let (i, rc, out) = r?;
        assert_eq!(rc, Some((i % 4) as i32), "job {i}");
        assert_eq!(out, format!("job {i}\n").into_bytes(), "job {i}");
        ok += 1;
    }
    println!(
        "{ok} of {N} jobs ran and reported their status in {:.1} ms ({:?} loop)",
        started.elapsed().as_secs_f64() * 1e3,
        lp.kind()
    );
    lp.close()
}

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("the subprocess layer is Linux-only for now");
}
