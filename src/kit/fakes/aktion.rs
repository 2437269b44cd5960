//! Fake Aktion.NEXT / Aktion CLOUD API: an ASP.NET Web API under `/api/`, built from the
//! vendor's published help pages (not from the client's structs). Per endpoint, the page it
//! follows (cloud copy; the same pages are mirrored under
//! `http://dochazka.efg.cz/AktionNEXT/API/Help/...`):
//!
//! - `POST login` — `https://cloud.aktion.cz/api/Help/Api/POST-login`: body `LoginReq`
//!   (`UserLogin`, `ApiKey`, both Required) → `LoginResp` (`Token` GUID string, `ExpireInSec` 20,
//!   `ExpireDate`); 1002 (400) missing parameter, 1003 (401) unknown UserLogin/ApiKey, 1004 (401)
//!   invalid ApiKey.
//! - `GET person/getAll?PageNumber&PageSize&Token` —
//!   `https://cloud.aktion.cz/api/Help/Api/GET-person-getAll_PageNumber_PageSize_Token`:
//!   `PersonGetAllResp` (`Persons`: collection of `PersonGetResp`, `Paging`); 1101 (403) without
//!   the privilege View of agenda Persons. Person fields from
//!   `https://cloud.aktion.cz/api/Help/ResourceModel?modelName=PersonGetResp` (every one, `Sex`
//!   and `Lock` integers, `Lock` 1 only when ALL identifiers are locked), identifiers from
//!   `https://cloud.aktion.cz/api/Help/ResourceModel?modelName=Identifier` (`InternalNrLong` hex,
//!   `Type`, `Status`, `Holder`, `HolderDefault`, `TimeLastChange`, `RegistrationNr`,
//!   `Technology`, `Lock`, `Security`, `ValidFrom`/`ValidTo` typed string
//!   `yyyy-mm-ddThh:mi:ss`, `UdsCollection`).
//! - `GET person/get?PersonId&Token` —
//!   `https://cloud.aktion.cz/api/Help/Api/GET-person-get_PersonId_Token`: one `PersonGetResp`;
//!   1100 (404) unknown PersonId.
//! - `GET attendance/getScheduledShift?PageNumber&PageSize&PersonId&TimeFrom&TimeTo&Token&TimeLastChange`
//!   — the seed page (`shared/seeds/aktion-get-scheduled-shift.txt`, cloud
//!   `.../Help/Api/GET-attendance-getScheduledShift_...`): `PersonId` and `Token` Required;
//!   1100 / 1132 (404).
//! - `GET HwStructure/getC4HwEvents?C4Identification&LastSync&Token` —
//!   `https://cloud.aktion.cz/api/Help/Api/GET-HwStructure-getC4HwEvents_C4Identification_LastSync_Token`:
//!   all three Required (a missing one → 1002, 400); unknown controller → 1228 (404, "Hw
//!   structure physical not found"); no privilege → 1227 (403). Answer `HwStructGetC4HwEventsResp`
//!   = `{"C4HwEvents":[..]}` with the fields of
//!   `http://dochazka.efg.cz/AktionNEXT/API/Help/ResourceModel?modelName=C4HwEvents`: `ID`,
//!   `HwStructureId`, `OwnerId` GUIDs; `DateCreated`, `Date` dates; `EventCode`, `Direction`
//!   integers; `Identifier`, `Zone`, `Descriptions` strings.
//! - `GET attendance/getPassByPerson` / `getPassBySensor` — passes (model
//!   `https://cloud.aktion.cz/api/Help/ResourceModel?modelName=PersonPass`: `Date`, `SensorName`,
//!   `Direction`, `EventCode`, `IdentifierInternalNrLong`), derived from the C4 events.
//! - Every authorised call: `Token` Required (missing → 1002), unknown → 1000 (401), expired →
//!   1001 (401); 1008 (401) when rate-limited (a fault). Only application/json is served (415
//!   otherwise; XML is documented but not served here).
//!
//! Where the pages are silent (a client must not rely on more):
//! - Date PARAMETERS are accepted only in the documented `yyyy-MM-ddTHH:mm:ss` (anything else →
//!   1002), read in the server's zone, a fixed offset (default +01:00, see
//!   [`AktionControl::set_server_offset`]). JSON dates are `"\/Date(ms)\/"` (optionally with
//!   an offset suffix, [`OffsetSuffix`]); `ValidFrom`/`ValidTo` are local text.
//! - `getC4HwEvents` lists the events whose `DateCreated` is after `LastSync`, oldest first.
//!   `LastSync` has whole seconds, so events of that second with milliseconds come again.
//! - The error body is `{"Message","Code","ModelStateErr"}` (the `RequestResult` model of
//!   `POST login`'s page).
//! - `getScheduledShift` returns shifts overlapping `[TimeFrom, TimeTo]`; `PageSize` is capped
//!   silently (default 100).
//! - Event codes are tenant-defined ("Event codes can be set by user"): the fake stores what a
//!   test gives it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, FixedOffset, NaiveDateTime, Offset, TimeZone, Utc};
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

