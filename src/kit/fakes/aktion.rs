//! Fake Aktion.NEXT / Aktion CLOUD API (`shared/reference/aktion.md`, seed
//! `shared/seeds/aktion-get-scheduled-shift.txt`): an ASP.NET Web API under `/api/`.
//!
//! Reproduced quirks: JSON only (other `Accept`/`Content-Type` → 415); dates as
//! `"\/Date(<ms since epoch UTC>)\/"` with the slash really escaped in the body text; the token in
//! the `Token=` QUERY parameter, living 20 s; error bodies `{"Message","Code","ModelStateErr"}`
//! with Aktion's error numbers; query parameter names matched case-insensitively (ASP.NET model
//! binding); night shifts crossing midnight.
//!
//! Assumptions where the sources are silent (a client must not rely on more):
//! - The server's local time (used by `TimeFrom`/`TimeTo`/`TimeLastChange`/`LastSync` given as
//!   `yyyy-mm-ddThh:mi:ss`) is a fixed UTC offset, default +01:00 (no DST), see
//!   [`AktionControl::set_server_offset`].
//! - `getScheduledShift` returns shifts OVERLAPPING `[TimeFrom, TimeTo]` (both inclusive), so a
//!   night shift shows up on both days; an empty result is `404` with code 1132, not an empty
//!   list. Defaults: `PageNumber=1`, `PageSize=25`; `PageSize` is capped silently (default 100)
//!   and `Paging.PageSize` shows the effective size.
//! - `getC4HwEvents` answers `{"Events":[..],"LastSync":"\/Date(ms)\/"}`: events whose
//!   `DateCreated` is strictly after `LastSync`, oldest first; the answer's `LastSync` is the
//!   newest `DateCreated` returned (or the request's `LastSync` when nothing is new, or null).
//!   `LastSync` may be sent as local `yyyy-mm-ddThh:mi:ss` or as `/Date(ms)/` (lossless).
//!   Event field types: `ID`, `HwStructureId`, `EventCode`, `Direction` numbers; `OwnerId`
//!   (PersonId or null), `Identifier`, `Zone` strings; `Descriptions` a list of strings. An
//!   unknown `C4Identification` is 404 with code 1120.
//! - `person/get` answers the bare person object; `Identifiers` is a list of strings.
//! - Login: 1003 (unknown UserLogin or wrong ApiKey) and 1004 (ApiKey not a base64 16-byte key)
//!   answer 401; 1002 answers 400.
//! - The 415 body is ASP.NET's own `{"Message":".."}` (no Aktion code: the seed lists none).
//! - `getPassByPerson`/`getPassBySensor` answer `{"Passes":[{Date,SensorName,Direction,EventCode,
//!   IdentifierInternalNrLong}],"Paging":{..}}`, derived from the C4 events (sensor = the C4's
//!   name); `IdentifierInternalNrLong` is the identifier as upper-case hex.
//! - XML (`application/xml`) is documented but not served by this fake: it answers 415.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, FixedOffset, NaiveDate, NaiveDateTime, Offset, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use super::{
    deadline, garbage, guid, json_text, lock, serve, FakeRequest, Fault, Running, Vendor, Wire,
};

/// Credentials a fresh fake accepts (the ApiKey is the documentation's example).
pub const DEFAULT_USER_LOGIN: &str = "John.Doo";
pub const DEFAULT_API_KEY: &str = "hDn/LFXIPESM036W+s7VKg==";

/// Endpoint names for [`Wire`] counters and targeted faults.
pub mod endpoint {
    pub const LOGIN: &str = "POST login";
    pub const SCHEDULED_SHIFT: &str = "GET attendance/getScheduledShift";
    pub const PASS_BY_PERSON: &str = "GET attendance/getPassByPerson";
    pub const PASS_BY_SENSOR: &str = "GET attendance/getPassBySensor";
    pub const PERSON_GET_ALL: &str = "GET person/getAll";
    pub const PERSON_GET: &str = "GET person/get";
    pub const HW_EVENTS: &str = "GET HwStructure/getC4HwEvents";
    pub const OTHER: &str = "other";
}

/// A person record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Person {
    pub person_id: String,
    pub name: String,
    pub surname: String,
    pub department: String,
    pub identifier_card1: String,
    pub identifier_card2: Option<String>,
    pub identifier_entry_code: Option<String>,
    pub identifiers: Vec<String>,
    pub lock: bool,
    pub time_last_change: DateTime<Utc>,
}

/// A scheduled shift of a person. Night shifts simply end on the next day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shift {
    pub person_id: String,
    pub name: String,
    pub begin: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub description: String,
    pub time_last_change: DateTime<Utc>,
}

/// A hardware event of a C4 controller (a passage, with its zone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HwEvent {
    pub hw_structure_id: i64,
    /// When the server stored it: `LastSync` compares against this, not `date`.
    pub date_created: DateTime<Utc>,
    /// When it happened at the device (may be well before `date_created`: late upload).
    pub date: DateTime<Utc>,
    pub event_code: i32,
    /// 0 none, 1 arrival, 2 departure, 3 start of interruption, 4 end of interruption.
    pub direction: u8,
    pub owner_id: Option<String>,
    pub identifier: String,
    pub zone: String,
    pub descriptions: Vec<String>,
}

/// Which HW event dates carry an ASP.NET offset suffix (`\/Date(ms+0100)\/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetSuffix {
    Never,
    Always,
    /// Events with an odd ID carry it, the others do not: clients must parse both.
    Alternate,
}

#[derive(Debug, Clone)]
struct C4 {
    identification: String,
    hw_structure_id: i64,
    sensor_name: String,
}

#[derive(Debug)]
struct State {
    user_login: String,
    api_key: String,
    token_lifetime: Duration,
    tokens: HashMap<String, Instant>,
    persons: Vec<Person>,
    shifts: Vec<Shift>,
    c4s: Vec<C4>,
    events: Vec<(i64, HwEvent)>,
    next_event_id: i64,
    server_offset: FixedOffset,
    offset_suffix: OffsetSuffix,
    max_page_size: u32,
}

/// Cloneable handle to seed data, inspect requests and inject faults.
#[derive(Debug, Clone)]
pub struct AktionControl {
    state: Arc<Mutex<State>>,
    wire: Wire,
}

impl Default for AktionControl {
    fn default() -> Self {
        Self::new()
    }
}

