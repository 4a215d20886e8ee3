//! Turning the command line and standard input into a list of jobs.
//!
//! * `CMD ... ::: a b c` — one job per value; with several `:::` groups, one
//!   job per combination (GNU parallel's order: the last group varies
//!   fastest). `{}` in CMD is replaced by the value(s); without `{}` they are
//!   appended. Jobs are executed directly, not through a shell.
//! * `CMD ...` without `:::` — one job per line of standard input, the line
//!   as the argument.
//! * nothing — each line of standard input is a command for `/bin/sh -c`.

use std::io::BufRead;

use anyhow::{Context, Result, bail};

/// One job to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    /// 1-based sequence number, in input order.
    pub seq: usize,
    /// The program and its arguments.
    pub argv: Vec<String>,
    /// What `--tag` prefixes each line with.
    pub tag: String,
}

impl Job {
    /// The command as a shell-quoted line (for the joblog and messages).
    pub fn command_line(&self) -> String {
        if self.argv.len() == 3 && self.argv[0] == "/bin/sh" && self.argv[1] == "-c" {
            return self.argv[2].clone();
        }
        self.argv
            .iter()
            .map(|a| quote(a))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Shell-quotes `s` when it needs it.
fn quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%^".contains(c));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Builds the job list from the words after `run` options and, when they
/// call for it, from `input` (standard input).
pub fn expand(words: &[String], input: impl BufRead) -> Result<Vec<Job>> {
    let mut groups: Vec<Vec<String>> = Vec::new();
    let mut template: Vec<String> = Vec::new();
    for w in words {
        if w == ":::" {
            groups.push(Vec::new());
        } else if let Some(g) = groups.last_mut() {
            g.push(w.clone());
        } else {
            template.push(w.clone());
        }
    }
    let jobs = if !groups.is_empty() {
        if template.is_empty() {
            bail!(
                "no command before ':::'; usage: childwatch run [OPTIONS] -- CMD [ARGS] ::: VALUES"
            );
        }
        if let Some(i) = groups.iter().position(|g| g.is_empty()) {
            bail!("no jobs: the ':::' group number {} has no values", i + 1);
        }
        combinations(&groups)
            .into_iter()
            .map(|vals| fill(&template, &vals))
            .collect::<Vec<_>>()
    } else {
        let lines = read_lines(input)?;
        if template.is_empty() {
            lines
                .into_iter()
                .map(|l| (vec!["/bin/sh".into(), "-c".into(), l.clone()], l))
                .collect()
        } else {
            lines
                .into_iter()
                .map(|l| fill(&template, std::slice::from_ref(&l)))
                .collect()
        }
    };
    if jobs.is_empty() {
        bail!(
            "no jobs to run: standard input had no lines (give commands on stdin, or values after ':::')"
        );
    }
    Ok(jobs
        .into_iter()
        .enumerate()
        .map(|(i, (argv, tag))| Job {
            seq: i + 1,
            argv,
            tag,
        })
        .collect())
}

fn read_lines(input: impl BufRead) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for line in input.lines() {
        let line = line.context("cannot read jobs from standard input")?;
        if !line.trim().is_empty() {
            out.push(line);
        }
    }
    Ok(out)
}

/// Every combination of one value per group, the last group varying fastest.
fn combinations(groups: &[Vec<String>]) -> Vec<Vec<String>> {
    let mut out: Vec<Vec<String>> = vec![Vec::new()];
    for g in groups {
        out = out
            .into_iter()
            .flat_map(|prefix| {
                g.iter().map(move |v| {
                    let mut p = prefix.clone();
                    p.push(v.clone());
                    p
                })
            })
            .collect();
    }
    out
}

/// Substitutes `{}` (all values, space-separated) and `{1}`, `{2}`... (one
/// value each) into the template; appends the values when there is no
/// placeholder. Returns the argv and the tag.
fn fill(template: &[String], vals: &[String]) -> (Vec<String>, String) {
    let all = vals.join(" ");
    let mut used = false;
    let mut argv: Vec<String> = template
        .iter()
        .map(|w| {
            let mut s = w.clone();
            for (i, v) in vals.iter().enumerate() {
                let ph = format!("{{{}}}", i + 1);
                if s.contains(&ph) {
                    s = s.replace(&ph, v);
                    used = true;
                }
            }
            if s.contains("{}") {
                s = s.replace("{}", &all);
                used = true;
            }
            s
        })
        .collect();
    if !used {
        argv.extend(vals.iter().cloned());
    }
    (argv, vals.join("\t"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn values_replace_the_placeholder() {
        let j = expand(&words("gzip -k {} ::: a b"), &b""[..]).unwrap();
        assert_eq!(j.len(), 2);
        assert_eq!(j[0].argv, words("gzip -k a"));
        assert_eq!(j[1].argv, words("gzip -k b"));
        assert_eq!(j[1].seq, 2);
        assert_eq!(j[1].tag, "b");
    }

    #[test]
    fn values_are_appended_without_placeholder() {
        let j = expand(&words("echo x ::: 1"), &b""[..]).unwrap();
        assert_eq!(j[0].argv, words("echo x 1"));
    }

    #[test]
    fn groups_make_combinations() {
        let j = expand(&words("echo {1}-{2} ::: a b ::: 1 2"), &b""[..]).unwrap();
        let got: Vec<_> = j.iter().map(|j| j.argv[1].clone()).collect();
        assert_eq!(got, ["a-1", "a-2", "b-1", "b-2"]);
    }

    #[test]
    fn stdin_lines_are_shell_commands() {
        let j = expand(&[], &b"echo a\n\n  \necho 'b c'\n"[..]).unwrap();
        assert_eq!(j.len(), 2);
        assert_eq!(j[1].argv, ["/bin/sh", "-c", "echo 'b c'"]);
        assert_eq!(j[1].command_line(), "echo 'b c'");
    }

    #[test]
    fn stdin_lines_are_arguments_to_a_command() {
        let j = expand(&words("wc -c"), &b"f1\nf2\n"[..]).unwrap();
        assert_eq!(j[1].argv, words("wc -c f2"));
    }

    #[test]
    fn empty_lists_are_errors() {
        assert!(expand(&words("echo :::"), &b""[..]).is_err());
        assert!(expand(&[], &b"\n\n"[..]).is_err());
        assert!(expand(&words("::: a"), &b""[..]).is_err());
    }

    #[test]
    fn command_lines_are_quoted() {
        let j = Job {
            seq: 1,
            argv: vec!["echo".into(), "a b".into(), "it's".into()],
            tag: String::new(),
        };
        assert_eq!(j.command_line(), r#"echo 'a b' 'it'\''s'"#);
    }
}
