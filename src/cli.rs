//! Command-line interface.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::DEFAULT_CONFIG_PATH;

#[derive(Debug, Parser)]
#[command(
    name = "badgegate",
    version,
    about = "Edge agent for badge terminals: collects clockings, stores them durably, forwards them over MQTT and to the cloud"
)]
pub struct Cli {
    /// Log format: human-readable text, or JSON lines for journald/Loki.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent.
    Run {
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Run a self-contained demonstration on loopback: needs no config, broker or network.
    Demo {
        /// Bound the demo's length in seconds.
        #[arg(long, default_value_t = 30)]
        duration: u64,
    },
    /// Validate a configuration file; prints one line per problem, naming its key.
    CheckConfig {
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// A running agent at a glance: uplink, terminals, sinks, store (asks its local API).
    Status {
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Print the agent's health document as JSON instead.
        #[arg(long)]
        json: bool,
    },
    /// Inspect the durable queue.
    Queue {
        #[command(subcommand)]
        command: QueueCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// Pending clockings per sink, oldest pending age, store size.
    Stats {
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}