/// A person record. Its cards (`identifier_card1`/`2`) are listed among its `Identifiers` too
/// (as assigned, open MIFARE cards), unless `identifiers` already has one of that number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Person {
    pub person_id: String,
    pub name: String,
    pub surname: String,
    pub department: String,
    pub identifier_card1: String,
    pub identifier_card2: Option<String>,
    pub identifier_entry_code: Option<String>,
    pub identifiers: Vec<Identifier>,
    /// Locks every identifier of the person (then `Lock` is 1).
    pub lock: bool,
    pub time_last_change: DateTime<Utc>,
}

/// An identifier of a person (model `Identifier`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identifier {
    /// Hexadecimal.
    pub internal_nr_long: String,
    pub registration_nr: String,
    /// 0 UNIQUE, 1 HS, 2 MIFARE, 3 ABA Track, 4 HID, 5 Desfire.
    pub technology: u8,
    /// 0 card, 1 tag, 2 bracelet, 3 visiting card, 4 password, 5 article, 6 spare, 7 eCard.
    pub kind: u8,
    /// 0 free, 1 assigned, 2 lost, 4 configuration.
    pub status: u8,
    pub lock: bool,
    /// Local time of the server, as the model's `yyyy-mm-ddThh:mi:ss` text.
    pub valid_from: Option<NaiveDateTime>,
    pub valid_to: Option<NaiveDateTime>,
}

impl Identifier {
    /// An assigned, open, unlimited MIFARE card numbered `nr` (hex).
    pub fn card(nr: &str) -> Identifier {
        Identifier {
            internal_nr_long: nr.to_string(),
            registration_nr: nr.to_string(),
            technology: 2,
            kind: 0,
            status: 1,
            lock: false,
            valid_from: None,
            valid_to: None,
        }
    }
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
    deny_persons: bool,
    /// Events whose `ID` is sent as a number (not the documented GUID).
    malformed: Vec<i64>,
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
                deny_persons: false,
                malformed: Vec::new(),
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

