//! Where a job's stdout and stderr go while it runs and after.
//!
//! * grouped (the default): held until the job is over, then printed whole,
//!   so lines of different jobs never mix. Up to [`SPILL_AT`] bytes per
//!   stream are held in memory; the rest goes to an unnamed temporary file
//!   (as GNU parallel keeps grouped output in files), so a job printing
//!   gigabytes does not take gigabytes of memory.
//! * `--line-buffer`: whole lines are printed as they arrive; a line is
//!   never split between jobs, but lines of different jobs interleave.
//! * `--ungroup`: bytes are printed as they arrive (fastest; a line can be
//!   split between jobs).
//! * `--results DIR`: each job's streams are written to
//!   `DIR/1/<arg 1>/2/<arg 2>/…/stdout`, `stderr` and `seq` (GNU parallel's
//!   layout, `/` in an argument becoming `\_`) instead of being printed.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use indicatif::ProgressBar;

/// Bytes of one stream held in memory before the rest spills to a file.
pub const SPILL_AT: usize = 1 << 20;

/// How output is delivered (`--line-buffer`, `--ungroup`, `--results`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Whole job output after it ends.
    Group,
    /// Whole lines as they come.
    LineBuffer,
    /// Bytes as they come.
    Ungroup,
    /// Into files under the results directory.
    Results,
}

/// Which of our streams a job stream goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    /// Our stdout.
    Out,
    /// Our stderr.
    Err,
}

/// Output held for later: memory first, then an unnamed temporary file.
#[derive(Debug, Default)]
pub struct Spool {
    mem: Vec<u8>,
    file: Option<File>,
}

impl Spool {
    /// Appends bytes.
    pub fn push(&mut self, data: &[u8]) -> io::Result<()> {
        if let Some(f) = &mut self.file {
            return f.write_all(data);
        }
        if self.mem.len() + data.len() <= SPILL_AT {
            self.mem.extend_from_slice(data);
            return Ok(());
        }
        let mut f = tempfile::tempfile()?;
        f.write_all(&self.mem)?;
        f.write_all(data)?;
        self.mem = Vec::new();
        self.file = Some(f);
        Ok(())
    }

    /// Whether anything was held.
    pub fn is_empty(&self) -> bool {
        self.mem.is_empty() && self.file.is_none()
    }

    /// Whether the spool went to a file.
    #[cfg(test)]
    pub fn spilled(&self) -> bool {
        self.file.is_some()
    }

    /// Writes everything held to `w` through `tagger`.
    pub fn copy_to(&mut self, w: &mut dyn Write, tagger: &mut Tagger) -> io::Result<()> {
        tagger.write(w, &self.mem)?;
        if let Some(f) = &mut self.file {
            f.seek(SeekFrom::Start(0))?;
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                tagger.write(w, &buf[..n])?;
            }
        }
        tagger.end(w)
    }
}

/// Prefixes every line with a tag (`--tag`), across chunk boundaries.
#[derive(Debug)]
pub struct Tagger {
    tag: Option<Vec<u8>>,
    at_line_start: bool,
}

impl Tagger {
    /// A tagger; `None` passes bytes through.
    pub fn new(tag: Option<Vec<u8>>) -> Tagger {
        Tagger {
            tag,
            at_line_start: true,
        }
    }

    /// Writes `data`, tagging each line start.
    pub fn write(&mut self, w: &mut dyn Write, data: &[u8]) -> io::Result<()> {
        let Some(tag) = &self.tag else {
            return w.write_all(data);
        };
        if data.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(data.len() + 64);
        for line in data.split_inclusive(|&b| b == b'\n') {
            if self.at_line_start {
                buf.extend_from_slice(tag);
                buf.push(b'\t');
            }
            buf.extend_from_slice(line);
            self.at_line_start = line.ends_with(b"\n");
        }
        w.write_all(&buf)
    }

    /// Ends a tagged last line that had no newline.
    pub fn end(&mut self, w: &mut dyn Write) -> io::Result<()> {
        if self.tag.is_some() && !self.at_line_start {
            self.at_line_start = true;
            return w.write_all(b"\n");
        }
        Ok(())
    }
}

/// Writes to our stdout or stderr without breaking the progress bar.
pub fn emit(
    pb: Option<&ProgressBar>,
    which: Which,
    f: &mut dyn FnMut(&mut dyn Write) -> io::Result<()>,
) -> io::Result<()> {
    let mut go = || match which {
        Which::Out => {
            let mut o = io::stdout().lock();
            f(&mut o).and_then(|()| o.flush())
        }
        Which::Err => {
            let mut e = io::stderr().lock();
            f(&mut e).and_then(|()| e.flush())
        }
    };
    match pb {
        Some(pb) => pb.suspend(go),
        None => go(),
    }
}

/// One job stream on its way out.
#[derive(Debug)]
pub struct Stream {
    mode: Mode,
    which: Which,
    /// Held output (grouped mode).
    pub spool: Spool,
    partial: Vec<u8>,
    tagger: Tagger,
    file: Option<File>,
    /// Bytes the job wrote to this stream.
    pub bytes: u64,
}

