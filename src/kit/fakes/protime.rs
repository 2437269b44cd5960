//! Fake Protime API (myProtime connector, `shared/reference/protime.md`).
//!
//! Follows Protime's published pages:
//! - <https://documentation.myprotime.eu/protimeapi/reference/responses/>: the status codes
//!   (401 bad token, 403 valid token without the scope, 404, 409 conflict, 429, 500, 503) and the
//!   error bodies: `{"error":{"code","message"}}`, with `reasons` for controller validation, and
//!   model validation errors without the `error` wrapper.
//! - <https://documentation.myprotime.eu/protimeapi/reference/collections/clockings/post/>:
//!   `POST /clockings` needs `connector-protimeapi-clockings.write`; 201 + `Location`; 400 for
//!   validation, 401 "missing or invalid access token, or insufficient scope".
//! - <https://documentation.myprotime.eu/protimeapi/concepts/clocking-model/>: overnight
//!   clockings are booked on the day the schedule says (the standard approach sends 0..1439 and
//!   Protime picks the day), so a clocking can come back dated the day before with a minute of
//!   1440 or more ([`ProtimeControl::set_overnight_until`]).
//! - <https://documentation.myprotime.eu/protimeapi/reference/collections/clockings/get-list/>:
//!   `GET /clockings` needs `connector-protimeapi-clockings.read` and a date range.
//!
//! Post faults ([`PostFault`], [`ProtimeControl::fail_post`]) play what sits in front of
//! Protime: a reverse proxy that answers 502/504 (its own HTML page, not Protime's envelope) or
//! 408 while the backend stores the clocking anyway, a connection reset after the clocking was
//! stored, and Protime's own permanent refusals (404/409/422 in its envelope).
//!
//! One server plays both hosts: the OAuth2 authority (`/tenants/{tenant}/connect/token`) and the
//! connector API under [`API_PREFIX`].
//!
//! Assumptions where the public documentation is silent (a client must not rely on more):
//! - Error `code` strings (`Unauthorized`, `InvalidFilter`, ...) are invented; the envelope
//!   `{"error":{"code","message","reasons"}}` is documented.
//! - Model validation errors are `{"validationErrors":{"<json path>":["message",..]}}`: a map from
//!   field to messages (the reference only says they come without the `error` wrapper). Query
//!   problems (filter, continuation token) use the `error` envelope.
//! - `nextLink` / `deltaLink` / `Location` are server-relative paths starting with
//!   `/connector/protimeapi/api/v1` (as the reference shows for `deltaLink` and `Location`);
//!   [`ProtimeControl::set_absolute_links`] switches to absolute URLs.
//! - The first `?delta` round lists plain items; only the deltaLink answers wrap items in
//!   `{"changeType","data"}`. A `Delete` change carries `data: {"id","changeVersion"}`. Delta
//!   answers list every change in order (not collapsed per id), one page each, always with a new
//!   `deltaLink`.
//! - External references appear only when asked for with `?externalReferences=(..)`, as
//!   `"person":{"id":1,"externalReferences":{"@badge-number":".."}}`.
//! - `GET /clockings` needs the `clockings.read` scope (holding `.write` is not enough) and, like
//!   access clockings, a date range of at most one year.
//! - People items are `{"id","firstName","lastName"}`.
//! - A wrong client secret answers 400 `{"error":"invalid_client"}` (IdentityServer's answer for
//!   credentials in the form body).
//! - Tokens: unknown tenants in the token path get 404. HTTP Basic client authentication is not
//!   supported (the agent uses the documented form body).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{Months, NaiveDate, Utc};
use serde::Serialize;
use serde_json::{json, Map, Value};

use super::{
    base64url, garbage, json, lock, random_hex, serve, FakeRequest, Fault, Running, Vendor, Wire,
};

/// Path prefix of every connector API call.
pub const API_PREFIX: &str = "/connector/protimeapi/api/v1";

/// Scope needed to create clockings.
pub const SCOPE_CLOCKINGS_WRITE: &str = "connector-protimeapi-clockings.write";
/// Scope needed to list clockings (the duplicate check before a re-send).
pub const SCOPE_CLOCKINGS_READ: &str = "connector-protimeapi-clockings.read";
/// Scope needed for access clockings (list, single, delta).
pub const SCOPE_ACCESS_CLOCKINGS_READ: &str = "connector-protimeapi-access-clockings.read";
/// Scope needed for people.
pub const SCOPE_PEOPLE_READ: &str = "connector-protimeapi-people.read";

/// Tenant, client id and secret a fresh fake accepts.
pub const DEFAULT_TENANT: &str = "badgegate";
pub const DEFAULT_CLIENT_ID: &str = "badgegate-agent";
pub const DEFAULT_CLIENT_SECRET: &str = "protime-fake-secret";

/// Endpoint names for [`Wire`] counters and targeted faults.
pub mod endpoint {
    pub const TOKEN: &str = "POST token";
    pub const POST_CLOCKINGS: &str = "POST clockings";
    pub const GET_CLOCKINGS: &str = "GET clockings";
    pub const GET_CLOCKING: &str = "GET clockings/{id}";
    pub const ACCESS_CLOCKINGS: &str = "GET access-clockings";
    pub const ACCESS_CLOCKING: &str = "GET access-clockings/{id}";
    pub const DELTA_ACCESS_CLOCKINGS: &str = "GET delta/access-clockings";
    pub const PEOPLE: &str = "GET people";
    pub const OTHER: &str = "other";
}

/// Longest URI the API accepts (documented 414).
const MAX_URI: usize = 4096;

/// A person known to the tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Person {
    pub id: i64,
    pub badge_number: String,
    pub employee_number: String,
    pub first_name: String,
    pub last_name: String,
}

/// A terminal known to the tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Terminal {
    pub id: i64,
    pub external_code: String,
}

/// `kind` of a time clocking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockingKind {
    InOut,
    Reason,
    Activity,
    ActivityEnd,
}

impl ClockingKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ClockingKind::InOut => "InOut",
            ClockingKind::Reason => "Reason",
            ClockingKind::Activity => "Activity",
            ClockingKind::ActivityEnd => "ActivityEnd",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [
            ClockingKind::InOut,
            ClockingKind::Reason,
            ClockingKind::Activity,
            ClockingKind::ActivityEnd,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// A time clocking stored by `POST /clockings`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clocking {
    pub id: i64,
    pub person_id: i64,
    pub date: NaiveDate,
    /// -1440..=2880: clockings may belong to the previous/next day.
    pub time_of_day_in_minutes: i32,
    pub kind: ClockingKind,
    pub terminal_id: Option<i64>,
}

/// Result of an access attempt (Protime's vocabulary).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessStatus {
    AccessOk,
    AccessRefused,
    WrongPinCode,
    AlarmCode,
    AntiPassbackError,
    OutZone,
    UnknownBadge,
}

impl AccessStatus {
    fn wire_name(self, spell_unknown_badge_number: bool) -> &'static str {
        match self {
            AccessStatus::AccessOk => "AccessOk",
            AccessStatus::AccessRefused => "AccessRefused",
            AccessStatus::WrongPinCode => "WrongPinCode",
            AccessStatus::AlarmCode => "AlarmCode",
            AccessStatus::AntiPassbackError => "AntiPassbackError",
            AccessStatus::OutZone => "OutZone",
            // Newer reference pages spell it UnknownBadgeNumber: clients must accept both.
            AccessStatus::UnknownBadge if spell_unknown_badge_number => "UnknownBadgeNumber",
            AccessStatus::UnknownBadge => "UnknownBadge",
        }
    }
}

/// The content of an access clocking, as seeded by a test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessClockingSpec {
    pub person_id: i64,
    pub date: NaiveDate,
    /// 0..=1439: access clockings always happen on the actual date.
    pub time_of_day_in_minutes: u16,
    pub terminal_id: i64,
    pub status: AccessStatus,
}

/// An access clocking as stored, with its id and change version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessClocking {
    pub id: i64,
    /// Opaque, sorts as a string (zero-padded counter).
    pub change_version: String,
    pub spec: AccessClockingSpec,
}

/// How `POST /clockings` answers success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostAnswer {
    /// `201 Created` + `Location`.
    Created,
    /// `202 Accepted` + `Operation-Location` (some tenants).
    Accepted,
}

/// What a `POST /clockings` gets instead of the normal answer ([`ProtimeControl::fail_post`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostFault {
    /// The clocking IS stored, then the answer is `status`: 502/504 as a reverse proxy's HTML
    /// page (the proxy gave up on the slow backend), 408 likewise, anything else in Protime's
    /// envelope.
    StoreThenAnswer(u16),
    /// The clocking IS stored, then the connection is cut before any answer (a reset).
    StoreThenReset,
    /// Not stored: Protime refuses it with `status` (404, 409, 422) in its error envelope.
    Refuse(u16),
}

#[derive(Debug)]
struct Token {
    scopes: Vec<String>,
    expires_at: Instant,
}

#[derive(Debug, Clone)]
enum Change {
    Upsert(AccessClocking),
    Delete {
        id: i64,
        change_version: String,
        date: NaiveDate,
        person_id: i64,
    },
}

impl Change {
    fn date_and_person(&self) -> (NaiveDate, i64) {
        match self {
            Change::Upsert(a) => (a.spec.date, a.spec.person_id),
            Change::Delete {
                date, person_id, ..
            } => (*date, *person_id),
        }
    }
}

/// Where a paged list continues.
#[derive(Debug, Clone, Copy)]
struct Cursor {
    offset: usize,
    empties_left: u32,
    /// Change-log length when the listing started: the deltaLink of a `?delta` round continues
    /// from here, so changes made while paging are delivered (again) by the delta.
    log_pos: usize,
}

#[derive(Debug, Clone, Default)]
struct Filter {
    persons: Option<Vec<i64>>,
    from: Option<NaiveDate>,
    to: Option<NaiveDate>,
}

impl Filter {
    fn matches(&self, date: NaiveDate, person: i64) -> bool {
        self.from.is_none_or(|from| from <= date)
            && self.to.is_none_or(|to| date <= to)
            && self.persons.as_ref().is_none_or(|p| p.contains(&person))
    }
}

/// Which external references the caller asked for.
#[derive(Debug, Clone, Default)]
struct ExtRefs {
    people: Vec<String>,
    terminals: Vec<String>,
}

#[derive(Debug, Clone)]
struct DeltaCursor {
    log_pos: usize,
    filter: Filter,
    refs: ExtRefs,
    serial: u64,
}

