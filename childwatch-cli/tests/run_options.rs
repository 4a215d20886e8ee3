//! `childwatch run`'s GNU parallel options, each beside GNU parallel's
//! documented behaviour (the expected outputs and exit statuses are what
//! GNU parallel 20221122 gives for the same command): -0, -n, -L, -X, -a,
//! ::::, --dry-run, --retries, --resume, --resume-failed, --halt,
//! --line-buffer, --ungroup, --results, --delay, --tag, --bar/--no-bar,
//! --eta, PARALLEL_SEQ and PARALLEL_JOBSLOT, and the joblog's Receive.
#![cfg(target_os = "linux")]

mod common;

use common::{ok, run, run_stdin, text};
use std::path::PathBuf;
use std::time::{Duration, Instant};
fn tmpdir(name: &str) -> PathBuf {
    common::tmpdir("opt", name)
}

fn seq(n: usize) -> Vec<u8> {
    (1..=n)
        .map(|i| format!("{i}\n"))
        .collect::<String>()
        .into_bytes()
}

#[test]
fn null_separated_input() {
    let o = run_stdin(&["-0", "-k", "echo", "[{}]"], b"a b\0c\nd\0");
    assert_eq!(ok(&o), "[a b]\n[c\nd]\n");
}

#[test]
fn several_arguments_per_command() {
    let o = run_stdin(&["-k", "-n", "2", "echo"], seq(5));
    assert_eq!(ok(&o), "1 2\n3 4\n5\n");
    let o = run_stdin(&["-k", "-L", "2", "echo"], seq(5));
    assert_eq!(ok(&o), "1 2\n3 4\n5\n");
    let o = run_stdin(&["-k", "-n", "2", "echo", "{2}-{1}"], seq(4));
    assert_eq!(ok(&o), "2-1\n4-3\n");
    // -X repeats the word around {} for each argument ("context").
    let o = run_stdin(&["-k", "-X", "echo", "x{}y"], seq(5));
    assert_eq!(ok(&o), "x1y x2y x3y x4y x5y\n");
    let o = run_stdin(&["-k", "-X", "-n", "2", "echo", "x{}y"], seq(3));
    assert_eq!(ok(&o), "x1y x2y\nx3y\n");
    // -X fills commands up to a size limit, not one per argument.
    let many: Vec<u8> = (0..20_000)
        .map(|i| format!("arg{i}\n"))
        .collect::<String>()
        .into_bytes();
    let o = run_stdin(&["-X", "-j", "1", "sh", "-c", "echo $#", "sh"], &many);
    let counts: Vec<usize> = ok(&o).lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(counts.iter().sum::<usize>(), 20_000);
    assert!(
        counts.len() > 1 && counts.len() < 100,
        "{} commands",
        counts.len()
    );
}

