//! The local HTTP API: ingest, health, metrics, queue statistics, access checks, zones.

use std::sync::Arc;

use axum::body::Body;
use std::collections::HashMap;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::DateTime;
use serde_json::{json, Value};

use crate::access::engine::parse_check;
use crate::access::AccessEngine;
use crate::config::{Config, HttpConfig};
use crate::health::{self, Health};
use crate::ingest::Ingest;
use crate::metrics::Metrics;
use crate::model::{AccessStatus, Direction, NewClocking, Source};
use crate::store::{Change, QueueFilter, QueueStats, SinkId, Store, StoreError, WriterHandle};

#[derive(Clone)]
pub struct ApiState {
    pub config: Arc<Config>,
    pub ingest: Ingest,
    pub store: Arc<Store>,
    pub writer: WriterHandle,
    pub metrics: Arc<Metrics>,
    pub access: AccessEngine,
    pub limiter: Arc<RateLimiter>,
}

pub fn router(state: ApiState) -> Router {
    // /v1/* changes or reveals clockings: behind the bearer token when one is configured.
    // /healthz and /metrics stay open for monitoring.
    let v1 = Router::new()
        .route("/v1/clockings", post(post_clockings))
        .route("/v1/queue/stats", get(queue_stats))
        .route("/v1/queue/clockings", get(queue_clockings))
        .route("/v1/queue/replay-dead-letters", post(replay_dead_letters))
        .route("/v1/access/check", post(access_check))
        .route("/v1/zones", get(zones))
        .route("/v1/zones/{zone}/people", get(zone_people))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .merge(v1)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            rate_limit,
        ))
        .with_state(state)
}

/// Per-client token buckets for clients on other hosts: `per_sec` requests a second, bursts of
/// twice that. Loopback clients are local processes and pass unlimited.
pub struct RateLimiter {
    per_sec: u32,
    buckets: std::sync::Mutex<HashMap<std::net::IpAddr, (f64, std::time::Instant)>>,
}

/// Clients remembered at most; beyond this idle (full) buckets are forgotten, then the least
/// recently seen clients.
const MAX_TRACKED_CLIENTS: usize = 10_000;

impl RateLimiter {
    pub fn new(per_sec: u32) -> RateLimiter {
        RateLimiter {
            per_sec,
            buckets: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// None: allowed. Some(secs): refused, retry after that many seconds.
    pub fn check(&self, ip: std::net::IpAddr, now: std::time::Instant) -> Option<u64> {
        if self.per_sec == 0 || ip.is_loopback() {
            return None;
        }
        let rate = f64::from(self.per_sec);
        let burst = rate * 2.0;
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_TRACKED_CLIENTS && !buckets.contains_key(&ip) {
            // Full buckets first: forgetting them changes nothing.
            buckets.retain(|_, (tokens, at)| {
                *tokens + now.saturating_duration_since(*at).as_secs_f64() * rate < burst
            });
            if buckets.len() >= MAX_TRACKED_CLIENTS {
                // Many clients are all draining their buckets (many addresses at once): forget
                // the least recently seen tenth, so the map stays bounded and a new client costs
                // one scan per thousand arrivals, not one each.
                let mut seen: Vec<std::time::Instant> = buckets.values().map(|b| b.1).collect();
                let (_, cutoff, _) = seen.select_nth_unstable(MAX_TRACKED_CLIENTS / 10);
                let cutoff = *cutoff;
                buckets.retain(|_, (_, at)| *at > cutoff);
            }
        }
        let (tokens, at) = buckets.entry(ip).or_insert((burst, now));
        *tokens = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * rate).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            None
        } else {
            Some(((1.0 - *tokens) / rate).ceil().max(1.0) as u64)
        }
    }
}

