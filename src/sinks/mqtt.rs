//! MQTT sink: QoS 1 publishes, confirmed to the store only by their PUBACK.
//!
//! `AsyncClient::publish()` returning Ok only means "queued". The event loop reports
//! `Outgoing::Publish(pkid)` in the order requests were handed to it, so a FIFO of store seqs maps
//! each publish to its packet id, and `Incoming::PubAck(pkid)` maps back to the seq to confirm.
//!
//! Every connection gets a fresh client and event loop with a clean session: nothing rumqttc
//! queued survives a disconnect, so the store alone decides what is re-sent. After every
//! (re)connect the sink reads the sink's pending entries from the start, in arrival order, which
//! keeps per-terminal order. Throughput comes from a window of `mqtt.inflight` unacknowledged
//! publishes, not from waiting for each PUBACK.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, ConnectionError, Event, LastWill, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::{mpsc, watch};

use crate::backoff::Backoff;
use crate::config::MqttConfig;
use crate::metrics::Metrics;
use crate::model::Clocking;
use crate::mqtt_link::{self, connect_options, describe, poll_events};
use crate::store::{SinkId, Store, StoreError, WriterHandle};

/// How long a clean shutdown waits for outstanding PUBACKs.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Store entries read ahead per read transaction.
const READ_AHEAD: usize = 512;

pub struct MqttSink {
    cfg: MqttConfig,
    /// For `mqtts://`: built once at start, so a bad CA or key file stops the start.
    tls: Option<Arc<rustls::ClientConfig>>,
    site: String,
    store: Arc<Store>,
    writer: WriterHandle,
    metrics: Arc<Metrics>,
}

/// Why a session ended.
enum End {
    Shutdown,
    /// The connection failed or was lost; `was_connected` tells a lost uplink from a failed attempt.
    Lost {
        reason: String,
        was_connected: bool,
    },
}

/// While the broker stays unreachable, repeat the warning this often (every attempt is logged at
/// debug level): a long outage must not flood the journal.
const STILL_DOWN_EVERY: Duration = Duration::from_secs(60);

impl MqttSink {
    pub fn new(
        cfg: MqttConfig,
        site: String,
        store: Arc<Store>,
        writer: WriterHandle,
        metrics: Arc<Metrics>,
    ) -> Result<MqttSink, String> {
        let tls = mqtt_link::tls(&cfg)?;
        Ok(MqttSink {
            cfg,
            tls,
            site,
            store,
            writer,
            metrics,
        })
    }

    pub fn clocking_topic(prefix: &str, site: &str, terminal: &str) -> String {
        format!("{prefix}/{site}/clockings/{terminal}")
    }

    pub fn status_topic(prefix: &str, site: &str) -> String {
        format!("{prefix}/{site}/status")
    }

