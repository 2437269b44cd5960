//! Startup and shutdown: config → build → spawn → (caller waits for a signal) → drain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::access::mqtt::AccessLink;
use crate::access::{AccessEngine, Directory, PeopleOrigin};
use crate::clouds::protime::ProtimeClient;
use crate::clouds::HttpOptions;
use crate::config::{Config, ConfigError, FileChecks, TerminalConfig, TerminalKind};
use crate::http::{self, ApiState};
use crate::ingest::Ingest;
use crate::metrics::Metrics;
use crate::model::Source;
use crate::sinks::mqtt::MqttSink;
use crate::sinks::protime::{PersonRefs, ProtimeSink};
use crate::sources::aktion::AktionSource;
use crate::sources::crosschex::CrossChexSource;
use crate::sources::protime::ProtimeMirror;
use crate::store::{SinkId, Store, StoreError, Writer, WriterHandle};
use crate::terminals::anviz::link::AnvizLink;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The people file changed since the config was checked and is no longer valid.
    #[error("access.people_file: {0}")]
    People(String),
    #[error("{0}")]
    Tls(String),
    #[error("sinks.protime: {0}")]
    Protime(crate::clouds::CloudError),
    #[error("sources.crosschex: {0}")]
    CrossChex(crate::clouds::CloudError),
    #[error("sources.aktion: {0}")]
    Aktion(crate::clouds::CloudError),
    #[error("cannot listen on {addr} (http.listen): {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Read and validate the configuration file the way the agent runs it: [`Config::load`] plus
/// the checks of the named files' contents whose format belongs to other modules (the people
/// file must parse), reported with every other problem under the file's key.
pub fn load_config(path: &std::path::Path) -> Result<Config, ConfigError> {
    Config::load_checked(path, file_checks())
}

/// What [`load_config`] checks beyond `config` itself.
fn file_checks() -> FileChecks {
    FileChecks {
        people_file: Some(|text| {
            crate::access::people_file::parse(text)
                .err()
                .unwrap_or_default()
        }),
    }
}

/// A running agent.
pub struct Agent {
    http_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    http_task: JoinHandle<()>,
    source_tasks: Vec<JoinHandle<()>>,
    sink_tasks: Vec<JoinHandle<()>>,
    writer: Writer,
    writer_handle: WriterHandle,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    ingest: Ingest,
    access: AccessEngine,
    directory: Directory,
}

