//! Helpers shared by the CLI test binaries: the real `childwatch` binary,
//! `run` with arguments (and optionally standard input), output as text,
//! and a fresh scratch directory per test.
#![allow(dead_code)] // each test binary uses its own subset

use std::ffi::OsStr;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

/// The binary under test, with the test-only kill switch cleared.
pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_childwatch"));
    c.env_remove("CHILDWATCH_DISABLE");
    c
}

/// `childwatch run ARGS` with stdin from `/dev/null`.
pub fn run<S: AsRef<OsStr>>(args: &[S]) -> Output {
    bin()
        .arg("run")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("start childwatch")
}

/// `childwatch run ARGS` fed `input` on stdin (written from a thread, so a
/// large input cannot deadlock against the output).
pub fn run_stdin<S: AsRef<OsStr>>(args: &[S], input: impl AsRef<[u8]>) -> Output {
    let mut child = bin()
        .arg("run")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start childwatch");
    let mut stdin = child.stdin.take().expect("piped stdin");
    let input = input.as_ref().to_vec();
    let w = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let o = child.wait_with_output().expect("wait for childwatch");
    w.join().expect("stdin writer");
    o
}

/// Bytes as text (lossy).
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The stdout of a run that must have exited 0.
pub fn ok(o: &Output) -> String {
    assert_eq!(o.status.code(), Some(0), "stderr: {}", text(&o.stderr));
    text(&o.stdout)
}

/// A fresh, empty scratch directory for test `name` of binary `binary`.
pub fn tmpdir(binary: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("childwatch-{binary}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create a scratch directory");
    d
}