impl AktionControl {
    /// Default credentials, 20 s tokens, server at UTC+01:00, no data.
    pub fn new() -> Self {
        AktionControl {
            state: Arc::new(Mutex::new(State {
                user_login: DEFAULT_USER_LOGIN.into(),
                api_key: DEFAULT_API_KEY.into(),
                token_lifetime: Duration::from_secs(20),
                tokens: HashMap::new(),
                persons: Vec::new(),
                shifts: Vec::new(),
                c4s: Vec::new(),
                events: Vec::new(),
                next_event_id: 1,
                server_offset: FixedOffset::east_opt(3600).unwrap_or(Utc.fix()),
                offset_suffix: OffsetSuffix::Never,
                max_page_size: 100,
            })),
            wire: Wire::default(),
        }
    }

    /// Transport knobs and counters (see [`endpoint`] for the names).
    pub fn wire(&self) -> &Wire {
        &self.wire
    }

    pub fn set_credentials(&self, user_login: &str, api_key: &str) {
        let mut st = lock(&self.state);
        st.user_login = user_login.to_string();
        st.api_key = api_key.to_string();
    }

    /// Lifetime of tokens issued from now on (documented: 20 s).
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        lock(&self.state).token_lifetime = lifetime;
    }

    /// Every token issued so far expires now: the next call with one gets 401 / 1001.
    pub fn expire_tokens(&self) {
        let now = Instant::now();
        for exp in lock(&self.state).tokens.values_mut() {
            *exp = now;
        }
    }

    /// The server's local time as a fixed offset (for `yyyy-mm-ddThh:mi:ss` parameters and the
    /// events' offset suffix).
    pub fn set_server_offset(&self, offset: FixedOffset) {
        lock(&self.state).server_offset = offset;
    }

    pub fn set_event_offset_suffix(&self, mode: OffsetSuffix) {
        lock(&self.state).offset_suffix = mode;
    }

    /// Silent cap on `PageSize` (default 100).
    pub fn set_max_page_size(&self, max: u32) {
        lock(&self.state).max_page_size = max.max(1);
    }

    pub fn add_person(&self, person: Person) {
        lock(&self.state).persons.push(person);
    }

    pub fn add_shift(&self, shift: Shift) {
        lock(&self.state).shifts.push(shift);
    }

    /// Registers a C4 controller: `identification` is what `C4Identification` names,
    /// `sensor_name` what passes show as `SensorName` (and `getPassBySensor` takes).
    pub fn add_c4(&self, identification: &str, hw_structure_id: i64, sensor_name: &str) {
        lock(&self.state).c4s.push(C4 {
            identification: identification.to_string(),
            hw_structure_id,
            sensor_name: sensor_name.to_string(),
        });
    }

    /// Stores a hardware event; returns its `ID`.
    pub fn add_hw_event(&self, event: HwEvent) -> i64 {
        let mut st = lock(&self.state);
        let id = st.next_event_id;
        st.next_event_id += 1;
        st.events.push((id, event));
        id
    }

    /// Loads the seed page's example: person `100200300` with a morning, an afternoon and a
    /// night shift (22:00-06:00 local, crossing midnight) on 2019-06-15. The seed page came from
    /// a server at +02:00 (CEST): call [`AktionControl::set_server_offset`] with that to query it
    /// by the page's local times.
    pub fn seed_example(&self) {
        let at = |ms: i64| DateTime::from_timestamp_millis(ms).unwrap_or_default();
        self.add_person(Person {
            person_id: "100200300".into(),
            name: "Jan".into(),
            surname: "Novak".into(),
            department: "Production".into(),
            identifier_card1: "123456".into(),
            identifier_card2: None,
            identifier_entry_code: Some("1234".into()),
            identifiers: Vec::new(),
            lock: false,
            time_last_change: at(1_732_183_509_678),
        });
        let shifts = [
            (
                "morning shift",
                1_560_578_400_000,
                1_560_600_000_000,
                "",
                1_732_183_509_678,
            ),
            (
                "afternoon shift",
                1_560_600_000_000,
                1_560_628_800_000,
                "",
                1_732_169_349_678,
            ),
            (
                "night shift",
                1_560_628_800_000,
                1_560_657_600_000,
                "irregular",
                1_732_181_349_678,
            ),
        ];
        for (name, begin, end, description, changed) in shifts {
            self.add_shift(Shift {
                person_id: "100200300".into(),
                name: name.into(),
                begin: at(begin),
                end: at(end),
                description: description.into(),
                time_last_change: at(changed),
            });
        }
    }
}

/// A running fake Aktion.
#[derive(Debug)]
pub struct FakeAktion {
    running: Running,
    control: AktionControl,
}

impl FakeAktion {
    /// Starts a fake with a fresh [`AktionControl`] on `addr` (port 0 picks a free one).
    pub async fn start(addr: SocketAddr) -> std::io::Result<Self> {
        Self::start_with(addr, AktionControl::new()).await
    }

    /// Starts a fake serving an existing control's data.
    pub async fn start_with(addr: SocketAddr, control: AktionControl) -> std::io::Result<Self> {
        let running = serve(addr, control.clone()).await?;
        Ok(FakeAktion { running, control })
    }

    pub fn addr(&self) -> SocketAddr {
        self.running.addr()
    }

    /// `http://addr/api/` (with the trailing slash, like `https://cloud.aktion.cz/api/`).
    pub fn base_url(&self) -> String {
        format!("http://{}/api/", self.running.addr())
    }

    pub fn control(&self) -> AktionControl {
        self.control.clone()
    }

    pub async fn shutdown(self) {
        self.running.shutdown().await;
    }
}

// ---------------------------------------------------------------------------------------------
// `\/Date(ms)\/` helpers (pure).

/// ASP.NET's JSON date text (before slash escaping): `/Date(1560578400000)/`, or with an offset
/// suffix `/Date(1560578400000+0100)/` (the milliseconds stay UTC; the suffix is informational).
pub(crate) fn ms_date(at: DateTime<Utc>, suffix: Option<FixedOffset>) -> String {
    let ms = at.timestamp_millis();
    match suffix {
        None => format!("/Date({ms})/"),
        Some(off) => {
            let secs = off.local_minus_utc();
            let sign = if secs < 0 { '-' } else { '+' };
            let secs = secs.unsigned_abs();
            format!(
                "/Date({ms}{sign}{:02}{:02})/",
                secs / 3600,
                secs % 3600 / 60
            )
        }
    }
}

/// Parses `/Date(ms)/` or `/Date(ms+hhmm)/` (also with escaped slashes); the suffix is ignored.
pub(crate) fn parse_ms_date(s: &str) -> Option<DateTime<Utc>> {
    let s = s.replace("\\/", "/");
    let inner = s.strip_prefix("/Date(")?.strip_suffix(")/")?;
    let digits_end = inner
        .char_indices()
        .skip(1)
        .find(|(_, c)| *c == '+' || *c == '-')
        .map_or(inner.len(), |(i, _)| i);
    let ms: i64 = inner[..digits_end].parse().ok()?;
    DateTime::from_timestamp_millis(ms)
}

