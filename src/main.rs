use std::collections::HashMap;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use badgegate::app::{Agent, StartError};
use badgegate::cli::{Cli, Command, LogFormat, QueueCommand, QueueSelection};
use badgegate::config::Config;
use badgegate::queue_tools::{self, Access};
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
    let format = cli.log_format;
    match cli.command {
        Command::Run { config } => run(&config, format),
        Command::Demo { duration } => demo(duration, format),
        Command::CheckConfig { config } => check_config(&config),
        Command::Status { config, json } => status(&config, json),
        Command::Zones { config, zone, json } => zones(&config, zone.as_deref(), json),
        Command::Queue { command } => match command {
            QueueCommand::Stats { config, json } => queue_stats(&config, json),
            QueueCommand::List {
                selection,
                limit,
                json,
            } => queue_list(&selection, limit, json),
            QueueCommand::Export { selection, output } => {
                queue_export(&selection, output.as_deref())
            }
            QueueCommand::ReplayDeadLetters { config, sink } => queue_replay(&config, &sink),
        },
    }
}

#[cfg(feature = "kit")]
fn demo(duration: u64, format: LogFormat) -> ExitCode {
    // rumqttd logs every connection the demo's relay cuts; the demo reports what matters itself.
    init_tracing("warn,rumqttd=off", format);
    with_runtime(|| async move {
        match badgegate::kit::demo::run(Duration::from_secs(duration)).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("demo failed: {e:#}");
                ExitCode::from(EXIT_FAILURE)
            }
        }
    })
}

/// The gateway build carries no demo kit (no fake clouds, no simulator, no embedded broker).
#[cfg(not(feature = "kit"))]
fn demo(_duration: u64, _format: LogFormat) -> ExitCode {
    eprintln!(
        "this badgegate is a gateway build without the demo kit.\n\
         To run the demo, build from the source tree with the default features:\n  \
         cargo run -- demo\n\
         (the gateway packages are built with --no-default-features and contain no fakes)"
    );
    ExitCode::from(EXIT_USAGE)
}

fn load(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        for p in &e.0 {
            eprintln!("{p}");
        }
        ExitCode::from(EXIT_USAGE)
    })
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

