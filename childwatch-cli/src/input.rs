//! Where `childwatch run` gets its arguments, streamed.
//!
//! Input sources, GNU parallel's: each `::: VALUES` group, each `:::: FILE`
//! and `-a FILE` (one argument per line, or per NUL with `-0`; `-` is
//! standard input), and standard input when there is no other source. With
//! several sources a job takes one value of each, every combination, the
//! last source varying fastest.
//!
//! A reader thread turns the sources into [`Record`]s (one job's arguments)
//! and hands them to the loop through a bounded channel, so jobs start as
//! input arrives and memory does not grow with the number of input lines:
//! the first source is streamed; the others are held (they are needed once
//! per value of the first).
//!
//! `--pipe` cuts the input into blocks instead ([`produce_blocks`]): whole
//! records, at most `--block` bytes each, each fed to one job's standard
//! input.

use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::ffi::OsStringExt;
use std::path::Path;

use anyhow::{Context, Result, bail};

/// One input source.
pub enum Source {
    /// `::: a b c`.
    Values(Vec<Vec<u8>>),
    /// A file or standard input, read one record at a time.
    Reader(Box<dyn BufRead + Send>),
}

impl Source {
    /// Opens `-a FILE` / `:::: FILE` (`-` is standard input).
    pub fn open(path: &Path) -> Result<Source> {
        if path.as_os_str() == "-" {
            return Ok(Source::stdin());
        }
        let f = File::open(path).with_context(|| {
            format!(
                "cannot read the input file {} (given with -a or ::::)",
                path.display()
            )
        })?;
        Ok(Source::Reader(Box::new(BufReader::with_capacity(
            1 << 16,
            f,
        ))))
    }

    /// Standard input.
    pub fn stdin() -> Source {
        Source::Reader(Box::new(BufReader::with_capacity(
            1 << 16,
            std::io::stdin(),
        )))
    }
}

/// The command words split from the sources that follow them.
pub struct Split {
    /// The template words.
    pub template: Vec<OsString>,
    /// `:::` and `::::` sources, in order.
    pub sources: Vec<Source>,
}

/// Splits `CMD ... ::: a b :::: FILE ...` into template and sources.
pub fn split_words(words: &[OsString]) -> Result<Split> {
    enum Next {
        Template,
        Values,
        Files,
    }
    let mut template = Vec::new();
    let mut sources = Vec::new();
    let mut mode = Next::Template;
    for w in words {
        if w == ":::" {
            sources.push(Source::Values(Vec::new()));
            mode = Next::Values;
            continue;
        }
        if w == "::::" {
            mode = Next::Files;
            continue;
        }
        if w == ":::+" || w == "::::+" {
            bail!(
                "'{}' (linked input sources) is not supported; use separate ::: groups",
                w.to_string_lossy()
            );
        }
        match mode {
            Next::Template => template.push(w.clone()),
            Next::Values => {
                if let Some(Source::Values(v)) = sources.last_mut() {
                    v.push(w.clone().into_vec());
                }
            }
            Next::Files => sources.push(Source::open(Path::new(w))?),
        }
    }
    if matches!(mode, Next::Files) && !matches!(sources.last(), Some(Source::Reader(_))) {
        bail!("'::::' needs a file name after it");
    }
    if let Some(i) = sources
        .iter()
        .position(|s| matches!(s, Source::Values(v) if v.is_empty()))
    {
        bail!("no jobs: the ':::' group number {} has no values", i + 1);
    }
    Ok(Split { template, sources })
}

/// One job's arguments, in input order.
#[derive(Debug)]
pub struct Record {
    /// 1-based sequence number.
    pub seq: u64,
    /// The arguments (one per source, times `-n`).
    pub args: Vec<Vec<u8>>,
    /// `--pipe`: the block of input the job reads on its stdin.
    pub block: Option<Vec<u8>>,
}

/// How records are cut from the input and grouped into jobs.
#[derive(Clone, Debug)]
pub struct Grouping {
    /// Record separator (`\n`, or `\0` with `-0`).
    pub sep: u8,
    /// At most this many input records per job (`-n`, `-L`).
    pub per_job: usize,
    /// With `-X` and no `-n`: fill a job up to this many bytes of arguments.
    pub max_bytes: Option<usize>,
    /// Input lines are shell commands (no template): skip blank ones.
    pub commands: bool,
    /// `--colsep`: split each value into columns at this string.
    pub colsep: Option<Vec<u8>>,
}

