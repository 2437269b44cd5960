//! A minimal in-process MQTT 3.1.1 broker for `badgegate demo`.
//!
//! # Why this exists
//!
//! The demo has to run on a machine with nothing installed: no Mosquitto, no
//! container, no separately started broker. The gateway already speaks MQTT
//! through `rumqttc`, whose packet codec (`rumqttc::mqttbytes::v4`) is public,
//! so a small broker on top of that codec costs a few hundred lines and no new
//! dependencies. Embedding `rumqttd` instead would pull a large dependency tree
//! (its own config system, metrics, extra TLS/websocket layers, ...) into the
//! gateway binary for a feature that only the demo uses.
//!
//! # What it does
//!
//! * CONNECT is always accepted (any client id, any credentials); sessions are
//!   always clean (`session_present = false`). A CONNECT with an empty client
//!   id gets a generated one. A second connection with the same client id
//!   takes over: the older connection is closed (and its last will published).
//! * PUBLISH with QoS 0 and 1. A QoS 1 PUBLISH is acknowledged (PUBACK, same
//!   packet id) only after it has been routed into the outgoing queues of all
//!   matching subscribers. QoS 2 is answered minimally (PUBREC, then PUBCOMP on
//!   PUBREL) and delivered like QoS 1; there is no duplicate detection.
//! * Retained messages, one per topic; an empty retained payload clears it.
//!   They are sent (with the RETAIN flag set) right after the SUBACK of a
//!   matching subscription. Live deliveries always carry RETAIN = 0.
//! * SUBSCRIBE with `+` and `#` wildcards; granted QoS = min(requested, 1).
//!   Deliveries go out at min(publish QoS, granted QoS); a client whose filters
//!   overlap receives a message once, at the highest granted QoS. QoS 1
//!   deliveries get per-connection packet ids (1..=65535, wrapping, skipping
//!   0). PUBACKs from subscribers are accepted and ignored: no redelivery.
//! * UNSUBSCRIBE/UNSUBACK, PINGREQ/PINGRESP, DISCONNECT (no will).
//! * Last will: published (with its retain flag) whenever a connection ends
//!   without DISCONNECT (socket closed or broken, malformed packet, keep-alive
//!   expiry after 1.5 × keep_alive, taken over by the same client id, dropped
//!   for being too slow), but never because of [`Broker::shutdown`].
//! * Each connection has a writer with a bounded queue. Routing never waits
//!   for a subscriber: if a subscriber's queue is full, that subscriber's
//!   connection is dropped (and logged) instead of blocking the publisher.
//! * Malformed input closes only the offending connection. Packets larger
//!   than 1 MiB are refused the same way.
//!
//! Not implemented, on purpose: persistent sessions, QoS 1 redelivery,
//! authentication, TLS, `$SYS` topics, MQTT 5.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, LastWill, Packet, PubAck, PubComp, PubRec, Publish, SubAck,
    Subscribe, SubscribeReasonCode, UnsubAck, Unsubscribe,
};
use rumqttc::mqttbytes::{self, has_wildcards, valid_filter, Protocol, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

/// Largest packet (remaining length) accepted from a client.
const MAX_PACKET_SIZE: usize = 1024 * 1024;
/// Largest packet we send. Everything we send was received within
/// `MAX_PACKET_SIZE`, plus a few bytes of fixed header and packet id.
const MAX_OUTGOING_PACKET_SIZE: usize = MAX_PACKET_SIZE + 64;
/// Packets that may wait in one connection's outgoing queue. A subscriber
/// that falls further behind than this (plus the kernel's socket buffers) is
/// disconnected.
const OUTGOING_QUEUE: usize = 1024;
/// How long a freshly accepted connection may take to send CONNECT.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The writer coalesces queued packets into writes of about this size.
const WRITE_BATCH_BYTES: usize = 64 * 1024;
/// Upper bound for one read-buffer reservation.
const READ_CHUNK: usize = 16 * 1024;
/// Pause after a failed `accept` (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A running broker. Dropping it also stops it (without waiting);
/// [`Broker::shutdown`] stops it and waits until every connection is closed.
#[derive(Debug)]
pub struct Broker {
    local_addr: SocketAddr,
    shutdown_tx: watch::Sender<bool>,
    accept_task: JoinHandle<()>,
}

impl Broker {
    /// Bind on `addr` (e.g. "127.0.0.1:0") and start serving in background tokio tasks.
    pub async fn start(addr: SocketAddr) -> io::Result<Broker> {
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let shared = Arc::new(Shared::default());
        let accept_task = tokio::spawn(accept_loop(listener, shared, shutdown_rx));
        tracing::info!(%local_addr, "demo MQTT broker listening");
        Ok(Broker {
            local_addr,
            shutdown_tx,
            accept_task,
        })
    }

    /// The address the broker listens on (with the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stop accepting, drop every client connection (clients see the TCP connection close) and free the port.
    ///
    /// Last wills are not published for connections closed this way.
    pub async fn shutdown(self) {
        // Fails only if the accept loop is already gone, which is fine.
        let _ = self.shutdown_tx.send(true);
        if let Err(error) = self.accept_task.await {
            tracing::error!(%error, "demo MQTT broker task failed");
        }
        tracing::info!(local_addr = %self.local_addr, "demo MQTT broker stopped");
    }
}

/// Accepts connections until shutdown, then closes all of them.
async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown_rx: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            // Either `shutdown()` was called or the `Broker` was dropped.
            _ = shutdown_rx.changed() => break,
            Some(joined) = connections.join_next() => {
                if let Err(error) = joined {
                    tracing::error!(%error, "MQTT connection task failed");
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    connections.spawn(serve_connection(stream, peer, Arc::clone(&shared)));
                }
                Err(error) => {
                    tracing::warn!(%error, "accepting an MQTT connection failed");
                    tokio::select! {
                        biased;
                        _ = shutdown_rx.changed() => break,
                        _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                    }
                }
            },
        }
    }
    // Set before any connection is torn down: a connection that ends from
    // here on must not publish its will.
    shared.lock().shutting_down = true;
    drop(listener);
    // Aborting drops each connection's socket halves, which closes them.
    connections.shutdown().await;
    let mut state = shared.lock();
    state.clients.clear();
    state.retained.clear();
}