async fn rate_limit(
    State(st): State<ApiState>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    let Some(ip) = peer else {
        return next.run(req).await;
    };
    match st.limiter.check(ip, std::time::Instant::now()) {
        None => next.run(req).await,
        Some(retry) => {
            st.metrics
                .http_rate_limited
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut r = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "more than {} requests/s from {ip} (http.rate_limit_per_sec); retry later",
                    st.limiter.per_sec
                ),
            )
            .into_response();
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(retry));
            r
        }
    }
}

async fn require_token(
    State(st): State<ApiState>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(token) = &st.config.http.token else {
        return next.run(req).await;
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Compare without an early exit, so the answer time says nothing about the token.
    let ok = given.is_some_and(|g| {
        let (a, b) = (g.as_bytes(), token.expose().as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    });
    if ok {
        next.run(req).await
    } else {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send the token of http.token_file as Authorization: Bearer <token>",
        )
        .into_response()
    }
}

/// A 4xx/5xx answer in the contract's error shape.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    index: Option<usize>,
    field: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            index: None,
            field: None,
        }
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The contract's `error.code` (`invalid_json`, `unknown_terminal`...).
    pub fn code(&self) -> &'static str {
        self.code
    }

    /// The element of a batch the error is about.
    pub fn index(&self) -> Option<usize> {
        self.index
    }

    fn invalid(index: usize, field: &'static str, code: &'static str, message: String) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code,
            message,
            index: Some(index),
            field: Some(field),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = json!({"code": self.code, "message": self.message});
        if let Some(i) = self.index {
            error["index"] = json!(i);
        }
        if let Some(f) = self.field {
            error["field"] = json!(f);
        }
        (self.status, Json(json!({ "error": error }))).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::Full(_) => ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "store_full",
                format!("{e}; nothing from this request was stored"),
            ),
            _ => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                format!("{e}; nothing from this request was stored"),
            ),
        }
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|m| {
            let m = m.trim().to_ascii_lowercase();
            m == "application/json" || (m.starts_with("application/") && m.ends_with("+json"))
        })
        .unwrap_or(false)
}

/// The whole body within `http.body_timeout_secs` (a client trickling a body holds a connection
/// and a request slot), at most `http.max_body_bytes`.
/// Reads and drops up to about `cap` bytes of `body`.
async fn discard(mut body: Body, cap: usize) {
    use axum::body::HttpBody;
    let mut read = 0usize;
    while read <= cap {
        match std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await {
            Some(Ok(frame)) => read += frame.data_ref().map_or(0, |d| d.len()),
            _ => return,
        }
    }
}

async fn read_body(
    body: Body,
    headers: &HeaderMap,
    http: &HttpConfig,
) -> Result<Vec<u8>, ApiError> {
    let limit = http.max_body_bytes;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request body is larger than http.max_body_bytes ({limit} bytes)"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        // Read and discard what the client sends (bounded in size and time) before answering:
        // closing a connection with unread bytes makes the kernel reset it, and the client sees
        // a broken pipe instead of the 413.
        let _ = tokio::time::timeout(http.body_timeout, discard(body, 4 * limit)).await;
        return Err(too_large());
    }
    let read = tokio::time::timeout(http.body_timeout, axum::body::to_bytes(body, limit));
    let Ok(read) = read.await else {
        return Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!(
                "the request body did not arrive within http.body_timeout_secs ({} s)",
                http.body_timeout.as_secs()
            ),
        ));
    };
    match read {
        Ok(b) => Ok(b.to_vec()),
        Err(e) => {
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(s) = source {
                if s.to_string().contains("length limit") {
                    return Err(too_large());
                }
                source = s.source();
            }
            Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "body_unreadable",
                format!("could not read the request body: {e}"),
            ))
        }
    }
}

async fn post_clockings(State(st): State<ApiState>, req: Request) -> Response {
    match accept_clockings(&st, req).await {
        Ok(r) => r,
        Err(e) => {
            if e.status.is_client_error() {
                st.metrics
                    .rejected
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // `reason`, not `message`: the JSON log has one `message`, the event's. An absent index or
                // field is left out of the line rather than written as `None`.
                tracing::info!(code = e.code, index = e.index, field = e.field, reason = %e.message, "ingest rejected");
            }
            e.into_response()
        }
    }
}

