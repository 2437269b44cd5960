//! Fake Anviz CrossChex Cloud API, built from the vendor's published pages (not from the
//! client's structs). Every call is `POST /` with a JSON envelope
//! `{"header":{nameSpace,nameAction,version,requestId,timestamp},"authorize":{type,token},"payload":{..}}`;
//! only the two calls below exist. Errors ALWAYS come with HTTP 200 and a `System/Exception`
//! body, so a client must inspect the body. Per endpoint, the page it follows:
//!
//! - `authorize.token/token` — the official community post "How to use API to get the records
//!   from the CrossChex Cloud",
//!   `https://community.anviz.com/t/how-to-use-api-to-get-the-records-from-the-crosschex-cloud/726`
//!   (seed `shared/seeds/crosschex-cloud-api.txt`): payload `api_key`, `api_secret` → "Respond
//!   Parameter Instruction (200)": `code` 200, `data.payload.token` (an HS256 JWT),
//!   `data.payload.expires` (RFC 3339, 72 h after the request in the example), `data.header`
//!   echoing `nameSpace`/`nameAction`/`version`, `error` `{}`. Golden copy:
//!   `tests/fixtures/crosschex/token.json`.
//! - `attendance.record/getrecord` — the same post, "POST Get Record": payload `begin_time`,
//!   `end_time`, `workno` (optional), `order` (`asc` default), `page` (from 1), `per_page` (≤ 1000)
//!   → `data.payload` `count`, `list[{checktype, checktime, device{serial_number,name},
//!   employee{first_name,last_name,workno}}]`, `page`, `perPage`, `pageCount`. Golden copy:
//!   `tests/fixtures/crosschex/getrecord.json`.
//! - The unwrapped `{"header","payload"}` answer shape ([`Shape`]), the `System/Exception` errors
//!   (`TOKEN_EXPIRES`, `AUTH_ERROR`, `MISS_PARAM`, `FREQUENT_REQUEST`), the ~15 s rate limit, the
//!   silent page-size cap, the optional record `uuid` and the local wall clock behind `+00:00`
//!   are on no published Anviz page: they follow `shared/reference/crosschex.md` (open-source
//!   clients reported as tested against live accounts; medium confidence). Golden copies:
//!   `tests/fixtures/crosschex/exception-*.json`.
//!
//! Assumptions where the sources are silent (a client must not rely on more):
//! - The exception type for an unknown namespace/action is `UNDEFINED_METHOD` (sources only say
//!   "undefined method"). An unparsable body or a missing header field is `MISS_PARAM`; an unknown
//!   token is `AUTH_ERROR`.
//! - Errors follow the selected [`Shape`]: in the `Wrapped` shape they are wrapped too
//!   (`{"code":200,"data":{"header":{System,Exception},"payload":{..}},"error":{}}`).
//! - The rate limit (`FREQUENT_REQUEST`) applies to `getrecord` only (a login followed at once by
//!   a getrecord is allowed) and is measured from the last request the limiter let through.
//! - `begin_time`/`end_time` are compared with the stored LOCAL wall-clock as labelled: the
//!   server ignores what the offset means, just like it prints local times with `+00:00`. Both
//!   bounds are inclusive.
//! - Transport faults ([`Fault::InternalError`], [`Fault::Unavailable`]) are the HTML pages of the
//!   cloud's reverse proxy, not a JSON envelope.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, NaiveDateTime, Utc};
use serde::Serialize;
use serde_json::{json, Value};

use super::{
    base64url, garbage, guid, json, lock, random_hex, serve, FakeRequest, Fault, Running, Vendor,
    Wire,
};

/// Credentials a fresh fake accepts.
pub const DEFAULT_API_KEY: &str = "a48f4d4ab5c6d00296431e4addfec375";
pub const DEFAULT_API_SECRET: &str = "6eb2a47a22e60627d3f148b44138eeda";

/// Endpoint names (`nameSpace/nameAction`) for [`Wire`] counters and targeted faults.
pub mod endpoint {
    pub const TOKEN: &str = "authorize.token/token";
    pub const GET_RECORD: &str = "attendance.record/getrecord";
    /// Any other namespace/action (answered "undefined method").
    pub const UNDEFINED: &str = "undefined";
    /// Not `POST /` with a JSON envelope.
    pub const OTHER: &str = "other";
}