/// Broker state shared by all connections.
#[derive(Default)]
struct Shared {
    state: Mutex<State>,
}

impl Shared {
    /// Never held across an `.await`.
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the maps consistent enough
        // for a demo broker; keep serving.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a connected client, closing an older connection that used the same client id.
    fn register(
        self: &Arc<Self>,
        requested_id: String,
        tx: mpsc::Sender<Packet>,
        kick: oneshot::Sender<KickReason>,
    ) -> Registration {
        let mut state = self.lock();
        state.next_conn_id += 1;
        let conn_id = state.next_conn_id;
        let client_id = if requested_id.is_empty() {
            format!("badgegate-demo-{conn_id}")
        } else {
            requested_id
        };
        let client = Client {
            conn_id,
            tx,
            subscriptions: Vec::new(),
            kick,
        };
        if let Some(old) = state.clients.insert(client_id.clone(), client) {
            tracing::info!(%client_id, "client id reused by a new connection; closing the old one");
            // The old connection may already be ending on its own.
            let _ = old.kick.send(KickReason::TakenOver);
        }
        Registration {
            shared: Arc::clone(self),
            client_id,
            conn_id,
        }
    }
}

#[derive(Default)]
struct State {
    /// Connected clients by client id.
    clients: HashMap<String, Client>,
    /// Retained messages by topic.
    retained: BTreeMap<String, Retained>,
    next_conn_id: u64,
    shutting_down: bool,
}

struct Client {
    /// Tells this connection apart from a later one with the same client id.
    conn_id: u64,
    /// The connection's outgoing queue; the writer assigns packet ids.
    tx: mpsc::Sender<Packet>,
    /// Topic filters with their granted QoS (0 or 1).
    subscriptions: Vec<(String, QoS)>,
    /// Closes the connection when the client is removed from `clients` by someone else.
    kick: oneshot::Sender<KickReason>,
}

struct Retained {
    qos: QoS,
    payload: Bytes,
}

impl State {
    /// Stores/clears the retained message if asked to, and queues the message
    /// for every matching subscriber. Subscribers whose queue is full are
    /// disconnected rather than waited for.
    fn publish(&mut self, topic: &str, qos: QoS, retain: bool, payload: &Bytes) {
        if retain {
            if payload.is_empty() {
                self.retained.remove(topic);
            } else {
                let retained = Retained {
                    qos,
                    payload: payload.clone(),
                };
                self.retained.insert(topic.to_owned(), retained);
            }
        }

        let mut too_slow = Vec::new();
        for (client_id, client) in &self.clients {
            let Some(granted) = best_match(&client.subscriptions, topic) else {
                continue;
            };
            let delivery = outgoing_publish(topic, min_qos(qos, granted), false, payload.clone());
            match client.tx.try_send(Packet::Publish(delivery)) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => too_slow.push(client_id.clone()),
                // That connection is ending; it deregisters itself.
                Err(TrySendError::Closed(_)) => {}
            }
        }
        for client_id in too_slow {
            if let Some(client) = self.clients.remove(&client_id) {
                tracing::warn!(
                    %client_id,
                    queued = OUTGOING_QUEUE,
                    "subscriber is not keeping up (outgoing queue full); dropping its connection"
                );
                let _ = client.kick.send(KickReason::TooSlow);
            }
        }
    }
}

/// Removes the client entry when its connection task ends (normally, by
/// panic, or aborted at shutdown), unless a newer connection took it over.
struct Registration {
    shared: Arc<Shared>,
    client_id: String,
    conn_id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        if state
            .clients
            .get(&self.client_id)
            .is_some_and(|client| client.conn_id == self.conn_id)
        {
            state.clients.remove(&self.client_id);
        }
    }
}

/// Why another party closed a connection.
#[derive(Debug, Clone, Copy, thiserror::Error)]
enum KickReason {
    #[error("another connection took over the client id")]
    TakenOver,
    #[error("outgoing queue full (slow subscriber)")]
    TooSlow,
    #[error("removed from the broker")]
    Removed,
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
enum End {
    #[error("client sent DISCONNECT")]
    CleanDisconnect,
    #[error("client closed the connection")]
    PeerClosed,
    #[error("read failed: {0}")]
    ReadFailed(io::Error),
    #[error("write failed: {0}")]
    WriteFailed(io::Error),
    #[error("protocol violation: {0}")]
    ProtocolViolation(String),
    #[error("keep-alive expired")]
    KeepAliveExpired,
    #[error("{0}")]
    Kicked(KickReason),
    #[error("outgoing queue closed")]
    QueueClosed,
}

#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("connection closed by peer")]
    Closed,
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("malformed packet: {0}")]
    Malformed(mqttbytes::Error),
}

