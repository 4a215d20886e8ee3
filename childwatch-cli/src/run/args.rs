//! The options of `childwatch run` (clap), their value parsers (`-j N|+N|-N|N%`,
//! sizes, seconds, `--halt` conditions) and the help text that explains
//! replacement strings, input sources and quoting.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use crate::watchers::{LoopName, WatcherName};

const ABOUT_RS: &str = "\
Replacement strings (GNU parallel's), in any word of COMMAND:
  {}     the argument              {.}   without extension (dir/a.txt -> dir/a)
  {/}    base name (a.txt)         {//}  directory (dir)
  {/.}   base name, no extension   {#}   job sequence number   {%}  job slot
  {N} {N.} {N/} {N//} {N/.}        the same for the N-th input source (or
                                   the N-th argument with -n)
Without any, the arguments are appended. A value is never searched again for
replacement strings. A {...} made of digits . / # % + that is none of these is
an error; other braces ({print $1}) are kept as they are.

Input sources: ::: VALUES, :::: FILE, -a FILE; else standard input, one
argument per line (per NUL with -0). Several sources: every combination, the
last varying fastest. With no COMMAND each input line is a shell command.

Quoting: COMMAND's words run directly, without a shell, and values need no
quoting there. Where a shell will parse a value -- the SCRIPT of
`sh -c SCRIPT` (also bash, dash, zsh, ksh) or a COMMAND given as one word
with shell syntax ('gzip -dc {} | wc -l', run by /bin/sh -c) -- the value is
quoted as one shell word, as GNU parallel does. A SCRIPT that is only {}
(sh -c {}) runs the value as a script. -q pastes values in as they are.

Environment of each job: PARALLEL_SEQ, PARALLEL_JOBSLOT, PARALLEL_PID.

Examples:
  childwatch run -j 8 gzip -k ::: *.log
  childwatch run convert {} {.}.png ::: *.jpg
  find . -name '*.c' -print0 | childwatch run -0 -X wc -l
  printf 'make -C a\\nmake -C b\\n' | childwatch run --tag";

/// Options of `childwatch run`.
#[derive(Debug, clap::Args)]
#[command(after_help = ABOUT_RS, after_long_help = ABOUT_RS)]
pub struct RunArgs {
    /// Jobs to run at once: N, +N/-N (CPUs plus/minus N), N% (of the CPUs),
    /// or 0 (as many as possible). Default: the number of CPUs.
    #[arg(short = 'j', long = "jobs", value_name = "N", allow_hyphen_values = true, value_parser = parse_jobs)]
    pub jobs: Option<JobsSpec>,
    /// Child watcher.
    #[arg(long, value_enum, default_value = "auto")]
    pub watcher: WatcherName,
    /// Event loop kind.
    #[arg(long = "loop", value_enum, default_value = "auto")]
    pub loop_kind: LoopName,
    /// Per-job time limit in seconds (SIGTERM, then SIGKILL after --grace).
    #[arg(long, value_name = "SECS", allow_hyphen_values = true, value_parser = parse_secs)]
    pub timeout: Option<Duration>,
    /// Seconds between SIGTERM and SIGKILL for --timeout and --halt now.
    #[arg(long, value_name = "SECS", value_parser = parse_secs, default_value = "2")]
    pub grace: Duration,
    /// Print output in job order instead of completion order.
    #[arg(short = 'k', long)]
    pub keep_order: bool,
    /// Prefix each output line with the job's arguments (space-separated)
    /// and a tab.
    #[arg(long)]
    pub tag: bool,
    /// Write a GNU-parallel-style joblog to FILE.
    #[arg(long, value_name = "FILE")]
    pub joblog: Option<PathBuf>,
    /// Skip the jobs the --joblog records as run, and append to it.
    #[arg(long, requires = "joblog")]
    pub resume: bool,
    /// Run again the jobs the --joblog records as failed, skip the ones that
    /// succeeded, run the rest; append to it.
    #[arg(long, requires = "joblog", conflicts_with = "resume")]
    pub resume_failed: bool,
    /// When to stop: never, now|soon,fail=N|fail=N%|success=N|success=N%|done=N
    /// ("now" kills running jobs, "soon" lets them finish). A bare
    /// --halt-on-error is soon,fail=1.
    #[arg(long, alias = "halt-on-error", value_name = "WHEN", value_parser = parse_halt,
          num_args = 0..=1, default_missing_value = "soon,fail=1")]
    pub halt: Option<Halt>,
    /// Input records are separated by NUL, not newline (find -print0).
    #[arg(short = '0', long = "null")]
    pub null: bool,
    /// Give each job at most N arguments (xargs -n).
    #[arg(short = 'n', long = "max-args", value_name = "N", value_parser = parse_count)]
    pub max_args: Option<usize>,
    /// Give each job at most N input lines (xargs -L).
    #[arg(short = 'L', long = "max-lines", value_name = "N", value_parser = parse_count, conflicts_with = "max_args")]
    pub max_lines: Option<usize>,
    /// Fill each command with as many arguments as fit, repeating a word
    /// that holds {} once per argument (GNU parallel -X).
    #[arg(short = 'X', conflicts_with = "multi")]
    pub xargs: bool,
    /// Fill each command with as many arguments as fit, a lone {} becoming
    /// one word per argument (GNU parallel -m).
    #[arg(short = 'm')]
    pub multi: bool,
    /// Split each input line into columns at SEP, a literal string (\t is a
    /// tab); the columns are {1}, {2}, … (GNU parallel --colsep, which takes
    /// a regular expression).
    #[arg(short = 'C', long, value_name = "SEP", value_parser = parse_colsep)]
    pub colsep: Option<ColSep>,
    /// Read arguments from FILE (like :::: FILE; may be repeated).
    #[arg(short = 'a', long = "arg-file", value_name = "FILE")]
    pub arg_file: Vec<PathBuf>,
    /// Print the commands instead of running them.
    #[arg(long)]
    pub dry_run: bool,
    /// Run a failing job up to N times in all.
    #[arg(long, value_name = "N", value_parser = parse_count)]
    pub retries: Option<usize>,
    /// Print whole lines as they come (lines of jobs interleave).
    #[arg(long, conflicts_with = "ungroup")]
    pub line_buffer: bool,
    /// Print output as it comes, not grouped per job.
    #[arg(short = 'u', long)]
    pub ungroup: bool,
    /// Write each job's stdout, stderr and seq to DIR/1/ARG/… instead of
    /// printing them.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["ungroup", "line_buffer"])]
    pub results: Option<PathBuf>,
    /// Wait SECS between job starts.
    #[arg(long, value_name = "SECS", allow_hyphen_values = true, value_parser = parse_secs)]
    pub delay: Option<Duration>,
    /// Show a progress bar (default: when stderr is a terminal; elsewhere
    /// a "N/M jobs done" line at most once a second).
    #[arg(long, overrides_with = "no_bar")]
    pub bar: bool,
    /// Never show the progress bar.
    #[arg(long)]
    pub no_bar: bool,
    /// Show the estimated time left in the progress bar.
    #[arg(long)]
    pub eta: bool,
    /// Split standard input (or the -a/:::: file) into blocks and give each
    /// job one block on its stdin, instead of arguments (GNU parallel
    /// --pipe).
    #[arg(long)]
    pub pipe: bool,
    /// Largest --pipe block: bytes, or with k, M, G (default 1M); blocks
    /// are whole records (lines, or NUL-ended with -0).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, requires = "pipe")]
    pub block: Option<usize>,
    /// Paste values into shell scripts as they are, unquoted.
    #[arg(short = 'q', long)]
    pub quote: bool,
    /// [COMMAND [ARGS...]] [::: VALUES... | :::: FILES...]...
    #[arg(trailing_var_arg = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

/// `-j` as given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobsSpec {
    /// N jobs.
    Exact(usize),
    /// CPUs plus (or minus) N.
    Relative(i64),
    /// N percent of the CPUs.
    Percent(u64),
    /// As many as possible.
    Max,
}

