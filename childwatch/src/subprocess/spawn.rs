//! The spawn path: `posix_spawnp` with file actions and attributes.
//!
//! # Why not `std::process::Command`
//!
//! Two candidates were measured: 2,000 spawns of `/bin/true`, each reaped
//! with `waitpid`, the candidates alternating spawn by spawn so that both see
//! the same load (release build; 2-core Linux 6.18 machine shared with other
//! builds, load average 8–60 during the runs; glibc 2.36; `cargo test
//! --release -p childwatch --lib spawn_throughput -- --ignored --nocapture`).
//! Rounds from two runs:
//!
//! | round | `std::process::Command::spawn` (handle dropped, pid reaped by `waitpid`) | this module's `posix_spawnp` |
//! |---|---|---|
//! | plain, run 1 round 1 | 3.196 s (626/s) | 3.336 s (599/s) |
//! | plain, run 1 round 2 | 3.356 s (596/s) | 3.432 s (583/s) |
//! | plain, run 1 round 3 (quietest) | 1.509 s (1,325/s) | 1.513 s (1,322/s) |
//! | plain, run 2 round 1 | 3.733 s (536/s) | 3.632 s (551/s) |
//! | plain, run 2 round 2 | 4.406 s (454/s) | 4.119 s (486/s) |
//! | plain, run 2 round 3 | 3.331 s (600/s) | 3.101 s (645/s) |
//! | new session, runs 1 / 2 (std: `pre_exec(setsid)`; ours: `POSIX_SPAWN_SETSID`) | 4.064 s / 4.722 s | 3.826 s / 4.853 s |
//!
//! **Decision:** the two are the same speed within the noise (±7 %, neither
//! ahead consistently), which is expected since both end in glibc's
//! `posix_spawn`. The direct path is kept for what it guarantees rather than
//! for speed: it never creates a `std::process::Child` (which could reap the
//! pid behind the watcher's back), and it stays on `posix_spawnp` for every
//! option offered, where std must fall back to `fork` + an error pipe for a
//! `pre_exec` (which `start_new_session` needs on stable Rust).
//!
//! Through the whole stack (running loop, `ThreadedChildWatcher`,
//! `Process::wait`), 2,000 × `/bin/true` ran at 726/s (proactor) and 792/s
//! (selector) one at a time, and at 1,198/s and 1,173/s with 64 in flight,
//! at load average ~60 (`cargo test --release -p childwatch --test
//! subprocess throughput -- --ignored --nocapture`); the Threaded watcher's
//! thread per child is part of that cost.
//!
//! glibc's `posix_spawn` is a `CLONE_VM | CLONE_VFORK` clone. The options
//! map to `POSIX_SPAWN_SETSID` (`start_new_session`),
//! `POSIX_SPAWN_SETPGROUP` (`process_group`) and
//! `posix_spawn_file_actions_addchdir_np` (`current_dir`). glibc (2.24+)
//! reports a failed `exec` as the return value of `posix_spawnp`, so a
//! missing program is a `NotFound` error of `spawn()` and a non-executable
//! one `PermissionDenied`, and glibc reaps the failed child itself: no
//! zombie.
//!
//! As std does, the child gets an empty signal mask and `SIGPIPE` back at its
//! default disposition (Rust programs ignore it, and ignored signals survive
//! `exec`).
//!
//! Every descriptor this module creates is `O_CLOEXEC`; the child's ends of
//! the pipes reach it only through `dup2` file actions onto 0, 1 and 2.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

use rustix::pipe::{PipeFlags, pipe_with};

use super::args::{self, invalid};
pub(crate) use super::args::{Spec, StdioKind};
use crate::watcher::Pid;

/// Everything `posix_spawnp` needs, validated and converted to C strings.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub(crate) program: CString,
    pub(crate) argv: Vec<CString>,
    /// `None` passes the parent's environment unchanged.
    pub(crate) envp: Option<Vec<CString>>,
    pub(crate) cwd: Option<CString>,
    pub(crate) stdin: StdioKind,
    pub(crate) stdout: StdioKind,
    pub(crate) stderr: StdioKind,
    pub(crate) new_session: bool,
    pub(crate) process_group: Option<Pid>,
}

