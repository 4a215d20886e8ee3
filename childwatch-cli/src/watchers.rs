//! Choosing a child watcher and a loop kind by name, probing what this
//! machine supports, and the `childwatch watchers` command.
//!
//! `CHILDWATCH_DISABLE=pidfd,uring,proactor` makes the CLI treat those
//! kernel features as missing (to try the fallbacks on a kernel that has
//! everything).

use std::fmt;
use std::sync::Arc;

use anyhow::{Result, bail};
use childwatch::{ChildWatcher, EventLoop, LoopKind};
use clap::ValueEnum;

/// A watcher the user can ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WatcherName {
    /// A thread per child blocked in waitpid(pid).
    Threaded,
    /// SIGCHLD on the attached loop, then waitpid(pid, WNOHANG) for each child.
    Safe,
    /// SIGCHLD on the attached loop, then waitpid(-1, WNOHANG) (reaps every child).
    Fast,
    /// Process-wide SIGCHLD, callbacks delivered to the loop that spawned.
    #[value(name = "multiloop")]
    #[serde(rename = "multiloop")]
    MultiLoop,
    /// A pidfd per child, polled by the loop.
    Pidfd,
    /// io_uring POLL_ADD on pidfds within a budget, WAITID beyond it.
    Uring,
    /// What the default policy picks here.
    Auto,
}

impl WatcherName {
    /// Every concrete watcher, in the order of the design's table.
    pub const ALL: [WatcherName; 6] = [
        WatcherName::Threaded,
        WatcherName::Safe,
        WatcherName::Fast,
        WatcherName::MultiLoop,
        WatcherName::Pidfd,
        WatcherName::Uring,
    ];

    /// The name used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            WatcherName::Threaded => "threaded",
            WatcherName::Safe => "safe",
            WatcherName::Fast => "fast",
            WatcherName::MultiLoop => "multiloop",
            WatcherName::Pidfd => "pidfd",
            WatcherName::Uring => "uring",
            WatcherName::Auto => "auto",
        }
    }
}

impl WatcherName {
    /// How the watcher learns of an exit, and what that costs (one line).
    pub fn describe(self) -> &'static str {
        match self {
            WatcherName::Threaded => "a thread per child in waitpid(pid); 1 thread/child",
            WatcherName::Safe => {
                "SIGCHLD on the attached loop, waitpid(pid) for each child; O(n)/exit"
            }
            WatcherName::Fast => {
                "SIGCHLD on the attached loop, waitpid(-1); O(1), reaps every child"
            }
            WatcherName::MultiLoop => "process-wide SIGCHLD, any loop; O(n)/exit",
            WatcherName::Pidfd => "a pidfd per child polled by the loop; O(1), 1 fd/child",
            WatcherName::Uring => {
                "io_uring POLL_ADD on pidfds within a budget, WAITID beyond; O(1)"
            }
            WatcherName::Auto => "what the default policy picks",
        }
    }
}

impl fmt::Display for WatcherName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A loop kind the user can ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LoopName {
    /// io_uring.
    Proactor,
    /// epoll.
    Selector,
    /// The proactor where io_uring works, else the selector.
    Auto,
}

fn disabled(feature: &str) -> bool {
    std::env::var("CHILDWATCH_DISABLE")
        .map(|v| v.split(',').any(|f| f.trim() == feature))
        .unwrap_or(false)
}

/// Whether io_uring loops work here.
pub fn proactor_ok() -> bool {
    !disabled("proactor") && childwatch::proactor_supported()
}

/// Whether `pidfd_open` works here.
pub fn pidfd_ok() -> bool {
    !disabled("pidfd") && childwatch::PidfdChildWatcher::is_supported()
}

/// Whether the io_uring watcher (WAITID, Linux 6.7+) works here.
pub fn uring_ok() -> bool {
    !disabled("uring") && childwatch::UringChildWatcher::is_supported()
}

/// What this build and kernel say about one watcher: `Ok` if usable, else why not.
pub fn watcher_support(name: WatcherName) -> std::result::Result<(), String> {
    match name {
        WatcherName::Threaded
        | WatcherName::Safe
        | WatcherName::Fast
        | WatcherName::MultiLoop
        | WatcherName::Auto => Ok(()),
        WatcherName::Pidfd => {
            if pidfd_ok() {
                Ok(())
            } else {
                Err("this kernel lacks pidfd_open (Linux 5.3+)".into())
            }
        }
        WatcherName::Uring => {
            if uring_ok() {
                Ok(())
            } else {
                Err("this kernel lacks io_uring WAITID (Linux 6.7+)".into())
            }
        }
    }
}