/// Escapes the slashes of `"/Date(..)/"` strings the way ASP.NET writes them: `"\/Date(..)\/"`.
/// Any `/` → `\/` inside a JSON string is a valid, meaning-preserving escape, so the targeted
/// replacement can never corrupt the document.
pub(crate) fn escape_dates(json: &str) -> String {
    json.replace("\"/Date(", "\"\\/Date(")
        .replace(")/\"", ")\\/\"")
}

// ---------------------------------------------------------------------------------------------
// Wire shapes.

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct ErrorBody {
    message: String,
    code: u32,
    model_state_err: Vec<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct Paging {
    current_page: u32,
    page_size: u32,
    total_count: usize,
    total_pages: usize,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct LoginResp {
    token: String,
    expire_in_sec: u64,
    expire_date: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct LoginReq {
    user_login: Option<String>,
    api_key: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct ShiftJson<'a> {
    name: &'a str,
    begin: String,
    end: String,
    description: &'a str,
    time_last_change: String,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct ScheduledShiftResp<'a> {
    person_id: &'a str,
    shifts: Vec<ShiftJson<'a>>,
    paging: Paging,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct PersonJson<'a> {
    person_id: &'a str,
    name: &'a str,
    surname: &'a str,
    department: &'a str,
    identifier_card1: &'a str,
    identifier_card2: Option<&'a str>,
    identifier_entry_code: Option<&'a str>,
    identifiers: &'a [String],
    lock: bool,
    time_last_change: String,
}

impl<'a> From<&'a Person> for PersonJson<'a> {
    fn from(p: &'a Person) -> Self {
        PersonJson {
            person_id: &p.person_id,
            name: &p.name,
            surname: &p.surname,
            department: &p.department,
            identifier_card1: &p.identifier_card1,
            identifier_card2: p.identifier_card2.as_deref(),
            identifier_entry_code: p.identifier_entry_code.as_deref(),
            identifiers: &p.identifiers,
            lock: p.lock,
            time_last_change: ms_date(p.time_last_change, None),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct PersonsResp<'a> {
    persons: Vec<PersonJson<'a>>,
    paging: Paging,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct EventJson<'a> {
    #[serde(rename = "ID")]
    id: i64,
    hw_structure_id: i64,
    date_created: String,
    date: String,
    event_code: i32,
    direction: u8,
    owner_id: Option<&'a str>,
    identifier: &'a str,
    zone: &'a str,
    descriptions: &'a [String],
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct EventsResp<'a> {
    events: Vec<EventJson<'a>>,
    last_sync: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct PassJson<'a> {
    date: String,
    sensor_name: &'a str,
    direction: u8,
    event_code: i32,
    identifier_internal_nr_long: String,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct PassesResp<'a> {
    passes: Vec<PassJson<'a>>,
    paging: Paging,
}

/// Serialises a body and escapes its dates as ASP.NET does.
fn ok<T: Serialize>(value: &T) -> Response {
    match serde_json::to_string(value) {
        Ok(text) => json_text(StatusCode::OK, escape_dates(&text)),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

fn error(status: StatusCode, code: u32, message: String, model_state_err: Vec<String>) -> Response {
    match serde_json::to_string(&ErrorBody {
        message,
        code,
        model_state_err,
    }) {
        Ok(text) => json_text(status, text),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// 400 / 1002 with the seed's own wording (typo included).
fn bad_param(problem: String) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        1002,
        "Entry parameter missing or parameter bindigs failed".into(),
        vec![problem],
    )
}

fn unsupported_media_type() -> Response {
    json_text(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        r#"{"Message":"The request entity has a media type which the server or resource does not support. Only application/json and application/xml are supported"}"#.into(),
    )
}

// ---------------------------------------------------------------------------------------------
// Request handling.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Login,
    ScheduledShift,
    PassByPerson,
    PassBySensor,
    PersonGetAll,
    PersonGet,
    HwEvents,
    NotAllowed,
    NotFound,
}

/// ASP.NET routes are case-insensitive.
fn route(method: &Method, path: &str) -> Route {
    let lower = path.to_ascii_lowercase();
    let Some(rest) = lower.strip_prefix("/api/") else {
        return Route::NotFound;
    };
    let (r, m) = match rest.trim_end_matches('/') {
        "login" => (Route::Login, Method::POST),
        "attendance/getscheduledshift" => (Route::ScheduledShift, Method::GET),
        "attendance/getpassbyperson" => (Route::PassByPerson, Method::GET),
        "attendance/getpassbysensor" => (Route::PassBySensor, Method::GET),
        "person/getall" => (Route::PersonGetAll, Method::GET),
        "person/get" => (Route::PersonGet, Method::GET),
        "hwstructure/getc4hwevents" => (Route::HwEvents, Method::GET),
        _ => return Route::NotFound,
    };
    if *method == m {
        r
    } else {
        Route::NotAllowed
    }
}

impl Route {
    fn endpoint(self) -> &'static str {
        match self {
            Route::Login => endpoint::LOGIN,
            Route::ScheduledShift => endpoint::SCHEDULED_SHIFT,
            Route::PassByPerson => endpoint::PASS_BY_PERSON,
            Route::PassBySensor => endpoint::PASS_BY_SENSOR,
            Route::PersonGetAll => endpoint::PERSON_GET_ALL,
            Route::PersonGet => endpoint::PERSON_GET,
            Route::HwEvents => endpoint::HW_EVENTS,
            Route::NotAllowed | Route::NotFound => endpoint::OTHER,
        }
    }
}

/// Accepts only application/json (XML is documented but not served here): `Accept` must allow
/// JSON, and a `Content-Type` (always present with a body) must be JSON.
fn media_ok(req: &FakeRequest) -> bool {
    let accept_ok = req.header("accept").is_none_or(|a| {
        a.split(',').any(|part| {
            let mt = part
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            matches!(
                mt.as_str(),
                "" | "*/*" | "application/*" | "application/json"
            )
        })
    });
    let ct = req.header("content-type");
    let content_ok = match ct {
        Some(ct) => ct
            .split(';')
            .next()
            .is_some_and(|mt| mt.trim().eq_ignore_ascii_case("application/json")),
        None => req.body.is_empty(),
    };
    accept_ok && content_ok
}

/// Query parameters with ASP.NET's case-insensitive names.
struct Params(Vec<(String, String)>);

impl Params {
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }

    fn required(&self, name: &str) -> Result<&str, Box<Response>> {
        self.get(name)
            .ok_or_else(|| Box::new(bad_param(format!("{name}: The {name} field is required."))))
    }

    /// `([0-9]+)` integers with a default.
    fn number(&self, name: &str, default: u32) -> Result<u32, Box<Response>> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                Box::new(bad_param(format!("{name}: The value '{v}' is not valid.")))
            }),
        }
    }

    /// A date parameter: local `yyyy-mm-ddThh:mi:ss` (fraction allowed), a date, an RFC 3339
    /// instant, or `/Date(ms)/`.
    fn time(
        &self,
        name: &str,
        offset: FixedOffset,
    ) -> Result<Option<DateTime<Utc>>, Box<Response>> {
        let Some(v) = self.get(name) else {
            return Ok(None);
        };
        parse_time(v, offset)
            .map(Some)
            .ok_or_else(|| Box::new(bad_param(format!("{name}: The value '{v}' is not valid."))))
    }
}