#[derive(Debug)]
struct State {
    origin: String,
    tenant: String,
    client_id: String,
    client_secret: String,
    allowed_scopes: Vec<String>,
    token_lifetime: Duration,
    tokens: HashMap<String, Token>,
    people: Vec<Person>,
    terminals: Vec<Terminal>,
    clockings: Vec<Clocking>,
    next_clocking_id: i64,
    access: BTreeMap<i64, AccessClocking>,
    next_access_id: i64,
    version: u64,
    log: Vec<Change>,
    page_size: usize,
    empty_pages: u32,
    absolute_links: bool,
    post_answer: PostAnswer,
    spell_unknown_badge_number: bool,
    cursors: HashMap<String, Cursor>,
    delta_tokens: HashMap<String, DeltaCursor>,
    delta_serial: u64,
    delta_expired_below: u64,
    delta_conflicts: u32,
    /// By ordinal of `POST /clockings` (1 = the first one received).
    post_faults: BTreeMap<u64, PostFault>,
    /// Badge number → status every POST for it is refused with.
    refused_badges: HashMap<String, u16>,
    /// Clockings posted before this minute are booked on the previous day (+1440).
    overnight_until: Option<i32>,
    /// Scopes the token endpoint silently leaves out of the tokens it issues.
    withheld_scopes: Vec<String>,
    /// What a call whose token lacks the scope gets (403 by default; 401 is documented too).
    missing_scope_status: StatusCode,
}

impl State {
    fn new() -> Self {
        State {
            origin: String::new(),
            tenant: DEFAULT_TENANT.into(),
            client_id: DEFAULT_CLIENT_ID.into(),
            client_secret: DEFAULT_CLIENT_SECRET.into(),
            allowed_scopes: [
                SCOPE_CLOCKINGS_WRITE,
                SCOPE_CLOCKINGS_READ,
                SCOPE_ACCESS_CLOCKINGS_READ,
                SCOPE_PEOPLE_READ,
            ]
            .map(String::from)
            .to_vec(),
            token_lifetime: Duration::from_secs(1800),
            tokens: HashMap::new(),
            people: Vec::new(),
            terminals: Vec::new(),
            clockings: Vec::new(),
            next_clocking_id: 5001,
            access: BTreeMap::new(),
            next_access_id: 1001,
            version: 0,
            log: Vec::new(),
            page_size: 100,
            empty_pages: 0,
            absolute_links: false,
            post_answer: PostAnswer::Created,
            spell_unknown_badge_number: false,
            cursors: HashMap::new(),
            delta_tokens: HashMap::new(),
            delta_serial: 0,
            delta_expired_below: 0,
            delta_conflicts: 0,
            post_faults: BTreeMap::new(),
            refused_badges: HashMap::new(),
            overnight_until: None,
            withheld_scopes: Vec::new(),
            missing_scope_status: StatusCode::FORBIDDEN,
        }
    }

    fn next_change_version(&mut self) -> String {
        self.version += 1;
        format!("{:020}", self.version)
    }

    fn link(&self, path_and_query: &str) -> String {
        if self.absolute_links {
            format!("{}{path_and_query}", self.origin)
        } else {
            path_and_query.to_string()
        }
    }

    fn person_json(&self, id: i64, refs: &ExtRefs) -> Value {
        let mut obj = Map::new();
        obj.insert("id".into(), json!(id));
        if !refs.people.is_empty() {
            let person = self.people.iter().find(|p| p.id == id);
            let mut ext = Map::new();
            for name in &refs.people {
                let v = person.map(|p| match name.as_str() {
                    "@badge-number" => p.badge_number.clone(),
                    _ => p.employee_number.clone(),
                });
                ext.insert(name.clone(), json!(v));
            }
            obj.insert("externalReferences".into(), Value::Object(ext));
        }
        Value::Object(obj)
    }

    fn terminal_json(&self, id: i64, refs: &ExtRefs) -> Value {
        let mut obj = Map::new();
        obj.insert("id".into(), json!(id));
        if !refs.terminals.is_empty() {
            let code = self
                .terminals
                .iter()
                .find(|t| t.id == id)
                .map(|t| t.external_code.clone());
            let mut ext = Map::new();
            ext.insert("@external-code".into(), json!(code));
            obj.insert("externalReferences".into(), Value::Object(ext));
        }
        Value::Object(obj)
    }

    fn access_json(&self, a: &AccessClocking, refs: &ExtRefs) -> Value {
        json!({
            "changeVersion": a.change_version,
            "id": a.id,
            "person": self.person_json(a.spec.person_id, refs),
            "date": a.spec.date.format("%Y-%m-%d").to_string(),
            "timeOfDayInMinutes": a.spec.time_of_day_in_minutes,
            "terminal": self.terminal_json(a.spec.terminal_id, refs),
            "status": a.spec.status.wire_name(self.spell_unknown_badge_number),
        })
    }

    fn clocking_json(&self, c: &Clocking, refs: &ExtRefs) -> Value {
        let mut v = json!({
            "id": c.id,
            "person": self.person_json(c.person_id, refs),
            "date": c.date.format("%Y-%m-%d").to_string(),
            "timeOfDayInMinutes": c.time_of_day_in_minutes,
            "kind": c.kind.as_str(),
        });
        if let (Some(t), Value::Object(obj)) = (c.terminal_id, &mut v) {
            obj.insert("terminal".into(), self.terminal_json(t, refs));
        }
        v
    }
}

/// Cloneable handle to seed data, inspect what was received and inject faults.
#[derive(Debug, Clone)]
pub struct ProtimeControl {
    state: Arc<Mutex<State>>,
    wire: Wire,
}

impl Default for ProtimeControl {
    fn default() -> Self {
        Self::new()
    }
}

impl ProtimeControl {
    /// A control with default credentials, all scopes allowed and no data.
    pub fn new() -> Self {
        ProtimeControl {
            state: Arc::new(Mutex::new(State::new())),
            wire: Wire::default(),
        }
    }

    /// Transport knobs and counters (see [`endpoint`] for the names).
    pub fn wire(&self) -> &Wire {
        &self.wire
    }

    pub fn tenant(&self) -> String {
        lock(&self.state).tenant.clone()
    }

    pub fn set_tenant(&self, tenant: &str) {
        lock(&self.state).tenant = tenant.to_string();
    }

    /// The client credentials the token endpoint accepts.
    pub fn set_client(&self, client_id: &str, client_secret: &str) {
        let mut st = lock(&self.state);
        st.client_id = client_id.to_string();
        st.client_secret = client_secret.to_string();
    }

    /// The scopes the client may obtain (default: all four the agent uses).
    pub fn set_allowed_scopes(&self, scopes: &[&str]) {
        lock(&self.state).allowed_scopes = scopes.iter().map(|s| s.to_string()).collect();
    }

    /// Lifetime of tokens issued from now on (`expires_in`, default 1800 s).
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        lock(&self.state).token_lifetime = lifetime;
    }

    /// Every token issued so far expires now: the next API call with one gets 401.
    pub fn expire_tokens(&self) {
        let now = Instant::now();
        for t in lock(&self.state).tokens.values_mut() {
            t.expires_at = now;
        }
    }

    /// Token requests received (successful or not): tests assert tokens are reused.
    pub fn token_requests(&self) -> u64 {
        self.wire.count(endpoint::TOKEN)
    }

    pub fn add_person(&self, person: Person) {
        lock(&self.state).people.push(person);
    }

    /// Persons `(id, badge)` with made-up names (employee number `E<id>`), for tests and the demo.
    pub fn add_people(&self, people: &[(i64, &str)]) {
        for (id, badge) in people {
            self.add_person(Person {
                id: *id,
                badge_number: (*badge).into(),
                employee_number: format!("E{id}"),
                first_name: "Test".into(),
                last_name: format!("Person{id}"),
            });
        }
    }

    pub fn add_terminal(&self, terminal: Terminal) {
        lock(&self.state).terminals.push(terminal);
    }

    /// Clockings stored so far (by POST), in arrival order.
    pub fn clockings(&self) -> Vec<Clocking> {
        lock(&self.state).clockings.clone()
    }

    pub fn set_post_answer(&self, answer: PostAnswer) {
        lock(&self.state).post_answer = answer;
    }

    /// Server page size for every list (default 100).
    pub fn set_page_size(&self, size: usize) {
        lock(&self.state).page_size = size.max(1);
    }

    /// Number of EMPTY pages (still carrying a nextLink) served before every data page: "an empty
    /// value does NOT mean the end".
    pub fn set_empty_pages(&self, n: u32) {
        lock(&self.state).empty_pages = n;
    }

    /// Emit nextLink/deltaLink/Location as absolute URLs instead of server-relative paths.
    pub fn set_absolute_links(&self, on: bool) {
        lock(&self.state).absolute_links = on;
    }

    /// Spell `UnknownBadge` as `UnknownBadgeNumber` (newer reference pages).
    pub fn set_spell_unknown_badge_number(&self, on: bool) {
        lock(&self.state).spell_unknown_badge_number = on;
    }

    /// Adds an access clocking (a new change); returns its id.
    pub fn add_access_clocking(&self, spec: AccessClockingSpec) -> i64 {
        let mut st = lock(&self.state);
        let id = st.next_access_id;
        st.next_access_id += 1;
        let change_version = st.next_change_version();
        let item = AccessClocking {
            id,
            change_version,
            spec,
        };
        st.log.push(Change::Upsert(item.clone()));
        st.access.insert(id, item);
        id
    }

    /// Replaces an access clocking's content, bumping its changeVersion. False if unknown.
    pub fn update_access_clocking(&self, id: i64, spec: AccessClockingSpec) -> bool {
        let mut st = lock(&self.state);
        if !st.access.contains_key(&id) {
            return false;
        }
        let change_version = st.next_change_version();
        let item = AccessClocking {
            id,
            change_version,
            spec,
        };
        st.log.push(Change::Upsert(item.clone()));
        st.access.insert(id, item);
        true
    }

    /// Deletes an access clocking (a `Delete` change). False if unknown.
    pub fn delete_access_clocking(&self, id: i64) -> bool {
        let mut st = lock(&self.state);
        let Some(old) = st.access.remove(&id) else {
            return false;
        };
        let change_version = st.next_change_version();
        st.log.push(Change::Delete {
            id,
            change_version,
            date: old.spec.date,
            person_id: old.spec.person_id,
        });
        true
    }

    /// Re-sends an OLDER version of access clocking `id` (lower changeVersion than its latest
    /// change) as a new delta entry: "an item with a lower changeVersion than the one already held
    /// is stale". False when the item has no older version.
    pub fn resend_stale_access_clocking(&self, id: i64) -> bool {
        let mut st = lock(&self.state);
        let latest = st.log.iter().rev().find_map(|c| match c {
            Change::Upsert(a) if a.id == id => Some(a.change_version.clone()),
            Change::Delete {
                id: d,
                change_version,
                ..
            } if *d == id => Some(change_version.clone()),
            _ => None,
        });
        let Some(latest) = latest else {
            return false;
        };
        let stale = st.log.iter().rev().find_map(|c| match c {
            Change::Upsert(a) if a.id == id && a.change_version < latest => Some(a.clone()),
            _ => None,
        });
        match stale {
            Some(a) => {
                st.log.push(Change::Upsert(a));
                true
            }
            None => false,
        }
    }

    /// Current access clockings by id.
    pub fn access_clockings(&self) -> Vec<AccessClocking> {
        lock(&self.state).access.values().cloned().collect()
    }

    /// Every deltaToken issued so far becomes expired: calling its deltaLink answers 410.
    pub fn expire_delta_tokens(&self) {
        let mut st = lock(&self.state);
        st.delta_expired_below = st.delta_serial;
    }

    /// The next `n` delta calls answer 409 (another delta is active).
    pub fn set_delta_conflicts(&self, n: u32) {
        lock(&self.state).delta_conflicts = n;
    }

    /// The `ordinal`-th `POST /clockings` received (counting from 1, faulted ones included) gets
    /// `fault`. Ordinals already passed are ignored.
    pub fn fail_post(&self, ordinal: u64, fault: PostFault) {
        lock(&self.state).post_faults.insert(ordinal, fault);
        if fault == PostFault::StoreThenReset {
            self.arm_reset(ordinal);
        }
    }

    /// Every `POST /clockings` for `badge` is refused with `status` (404/409/422), in Protime's
    /// envelope, until [`Self::accept_badge`].
    pub fn refuse_badge(&self, badge: &str, status: u16) {
        lock(&self.state)
            .refused_badges
            .insert(badge.to_string(), status);
    }

    pub fn accept_badge(&self, badge: &str) {
        lock(&self.state).refused_badges.remove(badge);
    }

    /// Overnight shifts: a clocking posted with a minute below `minute` (e.g. 360 for 06:00) is
    /// booked on the previous day at minute + 1440, as Protime's schedule would. `None`: off.
    pub fn set_overnight_until(&self, minute: Option<i32>) {
        lock(&self.state).overnight_until = minute;
    }

    /// Tokens issued from now on lack `scope` although the client asked for it (a client whose
    /// grant was narrowed), and calls needing it answer `status` (401 or 403).
    pub fn withhold_scope(&self, scope: &str, status: u16) {
        let mut st = lock(&self.state);
        st.withheld_scopes.push(scope.to_string());
        st.missing_scope_status = StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN);
    }

    /// Tokens issued from now on carry every scope asked for again.
    pub fn restore_scopes(&self) {
        lock(&self.state).withheld_scopes.clear();
    }

    /// A reset needs the transport (a [`Fault::ProcessThenDrop`] on the wire): it is armed for
    /// the next POST when that one is `ordinal`.
    fn arm_reset(&self, ordinal: u64) {
        if self.wire.count(endpoint::POST_CLOCKINGS) + 1 == ordinal {
            self.wire
                .fail_next_on(endpoint::POST_CLOCKINGS, 1, Fault::ProcessThenDrop);
        }
    }
}