/// A started child: its pid and the parent's ends of its pipes.
#[derive(Debug)]
pub(crate) struct Spawned {
    pub(crate) pid: Pid,
    pub(crate) stdin: Option<OwnedFd>,
    pub(crate) stdout: Option<OwnedFd>,
    pub(crate) stderr: Option<OwnedFd>,
}

fn cstring(what: &str, s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| {
        invalid(format!(
            "{what} {s:?} contains a NUL byte, which cannot be passed to a program"
        ))
    })
}

/// Validates a spawn request and converts it for `posix_spawnp`. Every bad
/// input is an `InvalidInput` (a missing `cwd`: `NotFound`) error here,
/// before anything is created.
pub(crate) fn prepare(spec: &Spec<'_>) -> io::Result<Prepared> {
    args::check(spec)?;
    if spec.new_session && spec.process_group.is_some() {
        return Err(invalid(
            "start_new_session and process_group cannot be combined: a new session is \
             already a new process group"
                .into(),
        ));
    }
    if let Some(pg) = spec.process_group {
        if pg < 0 {
            return Err(invalid(format!(
                "invalid process group {pg}: use 0 for a new group led by the child, or an \
                 existing group id"
            )));
        }
    }
    for (k, _) in spec.env {
        if k.is_empty() || k.as_bytes().contains(&b'=') {
            return Err(invalid(format!(
                "invalid environment variable name {k:?}: it must be non-empty and without '='"
            )));
        }
    }
    let cwd = spec
        .cwd
        .map(|dir| cstring("current_dir", dir.as_os_str()))
        .transpose()?;
    let envp = if spec.env_clear || !spec.env.is_empty() {
        let mut vars: Vec<(OsString, OsString)> = if spec.env_clear {
            Vec::new()
        } else {
            std::env::vars_os().collect()
        };
        for (k, v) in spec.env {
            vars.retain(|(name, _)| name != k);
            if let Some(v) = v {
                vars.push((k.clone(), v.clone()));
            }
        }
        let mut envp = Vec::with_capacity(vars.len());
        for (k, v) in vars {
            let mut kv = k.into_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            envp.push(cstring("environment variable", OsStr::from_bytes(&kv))?);
        }
        Some(envp)
    } else {
        None
    };
    // A bare name is looked up in the child's PATH when the environment
    // changes PATH (as std does); otherwise posix_spawnp searches ours.
    let mut program_path = spec.program.to_os_string();
    if !spec.program.as_bytes().contains(&b'/') {
        if let Some((_, Some(path))) = spec.env.iter().rev().find(|(k, _)| k == "PATH") {
            if let Some(found) = search_path(spec.program, path) {
                program_path = found.into_os_string();
            }
        }
    }
    let mut argv = Vec::with_capacity(spec.args.len() + 1);
    argv.push(cstring("program name", spec.program)?);
    for a in spec.args {
        argv.push(cstring("argument", a)?);
    }
    Ok(Prepared {
        program: cstring("program name", &program_path)?,
        argv,
        envp,
        cwd,
        stdin: spec.stdin,
        stdout: spec.stdout,
        stderr: spec.stderr,
        new_session: spec.new_session,
        process_group: spec.process_group,
    })
}

fn search_path(program: &OsStr, path: &OsStr) -> Option<PathBuf> {
    std::env::split_paths(path)
        .map(|dir| dir.join(program))
        .find(|p| {
            CString::new(p.as_os_str().as_bytes())
                // SAFETY: `c` is a valid NUL-terminated string.
                .map(|c| unsafe { libc::access(c.as_ptr(), libc::X_OK) } == 0)
                .unwrap_or(false)
        })
}

/// A pipe whose ends are both CLOEXEC and above the standard descriptors
/// (so a `dup2` onto 0, 1 or 2 never clobbers another pipe end).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = pipe_with(PipeFlags::CLOEXEC)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot create a pipe: {e}")))?;
    Ok((lift(r)?, lift(w)?))
}

fn lift(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    Ok(rustix::io::fcntl_dupfd_cloexec(&fd, 3)?)
}

/// RAII for `posix_spawn_file_actions_t` (boxed, so it never moves);
/// exists only once initialised.
struct FileActions(Box<MaybeUninit<libc::posix_spawn_file_actions_t>>);