fn parse_time(v: &str, offset: FixedOffset) -> Option<DateTime<Utc>> {
    if let Some(d) = parse_ms_date(v) {
        return Some(d);
    }
    if let Ok(d) = DateTime::parse_from_rfc3339(v) {
        return Some(d.with_timezone(&Utc));
    }
    let naive = [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M",
    ]
    .iter()
    .find_map(|f| NaiveDateTime::parse_from_str(v, f).ok())
    .or_else(|| {
        NaiveDate::parse_from_str(v, "%Y-%m-%d")
            .ok()
            .and_then(|d| d.and_hms_opt(0, 0, 0))
    })?;
    offset
        .from_local_datetime(&naive)
        .single()
        .map(|d| d.with_timezone(&Utc))
}

/// Pages `total` items: returns the index range and the paging object.
fn paginate(total: usize, page: u32, size: u32, max: u32) -> (std::ops::Range<usize>, Paging) {
    let size = size.min(max);
    let per = size as usize;
    let start = (page as usize - 1).saturating_mul(per).min(total);
    let end = start.saturating_add(per).min(total);
    (
        start..end,
        Paging {
            current_page: page,
            page_size: size,
            total_count: total,
            total_pages: total.div_ceil(per),
        },
    )
}

fn is_guid(token: &str) -> Option<String> {
    let hex: String = token
        .chars()
        .filter(|c| !matches!(c, '-' | '{' | '}' | '(' | ')'))
        .collect();
    (hex.len() == 32 && hex.chars().all(|c| c.is_ascii_hexdigit())).then(|| {
        let h = hex.to_ascii_lowercase();
        format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    })
}

/// What an ApiKey looks like (`hDn/LFXIPESM036W+s7VKg==`: base64 of 16 bytes).
fn api_key_well_formed(key: &str) -> bool {
    let b = key.as_bytes();
    b.len() == 24
        && b.ends_with(b"==")
        && b[..22]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
}

impl Vendor for AktionControl {
    fn wire(&self) -> &Wire {
        &self.wire
    }

    fn endpoint(&self, req: &FakeRequest) -> &'static str {
        route(&req.method, &req.path).endpoint()
    }

    /// 500 in the Aktion error body; 1008 (401) is the documented "rate policy violated"; 503 is
    /// IIS's HTML page.
    fn fault_response(&self, fault: &Fault, req: &FakeRequest) -> Response {
        match fault {
            Fault::RateLimited { .. } => {
                let who = Params(req.query())
                    .get("Token")
                    .unwrap_or("anonymous")
                    .to_string();
                error(
                    StatusCode::UNAUTHORIZED,
                    1008,
                    format!("Request rate policy violated for [{who}]"),
                    vec![],
                )
            }
            Fault::Unavailable => {
                let mut resp = (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "<!DOCTYPE HTML><html><body><h2>Service Unavailable</h2><hr><p>HTTP Error 503. The service is unavailable.</p></body></html>",
                )
                    .into_response();
                resp.headers_mut().insert(
                    axum::http::header::CONTENT_TYPE,
                    HeaderValue::from_static("text/html"),
                );
                resp
            }
            Fault::GarbageBody => garbage(),
            _ => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                500,
                "An error has occurred.".into(),
                vec![],
            ),
        }
    }

    fn handle(&self, req: &FakeRequest) -> Response {
        if !media_ok(req) {
            return unsupported_media_type();
        }
        let r = route(&req.method, &req.path);
        let mut st = lock(&self.state);
        let params = Params(req.query());
        let result = match r {
            Route::NotFound => Ok(json_text(
                StatusCode::NOT_FOUND,
                serde_json::json!({
                    "Message": format!("No HTTP resource was found that matches the request URI '{}'.", req.uri)
                })
                .to_string(),
            )),
            Route::NotAllowed => Ok(json_text(
                StatusCode::METHOD_NOT_ALLOWED,
                serde_json::json!({
                    "Message": format!("The requested resource does not support http method '{}'.", req.method)
                })
                .to_string(),
            )),
            Route::Login => Ok(login(&mut st, req)),
            _ => authorize(&st, &params).and_then(|()| match r {
                Route::ScheduledShift => scheduled_shift(&st, &params),
                Route::PersonGetAll => person_get_all(&st, &params),
                Route::PersonGet => person_get(&st, &params),
                Route::HwEvents => hw_events(&st, &params),
                Route::PassByPerson => passes(&st, &params, true),
                _ => passes(&st, &params, false),
            }),
        };
        result.unwrap_or_else(|resp| *resp)
    }
}

fn login(st: &mut State, req: &FakeRequest) -> Response {
    let body: Option<LoginReq> = serde_json::from_slice(&req.body).ok();
    let (Some(user), Some(key)) = body
        .map(|b| (b.user_login, b.api_key))
        .unwrap_or((None, None))
    else {
        return bad_param("UserLogin, ApiKey: both are required.".into());
    };
    if !api_key_well_formed(&key) {
        return error(
            StatusCode::UNAUTHORIZED,
            1004,
            "Invalid ApiKey".into(),
            vec![],
        );
    }
    if user != st.user_login || key != st.api_key {
        return error(
            StatusCode::UNAUTHORIZED,
            1003,
            "Unknown UserLogin or ApiKey".into(),
            vec![],
        );
    }
    let token = guid();
    let lifetime = st.token_lifetime;
    st.tokens.insert(token.clone(), deadline(lifetime));
    let expire_date = chrono::Duration::from_std(lifetime)
        .ok()
        .and_then(|d| Utc::now().checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC);
    ok(&LoginResp {
        token,
        expire_in_sec: lifetime.as_secs(),
        expire_date: ms_date(expire_date, None),
    })
}