/// `--colsep`'s separator, as bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColSep(pub Vec<u8>);

fn parse_colsep(s: &str) -> Result<ColSep, String> {
    let mut out = Vec::new();
    let mut chars = s.bytes();
    while let Some(c) = chars.next() {
        if c != b'\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some(b't') => out.push(b'\t'),
            Some(b'\\') => out.push(b'\\'),
            Some(b'0') => out.push(0),
            Some(other) => {
                out.push(b'\\');
                out.push(other);
            }
            None => out.push(b'\\'),
        }
    }
    if out.is_empty() {
        return Err(
            "an empty column separator splits nothing; give one, such as , or '\\t'".into(),
        );
    }
    Ok(ColSep(out))
}

pub(super) fn parse_jobs(s: &str) -> Result<JobsSpec, String> {
    let bad = || format!("'{s}' is not a number of jobs; use N, +N, -N, N% or 0");
    if let Some(p) = s.strip_suffix('%') {
        return match p.parse::<u64>() {
            Ok(0) => Err("a percentage of the CPUs must be at least 1%".into()),
            Ok(n) => Ok(JobsSpec::Percent(n)),
            Err(_) => Err(bad()),
        };
    }
    if s.starts_with('+') || s.starts_with('-') {
        return s.parse::<i64>().map(JobsSpec::Relative).map_err(|_| bad());
    }
    match s.parse::<usize>() {
        Ok(0) => Ok(JobsSpec::Max),
        Ok(n) => Ok(JobsSpec::Exact(n)),
        Err(_) => Err(bad()),
    }
}

/// The number of jobs `spec` means on a machine with `cpus` CPUs (at least
/// one), `max` standing for "as many as possible".
pub(super) fn jobs_for(spec: JobsSpec, cpus: usize, max: usize) -> usize {
    match spec {
        JobsSpec::Exact(n) => n,
        JobsSpec::Relative(d) => (cpus as i64 + d).max(1) as usize,
        JobsSpec::Percent(p) => ((cpus as u64 * p).div_ceil(100)).max(1) as usize,
        JobsSpec::Max => max,
    }
}

