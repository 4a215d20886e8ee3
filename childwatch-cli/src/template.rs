//! The command template of `childwatch run` and its replacement strings.
//!
//! A template is the command words before the first `:::`/`::::`. Each word
//! is parsed once into literal bytes and replacement strings, GNU parallel's
//! set:
//!
//! | string | becomes |
//! |---|---|
//! | `{}` | the argument |
//! | `{.}` | the argument without its extension (`dir/a.txt` → `dir/a`) |
//! | `{/}` | its base name (`dir/a.txt` → `a.txt`) |
//! | `{//}` | its directory (`dir/a.txt` → `dir`; `.` when there is none) |
//! | `{/.}` | its base name without extension (`a`) |
//! | `{#}` | the job's sequence number |
//! | `{%}` | the job slot (1..=-j) |
//! | `{N}` `{N.}` `{N/}` `{N//}` `{N/.}` | the same for the N-th argument |
//!
//! Substitution is a single pass over the parsed words, so a value is never
//! searched for replacement strings again. A brace group made only of the
//! characters replacement strings use (digits, `.`, `/`, `#`, `%`, `+`) that
//! is none of the above is an error; any other brace group (`{print $1}`,
//! `{x}`) is literal text, so awk and shell scripts pass through.
//!
//! Quoting (the rule GNU parallel applies to the command line it hands to its
//! shell): childwatch runs the words directly, without a shell, so a value in
//! an ordinary word needs no quoting and gets none. A value substituted into
//! text that a shell will parse — the script of `sh|bash|dash|zsh|ksh -c
//! SCRIPT`, or a template given as one word with shell syntax (`'gzip -dc
//! {} | wc -l'`, run with `/bin/sh -c`) — is quoted as one shell word. A
//! SCRIPT that is nothing but a replacement string (`sh -c {}`) is the
//! value itself, run as a script, as in GNU parallel. `-q`
//! turns that quoting off (as GNU parallel's `-q` does for its own
//! template): the value is pasted in as is.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use anyhow::{Result, bail};

/// Which part of an argument a replacement string takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// `{}`: all of it.
    Whole,
    /// `{.}`: without extension.
    NoExt,
    /// `{/}`: base name.
    Base,
    /// `{//}`: directory.
    Dir,
    /// `{/.}`: base name without extension.
    BaseNoExt,
}

/// One parsed replacement string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rs {
    /// `{}`-like: every argument of the job (`pos` None) or the N-th (1-based).
    Arg {
        /// 1-based argument position; None for all of them.
        pos: Option<usize>,
        /// Which part of the argument.
        part: Part,
    },
    /// `{#}`: the sequence number.
    Seq,
    /// `{%}`: the job slot.
    Slot,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    Lit(Vec<u8>),
    Rs(Rs),
}

/// One template word, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Word {
    pieces: Vec<Piece>,
    /// A shell parses this word: substituted values are quoted.
    shell: bool,
}

impl Word {
    fn has_multi(&self) -> bool {
        self.pieces
            .iter()
            .any(|p| matches!(p, Piece::Rs(Rs::Arg { pos: None, .. })))
    }
}

/// How several arguments of one job fill a word holding `{}` (`-n`, `-X`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Multi {
    /// A word that is only `{}` becomes one word per argument; inside a
    /// larger word the arguments are joined with spaces (GNU parallel `-m`).
    Separate,
    /// The whole word is repeated for each argument (`-X`, "context").
    Context,
}

/// What one job's command is built from.
#[derive(Clone, Copy, Debug)]
pub struct Fill<'a> {
    /// The job's arguments.
    pub args: &'a [Vec<u8>],
    /// Sequence number.
    pub seq: u64,
    /// Job slot.
    pub slot: usize,
}

/// A parsed command template.
#[derive(Clone, Debug)]
pub struct Template {
    words: Vec<Word>,
    /// The template is one shell command line (run with `/bin/sh -c`).
    shell_line: bool,
    any_args: bool,
    multi: Multi,
}

/// The shells whose `-c SCRIPT` we quote values for.
const SHELLS: [&str; 7] = ["sh", "bash", "dash", "zsh", "ksh", "ash", "mksh"];

/// Bytes that make a one-word template a shell command line.
const SHELL_SYNTAX: &[u8] = b" \t\n|&;<>()$`\\\"'*?[~";

