//! A TCP proxy for fault-injection tests, placed between a client (the agent) and a server
//! (Mosquitto, an Anviz terminal).
//!
//! - [`Mode::Pass`]: bytes flow both ways.
//! - [`Mode::Cut`]: every open connection is closed now; new ones are accepted and closed at once
//!   until the mode changes (what a dropped plant link or a firewall looks like).
//! - [`Mode::Stall`]: a blackhole. Connections stay open (new ones are accepted and held) but
//!   nothing is forwarded either way; the bytes wait in the kernel until the mode changes.
//! - [`Mode::HoldAcks`]: client → server bytes flow, server → client bytes are held back: the
//!   broker gets the publishes, the client gets no PUBACK, so everything sent stays in flight.
//! - [`Proxy::cut_after_publish`]: a one-shot for MQTT. The next client → server PUBLISH (QoS > 0,
//!   topic containing a needle) is forwarded; from then on nothing reaches the client, and the
//!   connection is cut as soon as the server's PUBACK for that packet id has come back (or after
//!   a bound if it never does). The broker has the message, the client never sees its PUBACK:
//!   the cut lands exactly between the two.
//!
//! The proxy frames MQTT fixed headers (type nibble, remaining-length varint) in both directions,
//! so it also records which clocking ids (the payload's `"id"`) the server acknowledged.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
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

/// One cut made by [`Proxy::cut_after_publish`].
#[derive(Debug, Clone)]
pub struct PublishCut {
    pub topic: String,
    pub pkid: u16,
    /// The payload's `"id"`, when it is a clocking.
    pub id: Option<String>,
    /// Whether the server's PUBACK came back (and was withheld) before the cut.
    pub server_acked: bool,
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

pub struct Proxy {
    addr: SocketAddr,
    /// Frame MQTT packets (false: relay raw chunks, for non-MQTT links such as Anviz TC-B).
    mqtt: bool,
    mode: watch::Sender<Mode>,
    shared: Arc<Mutex<Shared>>,
    /// Bumped on every change that tests wait for (a connection, a cut).
    events: Arc<watch::Sender<u64>>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Relay MQTT connections made to a new loopback port to `target`.
    pub async fn start(target: SocketAddr) -> Proxy {
        Proxy::start_with(target, true).await
    }

    /// Relay any TCP protocol (no MQTT framing; [`Proxy::cut_after_publish`] does nothing).
    pub async fn start_raw(target: SocketAddr) -> Proxy {
        Proxy::start_with(target, false).await
    }

    async fn start_with(target: SocketAddr, mqtt: bool) -> Proxy {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("binding the proxy");
        let addr = listener.local_addr().unwrap();
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
        Proxy {
            addr,
            mqtt,
            mode,
            shared,
            events,
            task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("mqtt://{}", self.addr)
    }

    pub fn set_mode(&self, mode: Mode) {
        self.mode.send_replace(mode);
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

    /// Arm the one-shot PUBLISH/PUBACK cut for the next PUBLISH whose topic contains `needle`.
    pub fn cut_after_publish(&self, needle: &str) {
        self.shared.lock().unwrap().armed = Some(needle.to_owned());
    }

    pub fn is_armed(&self) -> bool {
        self.shared.lock().unwrap().armed.is_some()
    }

    pub fn publish_cuts(&self) -> Vec<PublishCut> {
        self.shared.lock().unwrap().cuts.clone()
    }

    pub fn hold_acks(&self) {
        self.set_mode(Mode::HoldAcks);
    }

    pub fn server_acked(&self) -> HashSet<String> {
        self.shared.lock().unwrap().server_acked.clone()
    }

    /// Clocking ids whose PUBACK the proxy forwarded to the client: the ones it may delete.
    pub fn client_acked(&self) -> HashSet<String> {
        self.shared.lock().unwrap().client_acked.clone()
    }

    /// Connections accepted and relayed so far.
    pub fn connections(&self) -> u64 {
        self.shared.lock().unwrap().connections
    }

    /// Waits until `cond` holds on the proxy's state (re-checked on every connection and cut).
    pub async fn wait(&self, what: &str, timeout: Duration, cond: impl Fn(&Proxy) -> bool) {
        let mut rx = self.events.subscribe();
        let ok = tokio::time::timeout(timeout, async {
            loop {
                if cond(self) {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        assert!(
            ok.is_ok() && cond(self),
            "proxy: {what} not within {timeout:?}"
        );
    }

    /// Waits until `n` PUBLISH/PUBACK cuts happened.
    pub async fn wait_publish_cuts(&self, n: usize, timeout: Duration) {
        self.wait(&format!("{n} publish cuts"), timeout, |p| {
            p.publish_cuts().len() >= n
        })
        .await;
    }

    /// Waits until more than `n` connections were relayed.
    pub async fn wait_connections_above(&self, n: u64, timeout: Duration) {
        self.wait(&format!("connection #{}", n + 1), timeout, |p| {
            p.connections() > n
        })
        .await;
    }
}

impl Drop for Proxy {
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
        self.shared.lock().unwrap().connections += 1;
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
            framer.push(&buf[..n]);
            while let Some(packet) = framer.next_packet() {
                let forward = match dir {
                    Dir::ToServer => self.to_server(&packet, &ids),
                    Dir::ToClient => self.to_client(&packet, &ids),
                };
                if forward && to.write_all(&packet).await.is_err() {
                    return;
                }
                if dir == Dir::ToServer && self.target_pkid.lock().unwrap().is_some() {
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
            ids.lock().unwrap().insert(pkid, id.clone());
        }
        let mut sh = self.shared.lock().unwrap();
        if sh.armed.as_deref().is_some_and(|n| p.topic.contains(n)) {
            sh.armed = None;
            // Set before the PUBLISH is written, so its PUBACK can never be forwarded.
            *self.target_pkid.lock().unwrap() = Some((pkid, p.topic, p.id));
        }
        true
    }

    /// Server → client: record acknowledged ids; withhold everything once a cut is armed here.
    fn to_client(&self, packet: &[u8], ids: &Mutex<HashMap<u16, String>>) -> bool {
        let puback = (packet[0] >> 4 == 4)
            .then(|| pkid_after_header(packet))
            .flatten();
        let acked_id = puback.and_then(|pkid| ids.lock().unwrap().remove(&pkid));
        if let Some(id) = &acked_id {
            self.shared.lock().unwrap().server_acked.insert(id.clone());
        }
        let target = self.target_pkid.lock().unwrap().as_ref().map(|t| t.0);
        match target {
            None => {
                if let Some(id) = acked_id {
                    self.shared.lock().unwrap().client_acked.insert(id);
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
        let Some((pkid, topic, id)) = self.target_pkid.lock().unwrap().clone() else {
            return;
        };
        if self.cut.send_replace(true) {
            return;
        }
        self.shared.lock().unwrap().cuts.push(PublishCut {
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
    if packet[0] >> 4 != 3 {
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