/// A running fake Protime.
#[derive(Debug)]
pub struct FakeProtime {
    running: Running,
    control: ProtimeControl,
}

impl FakeProtime {
    /// Starts a fake with a fresh [`ProtimeControl`] on `addr` (port 0 picks a free one).
    pub async fn start(addr: SocketAddr) -> std::io::Result<Self> {
        Self::start_with(addr, ProtimeControl::new()).await
    }

    /// Starts a fake serving an existing control's data (e.g. to restart on the same data).
    pub async fn start_with(addr: SocketAddr, control: ProtimeControl) -> std::io::Result<Self> {
        let running = serve(addr, control.clone()).await?;
        lock(&control.state).origin = format!("http://{}", running.addr());
        Ok(FakeProtime { running, control })
    }

    pub fn addr(&self) -> SocketAddr {
        self.running.addr()
    }

    /// `http://addr/connector/protimeapi/api/v1` (no trailing slash).
    pub fn base_url(&self) -> String {
        format!("http://{}{API_PREFIX}", self.running.addr())
    }

    /// `http://addr/tenants/{tenant}/connect/token`.
    pub fn token_url(&self) -> String {
        format!(
            "http://{}/tenants/{}/connect/token",
            self.running.addr(),
            self.control.tenant()
        )
    }

    pub fn control(&self) -> ProtimeControl {
        self.control.clone()
    }

    pub async fn shutdown(self) {
        self.running.shutdown().await;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Token,
    PostClockings,
    GetClockings,
    GetClocking(i64),
    AccessClockings,
    AccessClocking(i64),
    Delta,
    People,
    NotAllowed,
    NotFound,
}

impl Route {
    fn endpoint(self) -> &'static str {
        match self {
            Route::Token => endpoint::TOKEN,
            Route::PostClockings => endpoint::POST_CLOCKINGS,
            Route::GetClockings => endpoint::GET_CLOCKINGS,
            Route::GetClocking(_) => endpoint::GET_CLOCKING,
            Route::AccessClockings => endpoint::ACCESS_CLOCKINGS,
            Route::AccessClocking(_) => endpoint::ACCESS_CLOCKING,
            Route::Delta => endpoint::DELTA_ACCESS_CLOCKINGS,
            Route::People => endpoint::PEOPLE,
            Route::NotAllowed | Route::NotFound => endpoint::OTHER,
        }
    }

    fn scope(self) -> Option<&'static str> {
        match self {
            Route::PostClockings => Some(SCOPE_CLOCKINGS_WRITE),
            Route::GetClockings | Route::GetClocking(_) => Some(SCOPE_CLOCKINGS_READ),
            Route::AccessClockings | Route::AccessClocking(_) | Route::Delta => {
                Some(SCOPE_ACCESS_CLOCKINGS_READ)
            }
            Route::People => Some(SCOPE_PEOPLE_READ),
            Route::Token | Route::NotAllowed | Route::NotFound => None,
        }
    }
}

fn route(method: &Method, path: &str, tenant: &str) -> Route {
    if path == format!("/tenants/{tenant}/connect/token") {
        return if method == Method::POST {
            Route::Token
        } else {
            Route::NotAllowed
        };
    }
    let Some(rest) = path.strip_prefix(API_PREFIX) else {
        return Route::NotFound;
    };
    let rest = rest.trim_end_matches('/');
    let get = method == Method::GET;
    let by_id = |r: &str, prefix: &str| r.strip_prefix(prefix).and_then(|id| id.parse().ok());
    match rest {
        "/clockings" if method == Method::POST => Route::PostClockings,
        "/clockings" if get => Route::GetClockings,
        "/access-clockings" if get => Route::AccessClockings,
        "/delta/access-clockings" if get => Route::Delta,
        "/people" if get => Route::People,
        "/clockings" | "/access-clockings" | "/delta/access-clockings" | "/people" => {
            Route::NotAllowed
        }
        r => match (by_id(r, "/clockings/"), by_id(r, "/access-clockings/")) {
            (Some(id), _) if get => Route::GetClocking(id),
            (_, Some(id)) if get => Route::AccessClocking(id),
            (Some(_), _) | (_, Some(_)) => Route::NotAllowed,
            _ => Route::NotFound,
        },
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorInner<'a>,
}

#[derive(Serialize)]
struct ErrorInner<'a> {
    code: &'a str,
    message: &'a str,
    reasons: Vec<String>,
}

/// Protime's documented error envelope `{"error":{"code","message","reasons"}}`.
fn error(status: StatusCode, code: &str, message: &str, reasons: Vec<String>) -> Response {
    json(
        status,
        &ErrorBody {
            error: ErrorInner {
                code,
                message,
                reasons,
            },
        },
    )
}

fn bad_request(code: &str, message: &str) -> Response {
    error(StatusCode::BAD_REQUEST, code, message, vec![])
}

/// Model validation errors come WITHOUT the `error` wrapper (documented).
fn validation_errors(errors: BTreeMap<String, Vec<String>>) -> Response {
    json(
        StatusCode::BAD_REQUEST,
        &json!({ "validationErrors": errors }),
    )
}

/// OAuth2 error bodies are plain `{"error":"..."}` (RFC 6749), not Protime's envelope.
fn oauth_error(code: &str) -> Response {
    let mut resp = json(StatusCode::BAD_REQUEST, &json!({ "error": code }));
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// A token without the scope a call needs: 403 ("valid Bearer token but the service does not
/// have the required scope") or 401 ("missing or invalid access token, or insufficient scope"),
/// as the published pages say. The 401 body does not name the scope (the pages show none; the
/// `WWW-Authenticate` challenge does, as RFC 6750 §3 has it); the 403 body lists it in `reasons`.
fn missing_scope(status: StatusCode, needed: &str) -> Response {
    let mut resp = if status == StatusCode::UNAUTHORIZED {
        error(
            status,
            "Unauthorized",
            "The request is not authorized.",
            vec![],
        )
    } else {
        error(
            status,
            "Forbidden",
            "The access token does not grant the required scope.",
            vec![format!("Missing scope {needed}.")],
        )
    };
    let challenge = format!("Bearer error=\"insufficient_scope\", scope=\"{needed}\"");
    if let Ok(v) = HeaderValue::from_str(&challenge) {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    resp
}

/// What a reverse proxy (nginx) in front of Protime answers itself: an HTML page, not Protime's
/// envelope.
fn proxy_page(status: StatusCode) -> Response {
    let title = format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error")
    );
    let body = format!(
        "<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n<center><h1>{title}</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
    );
    let mut resp = (status, body).into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
    resp
}

/// Protime's permanent refusal of a clocking, in its envelope.
fn refusal(status: u16) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::CONFLICT);
    let (code, message, reason) = match status {
        StatusCode::NOT_FOUND => (
            "NotFound",
            "The requested resource does not exist.",
            "The person has no contract on the clocking date.",
        ),
        StatusCode::UNPROCESSABLE_ENTITY => (
            "UnprocessableEntity",
            "The request could not be processed.",
            "The clocking date lies in a closed payroll period.",
        ),
        _ => (
            "Conflict",
            "Concurrency conflict.",
            "The person's clockings for this day are locked by another change.",
        ),
    };
    error(status, code, message, vec![reason.to_string()])
}

