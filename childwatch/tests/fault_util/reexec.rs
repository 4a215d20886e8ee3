//! Re-executing this test binary for one test under a wrapper (`unshare`,
//! `setpriv`): the outer test runs the wrapper and reports what the inner
//! run printed; the inner run sees `INSIDE` set and runs the test body.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Set to a tag in the re-executed test binary.
pub const INSIDE: &str = "CHILDWATCH_FAULT_INSIDE";

/// Whether this process is the re-executed one for `tag`.
pub fn inside(tag: &str) -> bool {
    std::env::var(INSIDE).as_deref() == Ok(tag)
}

/// The name libtest knows a test by, from `module_path!()` and the test
/// function's name (`module_path!()` starts with the crate name).
pub fn test_name(module_path: &str, f: &str) -> String {
    match module_path.split_once("::") {
        Some((_, rest)) => format!("{rest}::{f}"),
        None => f.to_string(),
    }
}

/// Runs `wrapper... exe test --exact ...` with `INSIDE=tag` (and `env`),
/// for at most `limit`; prints its output (libtest shows it when the test
/// fails) and panics with the inner failure if it did not succeed.
pub fn run(
    wrapper: &[&str],
    exe: &Path,
    tag: &str,
    test: &str,
    env: &[(&str, &str)],
    limit: Duration,
) {
    let mut cmd = Command::new(wrapper[0]);
    cmd.args(&wrapper[1..])
        .arg(exe)
        .args([
            test,
            "--exact",
            "--nocapture",
            "--include-ignored",
            "--test-threads=1",
        ])
        .env(INSIDE, tag)
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {wrapper:?}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break Some(st);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (out, err) = (t_out.join().unwrap(), t_err.join().unwrap());
    println!("---- inner run ({tag}) stdout ----\n{out}\n---- inner run stderr ----\n{err}");
    let Some(status) = status else {
        panic!("the inner run of {test} hung for {limit:?} (killed)");
    };
    if !status.success() {
        let text = format!("{out}\n{err}");
        let mut excerpt: Vec<&str> = Vec::new();
        let lines: Vec<&str> = text.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            if l.contains("panicked at") {
                // The panic message: up to the backtrace note or a blank line.
                excerpt.extend(
                    lines[i..(i + 25).min(lines.len())]
                        .iter()
                        .take_while(|l| !l.is_empty() && !l.starts_with("note:"))
                        .copied(),
                );
            }
        }
        panic!(
            "the inner run of {test} failed ({status}):\n{}",
            if excerpt.is_empty() {
                text.lines().rev().take(20).collect::<Vec<_>>().join("\n")
            } else {
                excerpt.join("\n")
            }
        );
    }
    if out.contains("running 0 tests") {
        panic!("the inner run did not find test {test}");
    }
}
