//! Anviz CrossChex Cloud client: token login and attendance records (`getrecord`).
//!
//! Vendor quirks handled here:
//! - Every call is `POST /` with a JSON envelope `{"header":{nameSpace,nameAction,version,
//!   requestId,timestamp},"authorize":{..},"payload":{..}}`; each request (each retry too) gets a
//!   new `requestId`.
//! - Errors arrive with HTTP 200 as `{"header":{"nameSpace":"System","nameAction":"Exception"},
//!   "payload":{"type","message"}}`: the body is always inspected, never the status alone.
//! - Two response shapes: `{"code":200,"data":{"header","payload"},"error":{}}` (official table)
//!   and `{"header","payload"}` (live accounts). Both are accepted, errors in either.
//! - About one request per 15 s per account: a rate limiter spaces requests, and
//!   `FREQUENT_REQUEST` backs off (backoff on top of the limiter) before retrying.
//! - `TOKEN_EXPIRES` (and `AUTH_ERROR` for a token) → log in again once and repeat the call.
//! - The token is a JWT that embeds the api secret and the webhook secret: it is a secret.
//! - `per_page` is capped silently (doc: ≤ 1000; live: 100–200): pages are read on the server's
//!   `pageCount`, and the distinct total is checked against `count` (a mismatch re-reads the
//!   window once, then fails as Incomplete), see [`CrossChexClient::get_records`].
//! - `checktime` says `+00:00` but is, on the accounts documented so far, the device's LOCAL wall
//!   clock: read as `sources.crosschex.checktime` says, see [`checktime_instant`].
//! - `checktype` is the verification mode (card, face...), never a direction.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, FixedOffset, NaiveDateTime, Utc};
use chrono_tz::Tz;
use rand::Rng;
use reqwest::{StatusCode, Url};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::http::{
    base_url, by_status, skipped_item, Answer, Api, CloudError, ErrorKind, Http, HttpOptions,
    IssuedToken, TokenCache, VendorAnswer, Verdict,
};
use crate::config::{CheckTime, CrossChexConfig, Secret};
use crate::model::local_to_instant;

/// Records asked for per page. Live servers cap at 100–200 whatever is asked; asking for what
/// they give keeps `pageCount` meaningful.
pub const DEFAULT_PER_PAGE: u32 = 100;
/// A token whose `expires` cannot be read is trusted this long (the vendor's are ~72 h).
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// Shortest lifetime believed: an `expires` that looks already past (clock skew) must not make
/// every call log in again; `TOKEN_EXPIRES` still triggers a fresh login.
const MIN_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// A window longer than this many pages is treated as a vendor loop.
const MAX_PAGES: u32 = 10_000;
/// Reads of one window before disagreeing totals become [`ErrorKind::Incomplete`].
const WINDOW_READS: u32 = 2;

const CALL_TOKEN: &str = "authorize.token/token";
const CALL_GET_RECORD: &str = "attendance.record/getrecord";

/// One attendance record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrossChexRecord {
    /// Sent by some accounts only.
    pub uuid: Option<String>,
    /// The verification mode (1 ID+PW, 56 card, 128/192 face/FP...; 0 on some accounts). NOT a
    /// direction.
    pub checktype: i64,
    /// `checktime` as labelled, its offset dropped (see [`checktime_instant`]).
    pub checktime: NaiveDateTime,
    pub device_serial: String,
    pub device_name: Option<String>,
    pub workno: String,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
}

/// What identifies a record across overlapping reads.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum RecordKey {
    Uuid(String),
    Tuple {
        device_serial: String,
        workno: String,
        checktime: NaiveDateTime,
        checktype: i64,
    },
}

impl CrossChexRecord {
    /// `uuid` when the account sends one, else (device serial, workno, checktime, checktype).
    pub fn key(&self) -> RecordKey {
        match self.uuid.as_deref().map(str::trim) {
            Some(uuid) if !uuid.is_empty() => RecordKey::Uuid(uuid.to_string()),
            _ => RecordKey::Tuple {
                device_serial: self.device_serial.clone(),
                workno: self.workno.clone(),
                checktime: self.checktime,
                checktype: self.checktype,
            },
        }
    }

    /// The instant of the record, its `checktime` read as `reading` says (`tz`: the account's).
    pub fn occurred_at(&self, reading: CheckTime, tz: Tz) -> DateTime<FixedOffset> {
        checktime_instant(self.checktime, reading, tz)
    }
}

