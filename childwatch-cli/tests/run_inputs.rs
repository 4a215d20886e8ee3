//! `childwatch run` on the inputs GNU parallel and xargs users give it:
//! attached option values, replacement strings, shell quoting, non-UTF-8
//! bytes, streaming input, jobs that leave children behind, big output,
//! terminal and pipe signals, and the messages. Every test runs the real
//! binary on real child processes.
#![cfg(target_os = "linux")]

mod common;

use common::{bin, ok, run, run_stdin, text};
use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};
fn tmpdir(name: &str) -> PathBuf {
    common::tmpdir("in", name)
}

fn sorted_lines(s: &str) -> Vec<String> {
    let mut v: Vec<String> = s.lines().map(String::from).collect();
    v.sort();
    v
}

fn cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// The highest job slot `{%}` seen with `-j` given as `jobs` (enough jobs
/// that every slot gets one: each worker takes one at once).
fn max_slot(jobs: &[&str]) -> usize {
    let mut args: Vec<String> = jobs.iter().map(|s| s.to_string()).collect();
    args.extend(["--", "sh", "-c", "sleep 0.5; echo {%}", ":::"].map(String::from));
    args.extend((0..3 * (cpus() + 2)).map(|i| i.to_string()));
    let out = ok(&run(&args));
    out.lines()
        .map(|l| l.parse::<usize>().unwrap())
        .max()
        .unwrap()
}

#[test]
fn attached_and_relative_job_counts() {
    assert_eq!(max_slot(&["-j4"]), 4);
    assert_eq!(max_slot(&["-j=3"]), 3);
    assert_eq!(max_slot(&["-kj1"]), 1);
    assert_eq!(max_slot(&["-j", "+1"]), cpus() + 1);
    assert_eq!(max_slot(&["-j", "50%"]), cpus().div_ceil(2));
    // -k in a cluster still keeps order.
    let o = run(&[
        "-kj2",
        "sh",
        "-c",
        "sleep 0.{}; echo {}",
        ":::",
        "3",
        "1",
        "2",
    ]);
    assert_eq!(ok(&o), "3\n1\n2\n");
}

#[test]
fn every_replacement_string() {
    let o = run(&[
        "-j1",
        "echo",
        "{}",
        "{.}",
        "{/}",
        "{//}",
        "{/.}",
        "{#}",
        "{%}",
        ":::",
        "dir/a.txt",
        "b.tar.gz",
    ]);
    assert_eq!(
        ok(&o),
        "dir/a.txt dir/a a.txt dir a 1 1\nb.tar.gz b.tar b.tar.gz . b.tar 2 1\n"
    );
    let o = run(&[
        "-k", "echo", "{1.}", "{2/}", "{2//}", "{1/.}", "{2}", ":::", "x/a.c", ":::", "p/q.h",
    ]);
    assert_eq!(ok(&o), "x/a q.h p a p/q.h\n");
}

