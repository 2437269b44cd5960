//! Fake servers of the three vendor clouds badgegate talks to (Protime, Anviz CrossChex Cloud,
//! Aktion). The real clouds cannot be reached from tests or from `badgegate demo`, so these fakes
//! reproduce the documented wire formats, quirks and error envelopes (see
//! `shared/reference/*.md` and `shared/seeds/`), and add knobs to inject the faults a client must
//! survive.
//!
//! Shared here: the HTTP plumbing (a listener whose connections can be cut mid-request, so a
//! client really sees a lost answer), the fault plan and traffic counters ([`Wire`]), and small
//! pure helpers (query/form decoding, base64url, GUIDs).

pub mod aktion;
pub mod crosschex;
pub mod protime;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::serve::{IncomingStream, Listener};
use axum::Router;
use rand::Rng;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Largest request body a fake accepts; larger bodies get 413 (no vendor documents a limit).
const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// How many requests [`Wire::log`] keeps (oldest dropped first).
const LOG_CAPACITY: usize = 2000;

/// A fault to inject into the next matching request(s). Each fake renders it in its vendor's own
/// way (envelope, status code), documented at the fake's `fault_response`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// HTTP 500 (in the vendor's error envelope where it has one, else the HTML page of the
    /// vendor's front server); nothing is processed.
    InternalError,
    /// HTTP 503, rendered like [`Fault::InternalError`]; nothing is processed.
    Unavailable,
    /// The vendor's "slow down" answer: Protime 429 + `Retry-After`, CrossChex HTTP 200
    /// `FREQUENT_REQUEST`, Aktion 401 with code 1008. Nothing is processed.
    RateLimited { retry_after_secs: u64 },
    /// HTTP 200 with a body that is not JSON (a proxy's error page); nothing is processed.
    GarbageBody,
    /// The connection is cut before the request is processed: no side effect, no answer.
    DropConnection,
    /// The request IS processed (a clocking gets stored) and then the connection is cut with no
    /// answer: the "lost answer" that makes a non-idempotent POST dangerous.
    ProcessThenDrop,
    /// The request is processed and answered normally, but only after this delay (longer than a
    /// client's timeout it is another way to lose the answer after the side effect).
    SlowAnswer(Duration),
}

#[derive(Debug)]
struct FaultRule {
    endpoint: Option<&'static str>,
    fault: Fault,
    remaining: u32,
}

/// One request as a fake saw it, for tests to inspect (headers, body) after the fact.
#[derive(Debug, Clone)]
pub struct Received {
    /// The fake's endpoint name (see each fake's `endpoint` constants).
    pub endpoint: &'static str,
    pub method: String,
    /// Path and query exactly as sent.
    pub uri: String,
    /// Header names are lowercase.
    pub headers: Vec<(String, String)>,
    /// The body, lossily decoded as UTF-8.
    pub body: String,
    /// The status answered; `None` when the connection was cut instead.
    pub status: Option<u16>,
}

#[derive(Debug, Default)]
struct WireState {
    rules: Vec<FaultRule>,
    delay: Duration,
    counts: HashMap<&'static str, u64>,
    total: u64,
    log: VecDeque<Received>,
    conns: Vec<Weak<KillSwitch>>,
}

/// Transport-level knobs and observations shared by every fake: fault injection, slow answers,
/// outages, request counters ("no request storm") and a log of what was received. Cloneable; all
/// clones control the same server.
#[derive(Debug, Clone)]
pub struct Wire {
    state: Arc<Mutex<WireState>>,
    outage: Arc<AtomicBool>,
    total_tx: Arc<watch::Sender<u64>>,
}

impl Default for Wire {
    fn default() -> Self {
        Wire {
            state: Arc::default(),
            outage: Arc::default(),
            total_tx: Arc::new(watch::channel(0).0),
        }
    }
}

