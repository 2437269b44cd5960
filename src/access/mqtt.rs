//! The access engine's own MQTT connection (client id `{mqtt.client_id}-access`, the TLS and
//! credentials of `[mqtt]`), beside the sink's delivery connection so that occupancy and access
//! checks never queue behind a backlog of clockings:
//!
//! - `{prefix}/{site}/zones/{zone}/occupancy`: retained, republished after every (re)connect and
//!   on change, at most once per `access.occupancy_interval_ms` per zone;
//! - `{prefix}/{site}/access/check`: requests answered on their `reply_to` topic (nothing is
//!   recorded); only the gateway that has the terminal configured answers;
//! - `{prefix}/{site}/access/mismatch`: a cloud status that differs from the local decision;
//! - with `access.site_sync`: `{prefix}/{site}/presence/{gateway}/{subject}`, retained, this
//!   gateway's latest transition per person. Every gateway subscribes to all of them and applies
//!   the newer ones (latest wins), so a gateway that was offline catches up from the retained
//!   messages as soon as it subscribes. A transition stays marked unsent in the store until its
//!   PUBACK, so one decided while the broker was unreachable (or just before a crash) is
//!   published at the next connect.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use rumqttc::{AsyncClient, Event, Outgoing, Packet, QoS};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

use super::engine::{parse_check, AccessEngine, Mismatch};
use crate::backoff::Backoff;
use crate::config::{Config, MqttConfig};
use crate::metrics::Metrics;
use crate::model::{ClockingId, PresenceTransition};
use crate::mqtt_link::{self, connect_options, describe, poll_events};
use crate::store::{Change, Store, TableWrite, WriterHandle};

/// Site-topic publishes awaiting their PUBACK at once.
const SYNC_WINDOW: usize = 64;
/// Occupancy payloads can list many people.
const MAX_PACKET: usize = 8 * 1024 * 1024;
/// With a presence TTL, occupancy changes without any clocking: look at least this often.
const TTL_RECHECK: Duration = Duration::from_secs(10);

