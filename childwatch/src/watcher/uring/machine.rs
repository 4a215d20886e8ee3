//! The per-child state machine: what to do after a completion.
//!
//! It only *decides*. A completion of the child's operation (a `POLL_ADD`
//! on its pidfd, or a `WAITID(WNOWAIT)` that reaps nothing) is only a hint;
//! the machine asks the [`Probe`] (in the watcher: a reap through the
//! child's gate, which delivers the status) and turns the completion's
//! result and the probe's answer into the next [`Step`]: done, re-arm (a
//! poll again, or a `WAITID` that needs no descriptor), or hand the child
//! over to the next stage of the fallback chain once its error budget is
//! spent. The drivers (the loop's ring, the watcher's own ring) only apply
//! these steps, so the decisions are written once and tested here without
//! the kernel, with a scripted probe.

use std::io;

use crate::watcher::child::Reaped;

/// Unexpected results tolerated for one child on one ring before it is
/// handed over to the next stage of the fallback chain.
pub(super) const MAX_ERRORS: u32 = 16;

/// Asks whether the child has exited, reaping it if so (through its gate).
pub(super) trait Probe {
    /// `Reaped::Now`/`Before` once the child is reaped (its status is then
    /// delivered by the probe), `Running` otherwise.
    fn probe(&mut self) -> io::Result<Reaped>;
}

/// The operation that watches the child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Arm {
    /// `POLL_ADD` on the child's pidfd.
    Poll,
    /// `WAITID(P_PID, WEXITED | WNOWAIT)`: wakes on the exit, reaps nothing,
    /// needs no descriptor.
    WaitId,
}

/// What the driver does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// The child is reaped (its status went to its registration): stop.
    Done,
    /// Submit this operation (a switch from `Poll` to `WaitId` releases the
    /// pidfd).
    Arm(Arm),
    /// This ring cannot watch the child any more: the next stage of the
    /// fallback chain takes it.
    HandOver,
}

/// One child's watch on one ring.
#[derive(Debug, Clone)]
pub(super) struct Machine {
    armed: Arm,
    errors: u32,
}

impl Machine {
    /// A watch that starts with `armed`.
    pub(super) fn new(armed: Arm) -> Machine {
        Machine { armed, errors: 0 }
    }

    /// The operation in flight.
    #[cfg(test)]
    pub(super) fn armed(&self) -> Arm {
        self.armed
    }

