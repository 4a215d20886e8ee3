//! One job from spawn to end: its process group, the pumps that read its
//! stdout and stderr into their streams (and feed a `--pipe` block to its
//! stdin), the `--timeout` timers, and the rule that a job is over when its
//! process exits plus at most [`DRAIN`] of reading what it left in the pipes.

use std::cell::{Cell, RefCell};
use std::ffi::OsString;
use std::pin::pin;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use childwatch::{EventLoop, Handle, ReturnCode};
use futures_lite::{AsyncReadExt, FutureExt};

use super::{State, output_error, show_progress};
use crate::output::{self, Stream, Which};
use crate::proc_api::{Command, Process, Stdio};
use crate::template;

/// How long a job's pipes are still read after its process exited.
pub(super) const DRAIN: Duration = Duration::from_millis(500);

/// A job in flight: its process and how many of its output pipes are still
/// open (someone in its process group may hold them after it exited).
pub(super) struct Running {
    pub(super) process: Process,
    pub(super) open_pipes: Cell<u8>,
    pub(super) sent_signal: Cell<i32>,
    pub(super) seq: u64,
}

/// How one job ended.
pub(super) struct Outcome {
    pub(super) start: SystemTime,
    pub(super) runtime: Duration,
    pub(super) rc: ReturnCode,
    pub(super) out: Stream,
    pub(super) err: Stream,
    /// We sent the signal that ended it (timeout, interrupt, halt).
    pub(super) killed: bool,
    pub(super) timed_out: bool,
    /// The last signal we sent to the job's group (0: none).
    pub(super) sent_signal: i32,
}

impl Outcome {
    pub(super) fn failed(&self) -> bool {
        self.rc != 0 || self.timed_out
    }
}

/// A job, ready to run.
pub(super) struct Job {
    pub(super) seq: u64,
    pub(super) slot: usize,
    /// Keep-order position.
    pub(super) order: u64,
    pub(super) args: Vec<Vec<u8>>,
    pub(super) argv: Vec<OsString>,
    /// `--pipe`: what the job reads on stdin.
    pub(super) block: Option<Vec<u8>>,
}

impl Job {
    pub(super) fn command_line(&self) -> Vec<u8> {
        template::command_line(&self.argv)
    }
    pub(super) fn tag(&self) -> Vec<u8> {
        // GNU parallel: the arguments separated by spaces.
        self.args.join(&b' ')
    }
}

/// Signals the job and its process group (it leads its own group).
///
/// The group is signalled only while its pgid cannot belong to anyone else:
/// while the leader is unreaped (its pid is taken), or while its output
/// pipes are still open after it exited, which means other members of the
/// group are alive (and a pid stays reserved while it names a live group).
pub(super) fn signal_job(r: &Running, sig: i32) {
    let p = &r.process;
    r.sent_signal.set(sig);
    let leader_alive = p.returncode().is_none();
    if leader_alive {
        let _ = p.send_signal(sig);
    }
    if leader_alive || r.open_pipes.get() > 0 {
        // SAFETY: killpg takes plain integers and has no memory effects.
        unsafe { libc::killpg(p.pid() as libc::pid_t, sig) };
    }
}

fn spawn_error_rc(e: &std::io::Error) -> ReturnCode {
    match e.kind() {
        std::io::ErrorKind::NotFound => 127,
        std::io::ErrorKind::PermissionDenied => 126,
        _ => 255,
    }
}

/// `--pipe`: writes the job's block to its stdin and closes it. A job that
/// exits without reading it all is not an error (GNU parallel's `head`).
async fn feed<W: futures_lite::AsyncWrite + Unpin>(pipe: Option<W>, block: Option<&[u8]>) {
    use futures_lite::AsyncWriteExt;
    if let (Some(mut w), Some(b)) = (pipe, block) {
        let _ = w.write_all(b).await;
        let _ = w.close().await;
    }
}

/// Reads a job's pipe into its stream until end-of-file, then counts the
/// pipe as closed.
async fn pump<R: futures_lite::AsyncRead + Unpin>(
    st: &State,
    pipe: Option<R>,
    stream: &mut Stream,
    job: &Running,
) {
    if let Some(mut r) = pipe {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match r.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => {
                    if let Err(e) = stream.push(st.progress.as_ref(), &buf[..n]) {
                        output_error(st, e);
                    }
                }
                Err(e) => {
                    stream.note(
                        st.progress.as_ref(),
                        &format!("childwatch: reading output of job {}: {e}\n", job.seq),
                    );
                    break;
                }
            }
        }
    }
    job.open_pipes.set(job.open_pipes.get().saturating_sub(1));
}

fn results_files(
    st: &State,
    job: &Job,
) -> std::io::Result<(Option<std::fs::File>, Option<std::fs::File>)> {
    let Some(root) = &st.opts.results else {
        return Ok((None, None));
    };
    let dir = output::results_dir(root, &job.args);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("seq"), job.seq.to_string())?;
    Ok((
        Some(std::fs::File::create(dir.join("stdout"))?),
        Some(std::fs::File::create(dir.join("stderr"))?),
    ))
}

