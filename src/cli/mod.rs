//! The command line: its clap definitions ([`Cli`]) and one module per command group. `main.rs`
//! parses and dispatches; every command here returns the contract's exit code (0 ok, 64 usage or
//! config error, 74 I/O or store error, 1 anything else), having said what went wrong on stderr.

mod agent_api;
mod args;
pub mod check_config;
pub mod demo;
mod out;
pub mod queue;
pub mod run;
pub mod status;
pub mod zones;

use std::fmt::Display;
use std::path::Path;
use std::process::ExitCode;

pub use args::{Cli, Command, LogFormat, QueueCommand, QueueSelection};

use crate::config::{Config, ConfigError};
use crate::store::SinkId;

pub const EXIT_FAILURE: u8 = 1;
pub const EXIT_USAGE: u8 = 64;
pub const EXIT_IO: u8 = 74;

/// Read and validate a configuration file: the one place the command line loads one.
fn read_config(path: &Path) -> Result<Config, ConfigError> {
    crate::app::load_config(path)
}

/// The configuration, or exit 64 after printing one line per problem on stderr.
fn load(path: &Path) -> Result<Config, ExitCode> {
    read_config(path).map_err(|e| {
        for p in &e.0 {
            eprintln!("{p}");
        }
        ExitCode::from(EXIT_USAGE)
    })
}

/// Say `badgegate: {message}` on stderr and leave with `code`.
fn fail(code: u8, message: impl Display) -> ExitCode {
    eprintln!("badgegate: {message}");
    ExitCode::from(code)
}

/// The configured sinks the store keeps queues for.
fn sinks(config: &Config) -> Vec<SinkId> {
    config
        .sink_names()
        .into_iter()
        .filter_map(SinkId::from_name)
        .collect()
}

/// Logs go to stderr (journald picks them up). `RUST_LOG` overrides the configured level.
fn init_tracing(default_level: &str, format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        // Colours only on a terminal: journald shows escape codes literally.
        LogFormat::Human => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
}

/// Run `f` to completion on a multi-threaded runtime (the agent, the demo).
fn with_runtime<F, Fut>(f: F) -> ExitCode
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ExitCode>,
{
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(f()),
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
