//! `badgegate check-config`: one line per problem on stdout, each naming its key.

use std::path::Path;
use std::process::ExitCode;

use super::out::outln;
use super::{read_config, EXIT_USAGE};

pub fn check_config(path: &Path) -> ExitCode {
    match read_config(path) {
        Ok(c) => {
            outln!(
                "{}: OK (site {}, {} terminal(s), sinks: {})",
                path.display(),
                c.agent.site,
                c.terminals.len(),
                c.sink_names().join(", ")
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            for p in &e.0 {
                outln!("{p}");
            }
            eprintln!("{}: {} problem(s)", path.display(), e.0.len());
            ExitCode::from(EXIT_USAGE)
        }
    }
}
