//! A childwatch watcher on one loop kind, used through the public API only:
//! the watcher is set with `set_child_watcher` on a fresh loop (and attached
//! to it where it needs that), children are started with `Command::spawn()`
//! inside `run_until_complete` and awaited with `Process::wait()`.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use childwatch::{ChildWatcher, EventLoop, LoopKind, ReturnCode, Task};

use super::sys::Program;
use super::{Released, Runner};
use crate::proc_api::{Command, Process};
use crate::watchers::{self, WatcherName};

/// One watcher on one loop.
pub struct Ours {
    lp: EventLoop,
    watcher: Arc<dyn ChildWatcher>,
    short: String,
    long: (String, Vec<String>),
    held: Vec<(Rc<Process>, Task<ReturnCode>)>,
}

impl std::fmt::Debug for Ours {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ours").field("lp", &self.lp).finish()
    }
}

impl Ours {
    /// A fresh loop of `kind` with the `name` watcher installed.
    pub fn new(kind: LoopKind, name: WatcherName, short: &Program, long: &Program) -> Result<Ours> {
        let (lp, watcher) = watchers::setup(kind, name)?;
        Ok(Ours {
            lp,
            watcher,
            short: short.path().to_string(),
            long: (
                long.path().to_string(),
                long.rest().into_iter().map(String::from).collect(),
            ),
            held: Vec::new(),
        })
    }

    fn spawn_long(&self) -> std::io::Result<Process> {
        Command::new(&self.long.0).args(&self.long.1).spawn()
    }
}

impl Drop for Ours {
    fn drop(&mut self) {
        if !self.held.is_empty() {
            let _ = self.release();
        }
        watchers::teardown(&self.lp, &self.watcher);
    }
}

impl Runner for Ours {
    fn run_short(&mut self, n: usize, inflight: usize) -> Result<Duration> {
        let next = Rc::new(Cell::new(0usize));
        let t0 = Instant::now();
        let lp = self.lp.clone();
        let prog = self.short.clone();
        self.lp.run_until_complete(async move {
            let workers: Vec<_> = (0..inflight.min(n))
                .map(|_| {
                    let (next, prog) = (Rc::clone(&next), prog.clone());
                    lp.create_task(async move {
                        while next.get() < n {
                            next.set(next.get() + 1);
                            Command::new(&prog).spawn()?.wait().await?;
                        }
                        Ok::<(), std::io::Error>(())
                    })
                })
                .collect();
            for w in workers {
                w.await?;
            }
            Ok::<(), std::io::Error>(())
        })??;
        Ok(t0.elapsed())
    }

    fn hold(&mut self, k: usize) -> Result<()> {
        let lp = self.lp.clone();
        let held = self.lp.run_until_complete(async {
            let mut held = Vec::with_capacity(k);
            for _ in 0..k {
                let p = Rc::new(self.spawn_long()?);
                let p2 = Rc::clone(&p);
                let t = lp.create_task(async move { p2.wait().await.unwrap_or(255) });
                held.push((p, t));
            }
            Ok::<_, std::io::Error>(held)
        })?;
        self.held.extend(held.context("spawn")?);
        Ok(())
    }

    fn release(&mut self) -> Result<Released> {
        let held = std::mem::take(&mut self.held);
        let n = held.len();
        let t0 = Instant::now();
        let reported = self.lp.run_until_complete(async {
            for (p, _) in &held {
                let _ = p.kill();
            }
            let mut r = 0;
            for (_, t) in held {
                if t.await == -libc::SIGKILL {
                    r += 1;
                }
            }
            r
        })?;
        Ok(Released {
            time: t0.elapsed(),
            reported,
            held: n,
        })
    }

    fn latency(&mut self, samples: usize) -> Result<Vec<Duration>> {
        let out = self.lp.run_until_complete(async {
            let mut out = Vec::with_capacity(samples);
            for _ in 0..samples {
                let p = self.spawn_long()?;
                let t0 = Instant::now();
                p.kill()?;
                p.wait().await?;
                out.push(t0.elapsed());
            }
            Ok::<_, std::io::Error>(out)
        })?;
        Ok(out?)
    }
}