    /// Without the privilege View of agenda Persons: `person/getAll` answers 403 / 1101.
    pub fn deny_persons(&self, deny: bool) {
        lock(&self.state).deny_persons = deny;
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

    /// Stores a hardware event that the server lists with a malformed `ID` (a number, not a
    /// GUID): a client must skip it and read the others.
    pub fn add_malformed_hw_event(&self, event: HwEvent) {
        let mut st = lock(&self.state);
        let id = st.next_event_id;
        st.next_event_id += 1;
        st.events.push((id, event));
        st.malformed.push(id);
    }

    /// Stores a hardware event; returns its `ID` (a GUID, see [`event_guid`]).
    pub fn add_hw_event(&self, event: HwEvent) -> String {
        let mut st = lock(&self.state);
        let id = st.next_event_id;
        st.next_event_id += 1;
        st.events.push((id, event));
        event_guid(id)
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
// GUIDs of the fake's records (deterministic, so tests can name them).

/// The `ID` of the `n`th event.
pub fn event_guid(n: i64) -> String {
    format!("c4e0e0e0-0000-4000-8000-{:012x}", n & 0xffff_ffff_ffff)
}

/// The `HwStructureId` of the node the control registers as number `hw`.
pub fn hw_guid(hw: i64) -> String {
    format!("4a000000-0000-4000-8000-{:012x}", hw & 0xffff_ffff_ffff)
}

/// The `OwnerId` of a person (an internal GUID, not the `PersonId`).
pub fn owner_guid(person_id: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    person_id.hash(&mut h);
    format!(
        "0e0e0000-0000-4000-8000-{:012x}",
        h.finish() & 0xffff_ffff_ffff
    )
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
struct IdentifierJson<'a> {
    internal_nr_long: String,
    #[serde(rename = "Type")]
    kind: u8,
    status: u8,
    holder: &'a str,
    holder_default: u8,
    time_last_change: String,
    registration_nr: String,
    technology: u8,
    lock: u8,
    security: u8,
    valid_from: Option<String>,
    valid_to: Option<String>,
    uds_collection: [(); 0],
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct PersonJson<'a> {
    person_id: &'a str,
    name: &'a str,
    surname: &'a str,
    organization_structure: &'a str,
    department: &'a str,
    employee_position: &'a str,
    email: String,
    mobil_phone_number: &'a str,
    phone_number: &'a str,
    login_name: String,
    degree_in_front_name: &'a str,
    degree_after_name: &'a str,
    sex: u8,
    identifier_entry_code: Option<&'a str>,
    identifier_card1: &'a str,
    identifier_card2: Option<&'a str>,
    desc: &'a str,
    lock: u8,
    identifiers: Vec<IdentifierJson<'a>>,
    time_last_change: String,
    uds_collection: [(); 0],
}

fn local_text(t: NaiveDateTime) -> String {
    t.format("%Y-%m-%dT%H:%M:%S").to_string()
}

impl<'a> From<&'a Person> for PersonJson<'a> {
    fn from(p: &'a Person) -> Self {
        let mut all: Vec<Identifier> = p.identifiers.clone();
        for card in std::iter::once(&p.identifier_card1).chain(&p.identifier_card2) {
            if !card.is_empty() && !all.iter().any(|i| &i.internal_nr_long == card) {
                all.push(Identifier::card(card));
            }
        }
        let identifiers: Vec<IdentifierJson<'a>> = all
            .into_iter()
            .enumerate()
            .map(|(n, i)| IdentifierJson {
                internal_nr_long: i.internal_nr_long,
                kind: i.kind,
                status: i.status,
                holder: &p.person_id,
                holder_default: u8::from(n == 0),
                time_last_change: ms_date(p.time_last_change, None),
                registration_nr: i.registration_nr,
                technology: i.technology,
                lock: u8::from(i.lock || p.lock),
                security: 0,
                valid_from: i.valid_from.map(local_text),
                valid_to: i.valid_to.map(local_text),
                uds_collection: [],
            })
            .collect();
        let all_locked = !identifiers.is_empty() && identifiers.iter().all(|i| i.lock == 1);
        PersonJson {
            person_id: &p.person_id,
            name: &p.name,
            surname: &p.surname,
            organization_structure: "Company/Plant",
            department: &p.department,
            employee_position: "",
            email: format!("{}@example.invalid", p.person_id.to_ascii_lowercase()),
            mobil_phone_number: "",
            phone_number: "",
            login_name: format!("{}.{}", p.name, p.surname),
            degree_in_front_name: "",
            degree_after_name: "",
            sex: 0,
            identifier_entry_code: p.identifier_entry_code.as_deref(),
            identifier_card1: &p.identifier_card1,
            identifier_card2: p.identifier_card2.as_deref(),
            desc: "",
            lock: u8::from(all_locked || p.lock),
            identifiers,
            time_last_change: ms_date(p.time_last_change, None),
            uds_collection: [],
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
    id: serde_json::Value,
    hw_structure_id: String,
    date_created: String,
    date: String,
    event_code: i32,
    direction: u8,
    owner_id: Option<String>,
    identifier: &'a str,
    zone: &'a str,
    descriptions: String,
}

#[derive(Serialize)]
struct EventsResp<'a> {
    #[serde(rename = "C4HwEvents")]
    c4_hw_events: Vec<EventJson<'a>>,
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

    /// A date parameter in the documented `yyyy-MM-ddTHH:mm:ss`, the server's local time;
    /// anything else is 1002.
    fn time(
        &self,
        name: &str,
        offset: FixedOffset,
    ) -> Result<Option<DateTime<Utc>>, Box<Response>> {
        let Some(v) = self.get(name) else {
            return Ok(None);
        };
        parse_time(v, offset).map(Some).ok_or_else(|| {
            Box::new(bad_param(format!(
                "{name}: The value '{v}' is not valid (expected yyyy-MM-ddTHH:mm:ss)."
            )))
        })
    }
}

fn parse_time(v: &str, offset: FixedOffset) -> Option<DateTime<Utc>> {
    let naive = NaiveDateTime::parse_from_str(v, "%Y-%m-%dT%H:%M:%S").ok()?;
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
        crate::clouds::hyphenated_guid(&h)
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
    if st.deny_persons {
        return Err(Box::new(error(
            StatusCode::FORBIDDEN,
            1101,
            "Application privilege View for licensed agenda Persons violated for person [all]"
                .into(),
            vec![],
        )));
    }
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
    let last_sync = params.time("LastSync", st.server_offset)?.ok_or_else(|| {
        Box::new(bad_param(
            "LastSync: The LastSync field is required.".into(),
        ))
    })?;
    let Some(c4) = st.c4s.iter().find(|c| c.identification == ident) else {
        return Err(Box::new(error(
            StatusCode::NOT_FOUND,
            1228,
            "Hw structure physical not found".into(),
            vec![],
        )));
    };
    let mut events: Vec<&(i64, HwEvent)> = st
        .events
        .iter()
        .filter(|(_, e)| e.hw_structure_id == c4.hw_structure_id)
        .filter(|(_, e)| e.date_created > last_sync)
        .collect();
    events.sort_by_key(|(id, e)| (e.date_created, *id));
    let suffix_for = |id: i64| match st.offset_suffix {
        OffsetSuffix::Never => None,
        OffsetSuffix::Always => Some(st.server_offset),
        OffsetSuffix::Alternate => (id % 2 == 1).then_some(st.server_offset),
    };
    Ok(ok(&EventsResp {
        c4_hw_events: events
            .iter()
            .map(|(id, e)| EventJson {
                id: if st.malformed.contains(id) {
                    serde_json::Value::from(*id)
                } else {
                    serde_json::Value::from(event_guid(*id))
                },
                hw_structure_id: hw_guid(e.hw_structure_id),
                date_created: ms_date(e.date_created, suffix_for(*id)),
                date: ms_date(e.date, suffix_for(*id)),
                event_code: e.event_code,
                direction: e.direction,
                owner_id: e.owner_id.as_deref().map(owner_guid),
                identifier: &e.identifier,
                zone: &e.zone,
                descriptions: e.descriptions.join(", "),
            })
            .collect(),
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
    use serde_json::Value;

    struct Env {
        fake: FakeAktion,
        ctl: AktionControl,
    }

    async fn env() -> Env {
        let fake = FakeAktion::start("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("fake");
        let ctl = fake.control();
        ctl.set_server_offset(FixedOffset::east_opt(0).expect("utc"));
        ctl.add_c4("C4-1", 11, "Gate A");
        Env { fake, ctl }
    }

    impl Env {
        async fn token(&self) -> String {
            let body = client()
                .post(format!("{}login", self.fake.base_url()))
                .json(&serde_json::json!({"UserLogin": DEFAULT_USER_LOGIN, "ApiKey": DEFAULT_API_KEY}))
                .send()
                .await
                .expect("login")
                .text()
                .await
                .expect("body");
            let v: Value = serde_json::from_str(&body).expect("json");
            v["Token"].as_str().expect("token").to_string()
        }

        async fn get(&self, path: &str, query: &[(&str, &str)]) -> (u16, Value) {
            let url = with_query(&format!("{}{path}", self.fake.base_url()), query);
            let r = client().get(url).send().await.expect("get");
            let status = r.status().as_u16();
            let text = r.text().await.expect("body");
            (status, serde_json::from_str(&text).unwrap_or(Value::Null))
        }
    }

    #[tokio::test]
    async fn c4_events_follow_the_published_page() {
        let e = env().await;
        let t = e.token().await;
        let at = |s: &str| {
            DateTime::parse_from_rfc3339(s)
                .expect("t")
                .with_timezone(&Utc)
        };
        let id = e.ctl.add_hw_event(HwEvent {
            hw_structure_id: 11,
            date_created: at("2026-03-02T08:00:00.250Z"),
            date: at("2026-03-02T07:59:59Z"),
            event_code: 5,
            direction: 2,
            owner_id: Some("P1".into()),
            identifier: "90001".into(),
            zone: "Production".into(),
            descriptions: vec!["Passage".into()],
        });
        // LastSync is Required.
        let (status, body) = e
            .get(
                "HwStructure/getC4HwEvents",
                &[("C4Identification", "C4-1"), ("Token", &t)],
            )
            .await;
        assert_eq!((status, body["Code"].as_u64()), (400, Some(1002)));
        // Only the documented format.
        let (status, body) = e
            .get(
                "HwStructure/getC4HwEvents",
                &[
                    ("C4Identification", "C4-1"),
                    ("LastSync", "2026-03-02T07:00:00Z"),
                    ("Token", &t),
                ],
            )
            .await;
        assert_eq!((status, body["Code"].as_u64()), (400, Some(1002)));
        // Unknown controller: 404 / 1228.
        let (status, body) = e
            .get(
                "HwStructure/getC4HwEvents",
                &[
                    ("C4Identification", "nope"),
                    ("LastSync", "2026-03-02T07:00:00"),
                    ("Token", &t),
                ],
            )
            .await;
        assert_eq!((status, body["Code"].as_u64()), (404, Some(1228)));
        let (status, body) = e
            .get(
                "HwStructure/getC4HwEvents",
                &[
                    ("C4Identification", "C4-1"),
                    ("LastSync", "2026-03-02T08:00:00"),
                    ("Token", &t),
                ],
            )
            .await;
        assert_eq!(status, 200);
        let ev = &body["C4HwEvents"][0];
        assert_eq!(ev["ID"], Value::String(id));
        assert_eq!(ev["HwStructureId"], Value::String(hw_guid(11)));
        assert_eq!(ev["OwnerId"], Value::String(owner_guid("P1")));
        assert_eq!(
            (ev["EventCode"].as_i64(), ev["Direction"].as_i64()),
            (Some(5), Some(2))
        );
        assert!(ev["Descriptions"].is_string());
        assert!(ev["DateCreated"]
            .as_str()
            .is_some_and(|d| d.starts_with("/Date(")));
        e.fake.shutdown().await;
    }

    #[tokio::test]
    async fn persons_carry_every_documented_field_and_identifier_objects() {
        let e = env().await;
        let mut locked = Identifier::card("ABC1");
        locked.lock = true;
        e.ctl.add_person(Person {
            person_id: "P1".into(),
            name: "Jan".into(),
            surname: "Novak".into(),
            department: "Production".into(),
            identifier_card1: "90001".into(),
            identifier_card2: None,
            identifier_entry_code: Some("1234".into()),
            identifiers: vec![locked],
            lock: false,
            time_last_change: Utc::now(),
        });
        let t = e.token().await;
        let (status, body) = e.get("person/getAll", &[("Token", &t)]).await;
        assert_eq!(status, 200);
        let p = &body["Persons"][0];
        for field in [
            "PersonId",
            "Name",
            "Surname",
            "OrganizationStructure",
            "Department",
            "EmployeePosition",
            "Email",
            "MobilPhoneNumber",
            "PhoneNumber",
            "LoginName",
            "DegreeInFrontName",
            "DegreeAfterName",
            "Sex",
            "IdentifierEntryCode",
            "IdentifierCard1",
            "IdentifierCard2",
            "Desc",
            "Lock",
            "Identifiers",
            "TimeLastChange",
            "UdsCollection",
        ] {
            assert!(p.get(field).is_some(), "{field}");
        }
        assert_eq!(p["Lock"].as_i64(), Some(0), "one identifier is open");
        let ids = p["Identifiers"].as_array().expect("identifiers");
        assert_eq!(ids.len(), 2, "the locked one and card 1");
        assert_eq!(ids[0]["Lock"].as_i64(), Some(1));
        assert_eq!(ids[1]["InternalNrLong"], "90001");
        e.ctl.deny_persons(true);
        let (status, body) = e.get("person/getAll", &[("Token", &t)]).await;
        assert_eq!((status, body["Code"].as_u64()), (403, Some(1101)));
        let (status, body) = e
            .get(
                "person/getAll",
                &[("Token", "6f1c2a9e-3b7d-4c55-9a0e-2f4b8d1c7e90")],
            )
            .await;
        assert_eq!((status, body["Code"].as_u64()), (401, Some(1000)));
        e.fake.shutdown().await;
    }
}