async fn accept_clockings(st: &ApiState, req: Request) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    if !is_json(&parts.headers) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send clockings as JSON with Content-Type: application/json",
        ));
    }
    let body = read_body(body, &parts.headers, &st.config.http).await?;
    let batch = parse_clockings_body(&st.config, &body)?;
    let outcomes = st.ingest.submit(batch).await?;
    let accepted: Vec<Value> = outcomes
        .iter()
        .map(|o| {
            let mut a = json!({"id": o.id.to_string(), "duplicate": !o.stored});
            if let Some(s) = o.status {
                a["status"] = json!(s.as_str());
            }
            a
        })
        .collect();
    Ok((StatusCode::ACCEPTED, Json(json!({ "accepted": accepted }))).into_response())
}

/// The body of `POST /v1/clockings` (one object or an array of them) as new clockings, or the
/// 400 naming the first problem. Pure: nothing is stored, so it is shared by the handler, the
/// fuzz target and its regression test.
pub fn parse_clockings_body(config: &Config, body: &[u8]) -> Result<Vec<NewClocking>, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("body is not valid JSON: {e}"),
        )
    })?;
    let items = match value {
        Value::Array(items) => {
            if items.len() > config.http.max_batch {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "batch_too_large",
                    format!(
                        "{} clockings in one request; at most {} (http.max_batch)",
                        items.len(),
                        config.http.max_batch
                    ),
                ));
            }
            if items.is_empty() {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "empty_batch",
                    "the array holds no clockings",
                ));
            }
            items
        }
        obj @ Value::Object(_) => vec![obj],
        _ => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                "expected a clocking object or an array of them",
            ))
        }
    };
    // Validate everything before storing anything: one bad element rejects the whole request.
    items
        .iter()
        .enumerate()
        .map(|(i, v)| parse_clocking(config, i, v))
        .collect()
}

const FIELDS: [&str; 5] = ["terminal", "badge", "occurred_at", "direction", "status"];

/// Validate one element of an ingest request into a new clocking.
pub fn parse_clocking(config: &Config, i: usize, v: &Value) -> Result<NewClocking, ApiError> {
    let Some(obj) = v.as_object() else {
        return Err(ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_body",
            message: "each element must be a clocking object".into(),
            index: Some(i),
            field: None,
        });
    };
    if let Some(unknown) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        let message = format!("unknown field {unknown:?} (expected {})", FIELDS.join(", "));
        return Err(ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "unknown_field",
            message,
            index: Some(i),
            field: None,
        });
    }
    let string = |field: &'static str, required: bool| -> Result<Option<&str>, ApiError> {
        match obj.get(field) {
            None | Some(Value::Null) if !required => Ok(None),
            None | Some(Value::Null) => Err(ApiError::invalid(
                i,
                field,
                "missing_field",
                format!("{field} is required"),
            )),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(ApiError::invalid(
                i,
                field,
                "invalid_type",
                format!("{field} must be a string"),
            )),
        }
    };
    let terminal = string("terminal", true)?.unwrap_or_default();
    let term = config.terminal(terminal).ok_or_else(|| {
        ApiError::invalid(
            i,
            "terminal",
            "unknown_terminal",
            format!("terminal {terminal:?} is not configured"),
        )
    })?;
    let badge = string("badge", true)?.unwrap_or_default();
    if !crate::model::valid_badge(badge) {
        return Err(ApiError::invalid(
            i,
            "badge",
            "invalid_badge",
            "badge must be 1 to 64 printable characters".into(),
        ));
    }
    let occurred = string("occurred_at", true)?.unwrap_or_default();
    let occurred_at = DateTime::parse_from_rfc3339(occurred).map_err(|e| {
        ApiError::invalid(
            i,
            "occurred_at",
            "invalid_timestamp",
            format!("occurred_at {occurred:?} is not RFC 3339 with an offset ({e}), e.g. \"2026-03-01T08:00:00+01:00\""),
        )
    })?;
    let direction = match string("direction", false)? {
        None => term.direction.unwrap_or_default(),
        Some(d) => d.parse::<Direction>().map_err(|_| {
            ApiError::invalid(
                i,
                "direction",
                "invalid_direction",
                format!("direction {d:?} is not one of in, out, unknown"),
            )
        })?,
    };
    let status = match string("status", false)? {
        None => None,
        Some(s) => Some(s.parse::<AccessStatus>().map_err(|_| {
            ApiError::invalid(
                i,
                "status",
                "invalid_status",
                format!("status {s:?} is not a Protime access status (AccessOk, AccessRefused, WrongPinCode, AlarmCode, AntiPassbackError, OutZone, UnknownBadge)"),
            )
        })?),
    };
    Ok(NewClocking {
        terminal: term.id.clone(),
        badge: badge.to_owned(),
        occurred_at,
        direction,
        status,
        person: None,
        source: Source::Http,
    })
}