/// The instant a `checktime` label (its `+00:00` dropped) stands for: the device's wall clock in
/// `tz` ([`CheckTime::Local`], DST as [`crate::model::local_to_instant`]), or UTC as written
/// ([`CheckTime::Utc`]). Either way the instant is given with `tz`'s offset.
pub fn checktime_instant(
    label: NaiveDateTime,
    reading: CheckTime,
    tz: Tz,
) -> DateTime<FixedOffset> {
    match reading {
        CheckTime::Local => local_to_instant(label, tz),
        CheckTime::Utc => label.and_utc().with_timezone(&tz).fixed_offset(),
    }
}

/// How the account labels the instant `now`: the scale `checktime`, `begin_time` and
/// `end_time` share (the inverse of [`checktime_instant`]).
pub fn checktime_label(now: DateTime<Utc>, reading: CheckTime, tz: Tz) -> NaiveDateTime {
    match reading {
        CheckTime::Local => now.with_timezone(&tz).naive_local(),
        CheckTime::Utc => now.naive_utc(),
    }
}

/// Reads a `checktime` such as `2022-07-20T20:15:05+00:00` as what it really is: the device's
/// local wall clock in `tz` (the `+00:00` is a label, not an offset). DST overlaps and gaps follow
/// [`crate::model::local_to_instant`]. `None` when the text is not a date-time.
pub fn reinterpret_checktime(raw: &str, tz: Tz) -> Option<DateTime<FixedOffset>> {
    parse_checktime_label(raw).map(|local| local_to_instant(local, tz))
}

/// The wall-clock part of a `checktime`: RFC 3339 (offset ignored) or `YYYY-MM-DD HH:MM:SS`.
fn parse_checktime_label(raw: &str) -> Option<NaiveDateTime> {
    let raw = raw.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(raw) {
        return Some(t.naive_local());
    }
    ["%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S"]
        .iter()
        .find_map(|f| NaiveDateTime::parse_from_str(raw, f).ok())
}

/// Whether the page loop goes on: until an empty page, and past the server's `pageCount` while
/// fewer than `count` records arrived (a server that caps `per_page` silently may compute
/// `pageCount` from the size asked for).
fn more_pages(page: u32, page_count: u64, collected: usize, count: u64, last_empty: bool) -> bool {
    !last_empty && (u64::from(page) < page_count || (collected as u64) < count)
}

/// The CrossChex Cloud client. Cheap to clone; clones share the token and the rate limiter.
#[derive(Debug, Clone)]
pub struct CrossChexClient {
    inner: Arc<Inner>,
    per_page: u32,
}

#[derive(Debug)]
struct Inner {
    http: Http,
    url: Url,
    api_key: String,
    api_secret: Secret,
    tokens: TokenCache,
}

impl CrossChexClient {
    pub fn new(cfg: &CrossChexConfig, opts: HttpOptions) -> Result<CrossChexClient, CloudError> {
        let tokens = TokenCache::new(opts.refresh_margin);
        let http = Http::new(Api::CrossChex, opts, &[&cfg.api_secret])?;
        Ok(CrossChexClient {
            inner: Arc::new(Inner {
                url: base_url(Api::CrossChex, &cfg.base_url)?,
                api_key: cfg.api_key.clone(),
                api_secret: cfg.api_secret.clone(),
                tokens,
                http,
            }),
            per_page: DEFAULT_PER_PAGE,
        })
    }

    /// Asks for `per_page` records per page (1..=1000; the server may give fewer).
    pub fn with_per_page(mut self, per_page: u32) -> CrossChexClient {
        self.per_page = per_page.clamp(1, 1000);
        self
    }

    /// Every record whose `checktime` label lies in `[begin, end]` (both the account's local wall
    /// clock, as the server compares them), oldest first, without duplicates (by [`RecordKey`]).
    ///
    /// Completeness check (decision): pages are read on the server's `pageCount` (and beyond it
    /// while fewer than `count` records arrived, for servers that compute `pageCount` from the
    /// size asked for rather than the size given). If fewer DISTINCT records than `count` arrived,
    /// records moved between pages while reading (a late upload sorting earlier shifts every
    /// later page: one record is listed twice, another not at all). The window is then read once
    /// more from page 1; if that disagrees too, the call fails with [`ErrorKind::Incomplete`] so
    /// the caller keeps its watermark and tries again at the next poll. One exception: when two
    /// consecutive reads list exactly `count` rows and the same distinct records, the server
    /// itself holds identical rows, and they are accepted. More records than `count` (uploads
    /// during the read) are fine.
    pub async fn get_records(
        &self,
        begin: NaiveDateTime,
        end: NaiveDateTime,
    ) -> Result<Vec<CrossChexRecord>, CloudError> {
        let mut previous: Option<HashSet<RecordKey>> = None;
        let mut read = 0;
        loop {
            read += 1;
            let (rows, count, skipped) = self.read_window(begin, end).await?;
            let listed = rows.len() as u64 + skipped;
            let mut seen = HashSet::new();
            let records: Vec<CrossChexRecord> =
                rows.into_iter().filter(|r| seen.insert(r.key())).collect();
            // A malformed record was listed all the same: it counts towards `count`.
            let received = records.len() as u64 + skipped;
            let server_duplicates = listed == count && previous.as_ref() == Some(&seen);
            if received >= count || server_duplicates {
                if received != count {
                    tracing::debug!(
                        api = %Api::CrossChex,
                        count,
                        received,
                        listed,
                        "distinct records differ from the server's count; accepted"
                    );
                }
                return Ok(records);
            }
            if read >= WINDOW_READS {
                return Err(self.inner.http.error(
                    CALL_GET_RECORD,
                    ErrorKind::Incomplete {
                        expected: count,
                        received,
                    },
                ));
            }
            tracing::warn!(
                api = %Api::CrossChex,
                count,
                received,
                "fewer records than the server counts; reading the window again"
            );
            previous = Some(seen);
        }
    }