impl Vendor for ProtimeControl {
    fn wire(&self) -> &Wire {
        &self.wire
    }

    fn endpoint(&self, req: &FakeRequest) -> &'static str {
        let tenant = self.tenant();
        route(&req.method, &req.path, &tenant).endpoint()
    }

    /// 500/503/429 in the `{"error":{..}}` envelope; 429 carries `Retry-After: <seconds>`.
    fn fault_response(&self, fault: &Fault, _req: &FakeRequest) -> Response {
        match fault {
            Fault::Unavailable => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                "The service is temporarily unavailable.",
                vec![],
            ),
            Fault::RateLimited { retry_after_secs } => {
                let mut resp = error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "TooManyRequests",
                    "Rate limit exceeded.",
                    vec![format!("Retry after {retry_after_secs} seconds.")],
                );
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
                resp
            }
            Fault::GarbageBody => garbage(),
            _ => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalServerError",
                "An unexpected error occurred.",
                vec![],
            ),
        }
    }

    fn handle(&self, req: &FakeRequest) -> Response {
        let mut st = lock(&self.state);
        if req.uri.len() > MAX_URI {
            return error(
                StatusCode::URI_TOO_LONG,
                "UriTooLong",
                "The request URI is longer than 4096 characters.",
                vec![],
            );
        }
        let r = route(&req.method, &req.path, &st.tenant);
        if r == Route::Token {
            return token(&mut st, req);
        }
        if !req.path.starts_with(API_PREFIX) {
            return match r {
                Route::NotAllowed => StatusCode::METHOD_NOT_ALLOWED.into_response(),
                _ => error(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    "Resource not found.",
                    vec![],
                ),
            };
        }
        // "Every request MUST send User-Agent: Service/Version (Company)".
        if req
            .header("user-agent")
            .is_none_or(|ua| ua.trim().is_empty())
        {
            return bad_request(
                "MissingUserAgent",
                "The User-Agent header is required (Service/Version (Company)).",
            );
        }
        let scopes = match authenticate(&st, req) {
            Ok(s) => s,
            Err(resp) => return *resp,
        };
        if let Some(needed) = r.scope() {
            if !scopes.iter().any(|s| s == needed) {
                return missing_scope(st.missing_scope_status, needed);
            }
        }
        let query = req.query();
        match r {
            Route::PostClockings => {
                // This request is not counted on the wire yet.
                let ordinal = self.wire.count(endpoint::POST_CLOCKINGS) + 1;
                let fault = st.post_faults.remove(&ordinal);
                if st.post_faults.get(&(ordinal + 1)) == Some(&PostFault::StoreThenReset) {
                    self.wire
                        .fail_next_on(endpoint::POST_CLOCKINGS, 1, Fault::ProcessThenDrop);
                }
                post_clocking(&mut st, req, fault)
            }
            Route::GetClockings => list_clockings(&mut st, req, &query),
            Route::GetClocking(id) => get_clocking(&st, id, &query),
            Route::AccessClockings => list_access(&mut st, req, &query),
            Route::AccessClocking(id) => get_access(&st, id, &query),
            Route::Delta => delta(&mut st, &query),
            Route::People => list_people(&mut st, req, &query),
            Route::NotAllowed => error(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "The HTTP method is not allowed on this resource.",
                vec![],
            ),
            Route::Token | Route::NotFound => error(
                StatusCode::NOT_FOUND,
                "NotFound",
                "Resource not found.",
                vec![],
            ),
        }
    }
}