impl FileActions {
    fn new() -> io::Result<FileActions> {
        let mut raw = Box::new(MaybeUninit::uninit());
        // SAFETY: initialises the boxed storage; on failure it is freed
        // without being destroyed.
        check(unsafe { libc::posix_spawn_file_actions_init(raw.as_mut_ptr()) })?;
        Ok(FileActions(raw))
    }
    fn ptr(&mut self) -> *mut libc::posix_spawn_file_actions_t {
        self.0.as_mut_ptr()
    }
    fn dup2(&mut self, from: i32, to: i32) -> io::Result<()> {
        // SAFETY: initialised in `new`.
        check(unsafe { libc::posix_spawn_file_actions_adddup2(self.ptr(), from, to) })
    }
    fn open(&mut self, fd: i32, path: &CStr, flags: i32) -> io::Result<()> {
        // SAFETY: initialised in `new`; glibc copies the path.
        check(unsafe {
            libc::posix_spawn_file_actions_addopen(self.ptr(), fd, path.as_ptr(), flags, 0)
        })
    }
    fn chdir(&mut self, dir: &CStr) -> io::Result<()> {
        // SAFETY: initialised in `new`; glibc copies the path.
        check(unsafe { libc::posix_spawn_file_actions_addchdir_np(self.ptr(), dir.as_ptr()) })
    }
}

impl Drop for FileActions {
    fn drop(&mut self) {
        // SAFETY: initialised in `new` (the only constructor).
        unsafe { libc::posix_spawn_file_actions_destroy(self.ptr()) };
    }
}

/// RAII for `posix_spawnattr_t` (boxed, so it never moves); exists only
/// once initialised.
struct Attr(Box<MaybeUninit<libc::posix_spawnattr_t>>);

impl Attr {
    fn new() -> io::Result<Attr> {
        let mut raw = Box::new(MaybeUninit::uninit());
        // SAFETY: initialises the boxed storage; on failure it is freed
        // without being destroyed.
        check(unsafe { libc::posix_spawnattr_init(raw.as_mut_ptr()) })?;
        Ok(Attr(raw))
    }
    fn ptr(&mut self) -> *mut libc::posix_spawnattr_t {
        self.0.as_mut_ptr()
    }
}

impl Drop for Attr {
    fn drop(&mut self) {
        // SAFETY: initialised in `new` (the only constructor).
        unsafe { libc::posix_spawnattr_destroy(self.ptr()) };
    }
}

fn check(rc: i32) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// Sets the attributes every child gets: empty signal mask, default SIGPIPE,
/// and the session / process-group requests.
fn set_attributes(attr: &mut Attr, p: &Prepared) -> io::Result<()> {
    let mut flags = libc::POSIX_SPAWN_SETSIGMASK | libc::POSIX_SPAWN_SETSIGDEF;
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t and `attr` is initialised.
    unsafe {
        libc::sigemptyset(&mut set);
        check(libc::posix_spawnattr_setsigmask(attr.ptr(), &set))?;
        libc::sigaddset(&mut set, libc::SIGPIPE);
        check(libc::posix_spawnattr_setsigdefault(attr.ptr(), &set))?;
    }
    if p.new_session {
        flags |= libc::POSIX_SPAWN_SETSID as i32;
    }
    if let Some(pg) = p.process_group {
        flags |= libc::POSIX_SPAWN_SETPGROUP;
        // SAFETY: `attr` is initialised.
        check(unsafe { libc::posix_spawnattr_setpgroup(attr.ptr(), pg) })?;
    }
    // SAFETY: `attr` is initialised; the flags are valid POSIX_SPAWN_* bits.
    check(unsafe { libc::posix_spawnattr_setflags(attr.ptr(), flags as libc::c_short) })
}

fn null_ptrs(v: &[CString]) -> Vec<*mut libc::c_char> {
    v.iter()
        .map(|s| s.as_ptr() as *mut libc::c_char)
        .chain(std::iter::once(std::ptr::null_mut()))
        .collect()
}

// The C library's environment, passed unchanged when the command does not
// touch the environment (std's spawn does the same).
unsafe extern "C" {
    static environ: *const *mut libc::c_char;
}