#[test]
fn replacement_strings_make_real_files() {
    let d = tmpdir("cp");
    std::fs::write(d.join("a.txt"), "A").unwrap();
    std::fs::write(d.join("b.txt"), "B").unwrap();
    let o = bin()
        .current_dir(&d)
        .args(["run", "--", "cp", "{}", "{.}.bak", ":::", "a.txt", "b.txt"])
        .output()
        .unwrap();
    ok(&o);
    assert_eq!(std::fs::read_to_string(d.join("a.bak")).unwrap(), "A");
    assert_eq!(std::fs::read_to_string(d.join("b.bak")).unwrap(), "B");
    assert!(!d.join("{.}.bak").exists());
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn unknown_replacement_strings_are_errors() {
    for bad in ["{0}", "{1..}", "{+/}", "{3}"] {
        let o = run(&["echo", bad, ":::", "a", ":::", "b"]);
        assert_eq!(o.status.code(), Some(255), "{bad}");
        let err = text(&o.stderr);
        assert!(
            err.contains("childwatch: error:") && err.contains(bad),
            "{err}"
        );
        assert!(o.stdout.is_empty(), "no job ran for {bad}");
    }
    // Braces that are not replacement strings are kept: awk scripts work.
    let o = run_stdin(&["awk", "{print $2}"], b"/dev/null\n");
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let o = run(&["awk", "BEGIN {print \"x{}\"}", ":::", "a"]);
    assert_eq!(ok(&o), "xa\n");
}

#[test]
fn values_are_never_scanned_again() {
    let o = run(&["echo", "{1}", "{2}", ":::", "{2}", ":::", "x"]);
    assert_eq!(ok(&o), "{2} x\n");
    let o = run(&["echo", "{}", ":::", "{.}", "{#}"]);
    assert_eq!(sorted_lines(&ok(&o)), ["{#}", "{.}"]);
}

#[test]
fn values_in_shell_scripts_are_quoted() {
    // GNU parallel never runs an injected command from a value.
    let o = run(&["--", "sh", "-c", "echo {}", ":::", "a; echo INJECTED"]);
    assert_eq!(ok(&o), "a; echo INJECTED\n");
    let o = run(&[
        "--",
        "bash",
        "-c",
        "echo \"<$0>\" {}",
        ":::",
        "it's $HOME `id`",
    ]);
    assert_eq!(ok(&o), "<bash> it's $HOME `id`\n");
    // A one-word command with shell syntax runs in /bin/sh, values quoted.
    let o = run(&["echo {} | tr a-z A-Z", ":::", "it's; x"]);
    assert_eq!(ok(&o), "IT'S; X\n");
    // A script that is only {} runs the value (sh -c {} ::: 'cmd').
    let o = run(&["sh", "-c", "{}", ":::", "echo one; echo two"]);
    assert_eq!(ok(&o), "one\ntwo\n");
    // -q pastes the value in as it is, as GNU parallel -q does.
    let o = run(&["-q", "--", "sh", "-c", "echo {}", ":::", "a; echo INJECTED"]);
    assert_eq!(ok(&o), "a\nINJECTED\n");
    // Ordinary words are passed as they are, no quotes added.
    let o = run(&["printf", "[%s]\\n", "{}", ":::", "a b'c"]);
    assert_eq!(ok(&o), "[a b'c]\n");
}

#[test]
fn non_utf8_input_lines_and_values_are_bytes() {
    let o = run_stdin(&["-k", "echo"], b"a\n\xff\xfeb\nc\n");
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert_eq!(o.stdout, b"a\n\xff\xfeb\nc\n");
    // A file named with non-UTF-8 bytes, as find prints it.
    let d = tmpdir("bytes");
    let name = d.join(OsStr::from_bytes(b"f\xe9.txt"));
    std::fs::write(&name, "12345").unwrap();
    let mut input = name.as_os_str().as_bytes().to_vec();
    input.push(b'\n');
    let o = run_stdin(&["wc", "-c"], &input);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(o.stdout.starts_with(b"5 "), "{}", text(&o.stdout));
    // Values after ::: and the template may be non-UTF-8 too.
    let o = bin()
        .args([
            OsStr::new("run"),
            OsStr::new("echo"),
            OsStr::from_bytes(b"\xfe{}"),
            OsStr::new(":::"),
        ])
        .arg(OsStr::from_bytes(b"\xff"))
        .output()
        .unwrap();
    assert_eq!(o.stdout, b"\xfe\xff\n", "{}", text(&o.stderr));
    std::fs::remove_dir_all(d).unwrap();
}

/// Reads lines of `child`'s stdout on a thread, each with the time it came.
fn line_reader(child: &mut Child) -> std::sync::mpsc::Receiver<(String, Instant)> {
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send((line, Instant::now())).is_err() {
                break;
            }
        }
    });
    rx
}