/// The two response shapes seen in the wild; clients must accept both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `{"code":200,"data":{"header":{..},"payload":{..}},"error":{}}` (official table).
    Wrapped,
    /// `{"header":{..},"payload":{..}}` (live clients).
    Bare,
}

/// Which records carry a `uuid` (some accounts send it, some do not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UuidMode {
    Always,
    Never,
    /// Every second record (by arrival) has none: clients must dedupe both ways.
    Alternate,
}

/// One attendance record as the device uploaded it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record {
    /// Verification mode (1 ID+PW, 56 card, 128/192 face/FP...), NOT a direction; 0 on some
    /// accounts.
    pub checktype: u32,
    /// The device's LOCAL wall-clock time; printed with a misleading `+00:00`.
    pub checktime: NaiveDateTime,
    pub device_serial: String,
    pub device_name: String,
    pub first_name: String,
    pub last_name: String,
    pub workno: String,
}

#[derive(Debug, Clone)]
struct Stored {
    uuid: String,
    seq: usize,
    record: Record,
}

#[derive(Debug)]
struct State {
    api_key: String,
    api_secret: String,
    webhook_secret: String,
    token_lifetime: Duration,
    tokens: HashMap<String, Instant>,
    records: Vec<Stored>,
    shape: Shape,
    per_page_cap: usize,
    min_interval: Duration,
    last_getrecord: Option<Instant>,
    uuid_mode: UuidMode,
    request_ids: Vec<String>,
}

/// Cloneable handle to seed records, inspect requests and inject faults.
#[derive(Debug, Clone)]
pub struct CrossChexControl {
    state: Arc<Mutex<State>>,
    wire: Wire,
}

impl Default for CrossChexControl {
    fn default() -> Self {
        Self::new()
    }
}

impl CrossChexControl {
    /// Default credentials, wrapped shape, per_page cap 100, 15 s between getrecords, 72 h
    /// tokens, uuid on every second record.
    pub fn new() -> Self {
        CrossChexControl {
            state: Arc::new(Mutex::new(State {
                api_key: DEFAULT_API_KEY.into(),
                api_secret: DEFAULT_API_SECRET.into(),
                webhook_secret: random_hex(16),
                token_lifetime: Duration::from_secs(72 * 3600),
                tokens: HashMap::new(),
                records: Vec::new(),
                shape: Shape::Wrapped,
                per_page_cap: 100,
                min_interval: Duration::from_secs(15),
                last_getrecord: None,
                uuid_mode: UuidMode::Alternate,
                request_ids: Vec::new(),
            })),
            wire: Wire::default(),
        }
    }

    /// Transport knobs and counters (see [`endpoint`] for the names).
    pub fn wire(&self) -> &Wire {
        &self.wire
    }

    pub fn set_credentials(&self, api_key: &str, api_secret: &str) {
        let mut st = lock(&self.state);
        st.api_key = api_key.to_string();
        st.api_secret = api_secret.to_string();
    }

    /// Lifetime of tokens issued from now on (default 72 h).
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        lock(&self.state).token_lifetime = lifetime;
    }

    /// Every token issued so far expires now: the next getrecord gets `TOKEN_EXPIRES`.
    pub fn expire_tokens(&self) {
        let now = Instant::now();
        for exp in lock(&self.state).tokens.values_mut() {
            *exp = now;
        }
    }

    pub fn set_shape(&self, shape: Shape) {
        lock(&self.state).shape = shape;
    }

    /// Silent server cap on `per_page` (live servers cap at 100–200 although the doc says 1000).
    pub fn set_per_page_cap(&self, cap: usize) {
        lock(&self.state).per_page_cap = cap.max(1);
    }

    /// Minimum time between two getrecord calls; closer calls get `FREQUENT_REQUEST`.
    pub fn set_min_interval(&self, interval: Duration) {
        lock(&self.state).min_interval = interval;
    }

    pub fn set_uuid_mode(&self, mode: UuidMode) {
        lock(&self.state).uuid_mode = mode;
    }

    /// Adds a record as if a device uploaded it now. Its `checktime` may lie far in the past
    /// (behind a client's watermark): devices upload late. Returns the record's uuid (which the
    /// API may or may not show, see [`UuidMode`]).
    pub fn add_record(&self, record: Record) -> String {
        let mut st = lock(&self.state);
        let uuid = guid();
        let seq = st.records.len();
        st.records.push(Stored {
            uuid: uuid.clone(),
            seq,
            record,
        });
        uuid
    }

    /// Every `header.requestId` received, in order (they must be unique).
    pub fn request_ids(&self) -> Vec<String> {
        lock(&self.state).request_ids.clone()
    }

    /// The token secret embedded in issued tokens' payload (for "never logged" checks).
    pub fn api_secret(&self) -> String {
        lock(&self.state).api_secret.clone()
    }
}