fn token(st: &mut State, req: &FakeRequest) -> Response {
    let form_ct = req
        .header("content-type")
        .is_some_and(|ct| ct.starts_with("application/x-www-form-urlencoded"));
    if !form_ct {
        return oauth_error("invalid_request");
    }
    let form = super::parse_pairs(&String::from_utf8_lossy(&req.body));
    let field = |name: &str| {
        form.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    match field("grant_type") {
        None => return oauth_error("invalid_request"),
        Some("client_credentials") => {}
        Some(_) => return oauth_error("unsupported_grant_type"),
    }
    if field("client_id") != Some(st.client_id.as_str())
        || field("client_secret") != Some(st.client_secret.as_str())
    {
        return oauth_error("invalid_client");
    }
    let scopes: Vec<String> = match field("scope") {
        Some(s) if !s.trim().is_empty() => s.split_whitespace().map(String::from).collect(),
        _ => st.allowed_scopes.clone(),
    };
    if scopes.iter().any(|s| !st.allowed_scopes.contains(s)) {
        return oauth_error("invalid_scope");
    }
    // RFC 6749 §3.3: the server may issue fewer scopes than asked for (and says so in `scope`).
    let scopes: Vec<String> = scopes
        .into_iter()
        .filter(|s| !st.withheld_scopes.contains(s))
        .collect();
    let lifetime = st.token_lifetime;
    let exp = Utc::now()
        .timestamp()
        .saturating_add(i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX));
    let header = base64url(br#"{"alg":"RS256","kid":"fake-protime","typ":"at+jwt"}"#);
    let claims = json!({
        "iss": format!("{}/tenants/{}", st.origin, st.tenant),
        "client_id": st.client_id,
        "scope": scopes,
        "exp": exp,
        "jti": random_hex(16),
    });
    let payload = base64url(claims.to_string().as_bytes());
    let access_token = format!(
        "{header}.{payload}.{}",
        base64url(random_hex(32).as_bytes())
    );
    st.tokens.insert(
        access_token.clone(),
        Token {
            scopes: scopes.clone(),
            expires_at: super::deadline(lifetime),
        },
    );
    let mut resp = json(
        StatusCode::OK,
        &json!({
            "access_token": access_token,
            "expires_in": lifetime.as_secs(),
            "token_type": "Bearer",
            "scope": scopes.join(" "),
        }),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn authenticate(st: &State, req: &FakeRequest) -> Result<Vec<String>, Box<Response>> {
    let unauthorized = |description: &str, reason: &str| {
        let mut resp = error(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "The request is not authenticated.",
            vec![reason.to_string()],
        );
        let challenge =
            format!("Bearer error=\"invalid_token\", error_description=\"{description}\"");
        if let Ok(v) = HeaderValue::from_str(&challenge) {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        resp
    };
    let bearer = req
        .header("authorization")
        .and_then(|h| {
            h.strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
        })
        .map(str::trim);
    let Some(bearer) = bearer else {
        return Err(Box::new(unauthorized(
            "missing token",
            "No bearer token was sent.",
        )));
    };
    match st.tokens.get(bearer) {
        None => Err(Box::new(unauthorized(
            "invalid token",
            "The access token is invalid.",
        ))),
        Some(t) if Instant::now() >= t.expires_at => Err(Box::new(unauthorized(
            "The token expired",
            "The access token is expired.",
        ))),
        Some(t) => Ok(t.scopes.clone()),
    }
}

/// A model error: the JSON path of the field and what is wrong with it.
type FieldResult<T> = Result<T, (String, String)>;

fn invalid<T>(field: &str, message: impl Into<String>) -> FieldResult<T> {
    Err((field.to_string(), message.into()))
}

/// Collects every field's errors at once, like ASP.NET model validation.
#[derive(Default)]
struct ModelErrors(BTreeMap<String, Vec<String>>);

impl ModelErrors {
    fn check<T>(&mut self, result: FieldResult<T>) -> Option<T> {
        match result {
            Ok(v) => Some(v),
            Err((field, message)) => {
                self.0.entry(field).or_default().push(message);
                None
            }
        }
    }
}

/// `{"id":123}` or `{"externalReferences":{"@badge-number":"6767676"}}` (or `@employee-number`).
fn resolve_person(st: &State, v: &Value) -> FieldResult<i64> {
    let Value::Object(p) = v else {
        return match v {
            Value::Null => invalid("person", "The person field is required."),
            _ => invalid("person", "The person must be an object."),
        };
    };
    let ext = p.get("externalReferences").and_then(Value::as_object);
    match (p.get("id"), ext) {
        (Some(id), None) => match id.as_i64() {
            Some(id) if st.people.iter().any(|p| p.id == id) => Ok(id),
            Some(id) => invalid("person.id", format!("No person found with id {id}.")),
            None => invalid("person.id", "The id must be an integer."),
        },
        (None, Some(ext)) if ext.len() == 1 => {
            let Some((name, value)) = ext.iter().next() else {
                return invalid("person", "An external reference is required.");
            };
            let field = format!("person.externalReferences.{name}");
            let matches: fn(&Person, &str) -> bool = match name.as_str() {
                "@badge-number" => |p, v| p.badge_number == v,
                "@employee-number" => |p, v| p.employee_number == v,
                _ => return invalid(&field, format!("Unknown external reference '{name}'.")),
            };
            let Some(value) = value.as_str() else {
                return invalid(&field, "The value must be a string.");
            };
            match st.people.iter().find(|p| matches(p, value)) {
                Some(p) => Ok(p.id),
                None => invalid(&field, format!("No person found with {name} '{value}'.")),
            }
        }
        _ => invalid(
            "person",
            "Exactly one of id or one external reference is required.",
        ),
    }
}

/// Optional; `{"id":7}` or `{"externalReferences":{"@external-code":"gate-north"}}`.
fn resolve_terminal(st: &State, v: &Value) -> FieldResult<Option<i64>> {
    let t = match v {
        Value::Null => return Ok(None),
        Value::Object(t) => t,
        _ => return invalid("terminal", "The terminal must be an object."),
    };
    let code = t
        .get("externalReferences")
        .and_then(Value::as_object)
        .and_then(|e| e.get("@external-code"));
    match (t.get("id"), code) {
        (Some(id), None) => match id.as_i64() {
            Some(id) if st.terminals.iter().any(|t| t.id == id) => Ok(Some(id)),
            _ => invalid("terminal.id", format!("No terminal found with id {id}.")),
        },
        (None, Some(code)) => {
            let code = code.as_str().unwrap_or_default();
            match st.terminals.iter().find(|t| t.external_code == code) {
                Some(t) => Ok(Some(t.id)),
                None => invalid(
                    "terminal.externalReferences.@external-code",
                    format!("No terminal found with @external-code '{code}'."),
                ),
            }
        }
        _ => invalid(
            "terminal",
            "Exactly one of id or externalReferences.@external-code is required.",
        ),
    }
}

fn parse_date_field(v: &Value) -> FieldResult<NaiveDate> {
    let Some(s) = v.as_str() else {
        return invalid("date", "The date field is required (YYYY-MM-DD).");
    };
    match NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        Ok(d) if s.len() == 10 => Ok(d),
        _ => invalid("date", format!("'{s}' is not a valid date (YYYY-MM-DD).")),
    }
}

/// Time clockings allow -1440..2880 (previous/next day), unlike access clockings.
fn parse_minutes(v: &Value) -> FieldResult<i32> {
    const FIELD: &str = "timeOfDayInMinutes";
    match v.as_i64() {
        Some(m) if (-1440..=2880).contains(&m) => i32::try_from(m)
            .or_else(|_| invalid(FIELD, format!("{m} is out of range (-1440 to 2880)."))),
        Some(m) => invalid(FIELD, format!("{m} is out of range (-1440 to 2880).")),
        None => invalid(
            FIELD,
            "The timeOfDayInMinutes field is required and must be an integer.",
        ),
    }
}

fn parse_kind(v: &Value) -> FieldResult<ClockingKind> {
    let Some(k) = v.as_str() else {
        return invalid("kind", "The kind field is required.");
    };
    ClockingKind::parse(k).map_or_else(
        || {
            invalid(
                "kind",
                format!("'{k}' is not one of InOut, Reason, Activity, ActivityEnd."),
            )
        },
        Ok,
    )
}

fn post_clocking(st: &mut State, req: &FakeRequest, fault: Option<PostFault>) -> Response {
    if let Some(PostFault::Refuse(status)) = fault {
        return refusal(status);
    }
    let body: Value = match serde_json::from_slice(&req.body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => {
            return validation_errors(BTreeMap::from([(
                "$".to_string(),
                vec!["The request body must be a JSON object.".to_string()],
            )]))
        }
        Err(e) => {
            return validation_errors(BTreeMap::from([(
                "$".to_string(),
                vec![format!("The request body is not valid JSON: {e}.")],
            )]))
        }
    };
    let mut errors = ModelErrors::default();
    let person_id = errors.check(resolve_person(st, &body["person"]));
    let date = errors.check(parse_date_field(&body["date"]));
    let minutes = errors.check(parse_minutes(&body["timeOfDayInMinutes"]));
    let kind = errors.check(parse_kind(&body["kind"]));
    let terminal_id = errors.check(resolve_terminal(st, &body["terminal"]));
    let (Some(person_id), Some(date), Some(minutes), Some(kind), Some(terminal_id)) =
        (person_id, date, minutes, kind, terminal_id)
    else {
        return validation_errors(errors.0);
    };
    let badge = st
        .people
        .iter()
        .find(|p| p.id == person_id)
        .map(|p| p.badge_number.clone());
    if let Some(status) = badge.and_then(|b| st.refused_badges.get(&b).copied()) {
        return refusal(status);
    }
    // The schedule books an early-morning clocking on the night shift that began the day before.
    let (date, minutes) = match (st.overnight_until, date.pred_opt()) {
        (Some(until), Some(previous)) if (0..until).contains(&minutes) => {
            (previous, minutes + 1440)
        }
        _ => (date, minutes),
    };
    // No idempotency key exists: an identical second POST is stored again (documented).
    let id = st.next_clocking_id;
    st.next_clocking_id += 1;
    st.clockings.push(Clocking {
        id,
        person_id,
        date,
        time_of_day_in_minutes: minutes,
        kind,
        terminal_id,
    });
    if let Some(PostFault::StoreThenAnswer(status)) = fault {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
        return match status {
            StatusCode::BAD_GATEWAY | StatusCode::GATEWAY_TIMEOUT | StatusCode::REQUEST_TIMEOUT => {
                proxy_page(status)
            }
            _ => error(
                status,
                "InternalServerError",
                "An unexpected error occurred.",
                vec![],
            ),
        };
    }
    let (status, name, target) = match st.post_answer {
        PostAnswer::Created => (
            StatusCode::CREATED,
            header::LOCATION,
            st.link(&format!("{API_PREFIX}/clockings/{id}")),
        ),
        PostAnswer::Accepted => (
            StatusCode::ACCEPTED,
            header::HeaderName::from_static("operation-location"),
            st.link(&format!("{API_PREFIX}/operations/{}", super::guid())),
        ),
    };
    let mut resp = status.into_response();
    if let Ok(v) = HeaderValue::from_str(&target) {
        resp.headers_mut().insert(name, v);
    }
    resp
}

/// Parses the `filter` grammar the agent needs: terms joined by `and`, each one of
/// `person in (1,2)`, `person eq 1`, `date ge|gt|le|lt|eq 'YYYY-MM-DD'`.
fn parse_filter(s: &str) -> Result<Filter, String> {
    let mut f = Filter::default();
    let mut rest = s.trim();
    loop {
        let (field, after) = split_word(rest);
        let (op, after) = split_word(after);
        let after = after.trim_start();
        let (value, after) = if let Some(inner) = after.strip_prefix('(') {
            let end = inner.find(')').ok_or("unclosed '(' in filter")?;
            (&inner[..end], &inner[end + 1..])
        } else if let Some(inner) = after.strip_prefix('\'') {
            let end = inner.find('\'').ok_or("unclosed quote in filter")?;
            (&inner[..end], &inner[end + 1..])
        } else {
            split_word(after)
        };
        match (field, op.to_ascii_lowercase().as_str()) {
            ("person", "in") => {
                let ids = value
                    .split(',')
                    .map(|v| v.trim().parse::<i64>())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|_| format!("invalid person id list '{value}'"))?;
                f.persons = Some(ids);
            }
            ("person", "eq") => {
                let id = value
                    .parse::<i64>()
                    .map_err(|_| format!("invalid person id '{value}'"))?;
                f.persons = Some(vec![id]);
            }
            ("date", op) => {
                let d = NaiveDate::parse_from_str(value, "%Y-%m-%d")
                    .map_err(|_| format!("invalid date '{value}' (YYYY-MM-DD)"))?;
                match op {
                    "ge" => f.from = Some(d),
                    "gt" => f.from = d.succ_opt(),
                    "le" => f.to = Some(d),
                    "lt" => f.to = d.pred_opt(),
                    "eq" => {
                        f.from = Some(d);
                        f.to = Some(d);
                    }
                    _ => return Err(format!("unsupported operator '{op}' for date")),
                }
            }
            _ => return Err(format!("unsupported filter term '{field} {op}'")),
        }
        let after = after.trim();
        if after.is_empty() {
            return Ok(f);
        }
        let (and, next) = split_word(after);
        if !and.eq_ignore_ascii_case("and") {
            return Err(format!("expected 'and' before '{after}'"));
        }
        rest = next.trim_start();
    }
}

fn split_word(s: &str) -> (&str, &str) {
    let s = s.trim_start();
    let end = s.find(char::is_whitespace).unwrap_or(s.len());
    (&s[..end], &s[end..])
}

/// Parses `(people,@badge-number)(terminals,@external-code)`.
fn parse_ext_refs(s: &str) -> Result<ExtRefs, String> {
    let mut refs = ExtRefs::default();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let inner = rest
            .strip_prefix('(')
            .and_then(|r| r.split_once(')'))
            .ok_or_else(|| format!("malformed externalReferences '{s}'"))?;
        let (pair, after) = inner;
        let (collection, name) = pair
            .split_once(',')
            .map(|(c, n)| (c.trim(), n.trim()))
            .ok_or_else(|| format!("malformed externalReferences term '({pair})'"))?;
        match (collection, name) {
            ("people", "@badge-number" | "@employee-number") => refs.people.push(name.into()),
            ("terminals", "@external-code") => refs.terminals.push(name.into()),
            _ => return Err(format!("unknown external reference ({collection},{name})")),
        }
        rest = after.trim_start();
    }
    Ok(refs)
}

fn param<'a>(query: &'a [(String, String)], name: &str) -> Option<&'a str> {
    query
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn ext_refs(query: &[(String, String)]) -> Result<ExtRefs, Box<Response>> {
    match param(query, "externalReferences") {
        None => Ok(ExtRefs::default()),
        Some(s) => {
            parse_ext_refs(s).map_err(|e| Box::new(bad_request("InvalidExternalReferences", &e)))
        }
    }
}

/// Lists need a date range of at most one year (documented for access clockings).
fn range_filter(query: &[(String, String)], need_upper: bool) -> Result<Filter, Box<Response>> {
    let Some(raw) = param(query, "filter") else {
        return Err(Box::new(bad_request(
            "InvalidFilter",
            "A filter with a date range is required: filter=date ge 'YYYY-MM-DD' and date le 'YYYY-MM-DD'.",
        )));
    };
    let invalid = |msg: &str| Box::new(bad_request("InvalidFilter", msg));
    let f = parse_filter(raw).map_err(|e| invalid(&e))?;
    let Some(from) = f.from else {
        return Err(invalid(
            "The filter needs a lower date bound (date ge '..').",
        ));
    };
    match f.to {
        None if need_upper => Err(invalid(
            "The filter needs an upper date bound (date le '..').",
        )),
        Some(to)
            if from
                .checked_add_months(Months::new(12))
                .is_some_and(|max| to > max) =>
        {
            Err(invalid("The date range may span at most one year."))
        }
        _ => Ok(f),
    }
}

/// What a list's last page offers when the caller asked for `?delta`.
struct DeltaSeed {
    filter: Filter,
    refs: ExtRefs,
}