/// Runs one client connection from CONNECT to close.
async fn serve_connection(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    // Only a latency optimisation; failing to set it is harmless.
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let mut buf = BytesMut::with_capacity(READ_CHUNK);

    let connect = match tokio::time::timeout(CONNECT_TIMEOUT, read_packet(&mut rd, &mut buf)).await
    {
        Ok(Ok(Packet::Connect(connect))) => connect,
        Ok(Ok(other)) => {
            tracing::debug!(%peer, packet = ?other, "first packet is not CONNECT; closing");
            return;
        }
        Ok(Err(error)) => {
            tracing::debug!(%peer, %error, "no valid CONNECT; closing");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "no CONNECT in time; closing");
            return;
        }
    };
    if connect.protocol != Protocol::V4 {
        tracing::debug!(%peer, "refusing a client that does not speak MQTT 3.1.1");
        refuse(&mut wr, ConnectReturnCode::RefusedProtocolVersion).await;
        return;
    }
    if connect.client_id.is_empty() && !connect.clean_session {
        refuse(&mut wr, ConnectReturnCode::BadClientId).await;
        return;
    }

    let (tx, rx) = mpsc::channel(OUTGOING_QUEUE);
    let (kick_tx, kick_rx) = oneshot::channel();
    // CONNACK is queued before the client is registered, so it precedes anything routed to it.
    if tx
        .try_send(Packet::ConnAck(ConnAck::new(
            ConnectReturnCode::Success,
            false,
        )))
        .is_err()
    {
        return;
    }
    let registration = shared.register(connect.client_id, tx.clone(), kick_tx);
    tracing::debug!(%peer, client_id = %registration.client_id, "MQTT client connected");

    let keep_alive = (connect.keep_alive > 0)
        .then(|| Duration::from_millis(u64::from(connect.keep_alive) * 1500));
    let session = Session {
        shared: &shared,
        client_id: &registration.client_id,
        conn_id: registration.conn_id,
        tx,
    };
    // Reader, writer and kick signal run in this one task, so aborting the
    // task (broker shutdown) closes the socket. The socket halves are only
    // borrowed: they close when this function returns, after the will has
    // been routed.
    let end = tokio::select! {
        end = session.read_loop(&mut rd, &mut buf, keep_alive) => end,
        written = write_loop(&mut wr, rx) => match written {
            Ok(()) => End::QueueClosed,
            Err(error) => End::WriteFailed(error),
        },
        kicked = kick_rx => End::Kicked(kicked.unwrap_or(KickReason::Removed)),
    };

    // Deregister first: the will goes to the remaining clients.
    let client_id = registration.client_id.clone();
    drop(registration);
    match &end {
        End::CleanDisconnect | End::PeerClosed => {
            tracing::debug!(%peer, %client_id, reason = %end, "MQTT client disconnected");
        }
        _ => tracing::info!(%peer, %client_id, reason = %end, "MQTT connection closed"),
    }
    if !matches!(end, End::CleanDisconnect) {
        if let Some(will) = connect.last_will {
            publish_will(&shared, &client_id, will);
        }
    }
}

fn publish_will(shared: &Shared, client_id: &str, will: LastWill) {
    let mut state = shared.lock();
    if state.shutting_down {
        return;
    }
    tracing::debug!(%client_id, topic = %will.topic, "publishing last will");
    state.publish(&will.topic, will.qos, will.retain, &will.message);
}

/// Answers a CONNECT that we refuse; the connection is closed afterwards.
async fn refuse(wr: &mut OwnedWriteHalf, code: ConnectReturnCode) {
    let mut buf = BytesMut::new();
    if Packet::ConnAck(ConnAck::new(code, false))
        .write(&mut buf, MAX_OUTGOING_PACKET_SIZE)
        .is_ok()
    {
        // The connection is closed right after; nothing to do on failure.
        let _ = wr.write_all(&buf).await;
    }
}

/// One connected client, as seen by its reader.
struct Session<'a> {
    shared: &'a Shared,
    client_id: &'a str,
    conn_id: u64,
    tx: mpsc::Sender<Packet>,
}