/// A running fake CrossChex Cloud.
#[derive(Debug)]
pub struct FakeCrossChex {
    running: Running,
    control: CrossChexControl,
}

impl FakeCrossChex {
    /// Starts a fake with a fresh [`CrossChexControl`] on `addr` (port 0 picks a free one).
    pub async fn start(addr: SocketAddr) -> std::io::Result<Self> {
        Self::start_with(addr, CrossChexControl::new()).await
    }

    /// Starts a fake serving an existing control's data.
    pub async fn start_with(addr: SocketAddr, control: CrossChexControl) -> std::io::Result<Self> {
        let running = serve(addr, control.clone()).await?;
        Ok(FakeCrossChex { running, control })
    }

    pub fn addr(&self) -> SocketAddr {
        self.running.addr()
    }

    /// `http://addr/` (with the trailing slash, like the regional URLs).
    pub fn base_url(&self) -> String {
        format!("http://{}/", self.running.addr())
    }

    pub fn control(&self) -> CrossChexControl {
        self.control.clone()
    }

    pub async fn shutdown(self) {
        self.running.shutdown().await;
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Header<'a> {
    name_space: &'a str,
    name_action: &'a str,
    version: &'a str,
    request_id: &'a str,
    timestamp: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ExceptionHeader {
    name_space: &'static str,
    name_action: &'static str,
}

#[derive(Serialize)]
struct Bare<H: Serialize> {
    header: H,
    payload: Value,
}

#[derive(Serialize)]
struct Wrapped<H: Serialize> {
    code: u16,
    data: Bare<H>,
    error: Value,
}

/// Renders header+payload in the configured shape, always with HTTP 200.
fn envelope<H: Serialize>(shape: Shape, header: H, payload: Value) -> Response {
    let bare = Bare { header, payload };
    match shape {
        Shape::Bare => json(StatusCode::OK, &bare),
        Shape::Wrapped => json(
            StatusCode::OK,
            &Wrapped {
                code: 200,
                data: bare,
                error: json!({}),
            },
        ),
    }
}

/// The documented exception: HTTP 200, `System/Exception`, `{"type","message"}`.
fn exception(shape: Shape, kind: &str, message: &str) -> Response {
    envelope(
        shape,
        ExceptionHeader {
            name_space: "System",
            name_action: "Exception",
        },
        json!({ "type": kind, "message": message }),
    )
}

fn now_rfc3339() -> String {
    Utc::now().format("%Y-%m-%dT%H:%M:%S+00:00").to_string()
}

fn proxy_page(status: StatusCode) -> Response {
    let body = format!(
        "<html>\r\n<head><title>{status}</title></head>\r\n<body>\r\n<center><h1>{status}</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
    );
    let mut resp = (status, body).into_response();
    resp.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/html"),
    );
    resp
}

fn parse_envelope(req: &FakeRequest) -> Option<Value> {
    if req.method != Method::POST || req.path != "/" {
        return None;
    }
    serde_json::from_slice::<Value>(&req.body)
        .ok()
        .filter(Value::is_object)
}

impl Vendor for CrossChexControl {
    fn wire(&self) -> &Wire {
        &self.wire
    }

    fn endpoint(&self, req: &FakeRequest) -> &'static str {
        let Some(v) = parse_envelope(req) else {
            return endpoint::OTHER;
        };
        match (
            v["header"]["nameSpace"].as_str(),
            v["header"]["nameAction"].as_str(),
        ) {
            (Some("authorize.token"), Some("token")) => endpoint::TOKEN,
            (Some("attendance.record"), Some("getrecord")) => endpoint::GET_RECORD,
            _ => endpoint::UNDEFINED,
        }
    }