    /// Run until `shutdown` turns true: connect, deliver, reconnect with backoff.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Backoff::new(
            Duration::from_millis(self.cfg.reconnect_min_ms),
            Duration::from_millis(self.cfg.reconnect_max_ms),
        );
        let mut first = true;
        let mut down_since: Option<std::time::Instant> = None;
        let mut last_warned = std::time::Instant::now();
        let mut attempts = 0u64;
        loop {
            if *shutdown.borrow() {
                break;
            }
            if !first {
                self.metrics.mqtt.reconnects.fetch_add(1, Ordering::Relaxed);
            }
            first = false;
            let end = self.session(&mut shutdown, &mut backoff).await;
            self.metrics.mqtt.connected.store(false, Ordering::Relaxed);
            self.metrics.mqtt.in_flight.store(0, Ordering::Relaxed);
            // Confirmations sent so far must be committed before the next session re-reads the
            // pending entries, or they would be sent twice.
            if let Err(e) = self.writer.flush().await {
                tracing::error!(error = %e, "store flush after MQTT session failed");
            }
            let (reason, was_connected) = match end {
                End::Shutdown => break,
                End::Lost {
                    reason,
                    was_connected,
                } => (reason, was_connected),
            };
            let delay = backoff.next_delay();
            attempts += 1;
            if was_connected || down_since.is_none() {
                down_since = Some(std::time::Instant::now());
                last_warned = std::time::Instant::now();
                attempts = 1;
                tracing::warn!(
                    broker = %self.cfg.url,
                    %reason,
                    retry_in_ms = delay.as_millis() as u64,
                    "{}; clockings stay in the store",
                    if was_connected { "MQTT uplink lost" } else { "cannot reach the MQTT broker" }
                );
            } else if last_warned.elapsed() >= STILL_DOWN_EVERY {
                last_warned = std::time::Instant::now();
                tracing::warn!(
                    broker = %self.cfg.url,
                    %reason,
                    down_for_secs = down_since.map_or(0, |d| d.elapsed().as_secs()),
                    attempts,
                    "MQTT broker still unreachable; clockings stay in the store"
                );
            } else {
                tracing::debug!(broker = %self.cfg.url, %reason, attempts, "MQTT connection attempt failed");
            }
            if was_connected {
                down_since = Some(std::time::Instant::now());
            }
            self.metrics.mqtt.set_error(Some(reason));
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    fn options(&self) -> MqttOptions {
        let mut o = connect_options(&self.cfg, &self.cfg.client_id, self.tls.as_ref());
        // rumqttc wraps packet ids at its inflight limit; leaving it twice our window means a
        // broker that acks out of order cannot make a new publish collide with an unacked one.
        o.set_inflight(self.cfg.inflight.saturating_mul(2).max(2));
        o.set_max_packet_size(1024 * 1024, 1024 * 1024);
        o.set_last_will(LastWill::new(
            Self::status_topic(&self.cfg.topic_prefix, &self.site),
            "offline",
            QoS::AtLeastOnce,
            true,
        ));
        o
    }

    async fn session(&self, shutdown: &mut watch::Receiver<bool>, backoff: &mut Backoff) -> End {
        let window = usize::from(self.cfg.inflight);
        let (client, eventloop) = AsyncClient::new(self.options(), window + 16);
        let (ev_tx, mut events) = mpsc::channel(window * 2 + 16);
        let poller = tokio::spawn(poll_events(eventloop, ev_tx));

        // Wait for the CONNACK.
        let connected = tokio::select! {
            ev = events.recv() => match ev {
                Some(Ok(Event::Incoming(Packet::ConnAck(ack)))) => {
                    if ack.code == rumqttc::ConnectReturnCode::Success { Ok(()) }
                    else { Err(format!("broker refused the connection: {:?}", ack.code)) }
                }
                Some(Err(e)) => Err(describe(&e)),
                Some(Ok(other)) => Err(format!("unexpected first event {other:?}")),
                None => Err("event loop ended".into()),
            },
            _ = shutdown.changed() => { poller.abort(); return End::Shutdown; }
        };
        if let Err(reason) = connected {
            poller.abort();
            return End::Lost {
                reason,
                was_connected: false,
            };
        }
        backoff.reset();
        self.metrics.mqtt.connected.store(true, Ordering::Relaxed);
        self.metrics.mqtt.set_error(None);
        tracing::info!(broker = %self.cfg.url, client_id = %self.cfg.client_id, "MQTT uplink connected; sending everything unconfirmed");

        let mut s = Session {
            client,
            fifo: VecDeque::new(),
            by_pkid: HashMap::new(),
            in_flight: 0,
            cursor: None,
            buffer: VecDeque::new(),
            confirms: Vec::new(),
            status_acked: false,
        };
        let status_topic = Self::status_topic(&self.cfg.topic_prefix, &self.site);
        if s.client
            .publish(&status_topic, QoS::AtLeastOnce, true, "online")
            .await
            .is_err()
        {
            poller.abort();
            return lost("event loop ended".into());
        }
        s.fifo.push_back(None);

        let mut committed = self.writer.committed();
        let mut store_exhausted = false;
        let mut drain = self.drain_progress().await;
        let mut progress_tick = tokio::time::interval(PROGRESS_EVERY);
        progress_tick.reset();
        let end = loop {
            // Fill the window from the store.
            while s.in_flight < window && !*shutdown.borrow() {
                if s.buffer.is_empty() {
                    if store_exhausted {
                        break;
                    }
                    committed.borrow_and_update();
                    match self.read_pending(s.cursor).await {
                        Ok(batch) if batch.is_empty() => {
                            store_exhausted = true;
                            break;
                        }
                        Ok(batch) => s.buffer.extend(batch),
                        Err(e) => {
                            tracing::error!(error = %e, "reading the outbox failed");
                            break;
                        }
                    }
                }
                let Some((seq, c)) = s.buffer.pop_front() else {
                    break;
                };
                let topic = Self::clocking_topic(&self.cfg.topic_prefix, &self.site, &c.terminal);
                if s.client
                    .publish(topic, QoS::AtLeastOnce, false, c.to_json())
                    .await
                    .is_err()
                {
                    break;
                }
                tracing::trace!(id = %c.id, seq, "published");
                s.fifo.push_back(Some(seq));
                s.cursor = Some(seq);
                s.in_flight += 1;
                self.metrics.mqtt.published.fetch_add(1, Ordering::Relaxed);
            }
            self.metrics
                .mqtt
                .in_flight
                .store(s.in_flight as u64, Ordering::Relaxed);

            let wait_for_data = store_exhausted && s.buffer.is_empty() && s.in_flight < window;
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(Ok(ev)) => s.handle(ev),
                    Some(Err(e)) => break lost(describe(&e)),
                    None => break lost("event loop ended".into()),
                },
                r = committed.changed(), if wait_for_data => {
                    if r.is_err() { break End::Shutdown; }
                    store_exhausted = false;
                }
                _ = shutdown.changed() => break End::Shutdown,
                _ = progress_tick.tick(), if drain.is_some() => {
                    if let Some(d) = &drain {
                        let remaining = self.pending_count().await;
                        d.log(remaining, self.metrics.mqtt.delivered.load(Ordering::Relaxed));
                        if remaining == 0 {
                            drain = None;
                        }
                    }
                }
            }
            // Drain whatever else is ready before touching the store again.
            while let Ok(ev) = events.try_recv() {
                match ev {
                    Ok(ev) => s.handle(ev),
                    Err(e) => {
                        self.confirm(&mut s);
                        poller.abort();
                        return lost(describe(&e));
                    }
                }
            }
            self.confirm(&mut s);
        };
        self.confirm(&mut s);
        if let End::Shutdown = end {
            self.close(&mut s, &mut events, &status_topic).await;
        }
        poller.abort();
        end
    }

    /// Clean shutdown: wait (bounded) for outstanding PUBACKs, say `offline`, disconnect.
    async fn close(
        &self,
        s: &mut Session,
        events: &mut mpsc::Receiver<Result<Event, ConnectionError>>,
        status_topic: &str,
    ) {
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        let offline = s
            .client
            .publish(status_topic, QoS::AtLeastOnce, true, "offline")
            .await;
        if offline.is_ok() {
            s.fifo.push_back(None);
            s.status_acked = false;
        }
        while s.in_flight > 0 || (offline.is_ok() && !s.status_acked) {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Some(Ok(ev))) => s.handle(ev),
                _ => break,
            }
            self.confirm(s);
        }
        if s.in_flight > 0 {
            tracing::warn!(
                unacknowledged = s.in_flight,
                "shutting down with publishes unacknowledged; they stay in the store and are sent again"
            );
        }
        let _ = s.client.disconnect().await;
        // Let the event loop write the DISCONNECT (it ends with an error once it has).
        let _ = tokio::time::timeout_at(deadline, async {
            while let Some(Ok(_)) = events.recv().await {}
        })
        .await;
    }

    fn confirm(&self, s: &mut Session) {
        if s.confirms.is_empty() {
            return;
        }
        let seqs = std::mem::take(&mut s.confirms);
        self.metrics
            .mqtt
            .delivered
            .fetch_add(seqs.len() as u64, Ordering::Relaxed);
        if let Err(e) = self.writer.confirm(SinkId::Mqtt, seqs) {
            tracing::error!(error = %e, "recording MQTT confirmations failed");
        }
    }

    async fn pending_count(&self) -> u64 {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.stats())
            .await
            .ok()
            .and_then(|r| r.ok())
            .and_then(|s| {
                s.sinks
                    .into_iter()
                    .find(|k| k.sink == SinkId::Mqtt.as_str())
            })
            .map_or(0, |k| k.pending)
    }

    /// A backlog worth reporting on (a long outage ended): progress is logged while it drains.
    async fn drain_progress(&self) -> Option<Drain> {
        let backlog = self.pending_count().await;
        (backlog >= DRAIN_REPORT_FROM).then(|| {
            tracing::info!(backlog, "draining the backlog to the broker");
            Drain {
                started: std::time::Instant::now(),
                backlog,
                delivered_before: self.metrics.mqtt.delivered.load(Ordering::Relaxed),
            }
        })
    }

    async fn read_pending(&self, after: Option<u64>) -> Result<Vec<(u64, Clocking)>, StoreError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.pending(SinkId::Mqtt, after, READ_AHEAD))
            .await
            .map_err(|e| StoreError::Io(e.to_string()))?
    }
}