impl Template {
    /// Parses the command words. `quote` false is `-q`. `max_args` is the
    /// most arguments a job can have (a `{N}` beyond it is an error).
    pub fn parse(
        words: &[OsString],
        quote: bool,
        multi: Multi,
        max_args: usize,
    ) -> Result<Template> {
        let raw: Vec<&[u8]> = words.iter().map(|w| w.as_bytes()).collect();
        let shell_line = quote && raw.len() == 1 && raw[0].iter().any(|b| SHELL_SYNTAX.contains(b));
        let script_at = if quote {
            shell_script_index(&raw)
        } else {
            None
        };
        let mut parsed = Vec::with_capacity(raw.len());
        for (i, w) in raw.iter().enumerate() {
            let pieces = parse_word(w, max_args)?;
            // A script that is only a replacement string is the value
            // itself: `sh -c {} ::: 'sleep 1'` runs the value as a script.
            let whole_value = pieces.len() == 1 && matches!(pieces[0], Piece::Rs(_));
            parsed.push(Word {
                pieces,
                shell: shell_line || (script_at == Some(i) && !whole_value),
            });
        }
        // Any replacement string, {#} included, means "the template says
        // where values go": nothing is appended (GNU parallel's rule).
        let any_args = parsed
            .iter()
            .any(|w| w.pieces.iter().any(|p| matches!(p, Piece::Rs(_))));
        Ok(Template {
            words: parsed,
            shell_line,
            any_args,
            multi,
        })
    }

    /// Whether the template is empty (commands come from the input lines).
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// Builds a job's argv.
    pub fn build(&self, f: &Fill<'_>) -> Vec<OsString> {
        let mut out: Vec<Vec<u8>> = Vec::with_capacity(self.words.len() + f.args.len());
        for w in &self.words {
            let context = self.multi == Multi::Context && w.has_multi();
            let alone =
                w.pieces.len() == 1 && matches!(w.pieces[0], Piece::Rs(Rs::Arg { pos: None, .. }));
            if context && f.args.len() != 1 {
                for a in f.args {
                    out.push(fill_word(
                        w,
                        &Fill {
                            args: std::slice::from_ref(a),
                            ..*f
                        },
                    ));
                }
            } else if alone && !w.shell && f.args.len() != 1 {
                let Piece::Rs(Rs::Arg { part, .. }) = w.pieces[0] else {
                    unreachable!()
                };
                out.extend(f.args.iter().map(|a| take_part(a, part)));
            } else {
                out.push(fill_word(w, f));
            }
        }
        if !self.any_args {
            if self.shell_line {
                let line = out.last_mut().expect("a shell line has its word");
                for a in f.args {
                    line.push(b' ');
                    line.extend_from_slice(&shell_quote(a));
                }
            } else {
                out.extend(f.args.iter().cloned());
            }
        }
        let mut argv: Vec<OsString> = out.into_iter().map(OsString::from_vec).collect();
        if self.shell_line {
            let line = argv.pop().unwrap_or_default();
            argv = vec!["/bin/sh".into(), "-c".into(), line];
        }
        argv
    }
}

/// The index of SCRIPT in `SHELL [-flags] -c SCRIPT ...`, if the program is
/// a shell.
fn shell_script_index(words: &[&[u8]]) -> Option<usize> {
    let prog = words.first()?;
    let base = prog.rsplit(|&b| b == b'/').next().unwrap_or(prog);
    if !SHELLS.iter().any(|s| s.as_bytes() == base) {
        return None;
    }
    for (i, w) in words.iter().enumerate().skip(1) {
        if w.first() != Some(&b'-') || *w == b"--" {
            return None;
        }
        if w.len() > 1 && !w.starts_with(b"--") && w.contains(&b'c') {
            return Some(i + 1).filter(|&s| s < words.len());
        }
    }
    None
}

/// Parses a replacement string's inside (between the braces), or None when
/// it is none.
fn parse_rs(inner: &[u8]) -> Option<Rs> {
    match inner {
        b"#" => return Some(Rs::Seq),
        b"%" => return Some(Rs::Slot),
        _ => {}
    }
    let digits = inner.iter().take_while(|b| b.is_ascii_digit()).count();
    let pos = if digits == 0 {
        None
    } else {
        let n: usize = std::str::from_utf8(&inner[..digits]).ok()?.parse().ok()?;
        if n == 0 {
            return None;
        }
        Some(n)
    };
    let part = match &inner[digits..] {
        b"" => Part::Whole,
        b"." => Part::NoExt,
        b"/" => Part::Base,
        b"//" => Part::Dir,
        b"/." => Part::BaseNoExt,
        _ => return None,
    };
    Some(Rs::Arg { pos, part })
}