fn authorize(st: &State, params: &Params) -> Result<(), Box<Response>> {
    let raw = params.required("Token")?;
    let Some(token) = is_guid(raw) else {
        return Err(Box::new(bad_param(format!(
            "Token: The value '{raw}' is not valid."
        ))));
    };
    match st.tokens.get(&token) {
        None => Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            1000,
            format!("Token {raw} not found"),
            vec![],
        ))),
        Some(exp) if Instant::now() >= *exp => Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            1001,
            format!("Token {raw} already expired"),
            vec![],
        ))),
        Some(_) => Ok(()),
    }
}

fn person_not_found(id: &str) -> Box<Response> {
    Box::new(error(
        StatusCode::NOT_FOUND,
        1100,
        format!("PersonId [{id}] not found"),
        vec![],
    ))
}

fn scheduled_shift(st: &State, params: &Params) -> Result<Response, Box<Response>> {
    let person_id = params.required("PersonId")?;
    let page = params.number("PageNumber", 1)?;
    let size = params.number("PageSize", 25)?;
    let from = params.time("TimeFrom", st.server_offset)?;
    let to = params.time("TimeTo", st.server_offset)?;
    let changed = params.time("TimeLastChange", st.server_offset)?;
    if !st.persons.iter().any(|p| p.person_id == person_id) {
        return Err(person_not_found(person_id));
    }
    let mut shifts: Vec<&Shift> = st
        .shifts
        .iter()
        .filter(|s| s.person_id == person_id)
        // Overlap, both ends inclusive: a night shift 22:00-06:00 belongs to both days.
        .filter(|s| from.is_none_or(|f| s.end >= f) && to.is_none_or(|t| s.begin <= t))
        .filter(|s| changed.is_none_or(|c| s.time_last_change >= c))
        .collect();
    if shifts.is_empty() {
        return Err(Box::new(error(
            StatusCode::NOT_FOUND,
            1132,
            format!("No scheduled action for PersonId [{person_id}] found"),
            vec![],
        )));
    }
    shifts.sort_by_key(|s| s.begin);
    let (range, paging) = paginate(shifts.len(), page, size, st.max_page_size);
    Ok(ok(&ScheduledShiftResp {
        person_id,
        shifts: shifts[range]
            .iter()
            .map(|s| ShiftJson {
                name: &s.name,
                begin: ms_date(s.begin, None),
                end: ms_date(s.end, None),
                description: &s.description,
                time_last_change: ms_date(s.time_last_change, None),
            })
            .collect(),
        paging,
    }))
}

fn person_get_all(st: &State, params: &Params) -> Result<Response, Box<Response>> {
    let page = params.number("PageNumber", 1)?;
    let size = params.number("PageSize", 25)?;
    let (range, paging) = paginate(st.persons.len(), page, size, st.max_page_size);
    Ok(ok(&PersonsResp {
        persons: st.persons[range].iter().map(PersonJson::from).collect(),
        paging,
    }))
}

fn person_get(st: &State, params: &Params) -> Result<Response, Box<Response>> {
    let id = params.required("PersonId")?;
    match st.persons.iter().find(|p| p.person_id == id) {
        Some(p) => Ok(ok(&PersonJson::from(p))),
        None => Err(person_not_found(id)),
    }
}

fn sensor_not_found(name: &str) -> Box<Response> {
    Box::new(error(
        StatusCode::NOT_FOUND,
        1120,
        format!("Sensor [{name}] not found"),
        vec![],
    ))
}

fn hw_events(st: &State, params: &Params) -> Result<Response, Box<Response>> {
    let ident = params.required("C4Identification")?;
    let last_sync = params.time("LastSync", st.server_offset)?;
    let Some(c4) = st.c4s.iter().find(|c| c.identification == ident) else {
        return Err(sensor_not_found(ident));
    };
    let mut events: Vec<&(i64, HwEvent)> = st
        .events
        .iter()
        .filter(|(_, e)| e.hw_structure_id == c4.hw_structure_id)
        .filter(|(_, e)| last_sync.is_none_or(|l| e.date_created > l))
        .collect();
    events.sort_by_key(|(id, e)| (e.date_created, *id));
    let newest = events
        .iter()
        .map(|(_, e)| e.date_created)
        .max()
        .or(last_sync);
    let suffix_for = |id: i64| match st.offset_suffix {
        OffsetSuffix::Never => None,
        OffsetSuffix::Always => Some(st.server_offset),
        OffsetSuffix::Alternate => (id % 2 == 1).then_some(st.server_offset),
    };
    Ok(ok(&EventsResp {
        events: events
            .iter()
            .map(|(id, e)| EventJson {
                id: *id,
                hw_structure_id: e.hw_structure_id,
                date_created: ms_date(e.date_created, suffix_for(*id)),
                date: ms_date(e.date, suffix_for(*id)),
                event_code: e.event_code,
                direction: e.direction,
                owner_id: e.owner_id.as_deref(),
                identifier: &e.identifier,
                zone: &e.zone,
                descriptions: &e.descriptions,
            })
            .collect(),
        last_sync: newest.map(|d| ms_date(d, None)),
    }))
}

/// The identifier as upper-case hex: decimal card numbers are converted, anything else is
/// hex-encoded byte by byte.
fn internal_nr_long(identifier: &str) -> String {
    match identifier.parse::<u128>() {
        Ok(n) => format!("{n:X}"),
        Err(_) => identifier.bytes().map(|b| format!("{b:02X}")).collect(),
    }
}

