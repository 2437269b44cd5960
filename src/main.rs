use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use badgegate::app::{Agent, StartError};
use badgegate::cli::{Cli, Command, QueueCommand};
use badgegate::config::Config;
use badgegate::store::{self, QueueStats, SinkId, StoreError};

/// Exit codes of the contract (sysexits).
const EXIT_FAILURE: u8 = 1;
const EXIT_USAGE: u8 = 64;
const EXIT_IO: u8 = 74;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match cli.command {
        Command::Run { config } => run(&config),
        Command::Demo { duration } => {
            init_tracing("warn");
            with_runtime(|| async move {
                match badgegate::demo::run(Duration::from_secs(duration)).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("demo failed: {e:#}");
                        ExitCode::from(EXIT_FAILURE)
                    }
                }
            })
        }
        Command::CheckConfig { config } => check_config(&config),
        Command::Queue {
            command: QueueCommand::Stats { config, json },
        } => queue_stats(&config, json),
    }
}

fn load(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        for p in &e.0 {
            eprintln!("{p}");
        }
        ExitCode::from(EXIT_USAGE)
    })
}

fn init_tracing(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

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

fn check_config(path: &Path) -> ExitCode {
    match Config::load(path) {
        Ok(c) => {
            println!(
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
                println!("{p}");
            }
            eprintln!("{}: {} problem(s)", path.display(), e.0.len());
            ExitCode::from(EXIT_USAGE)
        }
    }
}

fn run(path: &Path) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    init_tracing(&config.agent.log_level);
    with_runtime(|| async move {
        let agent = match Agent::start(config).await {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                eprintln!("badgegate: {e}");
                return ExitCode::from(match e {
                    StartError::Store(_) | StartError::Bind { .. } => EXIT_IO,
                });
            }
        };
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        let watchdog = sd_notify::watchdog_enabled().map(|period| {
            let healthy = agent.health_probe();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(period / 2);
                loop {
                    tick.tick().await;
                    // A store that cannot be written is not alive: let systemd restart us.
                    if healthy() {
                        let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                    }
                }
            })
        });
        wait_for_signal().await;
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        if let Some(w) = watchdog {
            w.abort();
        }
        agent.shutdown().await;
        ExitCode::SUCCESS
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}

fn queue_stats(path: &Path, json: bool) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let sinks: Vec<SinkId> = config
        .sink_names()
        .into_iter()
        .filter_map(SinkId::from_name)
        .collect();
    let stats = match store::offline_stats(&config.agent.data_dir, &sinks) {
        Ok(s) => Ok(s),
        // The agent holds the store: ask it over its local API instead.
        Err(StoreError::Locked { .. }) => stats_from_agent(&config),
        Err(e) => Err(e.to_string()),
    };
    match stats {
        Ok(s) => {
            if json {
                match serde_json::to_string_pretty(&s) {
                    Ok(t) => println!("{t}"),
                    Err(e) => {
                        eprintln!("{e}");
                        return ExitCode::from(EXIT_FAILURE);
                    }
                }
            } else {
                print_stats(&s);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("badgegate: {e}");
            ExitCode::from(EXIT_IO)
        }
    }
}

fn print_stats(s: &QueueStats) {
    println!("store    {}", s.store_path.display());
    println!(
        "size     {}   clockings held: {}",
        human_bytes(s.store_bytes),
        s.clockings_stored
    );
    println!("{:<10} {:>10}  oldest pending", "sink", "pending");
    for k in &s.sinks {
        let age = k
            .oldest_pending_age_secs
            .map_or_else(|| "-".to_owned(), human_secs);
        println!("{:<10} {:>10}  {}", k.sink, k.pending, age);
    }
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

fn human_secs(s: f64) -> String {
    let s = s as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        _ => format!("{}h {}m", s / 3600, (s % 3600) / 60),
    }
}

/// A minimal HTTP/1.1 GET of the agent's `/v1/queue/stats` (no HTTP client dependency needed
/// for one local request).
fn stats_from_agent(config: &Config) -> Result<QueueStats, String> {
    use std::io::{Read, Write};
    let mut addr = config.http.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let unreachable = |e: std::io::Error| {
        format!("the store is locked by a running agent, and its API at {addr} did not answer: {e}")
    };
    let mut conn =
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(unreachable)?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(unreachable)?;
    write!(
        conn,
        "GET /v1/queue/stats HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(unreachable)?;
    let mut response = Vec::new();
    conn.read_to_end(&mut response).map_err(unreachable)?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or("the agent sent an incomplete answer")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!(
            "the agent answered {}",
            head.lines().next().unwrap_or("")
        ));
    }
    serde_json::from_str(body).map_err(|e| format!("the agent's answer is not queue stats: {e}"))
}