/// Splits `v` at every occurrence of `sep`.
fn split_cols(v: Vec<u8>, sep: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i + sep.len() <= v.len() {
        if &v[i..i + sep.len()] == sep {
            out.push(v[start..i].to_vec());
            i += sep.len();
            start = i;
        } else {
            i += 1;
        }
    }
    out.push(v[start..].to_vec());
    out
}

/// Reads records from one streamed source.
struct Records {
    src: Source,
    idx: usize,
    sep: u8,
    commands: bool,
}

impl Records {
    fn next(&mut self) -> Result<Option<Vec<u8>>> {
        match &mut self.src {
            Source::Values(v) => {
                let r = v.get_mut(self.idx).map(std::mem::take);
                self.idx += 1;
                Ok(r)
            }
            Source::Reader(r) => loop {
                let mut buf = Vec::new();
                let n = r
                    .read_until(self.sep, &mut buf)
                    .context("cannot read the input")?;
                if n == 0 {
                    return Ok(None);
                }
                if buf.last() == Some(&self.sep) {
                    buf.pop();
                }
                let blank = if self.commands {
                    buf.iter().all(|b| b.is_ascii_whitespace())
                } else {
                    buf.is_empty()
                };
                if !blank {
                    return Ok(Some(buf));
                }
            },
        }
    }
}

fn read_all(src: Source, sep: u8) -> Result<Vec<Vec<u8>>> {
    let mut r = Records {
        src,
        idx: 0,
        sep,
        commands: false,
    };
    let mut out = Vec::new();
    while let Some(v) = r.next()? {
        out.push(v);
    }
    Ok(out)
}

/// Produces the records of `sources` into `tx` until they end or the
/// receiver is gone; skips the sequence numbers `skip` says to (`--resume`).
/// Returns how many records there were.
pub fn produce(
    mut sources: Vec<Source>,
    g: Grouping,
    skip: impl Fn(u64) -> bool,
    tx: async_channel::Sender<Record>,
) -> Result<u64> {
    if sources.is_empty() {
        bail!("no input sources");
    }
    let first = sources.remove(0);
    let rest: Vec<Vec<Vec<u8>>> = sources
        .into_iter()
        .map(|s| read_all(s, g.sep))
        .collect::<Result<_>>()?;
    if rest.iter().any(Vec::is_empty) {
        return Ok(0);
    }
    let mut first = Records {
        src: first,
        idx: 0,
        sep: g.sep,
        commands: g.commands,
    };
    let mut seq = 0u64;
    let mut pending: Vec<Vec<u8>> = Vec::new();
    let mut in_job = 0usize;
    let mut bytes = 0usize;
    let emit = |args: &mut Vec<Vec<u8>>, seq: &mut u64| -> bool {
        *seq += 1;
        let args = std::mem::take(args);
        if skip(*seq) {
            return true;
        }
        tx.send_blocking(Record {
            seq: *seq,
            args,
            block: None,
        })
        .is_ok()
    };
    while let Some(v) = first.next()? {
        // Every combination of this value with one of each held source.
        let mut idx = vec![0usize; rest.len()];
        loop {
            let mut tuple_bytes = v.len() + 1;
            let mut tuple = vec![v.clone()];
            for (k, r) in rest.iter().enumerate() {
                tuple_bytes += r[idx[k]].len() + 1;
                tuple.push(r[idx[k]].clone());
            }
            if let Some(max) = g.max_bytes {
                if in_job > 0 && bytes + tuple_bytes > max {
                    if !emit(&mut pending, &mut seq) {
                        return Ok(seq);
                    }
                    in_job = 0;
                    bytes = 0;
                }
            }
            match &g.colsep {
                Some(sep) => {
                    for v in tuple {
                        pending.extend(split_cols(v, sep));
                    }
                }
                None => pending.extend(tuple),
            }
            in_job += 1;
            bytes += tuple_bytes;
            if in_job >= g.per_job {
                if !emit(&mut pending, &mut seq) {
                    return Ok(seq);
                }
                in_job = 0;
                bytes = 0;
            }
            // Next combination, the last source fastest.
            let mut k = rest.len();
            loop {
                if k == 0 {
                    break;
                }
                k -= 1;
                idx[k] += 1;
                if idx[k] < rest[k].len() {
                    break;
                }
                idx[k] = 0;
                if k == 0 {
                    k = usize::MAX;
                    break;
                }
            }
            if rest.is_empty() || k == usize::MAX {
                break;
            }
        }
    }
    if in_job > 0 {
        emit(&mut pending, &mut seq);
    }
    Ok(seq)
}