fn parse_word(w: &[u8], max_args: usize) -> Result<Vec<Piece>> {
    let mut pieces = Vec::new();
    let mut lit = Vec::new();
    let mut i = 0;
    while i < w.len() {
        if w[i] == b'{' {
            if let Some(len) = w[i + 1..].iter().position(|&b| b == b'}') {
                let inner = &w[i + 1..i + 1 + len];
                let looks_like_rs = inner.iter().all(|b| b"0123456789./#%+".contains(b));
                if looks_like_rs {
                    let shown = String::from_utf8_lossy(&w[i..i + len + 2]).into_owned();
                    let Some(rs) = parse_rs(inner) else {
                        bail!(
                            "unknown replacement string '{shown}' in the command; use {{}} {{.}} {{/}} {{//}} {{/.}} {{#}} {{%}} or {{N}} {{N.}} {{N/}} {{N//}} {{N/.}} (see childwatch run --help)"
                        );
                    };
                    if let Rs::Arg { pos: Some(n), .. } = rs {
                        if n > max_args {
                            bail!(
                                "'{shown}' refers to argument {n}, but a job has at most {max_args} (one per input source, times -n)"
                            );
                        }
                    }
                    if !lit.is_empty() {
                        pieces.push(Piece::Lit(std::mem::take(&mut lit)));
                    }
                    pieces.push(Piece::Rs(rs));
                    i += len + 2;
                    continue;
                }
            }
        }
        lit.push(w[i]);
        i += 1;
    }
    if !lit.is_empty() || pieces.is_empty() {
        pieces.push(Piece::Lit(lit));
    }
    Ok(pieces)
}

fn fill_word(w: &Word, f: &Fill<'_>) -> Vec<u8> {
    let mut s = Vec::new();
    for p in &w.pieces {
        match p {
            Piece::Lit(l) => s.extend_from_slice(l),
            Piece::Rs(Rs::Seq) => s.extend_from_slice(f.seq.to_string().as_bytes()),
            Piece::Rs(Rs::Slot) => s.extend_from_slice(f.slot.to_string().as_bytes()),
            Piece::Rs(Rs::Arg { pos: Some(n), part }) => {
                let v = f
                    .args
                    .get(n - 1)
                    .map(|a| take_part(a, *part))
                    .unwrap_or_default();
                s.extend_from_slice(&maybe_quote(&v, w.shell));
            }
            Piece::Rs(Rs::Arg { pos: None, part }) => {
                for (k, a) in f.args.iter().enumerate() {
                    if k > 0 {
                        s.push(b' ');
                    }
                    s.extend_from_slice(&maybe_quote(&take_part(a, *part), w.shell));
                }
            }
        }
    }
    s
}

fn maybe_quote(v: &[u8], shell: bool) -> Vec<u8> {
    if shell { shell_quote(v) } else { v.to_vec() }
}

/// The part of an argument a replacement string asks for.
pub fn take_part(a: &[u8], part: Part) -> Vec<u8> {
    let slash = a.iter().rposition(|&b| b == b'/');
    let base = match slash {
        Some(i) => &a[i + 1..],
        None => a,
    };
    let no_ext = |s: &[u8]| -> Vec<u8> {
        // The extension is after the last dot of the base name, not a
        // leading one (".bashrc" has none).
        match s.iter().rposition(|&b| b == b'.') {
            Some(0) | None => s.to_vec(),
            Some(i) => s[..i].to_vec(),
        }
    };
    match part {
        Part::Whole => a.to_vec(),
        Part::Base => base.to_vec(),
        Part::BaseNoExt => no_ext(base),
        Part::NoExt => {
            let dir_len = a.len() - base.len();
            let mut v = a[..dir_len].to_vec();
            v.extend_from_slice(&no_ext(base));
            v
        }
        Part::Dir => match slash {
            Some(0) => b"/".to_vec(),
            Some(i) => a[..i].to_vec(),
            None => b".".to_vec(),
        },
    }
}

/// Quotes `s` as one POSIX shell word (unchanged when it needs none).
pub fn shell_quote(s: &[u8]) -> Vec<u8> {
    let plain = !s.is_empty()
        && s.iter()
            .all(|&c| c.is_ascii_alphanumeric() || b"-_./=:,+@%^".contains(&c));
    if plain {
        return s.to_vec();
    }
    let mut out = Vec::with_capacity(s.len() + 2);
    out.push(b'\'');
    for &c in s {
        if c == b'\'' {
            out.extend_from_slice(b"'\\''");
        } else {
            out.push(c);
        }
    }
    out.push(b'\'');
    out
}

