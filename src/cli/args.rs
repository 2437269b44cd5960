//! The command line as clap definitions: plain data, validated by the commands.

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
    /// Who is inside: persons per zone, or one zone's muster list (person, since, last
    /// terminal). Asks the running agent, or reads the store when it is stopped.
    Zones {
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Show this zone's muster list instead of the counts.
        zone: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Inspect the durable queue.
    Queue {
        #[command(subcommand)]
        command: QueueCommand,
    },
}

/// Which stored clockings to show.
#[derive(Debug, clap::Args)]
pub struct QueueSelection {
    #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// Only clockings still pending at (or set aside by) this sink: mqtt or protime.
    #[arg(long)]
    pub sink: Option<String>,
    /// Only this terminal's clockings.
    #[arg(long)]
    pub terminal: Option<String>,
    /// Only clockings that occurred at or after this time (RFC 3339, e.g. 2026-11-22T06:00:00+01:00).
    #[arg(long)]
    pub since: Option<String>,
    /// Only clockings that occurred before this time (RFC 3339).
    #[arg(long)]
    pub until: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// Stored clockings (not yet delivered everywhere), oldest first.
    List {
        #[command(flatten)]
        selection: QueueSelection,
        /// Show at most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Every stored clocking as JSON lines (for audits), to stdout or a file.
    Export {
        #[command(flatten)]
        selection: QueueSelection,
        /// Write here instead of stdout.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Put a sink's dead letters (clockings its destination rejected) back in its queue, after
    /// fixing what made them fail.
    ReplayDeadLetters {
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        #[arg(long, default_value = "protime")]
        sink: String,
    },
    /// Release the clockings a sink removed from the config still holds (shown as "orphaned"):
    /// they are never delivered to it. Asks to type the sink's name unless --yes; needs the
    /// agent stopped.
    DropSink {
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// The sink to drop: mqtt or protime (must not be in the config).
        sink: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Pending clockings per sink, oldest pending age, store size.
    Stats {
        #[arg(long, short, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}