    /// Pages 1.. of one window; returns the records, the last page's `count` and how many
    /// listed records were malformed (skipped, each logged).
    async fn read_window(
        &self,
        begin: NaiveDateTime,
        end: NaiveDateTime,
    ) -> Result<(Vec<CrossChexRecord>, u64, u64), CloudError> {
        let mut records = Vec::new();
        let mut skipped = 0u64;
        for page in 1..=MAX_PAGES {
            let p = self.get_page(begin, end, page).await?;
            let last_empty = p.list.is_empty() && p.skipped.is_empty();
            for reason in &p.skipped {
                skipped_item(Api::CrossChex, CALL_GET_RECORD, reason);
            }
            skipped += p.skipped.len() as u64;
            records.extend(p.list);
            let listed = records.len() + skipped as usize;
            if !more_pages(page, p.page_count, listed, p.count, last_empty) {
                return Ok((records, p.count, skipped));
            }
        }
        Err(self.inner.http.error(
            CALL_GET_RECORD,
            ErrorKind::Malformed {
                detail: format!("more than {MAX_PAGES} pages"),
            },
        ))
    }

    async fn get_page(
        &self,
        begin: NaiveDateTime,
        end: NaiveDateTime,
        page: u32,
    ) -> Result<RecordPage, CloudError> {
        // The server compares the labels as local wall-clock times and prints them with a
        // meaningless +00:00: send the local times labelled the same way.
        let label = |t: NaiveDateTime| t.format("%Y-%m-%dT%H:%M:%S+00:00").to_string();
        let payload = json!({
            "begin_time": label(begin),
            "end_time": label(end),
            "order": "asc",
            "page": page,
            "per_page": self.per_page,
        });
        let inner = &self.inner;
        inner
            .http
            .send_authed(
                CALL_GET_RECORD,
                &inner.tokens,
                || self.login(),
                true,
                |client, token| {
                    let body = envelope("attendance.record", "getrecord", Some(token), &payload);
                    client.post(inner.url.clone()).json(&body)
                },
                parse_getrecord_answer,
            )
            .await
    }

    async fn login(&self) -> Result<IssuedToken, CloudError> {
        let inner = &self.inner;
        let payload = json!({
            "api_key": inner.api_key,
            "api_secret": inner.api_secret.expose(),
        });
        inner
            .http
            .send(
                CALL_TOKEN,
                true,
                |client| {
                    let body = envelope("authorize.token", "token", None, &payload);
                    client.post(inner.url.clone()).json(&body)
                },
                |a: &Answer| parse_token_answer(a, Utc::now()),
            )
            .await
    }
}

/// A `getrecord` answer: the page, or the verdict for an error answer (in either shape).
pub(crate) fn parse_getrecord_answer(a: &Answer) -> Verdict<RecordPage> {
    match payload_of(a, false) {
        Ok(p) => match parse_page(&p) {
            Ok(page) => Verdict::Done(page),
            Err(detail) => Verdict::Fail(ErrorKind::Malformed { detail }),
        },
        Err(v) => v,
    }
}

/// A login answer received at `now`: the token and its lifetime, or the verdict for an error.
pub(crate) fn parse_token_answer(a: &Answer, now: DateTime<Utc>) -> Verdict<IssuedToken> {
    match payload_of(a, true) {
        Ok(p) => token_from(&p, now),
        Err(v) => v,
    }
}

/// The request envelope, with a fresh `requestId`.
fn envelope(name_space: &str, name_action: &str, token: Option<&str>, payload: &Value) -> Value {
    let mut body = json!({
        "header": {
            "nameSpace": name_space,
            "nameAction": name_action,
            "version": "1.0",
            "requestId": request_id(),
            "timestamp": Utc::now().format("%Y-%m-%dT%H:%M:%S+00:00").to_string(),
        },
        "payload": payload,
    });
    if let Some(token) = token {
        body["authorize"] = json!({ "type": "token", "token": token });
    }
    body
}