/// Locks a mutex, recovering the data if a panicking thread poisoned it (a fake must keep
/// answering even after a test assertion failed on another task).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Wire {
    /// The next `n` requests (any endpoint) get `fault`.
    pub fn fail_next(&self, n: u32, fault: Fault) {
        self.push_rule(None, n, fault);
    }

    /// The next `n` requests to `endpoint` get `fault`; other endpoints are unaffected.
    pub fn fail_next_on(&self, endpoint: &'static str, n: u32, fault: Fault) {
        self.push_rule(Some(endpoint), n, fault);
    }

    fn push_rule(&self, endpoint: Option<&'static str>, n: u32, fault: Fault) {
        if n > 0 {
            lock(&self.state).rules.push(FaultRule {
                endpoint,
                fault,
                remaining: n,
            });
        }
    }

    /// Forgets all pending faults.
    pub fn clear_faults(&self) {
        lock(&self.state).rules.clear();
    }

    /// Every answer is held back this long after processing (zero = no delay).
    pub fn set_delay(&self, delay: Duration) {
        lock(&self.state).delay = delay;
    }

    /// While on, open connections are cut and new ones are closed right after accept, so clients
    /// see the cloud as unreachable. The data survives; switch it off to "restore the uplink".
    pub fn set_outage(&self, on: bool) {
        self.outage.store(on, Ordering::SeqCst);
        if on {
            self.kill_all();
        }
    }

    /// Requests received so far on `endpoint` (including faulted ones).
    pub fn count(&self, endpoint: &str) -> u64 {
        lock(&self.state).counts.get(endpoint).copied().unwrap_or(0)
    }

    /// Requests received so far on all endpoints.
    pub fn total(&self) -> u64 {
        lock(&self.state).total
    }

    /// The most recent requests, oldest first.
    pub fn log(&self) -> Vec<Received> {
        lock(&self.state).log.iter().cloned().collect()
    }

    /// The values of query parameter `name` in the logged requests, oldest first (e.g. the
    /// tokens a client sent as `Token=`).
    pub fn query_values(&self, name: &str) -> Vec<String> {
        let prefix = format!("{name}=");
        lock(&self.state)
            .log
            .iter()
            .filter_map(|r| {
                r.uri
                    .split(['?', '&'])
                    .find_map(|p| p.strip_prefix(prefix.as_str()))
                    .map(str::to_owned)
            })
            .collect()
    }

    /// Waits until `endpoint` has received at least `at_least` requests (counted once they are
    /// fully processed), or `timeout` passes. Returns whether the count was reached.
    pub async fn wait_for(&self, endpoint: &str, at_least: u64, timeout: Duration) -> bool {
        let mut rx = self.total_tx.subscribe();
        let reached = rx.wait_for(|_| self.count(endpoint) >= at_least);
        let ok = matches!(tokio::time::timeout(timeout, reached).await, Ok(Ok(_)));
        ok
    }

    fn take_fault(&self, endpoint: &'static str) -> Option<Fault> {
        let mut st = lock(&self.state);
        let idx = st
            .rules
            .iter()
            .position(|r| r.endpoint.is_none_or(|e| e == endpoint))?;
        let rule = &mut st.rules[idx];
        rule.remaining -= 1;
        let fault = rule.fault.clone();
        if rule.remaining == 0 {
            st.rules.remove(idx);
        }
        Some(fault)
    }

    fn delay(&self) -> Duration {
        lock(&self.state).delay
    }

    fn record(&self, req: &FakeRequest, endpoint: &'static str, status: Option<u16>) {
        {
            let mut st = lock(&self.state);
            *st.counts.entry(endpoint).or_insert(0) += 1;
            st.total += 1;
            if st.log.len() >= LOG_CAPACITY {
                st.log.pop_front();
            }
            st.log.push_back(Received {
                endpoint,
                method: req.method.to_string(),
                uri: req.uri.clone(),
                headers: req
                    .headers
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.as_str().to_string(),
                            String::from_utf8_lossy(v.as_bytes()).into_owned(),
                        )
                    })
                    .collect(),
                body: String::from_utf8_lossy(&req.body).into_owned(),
                status,
            });
        }
        self.total_tx.send_modify(|t| *t += 1);
    }

    fn register(&self, switch: &Arc<KillSwitch>) {
        let mut st = lock(&self.state);
        st.conns.retain(|w| w.strong_count() > 0);
        st.conns.push(Arc::downgrade(switch));
    }

    fn kill_all(&self) {
        let conns = std::mem::take(&mut lock(&self.state).conns);
        for switch in conns.iter().filter_map(Weak::upgrade) {
            switch.kill();
        }
    }
}