/// `--pipe`: cuts the first source into blocks of whole records, each at
/// most `size` bytes (a longer record is a block of its own), as GNU
/// parallel splits at the last record end within a block; one job each. Returns how many blocks there were.
pub fn produce_blocks(
    mut sources: Vec<Source>,
    sep: u8,
    size: usize,
    skip: impl Fn(u64) -> bool,
    tx: async_channel::Sender<Record>,
) -> Result<u64> {
    if sources.len() != 1 {
        bail!(
            "--pipe reads one input (standard input, or one -a/:::: file); ::: values do not apply"
        );
    }
    let mut seq = 0u64;
    let mut block = Vec::with_capacity(size + 4096);
    let send = |block: Vec<u8>, seq: &mut u64| -> bool {
        *seq += 1;
        if skip(*seq) {
            return true;
        }
        tx.send_blocking(Record {
            seq: *seq,
            args: Vec::new(),
            block: Some(block),
        })
        .is_ok()
    };
    match sources.remove(0) {
        Source::Values(_) => unreachable!("checked by the caller"),
        Source::Reader(mut r) => {
            let mut rec = Vec::new();
            loop {
                rec.clear();
                let n = r
                    .read_until(sep, &mut rec)
                    .context("cannot read the input")?;
                if n == 0 || (!block.is_empty() && block.len() + rec.len() > size) {
                    let full = std::mem::replace(&mut block, Vec::with_capacity(size + 4096));
                    if !full.is_empty() && !send(full, &mut seq) {
                        return Ok(seq);
                    }
                    if n == 0 {
                        return Ok(seq);
                    }
                }
                block.extend_from_slice(&rec);
            }
        }
    }
}

/// Reads a whole stream (used by tests).
#[cfg(test)]
fn collect(sources: Vec<Source>, g: Grouping) -> Vec<Vec<String>> {
    let (tx, rx) = async_channel::unbounded();
    produce(sources, g, |_| false, tx).unwrap();
    let mut out = Vec::new();
    while let Ok(r) = rx.try_recv() {
        out.push(
            r.args
                .into_iter()
                .map(|a| String::from_utf8(a).unwrap())
                .collect(),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(v: &[&str]) -> Source {
        Source::Values(v.iter().map(|s| s.as_bytes().to_vec()).collect())
    }
    fn g(per_job: usize) -> Grouping {
        Grouping {
            sep: b'\n',
            per_job,
            max_bytes: None,
            commands: false,
            colsep: None,
        }
    }

    #[test]
    fn combinations_last_source_fastest() {
        let got = collect(vec![vals(&["a", "b"]), vals(&["1", "2"])], g(1));
        assert_eq!(got, [["a", "1"], ["a", "2"], ["b", "1"], ["b", "2"]]);
    }

    #[test]
    fn groups_of_n() {
        let got = collect(vec![vals(&["a", "b", "c"])], g(2));
        assert_eq!(got, vec![vec!["a", "b"], vec!["c"]]);
    }

    #[test]
    fn columns() {
        assert_eq!(
            split_cols(b"a::b::".to_vec(), b"::"),
            [&b"a"[..], b"b", b""]
        );
        let mut gg = g(1);
        gg.colsep = Some(b",".to_vec());
        let got = collect(vec![vals(&["a,b", "c"])], gg);
        assert_eq!(got, vec![vec!["a", "b"], vec!["c"]]);
    }

    #[test]
    fn byte_budget() {
        let mut gg = g(usize::MAX);
        gg.max_bytes = Some(4);
        let got = collect(vec![vals(&["a", "b", "c"])], gg);
        assert_eq!(got, vec![vec!["a", "b"], vec!["c"]]);
    }

    #[test]
    fn pipe_blocks_end_at_record_ends() {
        let src = Source::Reader(Box::new(&b"1\n2\n3\n4\n5\n6\n7\n8\n9\n10\n"[..]));
        let (tx, rx) = async_channel::unbounded();
        assert_eq!(
            produce_blocks(vec![src], b'\n', 6, |_| false, tx).unwrap(),
            4
        );
        let blocks: Vec<Vec<u8>> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|r| r.block.unwrap())
            .collect();
        assert_eq!(
            blocks,
            [&b"1\n2\n3\n"[..], b"4\n5\n6\n", b"7\n8\n9\n", b"10\n"]
        );
    }

    #[test]
    fn nul_separated_bytes() {
        let src = Source::Reader(Box::new(&b"a\nb\0\xff\0"[..]));
        let mut gg = g(1);
        gg.sep = 0;
        let (tx, rx) = async_channel::unbounded();
        produce(vec![src], gg, |_| false, tx).unwrap();
        assert_eq!(rx.try_recv().unwrap().args, [b"a\nb".to_vec()]);
        assert_eq!(rx.try_recv().unwrap().args, [b"\xff".to_vec()]);
    }
}