/// A random (version 4) UUID.
fn request_id() -> String {
    let mut b: [u8; 16] = rand::rng().random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    super::hyphenated_guid(&h)
}

/// The `payload` of a successful answer in either shape, or the verdict for an error answer.
/// `login`: an `AUTH_ERROR` is then about our credentials (final), not about a token.
fn payload_of<T>(a: &Answer, login: bool) -> Result<Value, Verdict<T>> {
    if a.status != StatusCode::OK {
        // Not the API speaking: the reverse proxy's HTML page (5xx → retried).
        let message = (!a.body.is_empty()).then(|| a.snippet());
        return Err(by_status(
            a,
            VendorAnswer {
                status: a.status.as_u16(),
                message,
                ..VendorAnswer::default()
            },
        ));
    }
    let root: Value = a.json().map_err(Verdict::Fail)?;
    let malformed = |detail: String| Verdict::Fail(ErrorKind::Malformed { detail });
    // Wrapped shape: {"code":200,"data":{"header","payload"},"error":{}}.
    let inner = match root.get("data") {
        Some(data @ Value::Object(_)) => {
            let code = root.get("code").map(lenient_u64);
            if let Some(code) = code.filter(|c| *c != Some(200)) {
                let error = &root["error"];
                return Err(Verdict::Fail(ErrorKind::Vendor(VendorAnswer {
                    status: 200,
                    code: Some(code.map_or_else(|| root["code"].to_string(), |c| c.to_string())),
                    message: text(&error["message"]).or_else(|| text(&root["msg"])),
                    reasons: vec![],
                })));
            }
            data
        }
        _ => &root,
    };
    let header = &inner["header"];
    let payload = &inner["payload"];
    if header["nameSpace"].as_str() == Some("System")
        && header["nameAction"].as_str() == Some("Exception")
    {
        let kind = text(&payload["type"]).unwrap_or_else(|| "unknown".into());
        let answer = VendorAnswer {
            status: 200,
            code: Some(kind.clone()),
            message: text(&payload["message"]),
            reasons: vec![],
        };
        return Err(match kind.as_str() {
            "TOKEN_EXPIRES" => Verdict::AuthExpired(ErrorKind::Auth(answer)),
            "AUTH_ERROR" if !login => Verdict::AuthExpired(ErrorKind::Auth(answer)),
            "AUTH_ERROR" => Verdict::Fail(ErrorKind::Auth(answer)),
            // No Retry-After: the backoff (on top of the rate limiter) decides the pause.
            "FREQUENT_REQUEST" => Verdict::Retry {
                kind: ErrorKind::RateLimited {
                    retry_after: None,
                    answer,
                },
                after: None,
            },
            _ => Verdict::Fail(ErrorKind::Vendor(answer)),
        });
    }
    if !payload.is_object() {
        return Err(malformed(format!(
            "answer without a payload object: {}",
            a.snippet()
        )));
    }
    Ok(payload.clone())
}

fn token_from(p: &Value, now: DateTime<Utc>) -> Verdict<IssuedToken> {
    let Some(token) = p["token"].as_str().filter(|t| !t.is_empty()) else {
        return Verdict::Fail(ErrorKind::Malformed {
            detail: "login answer without a token".into(),
        });
    };
    let lifetime = p["expires"]
        .as_str()
        .and_then(|e| DateTime::parse_from_rfc3339(e).ok())
        .map_or(DEFAULT_TOKEN_LIFETIME, |exp| {
            (exp.with_timezone(&Utc) - now)
                .to_std()
                .unwrap_or(Duration::ZERO)
                .max(MIN_TOKEN_LIFETIME)
        });
    Verdict::Done(IssuedToken {
        value: Secret::new(token),
        lifetime,
    })
}

#[derive(Debug)]
pub(crate) struct RecordPage {
    pub count: u64,
    pub page_count: u64,
    pub list: Vec<CrossChexRecord>,
    /// Why each malformed record of the page was skipped.
    pub skipped: Vec<String>,
}