/// Serves one page of `items`, following the continuation token in `query`. Empty pages with a
/// nextLink are inserted as configured (an empty `value` is not the end).
fn page(
    st: &mut State,
    req: &FakeRequest,
    query: &[(String, String)],
    items: Vec<Value>,
    delta: Option<DeltaSeed>,
) -> Response {
    let cursor = match param(query, "continuationToken") {
        Some(t) => match st.cursors.get(t) {
            Some(c) => *c,
            None => return bad_request("InvalidContinuationToken", "Unknown continuationToken."),
        },
        None => Cursor {
            offset: 0,
            empties_left: st.empty_pages,
            log_pos: st.log.len(),
        },
    };
    let next_link = |st: &mut State, c: Cursor| {
        let token = random_hex(12);
        st.cursors.insert(token.clone(), c);
        let kept: Vec<&str> = req
            .raw_query
            .split('&')
            .filter(|p| !p.is_empty())
            .filter(|p| {
                super::parse_pairs(p)
                    .first()
                    .is_none_or(|(k, _)| k != "continuationToken")
            })
            .collect();
        let mut link = format!("{}?", req.path);
        for p in kept {
            link.push_str(p);
            link.push('&');
        }
        link.push_str("continuationToken=");
        link.push_str(&token);
        st.link(&link)
    };
    let mut body = Map::new();
    if cursor.empties_left > 0 {
        let link = next_link(
            st,
            Cursor {
                empties_left: cursor.empties_left - 1,
                ..cursor
            },
        );
        body.insert("value".into(), Value::Array(vec![]));
        body.insert("nextLink".into(), Value::String(link));
        return json(StatusCode::OK, &body);
    }
    let end = cursor.offset.saturating_add(st.page_size).min(items.len());
    let start = cursor.offset.min(end);
    let value: Vec<Value> = items[start..end].to_vec();
    body.insert("value".into(), Value::Array(value));
    if end < items.len() {
        let link = next_link(
            st,
            Cursor {
                offset: end,
                empties_left: st.empty_pages,
                log_pos: cursor.log_pos,
            },
        );
        body.insert("nextLink".into(), Value::String(link));
    } else if let Some(seed) = delta {
        let link = issue_delta(st, cursor.log_pos, seed.filter, seed.refs);
        body.insert("deltaLink".into(), Value::String(link));
    }
    json(StatusCode::OK, &body)
}

fn issue_delta(st: &mut State, log_pos: usize, filter: Filter, refs: ExtRefs) -> String {
    let token = random_hex(16);
    let serial = st.delta_serial;
    st.delta_serial += 1;
    st.delta_tokens.insert(
        token.clone(),
        DeltaCursor {
            log_pos,
            filter,
            refs,
            serial,
        },
    );
    st.link(&format!(
        "{API_PREFIX}/delta/access-clockings?deltaToken={token}"
    ))
}

fn list_clockings(st: &mut State, req: &FakeRequest, query: &[(String, String)]) -> Response {
    let (filter, refs) = match (range_filter(query, true), ext_refs(query)) {
        (Ok(f), Ok(r)) => (f, r),
        (Err(resp), _) | (_, Err(resp)) => return *resp,
    };
    let items = st
        .clockings
        .iter()
        .filter(|c| filter.matches(c.date, c.person_id))
        .map(|c| st.clocking_json(c, &refs))
        .collect();
    page(st, req, query, items, None)
}

fn get_clocking(st: &State, id: i64, query: &[(String, String)]) -> Response {
    let refs = match ext_refs(query) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    match st.clockings.iter().find(|c| c.id == id) {
        Some(c) => json(StatusCode::OK, &st.clocking_json(c, &refs)),
        None => error(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("Clocking {id} was not found."),
            vec![],
        ),
    }
}

fn list_access(st: &mut State, req: &FakeRequest, query: &[(String, String)]) -> Response {
    // The first round of a delta needs only a lower bound: `filter=date ge '..'&delta`.
    let is_delta = query.iter().any(|(k, _)| k == "delta");
    let (filter, refs) = match (range_filter(query, !is_delta), ext_refs(query)) {
        (Ok(f), Ok(r)) => (f, r),
        (Err(resp), _) | (_, Err(resp)) => return *resp,
    };
    let items = st
        .access
        .values()
        .filter(|a| filter.matches(a.spec.date, a.spec.person_id))
        .map(|a| st.access_json(a, &refs))
        .collect();
    let seed = is_delta.then_some(DeltaSeed { filter, refs });
    page(st, req, query, items, seed)
}

fn get_access(st: &State, id: i64, query: &[(String, String)]) -> Response {
    let refs = match ext_refs(query) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    match st.access.get(&id) {
        Some(a) => json(StatusCode::OK, &st.access_json(a, &refs)),
        None => error(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("Access clocking {id} was not found."),
            vec![],
        ),
    }
}

fn delta(st: &mut State, query: &[(String, String)]) -> Response {
    let Some(token) = param(query, "deltaToken") else {
        return bad_request("InvalidDeltaToken", "The deltaToken parameter is required.");
    };
    let Some(cursor) = st.delta_tokens.get(token).cloned() else {
        return bad_request("InvalidDeltaToken", "Unknown deltaToken.");
    };
    if st.delta_conflicts > 0 {
        st.delta_conflicts -= 1;
        return error(
            StatusCode::CONFLICT,
            "Conflict",
            "Another delta request is active for this collection.",
            vec![],
        );
    }
    if cursor.serial < st.delta_expired_below {
        // 410 = the token expired: the client must do a full re-sync.
        return error(
            StatusCode::GONE,
            "Gone",
            "The deltaToken has expired; start a new delta.",
            vec![],
        );
    }
    let mut value = Vec::new();
    let mut pos = st.log.len();
    for (i, change) in st.log.iter().enumerate().skip(cursor.log_pos) {
        let (date, person) = change.date_and_person();
        if !cursor.filter.matches(date, person) {
            continue;
        }
        if value.len() == st.page_size {
            pos = i;
            break;
        }
        value.push(match change {
            Change::Upsert(a) => json!({
                "changeType": "InsertOrUpdate",
                "data": st.access_json(a, &cursor.refs),
            }),
            Change::Delete {
                id, change_version, ..
            } => json!({
                "changeType": "Delete",
                "data": { "id": id, "changeVersion": change_version },
            }),
        });
    }
    let link = issue_delta(st, pos, cursor.filter, cursor.refs);
    json(
        StatusCode::OK,
        &json!({ "value": value, "deltaLink": link }),
    )
}

