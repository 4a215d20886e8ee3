//! The peers childwatch is compared with, each used the way its own
//! documentation shows: `tokio::process` on a current-thread runtime,
//! `async-process` under `futures_lite::future::block_on` (its reaper runs
//! in the background), and `std::process` with one thread blocked in
//! `Child::wait` per child.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use super::sys::{self, Program};
use super::{Released, Runner};

fn signal_rc(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(s)) => -s,
        _ => 255,
    }
}

/// `tokio::process` on a current-thread runtime.
pub struct Tokio {
    rt: tokio::runtime::Runtime,
    short: String,
    long: (String, Vec<String>),
    held: Vec<(u32, tokio::task::JoinHandle<i32>)>,
}

impl std::fmt::Debug for Tokio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tokio")
    }
}

impl Tokio {
    /// A current-thread runtime with its IO and signal drivers.
    pub fn new(short: &Program, long: &Program) -> Result<Tokio> {
        Ok(Tokio {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot build the tokio runtime")?,
            short: short.path().to_string(),
            long: (
                long.path().to_string(),
                long.rest().into_iter().map(String::from).collect(),
            ),
            held: Vec::new(),
        })
    }
}

impl Runner for Tokio {
    fn run_short(&mut self, n: usize, inflight: usize) -> Result<Duration> {
        let next = Arc::new(AtomicUsize::new(0));
        let prog = self.short.clone();
        let t0 = Instant::now();
        self.rt.block_on(async {
            let mut workers = Vec::new();
            for _ in 0..inflight.min(n) {
                let (next, prog) = (Arc::clone(&next), prog.clone());
                workers.push(tokio::spawn(async move {
                    while next.fetch_add(1, Ordering::Relaxed) < n {
                        tokio::process::Command::new(&prog).spawn()?.wait().await?;
                    }
                    Ok::<(), std::io::Error>(())
                }));
            }
            for w in workers {
                w.await??;
            }
            Ok::<(), anyhow::Error>(())
        })?;
        Ok(t0.elapsed())
    }

    fn hold(&mut self, k: usize) -> Result<()> {
        let (prog, args) = self.long.clone();
        let held = self.rt.block_on(async {
            let mut held = Vec::with_capacity(k);
            for _ in 0..k {
                let mut child = tokio::process::Command::new(&prog).args(&args).spawn()?;
                let pid = child.id().unwrap_or(0);
                let task =
                    tokio::spawn(async move { child.wait().await.map(signal_rc).unwrap_or(255) });
                held.push((pid, task));
            }
            Ok::<_, std::io::Error>(held)
        });
        self.held.extend(held.context("tokio spawn")?);
        Ok(())
    }

    fn release(&mut self) -> Result<Released> {
        let held = std::mem::take(&mut self.held);
        let n = held.len();
        let t0 = Instant::now();
        for (pid, _) in &held {
            // The task has not seen the exit (the child is alive), so the
            // pid is still our unreaped child.
            sys::kill(*pid as i32, libc::SIGKILL);
        }
        let reported = self.rt.block_on(async {
            let mut r = 0;
            for (_, t) in held {
                if t.await.unwrap_or(255) == -libc::SIGKILL {
                    r += 1;
                }
            }
            r
        });
        Ok(Released {
            time: t0.elapsed(),
            reported,
            held: n,
        })
    }

    fn latency(&mut self, samples: usize) -> Result<Vec<Duration>> {
        let (prog, args) = self.long.clone();
        self.rt.block_on(async {
            let mut out = Vec::with_capacity(samples);
            for _ in 0..samples {
                let mut child = tokio::process::Command::new(&prog).args(&args).spawn()?;
                let t0 = Instant::now();
                child.start_kill()?;
                child.wait().await?;
                out.push(t0.elapsed());
            }
            Ok(out)
        })
    }
}

/// Polls every future until all are done (a join_all for `block_on`).
struct JoinAll<T> {
    futs: Vec<Option<Pin<Box<dyn Future<Output = T>>>>>,
    out: Vec<Option<T>>,
}

impl<T> Unpin for JoinAll<T> {}

impl<T> Future for JoinAll<T> {
    type Output = Vec<T>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Vec<T>> {
        let this = self.get_mut();
        let mut pending = false;
        for (i, slot) in this.futs.iter_mut().enumerate() {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    Poll::Ready(v) => {
                        this.out[i] = Some(v);
                        *slot = None;
                    }
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(this.out.iter_mut().filter_map(Option::take).collect())
        }
    }
}

fn join_all<T>(futs: Vec<Pin<Box<dyn Future<Output = T>>>>) -> JoinAll<T> {
    let n = futs.len();
    JoinAll {
        futs: futs.into_iter().map(Some).collect(),
        out: (0..n).map(|_| None).collect(),
    }
}

/// `async-process` under `futures_lite::future::block_on`.
#[derive(Debug)]
pub struct AsyncProcess {
    short: String,
    long: (String, Vec<String>),
    held: Vec<async_process::Child>,
}

impl AsyncProcess {
    /// Nothing to set up: async-process starts its reaper on first use.
    pub fn new(short: &Program, long: &Program) -> AsyncProcess {
        AsyncProcess {
            short: short.path().to_string(),
            long: (
                long.path().to_string(),
                long.rest().into_iter().map(String::from).collect(),
            ),
            held: Vec::new(),
        }
    }
}