impl Session<'_> {
    async fn read_loop(
        &self,
        rd: &mut OwnedReadHalf,
        buf: &mut BytesMut,
        keep_alive: Option<Duration>,
    ) -> End {
        loop {
            let read = match keep_alive {
                Some(limit) => match tokio::time::timeout(limit, read_packet(rd, buf)).await {
                    Ok(read) => read,
                    Err(_) => return End::KeepAliveExpired,
                },
                None => read_packet(rd, buf).await,
            };
            let packet = match read {
                Ok(packet) => packet,
                Err(ReadError::Closed) => return End::PeerClosed,
                Err(ReadError::Io(error)) => return End::ReadFailed(error),
                Err(ReadError::Malformed(error)) => {
                    return End::ProtocolViolation(error.to_string())
                }
            };
            if let Err(end) = self.process(packet).await {
                return end;
            }
        }
    }

    async fn process(&self, packet: Packet) -> Result<(), End> {
        match packet {
            Packet::Publish(publish) => {
                if publish.topic.is_empty() || has_wildcards(&publish.topic) {
                    return Err(End::ProtocolViolation(format!(
                        "invalid topic name {:?} in PUBLISH",
                        publish.topic
                    )));
                }
                // Routed before it is acknowledged.
                self.shared.lock().publish(
                    &publish.topic,
                    publish.qos,
                    publish.retain,
                    &publish.payload,
                );
                match publish.qos {
                    QoS::AtMostOnce => Ok(()),
                    QoS::AtLeastOnce => self.reply(Packet::PubAck(PubAck::new(publish.pkid))).await,
                    QoS::ExactlyOnce => self.reply(Packet::PubRec(PubRec::new(publish.pkid))).await,
                }
            }
            Packet::PubRel(pubrel) => self.reply(Packet::PubComp(PubComp::new(pubrel.pkid))).await,
            // We never redeliver and never send QoS 2, so acknowledgements
            // from the client need no bookkeeping.
            Packet::PubAck(_) | Packet::PubRec(_) | Packet::PubComp(_) => Ok(()),
            Packet::Subscribe(subscribe) => {
                for packet in self.subscribe(subscribe) {
                    self.reply(packet).await?;
                }
                Ok(())
            }
            Packet::Unsubscribe(unsubscribe) => {
                let pkid = unsubscribe.pkid;
                self.unsubscribe(unsubscribe);
                self.reply(Packet::UnsubAck(UnsubAck::new(pkid))).await
            }
            Packet::PingReq => self.reply(Packet::PingResp).await,
            Packet::Disconnect => Err(End::CleanDisconnect),
            Packet::Connect(_) => Err(End::ProtocolViolation("second CONNECT".to_owned())),
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => Err(
                End::ProtocolViolation(format!("server-only packet from client: {packet:?}")),
            ),
        }
    }

    /// Queues a response for this client, waiting if its queue is full (the
    /// client then stops being read, which is TCP's usual back-pressure).
    async fn reply(&self, packet: Packet) -> Result<(), End> {
        self.tx.send(packet).await.map_err(|_| End::QueueClosed)
    }

    /// Records the subscriptions; returns the SUBACK followed by the matching retained messages.
    fn subscribe(&self, subscribe: Subscribe) -> Vec<Packet> {
        let mut return_codes = Vec::with_capacity(subscribe.filters.len());
        let mut granted = Vec::with_capacity(subscribe.filters.len());
        let mut retained = Vec::new();
        {
            let mut guard = self.shared.lock();
            let state = &mut *guard;
            let Some(client) = state
                .clients
                .get_mut(self.client_id)
                .filter(|client| client.conn_id == self.conn_id)
            else {
                // Kicked meanwhile; the kick signal ends this connection.
                return Vec::new();
            };
            for filter in subscribe.filters {
                if valid_filter(&filter.path) {
                    let qos = min_qos(filter.qos, QoS::AtLeastOnce);
                    // A subscription with an identical filter replaces the old one.
                    client
                        .subscriptions
                        .retain(|(path, _)| *path != filter.path);
                    client.subscriptions.push((filter.path.clone(), qos));
                    granted.push((filter.path, qos));
                    return_codes.push(SubscribeReasonCode::Success(qos));
                } else {
                    tracing::debug!(client_id = %self.client_id, filter = %filter.path, "invalid topic filter");
                    return_codes.push(SubscribeReasonCode::Failure);
                }
            }
            for (topic, message) in &state.retained {
                if let Some(qos) = best_match(&granted, topic) {
                    retained.push(Packet::Publish(outgoing_publish(
                        topic,
                        min_qos(message.qos, qos),
                        true,
                        message.payload.clone(),
                    )));
                }
            }
        }
        let mut replies = Vec::with_capacity(1 + retained.len());
        replies.push(Packet::SubAck(SubAck::new(subscribe.pkid, return_codes)));
        replies.extend(retained);
        replies
    }

    fn unsubscribe(&self, unsubscribe: Unsubscribe) {
        let mut state = self.shared.lock();
        if let Some(client) = state
            .clients
            .get_mut(self.client_id)
            .filter(|client| client.conn_id == self.conn_id)
        {
            client
                .subscriptions
                .retain(|(path, _)| !unsubscribe.topics.contains(path));
        }
    }
}

/// Reads one complete packet, buffering partial input in `buf`.
///
/// Not cancellation-safe with respect to the connection: a cancelled read
/// leaves a partial packet in `buf`, so the connection must be closed then
/// (which is what every caller does).
async fn read_packet(rd: &mut OwnedReadHalf, buf: &mut BytesMut) -> Result<Packet, ReadError> {
    loop {
        match Packet::read(buf, MAX_PACKET_SIZE) {
            Ok(packet) => return Ok(packet),
            Err(mqttbytes::Error::InsufficientBytes(missing)) => {
                // `missing` is bounded by MAX_PACKET_SIZE (checked by Packet::read).
                buf.reserve(missing.min(READ_CHUNK));
                if rd.read_buf(buf).await? == 0 {
                    return Err(ReadError::Closed);
                }
            }
            Err(error) => return Err(ReadError::Malformed(error)),
        }
    }
}

/// Writes queued packets to the socket, assigning packet ids to QoS > 0
/// publishes. Returns when the queue closes or a write fails.
async fn write_loop(wr: &mut OwnedWriteHalf, mut rx: mpsc::Receiver<Packet>) -> io::Result<()> {
    let mut buf = BytesMut::with_capacity(WRITE_BATCH_BYTES);
    let mut last_pkid = 0;
    while let Some(packet) = rx.recv().await {
        encode(packet, &mut buf, &mut last_pkid);
        while buf.len() < WRITE_BATCH_BYTES {
            match rx.try_recv() {
                Ok(packet) => encode(packet, &mut buf, &mut last_pkid),
                Err(_) => break,
            }
        }
        wr.write_all(&buf).await?;
        buf.clear();
    }
    Ok(())
}

fn encode(mut packet: Packet, buf: &mut BytesMut, last_pkid: &mut u16) {
    if let Packet::Publish(publish) = &mut packet {
        if publish.qos != QoS::AtMostOnce {
            publish.pkid = next_pkid(last_pkid);
        }
    }
    let start = buf.len();
    if let Err(error) = packet.write(buf, MAX_OUTGOING_PACKET_SIZE) {
        // Cannot happen for packets built from accepted input; skip it rather
        // than send half a packet.
        buf.truncate(start);
        tracing::warn!(%error, "dropping an outgoing packet that cannot be encoded");
    }
}

/// Next packet id after `last`: 1..=65535, wrapping, never 0.
fn next_pkid(last: &mut u16) -> u16 {
    *last = if *last == u16::MAX { 1 } else { *last + 1 };
    *last
}