async fn stats(store: &Arc<Store>) -> Result<QueueStats, StoreError> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || store.stats())
        .await
        .map_err(|e| StoreError::Io(e.to_string()))?
}

async fn healthz(State(st): State<ApiState>) -> Response {
    let stats = stats(&st.store).await;
    let health = health(&st, stats);
    let code = match health.status {
        health::Status::Ok => StatusCode::OK,
        health::Status::StoreUnwritable => StatusCode::SERVICE_UNAVAILABLE,
    };
    (code, Json(health)).into_response()
}

/// The health document: the store (as `stats` read it), the uplinks, terminals, sources, zones.
fn health(st: &ApiState, stats: Result<QueueStats, StoreError>) -> Health {
    use std::sync::atomic::Ordering::Relaxed;
    let store_error = st.writer.last_error();
    let writable = store_error.is_none() && stats.is_ok();
    let m = &st.metrics;
    let protime = st.config.sinks.protime.is_some();
    let stats = stats.map_err(|e| e.to_string());
    Health {
        dead_letters: match &stats {
            Ok(s) if protime => Some(s.sinks.iter().map(|k| k.dead_letters).sum()),
            _ => None,
        },
        delivered: [
            ("mqtt".to_owned(), m.mqtt.delivered.load(Relaxed)),
            ("protime".to_owned(), m.protime.delivered.load(Relaxed)),
        ]
        .into(),
        mqtt: st.config.mqtt.is_some().then(|| health::Mqtt {
            access_connected: m.access.mqtt_connected.load(Relaxed),
            connected: m.mqtt.connected.load(Relaxed),
            in_flight: m.mqtt.in_flight.load(Relaxed),
            last_error: m.mqtt.last_error(),
        }),
        oldest_pending_age_secs: stats.as_ref().ok().map(|s| {
            s.sinks
                .iter()
                .filter_map(|k| k.oldest_pending_age_secs)
                .reduce(f64::max)
        }),
        orphaned: stats.as_ref().map(health::orphaned).unwrap_or_default(),
        pending: stats.as_ref().ok().map(|s| {
            s.sinks
                .iter()
                .map(|k| (k.sink.clone(), k.pending))
                .collect()
        }),
        protime: protime.then(|| health::Protime {
            last_error: m.protime.last_error(),
            reachable: m.protime.connected.load(Relaxed),
        }),
        site: st.config.agent.site.clone(),
        sources: m
            .sources
            .iter()
            .map(|(name, h)| ((*name).to_owned(), health::Source::from(&**h)))
            .collect(),
        status: if writable {
            health::Status::Ok
        } else {
            health::Status::StoreUnwritable
        },
        store: health::Store {
            bytes: stats.as_ref().ok().map(|s| s.store_bytes),
            clockings: stats.as_ref().ok().map(|s| s.clockings_stored),
            error: store_error.or_else(|| stats.as_ref().err().cloned()),
            unsynced_confirmations: st.writer.unsynced_confirmations(),
            writable,
        },
        terminals: m
            .terminals
            .iter()
            .map(|(id, t)| (id.clone(), health::Terminal::from(&**t)))
            .collect(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        zones: st
            .access
            .zone_counts(chrono::Utc::now())
            .into_iter()
            .map(|(z, n)| (z, n as u64))
            .collect(),
    }
}

async fn metrics(State(st): State<ApiState>) -> Response {
    let stats = stats(&st.store).await.ok();
    let zones = st.access.zone_counts(chrono::Utc::now());
    let text = st
        .metrics
        .render(stats.as_ref(), st.writer.last_error().is_none(), &zones);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// A page of stored clockings: `{"clockings":[...], "next_after": seq|null}`.
async fn queue_clockings(
    State(st): State<ApiState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", m);
    let filter = QueueFilter::from_query(&q).map_err(bad)?;
    let after = match q.get("after") {
        Some(a) => Some(
            a.parse::<u64>()
                .map_err(|_| bad(format!("after {a:?} is not a number")))?,
        ),
        None => None,
    };
    let limit = match q.get("limit") {
        Some(l) => l
            .parse::<usize>()
            .map_err(|_| bad(format!("limit {l:?} is not a number")))?,
        None => 500,
    }
    .clamp(1, 5000);
    let store = st.store.clone();
    let page = tokio::task::spawn_blocking(move || store.list(&filter, after, limit))
        .await
        .map_err(|e| StoreError::Io(e.to_string()))??;
    let next_after = (page.len() == limit)
        .then(|| page.last().map(|q| q.seq))
        .flatten();
    Ok(Json(json!({
        "clockings": page.iter().map(|q| q.to_json()).collect::<Vec<_>>(),
        "next_after": next_after,
    })))
}

async fn replay_dead_letters(
    State(st): State<ApiState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let name = q.get("sink").map(String::as_str).unwrap_or("protime");
    let sink = SinkId::from_name(name).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            format!("unknown sink {name:?}"),
        )
    })?;
    let replayed = st.writer.change(Change::Replay { sink }).await?;
    tracing::info!(sink = name, replayed, "dead letters put back in the queue");
    Ok(Json(json!({ "sink": name, "replayed": replayed })))
}

