//! A TCP relay that can break the link it carries: the demo's uplink, the benchmark's, and the
//! fault-injection tests' (placed between the agent and Mosquitto, the embedded broker or an Anviz
//! terminal).
//!
//! - [`Mode::Pass`]: bytes flow both ways.
//! - [`Mode::Cut`]: every open connection is closed now; new ones are accepted and closed at once
//!   until the mode changes (what a dropped plant link or a firewall looks like).
//! - [`Mode::Stall`]: a blackhole. Connections stay open (new ones are accepted and held) but
//!   nothing is forwarded either way; the bytes wait in the kernel until the mode changes.
//! - [`Mode::HoldAcks`]: client → server bytes flow, server → client bytes are held back: the
//!   broker gets the publishes, the client gets no PUBACK, so everything sent stays in flight.
//! - [`Relay::cut_after_publish`]: a one-shot for MQTT. The next client → server PUBLISH (QoS > 0,
//!   topic containing a needle) is forwarded; from then on nothing reaches the client, and the
//!   connection is cut as soon as the server's PUBACK for that packet id has come back (or after
//!   a bound if it never does). The broker has the message, the client never sees its PUBACK:
//!   the cut lands exactly between the two.
//!
//! [`Relay::start`] frames MQTT fixed headers (type nibble, remaining-length varint) in both
//! directions, so it also records which clocking ids (the payload's `"id"`) the server
//! acknowledged and which acknowledgements reached the client. [`Relay::start_raw`] relays any
//! protocol as plain chunks.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long a cut armed on a PUBLISH waits for the server's PUBACK before cutting anyway.
const PUBACK_BOUND: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass,
    Cut,
    Stall,
    HoldAcks,
}

/// Whether `dir` waits (reads nothing) in mode `m`.
fn held(dir: Dir, m: Mode) -> bool {
    match m {
        Mode::Stall => true,
        Mode::HoldAcks => dir == Dir::ToClient,
        Mode::Pass | Mode::Cut => false,
    }
}

/// One cut made by [`Relay::cut_after_publish`].
#[derive(Debug, Clone)]
pub struct PublishCut {
    pub topic: String,
    pub pkid: u16,
    /// The payload's `"id"`, when it is a clocking.
    pub id: Option<String>,
    /// Whether the server's PUBACK came back (and was withheld) before the cut.
    pub server_acked: bool,
}

/// A condition waited for with [`Relay::wait`] did not hold in time.
#[derive(Debug, thiserror::Error)]
#[error("relay: {what} not within {timeout:?}")]
pub struct WaitTimeout {
    pub what: String,
    pub timeout: Duration,
}

#[derive(Default)]
struct Shared {
    /// `Some(needle)`: cut after the next PUBLISH whose topic contains `needle`.
    armed: Option<String>,
    cuts: Vec<PublishCut>,
    /// Clocking ids whose PUBACK the server sent (forwarded or withheld).
    server_acked: HashSet<String>,
    /// Clocking ids whose PUBACK reached the client.
    client_acked: HashSet<String>,
    connections: u64,
}

/// A poisoned lock only means another relay task panicked; the state is still consistent enough
/// for counting and must not take the rest of the relay down with it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct Relay {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    shared: Arc<Mutex<Shared>>,
    /// Bumped on every change that callers wait for (a connection, a cut).
    events: Arc<watch::Sender<u64>>,
    task: JoinHandle<()>,
}