fn passes(st: &State, params: &Params, by_person: bool) -> Result<Response, Box<Response>> {
    let page = params.number("PageNumber", 1)?;
    let size = params.number("PageSize", 25)?;
    let from = params.time("TimeFrom", st.server_offset)?;
    let to = params.time("TimeTo", st.server_offset)?;
    let (person, sensor) = if by_person {
        let id = params.required("PersonId")?;
        if !st.persons.iter().any(|p| p.person_id == id) {
            return Err(person_not_found(id));
        }
        (Some(id), None)
    } else {
        let name = params.required("Sensor")?;
        match st.c4s.iter().find(|c| c.sensor_name == name) {
            Some(c) => (None, Some(c.hw_structure_id)),
            None => return Err(sensor_not_found(name)),
        }
    };
    let mut found: Vec<(&HwEvent, &str)> = st
        .events
        .iter()
        .map(|(_, e)| e)
        .filter(|e| person.is_none_or(|p| e.owner_id.as_deref() == Some(p)))
        .filter(|e| sensor.is_none_or(|s| e.hw_structure_id == s))
        .filter(|e| from.is_none_or(|f| e.date >= f) && to.is_none_or(|t| e.date <= t))
        .filter_map(|e| {
            st.c4s
                .iter()
                .find(|c| c.hw_structure_id == e.hw_structure_id)
                .map(|c| (e, c.sensor_name.as_str()))
        })
        .collect();
    found.sort_by_key(|(e, _)| e.date);
    let (range, paging) = paginate(found.len(), page, size, st.max_page_size);
    Ok(ok(&PassesResp {
        passes: found[range]
            .iter()
            .map(|(e, sensor_name)| PassJson {
                date: ms_date(e.date, None),
                sensor_name,
                direction: e.direction,
                event_code: e.event_code,
                identifier_internal_nr_long: internal_nr_long(&e.identifier),
            })
            .collect(),
        paging,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kit::fakes::testutil::{client, with_query};
    use serde_json::{json, Value};

    /// The seed page's application/json sample, byte for byte.
    const SEED_JSON: &str = r#"{"PersonId":"100200300","Shifts":[{"Name":"morning shift","Begin":"\/Date(1560578400000)\/","End":"\/Date(1560600000000)\/","Description":"","TimeLastChange":"\/Date(1732183509678)\/"},{"Name":"afternoon shift","Begin":"\/Date(1560600000000)\/","End":"\/Date(1560628800000)\/","Description":"","TimeLastChange":"\/Date(1732169349678)\/"},{"Name":"night shift","Begin":"\/Date(1560628800000)\/","End":"\/Date(1560657600000)\/","Description":"irregular","TimeLastChange":"\/Date(1732181349678)\/"}],"Paging":{"CurrentPage":1,"PageSize":25,"TotalCount":3,"TotalPages":1}}"#;

    fn ms(v: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(v).expect("ms")
    }

    fn person(id: &str, card: &str) -> Person {
        Person {
            person_id: id.into(),
            name: "Jan".into(),
            surname: "Novak".into(),
            department: "Production".into(),
            identifier_card1: card.into(),
            identifier_card2: None,
            identifier_entry_code: Some("1234".into()),
            identifiers: vec![],
            lock: false,
            time_last_change: ms(1_732_183_509_678),
        }
    }

    struct Env {
        fake: FakeAktion,
        ctl: AktionControl,
        http: reqwest::Client,
    }

    async fn env() -> Env {
        let fake = FakeAktion::start("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("start fake");
        let ctl = fake.control();
        ctl.set_server_offset(FixedOffset::east_opt(2 * 3600).expect("offset"));
        ctl.seed_example();
        ctl.add_person(person("42", "777"));
        Env {
            fake,
            ctl,
            http: client(),
        }
    }

    impl Env {
        async fn token(&self) -> String {
            let v: Value = self
                .http
                .post(format!("{}login", self.fake.base_url()))
                .json(&json!({"UserLogin": DEFAULT_USER_LOGIN, "ApiKey": DEFAULT_API_KEY}))
                .send()
                .await
                .expect("login")
                .json()
                .await
                .expect("json");
            v["Token"].as_str().expect("Token").to_string()
        }

        async fn get(&self, path: &str, query: &[(&str, &str)]) -> (u16, String) {
            let resp = self
                .http
                .get(with_query(
                    &format!("{}{path}", self.fake.base_url()),
                    query,
                ))
                .header("accept", "application/json")
                .send()
                .await
                .expect("send");
            (resp.status().as_u16(), resp.text().await.expect("text"))
        }
    }

    fn parse(text: &str) -> Value {
        serde_json::from_str(text).expect("valid json")
    }

    #[test]
    fn ms_dates_format_and_parse() {
        let at = ms(1_560_578_400_000);
        assert_eq!(ms_date(at, None), "/Date(1560578400000)/");
        let plus1 = FixedOffset::east_opt(3600).expect("offset");
        let minus530 = FixedOffset::west_opt(5 * 3600 + 1800).expect("offset");
        assert_eq!(ms_date(at, Some(plus1)), "/Date(1560578400000+0100)/");
        assert_eq!(ms_date(at, Some(minus530)), "/Date(1560578400000-0530)/");
        assert_eq!(parse_ms_date("\\/Date(1560578400000+0200)\\/"), Some(at));
        assert_eq!(parse_ms_date("/Date(-1000)/"), Some(ms(-1000)));
        assert_eq!(parse_ms_date("/Date(x)/"), None);
        assert_eq!(
            escape_dates(r#"{"a":"/Date(1)/","b":"x/y"}"#),
            r#"{"a":"\/Date(1)\/","b":"x/y"}"#
        );
    }

    #[tokio::test]
    async fn login_returns_a_guid_and_an_escaped_ms_date() {
        let env = env().await;
        let resp = env
            .http
            .post(format!("{}login", env.fake.base_url()))
            .json(&json!({"UserLogin": DEFAULT_USER_LOGIN, "ApiKey": DEFAULT_API_KEY}))
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 200);
        let raw = resp.text().await.expect("text");
        assert!(raw.contains(r#""ExpireDate":"\/Date("#), "{raw}");
        let v = parse(&raw);
        assert_eq!(v["ExpireInSec"], 20);
        assert!(is_guid(v["Token"].as_str().expect("token")).is_some());
        let exp = parse_ms_date(v["ExpireDate"].as_str().expect("date")).expect("parse");
        assert!((exp - Utc::now()).num_seconds() <= 20);

        let login = |body: Value| {
            env.http
                .post(format!("{}login", env.fake.base_url()))
                .json(&body)
                .send()
        };
        let resp = login(json!({"UserLogin": DEFAULT_USER_LOGIN}))
            .await
            .expect("send");
        assert_eq!(resp.status(), 400);
        assert_eq!(
            resp.json::<Value>().await.expect("json"),
            json!({"Message": "Entry parameter missing or parameter bindigs failed", "Code": 1002,
                   "ModelStateErr": ["UserLogin, ApiKey: both are required."]})
        );
        let resp = login(json!({"UserLogin": "Jane", "ApiKey": DEFAULT_API_KEY}))
            .await
            .expect("send");
        assert_eq!(resp.status(), 401);
        assert_eq!(
            resp.json::<Value>().await.expect("json"),
            json!({"Message": "Unknown UserLogin or ApiKey", "Code": 1003, "ModelStateErr": []})
        );
        let resp = login(json!({"UserLogin": DEFAULT_USER_LOGIN, "ApiKey": "short"}))
            .await
            .expect("send");
        assert_eq!(resp.status(), 401);
        assert_eq!(resp.json::<Value>().await.expect("json")["Code"], 1004);
        assert_eq!(env.ctl.wire().count(endpoint::LOGIN), 4);
        env.fake.shutdown().await;
    }

    #[tokio::test]
    async fn anything_but_json_is_415() {
        let env = env().await;
        let resp = env
            .http
            .post(format!("{}login", env.fake.base_url()))
            .header("content-type", "text/plain")
            .body(r#"{"UserLogin":"John.Doo","ApiKey":"hDn/LFXIPESM036W+s7VKg=="}"#)
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 415);
        assert_eq!(
            resp.json::<Value>().await.expect("json"),
            json!({"Message": "The request entity has a media type which the server or resource does not support. Only application/json and application/xml are supported"})
        );
        let token = env.token().await;
        let resp = env
            .http
            .get(with_query(
                &format!("{}person/getAll", env.fake.base_url()),
                &[("Token", token.as_str())],
            ))
            .header("accept", "text/html")
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 415);
        // Without Accept, or with a list that includes JSON, it works.
        let resp = env
            .http
            .get(with_query(
                &format!("{}person/getAll", env.fake.base_url()),
                &[("Token", token.as_str())],
            ))
            .header("accept", "text/html, application/json;q=0.9")
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 200);
        env.fake.shutdown().await;
    }

    #[tokio::test]
    async fn token_errors() {
        let env = env().await;
        let (status, body) = env.get("person/getAll", &[]).await;
        assert_eq!(status, 400);
        assert_eq!(
            parse(&body),
            json!({"Message": "Entry parameter missing or parameter bindigs failed", "Code": 1002,
                   "ModelStateErr": ["Token: The Token field is required."]})
        );
        let unknown = "0f8fad5b-d9cb-469f-a165-70867728950e";
        let (status, body) = env.get("person/getAll", &[("Token", unknown)]).await;
        assert_eq!(status, 401);
        assert_eq!(
            parse(&body),
            json!({"Message": format!("Token {unknown} not found"), "Code": 1000, "ModelStateErr": []})
        );
        let token = env.token().await;
        // Parameter names bind case-insensitively, like ASP.NET.
        assert_eq!(env.get("person/getall", &[("token", &token)]).await.0, 200);
        env.ctl.expire_tokens();
        let (status, body) = env.get("person/getAll", &[("Token", &token)]).await;
        assert_eq!(status, 401);
        assert_eq!(
            parse(&body),
            json!({"Message": format!("Token {token} already expired"), "Code": 1001, "ModelStateErr": []})
        );
        env.fake.shutdown().await;
    }

    #[tokio::test]
    async fn scheduled_shift_matches_the_seed_byte_for_byte() {
        let env = env().await;
        let token = env.token().await;
        let (status, body) = env
            .get(
                "attendance/getScheduledShift",
                &[
                    ("PageNumber", "1"),
                    ("PageSize", "25"),
                    ("PersonId", "100200300"),
                    ("TimeFrom", "2019-06-15T00:00:00"),
                    ("TimeTo", "2019-06-15T23:59:59"),
                    ("Token", &token),
                ],
            )
            .await;
        assert_eq!(status, 200);
        assert_eq!(body, SEED_JSON);

        // The night shift crosses midnight: it also belongs to the next day.
        let (_, body) = env
            .get(
                "attendance/getScheduledShift",
                &[
                    ("PersonId", "100200300"),
                    ("TimeFrom", "2019-06-16T00:00:00"),
                    ("TimeTo", "2019-06-16T23:59:59"),
                    ("Token", &token),
                ],
            )
            .await;
        let v = parse(&body);
        assert_eq!(v["Shifts"].as_array().map(Vec::len), Some(1));
        assert_eq!(v["Shifts"][0]["Name"], "night shift");

        // Paging.
        let (_, body) = env
            .get(
                "attendance/getScheduledShift",
                &[
                    ("PersonId", "100200300"),
                    ("PageSize", "2"),
                    ("PageNumber", "2"),
                    ("Token", &token),
                ],
            )
            .await;
        let v = parse(&body);
        assert_eq!(
            v["Paging"],
            json!({"CurrentPage": 2, "PageSize": 2, "TotalCount": 3, "TotalPages": 2})
        );
        assert_eq!(v["Shifts"][0]["Name"], "night shift");

        // TimeLastChange: shifts changed at or after it (local server time; +02:00 here).
        // 1732181349678 = 2024-11-21T09:29:09.678Z = 11:29:09.678 local.
        let (_, body) = env
            .get(
                "attendance/getScheduledShift",
                &[
                    ("PersonId", "100200300"),
                    ("TimeLastChange", "2024-11-21T11:29:09.678"),
                    ("Token", &token),
                ],
            )
            .await;
        let names: Vec<String> = parse(&body)["Shifts"]
            .as_array()
            .expect("shifts")
            .iter()
            .map(|s| s["Name"].as_str().unwrap_or_default().to_string())
            .collect();
        assert_eq!(names, vec!["morning shift", "night shift"]);

        let (status, body) = env
            .get(
                "attendance/getScheduledShift",
                &[("PersonId", "nobody"), ("Token", &token)],
            )
            .await;
        assert_eq!(status, 404);
        assert_eq!(
            parse(&body),
            json!({"Message": "PersonId [nobody] not found", "Code": 1100, "ModelStateErr": []})
        );
        let (status, body) = env
            .get(
                "attendance/getScheduledShift",
                &[("PersonId", "42"), ("Token", &token)],
            )
            .await;
        assert_eq!(status, 404);
        assert_eq!(
            parse(&body),
            json!({"Message": "No scheduled action for PersonId [42] found", "Code": 1132, "ModelStateErr": []})
        );
        let (status, body) = env
            .get(
                "attendance/getScheduledShift",
                &[
                    ("PersonId", "100200300"),
                    ("PageSize", "abc"),
                    ("Token", &token),
                ],
            )
            .await;
        assert_eq!(status, 400);
        assert_eq!(parse(&body)["Code"], 1002);
        let (status, _) = env
            .get(
                "attendance/getScheduledShift",
                &[
                    ("PersonId", "100200300"),
                    ("TimeFrom", "15.6.2019"),
                    ("Token", &token),
                ],
            )
            .await;
        assert_eq!(status, 400);
        env.fake.shutdown().await;
    }

    #[tokio::test]
    async fn persons_list_and_single() {
        let env = env().await;
        let token = env.token().await;
        let (status, body) = env
            .get(
                "person/getAll",
                &[("PageNumber", "1"), ("PageSize", "1"), ("Token", &token)],
            )
            .await;
        assert_eq!(status, 200);
        assert!(body.contains(r#""TimeLastChange":"\/Date(1732183509678)\/""#));
        assert_eq!(
            parse(&body),
            json!({"Persons": [{"PersonId": "100200300", "Name": "Jan", "Surname": "Novak", "Department": "Production",
                                "IdentifierCard1": "123456", "IdentifierCard2": null, "IdentifierEntryCode": "1234",
                                "Identifiers": [], "Lock": false, "TimeLastChange": "/Date(1732183509678)/"}],
                   "Paging": {"CurrentPage": 1, "PageSize": 1, "TotalCount": 2, "TotalPages": 2}})
        );
        let (status, body) = env
            .get("person/get", &[("PersonId", "42"), ("Token", &token)])
            .await;
        assert_eq!(status, 200);
        assert_eq!(parse(&body)["IdentifierCard1"], "777");
        let (status, body) = env
            .get("person/get", &[("PersonId", "43"), ("Token", &token)])
            .await;
        assert_eq!(status, 404);
        assert_eq!(parse(&body)["Code"], 1100);
        env.ctl.set_max_page_size(1);
        let (_, body) = env
            .get("person/getAll", &[("PageSize", "500"), ("Token", &token)])
            .await;
        assert_eq!(parse(&body)["Paging"]["PageSize"], 1);
        env.fake.shutdown().await;
    }

    #[tokio::test]
    async fn c4_events_since_last_sync() {
        let env = env().await;
        env.ctl.add_c4("C4-0001", 17, "Gate north");
        let event = |created: i64, date: i64, owner: &str| HwEvent {
            hw_structure_id: 17,
            date_created: ms(created),
            date: ms(date),
            event_code: 1,
            direction: 1,
            owner_id: Some(owner.into()),
            identifier: "123456".into(),
            zone: "production".into(),
            descriptions: vec!["Passage".into()],
        };
        env.ctl
            .add_hw_event(event(1_700_000_000_000, 1_700_000_000_000, "100200300"));
        env.ctl
            .add_hw_event(event(1_700_000_060_000, 1_700_000_050_000, "42"));
        let token = env.token().await;
        let (status, body) = env
            .get(
                "HwStructure/getC4HwEvents",
                &[("C4Identification", "C4-0001"), ("Token", &token)],
            )
            .await;
        assert_eq!(status, 200);
        assert!(
            body.contains(r#""DateCreated":"\/Date(1700000000000)\/""#),
            "{body}"
        );
        let v = parse(&body);
        assert_eq!(v["Events"].as_array().map(Vec::len), Some(2));
        assert_eq!(
            v["Events"][0],
            json!({"ID": 1, "HwStructureId": 17, "DateCreated": "/Date(1700000000000)/", "Date": "/Date(1700000000000)/",
                   "EventCode": 1, "Direction": 1, "OwnerId": "100200300", "Identifier": "123456",
                   "Zone": "production", "Descriptions": ["Passage"]})
        );
        let last_sync = v["LastSync"].as_str().expect("LastSync").to_string();
        assert_eq!(last_sync, "/Date(1700000060000)/");

        // Nothing new since; then a late event (happened earlier, created later) appears.
        let (_, body) = env
            .get(
                "HwStructure/getC4HwEvents",
                &[
                    ("C4Identification", "C4-0001"),
                    ("LastSync", &last_sync),
                    ("Token", &token),
                ],
            )
            .await;
        let v = parse(&body);
        assert_eq!(v["Events"], json!([]));
        assert_eq!(v["LastSync"], last_sync.as_str());
        env.ctl.set_event_offset_suffix(OffsetSuffix::Alternate);
        env.ctl
            .add_hw_event(event(1_700_000_120_000, 1_699_999_000_000, "42"));
        env.ctl
            .add_hw_event(event(1_700_000_180_000, 1_700_000_170_000, "42"));
        // LastSync as local wall-clock (server +02:00): 1700000060000 = 2023-11-14T22:14:20Z.
        let (_, body) = env
            .get(
                "HwStructure/getC4HwEvents",
                &[
                    ("C4Identification", "C4-0001"),
                    ("LastSync", "2023-11-15T00:14:20"),
                    ("Token", &token),
                ],
            )
            .await;
        assert!(
            body.contains(r#""Date":"\/Date(1699999000000+0200)\/""#),
            "{body}"
        );
        assert!(
            body.contains(r#""Date":"\/Date(1700000170000)\/""#),
            "{body}"
        );
        let v = parse(&body);
        assert_eq!(v["Events"].as_array().map(Vec::len), Some(2));

        let (status, body) = env
            .get(
                "HwStructure/getC4HwEvents",
                &[("C4Identification", "C4-9"), ("Token", &token)],
            )
            .await;
        assert_eq!(status, 404);
        assert_eq!(
            parse(&body),
            json!({"Message": "Sensor [C4-9] not found", "Code": 1120, "ModelStateErr": []})
        );

        // Passes derived from the same events.
        let (status, body) = env
            .get(
                "attendance/getPassByPerson",
                &[
                    ("PersonId", "42"),
                    ("TimeFrom", "2023-11-15T00:00:00"),
                    ("Token", &token),
                ],
            )
            .await;
        assert_eq!(status, 200);
        let v = parse(&body);
        assert_eq!(v["Paging"]["TotalCount"], 2);
        assert_eq!(
            v["Passes"][0],
            json!({"Date": "/Date(1700000050000)/", "SensorName": "Gate north", "Direction": 1, "EventCode": 1,
                   "IdentifierInternalNrLong": "1E240"})
        );
        let (_, body) = env
            .get(
                "attendance/getPassBySensor",
                &[("Sensor", "Gate north"), ("Token", &token)],
            )
            .await;
        assert_eq!(parse(&body)["Paging"]["TotalCount"], 4);
        env.fake.shutdown().await;
    }

    #[tokio::test]
    async fn faults_in_aktion_shapes() {
        let env = env().await;
        let token = env.token().await;
        env.ctl.wire().fail_next_on(
            endpoint::PERSON_GET_ALL,
            1,
            Fault::RateLimited {
                retry_after_secs: 1,
            },
        );
        let (status, body) = env.get("person/getAll", &[("Token", &token)]).await;
        assert_eq!(status, 401);
        assert_eq!(
            parse(&body),
            json!({"Message": format!("Request rate policy violated for [{token}]"), "Code": 1008, "ModelStateErr": []})
        );
        env.ctl.wire().fail_next(1, Fault::InternalError);
        let (status, body) = env.get("person/getAll", &[("Token", &token)]).await;
        assert_eq!(status, 500);
        assert_eq!(
            parse(&body),
            json!({"Message": "An error has occurred.", "Code": 500, "ModelStateErr": []})
        );
        let (status, _) = env.get("nothing/here", &[]).await;
        assert_eq!(status, 404);
        let resp = env
            .http
            .get(format!("{}login", env.fake.base_url()))
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 405);
        env.fake.shutdown().await;
    }
}