fn outgoing_publish(topic: &str, qos: QoS, retain: bool, payload: Bytes) -> Publish {
    let mut publish = Publish::from_bytes(topic, qos, payload);
    publish.retain = retain;
    publish
}

fn min_qos(a: QoS, b: QoS) -> QoS {
    if (a as u8) <= (b as u8) {
        a
    } else {
        b
    }
}

/// Highest QoS among the filters that match `topic`, if any match.
fn best_match(filters: &[(String, QoS)], topic: &str) -> Option<QoS> {
    filters
        .iter()
        .filter(|(filter, _)| topic_matches(topic, filter))
        .map(|(_, qos)| *qos)
        .max_by_key(|qos| *qos as u8)
}

/// MQTT 3.1.1 topic matching (section 4.7) of a topic name against a valid filter.
fn topic_matches(topic: &str, filter: &str) -> bool {
    // Filters starting with a wildcard do not match topics starting with '$'.
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut levels = topic.split('/');
    for pattern in filter.split('/') {
        if pattern == "#" {
            // Also matches the parent level: "a/#" matches "a".
            return true;
        }
        match levels.next() {
            Some(level) if pattern == "+" || pattern == level => {}
            _ => return false,
        }
    }
    levels.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing};
    use tokio::net::TcpSocket;
    use tokio::time::timeout;

    /// Bound for any single wait in these tests.
    const WAIT: Duration = Duration::from_secs(20);

    async fn start_broker() -> Broker {
        let addr: SocketAddr = "127.0.0.1:0".parse().expect("valid address");
        Broker::start(addr).await.expect("broker starts")
    }

    fn options(broker: &Broker, client_id: &str) -> MqttOptions {
        let mut options = MqttOptions::new(client_id, "127.0.0.1", broker.local_addr().port());
        options.set_keep_alive(Duration::from_secs(30));
        options
    }

    /// A rumqttc client whose event loop runs in a task and forwards every
    /// event; it stops at the first error (it never reconnects).
    struct TestClient {
        client: AsyncClient,
        events: mpsc::UnboundedReceiver<Result<Event, ConnectionError>>,
        task: JoinHandle<()>,
    }

    impl Drop for TestClient {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl TestClient {
        async fn connect(options: MqttOptions) -> TestClient {
            let (client, mut eventloop) = AsyncClient::new(options, 100);
            let (events_tx, events) = mpsc::unbounded_channel();
            let task = tokio::spawn(async move {
                loop {
                    let event = eventloop.poll().await;
                    let failed = event.is_err();
                    if events_tx.send(event).is_err() || failed {
                        break;
                    }
                }
            });
            let mut client = TestClient {
                client,
                events,
                task,
            };
            client
                .wait_for("ConnAck", |event| {
                    matches!(event, Event::Incoming(Packet::ConnAck(_))).then_some(())
                })
                .await;
            client
        }

        /// Waits for the first event for which `pick` returns `Some`.
        async fn wait_for<T>(
            &mut self,
            what: &str,
            mut pick: impl FnMut(&Event) -> Option<T>,
        ) -> T {
            let wait = async {
                loop {
                    match self.events.recv().await {
                        Some(Ok(event)) => {
                            if let Some(found) = pick(&event) {
                                return found;
                            }
                        }
                        Some(Err(error)) => panic!("connection failed waiting for {what}: {error}"),
                        None => panic!("event loop ended waiting for {what}"),
                    }
                }
            };
            timeout(WAIT, wait)
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        }

        async fn next_publish(&mut self) -> Publish {
            self.wait_for("a PUBLISH", |event| match event {
                Event::Incoming(Packet::Publish(publish)) => Some(publish.clone()),
                _ => None,
            })
            .await
        }

        async fn puback(&mut self) -> u16 {
            self.wait_for("a PUBACK", |event| match event {
                Event::Incoming(Packet::PubAck(ack)) => Some(ack.pkid),
                _ => None,
            })
            .await
        }

        async fn subscribe(&mut self, filter: &str, qos: QoS) {
            self.client
                .subscribe(filter, qos)
                .await
                .expect("subscribe request queued");
            let return_codes = self
                .wait_for("SubAck", |event| match event {
                    Event::Incoming(Packet::SubAck(ack)) => Some(ack.return_codes.clone()),
                    _ => None,
                })
                .await;
            assert_eq!(
                return_codes,
                vec![SubscribeReasonCode::Success(min_qos(qos, QoS::AtLeastOnce))]
            );
        }

        async fn publish(&self, topic: &str, qos: QoS, retain: bool, payload: impl Into<Vec<u8>>) {
            self.client
                .publish(topic, qos, retain, payload)
                .await
                .expect("publish request queued");
        }

        /// Waits until the event loop reports an error (e.g. the broker closed the connection).
        async fn connection_error(&mut self) -> ConnectionError {
            let wait = async {
                loop {
                    match self.events.recv().await {
                        Some(Ok(_)) => {}
                        Some(Err(error)) => return error,
                        None => panic!("event loop ended without an error"),
                    }
                }
            };
            timeout(WAIT, wait)
                .await
                .expect("timed out waiting for the connection to fail")
        }
    }

    fn encode_packet(packet: Packet) -> BytesMut {
        let mut buf = BytesMut::new();
        packet
            .write(&mut buf, MAX_OUTGOING_PACKET_SIZE)
            .expect("test packet encodes");
        buf
    }

    /// Reads exactly one packet from a raw socket.
    async fn raw_read_packet(stream: &mut TcpStream, buf: &mut BytesMut) -> Packet {
        let read = async {
            loop {
                match Packet::read(buf, MAX_PACKET_SIZE) {
                    Ok(packet) => return packet,
                    Err(mqttbytes::Error::InsufficientBytes(_)) => {
                        let n = stream.read_buf(buf).await.expect("read from broker");
                        assert!(n > 0, "broker closed the connection unexpectedly");
                    }
                    Err(error) => panic!("broker sent a malformed packet: {error}"),
                }
            }
        };
        timeout(WAIT, read)
            .await
            .expect("timed out reading a packet")
    }

    /// Opens a raw connection and completes the CONNECT handshake.
    async fn raw_connect(broker: &Broker, connect: rumqttc::Connect) -> TcpStream {
        let mut stream = TcpStream::connect(broker.local_addr())
            .await
            .expect("raw connect");
        stream
            .write_all(&encode_packet(Packet::Connect(connect)))
            .await
            .expect("send CONNECT");
        let mut buf = BytesMut::new();
        match raw_read_packet(&mut stream, &mut buf).await {
            Packet::ConnAck(ack) => assert_eq!(ack.code, ConnectReturnCode::Success),
            other => panic!("expected CONNACK, got {other:?}"),
        }
        stream
    }

    /// Reads (and discards) until the broker closes the connection.
    async fn expect_closed_by_broker(stream: &mut TcpStream) {
        let drain = async {
            let mut scratch = vec![0u8; 64 * 1024];
            loop {
                match stream.read(&mut scratch).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        };
        timeout(WAIT, drain)
            .await
            .expect("broker did not close the connection");
    }

    #[test]
    fn topic_matching_follows_mqtt_rules() {
        assert!(topic_matches("a/b/c", "a/b/c"));
        assert!(topic_matches("a/b/c/d", "a/+/c/#"));
        assert!(topic_matches("a/b/c", "a/+/c/#"));
        assert!(!topic_matches("a/b/x/d", "a/+/c/#"));
        assert!(topic_matches("sport", "sport/#"));
        assert!(topic_matches("a/b", "#"));
        assert!(topic_matches("/finance", "+/+"));
        assert!(!topic_matches("a/b/c", "a/+"));
        assert!(!topic_matches("a", "a/+"));
        assert!(!topic_matches("$SYS/x", "#"));
        assert!(!topic_matches("$SYS/x", "+/x"));
        assert!(topic_matches("$SYS/x", "$SYS/#"));
    }

    #[test]
    fn packet_ids_wrap_and_skip_zero() {
        let mut last = 0;
        assert_eq!(next_pkid(&mut last), 1);
        let mut last = u16::MAX - 1;
        assert_eq!(next_pkid(&mut last), u16::MAX);
        assert_eq!(next_pkid(&mut last), 1);
    }

    #[tokio::test]
    async fn qos1_publish_reaches_wildcard_subscriber_and_is_acked() {
        let broker = start_broker().await;
        let mut subscriber = TestClient::connect(options(&broker, "sub")).await;
        subscriber.subscribe("a/+/c/#", QoS::AtLeastOnce).await;
        let mut publisher = TestClient::connect(options(&broker, "pub")).await;

        // Not matching: if it were delivered it would arrive first.
        publisher
            .publish("a/b/x/d", QoS::AtLeastOnce, false, "no")
            .await;
        publisher
            .publish("a/b/c/d", QoS::AtLeastOnce, false, "yes")
            .await;
        let mut acked = vec![publisher.puback().await, publisher.puback().await];
        acked.sort_unstable();
        assert_eq!(acked, vec![1, 2]);

        let received = subscriber.next_publish().await;
        assert_eq!(received.topic, "a/b/c/d");
        assert_eq!(&received.payload[..], b"yes");
        assert_eq!(received.qos, QoS::AtLeastOnce);
        assert!(!received.retain);
        broker.shutdown().await;
    }

    #[tokio::test]
    async fn overlapping_filters_deliver_once_and_qos_is_downgraded() {
        let broker = start_broker().await;
        let mut subscriber = TestClient::connect(options(&broker, "sub")).await;
        subscriber.subscribe("o/#", QoS::AtMostOnce).await;
        subscriber.subscribe("o/+", QoS::AtLeastOnce).await;
        subscriber.subscribe("q/#", QoS::AtMostOnce).await;
        let publisher = TestClient::connect(options(&broker, "pub")).await;

        publisher
            .publish("o/1", QoS::AtLeastOnce, false, "one")
            .await;
        publisher
            .publish("q/2", QoS::AtLeastOnce, false, "two")
            .await;
        let first = subscriber.next_publish().await;
        assert_eq!((first.topic.as_str(), first.qos), ("o/1", QoS::AtLeastOnce));
        // Not a duplicate of o/1, and delivered at the granted QoS 0.
        let second = subscriber.next_publish().await;
        assert_eq!(
            (second.topic.as_str(), second.qos),
            ("q/2", QoS::AtMostOnce)
        );
        broker.shutdown().await;
    }

    #[tokio::test]
    async fn retained_message_reaches_late_subscriber_and_empty_payload_clears_it() {
        let broker = start_broker().await;
        let mut early = TestClient::connect(options(&broker, "early")).await;
        early.subscribe("r/#", QoS::AtLeastOnce).await;
        let mut publisher = TestClient::connect(options(&broker, "pub")).await;
        publisher
            .publish("r/state", QoS::AtLeastOnce, true, "on")
            .await;
        publisher.puback().await;

        // A live delivery carries RETAIN = 0.
        let live = early.next_publish().await;
        assert_eq!(
            (live.topic.as_str(), &live.payload[..]),
            ("r/state", &b"on"[..])
        );
        assert!(!live.retain);

        let mut late = TestClient::connect(options(&broker, "late")).await;
        late.subscribe("r/+", QoS::AtLeastOnce).await;
        let retained = late.next_publish().await;
        assert_eq!(retained.topic, "r/state");
        assert_eq!(&retained.payload[..], b"on");
        assert!(retained.retain);
        assert_eq!(retained.qos, QoS::AtLeastOnce);

        // Clear it.
        publisher
            .publish("r/state", QoS::AtLeastOnce, true, "")
            .await;
        publisher.puback().await;

        let mut later = TestClient::connect(options(&broker, "later")).await;
        later.subscribe("r/#", QoS::AtLeastOnce).await;
        // Retained messages are queued right behind the SUBACK, so the marker
        // published after the SUBACK arrived would come second.
        publisher
            .publish("r/marker", QoS::AtLeastOnce, false, "m")
            .await;
        let first = later.next_publish().await;
        assert_eq!(
            first.topic, "r/marker",
            "cleared retained message was delivered"
        );
        assert!(!first.retain);
        broker.shutdown().await;
    }

    #[tokio::test]
    async fn last_will_on_abrupt_close_but_not_on_disconnect() {
        let broker = start_broker().await;
        let mut watcher = TestClient::connect(options(&broker, "watcher")).await;
        watcher.subscribe("will/#", QoS::AtLeastOnce).await;

        // Abrupt: connect, then drop the event loop (closes the socket without DISCONNECT).
        let mut victim_options = options(&broker, "victim");
        victim_options.set_last_will(LastWill::new(
            "will/victim",
            "gone",
            QoS::AtLeastOnce,
            false,
        ));
        let (victim, mut victim_loop) = AsyncClient::new(victim_options, 10);
        wait_for_connack(&mut victim_loop).await;
        drop(victim_loop);
        let will = watcher.next_publish().await;
        assert_eq!(will.topic, "will/victim");
        assert_eq!(&will.payload[..], b"gone");
        drop(victim);

        // Clean: DISCONNECT, then wait until the broker has closed the socket.
        let mut polite_options = options(&broker, "polite");
        polite_options.set_last_will(LastWill::new(
            "will/polite",
            "gone",
            QoS::AtLeastOnce,
            false,
        ));
        let (polite, mut polite_loop) = AsyncClient::new(polite_options, 10);
        wait_for_connack(&mut polite_loop).await;
        polite
            .disconnect()
            .await
            .expect("disconnect request queued");
        let closed = async {
            let mut sent_disconnect = false;
            loop {
                match polite_loop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => sent_disconnect = true,
                    Ok(_) => {}
                    Err(_) => return sent_disconnect,
                }
            }
        };
        let sent_disconnect = timeout(WAIT, closed)
            .await
            .expect("broker did not close after DISCONNECT");
        assert!(sent_disconnect);
        // The broker decides about the will before it closes the socket, so a
        // will would be queued before this marker.
        watcher
            .publish("will/marker", QoS::AtLeastOnce, false, "m")
            .await;
        let next = watcher.next_publish().await;
        assert_eq!(
            next.topic, "will/marker",
            "will published after a clean DISCONNECT"
        );
        broker.shutdown().await;
    }

    async fn wait_for_connack(eventloop: &mut EventLoop) {
        let connected = async {
            loop {
                if let Event::Incoming(Packet::ConnAck(_)) =
                    eventloop.poll().await.expect("client connects")
                {
                    return;
                }
            }
        };
        timeout(WAIT, connected)
            .await
            .expect("timed out waiting for ConnAck");
    }

    #[tokio::test]
    async fn ten_thousand_qos1_messages_arrive_in_order() {
        const COUNT: u32 = 10_000;
        let broker = start_broker().await;
        let mut subscriber = TestClient::connect(options(&broker, "sub")).await;
        subscriber.subscribe("load/#", QoS::AtLeastOnce).await;
        let mut publisher_options = options(&broker, "pub");
        publisher_options.set_inflight(100);
        let mut publisher = TestClient::connect(publisher_options).await;

        let client = publisher.client.clone();
        let sending = tokio::spawn(async move {
            for i in 0..COUNT {
                client
                    .publish(
                        "load/seq",
                        QoS::AtLeastOnce,
                        false,
                        i.to_be_bytes().to_vec(),
                    )
                    .await
                    .expect("publish request queued");
            }
        });
        for _ in 0..COUNT {
            publisher.puback().await;
        }
        timeout(WAIT, sending)
            .await
            .expect("publishing finished")
            .expect("publishing task");
        for expected in 0..COUNT {
            let message = subscriber.next_publish().await;
            let seq: [u8; 4] = message.payload[..].try_into().expect("4-byte payload");
            assert_eq!(u32::from_be_bytes(seq), expected);
            assert_eq!(message.qos, QoS::AtLeastOnce);
        }
        broker.shutdown().await;
    }

    #[tokio::test]
    async fn shutdown_closes_connections_and_frees_the_port() {
        let broker = start_broker().await;
        let addr = broker.local_addr();
        let mut client = TestClient::connect(options(&broker, "c")).await;
        client.subscribe("x/#", QoS::AtLeastOnce).await;
        let mut raw = raw_connect(&broker, rumqttc::Connect::new("raw")).await;

        timeout(WAIT, broker.shutdown())
            .await
            .expect("shutdown finishes");
        client.connection_error().await;
        expect_closed_by_broker(&mut raw).await;

        // The port is free again: a new broker can take it.
        let again = Broker::start(addr).await.expect("port can be bound again");
        assert_eq!(again.local_addr(), addr);
        let _client = TestClient::connect(options(&again, "c")).await;
        again.shutdown().await;
    }

    #[tokio::test]
    async fn garbage_closes_only_that_connection() {
        let broker = start_broker().await;
        let mut subscriber = TestClient::connect(options(&broker, "sub")).await;
        subscriber.subscribe("ok/#", QoS::AtLeastOnce).await;
        let mut publisher = TestClient::connect(options(&broker, "pub")).await;

        // Not MQTT at all (invalid remaining length).
        let mut raw = TcpStream::connect(broker.local_addr())
            .await
            .expect("connect");
        raw.write_all(&[0xFF; 32]).await.expect("send garbage");
        expect_closed_by_broker(&mut raw).await;

        // A first packet announcing more than 1 MiB.
        let mut raw = TcpStream::connect(broker.local_addr())
            .await
            .expect("connect");
        raw.write_all(&[0x10, 0xFF, 0xFF, 0xFF, 0x7F])
            .await
            .expect("send huge header");
        expect_closed_by_broker(&mut raw).await;

        // A valid session, then a PUBLISH with the invalid QoS 3.
        let mut raw = raw_connect(&broker, rumqttc::Connect::new("raw")).await;
        raw.write_all(&[0x36, 0x05, 0x00, 0x01, b't', 0x00, 0x01])
            .await
            .expect("send bad publish");
        expect_closed_by_broker(&mut raw).await;

        publisher
            .publish("ok/1", QoS::AtLeastOnce, false, "still here")
            .await;
        publisher.puback().await;
        let received = subscriber.next_publish().await;
        assert_eq!(received.topic, "ok/1");
        broker.shutdown().await;
    }

    #[tokio::test]
    async fn keep_alive_expiry_publishes_the_will() {
        let broker = start_broker().await;
        let mut watcher = TestClient::connect(options(&broker, "watcher")).await;
        watcher.subscribe("will/#", QoS::AtLeastOnce).await;

        let mut connect = rumqttc::Connect::new("sleepy");
        connect.keep_alive = 1;
        connect.last_will = Some(LastWill::new("will/sleepy", "zzz", QoS::AtMostOnce, false));
        let mut raw = raw_connect(&broker, connect).await;
        // Silent from now on: the broker gives up after 1.5 s.
        let will = watcher.next_publish().await;
        assert_eq!(will.topic, "will/sleepy");
        expect_closed_by_broker(&mut raw).await;
        broker.shutdown().await;
    }

    #[tokio::test]
    async fn same_client_id_takes_over_and_publishes_the_old_will() {
        let broker = start_broker().await;
        let mut watcher = TestClient::connect(options(&broker, "watcher")).await;
        watcher.subscribe("will/#", QoS::AtLeastOnce).await;

        let mut first_options = options(&broker, "twin");
        first_options.set_last_will(LastWill::new("will/twin", "first", QoS::AtLeastOnce, true));
        let mut first = TestClient::connect(first_options).await;
        let mut second = TestClient::connect(options(&broker, "twin")).await;

        first.connection_error().await;
        let will = watcher.next_publish().await;
        assert_eq!(
            (will.topic.as_str(), &will.payload[..]),
            ("will/twin", &b"first"[..])
        );
        // The new connection works.
        second.publish("x", QoS::AtLeastOnce, false, "y").await;
        second.puback().await;
        // The will was retained.
        let mut late = TestClient::connect(options(&broker, "late")).await;
        late.subscribe("will/twin", QoS::AtLeastOnce).await;
        let retained = late.next_publish().await;
        assert!(retained.retain);
        assert_eq!(&retained.payload[..], b"first");
        broker.shutdown().await;
    }

    #[tokio::test]
    async fn slow_subscriber_is_dropped_without_blocking_the_publisher() {
        // Upper bound only: the broker's queue plus the kernel's socket
        // buffers fill long before this many 1 KiB messages.
        const MAX_COUNT: usize = 200_000;
        let broker = start_broker().await;
        let mut watcher = TestClient::connect(options(&broker, "watcher")).await;
        watcher.subscribe("will/#", QoS::AtLeastOnce).await;

        let socket = TcpSocket::new_v4().expect("socket");
        socket
            .set_recv_buffer_size(4096)
            .expect("small receive buffer");
        let mut slow = socket.connect(broker.local_addr()).await.expect("connect");
        // No keep-alive, so only being slow can end this connection; its
        // will tells us when that happened.
        let mut connect = rumqttc::Connect::new("slow");
        connect.keep_alive = 0;
        connect.last_will = Some(LastWill::new("will/slow", "", QoS::AtMostOnce, false));
        slow.write_all(&encode_packet(Packet::Connect(connect)))
            .await
            .expect("send CONNECT");
        let mut subscribe = Subscribe::new("slow/#", QoS::AtMostOnce);
        subscribe.pkid = 1;
        slow.write_all(&encode_packet(Packet::Subscribe(subscribe)))
            .await
            .expect("send SUBSCRIBE");
        let mut buf = BytesMut::new();
        assert!(matches!(
            raw_read_packet(&mut slow, &mut buf).await,
            Packet::ConnAck(_)
        ));
        assert!(matches!(
            raw_read_packet(&mut slow, &mut buf).await,
            Packet::SubAck(_)
        ));
        // From here on the slow subscriber reads nothing.

        let mut publisher = TestClient::connect(options(&broker, "pub")).await;
        let client = publisher.client.clone();
        let flooding = tokio::spawn(async move {
            let payload = vec![0x55u8; 1024];
            for _ in 0..MAX_COUNT {
                client
                    .publish("slow/data", QoS::AtMostOnce, false, payload.clone())
                    .await
                    .expect("publish request queued");
            }
        });
        let will = watcher.next_publish().await;
        assert_eq!(will.topic, "will/slow");
        assert!(!flooding.is_finished(), "slow subscriber was not dropped");
        flooding.abort();

        // The publisher was never blocked and still works.
        publisher
            .publish("slow/last", QoS::AtLeastOnce, false, "last")
            .await;
        publisher.puback().await;
        expect_closed_by_broker(&mut slow).await;
        broker.shutdown().await;
    }
}