impl Runner for AsyncProcess {
    fn run_short(&mut self, n: usize, inflight: usize) -> Result<Duration> {
        let next = std::rc::Rc::new(std::cell::Cell::new(0usize));
        let t0 = Instant::now();
        let workers: Vec<Pin<Box<dyn Future<Output = std::io::Result<()>>>>> = (0..inflight.min(n))
            .map(|_| {
                let (next, prog) = (std::rc::Rc::clone(&next), self.short.clone());
                Box::pin(async move {
                    while next.get() < n {
                        next.set(next.get() + 1);
                        async_process::Command::new(&prog).status().await?;
                    }
                    Ok(())
                }) as Pin<Box<dyn Future<Output = _>>>
            })
            .collect();
        for r in futures_lite::future::block_on(join_all(workers)) {
            r.context("async-process")?;
        }
        Ok(t0.elapsed())
    }

    fn hold(&mut self, k: usize) -> Result<()> {
        for _ in 0..k {
            self.held.push(
                async_process::Command::new(&self.long.0)
                    .args(&self.long.1)
                    .spawn()
                    .context("async-process spawn")?,
            );
        }
        Ok(())
    }

    fn release(&mut self) -> Result<Released> {
        let mut held = std::mem::take(&mut self.held);
        let n = held.len();
        let t0 = Instant::now();
        for c in &mut held {
            let _ = c.kill();
        }
        let waits: Vec<Pin<Box<dyn Future<Output = i32>>>> = held
            .into_iter()
            .map(|mut c| {
                Box::pin(async move { c.status().await.map(signal_rc).unwrap_or(255) })
                    as Pin<Box<dyn Future<Output = i32>>>
            })
            .collect();
        let reported = futures_lite::future::block_on(join_all(waits))
            .into_iter()
            .filter(|&rc| rc == -libc::SIGKILL)
            .count();
        Ok(Released {
            time: t0.elapsed(),
            reported,
            held: n,
        })
    }

    fn latency(&mut self, samples: usize) -> Result<Vec<Duration>> {
        let mut out = Vec::with_capacity(samples);
        for _ in 0..samples {
            let mut c = async_process::Command::new(&self.long.0)
                .args(&self.long.1)
                .spawn()
                .context("async-process spawn")?;
            let t0 = Instant::now();
            let _ = c.kill();
            futures_lite::future::block_on(c.status()).context("async-process status")?;
            out.push(t0.elapsed());
        }
        Ok(out)
    }
}

/// `std::process` with a thread blocked in `Child::wait` per child.
#[derive(Debug)]
pub struct StdThreads {
    short: String,
    long: (String, Vec<String>),
    held: Vec<u32>,
    done: (mpsc::Sender<i32>, mpsc::Receiver<i32>),
}

impl StdThreads {
    /// No shared state but a channel for the waiter threads' results.
    pub fn new(short: &Program, long: &Program) -> StdThreads {
        StdThreads {
            short: short.path().to_string(),
            long: (
                long.path().to_string(),
                long.rest().into_iter().map(String::from).collect(),
            ),
            held: Vec::new(),
            done: mpsc::channel(),
        }
    }

    fn spawn_waited(&self, prog: &str, args: &[String]) -> Result<u32> {
        let mut child = std::process::Command::new(prog)
            .args(args)
            .spawn()
            .context("std::process spawn")?;
        let pid = child.id();
        let tx = self.done.0.clone();
        let spawned = std::thread::Builder::new()
            .stack_size(64 * 1024)
            .spawn(move || {
                let rc = child.wait().map(signal_rc).unwrap_or(255);
                let _ = tx.send(rc);
            });
        if let Err(e) = spawned {
            // The child moved into the closure, which was dropped: it is
            // unwatched, so reap it here.
            sys::kill(pid as i32, libc::SIGKILL);
            let _ = sys::waitpid(pid as i32);
            return Err(e).context("cannot start a waiter thread");
        }
        Ok(pid)
    }
}

impl Runner for StdThreads {
    fn run_short(&mut self, n: usize, inflight: usize) -> Result<Duration> {
        let t0 = Instant::now();
        let mut started = 0;
        let mut live = 0;
        let mut done = 0;
        while done < n {
            while started < n && live < inflight {
                self.spawn_waited(&self.short.clone(), &[])?;
                started += 1;
                live += 1;
            }
            self.done.1.recv().context("waiter thread")?;
            live -= 1;
            done += 1;
        }
        Ok(t0.elapsed())
    }

    fn hold(&mut self, k: usize) -> Result<()> {
        let (prog, args) = self.long.clone();
        for _ in 0..k {
            let pid = self.spawn_waited(&prog, &args)?;
            self.held.push(pid);
        }
        Ok(())
    }

    fn release(&mut self) -> Result<Released> {
        let held = std::mem::take(&mut self.held);
        let t0 = Instant::now();
        for &pid in &held {
            // Alive until killed, so not yet reaped by its waiter thread.
            sys::kill(pid as i32, libc::SIGKILL);
        }
        let mut reported = 0;
        for _ in 0..held.len() {
            if self.done.1.recv().context("waiter thread")? == -libc::SIGKILL {
                reported += 1;
            }
        }
        Ok(Released {
            time: t0.elapsed(),
            reported,
            held: held.len(),
        })
    }

    fn latency(&mut self, samples: usize) -> Result<Vec<Duration>> {
        let (prog, args) = self.long.clone();
        let mut out = Vec::with_capacity(samples);
        for _ in 0..samples {
            let pid = self.spawn_waited(&prog, &args)?;
            let t0 = Instant::now();
            sys::kill(pid as i32, libc::SIGKILL);
            self.done.1.recv().context("waiter thread")?;
            out.push(t0.elapsed());
        }
        Ok(out)
    }
}