async fn queue_stats(State(st): State<ApiState>) -> Result<Json<QueueStats>, ApiError> {
    Ok(Json(stats(&st.store).await?))
}

/// `POST /v1/access/check`: the status a clocking would get now, recording nothing.
async fn access_check(State(st): State<ApiState>, req: Request) -> Result<Json<Value>, ApiError> {
    let (parts, body) = req.into_parts();
    if !is_json(&parts.headers) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the check as JSON with Content-Type: application/json",
        ));
    }
    let body = read_body(body, &parts.headers, &st.config.http).await?;
    let value: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("body is not valid JSON: {e}"),
        )
    })?;
    let check = parse_check(&st.config, &value, &[]).map_err(|e| ApiError {
        status: StatusCode::BAD_REQUEST,
        code: e.code,
        message: e.message,
        index: None,
        field: e.field,
    })?;
    Ok(Json(st.access.check(&check)))
}

/// `GET /v1/zones`: every zone with how many are inside.
async fn zones(State(st): State<ApiState>) -> Json<Value> {
    Json(st.access.zones(chrono::Utc::now()))
}

/// `GET /v1/zones/{zone}/people`: the muster list.
async fn zone_people(
    State(st): State<ApiState>,
    Path(zone): Path<String>,
) -> Result<Json<Value>, ApiError> {
    st.access
        .zone(&zone, chrono::Utc::now())
        .map(Json)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_zone",
                format!("zone {zone:?} is not declared in [[zones]]"),
            )
        })
}

