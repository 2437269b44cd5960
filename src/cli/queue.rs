//! `queue stats | list | export | replay-dead-letters`: safe while the agent runs. A stopped
//! agent's store is opened directly; a running agent holds the store's lock, so the same
//! requests go to its local API instead, a page at a time (an export of a large backlog never
//! sits whole in the gateway's memory).

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::agent_api::AgentApi;
use super::out::{outln, reader_gone};
use super::{fail, load, sinks, QueueSelection, EXIT_FAILURE, EXIT_IO, EXIT_USAGE};
use crate::config::Config;
use crate::status::{human_bytes, human_secs};
use crate::store::{
    self, Change, QueueFilter, QueueStats, SinkId, SinkStats, Store, StoreError, Writer,
};

/// Where the queue is read and changed.
enum Access {
    /// The agent is stopped: the store itself.
    Local(Arc<Store>),
    /// The agent runs: its API.
    Remote(AgentApi),
}

impl Access {
    /// `writable` for the tools that change the queue; the others open it read-only.
    fn open(config: &Config, writable: bool) -> Result<Access, String> {
        let (dir, sinks) = (&config.agent.data_dir, sinks(config));
        let opened = if writable {
            store::open_offline_writable(dir, &sinks)
        } else {
            store::open_offline(dir, &sinks)
        };
        match opened {
            Ok(s) => Ok(Access::Local(Arc::new(s))),
            Err(StoreError::Locked { .. }) => AgentApi::of(config).map(Access::Remote),
            Err(e) => Err(e.to_string()),
        }
    }

    /// One page of matching clockings (as JSON) and the seq to continue after.
    fn page(
        &self,
        filter: &QueueFilter,
        after: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<Value>, Option<u64>), String> {
        match self {
            Access::Local(store) => {
                let page = store
                    .list(filter, after, limit)
                    .map_err(|e| e.to_string())?;
                let next = (page.len() == limit)
                    .then(|| page.last().map(|q| q.seq))
                    .flatten();
                Ok((page.iter().map(|q| q.to_json()).collect(), next))
            }
            Access::Remote(api) => {
                let mut query = form_urlencoded::Serializer::new(String::new());
                query.extend_pairs(filter.to_query());
                query.append_pair("limit", &limit.to_string());
                if let Some(a) = after {
                    query.append_pair("after", &a.to_string());
                }
                let v = api.get(&format!("/v1/queue/clockings?{}", query.finish()))?;
                let items = v["clockings"].as_array().cloned().unwrap_or_default();
                Ok((items, v["next_after"].as_u64()))
            }
        }
    }

    fn replay(&self, sink: SinkId) -> Result<u64, String> {
        match self {
            Access::Local(store) => {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                let (writer, handle) = Writer::start(store.clone(), 30, None);
                let result = runtime.block_on(handle.change(Change::Replay { sink }));
                drop(handle);
                writer.join();
                result.map_err(|e| e.to_string())
            }
            Access::Remote(api) => {
                let v = api.post(&format!(
                    "/v1/queue/replay-dead-letters?sink={}",
                    sink.as_str()
                ))?;
                v["replayed"]
                    .as_u64()
                    .ok_or_else(|| format!("unexpected answer from the agent: {v}"))
            }
        }
    }
}