/// The watcher the default policy picks on this machine (Uring, else Pidfd,
/// else Threaded).
pub fn default_pick() -> WatcherName {
    [WatcherName::Uring, WatcherName::Pidfd]
        .into_iter()
        .find(|w| watcher_support(*w).is_ok())
        .unwrap_or(WatcherName::Threaded)
}

/// Resolves `auto`.
pub fn resolve(name: WatcherName) -> WatcherName {
    if name == WatcherName::Auto {
        default_pick()
    } else {
        name
    }
}

/// Builds the named watcher, or a one-line reason why it cannot be used here.
pub fn make_watcher(name: WatcherName) -> Result<Arc<dyn ChildWatcher>> {
    let name = resolve(name);
    if let Err(why) = watcher_support(name) {
        bail!("the {name} watcher cannot be used: {why}; try --watcher threaded");
    }
    let made: std::io::Result<Arc<dyn ChildWatcher>> = match name {
        WatcherName::Threaded | WatcherName::Auto => {
            childwatch::ThreadedChildWatcher::new().map(|w| Arc::new(w) as _)
        }
        WatcherName::Safe => childwatch::SafeChildWatcher::new().map(|w| Arc::new(w) as _),
        WatcherName::Fast => childwatch::FastChildWatcher::new().map(|w| Arc::new(w) as _),
        WatcherName::MultiLoop => {
            childwatch::MultiLoopChildWatcher::new().map(|w| Arc::new(w) as _)
        }
        WatcherName::Pidfd => childwatch::PidfdChildWatcher::new().map(|w| Arc::new(w) as _),
        WatcherName::Uring => childwatch::UringChildWatcher::new().map(|w| Arc::new(w) as _),
    };
    made.map_err(|e| anyhow::anyhow!("cannot create the {name} watcher: {e}"))
}

/// Picks the loop kind, or says why it cannot be had.
pub fn loop_kind(name: LoopName) -> Result<LoopKind> {
    match name {
        LoopName::Selector => Ok(LoopKind::Selector),
        LoopName::Proactor if proactor_ok() => Ok(LoopKind::Proactor),
        LoopName::Proactor => {
            bail!(
                "the proactor loop needs io_uring, which this kernel lacks or forbids; try --loop selector"
            )
        }
        LoopName::Auto if proactor_ok() => Ok(LoopKind::Proactor),
        LoopName::Auto => Ok(LoopKind::Selector),
    }
}

/// A new loop with `watcher` installed as the process's child watcher (and
/// attached to the loop where the watcher needs that).
pub fn setup(kind: LoopKind, name: WatcherName) -> Result<(EventLoop, Arc<dyn ChildWatcher>)> {
    let watcher = make_watcher(name)?;
    let lp = EventLoop::new(kind)
        .map_err(|e| anyhow::anyhow!("cannot create the {kind} event loop: {e}"))?;
    childwatch::set_child_watcher(Some(Arc::clone(&watcher)));
    watcher.attach_loop(Some(&lp));
    Ok((lp, watcher))
}

/// Closes the loop and drops the watcher again.
pub fn teardown(lp: &EventLoop, watcher: &Arc<dyn ChildWatcher>) {
    watcher.attach_loop(None);
    childwatch::set_child_watcher(None);
    watcher.close();
    let _ = lp.close();
}

/// `childwatch watchers`: what this machine supports.
pub fn command() -> Result<()> {
    let pick = default_pick();
    println!("loop kinds:");
    println!(
        "  {:<10} {}",
        "proactor",
        if proactor_ok() {
            "supported (io_uring)"
        } else {
            "unsupported: io_uring is missing or forbidden"
        }
    );
    println!("  {:<10} supported (epoll)", "selector");
    println!(
        "  default policy loop: {}",
        if proactor_ok() {
            "proactor"
        } else {
            "selector"
        }
    );
    println!("watchers:");
    for w in WatcherName::ALL {
        let status = match watcher_support(w) {
            Ok(()) => "supported".to_string(),
            Err(why) => format!("unavailable: {why}"),
        };
        let mark = if w == pick {
            "  <- default policy pick"
        } else {
            ""
        };
        println!("  {:<10} {status}{mark}", w.as_str());
        println!("  {:<10}   {}", "", w.describe());
    }
    Ok(())
}
