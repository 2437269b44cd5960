//! The `badgegate` binary: parse the command line, run the command, exit with its code. The
//! commands live in `badgegate::cli`.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

use badgegate::cli::{self, Cli, Command, QueueCommand, EXIT_USAGE};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version come this way too, on stdout, and exit 0.
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let format = cli.log_format;
    match cli.command {
        Command::Run { config } => cli::run::run(&config, format),
        Command::Demo { duration } => cli::demo::demo(duration, format),
        Command::CheckConfig { config } => cli::check_config::check_config(&config),
        Command::Status { config, json } => cli::status::status(&config, json),
        Command::Zones { config, zone, json } => cli::zones::zones(&config, zone.as_deref(), json),
        Command::Queue { command } => match command {
            QueueCommand::Stats { config, json } => cli::queue::stats(&config, json),
            QueueCommand::List {
                selection,
                limit,
                json,
            } => cli::queue::list(&selection, limit, json),
            QueueCommand::Export { selection, output } => {
                cli::queue::export(&selection, output.as_deref())
            }
            QueueCommand::ReplayDeadLetters { config, sink } => {
                cli::queue::replay_dead_letters(&config, &sink)
            }
            QueueCommand::DropSink { config, sink, yes } => {
                cli::queue::drop_sink(&config, &sink, yes)
            }
        },
    }
}