/// Starts the child. On error nothing is left behind: no child (glibc reaps
/// a child whose `exec` failed), no descriptor.
pub(crate) fn spawn(p: &Prepared) -> io::Result<Spawned> {
    let mut fa = FileActions::new()?;
    let mut attr = Attr::new()?;
    set_attributes(&mut attr, p)?;
    let mut out = Spawned {
        pid: 0,
        stdin: None,
        stdout: None,
        stderr: None,
    };
    // The child's ends; closed in the parent when this function returns.
    let mut child_ends: Vec<OwnedFd> = Vec::new();
    let null = c"/dev/null";
    let streams = [
        (0, p.stdin, libc::O_RDONLY),
        (1, p.stdout, libc::O_WRONLY),
        (2, p.stderr, libc::O_WRONLY),
    ];
    for (fd, kind, flags) in streams {
        match kind {
            StdioKind::Inherit => {}
            StdioKind::Null => fa.open(fd, null, flags)?,
            StdioKind::Stdout => fa.dup2(1, fd)?,
            StdioKind::Piped => {
                let (r, w) = pipe()?;
                let (child, parent) = if fd == 0 { (r, w) } else { (w, r) };
                fa.dup2(child.as_raw_fd(), fd)?;
                child_ends.push(child);
                match fd {
                    0 => out.stdin = Some(parent),
                    1 => out.stdout = Some(parent),
                    _ => out.stderr = Some(parent),
                }
            }
        }
    }
    if let Some(dir) = &p.cwd {
        fa.chdir(dir)?;
    }
    let argv = null_ptrs(&p.argv);
    let envp_store;
    let envp: *const *mut libc::c_char = match &p.envp {
        Some(vars) => {
            envp_store = null_ptrs(vars);
            envp_store.as_ptr()
        }
        // SAFETY: reading the C `environ` pointer; std's own spawn does the
        // same. glibc copies what it needs before this call returns.
        None => unsafe { environ },
    };
    let mut pid: libc::pid_t = 0;
    // SAFETY: every pointer is valid for the call: the program and argv
    // strings live in `p`, argv/envp are NULL-terminated arrays alive here,
    // and the file actions and attributes are initialised.
    let rc = unsafe {
        libc::posix_spawnp(
            &mut pid,
            p.program.as_ptr(),
            fa.ptr(),
            attr.ptr(),
            argv.as_ptr(),
            envp,
        )
    };
    drop(child_ends);
    if rc != 0 {
        return Err(spawn_error(rc, p));
    }
    out.pid = pid;
    Ok(out)
}

