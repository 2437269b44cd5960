//! Standard output for the commands. `println!` panics when stdout fails, and a reader that
//! stops early closes the pipe: `badgegate status | head -1` died with "failed printing to
//! stdout: Broken pipe" (exit 134, as `panic = "abort"`). Commands print through [`outln!`]
//! instead, which leaves quietly once the reader is gone.
//!
//! The exit code then is 0, as ripgrep does: the reader took what it wanted, nothing failed.
//! (`ls` and `git` die of SIGPIPE instead, 141 in the shell; that only shows under
//! `set -o pipefail`, where it turns `badgegate status | head -1` into a failed script.)
//! Any other write error (a full disk under `> file`) is an I/O error: said on stderr, exit 74.

use std::fmt::Arguments;
use std::io::{self, Write};

/// `println!` for the commands: one line on stdout; a closed pipe ends the process quietly.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::out::line(format_args!($($arg)*))
    };
}
pub(crate) use outln;

/// Write `args` and a newline to stdout, or leave the process (see the module comment). Exiting
/// here skips destructors; the commands that print only read the store, or have committed.
pub fn line(args: Arguments) {
    let mut out = io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.write_all(b"\n")) {
        drop(out);
        std::process::exit(i32::from(exit_code(&e)));
    }
}

/// The reader closed the pipe: stop writing, and it is not a failure.
pub fn reader_gone(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::BrokenPipe
}

fn exit_code(e: &io::Error) -> u8 {
    if reader_gone(e) {
        return 0;
    }
    eprintln!("badgegate: cannot write to stdout: {e}");
    super::EXIT_IO
}