fn parse_count(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("'{s}' is not a positive number")),
    }
}

fn parse_size(s: &str) -> Result<usize, String> {
    let bad = || format!("'{s}' is not a size; use bytes or a number with k, M or G (1M)");
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 1usize << 10),
        Some((i, 'm' | 'M')) => (&s[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    let n: f64 = num.parse().map_err(|_| bad())?;
    if !(n.is_finite() && n >= 1.0) || n * mult as f64 > (1u64 << 40) as f64 {
        return Err(bad());
    }
    Ok((n * mult as f64) as usize)
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v < 1e9 => Ok(Duration::from_secs_f64(v)),
        _ => Err(format!("'{s}' is not a positive number of seconds")),
    }
}

/// What `--halt` counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HaltOn {
    /// Failed jobs.
    Fail,
    /// Succeeded jobs.
    Success,
    /// Finished jobs.
    Done,
}

/// `--halt WHEN`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Halt {
    /// Kill running jobs (now) or let them finish (soon).
    pub now: bool,
    /// What is counted.
    pub on: HaltOn,
    /// How many (or which percentage, with `percent`).
    pub count: u64,
    /// `count` is a percentage of all jobs.
    pub percent: bool,
}

fn parse_halt(s: &str) -> Result<Halt, String> {
    let usage = || {
        format!(
            "'{s}' is not a halt condition; use never, now,fail=N, soon,fail=N, now,fail=N%, success=N, done=N (also 0, 1, 2)"
        )
    };
    // GNU parallel's old numeric forms.
    match s {
        "0" | "never" => {
            return Ok(Halt {
                now: false,
                on: HaltOn::Fail,
                count: u64::MAX,
                percent: false,
            });
        }
        "1" => {
            return Ok(Halt {
                now: false,
                on: HaltOn::Fail,
                count: 1,
                percent: false,
            });
        }
        "2" => {
            return Ok(Halt {
                now: true,
                on: HaltOn::Fail,
                count: 1,
                percent: false,
            });
        }
        _ => {}
    }
    let (when, cond) = s.split_once(',').ok_or_else(usage)?;
    let now = match when {
        "now" => true,
        "soon" => false,
        _ => return Err(usage()),
    };
    let (what, n) = cond.split_once('=').ok_or_else(usage)?;
    let on = match what {
        "fail" => HaltOn::Fail,
        "success" => HaltOn::Success,
        "done" => HaltOn::Done,
        _ => return Err(usage()),
    };
    let (n, percent) = match n.strip_suffix('%') {
        Some(p) => (p, true),
        None => (n, false),
    };
    let count: u64 = n.parse().map_err(|_| usage())?;
    if count == 0 || (percent && count > 100) {
        return Err(usage());
    }
    Ok(Halt {
        now,
        on,
        count,
        percent,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_values_are_checked() {
        assert_eq!(parse_colsep("\\t"), Ok(ColSep(b"\t".to_vec())));
        assert_eq!(parse_colsep("::"), Ok(ColSep(b"::".to_vec())));
        assert!(parse_colsep("").is_err());
        assert_eq!(parse_jobs("3"), Ok(JobsSpec::Exact(3)));
        assert_eq!(parse_jobs("0"), Ok(JobsSpec::Max));
        assert_eq!(parse_jobs("+1"), Ok(JobsSpec::Relative(1)));
        assert_eq!(parse_jobs("-1"), Ok(JobsSpec::Relative(-1)));
        assert_eq!(parse_jobs("50%"), Ok(JobsSpec::Percent(50)));
        assert!(parse_jobs("x").is_err());
        assert!(parse_jobs("0%").is_err());
        assert_eq!(jobs_for(JobsSpec::Relative(1), 2, 99), 3);
        assert_eq!(jobs_for(JobsSpec::Relative(-4), 2, 99), 1);
        assert_eq!(jobs_for(JobsSpec::Percent(50), 3, 99), 2);
        assert_eq!(jobs_for(JobsSpec::Max, 3, 99), 99);
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("10k"), Ok(10240));
        assert_eq!(parse_size("6"), Ok(6));
        for bad in ["0", "x", "1T", "-1k"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_secs("0.5"), Ok(Duration::from_millis(500)));
        for bad in ["0", "-2", "nan", "inf", "x"] {
            assert!(parse_secs(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn halt_conditions() {
        assert_eq!(
            parse_halt("now,fail=1"),
            Ok(Halt {
                now: true,
                on: HaltOn::Fail,
                count: 1,
                percent: false
            })
        );
        assert_eq!(
            parse_halt("soon,success=30%"),
            Ok(Halt {
                now: false,
                on: HaltOn::Success,
                count: 30,
                percent: true
            })
        );
        for bad in [
            "later,fail=1",
            "now",
            "now,fail=0",
            "now,fail=x",
            "now,fail=101%",
            "now,oops=1",
        ] {
            assert!(parse_halt(bad).is_err(), "{bad}");
        }
    }
}