/// `queue stats`: pending per sink, oldest pending age, store size.
pub fn stats(path: &Path, json: bool) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let stats = match store::offline_stats(&config.agent.data_dir, &sinks(&config)) {
        Ok(s) => Ok(s),
        // The agent holds the store: ask it over its local API instead.
        Err(StoreError::Locked { .. }) => AgentApi::of(&config)
            .and_then(|a| a.get_as::<QueueStats>("/v1/queue/stats", "queue stats"))
            .map_err(|e| format!("the store is locked by a running agent, and {e}")),
        Err(e) => Err(e.to_string()),
    };
    let s = match stats {
        Ok(s) => s,
        Err(e) => return fail(EXIT_IO, e),
    };
    if !json {
        print_stats(&s);
        return ExitCode::SUCCESS;
    }
    match serde_json::to_string_pretty(&s) {
        Ok(t) => {
            outln!("{t}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn print_stats(s: &QueueStats) {
    outln!("store    {}", s.store_path.display());
    outln!(
        "size     {}   clockings held: {}",
        human_bytes(s.store_bytes),
        s.clockings_stored
    );
    outln!("{:<10} {:>10}  oldest pending", "sink", "pending");
    for k in &s.sinks {
        let age = k
            .oldest_pending_age_secs
            .map_or_else(|| "-".to_owned(), human_secs);
        outln!("{:<10} {:>10}  {}", k.sink, k.pending, age);
    }
    for k in &s.orphaned {
        outln!("{}", orphaned_line(k));
    }
}

/// How `queue stats` shows a sink missing from the config that still holds clockings.
fn orphaned_line(k: &SinkStats) -> String {
    let dead = if k.dead_letters > 0 {
        format!(" and {} dead letter(s)", k.dead_letters)
    } else {
        String::new()
    };
    format!(
        "{:<10} orphaned: {} pending{dead}, not in this config (kept; `badgegate queue drop-sink {}` releases them)",
        k.sink, k.pending, k.sink
    )
}

/// The selection, validated before anything is opened, and where to read it.
fn open(sel: &QueueSelection) -> Result<(Access, QueueFilter), ExitCode> {
    let config = load(&sel.config)?;
    let filter = QueueFilter::parse(
        sel.sink.as_deref(),
        sel.terminal.as_deref(),
        sel.since.as_deref(),
        sel.until.as_deref(),
    )
    .map_err(|e| fail(EXIT_USAGE, e))?;
    let access = Access::open(&config, false).map_err(|e| fail(EXIT_IO, e))?;
    Ok((access, filter))
}

/// `queue list`: the first `limit` matching clockings, as a table or JSON lines.
pub fn list(sel: &QueueSelection, limit: usize, json: bool) -> ExitCode {
    let (access, filter) = match open(sel) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let (items, more) = match access.page(&filter, None, limit.max(1)) {
        Ok(p) => p,
        Err(e) => return fail(EXIT_IO, e),
    };
    if json {
        for v in &items {
            outln!("{v}");
        }
        return ExitCode::SUCCESS;
    }
    outln!(
        "{:>8}  {:<25}  {:<12}  {:<10}  {:<3}  {:<13}  SINKS",
        "SEQ",
        "OCCURRED_AT",
        "TERMINAL",
        "BADGE",
        "DIR",
        "STATUS"
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
        outln!(
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
    ExitCode::SUCCESS
}

/// `queue export`: every matching clocking as JSON lines, a page at a time.
pub fn export(sel: &QueueSelection, output: Option<&Path>) -> ExitCode {
    let (access, filter) = match open(sel) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let mut out: Box<dyn Write> = match output {
        Some(p) => match std::fs::File::create(p) {
            Ok(f) => Box::new(std::io::BufWriter::new(f)),
            Err(e) => return fail(EXIT_IO, format!("cannot write {}: {e}", p.display())),
        },
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let started = Instant::now();
    let mut last_report = Instant::now();
    let (mut after, mut written) = (None, 0u64);
    loop {
        let (items, next) = match access.page(&filter, after, 1000) {
            Ok(p) => p,
            Err(e) => return fail(EXIT_IO, format!("{e} (after {written} exported)")),
        };
        for v in &items {
            if let Err(e) = writeln!(out, "{v}") {
                if reader_gone(&e) {
                    return ExitCode::SUCCESS;
                }
                return fail(
                    EXIT_IO,
                    format!("writing the export failed after {written} clockings"),
                );
            }
            written += 1;
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            last_report = Instant::now();
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
    if let Err(e) = out.flush() {
        if reader_gone(&e) {
            return ExitCode::SUCCESS;
        }
        return fail(EXIT_IO, "writing the export failed");
    }
    eprintln!("exported {written} clockings");
    ExitCode::SUCCESS
}

/// `queue replay-dead-letters`: a sink's dead letters back in its queue.
pub fn replay_dead_letters(path: &Path, sink: &str) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let Some(sink) = SinkId::from_name(sink) else {
        return fail(EXIT_USAGE, format!("unknown sink {sink:?} (mqtt, protime)"));
    };
    match Access::open(&config, true).and_then(|a| a.replay(sink)) {
        Ok(n) => {
            outln!(
                "{n} dead letter(s) of {} put back in the queue",
                sink.as_str()
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(EXIT_IO, e),
    }
}

/// `queue drop-sink`: release what a sink missing from the config still holds. Offline only:
/// the running agent holds the store, and dropping a queue is not something to do remotely.
pub fn drop_sink(path: &Path, name: &str, yes: bool) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let Some(sink) = SinkId::from_name(name) else {
        return fail(EXIT_USAGE, format!("unknown sink {name:?} (mqtt, protime)"));
    };
    let configured = sinks(&config);
    if configured.contains(&sink) {
        return fail(
            EXIT_USAGE,
            format!(
                "sink {name} is configured in {}: the agent delivers its queue; remove its section first to drop it",
                path.display()
            ),
        );
    }
    let mut store = match store::open_offline_writable(&config.agent.data_dir, &configured) {
        Ok(s) => s,
        Err(StoreError::Locked { path }) => {
            return fail(
                EXIT_IO,
                format!(
                    "store {} is in use (is the agent running?): stop the agent first, drop-sink needs the store to itself",
                    path.display()
                ),
            )
        }
        Err(e) => return fail(EXIT_IO, e),
    };
    let held = match store.stats() {
        Ok(s) => s.orphaned.into_iter().find(|k| k.sink == name),
        Err(e) => return fail(EXIT_IO, e),
    };
    let Some(held) = held else {
        outln!(
            "{name} holds no clockings in {}: nothing to drop",
            store.path().display()
        );
        return ExitCode::SUCCESS;
    };
    if !yes {
        if let Err(code) = confirm(name, &held) {
            return code;
        }
    }
    match store.drop_sink(sink) {
        Ok(n) => {
            outln!("dropped {n} entries of sink {name} (they will not be delivered to it)");
            ExitCode::SUCCESS
        }
        Err(e) => fail(EXIT_IO, e),
    }
}

/// Ask on the terminal to type the sink's name; without a terminal, only `--yes` will do.
fn confirm(name: &str, held: &SinkStats) -> Result<(), ExitCode> {
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() {
        return Err(fail(
            EXIT_USAGE,
            format!(
                "drop-sink would drop {} pending and {} dead-lettered clockings of {name}; not a terminal to confirm on: pass --yes",
                held.pending, held.dead_letters
            ),
        ));
    }
    eprint!(
        "This drops {} pending and {} dead-lettered clockings of {name}: they will never reach it.\nType the sink name ({name}) to confirm: ",
        held.pending, held.dead_letters
    );
    let mut answer = String::new();
    if std::io::stdin().read_line(&mut answer).is_err() || answer.trim() != name {
        return Err(fail(EXIT_FAILURE, "not confirmed; nothing dropped"));
    }
    Ok(())
}