    /// Rate limiting is the documented `FREQUENT_REQUEST` exception with HTTP 200; 500/503 are
    /// the reverse proxy's HTML pages.
    fn fault_response(&self, fault: &Fault, _req: &FakeRequest) -> Response {
        match fault {
            Fault::RateLimited { .. } => exception(
                lock(&self.state).shape,
                "FREQUENT_REQUEST",
                "Frequent requests, please try again later",
            ),
            Fault::Unavailable => proxy_page(StatusCode::SERVICE_UNAVAILABLE),
            Fault::GarbageBody => garbage(),
            _ => proxy_page(StatusCode::INTERNAL_SERVER_ERROR),
        }
    }

    fn handle(&self, req: &FakeRequest) -> Response {
        let mut st = lock(&self.state);
        let shape = st.shape;
        if req.path != "/" {
            return proxy_page(StatusCode::NOT_FOUND);
        }
        if req.method != Method::POST {
            return proxy_page(StatusCode::METHOD_NOT_ALLOWED);
        }
        let Some(v) = parse_envelope(req) else {
            return exception(
                shape,
                "MISS_PARAM",
                "The request body must be a JSON object",
            );
        };
        let h = &v["header"];
        for field in [
            "nameSpace",
            "nameAction",
            "version",
            "requestId",
            "timestamp",
        ] {
            if h[field].as_str().is_none_or(|s| s.trim().is_empty()) {
                return exception(shape, "MISS_PARAM", &format!("header.{field} is required"));
            }
        }
        let (ns, action, request_id) = (
            h["nameSpace"].as_str().unwrap_or_default(),
            h["nameAction"].as_str().unwrap_or_default(),
            h["requestId"].as_str().unwrap_or_default(),
        );
        st.request_ids.push(request_id.to_string());
        let header = Header {
            name_space: ns,
            name_action: action,
            version: h["version"].as_str().unwrap_or("1.0"),
            request_id,
            timestamp: now_rfc3339(),
        };
        match (ns, action) {
            ("authorize.token", "token") => login(&mut st, header, &v["payload"]),
            ("attendance.record", "getrecord") => get_record(&mut st, header, &v),
            _ => exception(
                shape,
                "UNDEFINED_METHOD",
                &format!("undefined method {ns}.{action}"),
            ),
        }
    }
}

fn login(st: &mut State, header: Header<'_>, payload: &Value) -> Response {
    let shape = st.shape;
    let (Some(key), Some(secret)) = (payload["api_key"].as_str(), payload["api_secret"].as_str())
    else {
        return exception(shape, "MISS_PARAM", "api_key and api_secret are required");
    };
    if key != st.api_key || secret != st.api_secret {
        return exception(shape, "AUTH_ERROR", "api_key or api_secret error");
    }
    let now = Utc::now();
    let expires = chrono::Duration::from_std(st.token_lifetime)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC);
    // Like the real token: an HS256 JWT whose payload carries the api secret and the webhook
    // secret in (base64) clear text. A client must never log it.
    let claims = json!({
        "company_code": "110000831",
        "hooks_on": 0,
        "url": "",
        "secret": st.webhook_secret,
        "create_time": now.format("%Y-%m-%d %H:%M:%S").to_string(),
        "update_time": "",
        "api_key": st.api_key,
        "api_secret": st.api_secret,
        "exp": expires.timestamp(),
        "jti": random_hex(8),
    });
    let token = format!(
        "{}.{}.{}",
        base64url(br#"{"alg":"HS256","typ":"JWT"}"#),
        base64url(claims.to_string().as_bytes()),
        base64url(random_hex(16).as_bytes()),
    );
    st.tokens
        .insert(token.clone(), super::deadline(st.token_lifetime));
    envelope(
        shape,
        header,
        json!({
            "token": token,
            "expires": expires.format("%Y-%m-%dT%H:%M:%S+00:00").to_string(),
        }),
    )
}

