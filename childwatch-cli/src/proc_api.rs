//! The slice of the library's subprocess API the CLI uses, in one place:
//! `Command`, `Stdio`, `Process` (re-exported from `childwatch`).

pub use childwatch::{Command, Process, Stdio};