impl Agent {
    pub async fn start(config: Config) -> Result<Agent, StartError> {
        let config = Arc::new(config);
        let sinks: Vec<SinkId> = config
            .sink_names()
            .into_iter()
            .filter_map(SinkId::from_name)
            .collect();
        let data_dir = config.agent.data_dir.clone();
        let store = tokio::task::spawn_blocking(move || Store::open(&data_dir, &sinks))
            .await
            .map_err(|e| StoreError::Io(e.to_string()))??;
        let store = Arc::new(store);
        let link_terminals: Vec<&TerminalConfig> = config
            .terminals
            .iter()
            .filter(|t| t.kind == TerminalKind::Anviz)
            .collect();
        let protime = config.sinks.protime.as_ref();
        let cloud_sources = [
            (protime.is_some_and(|p| p.mirror), Source::Protime),
            (config.sources.crosschex.is_some(), Source::Crosschex),
            (config.sources.aktion.is_some(), Source::Aktion),
        ]
        .into_iter()
        .filter_map(|(on, s)| on.then_some(s));
        let metrics = Arc::new(
            Metrics::new(link_terminals.iter().map(|t| t.id.as_str())).with_sources(cloud_sources),
        );
        // Presence and people as last committed, before the writer decides anything.
        let (directory, access, hook) = {
            let (config, store, metrics) = (config.clone(), store.clone(), metrics.clone());
            tokio::task::spawn_blocking(move || {
                let directory = Directory::load(&store)?;
                let (engine, hook) = AccessEngine::load(&config, &store, &directory, metrics)?;
                Ok::<_, StoreError>((directory, engine, hook))
            })
            .await
            .map_err(|e| StoreError::Io(e.to_string()))??
        };
        let (writer, writer_handle) = Writer::start_with_access(
            store.clone(),
            config.agent.dedupe_days,
            config.agent.store_max_bytes,
            Some(hook),
        );
        directory.persist_with(writer_handle.clone(), metrics.clone());
        let mut people_stamp = None;
        if let Some(path) = &config.access.people_file {
            people_stamp = file_stamp(path);
            let people = read_people(path).map_err(StartError::People)?;
            let n = people.len();
            directory.replace_people(PeopleOrigin::File, people).await?;
            tracing::info!(persons = n, file = %path.display(), "people file loaded");
        }
        let (shutdown, shutdown_rx) = watch::channel(false);

        let mut sink_tasks = Vec::new();
        if let Some(mqtt) = &config.mqtt {
            let sink = MqttSink::new(
                mqtt.clone(),
                config.agent.site.clone(),
                store.clone(),
                writer_handle.clone(),
                metrics.clone(),
            )
            .map_err(StartError::Tls)?;
            sink_tasks.push(tokio::spawn(sink.run(shutdown_rx.clone())));
        }
        // One client for the sink and the mirror: one token, one rate limit.
        let protime_client = protime
            .map(|p| ProtimeClient::new(p, HttpOptions::protime()))
            .transpose()
            .map_err(StartError::Protime)?;
        if let (Some(p), Some(client)) = (protime, &protime_client) {
            let sink = ProtimeSink::new(
                client.clone(),
                p.timezone,
                PersonRefs::from_config(&config),
                Duration::from_secs(p.retry_max_secs),
                store.clone(),
                writer_handle.clone(),
                metrics.clone(),
            );
            sink_tasks.push(tokio::spawn(sink.run(shutdown_rx.clone())));
        }
        if let Some(link) = AccessLink::new(
            config.clone(),
            access.clone(),
            store.clone(),
            writer_handle.clone(),
            metrics.clone(),
        )
        .map_err(StartError::Tls)?
        {
            sink_tasks.push(tokio::spawn(link.run(shutdown_rx.clone())));
        }

        let ingest = Ingest::new(config.clone(), writer_handle.clone(), metrics.clone());
        let mut source_tasks = Vec::new();
        if let Some(path) = &config.access.people_file {
            source_tasks.push(tokio::spawn(watch_people_file(
                path.clone(),
                people_stamp,
                directory.clone(),
                shutdown_rx.clone(),
            )));
        }
        for t in link_terminals {
            let health = metrics.terminals.get(&t.id).cloned().unwrap_or_default();
            let link = AnvizLink::new(t.clone(), ingest.clone(), health);
            source_tasks.push(tokio::spawn(link.run(shutdown_rx.clone())));
        }
        // People and shifts from the clouds, for the access engine.
        if let (Some(p), Some(client)) = (protime.filter(|p| p.mirror), protime_client) {
            let mirror = ProtimeMirror::new(
                client,
                p,
                directory.clone(),
                ingest.clone(),
                store.clone(),
                metrics.source(Source::Protime),
            );
            source_tasks.push(tokio::spawn(mirror.run(shutdown_rx.clone())));
        }
        if let Some(c) = &config.sources.crosschex {
            let source = CrossChexSource::new(
                c,
                &config,
                ingest.clone(),
                store.clone(),
                metrics.source(Source::Crosschex),
            )
            .map_err(StartError::CrossChex)?;
            source_tasks.push(tokio::spawn(source.run(shutdown_rx.clone())));
        }
        if let Some(a) = &config.sources.aktion {
            let source = AktionSource::new(
                a,
                &config,
                directory.clone(),
                ingest.clone(),
                store.clone(),
                metrics.source(Source::Aktion),
            )
            .map_err(StartError::Aktion)?;
            source_tasks.push(tokio::spawn(source.run(shutdown_rx.clone())));
        }

        let listener = tokio::net::TcpListener::bind(config.http.listen)
            .await
            .map_err(|source| StartError::Bind {
                addr: config.http.listen,
                source,
            })?;
        let http_addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.http.listen,
            source,
        })?;
        let state = ApiState {
            config: config.clone(),
            ingest: ingest.clone(),
            store: store.clone(),
            writer: writer_handle.clone(),
            metrics: metrics.clone(),
            access: access.clone(),
            limiter: Arc::new(http::RateLimiter::new(config.http.rate_limit_per_sec)),
        };
        let router = http::router(state);
        let stop = shutdown_rx.clone();
        let http_config = config.http.clone();
        let http_task =
            tokio::spawn(async move { http::serve(listener, router, &http_config, stop).await });
        tracing::info!(
            site = %config.agent.site,
            http = %http_addr,
            store = %store.path().display(),
            sinks = %config.sink_names().join(","),
            "badgegate started"
        );
        Ok(Agent {
            http_addr,
            shutdown,
            http_task,
            source_tasks,
            sink_tasks,
            writer,
            writer_handle,
            store,
            metrics,
            ingest,
            access,
            directory,
        })
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The one path into the store, for sources running in-process.
    pub fn ingest(&self) -> &Ingest {
        &self.ingest
    }

    pub fn access(&self) -> &AccessEngine {
        &self.access
    }

    /// The person directory the person sources fill.
    pub fn directory(&self) -> &Directory {
        &self.directory
    }

    /// A check that the store is writable (the last commit succeeded), usable from any task
    /// without keeping the writer alive.
    pub fn health_probe(&self) -> impl Fn() -> bool + Send + 'static {
        let last_error = self.writer_handle.last_error_slot();
        move || last_error.lock().map(|g| g.is_none()).unwrap_or(false)
    }

    /// Stop ingest (in-flight requests finish and are committed), let the sinks collect their
    /// outstanding acknowledgements and disconnect, then make the store durable and close it.
    pub async fn shutdown(self) {
        tracing::info!("shutting down");
        let _ = self.shutdown.send(true);
        let _ = self.http_task.await;
        for t in self.source_tasks {
            let _ = t.await;
        }
        for t in self.sink_tasks {
            let _ = t.await;
        }
        drop(self.writer_handle);
        drop(self.ingest);
        drop(self.directory);
        let writer = self.writer;
        let _ = tokio::task::spawn_blocking(move || writer.join()).await;
        tracing::info!("stopped cleanly");
    }
}