/// A request after the body was read, handed to a vendor's pure handler.
#[derive(Debug)]
pub(crate) struct FakeRequest {
    pub method: Method,
    pub path: String,
    /// Raw (still percent-encoded) query string, without `?`.
    pub raw_query: String,
    /// Path and query as sent.
    pub uri: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl FakeRequest {
    /// Decoded query pairs in order.
    pub fn query(&self) -> Vec<(String, String)> {
        parse_pairs(&self.raw_query)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// What a fake plugs into the shared plumbing.
pub(crate) trait Vendor: Clone + Send + Sync + 'static {
    fn wire(&self) -> &Wire;
    /// The endpoint name used for counters and targeted faults.
    fn endpoint(&self, req: &FakeRequest) -> &'static str;
    /// The vendor's rendering of an injected fault (never called for the drop/slow variants).
    fn fault_response(&self, fault: &Fault, req: &FakeRequest) -> Response;
    /// Processes the request against the fake's state. Synchronous on purpose: state lives behind
    /// a std mutex that must never be held across an await.
    fn handle(&self, req: &FakeRequest) -> Response;
}

async fn dispatch<V: Vendor>(
    State(vendor): State<V>,
    ConnectInfo(conn): ConnectInfo<Conn>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let Ok(body) = axum::body::to_bytes(body, MAX_BODY_BYTES).await else {
        return StatusCode::PAYLOAD_TOO_LARGE.into_response();
    };
    let req = FakeRequest {
        method: parts.method,
        path: parts.uri.path().to_string(),
        raw_query: parts.uri.query().unwrap_or("").to_string(),
        uri: parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_default(),
        headers: parts.headers,
        body,
    };
    let wire = vendor.wire();
    let endpoint = vendor.endpoint(&req);
    let mut delay = wire.delay();
    let response = match wire.take_fault(endpoint) {
        Some(Fault::DropConnection) => {
            conn.switch.kill();
            wire.record(&req, endpoint, None);
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
        Some(Fault::ProcessThenDrop) => {
            let _lost = vendor.handle(&req);
            conn.switch.kill();
            wire.record(&req, endpoint, None);
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
        Some(Fault::SlowAnswer(d)) => {
            delay = delay.max(d);
            vendor.handle(&req)
        }
        Some(fault) => vendor.fault_response(&fault, &req),
        None => vendor.handle(&req),
    };
    wire.record(&req, endpoint, Some(response.status().as_u16()));
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    response
}

/// A running fake: its address and the task serving it.
#[derive(Debug)]
pub(crate) struct Running {
    addr: SocketAddr,
    wire: Wire,
    task: JoinHandle<()>,
}

impl Running {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, cuts every open connection and waits for the server task to end.
    pub async fn shutdown(self) {
        self.task.abort();
        let _ = self.task.await;
        self.wire.kill_all();
    }
}

/// Binds `addr` and serves `vendor` on it until [`Running::shutdown`].
pub(crate) async fn serve<V: Vendor>(addr: SocketAddr, vendor: V) -> io::Result<Running> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let wire = vendor.wire().clone();
    let app = Router::new()
        .fallback(dispatch::<V>)
        .with_state(vendor)
        .into_make_service_with_connect_info::<Conn>();
    let listener = FakeListener {
        inner: listener,
        wire: wire.clone(),
    };
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, marker = super::FAKES_MARKER, "fake cloud server stopped");
        }
    });
    Ok(Running { addr, wire, task })
}