/// Serves the API on `listener` until `stop` turns true, then lets requests in progress finish.
///
/// `axum::serve` has no header timeout and no connection cap, so a slowloris client (many
/// connections, each sending its request head a byte at a time) held descriptors the store and
/// MQTT share. Here:
/// - hyper closes a connection that has not delivered a complete request head within
///   `http.header_timeout_secs` of opening or of its previous answer (idle keep-alives too);
/// - at most `http.max_connections` connections are served. At the cap a new connection is
///   accepted and the oldest connection *without a request in progress* (idle, or still sending
///   its head) is closed for it. Waiting instead would let a few hundred idle sockets lock out
///   every new client for a header timeout, and refusing new connections would do the same;
///   closing an idle one costs its client nothing but a reconnect, and a request in progress is
///   never cut. Only when every connection has a request in progress does accepting wait.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    config: &HttpConfig,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let max = config.max_connections;
    let permits = Arc::new(tokio::sync::Semaphore::new(max));
    let conns = Arc::new(Connections::default());
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(config.header_timeout);
    let mut next_id = 0u64;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|s| *s) => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of descriptors (EMFILE) or memory: pause instead of spinning, so that
                // connections can close in the meantime.
                tracing::warn!(error = %e, "HTTP accept failed");
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => continue,
                    _ = stop.wait_for(|s| *s) => break,
                }
            }
        };
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => match make_room(&permits, &conns, &mut stop).await {
                Some(p) => p,
                None => break,
            },
        };
        let slot = Arc::new(Slot::default());
        let id = next_id;
        next_id += 1;
        let registered = conns.register(id, slot.clone());
        let service = connection_service(app.clone(), peer, slot.clone(), conns.clone());
        let http1 = http1.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _registered = registered;
            let conn = http1.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                // The connection first: an answer already produced is written before a close.
                biased;
                _ = conn.as_mut() => return,
                // Chosen to make room while idle: dropping the connection closes the socket.
                _ = slot.close.notified() => return,
                _ = stop.wait_for(|s| *s) => {}
            }
            if !slot.claim_idle() {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
        });
    }
    drop(listener);
    // Every connection task holds a permit until it ends.
    let _ = permits.acquire_many(max as u32).await;
}

/// A connection's request state: only an idle connection may be closed to make room.
const IDLE: u8 = 0;
const BUSY: u8 = 1;
const CLOSING: u8 = 2;

#[derive(Default)]
struct Slot {
    state: std::sync::atomic::AtomicU8,
    close: tokio::sync::Notify,
}

impl Slot {
    /// IDLE → CLOSING; false when a request is in progress.
    fn claim_idle(&self) -> bool {
        use std::sync::atomic::Ordering::{AcqRel, Acquire};
        self.state
            .compare_exchange(IDLE, CLOSING, AcqRel, Acquire)
            .is_ok()
    }
}

#[derive(Default)]
struct Connections {
    /// Open connections, oldest first (ids in accept order).
    open: std::sync::Mutex<std::collections::BTreeMap<u64, Arc<Slot>>>,
    /// A request finished: a connection may have become idle.
    went_idle: tokio::sync::Notify,
}

