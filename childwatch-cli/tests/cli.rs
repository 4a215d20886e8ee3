//! The `childwatch` binary, run for real: exit statuses, output grouping and
//! ordering, timeouts, the joblog, Ctrl-C, every bad input, and `bench`.
#![cfg(target_os = "linux")]

mod common;

use common::{bin, run, run_stdin, text};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
fn tmpdir(name: &str) -> PathBuf {
    common::tmpdir("cli", name)
}

/// A one-line error of ours: non-zero status, exactly one line on stderr,
/// no panic, no backtrace.
fn assert_one_line_error(o: &Output, code: i32, needle: &str) {
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "not one line: {err:?}");
    assert!(err.contains(needle), "{needle:?} not in {err:?}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
}

/// A usage error from clap: status 2, no panic.
fn assert_usage_error(o: &Output, needle: &str) {
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "stderr: {err}");
    assert!(err.contains(needle), "{needle:?} not in {err:?}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn all_jobs_ok_exits_zero() {
    let o = run(&[
        "-j", "4", "--", "echo", "job", "{}", ":::", "a", "b", "c", "d", "e",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let mut lines: Vec<_> = text(&o.stdout).lines().map(String::from).collect();
    lines.sort();
    assert_eq!(lines, ["job a", "job b", "job c", "job d", "job e"]);
    assert!(
        o.stderr.is_empty(),
        "nothing extra on stderr: {}",
        text(&o.stderr)
    );
}

#[test]
fn three_failures_exit_three() {
    let o = run(&["--", "sh", "-c", "exit {}", ":::", "0", "1", "2", "0", "7"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("3 failed"), "{}", text(&o.stderr));
}

#[test]
fn failures_are_capped_at_101() {
    let vals: Vec<String> = (0..150).map(|i| i.to_string()).collect();
    let mut args = vec!["-j", "8", "--", "false", ":::"];
    args.extend(vals.iter().map(String::as_str));
    let o = run(&args);
    assert_eq!(o.status.code(), Some(101), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("150 failed"));
}

#[test]
fn stdin_lines_are_shell_commands() {
    let o = run_stdin(&["-j", "2"], "echo one\nexit 4\n\necho 'two  spaces'\n");
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(
        out.contains("one\n") && out.contains("two  spaces\n"),
        "{out}"
    );
}

#[test]
fn stdin_lines_are_arguments_to_a_command() {
    let o = run_stdin(&["-k", "--", "echo", "got"], "x\ny\n");
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(text(&o.stdout), "got x\ngot y\n");
}

#[test]
fn keep_order_prints_in_job_order() {
    // Later jobs finish first; --keep-order still prints 1..6.
    let o = run(&[
        "-k",
        "-j",
        "6",
        "--",
        "sh",
        "-c",
        "sleep 0.$((7 - {})); echo {}",
        ":::",
        "1",
        "2",
        "3",
        "4",
        "5",
        "6",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "1\n2\n3\n4\n5\n6\n");
}

#[test]
fn tag_prefixes_every_line() {
    let o = run(&[
        "-k",
        "--tag",
        "--",
        "sh",
        "-c",
        "echo a; echo b >&2; printf c",
        ":::",
        "x",
        "y",
    ]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(text(&o.stdout), "x\ta\nx\tc\ny\ta\ny\tc\n");
    assert_eq!(text(&o.stderr), "x\tb\ny\tb\n");
}

/// Checks that in `s`, the lines of each job form one contiguous block.
fn assert_contiguous(s: &str, jobs: usize, lines_per_job: usize) {
    let mut blocks: Vec<String> = Vec::new();
    let mut count = std::collections::HashMap::new();
    for line in s.lines() {
        let job = line.split_whitespace().nth(1).unwrap_or("?").to_string();
        *count.entry(job.clone()).or_insert(0usize) += 1;
        if blocks.last() != Some(&job) {
            assert!(!blocks.contains(&job), "lines of job {job} are split");
            blocks.push(job);
        }
    }
    assert_eq!(blocks.len(), jobs, "{blocks:?}");
    assert!(count.values().all(|&c| c == lines_per_job), "{count:?}");
}

#[test]
fn output_of_concurrent_jobs_never_interleaves() {
    // 16 jobs at once, each writing 4,000 lines (more than a pipe holds) to
    // stdout and to stderr, in many small writes.
    let vals: Vec<String> = (1..=16).map(|i| i.to_string()).collect();
    let mut args = vec![
        "-j",
        "16",
        "--",
        "sh",
        "-c",
        "i=0; while [ $i -lt 4000 ]; do echo \"job {} line $i\"; echo \"job {} err $i\" >&2; i=$((i+1)); done",
        ":::",
    ];
    args.extend(vals.iter().map(String::as_str));
    let o = run(&args);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        &text(&o.stderr)[..200.min(o.stderr.len())]
    );
    assert_contiguous(&text(&o.stdout), 16, 4000);
    assert_contiguous(&text(&o.stderr), 16, 4000);
}

fn read_joblog(p: &Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| l.split('\t').map(String::from).collect())
        .collect()
}

#[test]
fn joblog_has_gnu_parallels_format() {
    let d = tmpdir("joblog");
    let log = d.join("log.tsv");
    let o = run(&[
        "-k",
        "--joblog",
        log.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        "exit {}",
        ":::",
        "0",
        "3",
        "0",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let rows = read_joblog(&log);
    assert_eq!(
        rows[0],
        [
            "Seq",
            "Host",
            "Starttime",
            "JobRuntime",
            "Send",
            "Receive",
            "Exitval",
            "Signal",
            "Command"
        ]
    );
    assert_eq!(rows.len(), 4);
    let mut body = rows[1..].to_vec();
    body.sort_by_key(|r| r[0].parse::<usize>().unwrap());
    for (i, r) in body.iter().enumerate() {
        assert_eq!(r.len(), 9, "{r:?}");
        assert_eq!(r[0], (i + 1).to_string());
        assert_eq!(r[1], ":");
        let start: f64 = r[2].trim().parse().unwrap();
        assert!(
            start > 1.6e9,
            "start time is seconds since the epoch: {start}"
        );
        let runtime: f64 = r[3].trim().parse().unwrap();
        assert!(runtime >= 0.0);
        assert_eq!((r[4].as_str(), r[5].as_str()), ("0", "0"));
        assert_eq!(r[7], "0");
    }
    assert_eq!(body[0][6], "0");
    assert_eq!(body[1][6], "3");
    assert_eq!(body[1][8], "sh -c 'exit 3'");
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn timeout_terminates_then_kills() {
    let d = tmpdir("timeout");
    let log = d.join("log");
    // Job 1 dies of SIGTERM; job 2 ignores SIGTERM (so does its sleep) and
    // needs the SIGKILL after the grace period; job 3 finishes in time.
    let started = Instant::now();
    let o = run(&[
        "-k",
        "-j",
        "3",
        "--timeout",
        "0.5",
        "--grace",
        "0.5",
        "--joblog",
        log.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        "{}",
        ":::",
        "sleep 60",
        "trap '' TERM; sleep 60",
        "echo quick",
    ]);
    assert!(
        started.elapsed() < Duration::from_secs(50),
        "jobs were not stopped"
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "quick\n");
    let err = text(&o.stderr);
    assert!(err.contains("timed out"), "{err}");
    assert!(err.contains("2 timed out"), "{err}");
    let mut rows = read_joblog(&log)[1..].to_vec();
    rows.sort_by_key(|r| r[0].parse::<usize>().unwrap());
    assert_eq!((rows[0][6].as_str(), rows[0][7].as_str()), ("-1", "15"));
    assert_eq!((rows[1][6].as_str(), rows[1][7].as_str()), ("-1", "9"));
    assert_eq!((rows[2][6].as_str(), rows[2][7].as_str()), ("0", "0"));
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn halt_on_error_starts_no_new_jobs() {
    let o = run(&[
        "-j",
        "1",
        "--halt-on-error",
        "--",
        "sh",
        "-c",
        "echo {}; exit {}",
        ":::",
        "0",
        "5",
        "0",
        "0",
    ]);
    // GNU parallel: with fail=1 the exit status is the failing job's.
    assert_eq!(o.status.code(), Some(5));
    assert_eq!(text(&o.stdout), "0\n5\n");
    assert!(
        text(&o.stderr).contains("2 not started"),
        "{}",
        text(&o.stderr)
    );
}

/// Starts `run` with 4 jobs of `pre; touch MARKER; body` (3 at once), waits
/// until the first 3 are running, and sends `signals` to childwatch, one
/// after the other.
fn interrupt(name: &str, pre: &str, body: &str, signals: &[i32]) -> Output {
    let d = tmpdir(name);
    let script = format!("{pre} touch {}/{{}}; {body}", d.display());
    let child = bin()
        .args([
            "run", "-j", "3", "--", "sh", "-c", &script, ":::", "a", "b", "c", "d",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while ["a", "b", "c"].iter().any(|f| !d.join(f).exists()) {
        assert!(t0.elapsed() < Duration::from_secs(30), "jobs did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    for (i, &sig) in signals.iter().enumerate() {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(300));
        }
        // SAFETY: kill(2) on our own child, not yet waited for.
        unsafe { libc::kill(child.id() as i32, sig) };
    }
    let o = child.wait_with_output().unwrap();
    assert!(!d.join("d").exists(), "no job starts after the signal");
    std::fs::remove_dir_all(d).unwrap();
    o
}

#[test]
fn sigint_is_forwarded_to_running_jobs() {
    let o = interrupt("sigint", "", "exec sleep 60", &[libc::SIGINT]);
    assert_eq!(o.status.code(), Some(130), "{}", text(&o.stderr));
    let err = text(&o.stderr);
    assert!(
        err.contains("3 failed") && err.contains("1 not started"),
        "{err}"
    );
}

#[test]
fn sigterm_is_forwarded_too() {
    let o = interrupt("sigterm", "", "exec sleep 60", &[libc::SIGTERM]);
    assert_eq!(o.status.code(), Some(143), "{}", text(&o.stderr));
}

#[test]
fn a_second_sigint_kills_jobs_that_ignore_the_first() {
    let o = interrupt(
        "sigint2",
        "trap '' INT;",
        "sleep 60",
        &[libc::SIGINT, libc::SIGINT],
    );
    assert_eq!(o.status.code(), Some(130), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("killing 3 running jobs"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn missing_program_is_a_failed_job() {
    let o = run(&["--", "/nonexistent/program", ":::", "a"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("cannot run /nonexistent/program"));
}

#[test]
fn bad_input_unknown_flag() {
    assert_usage_error(
        &run(&["--no-such-flag", "--", "true", ":::", "a"]),
        "--no-such-flag",
    );
    assert_usage_error(&bin().arg("frobnicate").output().unwrap(), "frobnicate");
}

#[test]
fn bad_input_job_counts() {
    assert_usage_error(&run(&["-j", "0%", "--", "true", ":::", "a"]), "at least 1%");
    assert_usage_error(
        &run(&["-j", "x", "--", "true", ":::", "a"]),
        "not a number of jobs",
    );
    assert_usage_error(
        &run(&["--timeout", "-1", "--", "true", ":::", "a"]),
        "seconds",
    );
}

#[test]
fn bad_input_unknown_watcher() {
    assert_usage_error(
        &run(&["--watcher", "magic", "--", "true", ":::", "a"]),
        "magic",
    );
    assert_usage_error(
        &run(&["--loop", "kqueue", "--", "true", ":::", "a"]),
        "kqueue",
    );
}

#[test]
fn bad_input_watcher_the_kernel_lacks() {
    let uring_built = !text(&bin().arg("watchers").output().unwrap().stdout)
        .contains("not available in this build");
    for (feature, flag, needle) in [
        // A build without the uring watcher says so instead.
        (
            "uring",
            "--watcher=uring",
            if uring_built {
                "lacks"
            } else {
                "not available in this build"
            },
        ),
        ("pidfd", "--watcher=pidfd", "lacks"),
        ("proactor", "--loop=proactor", "lacks"),
    ] {
        let o = bin()
            .env("CHILDWATCH_DISABLE", feature)
            .args(["run", flag, "--", "true", ":::", "a"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_one_line_error(&o, 255, needle);
    }
}

#[test]
fn bad_input_empty_job_list() {
    assert_one_line_error(&run(&["--", "true", ":::"]), 255, "no jobs");
    assert_one_line_error(&run_stdin::<&str>(&[], ""), 255, "no jobs");
    assert_one_line_error(&run_stdin(&["--", "echo"], "\n\n"), 255, "no jobs");
}

#[test]
fn bad_input_joblog_path() {
    let d = tmpdir("badlog");
    let o = run(&["--joblog", "/nonexistent/dir/log", "--", "true", ":::", "a"]);
    assert_one_line_error(&o, 255, "joblog");
    // A directory is not a writable file either, and no job runs.
    let marker = d.join("ran");
    let o = run(&[
        "--joblog",
        d.to_str().unwrap(),
        "--",
        "touch",
        marker.to_str().unwrap(),
        ":::",
        "a",
    ]);
    assert_one_line_error(&o, 255, "joblog");
    assert!(!marker.exists());
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn watchers_lists_every_watcher() {
    let o = bin().arg("watchers").output().unwrap();
    assert_eq!(o.status.code(), Some(0));
    let out = text(&o.stdout);
    for w in [
        "threaded",
        "safe",
        "fast",
        "multiloop",
        "pidfd",
        "uring",
        "proactor",
        "selector",
    ] {
        assert!(out.contains(w), "{w} missing: {out}");
    }
    assert_eq!(out.matches("default policy pick").count(), 1, "{out}");
}

#[test]
fn bench_quick_prints_tables() {
    let o = bin().args(["bench", "--quick"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    for h in [
        "throughput:",
        "mixed:",
        "latency:",
        "scale:",
        "raw posix_spawn+waitpid",
        "raw pidfd+epoll",
        "tokio",
        "async-process",
        "threaded/proactor",
        "threaded/selector",
    ] {
        assert!(out.contains(h), "{h} missing:\n{out}");
    }
    assert!(
        o.stderr.is_empty(),
        "no progress bar off a terminal: {}",
        text(&o.stderr)
    );
}

#[test]
fn bench_json_parses() {
    let o = bin()
        .args([
            "bench",
            "--quick",
            "--json",
            "--repeat",
            "3",
            "--scenario",
            "throughput,scale",
            "--watchers",
            "threaded,tokio",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("valid JSON");
    assert!(v["version"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(v["kernel"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(v["timestamp"].as_str().is_some_and(|s| s.ends_with('Z')));
    assert_eq!(v["repeat"], 3);
    let rows = v["rows"].as_array().unwrap();
    let raw = rows.iter().find(|r| r["id"] == "raw").unwrap();
    let tp = &raw["throughput"];
    assert!(tp["per_sec"].as_f64().unwrap() > 0.0);
    // Three repeats plus the baseline's run at the end.
    assert_eq!(tp["secs"]["samples"].as_array().unwrap().len(), 4);
    let (lo, med, hi) = (
        tp["secs"]["min"].as_f64().unwrap(),
        tp["secs"]["median"].as_f64().unwrap(),
        tp["secs"]["max"].as_f64().unwrap(),
    );
    assert!(lo <= med && med <= hi);
    let ratio = tp["vs_raw"]["median"].as_f64().unwrap();
    assert!(
        (ratio - 1.0).abs() < 0.5,
        "raw against its own median: {ratio}"
    );
    let tokio = rows.iter().find(|r| r["id"] == "tokio").unwrap();
    assert_eq!(tokio["scale"]["completed"], true, "{tokio}");
    assert_eq!(
        tokio["scale"]["kill_reap_secs"]["samples"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    assert!(rows.iter().all(|r| r.get("mixed").is_none()));
    assert!(v["targets"].is_array());
}

#[test]
fn bench_tables_have_no_na_rows_and_left_out_runners_are_named_once() {
    // A machine without pidfds: the pidfd and uring watchers cannot run.
    let o = bin()
        .env("CHILDWATCH_DISABLE", "pidfd")
        .args([
            "bench",
            "--quick",
            "--scenario",
            "throughput,scale",
            "--watchers",
            "pidfd,fast,tokio",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(!out.contains("n/a"), "{out}");
    assert_eq!(
        out.matches("left out, not available here").count(),
        1,
        "{out}"
    );
    assert!(out.contains("pidfd/proactor ("), "{out}");
    // The scale table lists only the runners it applies to.
    let scale = out.split("\nscale:").nth(1).unwrap();
    let table = scale.split("\n\n").next().unwrap();
    assert!(!table.contains("fast/"), "{table}");
    assert!(table.contains("tokio"), "{table}");
}

#[test]
fn bench_csv_and_plot() {
    let d = tmpdir("benchplot");
    let svg = d.join("bench.svg");
    let o = bin()
        .args([
            "bench",
            "--quick",
            "--csv",
            "--repeat",
            "2",
            "--scenario",
            "throughput,latency",
            "--watchers",
            "tokio",
            "--plot",
        ])
        .arg(&svg)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    let mut lines = out.lines();
    assert_eq!(
        lines.next().unwrap(),
        "version,kernel,timestamp,runner,scenario,figure,unit,median,min,max,samples"
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert!(rows.iter().all(|r| r.len() == 11), "{out}");
    let tokio_time = rows
        .iter()
        .find(|r| r[3] == "tokio" && r[4] == "throughput" && r[5] == "time")
        .unwrap();
    assert_eq!(tokio_time[10], "2");
    let (med, lo, hi): (f64, f64, f64) = (
        tokio_time[7].parse().unwrap(),
        tokio_time[8].parse().unwrap(),
        tokio_time[9].parse().unwrap(),
    );
    assert!(lo <= med && med <= hi && lo > 0.0);
    assert!(
        rows.iter()
            .any(|r| r[4] == "latency" && r[5] == "p50_alone")
    );
    let chart = std::fs::read_to_string(&svg).unwrap();
    assert!(chart.starts_with("<svg"), "an SVG file");
    for needle in [
        "throughput: spawns/s",
        "latency: kill",
        "tokio (current_thread)",
        "raw baseline",
    ] {
        assert!(chart.contains(needle), "{needle} not in the chart");
    }
    // A chart that cannot be written is an error before anything is lost.
    let o = bin()
        .args([
            "bench",
            "--quick",
            "--scenario",
            "throughput",
            "--watchers",
            "tokio",
            "--plot",
            "/nonexistent/dir/b.svg",
        ])
        .output()
        .unwrap();
    assert_one_line_error(&o, 255, "chart");
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn bench_rejects_unknown_runner() {
    let o = bin()
        .args(["bench", "--quick", "--watchers", "nope"])
        .output()
        .unwrap();
    assert_one_line_error(&o, 255, "unknown runner");
}

#[test]
fn every_supported_watcher_runs_jobs_on_both_loops() {
    let list = text(&bin().arg("watchers").output().unwrap().stdout);
    let supported: Vec<&str> = list
        .lines()
        .filter(|l| {
            l.contains(" supported") && !l.contains("(") && !l.contains("default policy loop")
        })
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(supported.contains(&"threaded"), "{list}");
    let loops: Vec<&str> = if list.contains("proactor   supported") {
        vec!["proactor", "selector"]
    } else {
        vec!["selector"]
    };
    for w in &supported {
        for l in &loops {
            let o = run(&[
                "-k",
                "-j",
                "3",
                "--watcher",
                w,
                "--loop",
                l,
                "--",
                "sh",
                "-c",
                "echo {}; exit {}",
                ":::",
                "0",
                "1",
                "0",
                "2",
                "0",
            ]);
            assert_eq!(o.status.code(), Some(2), "{w}/{l}: {}", text(&o.stderr));
            assert_eq!(text(&o.stdout), "0\n1\n0\n2\n0\n", "{w}/{l}");
        }
    }
}

#[test]
fn a_low_descriptor_limit_caps_parallelism_instead_of_failing_jobs() {
    let o = Command::new("/bin/sh")
        .args([
            "-c",
            "ulimit -n 128 && exec \"$0\" run -j 500 -- sh -c 'sleep 0.05; echo {}' ::: $(seq 1 200)",
            env!("CARGO_BIN_EXE_childwatch"),
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout).lines().count(), 200);
    assert!(
        text(&o.stderr).contains("RLIMIT_NOFILE"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn timeout_also_stops_what_a_job_left_running() {
    // The job's shell exits at once but leaves a background subshell holding
    // its output; the timeout signals the whole process group.
    let d = tmpdir("grandchild");
    let marker = d.join("marker");
    let script = format!("(sleep 2; touch {}) & echo started {{}}", marker.display());
    let o = run(&["--timeout", "0.3", "--", "sh", "-c", &script, ":::", "a"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "started a\n");
    assert!(text(&o.stderr).contains("timed out"));
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        !marker.exists(),
        "the background subshell survived the timeout"
    );
    std::fs::remove_dir_all(d).unwrap();
}
