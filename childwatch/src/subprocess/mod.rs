//! Subprocesses: asyncio's `create_subprocess_exec` / `create_subprocess_shell`
//! and `Process`.
//!
//! A [`Command`] is a builder; [`Command::spawn`] starts the child on the
//! **running** loop and hands its pid to the policy's child watcher (or the
//! one given with [`Command::watcher`]), inside the watcher's
//! `enter()`/`exit()` (asyncio's `with watcher:`). The watcher reaps the
//! child and calls back with its return code; the [`Process`] records it in
//! a thread-safe exit slot that any number of [`Process::wait`] futures
//! watch. Nothing else ever reaps the child: the spawn path never creates a
//! `std::process::Child`.
//!
//! ```
//! use childwatch::{Stdio, create_subprocess_exec, new_event_loop};
//!
//! # #[cfg(unix)] {
//! let lp = new_event_loop()?;
//! let (out, rc) = lp.run_until_complete(async {
//!     let mut p = create_subprocess_exec("echo", ["hello"])
//!         .stdout(Stdio::piped())
//!         .spawn()?;
//!     let (out, _err) = p.communicate(None).await?;
//!     Ok::<_, std::io::Error>((out, p.returncode()))
//! })??;
//! assert_eq!(out, b"hello\n");
//! assert_eq!(rc, Some(0));
//! lp.close()?;
//! # }
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! Spawning uses `posix_spawnp` directly rather than `std::process::Command`;
//! the measurements behind that choice are in the `spawn` module's source
//! docs (`src/subprocess/spawn.rs`).
//!
//! # Signals never reach a recycled pid
//!
//! The spawn makes one [`ChildHandle`](crate::ChildHandle) for the child and
//! registers it with the watcher ([`ChildWatcher::add_child`](crate::ChildWatcher::add_child)). The watchers
//! of this crate reap the child only through that handle's gate, recording
//! the status in the same step, and [`Process::send_signal`] decides under
//! the same gate: while it holds it the child cannot be reaped, so its pid
//! cannot be recycled, and after the reap the signal is a no-op. This holds
//! with or without a pidfd; the child has at most one, opened by a watcher
//! that polls it (Pidfd, Uring within its budget) and shared with the
//! `Process`. With a watcher written elsewhere (which reaps on its own), the
//! signal is sent only while the exit slot says the child has not been
//! reported, which leaves the window between that watcher's reap and its
//! callback.
//!
//! # Waiting never depends on the pipes
//!
//! [`Process::wait`] resolves as soon as the watcher reports the exit. It
//! does not wait for pipes to reach end-of-file, so a grandchild that keeps
//! stdout open cannot make it hang (CPython gh-119710);
//! [`Process::communicate`], which must read to end-of-file, can.
//!
//! # Windows
//!
//! The same API on Windows, on the completion-port proactor loop (asyncio's
//! `WindowsProactorEventLoopPolicy`): `spawn_windows.rs` starts the child
//! with `std::process::Command` (there is no reaping on Windows, so its
//! `Child` cannot steal a status; we keep it for the process handle, which
//! pins the pid and is what `terminate`/`kill` use), `pipes_windows.rs`
//! gives overlapped named pipes read and written through the port, and the
//! `WindowsChildWatcher` reports the exit code. `create_subprocess_shell`
//! runs `cmd.exe /c "cmd"`; `terminate`, `kill` and `send_signal(SIGTERM or
//! SIGKILL)` call `TerminateProcess(h, 1)`, so the returncode is 1.

mod args;
mod child_io;
mod command;
pub(crate) mod exit;
#[cfg(unix)]
mod pipes;
#[cfg(windows)]
#[path = "pipes_windows.rs"]
mod pipes;
mod process;
#[cfg(unix)]
mod spawn;
#[cfg(windows)]
#[path = "spawn_windows.rs"]
mod spawn;
mod stream;
mod transport;

pub use child_io::{ChildStderr, ChildStdin, ChildStdout};
pub use command::{Command, Stdio, create_subprocess_exec, create_subprocess_shell};
pub use process::Process;
pub use transport::{PipeTransport, SubprocessProtocol, SubprocessTransport};