/// A number or a numeric string (the doc types every field as "Text").
fn number(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn get_record(st: &mut State, header: Header<'_>, v: &Value) -> Response {
    let shape = st.shape;
    // About one request per 15 s; closer calls are refused (HTTP 200, FREQUENT_REQUEST).
    let now = Instant::now();
    if let Some(last) = st.last_getrecord {
        if now.duration_since(last) < st.min_interval {
            return exception(
                shape,
                "FREQUENT_REQUEST",
                "Frequent requests, please try again later",
            );
        }
    }
    st.last_getrecord = Some(now);

    let Some(token) = v["authorize"]["token"].as_str() else {
        return exception(shape, "MISS_PARAM", "authorize.token is required");
    };
    match st.tokens.get(token) {
        None => return exception(shape, "AUTH_ERROR", "Invalid token"),
        Some(exp) if now >= *exp => {
            return exception(
                shape,
                "TOKEN_EXPIRES",
                "Token expires, please get a new one",
            )
        }
        Some(_) => {}
    }

    let p = &v["payload"];
    let bound = |name: &str| {
        p[name]
            .as_str()
            .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
            .map(|d| d.naive_utc())
    };
    let (Some(begin), Some(end)) = (bound("begin_time"), bound("end_time")) else {
        return exception(
            shape,
            "MISS_PARAM",
            "begin_time and end_time are required (RFC 3339)",
        );
    };
    let (Some(page), Some(per_page)) = (number(&p["page"]), number(&p["per_page"])) else {
        return exception(shape, "MISS_PARAM", "page and per_page are required");
    };
    if page == 0 || per_page == 0 {
        return exception(shape, "MISS_PARAM", "page and per_page start at 1");
    }
    let workno = p["workno"].as_str().filter(|w| !w.is_empty());
    let desc = p["order"].as_str() == Some("desc");

    let mut matching: Vec<&Stored> = st
        .records
        .iter()
        .filter(|s| (begin..=end).contains(&s.record.checktime))
        .filter(|s| workno.is_none_or(|w| s.record.workno == w))
        .collect();
    matching.sort_by_key(|s| (s.record.checktime, s.seq));
    if desc {
        matching.reverse();
    }
    // Silent cap: ask for 1000, get 100, and perPage/pageCount say so.
    let per_page = usize::try_from(per_page)
        .unwrap_or(usize::MAX)
        .min(st.per_page_cap);
    let page = usize::try_from(page).unwrap_or(usize::MAX);
    let count = matching.len();
    let list: Vec<Value> = matching
        .iter()
        .skip((page - 1).saturating_mul(per_page))
        .take(per_page)
        .map(|s| record_json(s, st.uuid_mode))
        .collect();
    envelope(
        shape,
        header,
        json!({
            "count": count,
            "list": list,
            "page": page,
            "perPage": per_page,
            "pageCount": count.div_ceil(per_page),
        }),
    )
}

fn record_json(s: &Stored, mode: UuidMode) -> Value {
    let r = &s.record;
    let mut v = json!({
        "checktype": r.checktype,
        // Local wall-clock with a misleading +00:00 label (documented data quirk).
        "checktime": r.checktime.format("%Y-%m-%dT%H:%M:%S+00:00").to_string(),
        "device": { "serial_number": r.device_serial, "name": r.device_name },
        "employee": {
            "first_name": r.first_name,
            "last_name": r.last_name,
            "workno": r.workno,
        },
    });
    let with_uuid = match mode {
        UuidMode::Always => true,
        UuidMode::Never => false,
        UuidMode::Alternate => s.seq.is_multiple_of(2),
    };
    if let (true, Value::Object(o)) = (with_uuid, &mut v) {
        o.insert("uuid".into(), Value::String(s.uuid.clone()));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kit::fakes::testutil::{base64url_decode, client};

    struct Env {
        fake: FakeCrossChex,
        ctl: CrossChexControl,
        http: reqwest::Client,
        seq: std::sync::atomic::AtomicU32,
    }

    async fn env() -> Env {
        let fake = FakeCrossChex::start("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("start fake");
        let ctl = fake.control();
        ctl.set_min_interval(Duration::ZERO);
        Env {
            fake,
            ctl,
            http: client(),
            seq: Default::default(),
        }
    }

    fn at(s: &str) -> NaiveDateTime {
        NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S").expect("test time")
    }

    fn record(workno: &str, checktime: &str) -> Record {
        Record {
            checktype: 128,
            checktime: at(checktime),
            device_serial: "1750120622290025".into(),
            device_name: "FaceDeep3-IRT10".into(),
            first_name: format!("F{workno}"),
            last_name: format!("L{workno}"),
            workno: workno.into(),
        }
    }

    impl Env {
        async fn call(&self, ns: &str, action: &str, token: Option<&str>, payload: Value) -> Value {
            let n = self.seq.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut body = json!({
                "header": {
                    "nameSpace": ns, "nameAction": action, "version": "1.0",
                    "requestId": format!("f1becc28-ad01-b5b2-7cef-{n:012}"),
                    "timestamp": "2022-10-21T07:39:07+00:00",
                },
                "payload": payload,
            });
            if let Some(t) = token {
                body["authorize"] = json!({"type": "token", "token": t});
            }
            let resp = self
                .http
                .post(self.fake.base_url())
                .json(&body)
                .send()
                .await
                .expect("send");
            assert_eq!(resp.status(), 200, "errors come with HTTP 200 too");
            resp.json().await.expect("json body")
        }

        async fn login(&self) -> String {
            let v = self
                .call(
                    "authorize.token",
                    "token",
                    None,
                    json!({"api_key": DEFAULT_API_KEY, "api_secret": DEFAULT_API_SECRET}),
                )
                .await;
            v["data"]["payload"]["token"]
                .as_str()
                .expect("token")
                .to_string()
        }

        async fn records(&self, token: &str, payload: Value) -> Value {
            let v = self
                .call("attendance.record", "getrecord", Some(token), payload)
                .await;
            v["data"]["payload"].clone()
        }
    }

    fn exception_json(kind: &str, message: &str) -> Value {
        json!({"header": {"nameSpace": "System", "nameAction": "Exception"},
               "payload": {"type": kind, "message": message}})
    }

    #[tokio::test]
    async fn login_returns_a_jwt_embedding_the_secret() {
        let env = env().await;
        let v = env
            .call(
                "authorize.token",
                "token",
                None,
                json!({"api_key": DEFAULT_API_KEY, "api_secret": DEFAULT_API_SECRET}),
            )
            .await;
        assert_eq!(v["code"], 200);
        assert_eq!(v["error"], json!({}));
        assert_eq!(v["data"]["header"]["nameSpace"], "authorize.token");
        assert_eq!(
            v["data"]["header"]["requestId"],
            "f1becc28-ad01-b5b2-7cef-000000000000"
        );
        let token = v["data"]["payload"]["token"].as_str().expect("token");
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        let header = base64url_decode(parts[0]).expect("b64");
        assert_eq!(header, br#"{"alg":"HS256","typ":"JWT"}"#);
        let claims: Value =
            serde_json::from_slice(&base64url_decode(parts[1]).expect("b64")).expect("claims");
        assert_eq!(claims["api_secret"], DEFAULT_API_SECRET);
        let expires = v["data"]["payload"]["expires"].as_str().expect("expires");
        assert!(expires.ends_with("+00:00"), "{expires}");
        let exp = DateTime::parse_from_rfc3339(expires).expect("rfc3339");
        let hours = (exp.with_timezone(&Utc) - Utc::now()).num_hours();
        assert!((71..=72).contains(&hours), "{hours}");

        // Wrong secret: AUTH_ERROR, HTTP 200, in both shapes.
        let v = env
            .call(
                "authorize.token",
                "token",
                None,
                json!({"api_key": DEFAULT_API_KEY, "api_secret": "x"}),
            )
            .await;
        assert_eq!(
            v,
            json!({"code": 200, "data": exception_json("AUTH_ERROR", "api_key or api_secret error"), "error": {}})
        );
        env.ctl.set_shape(Shape::Bare);
        let v = env
            .call(
                "authorize.token",
                "token",
                None,
                json!({"api_key": DEFAULT_API_KEY, "api_secret": "x"}),
            )
            .await;
        assert_eq!(
            v,
            exception_json("AUTH_ERROR", "api_key or api_secret error")
        );
        let v = env
            .call(
                "authorize.token",
                "token",
                None,
                json!({"api_key": DEFAULT_API_KEY}),
            )
            .await;
        assert_eq!(
            v,
            exception_json("MISS_PARAM", "api_key and api_secret are required")
        );
        let v = env
            .call(
                "authorize.token",
                "token",
                None,
                json!({"api_key": DEFAULT_API_KEY, "api_secret": DEFAULT_API_SECRET}),
            )
            .await;
        assert_eq!(v["header"]["nameAction"], "token");
        assert!(v["payload"]["token"].is_string());
        assert_eq!(env.ctl.wire().count(endpoint::TOKEN), 5);
        env.fake.shutdown().await;
    }

    #[tokio::test]
    async fn malformed_requests_and_unknown_methods() {
        let env = env().await;
        env.ctl.set_shape(Shape::Bare);
        let resp = env
            .http
            .post(env.fake.base_url())
            .body("{oops")
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.json::<Value>().await.expect("json"),
            exception_json("MISS_PARAM", "The request body must be a JSON object")
        );
        let resp = env
            .http
            .post(env.fake.base_url())
            .json(&json!({"header": {"nameSpace": "attendance.record", "nameAction": "getrecord"}}))
            .send()
            .await
            .expect("send");
        assert_eq!(
            resp.json::<Value>().await.expect("json"),
            exception_json("MISS_PARAM", "header.version is required")
        );
        let v = env.call("employee", "getemployee", None, json!({})).await;
        assert_eq!(
            v,
            exception_json("UNDEFINED_METHOD", "undefined method employee.getemployee")
        );
        assert_eq!(env.ctl.wire().count(endpoint::UNDEFINED), 1);
        env.fake.shutdown().await;
    }

    #[tokio::test]
    async fn getrecord_pages_under_a_silent_cap() {
        let env = env().await;
        let base = at("2024-03-01 08:00:00");
        for i in 0..250 {
            let t = base + chrono::Duration::seconds(i);
            env.ctl.add_record(record(
                &format!("{}", i % 3),
                &t.format("%Y-%m-%d %H:%M:%S").to_string(),
            ));
        }
        env.ctl.add_record(record("9", "2024-02-01 08:00:00"));
        let token = env.login().await;
        let mut seen = Vec::new();
        let mut page = 1;
        loop {
            let p = env
                .records(&token, json!({
                    "begin_time": "2024-03-01T00:00:00+00:00", "end_time": "2024-03-01T23:59:59+00:00",
                    "order": "asc", "page": page, "per_page": "1000",
                }))
                .await;
            assert_eq!(p["count"], 250);
            assert_eq!(p["perPage"], 100, "capped silently");
            assert_eq!(p["pageCount"], 3);
            assert_eq!(p["page"], page);
            seen.extend(p["list"].as_array().expect("list").iter().cloned());
            if page >= p["pageCount"].as_u64().expect("pageCount") as usize {
                break;
            }
            page += 1;
        }
        assert_eq!(seen.len(), 250);
        assert_eq!(
            seen[0],
            json!({"uuid": seen[0]["uuid"], "checktype": 128, "checktime": "2024-03-01T08:00:00+00:00",
                   "device": {"serial_number": "1750120622290025", "name": "FaceDeep3-IRT10"},
                   "employee": {"first_name": "F0", "last_name": "L0", "workno": "0"}})
        );
        assert!(seen[0]["uuid"].is_string());
        assert!(
            seen[1].get("uuid").is_none(),
            "uuid omitted on some records"
        );
        assert_eq!(seen[249]["checktime"], "2024-03-01T08:04:09+00:00");

        let p = env
            .records(&token, json!({
                "begin_time": "2024-03-01T08:00:00+00:00", "end_time": "2024-03-01T08:00:05+00:00",
                "order": "desc", "page": 1, "per_page": 10, "workno": "1",
            }))
            .await;
        let times: Vec<&str> = p["list"]
            .as_array()
            .expect("list")
            .iter()
            .map(|r| r["checktime"].as_str().expect("t"))
            .collect();
        assert_eq!(
            times,
            vec!["2024-03-01T08:00:04+00:00", "2024-03-01T08:00:01+00:00"]
        );
        assert_eq!(p["pageCount"], 1);
        env.fake.shutdown().await;
    }

    #[tokio::test]
    async fn late_uploads_show_up_behind_the_watermark() {
        let env = env().await;
        env.ctl.set_uuid_mode(UuidMode::Always);
        env.ctl.add_record(record("1", "2024-03-01 09:00:00"));
        let token = env.login().await;
        let window = json!({"begin_time": "2024-03-01T08:00:00+00:00", "end_time": "2024-03-01T10:00:00+00:00",
                            "page": 1, "per_page": 100});
        assert_eq!(env.records(&token, window.clone()).await["count"], 1);
        // A device uploads a 08:30 record after the client read up to 09:00.
        let late = env.ctl.add_record(record("2", "2024-03-01 08:30:00"));
        let p = env.records(&token, window).await;
        assert_eq!(p["count"], 2);
        assert_eq!(p["list"][0]["uuid"], late.as_str());
        env.ctl.set_uuid_mode(UuidMode::Never);
        let p = env
            .records(
                &token,
                json!({"begin_time": "2024-03-01T08:00:00+00:00",
            "end_time": "2024-03-01T10:00:00+00:00", "page": 1, "per_page": 100}),
            )
            .await;
        assert!(p["list"]
            .as_array()
            .expect("list")
            .iter()
            .all(|r| r.get("uuid").is_none()));
        env.fake.shutdown().await;
    }

    #[tokio::test]
    async fn token_expiry_auth_errors_and_rate_limit() {
        let env = env().await;
        env.ctl.set_shape(Shape::Bare);
        let login = env
            .call(
                "authorize.token",
                "token",
                None,
                json!({"api_key": DEFAULT_API_KEY, "api_secret": DEFAULT_API_SECRET}),
            )
            .await;
        let token = login["payload"]["token"]
            .as_str()
            .expect("token")
            .to_string();
        let q = json!({"begin_time": "2024-03-01T00:00:00+00:00", "end_time": "2024-03-02T00:00:00+00:00",
                       "page": 1, "per_page": 10});
        let v = env
            .call("attendance.record", "getrecord", Some(&token), q.clone())
            .await;
        assert_eq!(v["payload"]["count"], 0);
        assert_eq!(v["payload"]["pageCount"], 0);

        let v = env
            .call("attendance.record", "getrecord", Some("forged"), q.clone())
            .await;
        assert_eq!(v, exception_json("AUTH_ERROR", "Invalid token"));
        let v = env
            .call("attendance.record", "getrecord", None, q.clone())
            .await;
        assert_eq!(
            v,
            exception_json("MISS_PARAM", "authorize.token is required")
        );
        let v = env
            .call(
                "attendance.record",
                "getrecord",
                Some(&token),
                json!({"begin_time": "yesterday", "page": 1, "per_page": 1}),
            )
            .await;
        assert_eq!(v["payload"]["type"], "MISS_PARAM");

        env.ctl.expire_tokens();
        let v = env
            .call("attendance.record", "getrecord", Some(&token), q.clone())
            .await;
        assert_eq!(
            v,
            exception_json("TOKEN_EXPIRES", "Token expires, please get a new one")
        );

        env.ctl.set_min_interval(Duration::from_secs(3600));
        let v = env
            .call("attendance.record", "getrecord", Some(&token), q.clone())
            .await;
        assert_eq!(
            v,
            exception_json(
                "FREQUENT_REQUEST",
                "Frequent requests, please try again later"
            )
        );
        // Login is not rate limited.
        let v = env
            .call(
                "authorize.token",
                "token",
                None,
                json!({"api_key": DEFAULT_API_KEY, "api_secret": DEFAULT_API_SECRET}),
            )
            .await;
        assert!(v["payload"]["token"].is_string());
        env.ctl.set_min_interval(Duration::ZERO);
        let fresh = v["payload"]["token"].as_str().expect("token").to_string();
        let v = env
            .call("attendance.record", "getrecord", Some(&fresh), q)
            .await;
        assert_eq!(v["header"]["nameAction"], "getrecord");
        let ids = env.ctl.request_ids();
        let unique: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
        env.fake.shutdown().await;
    }

    #[tokio::test]
    async fn injected_faults() {
        let env = env().await;
        let token = env.login().await;
        let q = json!({"begin_time": "2024-03-01T00:00:00+00:00", "end_time": "2024-03-02T00:00:00+00:00",
                       "page": 1, "per_page": 10});
        env.ctl.wire().fail_next_on(
            endpoint::GET_RECORD,
            1,
            Fault::RateLimited {
                retry_after_secs: 15,
            },
        );
        let v = env
            .call("attendance.record", "getrecord", Some(&token), q.clone())
            .await;
        assert_eq!(v["data"]["payload"]["type"], "FREQUENT_REQUEST");

        env.ctl.wire().fail_next(1, Fault::Unavailable);
        let resp = env
            .http
            .post(env.fake.base_url())
            .json(&q)
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 503);
        assert!(resp.text().await.expect("text").contains("nginx"));

        env.ctl.wire().fail_next(1, Fault::GarbageBody);
        let resp = env
            .http
            .post(env.fake.base_url())
            .json(&q)
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 200);
        assert!(resp.json::<Value>().await.is_err());

        let v = env.records(&token, q).await;
        assert_eq!(v["count"], 0);
        assert_eq!(env.ctl.wire().count(endpoint::GET_RECORD), 2);
        env.fake.shutdown().await;
    }
}