/// How often the people file is looked at for changes.
const PEOPLE_FILE_CHECK_EVERY: Duration = Duration::from_secs(5);

/// The people file, parsed; every bad line is in the error.
fn read_people(path: &std::path::Path) -> Result<Vec<crate::access::Person>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    crate::access::people_file::parse(&text)
        .map_err(|errors| format!("{}: {}", path.display(), errors.join("; ")))
}

/// What tells a changed file from the one loaded: its modification time and length.
fn file_stamp(path: &std::path::Path) -> Option<(std::time::SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Reload `access.people_file` when it changes, so badges can be added or withdrawn without a
/// restart. A file that cannot be read or has bad lines is reported and the persons loaded
/// before stay in force (a half-written file must not lock everybody out).
async fn watch_people_file(
    path: std::path::PathBuf,
    mut loaded: Option<(std::time::SystemTime, u64)>,
    directory: Directory,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(PEOPLE_FILE_CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.reset();
    let mut reported = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let stamp = file_stamp(&path);
        if stamp.is_none() || stamp == loaded {
            continue;
        }
        let p = path.clone();
        let read = tokio::task::spawn_blocking(move || read_people(&p))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        match read {
            Ok(people) => {
                let n = people.len();
                match directory.replace_people(PeopleOrigin::File, people).await {
                    Ok(()) => {
                        loaded = stamp;
                        reported = None;
                        tracing::info!(persons = n, file = %path.display(), "people file reloaded");
                    }
                    Err(e) => {
                        tracing::error!(error = %e, file = %path.display(), "storing the reloaded people file failed; will retry")
                    }
                }
            }
            Err(e) => {
                // Once per version of the file, not every few seconds.
                if reported != stamp {
                    reported = stamp;
                    tracing::warn!(error = %e, "people file changed but is not valid; the persons loaded before stay in force");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_people_file_is_a_config_problem() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("people.csv"), "badge,person\n1,A\n1,B\n").unwrap();
        let path = dir.path().join("badgegate.toml");
        let text = "[agent]\nsite = \"plant-1\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:1883\"\n\
                    [access]\npeople_file = \"people.csv\"\n";
        std::fs::write(&path, text).unwrap();
        assert!(Config::load(&path).is_ok(), "config alone does not read it");
        let err = load_config(&path).unwrap_err();
        assert_eq!(err.0[0].key, "access.people_file");
        assert!(err.0[0].message.contains("line 3"), "{err}");
    }
}