/// The doc types every field as "Text": numbers may come as strings.
fn lenient_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn lenient_i64(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A string, or a number written as one; `None` for null/absent/empty.
fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A page; a malformed record is skipped (with its reason) rather than failing the page, so one
/// bad row cannot hold every later record back.
fn parse_page(p: &Value) -> Result<RecordPage, String> {
    let count = lenient_u64(&p["count"]).ok_or("getrecord payload without a count")?;
    let list: &[Value] = match &p["list"] {
        Value::Array(items) => items,
        // Some answers omit an empty list.
        Value::Null => &[],
        other => return Err(format!("getrecord list is not an array: {other}")),
    };
    let mut records = Vec::with_capacity(list.len());
    let mut skipped = Vec::new();
    for (i, r) in list.iter().enumerate() {
        match parse_record(r) {
            Ok(rec) => records.push(rec),
            Err(e) => skipped.push(format!("record {i}: {e}")),
        }
    }
    // Without a pageCount, `count` alone drives the loop.
    let page_count = lenient_u64(&p["pageCount"]).unwrap_or(0);
    Ok(RecordPage {
        count,
        page_count,
        list: records,
        skipped,
    })
}

fn parse_record(r: &Value) -> Result<CrossChexRecord, String> {
    let raw_time = r["checktime"].as_str().ok_or("no checktime")?;
    let checktime =
        parse_checktime_label(raw_time).ok_or_else(|| format!("bad checktime {raw_time:?}"))?;
    let device_serial = text(&r["device"]["serial_number"]).ok_or("no device.serial_number")?;
    let workno = text(&r["employee"]["workno"]).ok_or("no employee.workno")?;
    Ok(CrossChexRecord {
        uuid: text(&r["uuid"]),
        checktype: lenient_i64(&r["checktype"]).unwrap_or(0),
        checktime,
        device_serial,
        device_name: text(&r["device"]["name"]),
        workno,
        first_name: text(&r["employee"]["first_name"]),
        last_name: text(&r["employee"]["last_name"]),
    })
}

#[cfg(all(test, feature = "kit"))]
pub(crate) mod tests {
    use super::*;
    use crate::kit::fakes::crosschex::{
        self as fake, endpoint, CrossChexControl, FakeCrossChex, Record, Shape, UuidMode,
    };
    use crate::kit::fakes::Fault;
    use std::time::Instant;

    pub(crate) fn fast_options() -> HttpOptions {
        HttpOptions {
            timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            min_interval: Duration::ZERO,
            max_attempts: 4,
            backoff_min: Duration::from_millis(10),
            backoff_max: Duration::from_millis(50),
            max_retry_after: Duration::from_secs(5),
            refresh_margin: Duration::from_secs(60),
        }
    }

    pub(crate) fn config(fake: &FakeCrossChex, secret: &str) -> CrossChexConfig {
        CrossChexConfig {
            base_url: fake.base_url(),
            api_key: fake::DEFAULT_API_KEY.into(),
            api_secret: Secret::new(secret),
            timezone: chrono_tz::Europe::Brussels,
            poll_interval_secs: 60,
            request_interval_ms: 15_000,
            overlap_mins: 120,
            lookback_hours: 24,
            checktime: crate::config::CheckTime::Local,
            protime_person_ref: None,
        }
    }

    pub(crate) async fn start() -> (FakeCrossChex, CrossChexControl) {
        let fake = FakeCrossChex::start("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("fake crosschex");
        let ctl = fake.control();
        ctl.set_min_interval(Duration::ZERO);
        (fake, ctl)
    }

    fn client_for(fake: &FakeCrossChex, opts: HttpOptions) -> CrossChexClient {
        CrossChexClient::new(&config(fake, fake::DEFAULT_API_SECRET), opts).expect("client")
    }

    fn at(s: &str) -> NaiveDateTime {
        NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S").expect("time")
    }

    pub(crate) fn record(workno: &str, checktime: &str) -> Record {
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

    fn seed(ctl: &CrossChexControl, n: usize) {
        for i in 0..n {
            let t = at("2026-03-02 06:00:00") + chrono::Duration::seconds(i as i64 * 7);
            ctl.add_record(Record {
                checktime: t,
                ..record(&format!("{}", i % 9), "2026-03-02 00:00:00")
            });
        }
    }

    fn day() -> (NaiveDateTime, NaiveDateTime) {
        (at("2026-03-02 00:00:00"), at("2026-03-02 23:59:59"))
    }

    #[tokio::test]
    async fn reads_records_in_both_shapes() {
        for shape in [Shape::Wrapped, Shape::Bare] {
            let (fake, ctl) = start().await;
            ctl.set_shape(shape);
            seed(&ctl, 5);
            ctl.add_record(record("42", "2026-03-03 08:00:00")); // outside the window
            let client = client_for(&fake, fast_options()).with_per_page(2);
            let (begin, end) = day();
            let records = client.get_records(begin, end).await.expect("records");
            assert_eq!(records.len(), 5, "{shape:?}");
            assert_eq!(records[0].checktime, at("2026-03-02 06:00:00"));
            assert_eq!(records[0].checktype, 128);
            assert_eq!(records[0].device_serial, "1750120622290025");
            assert!(records[0].uuid.is_some() && records[1].uuid.is_none());
            assert_eq!(ctl.wire().count(endpoint::TOKEN), 1);
            assert_eq!(ctl.wire().count(endpoint::GET_RECORD), 3);
            let ids = ctl.request_ids();
            let unique: HashSet<_> = ids.iter().collect();
            assert_eq!(unique.len(), ids.len(), "requestId unique");
            let body: Value =
                serde_json::from_str(&ctl.wire().log().last().expect("logged").body).expect("json");
            assert_eq!(body["header"]["version"], "1.0");
            assert_eq!(body["authorize"]["type"], "token");
            assert_eq!(body["payload"]["begin_time"], "2026-03-02T00:00:00+00:00");
            fake.shutdown().await;
        }
    }

    #[tokio::test]
    async fn a_silent_per_page_cap_is_followed_by_page_count() {
        let (fake, ctl) = start().await;
        ctl.set_per_page_cap(100);
        seed(&ctl, 250);
        let client = client_for(&fake, fast_options()).with_per_page(1000);
        let (begin, end) = day();
        let records = client.get_records(begin, end).await.expect("records");
        assert_eq!(records.len(), 250);
        assert_eq!(ctl.wire().count(endpoint::GET_RECORD), 3);
        fake.shutdown().await;
    }

    #[tokio::test]
    async fn records_shifting_while_paging_make_the_window_read_again() {
        let (fake, ctl) = start().await;
        ctl.set_per_page_cap(100);
        seed(&ctl, 150);
        // Pages spaced by the limiter so the late upload lands between page 1 and page 2.
        let client = client_for(
            &fake,
            HttpOptions {
                min_interval: Duration::from_millis(500),
                ..fast_options()
            },
        );
        let (begin, end) = day();
        let task = tokio::spawn({
            let client = client.clone();
            async move { client.get_records(begin, end).await }
        });
        assert!(
            ctl.wire()
                .wait_for(endpoint::GET_RECORD, 1, Duration::from_secs(5))
                .await
        );
        // A late upload sorting before everything shifts page 2 by one record.
        ctl.add_record(record("late", "2026-03-02 01:00:00"));
        let records = task.await.expect("join").expect("records");
        assert_eq!(records.len(), 151);
        assert!(records.iter().any(|r| r.workno == "late"));
        // Page 1, page 2 (short by one), then the whole window again.
        assert_eq!(ctl.wire().count(endpoint::GET_RECORD), 4);
        fake.shutdown().await;
    }

    #[tokio::test]
    async fn a_window_that_keeps_shifting_is_incomplete_not_silently_short() {
        let (fake, ctl) = start().await;
        ctl.set_per_page_cap(100);
        seed(&ctl, 150);
        let client = client_for(
            &fake,
            HttpOptions {
                min_interval: Duration::from_millis(500),
                ..fast_options()
            },
        );
        let (begin, end) = day();
        let task = tokio::spawn({
            let client = client.clone();
            async move { client.get_records(begin, end).await }
        });
        for (n, page_one) in [(1, "01:00:00"), (3, "01:00:01")] {
            assert!(
                ctl.wire()
                    .wait_for(endpoint::GET_RECORD, n, Duration::from_secs(10))
                    .await
            );
            ctl.add_record(record("late", &format!("2026-03-02 {page_one}")));
        }
        let err = task.await.expect("join").expect_err("incomplete");
        assert_eq!(
            err.kind,
            ErrorKind::Incomplete {
                expected: 152,
                received: 151
            }
        );
        assert!(err.is_transient());
        fake.shutdown().await;
    }

    #[tokio::test]
    async fn identical_rows_held_by_the_server_are_accepted_after_one_reread() {
        let (fake, ctl) = start().await;
        ctl.set_uuid_mode(UuidMode::Never);
        ctl.add_record(record("7", "2026-03-02 08:00:00"));
        ctl.add_record(record("7", "2026-03-02 08:00:00"));
        ctl.add_record(record("8", "2026-03-02 08:00:00"));
        let client = client_for(&fake, fast_options());
        let (begin, end) = day();
        let records = client.get_records(begin, end).await.expect("records");
        assert_eq!(records.len(), 2);
        assert_eq!(ctl.wire().count(endpoint::GET_RECORD), 2);
        fake.shutdown().await;
    }

    #[test]
    fn the_page_loop_goes_past_a_lying_page_count() {
        assert!(more_pages(1, 3, 100, 250, false));
        assert!(!more_pages(3, 3, 250, 250, false));
        // pageCount computed on the size asked for (1000) while the server gave 100.
        assert!(more_pages(1, 1, 100, 250, false));
        // An empty page ends it whatever the totals say.
        assert!(!more_pages(4, 3, 249, 250, true));
        assert!(!more_pages(1, 0, 0, 0, true));
    }

    #[tokio::test]
    async fn rate_limit_is_honoured_without_a_request_storm() {
        let (fake, ctl) = start().await;
        ctl.set_min_interval(Duration::from_millis(300));
        ctl.set_per_page_cap(2);
        seed(&ctl, 6);
        let client = client_for(
            &fake,
            HttpOptions {
                min_interval: Duration::from_millis(320),
                ..fast_options()
            },
        );
        let started = Instant::now();
        let (begin, end) = day();
        let records = client.get_records(begin, end).await.expect("records");
        assert_eq!(records.len(), 6);
        // login + 3 pages, each spaced; no FREQUENT_REQUEST was provoked (no extra requests).
        assert_eq!(ctl.wire().count(endpoint::GET_RECORD), 3);
        assert!(started.elapsed() >= Duration::from_millis(960));
        fake.shutdown().await;
    }

    #[tokio::test]
    async fn frequent_request_backs_off_then_succeeds() {
        let (fake, ctl) = start().await;
        seed(&ctl, 3);
        let client = client_for(
            &fake,
            HttpOptions {
                backoff_min: Duration::from_millis(200),
                backoff_max: Duration::from_millis(200),
                ..fast_options()
            },
        );
        ctl.wire().fail_next_on(
            endpoint::GET_RECORD,
            1,
            Fault::RateLimited {
                retry_after_secs: 15,
            },
        );
        let started = Instant::now();
        let (begin, end) = day();
        let records = client.get_records(begin, end).await.expect("records");
        assert_eq!(records.len(), 3);
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert_eq!(ctl.wire().count(endpoint::GET_RECORD), 2);

        // Persistently refused: bounded attempts, then a RateLimited error.
        ctl.wire().fail_next_on(
            endpoint::GET_RECORD,
            100,
            Fault::RateLimited {
                retry_after_secs: 15,
            },
        );
        let err = client.get_records(begin, end).await.expect_err("refused");
        assert!(matches!(err.kind, ErrorKind::RateLimited { .. }), "{err}");
        assert!(err.to_string().contains("FREQUENT_REQUEST"), "{err}");
        assert_eq!(ctl.wire().count(endpoint::GET_RECORD), 6);
        ctl.wire().clear_faults();
        fake.shutdown().await;
    }

    #[tokio::test]
    async fn token_expires_means_exactly_one_new_login() {
        let (fake, ctl) = start().await;
        ctl.set_shape(Shape::Bare);
        seed(&ctl, 3);
        let client = client_for(&fake, fast_options());
        let (begin, end) = day();
        client.get_records(begin, end).await.expect("first");
        ctl.expire_tokens();
        let records = client.get_records(begin, end).await.expect("after expiry");
        assert_eq!(records.len(), 3);
        assert_eq!(ctl.wire().count(endpoint::TOKEN), 2);
        assert_eq!(ctl.wire().count(endpoint::GET_RECORD), 3);
        fake.shutdown().await;
    }

    #[tokio::test]
    async fn wrong_credentials_fail_once_with_the_vendor_reason() {
        let (fake, ctl) = start().await;
        let client =
            CrossChexClient::new(&config(&fake, "not-the-secret"), fast_options()).expect("client");
        let (begin, end) = day();
        let err = client.get_records(begin, end).await.expect_err("auth");
        assert!(
            matches!(&err.kind, ErrorKind::Auth(a) if a.code.as_deref() == Some("AUTH_ERROR")),
            "{err}"
        );
        assert_eq!(ctl.wire().count(endpoint::TOKEN), 1);
        assert_eq!(ctl.wire().count(endpoint::GET_RECORD), 0);
        fake.shutdown().await;
    }

    #[tokio::test]
    async fn proxy_errors_are_retried_and_garbage_is_a_clear_error() {
        let (fake, ctl) = start().await;
        seed(&ctl, 2);
        let client = client_for(&fake, fast_options());
        let (begin, end) = day();
        ctl.wire()
            .fail_next_on(endpoint::GET_RECORD, 2, Fault::Unavailable);
        assert_eq!(client.get_records(begin, end).await.map(|r| r.len()), Ok(2));
        assert_eq!(ctl.wire().count(endpoint::GET_RECORD), 3);
        ctl.wire()
            .fail_next_on(endpoint::GET_RECORD, 1, Fault::GarbageBody);
        let err = client.get_records(begin, end).await.expect_err("garbage");
        assert!(matches!(err.kind, ErrorKind::Malformed { .. }), "{err}");
        assert!(err
            .to_string()
            .starts_with("CrossChex Cloud attendance.record/getrecord"));
        fake.shutdown().await;
    }

    #[tokio::test]
    async fn uuids_or_tuples_dedupe_overlapping_reads() {
        let (fake, ctl) = start().await;
        ctl.set_uuid_mode(UuidMode::Alternate);
        seed(&ctl, 4);
        let client = client_for(&fake, fast_options());
        let (begin, end) = day();
        let a = client.get_records(begin, end).await.expect("first");
        let b = client
            .get_records(at("2026-03-02 06:00:10"), end)
            .await
            .expect("overlap");
        let mut keys: HashSet<RecordKey> = a.iter().map(CrossChexRecord::key).collect();
        let new: Vec<_> = b.iter().filter(|r| keys.insert(r.key())).collect();
        assert!(new.is_empty(), "the overlap brought nothing new");
        assert!(matches!(a[0].key(), RecordKey::Uuid(_)));
        assert!(matches!(a[1].key(), RecordKey::Tuple { .. }));
        fake.shutdown().await;
    }

    #[test]
    fn checktime_is_the_device_wall_clock_in_the_account_zone() {
        let tz = chrono_tz::Europe::Brussels;
        let t = |s: &str| DateTime::parse_from_rfc3339(s).expect("time");
        assert_eq!(
            reinterpret_checktime("2022-07-20T20:15:05+00:00", tz),
            Some(t("2022-07-20T20:15:05+02:00"))
        );
        assert_eq!(
            reinterpret_checktime("2022-01-20 08:00:00", tz),
            Some(t("2022-01-20T08:00:00+01:00"))
        );
        // Autumn overlap: the earlier instant; spring gap: as crate::model::local_to_instant.
        assert_eq!(
            reinterpret_checktime("2026-10-25T02:30:00+00:00", tz),
            Some(t("2026-10-25T02:30:00+02:00"))
        );
        assert_eq!(
            reinterpret_checktime("2026-03-29T02:30:00+00:00", tz),
            Some(local_to_instant(at("2026-03-29 02:30:00"), tz))
        );
        assert_eq!(reinterpret_checktime("yesterday", tz), None);
    }

    #[test]
    fn checktime_reading_local_or_utc_and_its_window_labels() {
        let tz = chrono_tz::Europe::Brussels;
        let t = |s: &str| DateTime::parse_from_rfc3339(s).expect("time");
        // A card shown at 08:00 on the device in Brussels (summer, +02:00).
        let instant = t("2026-07-02T08:00:00+02:00");
        let local_label = at("2026-07-02 08:00:00");
        let utc_label = at("2026-07-02 06:00:00");
        assert_eq!(
            checktime_instant(local_label, CheckTime::Local, tz),
            instant
        );
        assert_eq!(checktime_instant(utc_label, CheckTime::Utc, tz), instant);
        assert_eq!(
            checktime_instant(utc_label, CheckTime::Utc, tz).offset(),
            instant.offset(),
            "shown in the account's zone"
        );
        let now = instant.with_timezone(&Utc);
        assert_eq!(checktime_label(now, CheckTime::Local, tz), local_label);
        assert_eq!(checktime_label(now, CheckTime::Utc, tz), utc_label);
    }

    #[test]
    fn records_parse_leniently_but_not_blindly() {
        let r = parse_record(
            &json!({"checktype":"56","checktime":"2022-07-20T20:15:05+00:00",
            "device":{"serial_number":1750120622290025u64,"name":"X"},
            "employee":{"workno":7,"first_name":"","last_name":"L"}}),
        )
        .expect("record");
        assert_eq!((r.checktype, r.workno.as_str()), (56, "7"));
        assert_eq!(r.device_serial, "1750120622290025");
        assert_eq!(r.first_name, None);
        assert!(parse_record(&json!({"checktime":"2022-07-20T20:15:05+00:00"})).is_err());
        let page = parse_page(&json!({"count":2,"list":[
            {"checktime":"2022-07-20T20:15:05+00:00"},
            {"checktype":1,"checktime":"2022-07-20T20:15:05+00:00",
             "device":{"serial_number":"1"},"employee":{"workno":"7"}}]}))
        .expect("a page with one bad record");
        assert_eq!(page.list.len(), 1);
        assert_eq!(page.skipped.len(), 1);
        assert!(page.skipped[0].contains("record 0"), "{:?}", page.skipped);
        assert!(
            parse_page(&json!({"list":[]})).is_err(),
            "count is required"
        );
        assert!(parse_page(&json!({"count":1,"list":{}})).is_err());
        let now = Utc::now();
        let past = (now - chrono::Duration::hours(1)).to_rfc3339();
        let Verdict::Done(t) = token_from(&json!({"token":"x","expires":past}), now) else {
            panic!("token");
        };
        assert_eq!(t.lifetime, MIN_TOKEN_LIFETIME);
    }

    #[test]
    fn request_ids_look_like_uuids() {
        let id = request_id();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert_ne!(id, request_id());
    }
}