    /// The operation completed with `res` (the CQE's result: `>= 0`, or a
    /// negative errno). Probes the child, then decides.
    pub(super) fn complete(&mut self, res: i32, probe: &mut impl Probe) -> Step {
        match probe.probe() {
            Ok(Reaped::Now(_) | Reaped::Before(_)) => return Step::Done,
            Ok(Reaped::Running) => {}
            Err(e) => {
                tracing::warn!("{e}");
                self.errors += 1;
            }
        }
        // Still running. Which operation next, and was this an error?
        let next = match (self.armed, res) {
            // Readable but not yet reapable: a WAITID waits for the exit to
            // complete without spinning.
            (Arm::Poll, r) if r >= 0 => Arm::WaitId,
            // Cancelled by the kernel, not by us: poll again.
            (Arm::Poll, r) if r == -libc::ECANCELED => {
                self.errors += 1;
                Arm::Poll
            }
            (Arm::Poll, r) => {
                tracing::warn!(
                    "POLL_ADD on a child's pidfd failed ({}); watching it with WAITID",
                    io::Error::from_raw_os_error(-r)
                );
                self.errors += 1;
                Arm::WaitId
            }
            // Woken yet running, ECHILD (its submitter thread exited, so the
            // kernel saw no children: wait again from this living thread),
            // ECANCELED, or anything else: wait again.
            (Arm::WaitId, r) => {
                if r < 0 && r != -libc::ECHILD && r != -libc::ECANCELED {
                    tracing::warn!(
                        "WAITID for a child failed ({}); retrying",
                        io::Error::from_raw_os_error(-r)
                    );
                }
                self.errors += 1;
                Arm::WaitId
            }
        };
        if self.errors >= MAX_ERRORS {
            tracing::error!(
                "a child's watch keeps failing on this io_uring ({} errors); handing it over",
                self.errors
            );
            return Step::HandOver;
        }
        self.armed = next;
        Step::Arm(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// A probe answering from a script; counts its calls.
    struct Script(VecDeque<io::Result<Reaped>>, usize);

    impl Script {
        fn new(answers: impl IntoIterator<Item = io::Result<Reaped>>) -> Script {
            Script(answers.into_iter().collect(), 0)
        }
    }

    impl Probe for Script {
        fn probe(&mut self) -> io::Result<Reaped> {
            self.1 += 1;
            self.0.pop_front().unwrap_or(Ok(Reaped::Running))
        }
    }

    fn running() -> io::Result<Reaped> {
        Ok(Reaped::Running)
    }

    #[test]
    fn poll_done_then_exited() {
        let mut m = Machine::new(Arm::Poll);
        let mut p = Script::new([Ok(Reaped::Now(3))]);
        assert_eq!(m.complete(1, &mut p), Step::Done);
        assert_eq!(p.1, 1);
    }

    #[test]
    fn a_stale_completion_finds_the_status_recorded() {
        // Reaped meanwhile by the sentinel (or any earlier wake-up).
        for arm in [Arm::Poll, Arm::WaitId] {
            let mut m = Machine::new(arm);
            let mut p = Script::new([Ok(Reaped::Before(7))]);
            assert_eq!(m.complete(-libc::ECANCELED, &mut p), Step::Done);
        }
    }

    #[test]
    fn readable_but_running_switches_to_waitid_without_an_error() {
        let mut m = Machine::new(Arm::Poll);
        let mut p = Script::new([running()]);
        assert_eq!(m.complete(1, &mut p), Step::Arm(Arm::WaitId));
        assert_eq!(m.armed(), Arm::WaitId);
        assert_eq!(m.errors, 0);
    }

    #[test]
    fn echild_from_a_dead_submitter_rearms_then_exits() {
        // io_uring ran the WAITID in the context of a thread that exited:
        // ECHILD although the child is ours. The probe says running, so
        // wait again; the next completion finds the exit.
        let mut m = Machine::new(Arm::WaitId);
        let mut p = Script::new([running(), Ok(Reaped::Now(-9))]);
        assert_eq!(m.complete(-libc::ECHILD, &mut p), Step::Arm(Arm::WaitId));
        assert_eq!(m.complete(0, &mut p), Step::Done);
    }

    #[test]
    fn echild_for_a_foreign_pid_is_lost_through_the_probe() {
        // Not our child: the gate's reap records 255 and delivers it.
        let mut m = Machine::new(Arm::WaitId);
        let mut p = Script::new([Ok(Reaped::Now(255))]);
        assert_eq!(m.complete(-libc::ECHILD, &mut p), Step::Done);
    }

    #[test]
    fn ecanceled_polls_again() {
        let mut m = Machine::new(Arm::Poll);
        let mut p = Script::new([running()]);
        assert_eq!(m.complete(-libc::ECANCELED, &mut p), Step::Arm(Arm::Poll));
        assert_eq!(m.errors, 1);
    }

    #[test]
    fn a_failing_poll_falls_back_to_waitid() {
        let mut m = Machine::new(Arm::Poll);
        let mut p = Script::new([running()]);
        assert_eq!(m.complete(-libc::EINVAL, &mut p), Step::Arm(Arm::WaitId));
    }

    #[test]
    fn error_budget_then_hand_over() {
        for (arm, res) in [
            (Arm::Poll, -libc::ECANCELED),
            (Arm::WaitId, -libc::ECHILD),
            (Arm::WaitId, -libc::EIO),
        ] {
            let mut m = Machine::new(arm);
            let mut p = Script::new([]);
            for i in 1..MAX_ERRORS {
                assert!(matches!(m.complete(res, &mut p), Step::Arm(_)), "{i}");
            }
            assert_eq!(m.complete(res, &mut p), Step::HandOver, "{arm:?} {res}");
        }
    }

    #[test]
    fn probe_errors_count_against_the_budget() {
        let mut m = Machine::new(Arm::WaitId);
        let mut p = Script::new((0..MAX_ERRORS).map(|_| Err(io::Error::other("waitid failed"))));
        let mut steps = Vec::new();
        for _ in 0..MAX_ERRORS {
            steps.push(m.complete(0, &mut p));
        }
        // Each round is a probe error plus a woken-yet-running WAITID.
        assert_eq!(steps.last(), Some(&Step::HandOver));
        assert!(steps.len() <= MAX_ERRORS as usize);
    }

    #[test]
    fn a_new_ring_starts_with_a_fresh_budget() {
        let mut m = Machine::new(Arm::WaitId);
        let mut p = Script::new([]);
        while m.complete(-libc::EIO, &mut p) != Step::HandOver {}
        // The driver that takes over builds a new machine.
        let mut m = Machine::new(m.armed());
        assert_eq!(m.complete(-libc::EIO, &mut p), Step::Arm(Arm::WaitId));
    }
}