impl Relay {
    /// Relay MQTT connections made to a new loopback port to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Relay> {
        Relay::start_with(target, true).await
    }

    /// Relay any TCP protocol (no MQTT framing; [`Relay::cut_after_publish`] does nothing).
    pub async fn start_raw(target: SocketAddr) -> std::io::Result<Relay> {
        Relay::start_with(target, false).await
    }

    async fn start_with(target: SocketAddr, mqtt: bool) -> std::io::Result<Relay> {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let addr = listener.local_addr()?;
        let (mode, mode_rx) = watch::channel(Mode::Pass);
        let shared = Arc::new(Mutex::new(Shared::default()));
        let events = Arc::new(watch::channel(0u64).0);
        let task = tokio::spawn({
            let shared = shared.clone();
            let events = events.clone();
            async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        continue;
                    };
                    if *mode_rx.borrow() == Mode::Cut {
                        drop(client);
                        continue;
                    }
                    let conn = Conn {
                        mqtt,
                        mode: mode_rx.clone(),
                        shared: shared.clone(),
                        events: events.clone(),
                        cut: Arc::new(watch::channel(false).0),
                        target_pkid: Arc::new(Mutex::new(None)),
                    };
                    tokio::spawn(conn.run(client, target));
                }
            }
        });
        Ok(Relay {
            addr,
            mode,
            shared,
            events,
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `mqtt://` and the relay's address: what the agent is configured with.
    pub fn url(&self) -> String {
        format!("mqtt://{}", self.addr)
    }

    pub fn set_mode(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    pub fn mode(&self) -> Mode {
        *self.mode.borrow()
    }

    pub fn pass(&self) {
        self.set_mode(Mode::Pass);
    }

    pub fn cut(&self) {
        self.set_mode(Mode::Cut);
    }

    pub fn stall(&self) {
        self.set_mode(Mode::Stall);
    }

    pub fn hold_acks(&self) {
        self.set_mode(Mode::HoldAcks);
    }

    /// Cut (false) or restore (true) the link.
    pub fn set_up(&self, up: bool) {
        self.set_mode(if up { Mode::Pass } else { Mode::Cut });
    }

    /// Whether bytes flow both ways.
    pub fn is_up(&self) -> bool {
        self.mode() == Mode::Pass
    }

    /// Arm the one-shot PUBLISH/PUBACK cut for the next PUBLISH whose topic contains `needle`.
    pub fn cut_after_publish(&self, needle: &str) {
        lock(&self.shared).armed = Some(needle.to_owned());
    }

    pub fn is_armed(&self) -> bool {
        lock(&self.shared).armed.is_some()
    }

    pub fn publish_cuts(&self) -> Vec<PublishCut> {
        lock(&self.shared).cuts.clone()
    }

    /// Clocking ids whose PUBACK the server sent (whether or not the client got it).
    pub fn server_acked(&self) -> HashSet<String> {
        lock(&self.shared).server_acked.clone()
    }

    /// Clocking ids whose PUBACK the relay forwarded to the client: the ones it may delete.
    pub fn client_acked(&self) -> HashSet<String> {
        lock(&self.shared).client_acked.clone()
    }

    /// Connections accepted and relayed so far.
    pub fn connections(&self) -> u64 {
        lock(&self.shared).connections
    }

    /// Waits until `cond` holds on the relay's state (re-checked on every connection and cut).
    pub async fn wait(
        &self,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&Relay) -> bool,
    ) -> Result<(), WaitTimeout> {
        let mut rx = self.events.subscribe();
        let _ = tokio::time::timeout(timeout, async {
            while !cond(self) {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        if cond(self) {
            Ok(())
        } else {
            Err(WaitTimeout {
                what: what.to_owned(),
                timeout,
            })
        }
    }

    /// Waits until `n` PUBLISH/PUBACK cuts happened.
    pub async fn wait_publish_cuts(&self, n: usize, timeout: Duration) -> Result<(), WaitTimeout> {
        self.wait(&format!("{n} publish cuts"), timeout, |r| {
            r.publish_cuts().len() >= n
        })
        .await
    }

    /// Waits until more than `n` connections were relayed.
    pub async fn wait_connections_above(
        &self,
        n: u64,
        timeout: Duration,
    ) -> Result<(), WaitTimeout> {
        self.wait(&format!("connection #{}", n + 1), timeout, |r| {
            r.connections() > n
        })
        .await
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.mode.send_replace(Mode::Cut);
        self.task.abort();
    }
}

#[derive(Clone)]
struct Conn {
    mqtt: bool,
    mode: watch::Receiver<Mode>,
    shared: Arc<Mutex<Shared>>,
    events: Arc<watch::Sender<u64>>,
    /// Set once this connection is to be closed (a PUBLISH cut).
    cut: Arc<watch::Sender<bool>>,
    /// The PUBLISH whose PUBACK is withheld; once set, nothing more reaches the client.
    target_pkid: Arc<Mutex<Option<Target>>>,
}

/// The withheld PUBLISH: packet id, topic, clocking id.
type Target = (u16, String, Option<String>);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    ToServer,
    ToClient,
}

impl Conn {
    async fn run(self, client: TcpStream, target: SocketAddr) {
        // New connections during a stall are held, not relayed, until the stall ends.
        let mut mode = self.mode.clone();
        match mode.wait_for(|m| *m != Mode::Stall).await {
            Ok(m) if *m != Mode::Cut => {}
            _ => return,
        }
        let Ok(server) = TcpStream::connect(target).await else {
            return;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        lock(&self.shared).connections += 1;
        self.events.send_modify(|n| *n += 1);
        let (client_rx, client_tx) = client.into_split();
        let (server_rx, server_tx) = server.into_split();
        // pkid → clocking id of the PUBLISHes this connection forwarded.
        let ids: Arc<Mutex<HashMap<u16, String>>> = Arc::default();
        let up = self
            .clone()
            .pump(client_rx, server_tx, Dir::ToServer, ids.clone());
        let down = self.clone().pump(server_rx, client_tx, Dir::ToClient, ids);
        // Either direction ending closes both (the halves are dropped here).
        tokio::select! {
            _ = up => {}
            _ = down => {}
        }
    }

    async fn pump(
        self,
        mut from: OwnedReadHalf,
        mut to: OwnedWriteHalf,
        dir: Dir,
        ids: Arc<Mutex<HashMap<u16, String>>>,
    ) {
        let mut mode = self.mode.clone();
        let mut cut = self.cut.subscribe();
        let mut framer = Framer::default();
        let mut buf = vec![0u8; 16 * 1024];
        let mut out = Vec::with_capacity(16 * 1024);
        loop {
            // While held, do not read: the bytes wait at the sender.
            let gone = tokio::select! {
                m = mode.wait_for(|m| !held(dir, *m)) => m.map(|m| *m == Mode::Cut).unwrap_or(true),
                _ = cut.wait_for(|c| *c) => true,
            };
            if gone {
                return;
            }
            // A read cut short by a mode change loses nothing (TcpStream reads are cancel-safe).
            let n = tokio::select! {
                r = from.read(&mut buf) => match r { Ok(0) | Err(_) => return, Ok(n) => n },
                _ = mode.wait_for(|m| *m == Mode::Cut || held(dir, *m)) => continue,
                _ = cut.wait_for(|c| *c) => return,
            };
            if !self.mqtt {
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
                continue;
            }
            // Whole packets of this read go out in one write (one syscall, as a plain relay).
            framer.push(&buf[..n]);
            out.clear();
            let mut target_sent = false;
            while let Some(packet) = framer.next_packet() {
                let forward = match dir {
                    Dir::ToServer => self.to_server(&packet, &ids),
                    Dir::ToClient => self.to_client(&packet, &ids),
                };
                if forward {
                    out.extend_from_slice(&packet);
                }
                if dir == Dir::ToServer && lock(&self.target_pkid).is_some() {
                    target_sent = true;
                    break;
                }
            }
            if !out.is_empty() && to.write_all(&out).await.is_err() {
                return;
            }
            if target_sent {
                // The target PUBLISH went out: hold everything after it, and cut after a bound
                // if the server never acknowledges it.
                let this = self.clone();
                tokio::spawn(async move {
                    let mut cut = this.cut.subscribe();
                    if tokio::time::timeout(PUBACK_BOUND, cut.wait_for(|c| *c))
                        .await
                        .is_err()
                    {
                        this.finish_cut(false);
                    }
                });
                let _ = cut.wait_for(|c| *c).await;
                return;
            }
        }
    }

    /// Client → server: note PUBLISH ids; arm the cut on the target. Always forwarded.
    fn to_server(&self, packet: &[u8], ids: &Mutex<HashMap<u16, String>>) -> bool {
        let Some(p) = parse_publish(packet) else {
            return true;
        };
        let Some(pkid) = p.pkid else {
            return true;
        };
        if let Some(id) = &p.id {
            lock(ids).insert(pkid, id.clone());
        }
        let mut sh = lock(&self.shared);
        if sh.armed.as_deref().is_some_and(|n| p.topic.contains(n)) {
            sh.armed = None;
            // Set before the PUBLISH is written, so its PUBACK can never be forwarded.
            *lock(&self.target_pkid) = Some((pkid, p.topic, p.id));
        }
        true
    }

    /// Server → client: record acknowledged ids; withhold everything once a cut is armed here.
    fn to_client(&self, packet: &[u8], ids: &Mutex<HashMap<u16, String>>) -> bool {
        let puback = (packet.first().map(|b| b >> 4) == Some(4))
            .then(|| pkid_after_header(packet))
            .flatten();
        let acked_id = puback.and_then(|pkid| lock(ids).remove(&pkid));
        if let Some(id) = &acked_id {
            lock(&self.shared).server_acked.insert(id.clone());
        }
        let target = lock(&self.target_pkid).as_ref().map(|t| t.0);
        match target {
            None => {
                if let Some(id) = acked_id {
                    lock(&self.shared).client_acked.insert(id);
                }
                true
            }
            Some(t) => {
                if puback == Some(t) {
                    self.finish_cut(true);
                }
                false
            }
        }
    }

    fn finish_cut(&self, server_acked: bool) {
        let Some((pkid, topic, id)) = lock(&self.target_pkid).clone() else {
            return;
        };
        if self.cut.send_replace(true) {
            return;
        }
        lock(&self.shared).cuts.push(PublishCut {
            topic,
            pkid,
            id,
            server_acked,
        });
        self.events.send_modify(|n| *n += 1);
    }
}

/// Splits a byte stream into whole MQTT control packets.
#[derive(Default)]
pub struct Framer {
    buf: Vec<u8>,
}

impl Framer {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    pub fn next_packet(&mut self) -> Option<Vec<u8>> {
        let (len, header) = remaining_length(&self.buf)?;
        let total = header + len;
        if self.buf.len() < total {
            return None;
        }
        Some(self.buf.drain(..total).collect())
    }
}

/// (remaining length, fixed header size) once the whole fixed header is buffered.
pub fn remaining_length(buf: &[u8]) -> Option<(usize, usize)> {
    let mut len = 0usize;
    for i in 0..4 {
        let b = *buf.get(1 + i)?;
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((len, 2 + i));
        }
    }
    // A malformed length: pass the rest through as one chunk rather than stall the stream.
    Some((buf.len().saturating_sub(5), 5))
}

/// The packet id right after the fixed header (PUBACK, SUBACK, ...).
pub fn pkid_after_header(packet: &[u8]) -> Option<u16> {
    let (_, h) = remaining_length(packet)?;
    Some(u16::from_be_bytes([*packet.get(h)?, *packet.get(h + 1)?]))
}

pub struct Publish {
    pub topic: String,
    pub pkid: Option<u16>,
    pub id: Option<String>,
}

/// A PUBLISH's topic, packet id (QoS > 0) and payload `"id"` (MQTT 3.1.1 layout).
pub fn parse_publish(packet: &[u8]) -> Option<Publish> {
    if packet.first()? >> 4 != 3 {
        return None;
    }
    let qos = (packet[0] >> 1) & 3;
    let (_, h) = remaining_length(packet)?;
    let tlen = usize::from(u16::from_be_bytes([*packet.get(h)?, *packet.get(h + 1)?]));
    let topic = String::from_utf8_lossy(packet.get(h + 2..h + 2 + tlen)?).into_owned();
    let mut at = h + 2 + tlen;
    let pkid = if qos > 0 {
        let p = u16::from_be_bytes([*packet.get(at)?, *packet.get(at + 1)?]);
        at += 2;
        Some(p)
    } else {
        None
    };
    let id = serde_json::from_slice::<serde_json::Value>(packet.get(at..)?)
        .ok()
        .and_then(|v| v.get("id").and_then(|i| i.as_str()).map(str::to_owned));
    Some(Publish { topic, pkid, id })
}