/// An argv as one shell-quoted line (joblog, `--dry-run`, messages).
pub fn command_line(argv: &[OsString]) -> Vec<u8> {
    if argv.len() == 3 && argv[0] == "/bin/sh" && argv[1] == "-c" {
        return argv[2].as_bytes().to_vec();
    }
    let mut out = Vec::new();
    for (i, a) in argv.iter().enumerate() {
        if i > 0 {
            out.push(b' ');
        }
        out.extend_from_slice(&shell_quote(OsStr::as_bytes(a)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(words: &[&str], multi: Multi, max: usize) -> Template {
        let w: Vec<OsString> = words.iter().map(OsString::from).collect();
        Template::parse(&w, true, multi, max).unwrap()
    }

    fn build(tpl: &Template, args: &[&str]) -> Vec<String> {
        let args: Vec<Vec<u8>> = args.iter().map(|a| a.as_bytes().to_vec()).collect();
        tpl.build(&Fill {
            args: &args,
            seq: 7,
            slot: 2,
        })
        .into_iter()
        .map(|s| s.into_string().unwrap())
        .collect()
    }

    #[test]
    fn parts_of_a_path() {
        let cases = [
            (
                "dir/sub/a.tar.gz",
                "dir/sub/a.tar",
                "a.tar.gz",
                "dir/sub",
                "a.tar",
            ),
            ("a", "a", "a", ".", "a"),
            (".bashrc", ".bashrc", ".bashrc", ".", ".bashrc"),
            ("/a.txt", "/a", "a.txt", "/", "a"),
            ("d.x/f", "d.x/f", "f", "d.x", "f"),
        ];
        for (a, noext, base, dir, basenoext) in cases {
            let p = |part| String::from_utf8(take_part(a.as_bytes(), part)).unwrap();
            assert_eq!(
                (
                    p(Part::NoExt),
                    p(Part::Base),
                    p(Part::Dir),
                    p(Part::BaseNoExt)
                ),
                (noext.into(), base.into(), dir.into(), basenoext.into()),
                "{a}"
            );
        }
    }

    #[test]
    fn every_replacement_string() {
        let tpl = t(
            &[
                "x", "{}", "{.}", "{/}", "{//}", "{/.}", "{#}", "{%}", "{1.}",
            ],
            Multi::Separate,
            1,
        );
        assert_eq!(
            build(&tpl, &["d/a.txt"]),
            ["x", "d/a.txt", "d/a", "a.txt", "d", "a", "7", "2", "d/a"]
        );
    }

    #[test]
    fn unknown_strings_are_errors_but_scripts_are_literal() {
        for bad in ["{0}", "{1..}", "{+/}", "{./}", "{3}"] {
            let w = vec![OsString::from("echo"), OsString::from(bad)];
            assert!(
                Template::parse(&w, true, Multi::Separate, 2).is_err(),
                "{bad}"
            );
        }
        let tpl = t(&["awk", "{print $1}", "{x}"], Multi::Separate, 1);
        assert_eq!(build(&tpl, &["f"]), ["awk", "{print $1}", "{x}", "f"]);
    }

    #[test]
    fn shell_scripts_get_quoted_values() {
        let tpl = t(&["sh", "-c", "echo {}", "{}"], Multi::Separate, 1);
        assert_eq!(build(&tpl, &["a; b"]), ["sh", "-c", "echo 'a; b'", "a; b"]);
        let tpl = t(&["bash", "-ec", "{}"], Multi::Separate, 1);
        assert_eq!(build(&tpl, &["a; b"]), ["bash", "-ec", "a; b"]);
        let tpl = t(&["echo {} | wc -c"], Multi::Separate, 1);
        assert_eq!(
            build(&tpl, &["it's"]),
            ["/bin/sh", "-c", r"echo 'it'\''s' | wc -c"]
        );
        let w = vec![
            OsString::from("sh"),
            OsString::from("-c"),
            OsString::from("echo {}"),
        ];
        let raw = Template::parse(&w, false, Multi::Separate, 1).unwrap();
        assert_eq!(build(&raw, &["a; b"]), ["sh", "-c", "echo a; b"]);
    }

    #[test]
    fn several_arguments() {
        let tpl = t(&["echo", "{}", "x{}y"], Multi::Separate, 2);
        assert_eq!(build(&tpl, &["a", "b"]), ["echo", "a", "b", "xa by"]);
        let tpl = t(&["echo", "x{}y"], Multi::Context, 2);
        assert_eq!(build(&tpl, &["a", "b"]), ["echo", "xay", "xby"]);
        let tpl = t(&["echo", "{2}-{1}"], Multi::Separate, 2);
        assert_eq!(build(&tpl, &["a", "b"]), ["echo", "b-a"]);
        let tpl = t(&["echo"], Multi::Separate, 2);
        assert_eq!(build(&tpl, &["a", "b"]), ["echo", "a", "b"]);
    }
}