impl Stream {
    /// A stream in `mode`; `file` is its results file.
    pub fn new(mode: Mode, which: Which, tag: Option<Vec<u8>>, file: Option<File>) -> Stream {
        Stream {
            mode,
            which,
            spool: Spool::default(),
            partial: Vec::new(),
            tagger: Tagger::new(tag),
            file,
            bytes: 0,
        }
    }

    /// Takes a chunk the job wrote. An error is ours (a full disk, a closed
    /// stdout), not the job's.
    pub fn push(&mut self, pb: Option<&ProgressBar>, data: &[u8]) -> io::Result<()> {
        self.bytes += data.len() as u64;
        match self.mode {
            Mode::Group => self.spool.push(data),
            Mode::Results => match &mut self.file {
                Some(f) => f.write_all(data),
                None => Ok(()),
            },
            Mode::Ungroup => {
                let t = &mut self.tagger;
                emit(pb, self.which, &mut |w| t.write(w, data))
            }
            Mode::LineBuffer => {
                self.partial.extend_from_slice(data);
                let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') else {
                    return Ok(());
                };
                let lines: Vec<u8> = self.partial.drain(..=end).collect();
                let t = &mut self.tagger;
                emit(pb, self.which, &mut |w| t.write(w, &lines))
            }
        }
    }

    /// The job is over: prints what is still held back (grouped output is
    /// printed with [`Stream::print`] instead, in job order when asked).
    pub fn close(&mut self, pb: Option<&ProgressBar>) -> io::Result<()> {
        match self.mode {
            Mode::LineBuffer => {
                let rest = std::mem::take(&mut self.partial);
                let t = &mut self.tagger;
                emit(pb, self.which, &mut |w| {
                    t.write(w, &rest)?;
                    t.end(w)
                })
            }
            Mode::Ungroup => {
                let t = &mut self.tagger;
                emit(pb, self.which, &mut |w| t.end(w))
            }
            Mode::Results => match &mut self.file {
                Some(f) => f.flush(),
                None => Ok(()),
            },
            Mode::Group => Ok(()),
        }
    }

    /// Prints grouped output whole.
    pub fn print(&mut self, pb: Option<&ProgressBar>) -> io::Result<()> {
        if self.mode != Mode::Group || self.spool.is_empty() {
            return Ok(());
        }
        let (spool, t) = (&mut self.spool, &mut self.tagger);
        emit(pb, self.which, &mut |w| spool.copy_to(w, t))
    }

    /// Adds a message of ours to a job's stderr (shown with its output).
    pub fn note(&mut self, pb: Option<&ProgressBar>, msg: &str) {
        let _ = match self.mode {
            Mode::Group => self.spool.push(msg.as_bytes()),
            _ => emit(pb, Which::Err, &mut |w| w.write_all(msg.as_bytes())),
        };
    }
}

/// The results directory of one job: `DIR/1/<arg1>/2/<arg2>/…`.
pub fn results_dir(root: &Path, args: &[Vec<u8>]) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    let mut p = root.to_path_buf();
    for (i, a) in args.iter().enumerate() {
        p.push((i + 1).to_string());
        let mut esc = Vec::with_capacity(a.len());
        for &b in a {
            match b {
                b'/' => esc.extend_from_slice(b"\\_"),
                b'\\' => esc.extend_from_slice(b"\\\\"),
                _ => esc.push(b),
            }
        }
        if esc.is_empty() {
            esc.push(b'_');
        }
        esc.truncate(250);
        p.push(std::ffi::OsStr::from_bytes(&esc));
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_prefix_every_line_across_chunks() {
        let mut out = Vec::new();
        let mut t = Tagger::new(Some(b"t".to_vec()));
        t.write(&mut out, b"a\nb").unwrap();
        t.write(&mut out, b"c\nd").unwrap();
        t.end(&mut out).unwrap();
        assert_eq!(out, b"t\ta\nt\tbc\nt\td\n");
        let mut out = Vec::new();
        let mut t = Tagger::new(None);
        t.write(&mut out, b"a\nb").unwrap();
        t.end(&mut out).unwrap();
        assert_eq!(out, b"a\nb", "untagged output is passed through as is");
    }

    #[test]
    fn spool_spills_to_a_file_and_reads_back_whole() {
        let mut s = Spool::default();
        let chunk = vec![b'x'; SPILL_AT / 3 + 7];
        for _ in 0..4 {
            s.push(&chunk).unwrap();
        }
        assert!(s.spilled());
        let mut out = Vec::new();
        s.copy_to(&mut out, &mut Tagger::new(None)).unwrap();
        assert_eq!(out.len(), chunk.len() * 4);
    }

    #[test]
    fn results_paths_escape_slashes() {
        let p = results_dir(Path::new("r"), &[b"a".to_vec(), b"b/c".to_vec()]);
        assert_eq!(p, Path::new("r/1/a/2/b\\_c"));
    }
}