/// Cuts one connection from the handler side. Waking the connection's task makes hyper notice
/// at once, even while it idles in a read.
#[derive(Debug, Default)]
struct KillSwitch {
    killed: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

impl KillSwitch {
    fn kill(&self) {
        let waker = {
            let mut slot = lock(&self.waker);
            self.killed.store(true, Ordering::SeqCst);
            slot.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Registers the waker first, then checks the flag, under the same lock `kill` sets it: a
    /// kill can never slip between the check and the registration.
    fn check(&self, cx: &Context<'_>) -> io::Result<()> {
        let mut slot = lock(&self.waker);
        if self.killed.load(Ordering::SeqCst) {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "connection cut by fault injection",
            ));
        }
        match slot.as_ref() {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => *slot = Some(cx.waker().clone()),
        }
        Ok(())
    }
}

/// Per-connection info handed to handlers through `ConnectInfo`.
#[derive(Debug, Clone)]
pub(crate) struct Conn {
    switch: Arc<KillSwitch>,
}

impl Connected<IncomingStream<'_, FakeListener>> for Conn {
    fn connect_info(stream: IncomingStream<'_, FakeListener>) -> Self {
        stream.remote_addr().clone()
    }
}

struct FakeListener {
    inner: TcpListener,
    wire: Wire,
}

impl Listener for FakeListener {
    type Io = KillableStream;
    type Addr = Conn;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, _peer)) => {
                    if self.wire.outage.load(Ordering::SeqCst) {
                        drop(stream);
                        continue;
                    }
                    let switch = Arc::new(KillSwitch::default());
                    self.wire.register(&switch);
                    let conn = Conn {
                        switch: switch.clone(),
                    };
                    return (
                        KillableStream {
                            inner: stream,
                            switch,
                        },
                        conn,
                    );
                }
                // Transient accept errors (e.g. too many open files): back off briefly, retry.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(Conn {
            switch: Arc::default(),
        })
    }
}

/// A TCP stream that fails every operation once its [`KillSwitch`] is thrown, so hyper drops the
/// connection without writing the response.
struct KillableStream {
    inner: TcpStream,
    switch: Arc<KillSwitch>,
}

impl AsyncRead for KillableStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.switch.check(cx)?;
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for KillableStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.switch.check(cx)?;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.switch.check(cx)?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

// ---------------------------------------------------------------------------------------------
// Small pure helpers shared by the fakes.

/// A JSON answer with the given status; the body is produced by the caller (already serialised so
/// vendors can post-process the text, e.g. Aktion's `\/Date(..)\/`).
pub(crate) fn json_text(status: StatusCode, body: String) -> Response {
    let mut resp = (status, body).into_response();
    resp.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    resp
}