fn run(path: &Path, format: LogFormat) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    init_tracing(&config.agent.log_level, format);
    with_runtime(|| async move {
        let agent = match Agent::start(config).await {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                eprintln!("badgegate: {e}");
                return ExitCode::from(match e {
                    StartError::Store(_) | StartError::Bind { .. } => EXIT_IO,
                    StartError::Protime(_)
                    | StartError::CrossChex(_)
                    | StartError::Aktion(_)
                    | StartError::Tls(_)
                    | StartError::People(_) => EXIT_USAGE,
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
        badgegate::status::human_bytes(s.store_bytes),
        s.clockings_stored
    );
    println!("{:<10} {:>10}  oldest pending", "sink", "pending");
    for k in &s.sinks {
        let age = k
            .oldest_pending_age_secs
            .map_or_else(|| "-".to_owned(), badgegate::status::human_secs);
        println!("{:<10} {:>10}  {}", k.sink, k.pending, age);
    }
}

fn get_from_agent(config: &Config, path: &str) -> Result<serde_json::Value, String> {
    queue_tools::get(&queue_tools::Agent::of(config), path)
}

fn stats_from_agent(config: &Config) -> Result<QueueStats, String> {
    let v = get_from_agent(config, "/v1/queue/stats")
        .map_err(|e| format!("the store is locked by a running agent, and {e}"))?;
    serde_json::from_value(v).map_err(|e| format!("the agent's answer is not queue stats: {e}"))
}

fn status(path: &Path, json: bool) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let first = match get_from_agent(&config, "/healthz") {
        Ok(v) => v,
        Err(e) => {
            eprintln!("badgegate: {e}");
            return ExitCode::from(EXIT_IO);
        }
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&first).unwrap_or_default()
        );
        return ExitCode::SUCCESS;
    }
    // Delivery rates: the confirmed count over one second.
    let delivered = |h: &serde_json::Value| h["delivered"].as_object().cloned().unwrap_or_default();
    let before = delivered(&first);
    std::thread::sleep(Duration::from_secs(1));
    let rates: Vec<(String, f64)> = match get_from_agent(&config, "/healthz") {
        Ok(second) => delivered(&second)
            .iter()
            .map(|(k, v)| {
                let was = before.get(k).and_then(|b| b.as_u64()).unwrap_or(0);
                (
                    k.clone(),
                    v.as_u64().unwrap_or(0).saturating_sub(was) as f64,
                )
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    println!("{}", badgegate::status::render(&first, &rates));
    ExitCode::SUCCESS
}

fn zones(path: &Path, zone: Option<&str>, json: bool) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Some(z) = zone.filter(|z| !config.zones.iter().any(|d| d.name == *z)) {
        eprintln!("badgegate: zone {z:?} is not declared in [[zones]]");
        return ExitCode::from(EXIT_USAGE);
    }
    let doc = match store::open_offline(&config.agent.data_dir, &queue_tools::sinks(&config)) {
        Ok(s) => badgegate::access::engine::offline_view(&config, &s, zone),
        // The agent holds the store: ask it over its local API instead.
        Err(StoreError::Locked { .. }) => {
            let api = match zone {
                None => "/v1/zones".to_owned(),
                Some(z) => format!("/v1/zones/{z}/people"),
            };
            get_from_agent(&config, &api)
                .map_err(|e| format!("the store is locked by a running agent, and {e}"))
        }
        Err(e) => Err(e.to_string()),
    };
    match doc {
        Ok(doc) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
            } else {
                println!("{}", badgegate::access::view::render(&doc));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("badgegate: {e}");
            ExitCode::from(EXIT_IO)
        }
    }
}

fn open_queue(sel: &QueueSelection) -> Result<(Access, HashMap<String, String>), ExitCode> {
    let config = load(&sel.config)?;
    let query = queue_tools::selection_query(
        sel.sink.as_deref(),
        sel.terminal.as_deref(),
        sel.since.as_deref(),
        sel.until.as_deref(),
    );
    // Validate the selection before touching anything.
    if let Err(e) = badgegate::http::queue_filter(&query) {
        eprintln!("badgegate: {e}");
        return Err(ExitCode::from(EXIT_USAGE));
    }
    let access = Access::open(&config).map_err(|e| {
        eprintln!("badgegate: {e}");
        ExitCode::from(EXIT_IO)
    })?;
    Ok((access, query))
}

fn queue_list(sel: &QueueSelection, limit: usize, json: bool) -> ExitCode {
    let (access, query) = match open_queue(sel) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let (items, more) = match access.page(&query, None, limit.max(1)) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("badgegate: {e}");
            return ExitCode::from(EXIT_IO);
        }
    };
    if json {
        for v in &items {
            println!("{v}");
        }
    } else {
        println!(
            "{:>8}  {:<25}  {:<12}  {:<10}  {:<3}  {:<13}  SINKS",
            "SEQ", "OCCURRED_AT", "TERMINAL", "BADGE", "DIR", "STATUS"
        );
        for v in &items {
            let mut sinks: Vec<String> = v["pending_sinks"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            if let Some(dead) = v["dead_letters"].as_array() {
                sinks.extend(
                    dead.iter()
                        .map(|d| format!("{}(dead)", d["sink"].as_str().unwrap_or("?"))),
                );
            }
            println!(
                "{:>8}  {:<25}  {:<12}  {:<10}  {:<3}  {:<13}  {}",
                v["seq"],
                v["occurred_at"].as_str().unwrap_or(""),
                v["terminal"].as_str().unwrap_or(""),
                v["badge"].as_str().unwrap_or(""),
                v["direction"].as_str().unwrap_or(""),
                v["status"].as_str().unwrap_or(""),
                sinks.join(",")
            );
        }
        if more.is_some() {
            eprintln!("(showing the first {}; use --limit for more)", items.len());
        }
    }
    ExitCode::SUCCESS
}

fn queue_export(sel: &QueueSelection, output: Option<&Path>) -> ExitCode {
    use std::io::Write;
    let (access, query) = match open_queue(sel) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let mut out: Box<dyn Write> = match output {
        Some(p) => match std::fs::File::create(p) {
            Ok(f) => Box::new(std::io::BufWriter::new(f)),
            Err(e) => {
                eprintln!("badgegate: cannot write {}: {e}", p.display());
                return ExitCode::from(EXIT_IO);
            }
        },
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let started = std::time::Instant::now();
    let mut last_report = std::time::Instant::now();
    let (mut after, mut written) = (None, 0u64);
    loop {
        let (items, next) = match access.page(&query, after, 1000) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("badgegate: {e} (after {written} exported)");
                return ExitCode::from(EXIT_IO);
            }
        };
        for v in &items {
            if writeln!(out, "{v}").is_err() {
                eprintln!("badgegate: writing the export failed after {written} clockings");
                return ExitCode::from(EXIT_IO);
            }
            written += 1;
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            last_report = std::time::Instant::now();
            eprintln!(
                "exported {written} clockings ({:.0}/s)",
                written as f64 / started.elapsed().as_secs_f64()
            );
        }
        match next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    if out.flush().is_err() {
        eprintln!("badgegate: writing the export failed");
        return ExitCode::from(EXIT_IO);
    }
    eprintln!("exported {written} clockings");
    ExitCode::SUCCESS
}

fn queue_replay(path: &Path, sink: &str) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let Some(sink) = SinkId::from_name(sink) else {
        eprintln!("badgegate: unknown sink {sink:?} (mqtt, protime)");
        return ExitCode::from(EXIT_USAGE);
    };
    match Access::open(&config).and_then(|a| a.replay(sink)) {
        Ok(n) => {
            println!(
                "{n} dead letter(s) of {} put back in the queue",
                sink.as_str()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("badgegate: {e}");
            ExitCode::from(EXIT_IO)
        }
    }
}