#[test]
fn jobs_start_as_input_arrives() {
    let mut child = bin()
        .args(["run", "-j", "2", "echo", "got"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = line_reader(&mut child);
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"a\n").unwrap();
    stdin.flush().unwrap();
    // Job a runs while standard input is still open.
    let (l, _) = lines
        .recv_timeout(Duration::from_secs(20))
        .expect("job a ran before input closed");
    assert_eq!(l, "got a");
    stdin.write_all(b"b\n").unwrap();
    drop(stdin);
    let (l, _) = lines.recv_timeout(Duration::from_secs(20)).unwrap();
    assert_eq!(l, "got b");
    assert!(child.wait().unwrap().success());
}

/// VmHWM (peak resident memory) of a live process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn memory_does_not_grow_with_the_number_of_input_lines() {
    // 300,000 lines of 200 bytes (60 MB): held as a job list they would
    // take well over 60 MB; streamed, childwatch stays small. Measured
    // while childwatch is alive: after it echoed every line, before EOF.
    const LINES: usize = 300_000;
    let mut child = bin()
        .args(["run", "--dry-run", "echo"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        let line = format!("{}\n", "x".repeat(199));
        let mut buf = Vec::new();
        for _ in 0..LINES {
            buf.extend_from_slice(line.as_bytes());
            if buf.len() > 1 << 20 {
                stdin.write_all(&buf).unwrap();
                buf.clear();
            }
        }
        stdin.write_all(&buf).unwrap();
        stdin
    });
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut seen = 0;
    let mut line = Vec::new();
    while seen < LINES {
        line.clear();
        assert!(
            out.read_until(b'\n', &mut line).unwrap() > 0,
            "output ended early"
        );
        seen += 1;
    }
    let peak = peak_rss_kib(child.id());
    drop(writer.join().unwrap());
    assert!(child.wait().unwrap().success());
    assert!(peak < 40 * 1024, "peak RSS {peak} KiB for {LINES} lines");
}

#[test]
fn a_background_child_does_not_hold_the_run() {
    // The job's shell is killed at the timeout; its setsid'd child keeps
    // the output pipes open for 8 s more. The run must not wait for it.
    let t0 = Instant::now();
    let o = run(&[
        "--timeout",
        "1",
        "--grace",
        "1",
        "--",
        "sh",
        "-c",
        "setsid sleep 8 & sleep 1000",
        ":::",
        "a",
    ]);
    let took = t0.elapsed();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    // timeout 1 + grace 1 + drain 0.5, plus a generous margin.
    assert!(took < Duration::from_secs(5), "took {took:?}");
    // Without a timeout: the job is over when its process exits.
    let t0 = Instant::now();
    let o = run(&["--", "sh", "-c", "setsid sleep 8 & echo {}", ":::", "hi"]);
    assert_eq!(ok(&o), "hi\n");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t0.elapsed()
    );
}

#[test]
fn big_grouped_output_spills_to_a_file() {
    // Job 2 prints 150 MB and ends; with -k it waits for job 1, which runs
    // until we let it go. Meanwhile childwatch holds job 2's output: its
    // memory must stay far below 150 MB.
    const BYTES: usize = 150_000_000;
    let d = tmpdir("spill");
    let gate = d.join("gate");
    let log = d.join("log");
    let script = format!(
        "if [ {{}} = 1 ]; then while [ ! -e {} ]; do sleep 0.05; done; echo one; else head -c {BYTES} /dev/zero; fi",
        gate.display()
    );
    let mut child = bin()
        .args(["run", "-k", "-j", "2", "--joblog"])
        .arg(&log)
        .args(["--", "sh", "-c", &script, ":::", "1", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        out.read_to_end(&mut all).unwrap();
        all
    });
    let t0 = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("2\t"))
    {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "job 2 did not finish"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let peak = peak_rss_kib(child.id());
    std::fs::write(&gate, "").unwrap();
    let status = child.wait().unwrap();
    let all = reader.join().unwrap();
    assert!(status.success());
    assert_eq!(&all[..4], b"one\n", "job order kept");
    assert_eq!(all.len(), 4 + BYTES);
    assert!(all[4..].iter().all(|&b| b == 0));
    assert!(
        peak < 64 * 1024,
        "peak RSS {peak} KiB while holding {BYTES} bytes"
    );
    // The joblog's Receive column counts stdout bytes.
    let rows = std::fs::read_to_string(&log).unwrap();
    let row2: Vec<&str> = rows
        .lines()
        .find(|l| l.starts_with("2\t"))
        .unwrap()
        .split('\t')
        .collect();
    assert_eq!(row2[5], BYTES.to_string());
    std::fs::remove_dir_all(d).unwrap();
}