/// Serialises `value` (infallible for the plain structs used here) into a JSON answer.
pub(crate) fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_string(value) {
        Ok(body) => json_text(status, body),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// The body used for [`Fault::GarbageBody`]: what a misbehaving proxy sends with a 200.
pub(crate) fn garbage() -> Response {
    let mut resp = (
        StatusCode::OK,
        "<html><body><h1>502 Bad Gateway</h1></body></html>\u{0}{\"trunc",
    )
        .into_response();
    resp.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// Decodes `a=b&c=d` (query strings and `application/x-www-form-urlencoded` bodies): `+` is a
/// space, `%XX` is a byte; a key without `=` gets an empty value (Protime's bare `&delta`).
pub(crate) fn parse_pairs(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(p), String::new()),
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex_val(bytes[i + 1]), hex_val(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

const B64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Base64url without padding, as in JWT segments.
pub(crate) fn base64url(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(char::from(B64URL[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

/// `now + lifetime`, saturating far in the future instead of overflowing on absurd knobs.
pub(crate) fn deadline(lifetime: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(lifetime)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400))
}

/// Random bytes as lowercase hex.
pub(crate) fn random_hex(bytes: usize) -> String {
    let mut rng = rand::rng();
    (0..bytes)
        .map(|_| format!("{:02x}", rng.random::<u8>()))
        .collect()
}

/// A random GUID in the usual 8-4-4-4-12 lowercase form.
pub(crate) fn guid() -> String {
    let h = random_hex(16);
    crate::clouds::hyphenated_guid(&h)
}

/// Test-only helpers shared by the fakes' tests.
#[cfg(test)]
pub(crate) mod testutil {
    /// Decodes base64url without padding (the inverse of [`super::base64url`]).
    pub fn base64url_decode(s: &str) -> Option<Vec<u8>> {
        let mut bits = 0u32;
        let mut nbits = 0;
        let mut out = Vec::new();
        for c in s.bytes() {
            let v = super::B64URL.iter().position(|&b| b == c)? as u32;
            bits = (bits << 6) | v;
            nbits += 6;
            if nbits >= 8 {
                nbits -= 8;
                out.push((bits >> nbits) as u8);
                bits &= (1 << nbits) - 1;
            }
        }
        Some(out)
    }

    /// `path?k=v&..` with every value percent-encoded (the dev-dependency reqwest has no `query`
    /// feature).
    pub fn with_query(path: &str, pairs: &[(&str, &str)]) -> String {
        let enc = |s: &str| {
            s.bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                        char::from(b).to_string()
                    }
                    _ => format!("%{b:02X}"),
                })
                .collect::<String>()
        };
        let mut url = path.to_string();
        for (i, (k, v)) in pairs.iter().enumerate() {
            let sep = if i == 0 && !path.contains('?') {
                '?'
            } else {
                '&'
            };
            url.push(sep);
            url.push_str(&enc(k));
            url.push('=');
            url.push_str(&enc(v));
        }
        url
    }

    /// A client with a short timeout so a lost answer fails the test quickly instead of hanging.
    pub fn client() -> reqwest::Client {
        crate::clouds::install_crypto_provider();
        reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .user_agent("badgegate-tests/0.1 (badgegate)")
            .build()
            .expect("reqwest client")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_decode_plus_percent_and_bare_keys() {
        let p = parse_pairs("filter=date+ge+%272024-01-01%27&delta&x=%zz&&y=a%3Db");
        assert_eq!(
            p,
            vec![
                ("filter".into(), "date ge '2024-01-01'".into()),
                ("delta".into(), String::new()),
                ("x".into(), "%zz".into()),
                ("y".into(), "a=b".into()),
            ]
        );
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("abc%"), "abc%");
    }

    #[test]
    fn base64url_round_trips() {
        for s in [
            "",
            "f",
            "fo",
            "foo",
            "foob",
            "fooba",
            "foobar",
            "\u{ff}\u{fe}?>",
        ] {
            let enc = base64url(s.as_bytes());
            assert!(!enc.contains('='));
            assert_eq!(
                testutil::base64url_decode(&enc).as_deref(),
                Some(s.as_bytes())
            );
        }
        assert_eq!(base64url(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64url(b"fo"), "Zm8");
    }

    /// "No panics on any request input": every hostile request still gets an HTTP answer (a
    /// panicking handler would cut the connection instead).
    #[tokio::test]
    async fn hostile_requests_always_get_an_answer() {
        let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let protime = protime::FakeProtime::start(any).await.expect("protime");
        let crosschex = crosschex::FakeCrossChex::start(any)
            .await
            .expect("crosschex");
        let aktion = aktion::FakeAktion::start(any).await.expect("aktion");
        let http = testutil::client();
        let form = format!(
            "grant_type=client_credentials&client_id={}&client_secret={}",
            protime::DEFAULT_CLIENT_ID,
            protime::DEFAULT_CLIENT_SECRET
        );
        let token: serde_json::Value = http
            .post(protime.token_url())
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form)
            .send()
            .await
            .expect("token")
            .json()
            .await
            .expect("json");
        let bearer = token["access_token"]
            .as_str()
            .unwrap_or_default()
            .to_string();

        let nested = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
        let bodies: Vec<Vec<u8>> = vec![
            vec![],
            b"null".to_vec(),
            b"[]".to_vec(),
            b"\"x\"".to_vec(),
            vec![0xff, 0xfe, 0x00, 0x80],
            nested.into_bytes(),
            br#"{"person":5,"date":7,"timeOfDayInMinutes":1e400,"kind":[],"terminal":"x"}"#.to_vec(),
            br#"{"person":{"id":1e300},"timeOfDayInMinutes":-9223372036854775808}"#.to_vec(),
            br#"{"person":{"externalReferences":{"@badge-number":1,"x":2}},"terminal":{"id":"7"}}"#.to_vec(),
            br#"{"header":{"nameSpace":1,"nameAction":null},"payload":[]}"#.to_vec(),
            br#"{"header":{"nameSpace":"attendance.record","nameAction":"getrecord","version":"1.0","requestId":"x","timestamp":"t"},"authorize":{"token":5},"payload":{"page":18446744073709551615,"per_page":"-1"}}"#.to_vec(),
            "{\"UserLogin\":\"\u{e4}\",\"ApiKey\":\"\u{e4}\u{e4}\u{e4}\u{e4}\u{e4}\u{e4}\u{e4}\u{e4}\u{e4}\u{e4}\u{e4}\u{e4}\"}".as_bytes().to_vec(),
        ];
        let queries = [
            "",
            "filter=",
            "filter=date%20ge%20'",
            "filter=person%20in%20(",
            "filter=date%20ge%20'%C3%A4'%20and%20date%20le%20'2024-01-01'",
            "filter=date+ge+'2024-01-01'+and+date+le+'2024-01-02'&externalReferences=(",
            "filter=date+ge+'2024-01-01'&delta&continuationToken=%FF",
            "deltaToken=&externalReferences=(people,@badge-number",
            "PageNumber=99999999999999999999&PageSize=4294967295&PersonId=x&Token=00000000-0000-0000-0000-000000000000",
            "LastSync=/Date(99999999999999999999)/&C4Identification=%00&TimeFrom=+999999-01-01T00:00:00",
            "%FF%FE=%&&&=",
        ];
        let mut urls = Vec::new();
        for q in queries {
            for path in [
                "/connector/protimeapi/api/v1/clockings",
                "/connector/protimeapi/api/v1/access-clockings",
                "/connector/protimeapi/api/v1/access-clockings/99999999999999999999",
                "/connector/protimeapi/api/v1/delta/access-clockings",
                "/connector/protimeapi/api/v1/people",
            ] {
                urls.push(format!("http://{}{path}?{q}", protime.addr()));
            }
            for path in [
                "login",
                "attendance/getScheduledShift",
                "attendance/getPassBySensor",
                "person/get",
                "HwStructure/getC4HwEvents",
            ] {
                urls.push(format!("{}{path}?{q}", aktion.base_url()));
            }
            urls.push(format!("{}?{q}", crosschex.base_url()));
        }
        urls.push(protime.token_url());
        for url in &urls {
            for method in [reqwest::Method::GET, reqwest::Method::POST] {
                for body in &bodies {
                    let resp = http
                        .request(method.clone(), url)
                        .bearer_auth(&bearer)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await;
                    assert!(resp.is_ok(), "{method} {url} {body:?}: {resp:?}");
                }
            }
        }
        protime.shutdown().await;
        crosschex.shutdown().await;
        aktion.shutdown().await;
    }

    #[test]
    fn guid_shape() {
        let g = guid();
        assert_eq!(g.len(), 36);
        assert_eq!(g.matches('-').count(), 4);
    }
}