pub(super) async fn run_one(st: &Rc<State>, lp: &EventLoop, job: &Job) -> Outcome {
    let start = SystemTime::now();
    let t0 = Instant::now();
    let tag = st.opts.tag.then(|| job.tag());
    let (fout, ferr) = match results_files(st, job) {
        Ok(f) => f,
        Err(e) => {
            output_error(st, e);
            (None, None)
        }
    };
    let mut out = Stream::new(st.opts.mode, Which::Out, tag.clone(), fout);
    let mut err = Stream::new(st.opts.mode, Which::Err, tag, ferr);
    let mut cmd = Command::new(&job.argv[0]);
    cmd.args(&job.argv[1..])
        .env("PARALLEL_SEQ", job.seq.to_string())
        .env("PARALLEL_JOBSLOT", job.slot.to_string())
        .env("PARALLEL_PID", std::process::id().to_string())
        .stdin(if job.block.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut p = match cmd.spawn() {
        Ok(p) => p,
        Err(e) => {
            err.note(
                st.progress.as_ref(),
                &format!(
                    "childwatch: cannot run {}: {e}\n",
                    job.argv[0].to_string_lossy()
                ),
            );
            let _ = err.close(st.progress.as_ref());
            return Outcome {
                start,
                runtime: t0.elapsed(),
                rc: spawn_error_rc(&e),
                out,
                err,
                killed: false,
                timed_out: false,
                sent_signal: 0,
            };
        }
    };
    let out_pipe = p.stdout.take();
    let err_pipe = p.stderr.take();
    let in_pipe = p.stdin.take();
    let p = Rc::new(Running {
        process: p,
        open_pipes: Cell::new(2),
        sent_signal: Cell::new(0),
        seq: job.seq,
    });
    st.running.borrow_mut().insert(job.seq, Rc::clone(&p));
    show_progress(st);
    // A signal sent by a Ctrl-C while the job runs counts as "killed by us".
    let signals_before = st.signals_seen.get();
    let timed_out = Rc::new(Cell::new(false));
    let timers: Rc<RefCell<Vec<Handle>>> = Rc::new(RefCell::new(Vec::new()));
    if let Some(limit) = st.opts.timeout {
        let (p2, to2, timers2, lp2, grace) = (
            Rc::clone(&p),
            Rc::clone(&timed_out),
            Rc::clone(&timers),
            lp.clone(),
            st.opts.grace,
        );
        let h = lp.call_later(limit, move || {
            to2.set(true);
            signal_job(&p2, libc::SIGTERM);
            let p3 = Rc::clone(&p2);
            let h = lp2.call_later(grace, move || signal_job(&p3, libc::SIGKILL));
            timers2.borrow_mut().push(h);
        });
        timers.borrow_mut().push(h);
    }
    let rc = {
        let mut reads = pin!(futures_lite::future::zip(
            futures_lite::future::zip(
                pump(st, out_pipe, &mut out, &p),
                pump(st, err_pipe, &mut err, &p),
            ),
            feed(in_pipe, job.block.as_deref()),
        ));
        let mut wait = pin!(p.process.wait());
        enum First {
            Eof,
            Exit(std::io::Result<ReturnCode>),
        }
        let first = async {
            reads.as_mut().await;
            First::Eof
        }
        .or(async { First::Exit(wait.as_mut().await) })
        .await;
        match first {
            First::Eof => wait.as_mut().await,
            First::Exit(rc) => {
                // The job is over; what it left running may keep the pipes
                // open: read what is there for a moment, then let go.
                async {
                    reads.as_mut().await;
                }
                .or(async {
                    childwatch::sleep(DRAIN).await;
                })
                .await;
                rc
            }
        }
    };
    for h in timers.borrow_mut().drain(..) {
        h.cancel();
    }
    st.running.borrow_mut().remove(&job.seq);
    let pb = st.progress.as_ref();
    let rc = rc.unwrap_or_else(|e| {
        err.note(
            pb,
            &format!("childwatch: waiting for pid {}: {e}\n", p.process.pid()),
        );
        255
    });
    if timed_out.get() {
        err.note(
            pb,
            &format!(
                "childwatch: job {} timed out after {:?}: {}\n",
                job.seq,
                st.opts.timeout.unwrap_or_default(),
                String::from_utf8_lossy(&job.command_line())
            ),
        );
    }
    for s in [&mut out, &mut err] {
        if let Err(e) = s.close(pb) {
            output_error(st, e);
        }
    }
    Outcome {
        start,
        runtime: t0.elapsed(),
        rc,
        out,
        err,
        killed: rc < 0
            && (timed_out.get()
                || st.signals_seen.get() > signals_before
                || p.sent_signal.get() != 0),
        timed_out: timed_out.get(),
        sent_signal: p.sent_signal.get(),
    }
}