/// Starts two jobs that write their pid to DIR/<arg>.pid and sleep; waits
/// until both run; returns childwatch and the job pids.
fn start_sleepers(d: &Path) -> (Child, Vec<i32>) {
    let script = format!(
        "echo $$ > {}/{{}}.tmp; mv {0}/{{}}.tmp {0}/{{}}.pid; exec sleep 30",
        d.display()
    );
    let child = bin()
        .args(["run", "-j", "2", "--", "sh", "-c", &script, ":::", "a", "b"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let mut pids = Vec::new();
    for f in ["a.pid", "b.pid"] {
        loop {
            if let Ok(s) = std::fs::read_to_string(d.join(f)) {
                pids.push(s.trim().parse().unwrap());
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "jobs did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    (child, pids)
}

/// The state letter of a process (R, S, T, Z...), None once it is gone.
fn proc_state(pid: i32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = s.rsplit_once(") ")?.1;
    after.chars().next()
}

fn wait_state(pid: i32, want: impl Fn(Option<char>) -> bool, what: &str) {
    let t0 = Instant::now();
    while !want(proc_state(pid)) {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "pid {pid}: {what}, is {:?}",
            proc_state(pid)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kill(pid: i32, sig: i32) {
    // SAFETY: kill(2) with plain integers, on processes this test started.
    unsafe { libc::kill(pid, sig) };
}

#[test]
fn sighup_ends_the_jobs_too() {
    let d = tmpdir("hup");
    let (child, pids) = start_sleepers(&d);
    kill(child.id() as i32, libc::SIGHUP);
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(129), "{}", text(&o.stderr));
    for pid in pids {
        wait_state(
            pid,
            |s| s.is_none() || s == Some('Z'),
            "a job outlived SIGHUP",
        );
    }
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn ctrl_z_stops_the_jobs_and_sigcont_resumes_them() {
    let d = tmpdir("tstp");
    let (child, pids) = start_sleepers(&d);
    let me = child.id() as i32;
    kill(me, libc::SIGTSTP);
    wait_state(me, |s| s == Some('T'), "childwatch did not stop");
    for &pid in &pids {
        wait_state(pid, |s| s == Some('T'), "job did not stop");
    }
    kill(me, libc::SIGCONT);
    for &pid in &pids {
        wait_state(
            pid,
            |s| s == Some('S') || s == Some('R'),
            "job did not resume",
        );
    }
    kill(me, libc::SIGTERM);
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(143), "{}", text(&o.stderr));
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn a_closed_stdout_stops_the_run() {
    let d = tmpdir("epipe");
    let log = d.join("log");
    let mut args: Vec<String> = [
        "-j",
        "2",
        "--joblog",
        log.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        "echo {}; sleep 0.02",
        ":::",
    ]
    .map(String::from)
    .to_vec();
    args.extend((1..=2000).map(|i| i.to_string()));
    let mut child = bin()
        .arg("run")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // `| head -2`.
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    for _ in 0..2 {
        line.clear();
        out.read_line(&mut line).unwrap();
    }
    drop(out);
    let t0 = Instant::now();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(141), "as a pipeline killed by SIGPIPE");
    assert!(t0.elapsed() < Duration::from_secs(20));
    let ran = std::fs::read_to_string(&log).unwrap().lines().count() - 1;
    assert!(ran < 1000, "{ran} jobs ran after stdout closed");
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn options_after_the_command_belong_to_it() {
    let o = run(&["--", "echo", "--foo", "-j", ":::", "a"]);
    assert_eq!(ok(&o), "--foo -j a\n");
    let o = run(&["echo", "-n", ":::", "a"]);
    assert_eq!(ok(&o), "a");
}

#[test]
fn unknown_options_suggest_close_matches() {
    let o = run(&["--jbos", "2", "echo", ":::", "a"]);
    assert_eq!(o.status.code(), Some(2));
    let err = text(&o.stderr);
    assert!(err.contains("'--jbos'") && err.contains("--jobs"), "{err}");
    assert!(!err.contains("put the command after"), "{err}");
}

#[test]
fn help_explains_replacement_strings() {
    let o = bin().args(["run", "--help"]).output().unwrap();
    let h = text(&o.stdout);
    for needle in [
        "{/.}",
        "{#}",
        "{%}",
        "{N/}",
        "::::",
        "quoted as one shell word",
        "PARALLEL_SEQ",
    ] {
        assert!(h.contains(needle), "{needle} not in run --help");
    }
    let o = bin().args(["bench", "--help"]).output().unwrap();
    let h = text(&o.stdout);
    let full = h.split("--full").nth(1).unwrap();
    let para: String = full
        .split("\n\n")
        .next()
        .unwrap()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    assert!(para.ends_with("about a minute"), "{para}");
}

#[test]
fn one_job_is_singular() {
    let o = run(&["false", ":::", "a"]);
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    assert!(err.contains("1 job: 0 succeeded, 1 failed"), "{err}");
}