/// Backlogs from this size on get progress lines.
const DRAIN_REPORT_FROM: u64 = 10_000;
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

struct Drain {
    started: std::time::Instant,
    backlog: u64,
    delivered_before: u64,
}

impl Drain {
    fn log(&self, remaining: u64, delivered_now: u64) {
        let done = delivered_now.saturating_sub(self.delivered_before);
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = done as f64 / secs;
        if remaining == 0 {
            tracing::info!(
                delivered = done,
                secs = secs.round() as u64,
                rate_per_s = rate.round() as u64,
                "backlog drained"
            );
        } else {
            tracing::info!(
                delivered = done,
                of = self.backlog,
                remaining,
                rate_per_s = rate.round() as u64,
                eta_s = (remaining as f64 / rate.max(1.0)).round() as u64,
                "draining the backlog"
            );
        }
    }
}

struct Session {
    client: AsyncClient,
    /// Store seqs (None for status messages) in the order they were handed to the client.
    fifo: VecDeque<Option<u64>>,
    by_pkid: HashMap<u16, Option<u64>>,
    in_flight: usize,
    cursor: Option<u64>,
    buffer: VecDeque<(u64, Clocking)>,
    confirms: Vec<u64>,
    status_acked: bool,
}

impl Session {
    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                if let Some(entry) = self.fifo.pop_front() {
                    self.by_pkid.insert(pkid, entry);
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => match self.by_pkid.remove(&ack.pkid) {
                Some(Some(seq)) => {
                    self.in_flight = self.in_flight.saturating_sub(1);
                    self.confirms.push(seq);
                }
                Some(None) => self.status_acked = true,
                None => tracing::debug!(pkid = ack.pkid, "PUBACK for an unknown packet id"),
            },
            _ => {}
        }
    }
}

fn lost(reason: String) -> End {
    End::Lost {
        reason,
        was_connected: true,
    }
}