impl Connections {
    fn register(self: &Arc<Self>, id: u64, slot: Arc<Slot>) -> Registered {
        self.lock().insert(id, slot);
        Registered {
            conns: self.clone(),
            id,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<u64, Arc<Slot>>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tell the oldest idle connection to close; false when every one has a request in progress.
    fn close_oldest_idle(&self) -> bool {
        let open = self.lock();
        match open.values().find(|slot| slot.claim_idle()) {
            Some(slot) => {
                slot.close.notify_one();
                true
            }
            None => false,
        }
    }
}

/// Removes a connection from [`Connections`] when its task ends.
struct Registered {
    conns: Arc<Connections>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.conns.lock().remove(&self.id);
    }
}

/// At the cap: close the oldest idle connection and take its permit once its task ended; while
/// every connection is busy, retry whenever a request finishes. None: the agent is stopping.
async fn make_room(
    permits: &Arc<tokio::sync::Semaphore>,
    conns: &Connections,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    loop {
        let closing = conns.close_oldest_idle();
        tokio::select! {
            permit = permits.clone().acquire_owned() => return permit.ok(),
            _ = conns.went_idle.notified(), if !closing => {}
            _ = stop.wait_for(|s| *s) => return None,
        }
    }
}

/// The router for one connection: marks the connection busy while a request is handled and
/// gives handlers the peer address (`ConnectInfo`, for the rate limiter).
fn connection_service(
    app: Router,
    peer: std::net::SocketAddr,
    slot: Arc<Slot>,
    conns: Arc<Connections>,
) -> impl hyper::service::Service<
    hyper::Request<hyper::body::Incoming>,
    Response = Response,
    Error = std::convert::Infallible,
    Future = impl std::future::Future<Output = Result<Response, std::convert::Infallible>> + Send,
> + Clone {
    use std::sync::atomic::Ordering::{AcqRel, Acquire, Release};
    use tower::ServiceExt;
    hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let (app, slot, conns) = (app.clone(), slot.clone(), conns.clone());
        async move {
            if slot
                .state
                .compare_exchange(IDLE, BUSY, AcqRel, Acquire)
                .is_err()
            {
                // Chosen to make room, or the agent is stopping: this connection is closing.
                let mut r = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "connection_closing",
                    "this connection is being closed; send the request on a new connection",
                )
                .into_response();
                r.headers_mut().insert(
                    header::CONNECTION,
                    header::HeaderValue::from_static("close"),
                );
                return Ok(r);
            }
            let mut req = req.map(Body::new);
            req.extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
            let answer = app.oneshot(req).await;
            slot.state.store(IDLE, Release);
            conns.went_idle.notify_one();
            answer
        }
    })
}

fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

#[cfg(test)]
mod tests {
    use super::RateLimiter;
    use std::net::IpAddr;
    use std::time::{Duration, Instant};

    #[test]
    fn remote_clients_get_a_burst_then_the_rate_and_loopback_is_never_limited() {
        let limiter = RateLimiter::new(10);
        let remote: IpAddr = "192.168.1.20".parse().unwrap();
        let other: IpAddr = "192.168.1.21".parse().unwrap();
        let t0 = Instant::now();
        let allowed = (0..100)
            .filter(|_| limiter.check(remote, t0).is_none())
            .count();
        assert_eq!(allowed, 20, "a burst of twice the rate");
        assert_eq!(limiter.check(remote, t0), Some(1), "retry after a second");
        assert!(limiter.check(other, t0).is_none(), "buckets are per client");
        // Half a second later five more are allowed.
        let t1 = t0 + Duration::from_millis(500);
        let allowed = (0..100)
            .filter(|_| limiter.check(remote, t1).is_none())
            .count();
        assert_eq!(allowed, 5);
        for ip in ["127.0.0.1", "::1"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!((0..1000).all(|_| limiter.check(ip, t0).is_none()));
        }
        let off = RateLimiter::new(0);
        assert!((0..1000).all(|_| off.check(remote, t0).is_none()));
    }

    #[test]
    fn the_client_map_stays_bounded_when_every_client_is_draining() {
        let limiter = RateLimiter::new(1);
        let t0 = Instant::now();
        // Each client spends a token, so no bucket is full and none is forgotten for being idle.
        for i in 0..(super::MAX_TRACKED_CLIENTS as u32 * 3) {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            let at = t0 + Duration::from_micros(u64::from(i));
            assert!(limiter.check(ip, at).is_none());
        }
        let tracked = limiter.buckets.lock().unwrap().len();
        assert!(
            tracked <= super::MAX_TRACKED_CLIENTS,
            "{tracked} clients tracked"
        );
        // The most recent client is still remembered (and limited).
        let last = IpAddr::from(std::net::Ipv4Addr::from(
            0x0a00_0000 + super::MAX_TRACKED_CLIENTS as u32 * 3 - 1,
        ));
        let later = t0 + Duration::from_millis(40);
        assert!(limiter.check(last, later).is_none());
        assert!(limiter.check(last, later).is_some(), "its bucket was kept");
    }
}