fn list_people(st: &mut State, req: &FakeRequest, query: &[(String, String)]) -> Response {
    if param(query, "filter").is_some() {
        return bad_request(
            "InvalidFilter",
            "Filtering people is not supported by this fake.",
        );
    }
    let refs = match ext_refs(query) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    let items = st
        .people
        .iter()
        .map(|p| {
            let mut v = st.person_json(p.id, &refs);
            if let Value::Object(o) = &mut v {
                o.insert("firstName".into(), json!(p.first_name));
                o.insert("lastName".into(), json!(p.last_name));
            }
            v
        })
        .collect();
    page(st, req, query, items, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kit::fakes::testutil::{client, with_query};
    use serde_json::json;

    fn person(id: i64, badge: &str, emp: &str) -> Person {
        Person {
            id,
            badge_number: badge.into(),
            employee_number: emp.into(),
            first_name: format!("First{id}"),
            last_name: format!("Last{id}"),
        }
    }

    fn day(d: &str) -> NaiveDate {
        NaiveDate::parse_from_str(d, "%Y-%m-%d").expect("test date")
    }

    fn access(
        person_id: i64,
        date: &str,
        minutes: u16,
        status: AccessStatus,
    ) -> AccessClockingSpec {
        AccessClockingSpec {
            person_id,
            date: day(date),
            time_of_day_in_minutes: minutes,
            terminal_id: 7,
            status,
        }
    }

    struct Env {
        fake: FakeProtime,
        ctl: ProtimeControl,
        http: reqwest::Client,
        origin: String,
    }

    async fn env() -> Env {
        let fake = FakeProtime::start("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("start fake");
        let ctl = fake.control();
        ctl.add_person(person(1, "6767676", "E1"));
        ctl.add_person(person(2, "1111", "E2"));
        ctl.add_terminal(Terminal {
            id: 7,
            external_code: "gate-north".into(),
        });
        let origin = format!("http://{}", fake.addr());
        Env {
            fake,
            ctl,
            http: client(),
            origin,
        }
    }

    impl Env {
        async fn token_with(&self, scope: Option<&str>) -> reqwest::Response {
            let mut form = vec![
                ("grant_type", "client_credentials"),
                ("client_id", DEFAULT_CLIENT_ID),
                ("client_secret", DEFAULT_CLIENT_SECRET),
            ];
            if let Some(s) = scope {
                form.push(("scope", s));
            }
            let body = form
                .iter()
                .map(|(k, v)| format!("{k}={}", v.replace(' ', "+")))
                .collect::<Vec<_>>()
                .join("&");
            self.http
                .post(self.fake.token_url())
                .header("content-type", "application/x-www-form-urlencoded")
                .body(body)
                .send()
                .await
                .expect("token request")
        }

        async fn token(&self) -> String {
            let v: Value = self
                .token_with(None)
                .await
                .json()
                .await
                .expect("token json");
            v["access_token"]
                .as_str()
                .expect("access_token")
                .to_string()
        }

        fn get(&self, token: &str, path_or_url: &str) -> reqwest::RequestBuilder {
            let url = if path_or_url.starts_with("http") {
                path_or_url.to_string()
            } else if path_or_url.starts_with('/') {
                format!("{}{path_or_url}", self.origin)
            } else {
                format!("{}/{path_or_url}", self.fake.base_url())
            };
            self.http.get(url).bearer_auth(token)
        }

        async fn post_clocking(&self, token: &str, body: Value) -> reqwest::Response {
            self.http
                .post(format!("{}/clockings", self.fake.base_url()))
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .expect("post clocking")
        }

        /// Follows nextLinks; returns (pages, all items, final deltaLink).
        async fn follow(
            &self,
            token: &str,
            first: reqwest::RequestBuilder,
        ) -> (Vec<Value>, Vec<Value>, Option<String>) {
            let mut pages = Vec::new();
            let mut items = Vec::new();
            let mut resp = first.send().await.expect("list");
            loop {
                assert_eq!(resp.status(), 200);
                let page: Value = resp.json().await.expect("page json");
                items.extend(page["value"].as_array().expect("value").iter().cloned());
                pages.push(page.clone());
                assert!(pages.len() < 100, "runaway paging");
                match page["nextLink"].as_str() {
                    Some(next) => {
                        assert!(next.contains("continuationToken="), "{next}");
                        resp = self.get(token, next).send().await.expect("next page");
                    }
                    None => return (pages, items, page["deltaLink"].as_str().map(String::from)),
                }
            }
        }
    }

    fn clocking_body() -> Value {
        json!({
            "person": {"externalReferences": {"@badge-number": "6767676"}},
            "date": "2024-03-01",
            "timeOfDayInMinutes": 480,
            "kind": "InOut",
            "terminal": {"externalReferences": {"@external-code": "gate-north"}},
        })
    }

    #[tokio::test]
    async fn token_flow_and_oauth_errors() {
        let env = env().await;
        let resp = env
            .token_with(Some("connector-protimeapi-clockings.write"))
            .await;
        assert_eq!(resp.status(), 200);
        let v: Value = resp.json().await.expect("json");
        assert_eq!(v["token_type"], "Bearer");
        assert_eq!(v["expires_in"], 1800);
        assert_eq!(v["scope"], "connector-protimeapi-clockings.write");
        assert_eq!(
            v["access_token"]
                .as_str()
                .expect("token")
                .split('.')
                .count(),
            3
        );

        env.ctl.set_token_lifetime(Duration::from_secs(60));
        let v: Value = env.token_with(None).await.json().await.expect("json");
        assert_eq!(v["expires_in"], 60);
        assert_eq!(
            v["scope"].as_str().expect("scope").split(' ').count(),
            4,
            "no scope asked = every allowed scope"
        );

        env.ctl.set_client(DEFAULT_CLIENT_ID, "rotated");
        let resp = env.token_with(None).await;
        assert_eq!(resp.status(), 400);
        assert_eq!(
            resp.json::<Value>().await.expect("json"),
            json!({"error": "invalid_client"})
        );
        env.ctl.set_client(DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET);

        let resp = env
            .token_with(Some("connector-protimeapi-secrets.write"))
            .await;
        assert_eq!(
            resp.json::<Value>().await.expect("json"),
            json!({"error": "invalid_scope"})
        );

        let resp = env
            .http
            .post(env.fake.token_url())
            .header("content-type", "application/x-www-form-urlencoded")
            .body("grant_type=password&client_id=a&client_secret=b")
            .send()
            .await
            .expect("send");
        assert_eq!(
            resp.json::<Value>().await.expect("json"),
            json!({"error": "unsupported_grant_type"})
        );
        assert_eq!(env.ctl.token_requests(), 5);
        env.fake.shutdown().await;
    }

    #[tokio::test]
    async fn auth_errors_use_the_protime_envelope() {
        let env = env().await;
        let token = env.token().await;

        // Missing User-Agent: 400.
        crate::clouds::install_crypto_provider();
        let bare = reqwest::Client::new();
        let resp = bare
            .get(format!("{}/people", env.fake.base_url()))
            .bearer_auth(&token)
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 400);
        let v: Value = resp.json().await.expect("json");
        assert_eq!(v["error"]["code"], "MissingUserAgent");
        assert!(v["error"]["reasons"].is_array());

        // Unknown token: 401 with the exact envelope.
        let resp = env.get("not-a-token", "people").send().await.expect("send");
        assert_eq!(resp.status(), 401);
        assert!(resp.headers().contains_key("www-authenticate"));
        assert_eq!(
            resp.json::<Value>().await.expect("json"),
            json!({"error": {
                "code": "Unauthorized",
                "message": "The request is not authenticated.",
                "reasons": ["The access token is invalid."],
            }})
        );

        // Valid, then expired.
        assert_eq!(
            env.get(&token, "people")
                .send()
                .await
                .expect("send")
                .status(),
            200
        );
        env.ctl.expire_tokens();
        let resp = env.get(&token, "people").send().await.expect("send");
        assert_eq!(resp.status(), 401);
        let v: Value = resp.json().await.expect("json");
        assert_eq!(
            v["error"]["reasons"],
            json!(["The access token is expired."])
        );

        // Scope enforcement: a people-only token cannot create clockings.
        let v: Value = env
            .token_with(Some(SCOPE_PEOPLE_READ))
            .await
            .json()
            .await
            .expect("json");
        let narrow = v["access_token"].as_str().expect("token").to_string();
        let resp = env.post_clocking(&narrow, clocking_body()).await;
        assert_eq!(resp.status(), 403);
        assert_eq!(
            resp.json::<Value>().await.expect("json"),
            json!({"error": {
                "code": "Forbidden",
                "message": "The access token does not grant the required scope.",
                "reasons": ["Missing scope connector-protimeapi-clockings.write."],
            }})
        );
        assert!(env.ctl.clockings().is_empty());
        env.fake.shutdown().await;
    }

    #[tokio::test]
    async fn post_clocking_then_find_it_by_filter() {
        let env = env().await;
        let token = env.token().await;
        let resp = env.post_clocking(&token, clocking_body()).await;
        assert_eq!(resp.status(), 201);
        let location = resp.headers()["location"]
            .to_str()
            .expect("location")
            .to_string();
        assert_eq!(location, format!("{API_PREFIX}/clockings/5001"));
        let stored = env.ctl.clockings();
        assert_eq!(
            stored,
            vec![Clocking {
                id: 5001,
                person_id: 1,
                date: day("2024-03-01"),
                time_of_day_in_minutes: 480,
                kind: ClockingKind::InOut,
                terminal_id: Some(7),
            }]
        );
        let got: Value = env
            .get(&token, &location)
            .send()
            .await
            .expect("get")
            .json()
            .await
            .expect("json");
        assert_eq!(got["id"], 5001);

        let (_, items, delta) = env
            .follow(
                &token,
                env.get(&token, &with_query("clockings", &[
                    (
                        "filter",
                        "person in (1, 2) and date ge '2024-03-01' and date le '2024-03-01'",
                    ),
                    (
                        "externalReferences",
                        "(people,@badge-number)(terminals,@external-code)",
                    ),
                ])),
            )
            .await;
        assert!(delta.is_none());
        assert_eq!(
            items,
            vec![json!({
                "id": 5001,
                "person": {"id": 1, "externalReferences": {"@badge-number": "6767676"}},
                "date": "2024-03-01",
                "timeOfDayInMinutes": 480,
                "kind": "InOut",
                "terminal": {"id": 7, "externalReferences": {"@external-code": "gate-north"}},
            })]
        );
        let (_, none, _) = env
            .follow(
                &token,
                env.get(
                    &token,
                    &with_query(
                        "clockings",
                        &[(
                            "filter",
                            "person eq 2 and date ge '2024-03-01' and date le '2024-03-02'",
                        )],
                    ),
                ),
            )
            .await;
        assert!(none.is_empty());

        // Some tenants answer 202 + Operation-Location.
        env.ctl.set_post_answer(PostAnswer::Accepted);
        let resp = env
            .post_clocking(&token, json!({"person": {"id": 2}, "date": "2024-03-01", "timeOfDayInMinutes": -30, "kind": "InOut"}))
            .await;
        assert_eq!(resp.status(), 202);
        assert!(resp.headers()["operation-location"]
            .to_str()
            .expect("header")
            .starts_with(&format!("{API_PREFIX}/operations/")));
        assert_eq!(env.ctl.clockings().len(), 2);
        assert_eq!(env.ctl.wire().count(endpoint::POST_CLOCKINGS), 2);
        env.fake.shutdown().await;
    }

    #[tokio::test]
    async fn validation_errors_come_without_the_error_wrapper() {
        let env = env().await;
        let token = env.token().await;
        let resp = env
            .post_clocking(
                &token,
                json!({
                    "person": {"externalReferences": {"@badge-number": "999"}},
                    "date": "2024-3-1x",
                    "timeOfDayInMinutes": 2881,
                    "kind": "Lunch",
                    "terminal": {"externalReferences": {"@external-code": "nowhere"}},
                }),
            )
            .await;
        assert_eq!(resp.status(), 400);
        assert_eq!(
            resp.json::<Value>().await.expect("json"),
            json!({"validationErrors": {
                "person.externalReferences.@badge-number": ["No person found with @badge-number '999'."],
                "date": ["'2024-3-1x' is not a valid date (YYYY-MM-DD)."],
                "timeOfDayInMinutes": ["2881 is out of range (-1440 to 2880)."],
                "kind": ["'Lunch' is not one of InOut, Reason, Activity, ActivityEnd."],
                "terminal.externalReferences.@external-code": ["No terminal found with @external-code 'nowhere'."],
            }})
        );
        let resp = env
            .http
            .post(format!("{}/clockings", env.fake.base_url()))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body("{not json")
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 400);
        let v: Value = resp.json().await.expect("json");
        assert!(v["validationErrors"]["$"][0]
            .as_str()
            .expect("msg")
            .contains("not valid JSON"));
        assert!(v.get("error").is_none());
        // An unknown-badge clocking that is otherwise fine is refused too.
        let mut body = clocking_body();
        body["person"] = json!({"externalReferences": {"@badge-number": "nope"}});
        assert_eq!(env.post_clocking(&token, body).await.status(), 400);
        assert!(env.ctl.clockings().is_empty());
        env.fake.shutdown().await;
    }

    #[tokio::test]
    async fn store_then_drop_leaves_one_clocking_and_no_answer() {
        let env = env().await;
        let token = env.token().await;
        env.ctl
            .wire()
            .fail_next_on(endpoint::POST_CLOCKINGS, 1, Fault::ProcessThenDrop);
        let result = env
            .http
            .post(format!("{}/clockings", env.fake.base_url()))
            .bearer_auth(&token)
            .json(&clocking_body())
            .send()
            .await;
        let err = result.expect_err("the answer must be lost");
        assert!(!err.is_timeout(), "cut, not timed out: {err}");
        assert_eq!(env.ctl.clockings().len(), 1, "stored before the cut");
        let log = env.ctl.wire().log();
        assert_eq!(log.last().map(|r| r.status), Some(None));

        // The duplicate check a careful client does before re-sending finds it.
        let (_, items, _) = env
            .follow(
                &token,
                env.get(
                    &token,
                    &with_query(
                        "clockings",
                        &[(
                            "filter",
                            "person in (1) and date ge '2024-03-01' and date le '2024-03-01'",
                        )],
                    ),
                ),
            )
            .await;
        assert_eq!(items.len(), 1);

        // Slow answer: stored, but the client gives up first.
        env.ctl.wire().fail_next_on(
            endpoint::POST_CLOCKINGS,
            1,
            Fault::SlowAnswer(Duration::from_secs(5)),
        );
        let err = env
            .http
            .post(format!("{}/clockings", env.fake.base_url()))
            .timeout(Duration::from_millis(300))
            .bearer_auth(&token)
            .json(&clocking_body())
            .send()
            .await
            .expect_err("timeout");
        assert!(err.is_timeout());
        assert!(
            env.ctl
                .wire()
                .wait_for(endpoint::POST_CLOCKINGS, 2, Duration::from_secs(5))
                .await
        );
        assert_eq!(env.ctl.clockings().len(), 2);
        env.fake.shutdown().await;
    }

    #[tokio::test]
    async fn paging_includes_empty_pages_with_next_link() {
        let env = env().await;
        let token = env.token().await;
        for m in 0..5 {
            env.ctl
                .add_access_clocking(access(1, "2024-03-01", 600 + m, AccessStatus::AccessOk));
        }
        env.ctl
            .add_access_clocking(access(1, "2025-06-01", 1, AccessStatus::AccessOk));
        env.ctl.set_page_size(2);
        env.ctl.set_empty_pages(1);
        let (pages, items, delta) = env
            .follow(
                &token,
                env.get(
                    &token,
                    &with_query(
                        "access-clockings",
                        &[("filter", "date ge '2024-01-01' and date le '2024-12-31'")],
                    ),
                ),
            )
            .await;
        assert!(delta.is_none());
        let ids: Vec<i64> = items
            .iter()
            .map(|i| i["id"].as_i64().expect("id"))
            .collect();
        assert_eq!(ids, vec![1001, 1002, 1003, 1004, 1005]);
        // empty, 2, empty, 2, empty, 1
        let sizes: Vec<usize> = pages
            .iter()
            .map(|p| p["value"].as_array().map_or(0, Vec::len))
            .collect();
        assert_eq!(sizes, vec![0, 2, 0, 2, 0, 1]);
        assert!(pages[0]["nextLink"]
            .as_str()
            .expect("link")
            .starts_with(&format!("{API_PREFIX}/access-clockings?filter=")));
        assert_eq!(
            items[0],
            json!({"changeVersion": "00000000000000000001", "id": 1001, "person": {"id": 1},
                   "date": "2024-03-01", "timeOfDayInMinutes": 600, "terminal": {"id": 7}, "status": "AccessOk"})
        );

        // Absolute links are followed the same way.
        env.ctl.set_absolute_links(true);
        env.ctl.set_empty_pages(0);
        let (pages, items, _) = env
            .follow(
                &token,
                env.get(
                    &token,
                    &with_query(
                        "access-clockings",
                        &[("filter", "date ge '2024-01-01' and date le '2024-12-31'")],
                    ),
                ),
            )
            .await;
        assert_eq!(items.len(), 5);
        assert!(pages[0]["nextLink"]
            .as_str()
            .expect("link")
            .starts_with("http://"));

        // Filter grammar limits.
        for bad in [
            "date ge '2024-01-01'",
            "date ge '2024-01-01' and date le '2025-06-01'",
            "status eq 'AccessOk' and date ge '2024-01-01' and date le '2024-01-02'",
            "date ge '2024-01-01' or date le '2024-01-02'",
        ] {
            let resp = env
                .get(&token, &with_query("access-clockings", &[("filter", bad)]))
                .send()
                .await
                .expect("send");
            assert_eq!(resp.status(), 400, "{bad}");
            let v: Value = resp.json().await.expect("json");
            assert_eq!(v["error"]["code"], "InvalidFilter", "{bad}");
        }
        let resp = env
            .get(&token, "access-clockings?filter=date+ge+'2024-01-01'+and+date+le+'2024-01-02'&continuationToken=forged")
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 400);
        env.fake.shutdown().await;
    }

    #[tokio::test]
    async fn delta_changes_stale_versions_410_and_409() {
        let env = env().await;
        let token = env.token().await;
        let a = env
            .ctl
            .add_access_clocking(access(1, "2024-03-01", 600, AccessStatus::AccessOk));
        let b =
            env.ctl
                .add_access_clocking(access(2, "2024-03-01", 601, AccessStatus::UnknownBadge));
        env.ctl
            .add_access_clocking(access(2, "2023-12-31", 601, AccessStatus::AccessOk));
        env.ctl.set_page_size(1);
        let (pages, items, delta) = env
            .follow(
                &token,
                env.get(
                    &token,
                    &with_query(
                        "access-clockings",
                        &[("filter", "date ge '2024-01-01'"), ("delta", "")],
                    ),
                ),
            )
            .await;
        assert_eq!(items.len(), 2);
        assert_eq!(pages.len(), 2);
        let delta = delta.expect("last page carries a deltaLink");
        assert!(delta.starts_with(&format!("{API_PREFIX}/delta/access-clockings?deltaToken=")));

        // Nothing changed yet.
        let v: Value = env
            .get(&token, &delta)
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json");
        assert_eq!(v["value"], json!([]));
        let delta = v["deltaLink"].as_str().expect("new deltaLink").to_string();

        env.ctl.set_page_size(10);
        assert!(env.ctl.update_access_clocking(
            a,
            access(1, "2024-03-01", 605, AccessStatus::AntiPassbackError)
        ));
        assert!(env.ctl.delete_access_clocking(b));
        assert!(env.ctl.resend_stale_access_clocking(a));
        env.ctl.set_spell_unknown_badge_number(true);
        let v: Value = env
            .get(&token, &delta)
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json");
        let changes = v["value"].as_array().expect("value");
        assert_eq!(changes.len(), 3);
        assert_eq!(changes[0]["changeType"], "InsertOrUpdate");
        assert_eq!(changes[0]["data"]["status"], "AntiPassbackError");
        assert_eq!(changes[0]["data"]["changeVersion"], "00000000000000000004");
        assert_eq!(
            changes[1],
            json!({"changeType": "Delete", "data": {"id": b, "changeVersion": "00000000000000000005"}})
        );
        // The stale re-send carries the OLD version: lower than what the client already holds.
        assert_eq!(changes[2]["data"]["id"], a);
        assert_eq!(changes[2]["data"]["changeVersion"], "00000000000000000001");
        assert!(
            changes[2]["data"]["changeVersion"].as_str()
                < changes[0]["data"]["changeVersion"].as_str()
        );
        let next = v["deltaLink"].as_str().expect("deltaLink").to_string();

        // UnknownBadgeNumber spelling knob.
        let c = env
            .ctl
            .add_access_clocking(access(2, "2024-03-02", 1, AccessStatus::UnknownBadge));
        let one: Value = env
            .get(&token, &format!("access-clockings/{c}"))
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json");
        assert_eq!(one["status"], "UnknownBadgeNumber");

        env.ctl.set_delta_conflicts(1);
        let resp = env.get(&token, &next).send().await.expect("send");
        assert_eq!(resp.status(), 409);
        assert_eq!(
            resp.json::<Value>().await.expect("json")["error"]["code"],
            "Conflict"
        );

        env.ctl.expire_delta_tokens();
        let resp = env.get(&token, &next).send().await.expect("send");
        assert_eq!(resp.status(), 410);
        assert_eq!(
            resp.json::<Value>().await.expect("json"),
            json!({"error": {"code": "Gone", "message": "The deltaToken has expired; start a new delta.", "reasons": []}})
        );
        env.fake.shutdown().await;
    }

    #[tokio::test]
    async fn faults_render_in_the_protime_envelope() {
        let env = env().await;
        let token = env.token().await;
        let wire = env.ctl.wire();
        wire.fail_next_on(
            endpoint::PEOPLE,
            1,
            Fault::RateLimited {
                retry_after_secs: 7,
            },
        );
        let resp = env.get(&token, "people").send().await.expect("send");
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()["retry-after"], "7");
        assert_eq!(
            resp.json::<Value>().await.expect("json")["error"]["code"],
            "TooManyRequests"
        );

        wire.fail_next(2, Fault::Unavailable);
        for _ in 0..2 {
            let resp = env.get(&token, "people").send().await.expect("send");
            assert_eq!(resp.status(), 503);
            assert_eq!(
                resp.json::<Value>().await.expect("json")["error"]["code"],
                "ServiceUnavailable"
            );
        }
        wire.fail_next(1, Fault::InternalError);
        let resp = env.get(&token, "people").send().await.expect("send");
        assert_eq!(resp.status(), 500);
        assert_eq!(
            resp.json::<Value>().await.expect("json"),
            json!({"error": {"code": "InternalServerError", "message": "An unexpected error occurred.", "reasons": []}})
        );
        wire.fail_next(1, Fault::GarbageBody);
        let resp = env.get(&token, "people").send().await.expect("send");
        assert_eq!(resp.status(), 200);
        assert!(resp.json::<Value>().await.is_err());

        wire.fail_next(1, Fault::DropConnection);
        assert!(env.get(&token, "people").send().await.is_err());

        let long = format!("people?x={}", "a".repeat(5000));
        assert_eq!(
            env.get(&token, &long).send().await.expect("send").status(),
            414
        );
        assert_eq!(
            env.get(&token, "nothing-here")
                .send()
                .await
                .expect("send")
                .status(),
            404
        );
        // 6 faulted + 1 too long = 7 people requests; the fault queue is empty again.
        assert_eq!(wire.count(endpoint::PEOPLE), 7);
        assert_eq!(
            env.get(&token, "people")
                .send()
                .await
                .expect("send")
                .status(),
            200
        );
        env.fake.shutdown().await;
    }

    #[tokio::test]
    async fn people_list_with_external_references() {
        let env = env().await;
        let token = env.token().await;
        env.ctl.set_page_size(1);
        env.ctl.set_empty_pages(1);
        let (_, items, _) = env
            .follow(
                &token,
                env.get(
                    &token,
                    &with_query(
                        "people",
                        &[(
                            "externalReferences",
                            "(people,@badge-number)(people,@employee-number)",
                        )],
                    ),
                ),
            )
            .await;
        assert_eq!(
            items,
            vec![
                json!({"id": 1, "firstName": "First1", "lastName": "Last1",
                       "externalReferences": {"@badge-number": "6767676", "@employee-number": "E1"}}),
                json!({"id": 2, "firstName": "First2", "lastName": "Last2",
                       "externalReferences": {"@badge-number": "1111", "@employee-number": "E2"}}),
            ]
        );
        let resp = env
            .get(
                &token,
                &with_query("people", &[("externalReferences", "(people,@nope)")]),
            )
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 400);
        env.fake.shutdown().await;
    }

    #[tokio::test]
    async fn outage_and_shutdown_make_the_cloud_unreachable() {
        let env = env().await;
        let token = env.token().await;
        env.ctl.wire().set_outage(true);
        assert!(env.get(&token, "people").send().await.is_err());
        env.ctl.wire().set_outage(false);
        assert_eq!(
            env.get(&token, "people")
                .send()
                .await
                .expect("send")
                .status(),
            200
        );
        // A restart on the same data keeps tokens and clockings.
        let ctl = env.ctl.clone();
        let url = format!("{}/people", env.fake.base_url());
        env.fake.shutdown().await;
        assert!(env.http.get(url).bearer_auth(&token).send().await.is_err());
        let again = FakeProtime::start_with("127.0.0.1:0".parse().expect("addr"), ctl)
            .await
            .expect("restart");
        let resp = env
            .http
            .get(format!("{}/people", again.base_url()))
            .bearer_auth(&token)
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 200);
        again.shutdown().await;
    }
}