#[test]
fn argument_files() {
    let d = tmpdir("argfile");
    let f = d.join("in.txt");
    std::fs::write(&f, "1\n2\n").unwrap();
    let f = f.to_str().unwrap();
    // -a is the first input source, before :::.
    let o = run(&["-k", "-a", f, "echo", ":::", "x"]);
    assert_eq!(ok(&o), "1 x\n2 x\n");
    let o = run(&["-k", "echo", "::::", f, ":::", "p", "q"]);
    assert_eq!(ok(&o), "1 p\n1 q\n2 p\n2 q\n");
    let o = run(&["-a", "/nonexistent/in.txt", "echo"]);
    assert_eq!(o.status.code(), Some(255));
    assert!(text(&o.stderr).contains("cannot read the input file /nonexistent/in.txt"));
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn dry_run_prints_quoted_commands_and_runs_nothing() {
    let d = tmpdir("dry");
    let m = d.join("m");
    let o = run(&[
        "--dry-run",
        "touch",
        m.to_str().unwrap(),
        "{}",
        ":::",
        "a b",
        "c",
    ]);
    let out = ok(&o);
    assert_eq!(
        out,
        format!("touch {} 'a b'\ntouch {} c\n", m.display(), m.display())
    );
    assert!(!m.exists());
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn retries_run_a_failing_job_n_times_in_all() {
    let d = tmpdir("retries");
    let f = d.join("tries");
    let script = format!("echo x >> {}; exit 1", f.display());
    let o = run(&["--retries", "3", "sh", "-c", &script, ":::", "a"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(std::fs::read_to_string(&f).unwrap().lines().count(), 3);
    // A job that succeeds on its second try counts as succeeded.
    let g = d.join("g");
    let script = format!("[ -e {0} ] && exit 0; touch {0}; exit 1", g.display());
    let o = run(&["--retries", "3", "sh", "-c", &script, ":::", "a"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    std::fs::remove_dir_all(d).unwrap();
}

fn joblog_rows(p: &std::path::Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split('\t').map(String::from).collect())
        .collect()
}

#[test]
fn resume_and_resume_failed() {
    let d = tmpdir("resume");
    let log = d.join("log");
    let l = log.to_str().unwrap();
    let o = run(&["--joblog", l, "-k", "exit {}", ":::", "0", "1", "0", "2"]);
    assert_eq!(o.status.code(), Some(2));
    // --resume-failed: the failed ones (2, 4) again, the new one (5).
    let o = run(&[
        "--resume-failed",
        "--joblog",
        l,
        "-k",
        "echo {}; exit 0",
        ":::",
        "0",
        "1",
        "0",
        "2",
        "5",
    ]);
    assert_eq!(ok(&o), "1\n2\n5\n");
    // --resume: only what the joblog has never seen.
    let o = run(&[
        "--resume", "--joblog", l, "-k", "echo {}", ":::", "0", "1", "0", "2", "5", "6",
    ]);
    assert_eq!(ok(&o), "6\n");
    let rows = joblog_rows(&log);
    let seqs: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(seqs.len(), 8, "appended, one header: {rows:?}");
    assert_eq!(seqs.last(), Some(&"6"));
    // Resuming needs a joblog.
    let o = run(&["--resume", "echo", ":::", "a"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("--joblog"));
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn halt_conditions_and_exit_statuses() {
    let st = |args: &[&str]| run(args).status.code().unwrap();
    // fail=1: the failing job's status; no job after it starts.
    let o = run(&[
        "-j1",
        "--halt",
        "now,fail=1",
        "echo {}; exit {}",
        ":::",
        "0",
        "3",
        "4",
    ]);
    assert_eq!(o.status.code(), Some(3));
    assert_eq!(text(&o.stdout), "0\n3\n");
    // fail=N: the number of failed jobs.
    assert_eq!(
        st(&[
            "-j1",
            "--halt",
            "soon,fail=2",
            "exit {}",
            ":::",
            "0",
            "3",
            "4",
            "5"
        ]),
        2
    );
    // success=1: 0 after the first success.
    let o = run(&[
        "-j1",
        "--halt",
        "now,success=1",
        "echo {}; exit {}",
        ":::",
        "3",
        "0",
        "4",
    ]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(text(&o.stdout), "3\n0\n");
    // Percentages: the status is the percentage of jobs that failed.
    assert_eq!(
        st(&[
            "-j1",
            "--halt",
            "now,fail=50%",
            "exit {}",
            ":::",
            "0",
            "3",
            "0",
            "4",
            "0",
            "0"
        ]),
        34
    );
    assert_eq!(
        st(&[
            "-j1",
            "--halt",
            "soon,fail=50%",
            "exit {}",
            ":::",
            "1",
            "1",
            "0",
            "0"
        ]),
        50
    );
    // now kills the running jobs; soon lets them finish.
    let t0 = Instant::now();
    let o = run(&[
        "-j2",
        "--halt",
        "now,fail=1",
        "sh",
        "-c",
        "{}",
        ":::",
        "sleep 30; echo late",
        "sleep 0.3; exit 7",
    ]);
    assert_eq!(o.status.code(), Some(7));
    assert!(t0.elapsed() < Duration::from_secs(20));
    assert!(!text(&o.stdout).contains("late"));
    let o = run(&[
        "-j2",
        "--halt",
        "soon,fail=1",
        "sh",
        "-c",
        "{}",
        ":::",
        "sleep 1; echo late",
        "exit 7",
        "echo never",
    ]);
    assert_eq!(o.status.code(), Some(7));
    assert_eq!(text(&o.stdout), "late\n");
    // A job that ignores SIGTERM gets SIGKILL after --grace.
    let t0 = Instant::now();
    let o = run(&[
        "-j2",
        "--grace",
        "0.5",
        "--halt",
        "now,fail=1",
        "sh",
        "-c",
        "{}",
        ":::",
        "trap '' TERM; sleep 30; sleep 30",
        "sleep 0.3; exit 4",
    ]);
    assert_eq!(o.status.code(), Some(4));
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "took {:?}",
        t0.elapsed()
    );
    let o = run(&["--halt", "sometimes", "true", ":::", "a"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("not a halt condition"));
}

#[test]
fn line_buffer_prints_whole_lines_as_they_come() {
    // A prints a line, then another 2 s later; B prints one as soon as A's
    // first line is out. Lines come as they are written (grouped output
    // would be B1 A1 A2).
    let d = tmpdir("linebuf");
    let m = d.join("m");
    let a = format!("echo A1; touch {}; sleep 2; echo A2", m.display());
    let b = format!(
        "while [ ! -e {} ]; do sleep 0.02; done; echo B1",
        m.display()
    );
    let o = run(&["--line-buffer", "-j2", "sh", "-c", "{}", ":::", &a, &b]);
    assert_eq!(ok(&o), "A1\nB1\nA2\n");
    std::fs::remove_dir_all(d).unwrap();
    // A line is never split even when written in pieces.
    let o = run(&[
        "--line-buffer",
        "--tag",
        "-j2",
        "printf a; sleep 0.{}; echo b",
        ":::",
        "3",
        "1",
    ]);
    let mut lines: Vec<String> = ok(&o).lines().map(String::from).collect();
    lines.sort();
    assert_eq!(lines, ["1\tab", "3\tab"]);
}

#[test]
fn ungroup_prints_bytes_as_they_come() {
    // A's first bytes have no newline; B's line comes in the middle of A's.
    let d = tmpdir("ungroup");
    let m = d.join("m");
    let a = format!("printf A; touch {}; sleep 2; echo A", m.display());
    let b = format!(
        "while [ ! -e {} ]; do sleep 0.02; done; echo B",
        m.display()
    );
    let o = run(&["-u", "-j2", "sh", "-c", "{}", ":::", &a, &b]);
    assert_eq!(ok(&o), "AB\nA\n");
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn results_directory_layout() {
    let d = tmpdir("results");
    let r = d.join("res");
    let o = run(&[
        "--results",
        r.to_str().unwrap(),
        "sh",
        "-c",
        "echo out {1} {2}; echo err >&2",
        ":::",
        "a",
        "b/c",
        ":::",
        "x",
    ]);
    assert_eq!(ok(&o), "", "--results prints nothing");
    let job = r.join("1/b\\_c/2/x");
    assert_eq!(
        std::fs::read_to_string(job.join("stdout")).unwrap(),
        "out b/c x\n"
    );
    assert_eq!(
        std::fs::read_to_string(job.join("stderr")).unwrap(),
        "err\n"
    );
    assert_eq!(std::fs::read_to_string(job.join("seq")).unwrap(), "2");
    assert_eq!(std::fs::read_to_string(r.join("1/a/2/x/seq")).unwrap(), "1");
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn delay_spaces_job_starts() {
    let d = tmpdir("delay");
    let log = d.join("log");
    let o = run(&[
        "--delay",
        "0.3",
        "-j",
        "4",
        "--joblog",
        log.to_str().unwrap(),
        "true",
        ":::",
        "a",
        "b",
        "c",
    ]);
    ok(&o);
    let mut starts: Vec<f64> = joblog_rows(&log)
        .iter()
        .map(|r| r[2].trim().parse().unwrap())
        .collect();
    starts.sort_by(f64::total_cmp);
    for w in starts.windows(2) {
        assert!(w[1] - w[0] >= 0.25, "starts {starts:?}");
    }
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn tag_is_the_arguments_and_a_tab() {
    let o = run(&["--tag", "-k", "echo", ":::", "a", ":::", "1", "2"]);
    assert_eq!(ok(&o), "a 1\ta 1\na 2\ta 2\n");
}

#[test]
fn sequence_and_slot_variables() {
    let o = run(&[
        "-k",
        "-j",
        "2",
        "sh",
        "-c",
        "echo $PARALLEL_SEQ {#} $PARALLEL_JOBSLOT {%}",
        ":::",
        "a",
        "b",
        "c",
    ]);
    let out = ok(&o);
    let rows: Vec<Vec<usize>> = out
        .lines()
        .map(|l| l.split(' ').map(|w| w.parse().unwrap()).collect())
        .collect();
    assert_eq!(rows.len(), 3);
    for (i, r) in rows.iter().enumerate() {
        assert_eq!((r[0], r[1]), (i + 1, i + 1), "{out}");
        assert_eq!(r[2], r[3], "{out}");
        assert!((1..=2).contains(&r[2]), "{out}");
    }
    // {#} alone means the template places the values: nothing is appended.
    let o = run(&["-k", "echo", "{#}", ":::", "a", "b"]);
    assert_eq!(ok(&o), "1\n2\n");
}

#[test]
fn bar_options_keep_stdout_clean_and_report_progress_off_a_terminal() {
    for flag in ["--bar", "--no-bar", "--eta"] {
        let o = run(&[flag, "-k", "echo", ":::", "a", "b"]);
        assert_eq!(ok(&o), "a\nb\n", "{flag}");
        let err = text(&o.stderr);
        if flag == "--no-bar" {
            assert!(err.is_empty(), "{err}");
        } else {
            // stderr is a pipe here: a plain line instead of a bar.
            assert!(err.contains("2/2 jobs done, 0 failed"), "{flag}: {err}");
        }
        if flag == "--eta" {
            assert!(err.contains("ETA 0s"), "{err}");
        }
    }
    // Without a flag and off a terminal, nothing extra is printed.
    let o = run(&["echo", ":::", "a"]);
    assert!(o.stderr.is_empty(), "{}", text(&o.stderr));
}

#[test]
fn joblog_receive_is_stdout_bytes() {
    let d = tmpdir("receive");
    let log = d.join("log");
    let o = run(&[
        "--joblog",
        log.to_str().unwrap(),
        "-k",
        "sh",
        "-c",
        "printf %{}s x; echo err >&2",
        ":::",
        "5",
        "300",
    ]);
    ok(&o);
    let mut rows = joblog_rows(&log);
    rows.sort_by_key(|r| r[0].parse::<u32>().unwrap());
    assert_eq!((rows[0][4].as_str(), rows[0][5].as_str()), ("0", "5"));
    assert_eq!(rows[1][5], "300");
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn pipe_feeds_blocks_to_stdin() {
    // GNU parallel: seq 10 | parallel --pipe --block 6 -k wc -l
    let o = run_stdin(&["--pipe", "--block", "6", "-k", "wc", "-l"], seq(10));
    assert_eq!(ok(&o), "3\n3\n3\n1\n");
    // {#} counts blocks; a job that does not read its block does not hang
    // the run. GNU parallel: seq 4 | parallel --pipe --block 3 -k 'echo {#}'
    let o = run_stdin(
        &[
            "--pipe", "--block", "3", "-k", "-j", "2", "sh", "-c", "echo {#}",
        ],
        seq(4),
    );
    assert_eq!(ok(&o), "1\n2\n3\n4\n");
    let big: Vec<u8> = (0..200_000)
        .map(|i| format!("line {i}\n"))
        .collect::<String>()
        .into_bytes();
    let o = run_stdin(&["--pipe", "--block", "64k", "wc", "-c"], &big);
    let total: usize = ok(&o)
        .lines()
        .map(|l| l.trim().parse::<usize>().unwrap())
        .sum();
    assert_eq!(total, big.len());
    // The joblog's Send is the block's bytes, Receive the output's (GNU
    // parallel: 6 6 6 3 and 2 2 2 2 for this input).
    let d = tmpdir("pipelog");
    let log = d.join("log");
    let o = run_stdin(
        &[
            "--pipe",
            "--block",
            "6",
            "-k",
            "--joblog",
            log.to_str().unwrap(),
            "wc",
            "-l",
        ],
        seq(10),
    );
    ok(&o);
    let mut rows = joblog_rows(&log);
    rows.sort_by_key(|r| r[0].parse::<u32>().unwrap());
    let sr: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| (r[4].as_str(), r[5].as_str()))
        .collect();
    assert_eq!(sr, [("6", "2"), ("6", "2"), ("6", "2"), ("3", "2")]);
    std::fs::remove_dir_all(d).unwrap();
    let o = run(&["--pipe", "wc", ":::", "a"]);
    assert_eq!(o.status.code(), Some(255));
    assert!(text(&o.stderr).contains("--pipe reads one input"));
}

#[test]
fn column_separator_and_fill_with_separate_words() {
    // GNU parallel: printf 'a\tb\nc\td\n' | parallel -k --colsep '\t' echo {2}-{1}
    let o = run_stdin(
        &["-k", "--colsep", "\\t", "echo", "{2}-{1}"],
        b"a\tb\nc\td\n",
    );
    assert_eq!(ok(&o), "b-a\nd-c\n");
    let o = run_stdin(&["--colsep", ",", "echo"], b"a,b\n");
    assert_eq!(ok(&o), "a b\n");
    let o = run(&["--colsep", ",", "echo", "{2}", ":::", "x,y"]);
    assert_eq!(ok(&o), "y\n");
    // -m: as many as fit, a lone {} one word per argument.
    let o = run(&["-j1", "-m", "printf", "[%s]", "{}", ":::", "a b", "c"]);
    assert_eq!(ok(&o), "[a b][c]");
    let o = run(&["-j1", "-m", "echo", "x{}y", ":::", "a", "b", "c"]);
    assert_eq!(ok(&o), "xa b cy\n");
}