/// A topic level for a name that may hold any character: letters, digits, `-`, `_` and `.` as
/// they are, every other byte as `%XX`, so that `/`, `+` and `#` never reach a topic.
pub fn topic_level(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub struct Topics {
    pub check: String,
    pub mismatch: String,
    prefix: String,
}

impl Topics {
    pub fn new(prefix: &str, site: &str) -> Topics {
        Topics {
            check: format!("{prefix}/{site}/access/check"),
            mismatch: format!("{prefix}/{site}/access/mismatch"),
            prefix: format!("{prefix}/{site}"),
        }
    }

    pub fn occupancy(&self, zone: &str) -> String {
        format!("{}/zones/{zone}/occupancy", self.prefix)
    }

    pub fn presence(&self, gateway: &str, subject: &str) -> String {
        format!(
            "{}/presence/{}/{}",
            self.prefix,
            topic_level(gateway),
            topic_level(subject)
        )
    }

    pub fn presence_filter(&self) -> String {
        format!("{}/presence/+/+", self.prefix)
    }

    fn presence_prefix(&self) -> String {
        format!("{}/presence/", self.prefix)
    }
}

pub struct AccessLink {
    cfg: MqttConfig,
    client_id: String,
    tls: Option<Arc<rustls::ClientConfig>>,
    config: Arc<Config>,
    engine: AccessEngine,
    store: Arc<Store>,
    writer: WriterHandle,
    metrics: Arc<Metrics>,
    topics: Topics,
}

/// What lives across sessions.
struct Feeds {
    sync: mpsc::UnboundedReceiver<String>,
    mismatches: mpsc::UnboundedReceiver<Mismatch>,
    changes: watch::Receiver<u64>,
}

impl AccessLink {
    pub fn new(
        config: Arc<Config>,
        engine: AccessEngine,
        store: Arc<Store>,
        writer: WriterHandle,
        metrics: Arc<Metrics>,
    ) -> Result<Option<AccessLink>, String> {
        let Some(cfg) = config.mqtt.clone() else {
            return Ok(None);
        };
        let tls = mqtt_link::tls(&cfg)?;
        Ok(Some(AccessLink {
            client_id: format!("{}-access", cfg.client_id),
            topics: Topics::new(&cfg.topic_prefix, &config.agent.site),
            cfg,
            tls,
            config,
            engine,
            store,
            writer,
            metrics,
        }))
    }

    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let (Some(sync), Some(mismatches)) =
            (self.engine.take_sync(), self.engine.take_mismatches())
        else {
            tracing::error!("the access engine's MQTT feeds were taken twice");
            return;
        };
        let mut feeds = Feeds {
            sync,
            mismatches,
            changes: self.engine.changes(),
        };
        let mut backoff = Backoff::new(
            Duration::from_millis(self.cfg.reconnect_min_ms),
            Duration::from_millis(self.cfg.reconnect_max_ms),
        );
        let mut warned = false;
        loop {
            if *shutdown.borrow() {
                return;
            }
            let end = self.session(&mut shutdown, &mut feeds, &mut backoff).await;
            self.metrics
                .access
                .mqtt_connected
                .store(false, Ordering::Relaxed);
            match end {
                None => return,
                Some(reason) => {
                    if !warned {
                        tracing::warn!(broker = %self.cfg.url, %reason, "access MQTT connection lost; occupancy and access checks over MQTT pause, the HTTP API keeps answering");
                        warned = true;
                    } else {
                        tracing::debug!(%reason, "access MQTT connection attempt failed");
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    /// One connection; None on shutdown, else why it ended.
    async fn session(
        &self,
        shutdown: &mut watch::Receiver<bool>,
        feeds: &mut Feeds,
        backoff: &mut Backoff,
    ) -> Option<String> {
        let mut o = connect_options(&self.cfg, &self.client_id, self.tls.as_ref());
        o.set_max_packet_size(MAX_PACKET, MAX_PACKET);
        o.set_inflight((SYNC_WINDOW as u16) * 4);
        let (client, eventloop) = AsyncClient::new(o, 1024);
        let (ev_tx, mut events) = mpsc::channel(1024);
        let poller = tokio::spawn(poll_events(eventloop, ev_tx));
        let first = tokio::select! {
            ev = events.recv() => ev,
            _ = shutdown.changed() => { poller.abort(); return None; }
        };
        match first {
            Some(Ok(Event::Incoming(Packet::ConnAck(ack))))
                if ack.code == rumqttc::ConnectReturnCode::Success => {}
            Some(Ok(Event::Incoming(Packet::ConnAck(ack)))) => {
                poller.abort();
                return Some(format!("broker refused the connection: {:?}", ack.code));
            }
            Some(Err(e)) => {
                poller.abort();
                return Some(describe(&e));
            }
            _ => {
                poller.abort();
                return Some("no CONNACK".into());
            }
        }
        backoff.reset();
        tracing::debug!(client_id = %self.client_id, "access MQTT connection up");
        let mut s = Session {
            client,
            fifo: VecDeque::new(),
            by_pkid: HashMap::new(),
            sync_in_flight: 0,
            queue: VecDeque::new(),
            queued: HashSet::new(),
            acks: Vec::new(),
            remote: Vec::new(),
            published: HashMap::new(),
            dirty: true,
            due: true,
            last_compute: Instant::now(),
        };
        let mut subscriptions = vec![rumqttc::SubscribeFilter::new(
            self.topics.check.clone(),
            QoS::AtLeastOnce,
        )];
        if self.engine.site_sync() {
            subscriptions.push(rumqttc::SubscribeFilter::new(
                self.topics.presence_filter(),
                QoS::AtLeastOnce,
            ));
            let store = self.store.clone();
            match tokio::task::spawn_blocking(move || store.unsent_presence()).await {
                Ok(Ok(unsent)) => {
                    if !unsent.is_empty() {
                        tracing::info!(
                            transitions = unsent.len(),
                            "publishing presence transitions the site has not acknowledged yet"
                        );
                    }
                    for (subject, _) in unsent {
                        s.enqueue(subject);
                    }
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "reading unsent presence transitions failed")
                }
                Err(_) => {}
            }
        }
        if s.client.subscribe_many(subscriptions).await.is_err() {
            poller.abort();
            return Some("event loop ended".into());
        }
        let mut tick = tokio::time::interval(self.config.access.occupancy_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let end = loop {
            if let Err(e) = self.publish_occupancy(&mut s).await {
                break Some(e);
            }
            if let Err(e) = self.fill_sync_window(&mut s).await {
                break Some(e);
            }
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(Ok(ev)) => {
                        if let Err(e) = self.handle(&mut s, ev).await { break Some(e); }
                    }
                    Some(Err(e)) => break Some(describe(&e)),
                    None => break Some("event loop ended".into()),
                },
                Some(subject) = feeds.sync.recv() => s.enqueue(subject),
                Some(m) = feeds.mismatches.recv() => {
                    let payload = m.to_json().to_string();
                    if let Err(e) = s.publish(&self.topics.mismatch, false, payload.into_bytes(), None).await {
                        break Some(e);
                    }
                }
                r = feeds.changes.changed() => {
                    if r.is_err() { break None; }
                    s.dirty = true;
                }
                _ = tick.tick() => s.due = true,
                _ = shutdown.changed() => break None,
            }
            while let Ok(ev) = events.try_recv() {
                match ev {
                    Ok(ev) => {
                        if let Err(e) = self.handle(&mut s, ev).await {
                            return Some(e);
                        }
                    }
                    Err(e) => return Some(describe(&e)),
                }
            }
            self.flush(&mut s).await;
        };
        self.flush(&mut s).await;
        if end.is_none() {
            let _ = s.client.disconnect().await;
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while let Some(Ok(_)) = events.recv().await {}
            })
            .await;
        }
        poller.abort();
        end
    }

    async fn handle(&self, s: &mut Session, ev: Event) -> Result<(), String> {
        match ev {
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                if let Some(entry) = s.fifo.pop_front() {
                    s.by_pkid.insert(pkid, entry);
                }
            }
            Event::Incoming(Packet::SubAck(_)) => {
                self.metrics
                    .access
                    .mqtt_connected
                    .store(true, Ordering::Relaxed);
                tracing::info!("access MQTT subscriptions in place");
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                if let Some(Some(sent)) = s.by_pkid.remove(&ack.pkid) {
                    s.sync_in_flight = s.sync_in_flight.saturating_sub(1);
                    s.acks.push(sent);
                }
            }
            Event::Incoming(Packet::Publish(p)) => {
                if p.topic == self.topics.check {
                    if let Some((topic, payload)) = self.answer(&p.payload) {
                        s.publish(&topic, false, payload, None).await?;
                    }
                } else if let Some(rest) = p.topic.strip_prefix(&self.topics.presence_prefix()) {
                    let own = format!("{}/", topic_level(self.engine.gateway()));
                    if rest.starts_with(&own) || p.payload.is_empty() {
                        return Ok(());
                    }
                    self.metrics
                        .access
                        .sync_received
                        .fetch_add(1, Ordering::Relaxed);
                    match PresenceTransition::parse(&p.payload) {
                        Ok(t) => s.remote.push(t),
                        Err(e) => {
                            tracing::warn!(topic = %p.topic, error = %e, "ignoring a presence transition that is not valid")
                        }
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// The reply to an access check request: (reply topic, payload). None when there is nowhere
    /// to answer, or the terminal belongs to another gateway of the site.
    fn answer(&self, payload: &[u8]) -> Option<(String, Vec<u8>)> {
        let v: Value = match serde_json::from_slice(payload) {
            Ok(v) => v,
            Err(e) => {
                tracing::info!(error = %e, "access check request is not JSON; no reply_to to answer on");
                return None;
            }
        };
        let reply_to = v["reply_to"]
            .as_str()
            .filter(|t| !t.is_empty() && !t.contains(['+', '#']))?
            .to_owned();
        let terminal = v["terminal"].as_str();
        if terminal.is_some_and(|t| self.config.terminal(t).is_none()) {
            tracing::debug!(terminal, "access check for a terminal of another gateway");
            return None;
        }
        let correlation_id = v.get("correlation_id").cloned().unwrap_or(Value::Null);
        let mut answer = match parse_check(&self.config, &v, &["reply_to", "correlation_id"]) {
            Ok(req) => self.engine.check(&req),
            Err(e) => json!({"error": {"code": e.code, "message": e.message, "field": e.field}}),
        };
        answer["correlation_id"] = correlation_id;
        Some((reply_to, answer.to_string().into_bytes()))
    }

    /// Publish the zones whose occupancy changed (all of them after a connect), at most once per
    /// interval.
    async fn publish_occupancy(&self, s: &mut Session) -> Result<(), String> {
        if !s.due || self.engine.rules().zones.is_empty() {
            return Ok(());
        }
        let ttl = self.engine.rules().presence_ttl.is_some();
        let expiring = ttl && s.last_compute.elapsed() >= TTL_RECHECK;
        if !(s.dirty || expiring) {
            return Ok(());
        }
        s.due = false;
        s.dirty = false;
        s.last_compute = Instant::now();
        for mut doc in self.engine.all_zones(Utc::now()) {
            let zone = doc["zone"].as_str().unwrap_or_default().to_owned();
            let stamp = doc
                .as_object_mut()
                .and_then(|o| o.remove("updated_at"))
                .unwrap_or(Value::Null);
            if s.published.get(&zone) == Some(&doc) {
                continue;
            }
            let mut payload = doc.clone();
            payload["updated_at"] = stamp;
            s.publish(
                &self.topics.occupancy(&zone),
                true,
                payload.to_string().into_bytes(),
                None,
            )
            .await?;
            s.published.insert(zone, doc);
        }
        Ok(())
    }

    async fn fill_sync_window(&self, s: &mut Session) -> Result<(), String> {
        while s.sync_in_flight < SYNC_WINDOW {
            let Some(subject) = s.queue.pop_front() else {
                break;
            };
            s.queued.remove(&subject);
            // Superseded by another gateway's newer transition: nothing of ours to publish.
            let Some((t, id)) = self.engine.own_transition(&subject) else {
                continue;
            };
            let topic = self.topics.presence(self.engine.gateway(), &subject);
            s.publish(&topic, true, t.to_json(), Some((subject, id)))
                .await?;
            s.sync_in_flight += 1;
        }
        Ok(())
    }

    /// Apply received transitions and record acknowledged ones.
    async fn flush(&self, s: &mut Session) {
        if !s.remote.is_empty() {
            let batch = std::mem::take(&mut s.remote);
            if let Err(e) = self.writer.change(Change::RemotePresence(batch)).await {
                tracing::error!(error = %e, "storing presence from the site failed; it is received again at the next connect");
            }
        }
        if !s.acks.is_empty() {
            let rows = s
                .acks
                .drain(..)
                .map(|(subject, id)| TableWrite::Sent {
                    subject,
                    clocking: id.0,
                })
                .collect();
            let writer = self.writer.clone();
            tokio::spawn(async move {
                if let Err(e) = writer.change(Change::Tables(rows)).await {
                    tracing::warn!(error = %e, "recording acknowledged presence transitions failed; they are sent again");
                }
            });
        }
    }
}

struct Session {
    client: AsyncClient,
    /// Per publish, in the order handed to the client: the site transition it carries.
    fifo: VecDeque<Option<(String, ClockingId)>>,
    by_pkid: HashMap<u16, Option<(String, ClockingId)>>,
    sync_in_flight: usize,
    /// Subjects whose transition is to be published, without repeats.
    queue: VecDeque<String>,
    queued: HashSet<String>,
    acks: Vec<(String, ClockingId)>,
    remote: Vec<PresenceTransition>,
    /// The last occupancy published per zone (without its time stamp).
    published: HashMap<String, Value>,
    dirty: bool,
    due: bool,
    last_compute: Instant,
}

impl Session {
    fn enqueue(&mut self, subject: String) {
        if self.queued.insert(subject.clone()) {
            self.queue.push_back(subject);
        }
    }

    async fn publish(
        &mut self,
        topic: &str,
        retain: bool,
        payload: Vec<u8>,
        sync: Option<(String, ClockingId)>,
    ) -> Result<(), String> {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .await
            .map_err(|_| "event loop ended".to_owned())?;
        self.fifo.push_back(sync);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_safe_topic_levels() {
        assert_eq!(topic_level("p:E-1.a_b"), "p%3AE-1.a_b");
        assert_eq!(topic_level("b:a/b+c#d é"), "b%3Aa%2Fb%2Bc%23d%20%C3%A9");
        let t = Topics::new("badgegate", "plant-1");
        assert_eq!(
            t.presence("gw/1", "p:7"),
            "badgegate/plant-1/presence/gw%2F1/p%3A7"
        );
        assert_eq!(
            t.occupancy("production"),
            "badgegate/plant-1/zones/production/occupancy"
        );
    }
}
