//! A private pid namespace with `pid_max` 400 (Linux 6.x: per namespace),
//! where pids recycle within ~100 spawns: the test binary re-executes one
//! test inside `unshare --pid --fork --mount-proc` (plus `--user
//! --map-root-user` when plain `--pid` is not permitted).
//!
//! Inside, the test binary is not pid 1 (the `sh` wrapper is), so orphans
//! are not reparented to it.

use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use childwatch::Pid;

use super::reexec;

/// The namespace's `pid_max`. After the first wrap pids cycle in 300..400
/// (the kernel keeps 0..300 for the first pass).
pub const PID_MAX: Pid = 400;
const TAG: &str = "pidns";

/// The `unshare` options that work here (None: not permitted).
fn unshare_opts() -> Option<&'static [&'static str]> {
    static OPTS: OnceLock<Option<&'static [&'static str]>> = OnceLock::new();
    *OPTS.get_or_init(|| {
        const PLAIN: &[&str] = &["--pid", "--fork", "--mount-proc", "--kill-child"];
        const USER: &[&str] = &[
            "--user",
            "--map-root-user",
            "--pid",
            "--fork",
            "--mount-proc",
            "--kill-child",
        ];
        for opts in [PLAIN, USER] {
            let ok = Command::new("unshare")
                .args(opts)
                .args([
                    "sh",
                    "-c",
                    &format!(
                        "echo {PID_MAX} > /proc/sys/kernel/pid_max && \
                         test \"$(cat /proc/sys/kernel/pid_max)\" = {PID_MAX}"
                    ),
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return Some(opts);
            }
        }
        None
    })
}

/// Call first in a pid-namespace test: true inside the namespace (run the
/// body); false in the outer run, which has re-executed `test` inside and
/// checked it (or printed why it was skipped).
pub fn enter(test: &str, limit: Duration) -> bool {
    if reexec::inside(TAG) {
        let max = std::fs::read_to_string("/proc/sys/kernel/pid_max").unwrap_or_default();
        assert_eq!(
            max.trim(),
            PID_MAX.to_string(),
            "not inside the pid namespace"
        );
        prime();
        return true;
    }
    let Some(opts) = unshare_opts() else {
        println!(
            "skipped: `unshare --pid --fork --mount-proc` (with or without --user \
             --map-root-user) is not permitted here, or pid_max cannot be set in a pid \
             namespace; {test} passes vacuously"
        );
        eprintln!("skipped: no private pid namespace for {test}");
        return false;
    };
    let exe = std::env::current_exe().expect("current_exe");
    let mut wrapper = vec!["unshare"];
    wrapper.extend_from_slice(opts);
    // Not `exec`: the shell stays pid 1, the test binary is an ordinary
    // process (dash would exec the last command of `-c`, hence `exit $?`).
    let script = format!("echo {PID_MAX} > /proc/sys/kernel/pid_max || exit 97; \"$@\"; exit $?");
    wrapper.extend_from_slice(&["sh", "-c"]);
    let script: &'static str = Box::leak(script.into_boxed_str());
    wrapper.extend_from_slice(&[script, "sh"]);
    reexec::run(&wrapper, &exe, TAG, test, &[], limit);
    false
}

/// The last pid the namespace allocated.
pub fn last_pid() -> Pid {
    std::fs::read_to_string("/proc/sys/kernel/ns_last_pid")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Makes pids wrap once, so from now on every pid is in the recycled
/// range (300..400).
fn prime() {
    if set_last_pid(PID_MAX - 1) {
        return;
    }
    let mut prev = 0;
    for _ in 0..2 * PID_MAX {
        let mut c = Command::new("true").spawn().expect("spawn true");
        let pid = c.id() as Pid;
        let _ = c.wait();
        if pid < prev {
            return;
        }
        prev = pid;
    }
    panic!("pids did not wrap within {} spawns", 2 * PID_MAX);
}

fn set_last_pid(p: Pid) -> bool {
    std::fs::write("/proc/sys/kernel/ns_last_pid", p.to_string()).is_ok()
}

/// Steers the next allocated pid to `target` (best effort: another thread
/// may take it first): writes `ns_last_pid`, or burns pids with throwaway
/// children until the counter is just below `target`.
pub fn aim_next_pid(target: Pid) {
    let before = if target <= 300 {
        PID_MAX - 1
    } else {
        target - 1
    };
    if set_last_pid(before) {
        return;
    }
    for _ in 0..3 * PID_MAX {
        if last_pid() == before {
            return;
        }
        let mut c = Command::new("true").spawn().expect("spawn true");
        let _ = c.wait();
    }
}

/// An unrelated `sleep 30` (std, not watched) that got pid `target`, or
/// None if `target` is still taken (a zombie nobody reaped yet, so it cannot
/// be reused) or did not come round.
#[allow(clippy::zombie_processes)] // the caller owns and reaps it
pub fn stranger_with_pid(target: Pid) -> Option<std::process::Child> {
    for _ in 0..50 {
        if super::pid_exists(target) {
            return None;
        }
        aim_next_pid(target);
        let mut c = Command::new("sleep")
            .arg("30")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn sleep");
        if c.id() as Pid == target {
            return Some(c);
        }
        let _ = c.kill();
        let _ = c.wait();
    }
    None
}