fn spawn_error(rc: i32, p: &Prepared) -> io::Error {
    let os = io::Error::from_raw_os_error(rc);
    let prog = p.program.to_string_lossy();
    let msg = match rc {
        libc::ENOENT if p.cwd.is_some() => format!(
            "cannot run {prog:?}: {os} (no such program, or it vanished from current_dir \
             {:?}); check the name, PATH and current_dir",
            p.cwd
                .as_deref()
                .map(CStr::to_string_lossy)
                .unwrap_or_default()
        ),
        libc::ENOENT => format!("program not found: {prog:?} ({os}); check the name and PATH"),
        libc::EACCES => format!(
            "permission denied running {prog:?} ({os}); is it an executable file (chmod +x)?"
        ),
        libc::ENOEXEC => format!("{prog:?} is not a valid executable ({os})"),
        _ => format!("cannot spawn {prog:?}: {os}"),
    };
    io::Error::new(os.kind(), msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec<'a>(program: &'a OsStr, args: &'a [OsString]) -> Spec<'a> {
        Spec {
            program,
            args,
            env_clear: false,
            env: &[],
            cwd: None,
            stdin: StdioKind::Inherit,
            stdout: StdioKind::Null,
            stderr: StdioKind::Inherit,
            new_session: false,
            process_group: None,
        }
    }

    fn reap(pid: Pid) -> i32 {
        crate::watcher::status::from_raw_wait_status({
            let mut st = 0;
            // SAFETY: waiting for our own child.
            unsafe { libc::waitpid(pid, &mut st, 0) };
            st
        })
        .unwrap_or(-1000)
    }

    #[test]
    fn spawn_and_reap_directly() {
        let args = [OsString::from("-c"), OsString::from("exit 3")];
        let p = prepare(&spec(OsStr::new("sh"), &args)).unwrap();
        let s = spawn(&p).unwrap();
        assert_eq!(reap(s.pid), 3);
    }

    #[test]
    fn exec_failures_are_spawn_errors() {
        let p = prepare(&spec(OsStr::new("no-such-program-xyz"), &[])).unwrap();
        assert_eq!(spawn(&p).unwrap_err().kind(), io::ErrorKind::NotFound);
        let file = std::env::temp_dir().join(format!("cw-noexec-{}", std::process::id()));
        std::fs::write(&file, "#!/bin/sh\n").unwrap();
        let p = prepare(&spec(file.as_os_str(), &[])).unwrap();
        let err = spawn(&p).unwrap_err();
        std::fs::remove_file(&file).unwrap();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{err}");
    }

    /// Spawn + reap throughput of the two candidates (see the module docs).
    /// The candidates alternate spawn by spawn, so that both see the same
    /// machine load even on a busy machine:
    /// `cargo test --release -p childwatch --lib spawn_throughput -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn spawn_throughput() {
        use std::time::{Duration, Instant};
        const N: usize = 2000;
        const ROUNDS: usize = 3;
        let args: [OsString; 0] = [];
        let p = prepare(&spec(OsStr::new("/bin/true"), &args)).unwrap();
        for round in 0..ROUNDS {
            let (mut std_t, mut our_t) = (Duration::ZERO, Duration::ZERO);
            for i in 0..2 * N {
                let t = Instant::now();
                if (i + round) % 2 == 0 {
                    let child = std::process::Command::new("/bin/true")
                        .stdout(std::process::Stdio::null())
                        .spawn()
                        .unwrap();
                    let pid = child.id() as Pid;
                    // Dropping a std Child neither waits nor kills: the pid is ours.
                    drop(child);
                    assert_eq!(reap(pid), 0);
                    std_t += t.elapsed();
                } else {
                    let s = spawn(&p).unwrap();
                    assert_eq!(reap(s.pid), 0);
                    our_t += t.elapsed();
                }
            }
            println!(
                "round {round}: {N} x spawn+waitpid of /bin/true: std::process::Command \
                 {:.3} s ({:.0}/s), posix_spawnp path {:.3} s ({:.0}/s)",
                std_t.as_secs_f64(),
                N as f64 / std_t.as_secs_f64(),
                our_t.as_secs_f64(),
                N as f64 / our_t.as_secs_f64()
            );
        }
        // start_new_session: std needs a pre_exec (fork + exec), we keep
        // posix_spawnp with POSIX_SPAWN_SETSID.
        let mut sess = spec(OsStr::new("/bin/true"), &args);
        sess.new_session = true;
        let p = prepare(&sess).unwrap();
        let (mut std_t, mut our_t) = (Duration::ZERO, Duration::ZERO);
        for i in 0..2 * N {
            let t = Instant::now();
            if i % 2 == 0 {
                use std::os::unix::process::CommandExt;
                let mut cmd = std::process::Command::new("/bin/true");
                cmd.stdout(std::process::Stdio::null());
                // SAFETY: setsid is async-signal-safe.
                unsafe {
                    cmd.pre_exec(|| {
                        libc::setsid();
                        Ok(())
                    })
                };
                let child = cmd.spawn().unwrap();
                let pid = child.id() as Pid;
                drop(child);
                assert_eq!(reap(pid), 0);
                std_t += t.elapsed();
            } else {
                let s = spawn(&p).unwrap();
                assert_eq!(reap(s.pid), 0);
                our_t += t.elapsed();
            }
        }
        println!(
            "new session: {N} x spawn+waitpid of /bin/true: std::process::Command + pre_exec(setsid) \
             {:.3} s ({:.0}/s), posix_spawnp path with POSIX_SPAWN_SETSID {:.3} s ({:.0}/s)",
            std_t.as_secs_f64(),
            N as f64 / std_t.as_secs_f64(),
            our_t.as_secs_f64(),
            N as f64 / our_t.as_secs_f64()
        );
    }
}
