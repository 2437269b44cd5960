//! Aktion.NEXT / Aktion CLOUD client: persons, scheduled shifts and the C4 event feed.
//!
//! Follows the vendor's help pages (`https://cloud.aktion.cz/api/Help/...`, mirrored at
//! `http://dochazka.efg.cz/AktionNEXT/API/Help/...`; see `docs/aktion.md` for the page of every
//! call and model used here). Vendor quirks handled here:
//! - `POST login` gives a token that lives 20 seconds and goes in the `Token=` QUERY parameter of
//!   every call. The shared token cache refreshes it a quarter of its life early, so each batch
//!   (a paged listing, a person's shifts) starts with a token that outlives it or is renewed
//!   between pages. Error 1001 (expired) or 1000 (unknown) → one new login and one retry.
//! - 1008 "request rate policy violated" (HTTP 401) → back off in seconds (never hammer), a
//!   bounded number of times.
//! - JSON dates are `"\/Date(<ms since epoch UTC>)\/"`, sometimes with an informational offset
//!   suffix (`\/Date(1560578400000+0200)\/`); JSON decoding turns `\/` into `/`. Fields the
//!   model pages type as strings "in format yyyy-mm-ddThh:mi:ss" (an identifier's `ValidFrom`,
//!   `ValidTo`) carry no zone: they are the tenant's local time (`sources.aktion.timezone`). See
//!   [`parse_aktion_date`].
//! - Date PARAMETERS (`TimeFrom`, `TimeTo`, `TimeLastChange`, `LastSync`) are documented as
//!   `yyyy-MM-ddTHH:mm:ss` without a zone: they are sent so, in the tenant's zone ([`local_param`]).
//! - Error bodies are `{"Message","Code","ModelStateErr"}`; 1132 ("no scheduled action") on
//!   `getScheduledShift` means an empty result, not an error. 1228 (unknown C4 controller), 1227
//!   and 1101 (missing privileges) and 1002 (a parameter missing or not understood) get a message
//!   saying what to fix.
//! - `getC4HwEvents` answers `{"C4HwEvents":[..]}` (model `HwStructGetC4HwEventsResp`) whose
//!   `ID`, `HwStructureId` and `OwnerId` are GUIDs; `LastSync` is required. The answer carries no
//!   new `LastSync`: the caller derives it from the events' `DateCreated`.
//! - `PersonGetResp.Lock` is an integer (1 = every identifier of the person locked) and
//!   `Identifiers` a collection of `Identifier` objects, each with its own `Lock`, `Status` and
//!   validity: see [`person_badges`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, FixedOffset, NaiveDate, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;
use reqwest::{StatusCode, Url};
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};

use super::http::{
    base_url, by_status, skipped_item, Answer, Api, CloudError, ErrorKind, Http, HttpOptions,
    IssuedToken, TokenCache, VendorAnswer, Verdict,
};
use crate::config::{AktionConfig, Secret};
use crate::model::Direction;

/// Items asked for per page (the server may cap it silently; `Paging` says what it gave).
pub const DEFAULT_PAGE_SIZE: u32 = 100;
/// A login answer without `ExpireInSec` is trusted for the documented 20 s.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(20);
const MAX_PAGES: u32 = 10_000;

const CALL_LOGIN: &str = "POST login";
const CALL_PERSONS: &str = "GET person/getAll";
const CALL_SHIFTS: &str = "GET attendance/getScheduledShift";
const CALL_C4_EVENTS: &str = "GET HwStructure/getC4HwEvents";

/// Aktion error numbers the client acts on (from the pages' "Response Codes" tables).
mod code {
    pub const TOKEN_NOT_FOUND: i64 = 1000;
    pub const TOKEN_EXPIRED: i64 = 1001;
    pub const PARAMETER: i64 = 1002;
    pub const BAD_LOGIN: i64 = 1003;
    pub const BAD_API_KEY: i64 = 1004;
    pub const IP_FILTER: i64 = 1006;
    pub const IP_FILTER_PARSE: i64 = 1007;
    pub const RATE_POLICY: i64 = 1008;
    pub const PERSONS_PRIVILEGE: i64 = 1101;
    pub const NO_SCHEDULED_ACTION: i64 = 1132;
    pub const HW_PRIVILEGE: i64 = 1227;
    pub const HW_NOT_FOUND: i64 = 1228;
}

/// The documented format of Aktion's date parameters (`yyyy-MM-ddTHH:mm:ss`, no zone).
pub const PARAM_FORMAT: &str = "%Y-%m-%dT%H:%M:%S";

/// A date parameter as the pages document it: the tenant's local `yyyy-MM-ddTHH:mm:ss` (whole
/// seconds; the fraction is cut, so a watermark sent this way is at most a second early).
pub fn local_param(t: DateTime<Utc>, tz: Tz) -> String {
    t.with_timezone(&tz).format(PARAM_FORMAT).to_string()
}

/// A date in an Aktion answer: an instant ([`parse_aspnet_date`]) or a zone-less local
/// `yyyy-mm-ddThh:mi:ss` (fraction allowed) or `yyyy-mm-dd`, read in the tenant's zone `tz` (the
/// earlier instant when a DST change makes it ambiguous).
pub fn parse_aktion_date(raw: &str, tz: Tz) -> Result<DateTime<FixedOffset>, String> {
    if let Ok(d) = parse_aspnet_date(raw) {
        return Ok(d);
    }
    let s = raw.trim();
    let naive = [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%d %H:%M:%S",
    ]
    .iter()
    .find_map(|f| NaiveDateTime::parse_from_str(s, f).ok())
    .or_else(|| {
        NaiveDate::parse_from_str(s, "%Y-%m-%d")
            .ok()
            .and_then(|d| d.and_hms_opt(0, 0, 0))
    })
    .ok_or_else(|| format!("not an Aktion date: {raw:?}"))?;
    tz.from_local_datetime(&naive)
        .earliest()
        .map(|d| d.fixed_offset())
        .ok_or_else(|| format!("{raw:?} does not exist in {tz}"))
}

/// A badge as Aktion writes a hexadecimal identifier number (`InternalNrLong`, a passage's
/// `Identifier`): upper case without leading zeros ("Leading zeros will be removed", says
/// `IdentifierCreateReq`). Anything that is not hexadecimal (a vehicle's registration plate) is
/// only trimmed.
pub fn normalize_hex_badge(raw: &str) -> String {
    let s = raw.trim();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return s.to_string();
    }
    let t = s.trim_start_matches('0');
    if t.is_empty() {
        "0".into()
    } else {
        t.to_ascii_uppercase()
    }
}

/// A GUID (`a45a039c-eb31-46f1-9ece-88aa5ccfe22c`, braces and case tolerated) in canonical form.
pub fn parse_guid(raw: &str) -> Option<String> {
    let hex: String = raw
        .trim()
        .trim_start_matches('{')
        .trim_end_matches('}')
        .chars()
        .filter(|c| *c != '-')
        .collect();
    if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let h = hex.to_ascii_lowercase();
    Some(super::hyphenated_guid(&h))
}

/// Parses an ASP.NET JSON date: `/Date(ms)/`, `/Date(ms+hhmm)/`, `/Date(-ms)/`, with or without
/// the JSON escapes (`\/Date(..)\/`), or an ISO 8601 date-time WITH an offset (Aktion's
/// `text/json` samples). The milliseconds are UTC; an offset suffix only says which offset to
/// show the instant in. A date-time without offset is refused: its zone would be a guess.
pub fn parse_aspnet_date(raw: &str) -> Result<DateTime<FixedOffset>, String> {
    let s = raw.trim().replace("\\/", "/");
    if let Some(inner) = s.strip_prefix("/Date(").and_then(|r| r.strip_suffix(")/")) {
        // The sign of the milliseconds is at index 0; an offset sign comes later.
        let split = inner
            .char_indices()
            .skip(1)
            .find(|(_, c)| *c == '+' || *c == '-')
            .map_or(inner.len(), |(i, _)| i);
        let (ms, suffix) = inner.split_at(split);
        let ms: i64 = ms
            .parse()
            .map_err(|_| format!("bad milliseconds in date {raw:?}"))?;
        let utc = DateTime::from_timestamp_millis(ms)
            .ok_or_else(|| format!("date {raw:?} out of range"))?;
        let offset = if suffix.is_empty() {
            FixedOffset::east_opt(0)
        } else {
            parse_offset_suffix(suffix)
        }
        .ok_or_else(|| format!("bad offset in date {raw:?}"))?;
        return Ok(offset.from_utc_datetime(&utc.naive_utc()));
    }
    DateTime::parse_from_rfc3339(&s)
        .map_err(|_| format!("not an ASP.NET or ISO 8601 date: {raw:?}"))
}

/// `+hhmm` / `-hhmm`.
fn parse_offset_suffix(s: &str) -> Option<FixedOffset> {
    let (sign, digits) = match s.as_bytes().first()? {
        b'+' => (1, &s[1..]),
        b'-' => (-1, &s[1..]),
        _ => return None,
    };
    if digits.len() != 4 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let hours: i32 = digits[..2].parse().ok()?;
    let minutes: i32 = digits[2..].parse().ok()?;
    if minutes >= 60 {
        return None;
    }
    FixedOffset::east_opt(sign * (hours * 3600 + minutes * 60))
}

fn de_date<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<FixedOffset>, D::Error> {
    let s = String::deserialize(d)?;
    parse_aspnet_date(&s).map_err(serde::de::Error::custom)
}

fn de_opt_date<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<FixedOffset>>, D::Error> {
    match Option::<String>::deserialize(d)? {
        None => Ok(None),
        Some(s) if s.trim().is_empty() => Ok(None),
        Some(s) => parse_aspnet_date(&s)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

/// Nulls, strings and numbers as an optional string (identifiers are not always typed alike).
fn de_opt_text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    })
}

/// A documented `integer` field: a JSON integer, or null / absent. A boolean or a text is a
/// malformed record (the old client read `Lock` as a bool and so rejected every person).
fn de_opt_int<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        Value::Number(n) => n
            .as_i64()
            .map(Some)
            .ok_or_else(|| serde::de::Error::custom(format!("{n} is not an integer"))),
        other => Err(serde::de::Error::custom(format!(
            "expected an integer, got {other}"
        ))),
    }
}

/// A required GUID (`ID` of a C4 event).
fn de_guid<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let v = Value::deserialize(d)?;
    v.as_str()
        .and_then(parse_guid)
        .ok_or_else(|| serde::de::Error::custom(format!("{v} is not a GUID")))
}

/// An optional GUID (`HwStructureId`, `OwnerId`): null or empty is none, anything else must be a
/// GUID.
fn de_opt_guid<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        Value::String(s) if s.trim().is_empty() => Ok(None),
        v => v
            .as_str()
            .and_then(parse_guid)
            .map(Some)
            .ok_or_else(|| serde::de::Error::custom(format!("{v} is not a GUID"))),
    }
}

/// One `Identifier` of a person (model `Identifier`). Fields the agent does not use
/// (`Technology`, `Security`, `Holder`, `UdsCollection`...) are not read.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct AktionIdentifier {
    /// "Long internal number of the identifer in hexadecimal format" (normalised, see
    /// [`normalize_hex_badge`]): what a C4 passage's `Identifier` names.
    #[serde(default, deserialize_with = "de_opt_text")]
    pub internal_nr_long: Option<String>,
    /// "Registration number of the identifier" (printed on the card).
    #[serde(default, deserialize_with = "de_opt_text")]
    pub registration_nr: Option<String>,
    /// 0 card, 1 tag, 2 bracelet, 3 visiting card, 4 password, 5 article, 6 spare, 7 eCard.
    #[serde(default, rename = "Type", deserialize_with = "de_opt_int")]
    pub kind: Option<i64>,
    /// 0 free, 1 assigned, 2 lost, 4 configuration.
    #[serde(default, deserialize_with = "de_opt_int")]
    pub status: Option<i64>,
    /// 0 open, 1 locked.
    #[serde(default, deserialize_with = "de_opt_int")]
    pub lock: Option<i64>,
    /// Validity bounds, both included; the tenant's local `yyyy-mm-ddThh:mi:ss` (typed `string`).
    #[serde(default, deserialize_with = "de_opt_text")]
    pub valid_from: Option<String>,
    #[serde(default, deserialize_with = "de_opt_text")]
    pub valid_to: Option<String>,
}

impl AktionIdentifier {
    /// Why this identifier opens nothing at `now`, or `Ok` when it is a badge.
    pub fn usable(&self, now: DateTime<Utc>, tz: Tz) -> Result<(), String> {
        if self.lock == Some(1) {
            return Err("locked".into());
        }
        match self.status {
            None | Some(1) => {}
            Some(0) => return Err("status 0 (free, not assigned)".into()),
            Some(2) => return Err("status 2 (lost)".into()),
            Some(4) => return Err("status 4 (configuration)".into()),
            Some(s) => return Err(format!("status {s} (undocumented)")),
        }
        if self.kind == Some(4) {
            return Err("type 4 (password: an entry code, not a badge)".into());
        }
        let bound = |raw: &Option<String>| -> Result<Option<DateTime<Utc>>, String> {
            raw.as_deref()
                .map(|r| parse_aktion_date(r, tz).map(|d| d.with_timezone(&Utc)))
                .transpose()
        };
        match bound(&self.valid_from) {
            Ok(Some(from)) if now < from => return Err(format!("valid only from {from}")),
            Err(e) => return Err(format!("unreadable ValidFrom: {e}")),
            _ => {}
        }
        match bound(&self.valid_to) {
            Ok(Some(to)) if now > to => return Err(format!("expired at {to}")),
            Err(e) => return Err(format!("unreadable ValidTo: {e}")),
            _ => {}
        }
        Ok(())
    }

    /// The numbers this identifier is known by: `InternalNrLong` (normalised) and
    /// `RegistrationNr`.
    pub fn numbers(&self) -> impl Iterator<Item = String> + '_ {
        self.internal_nr_long
            .as_deref()
            .map(normalize_hex_badge)
            .into_iter()
            .chain(self.registration_nr.clone())
    }
}

/// The identifiers of a person that could be read; a malformed one is skipped and logged (it
/// must not cost the person their other badges).
fn de_identifiers<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<AktionIdentifier>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::Array(items) => items
            .into_iter()
            .enumerate()
            .filter_map(|(i, v)| {
                serde_json::from_value(v)
                    .map_err(|e| {
                        skipped_item(Api::Aktion, CALL_PERSONS, &format!("identifier {i}: {e}"))
                    })
                    .ok()
            })
            .collect(),
        _ => Vec::new(),
    })
}

/// Any date the agent only shows: unreadable is none, not a reason to drop the record.
fn de_lenient_date<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<DateTime<FixedOffset>>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::String(s) => parse_aspnet_date(&s).ok(),
        _ => None,
    })
}

/// A person (model `PersonGetResp`). `IdentifierEntryCode` (a PIN) is deliberately not read.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct AktionPerson {
    pub person_id: String,
    #[serde(default, deserialize_with = "de_opt_text")]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "de_opt_text")]
    pub surname: Option<String>,
    #[serde(default, deserialize_with = "de_opt_text")]
    pub department: Option<String>,
    /// "First card identifier of the person (Default identifier for person)".
    #[serde(default, deserialize_with = "de_opt_text")]
    pub identifier_card1: Option<String>,
    #[serde(default, deserialize_with = "de_opt_text")]
    pub identifier_card2: Option<String>,
    #[serde(default, deserialize_with = "de_identifiers")]
    pub identifiers: Vec<AktionIdentifier>,
    /// 0: at least one identifier of the person is not locked; 1: all are locked.
    #[serde(default, deserialize_with = "de_opt_int")]
    pub lock: Option<i64>,
    #[serde(default, deserialize_with = "de_lenient_date")]
    pub time_last_change: Option<DateTime<FixedOffset>>,
}

impl AktionPerson {
    /// Aktion says every identifier of the person is locked.
    pub fn locked(&self) -> bool {
        self.lock == Some(1)
    }
}

/// The badges `p` can present at `now`: the numbers (`InternalNrLong`, `RegistrationNr`) of each
/// identifier that is not locked, is assigned (status 1), is not a password and is within its
/// `ValidFrom`..`ValidTo`; and `IdentifierCard1`/`IdentifierCard2`, unless they name an
/// identifier that was left out. A left-out identifier is logged at debug level.
pub fn person_badges(p: &AktionPerson, now: DateTime<Utc>, tz: Tz) -> Vec<String> {
    let mut badges: Vec<String> = Vec::new();
    let mut excluded: Vec<String> = Vec::new();
    for i in &p.identifiers {
        match i.usable(now, tz) {
            Ok(()) => badges.extend(i.numbers()),
            Err(why) => {
                tracing::debug!(api = %Api::Aktion, person = %p.person_id, why, "identifier is not a badge");
                excluded.extend(i.numbers());
            }
        }
    }
    for card in p.identifier_card1.iter().chain(&p.identifier_card2) {
        let hex = normalize_hex_badge(card);
        if !excluded.contains(card) && !excluded.contains(&hex) {
            badges.push(card.clone());
        }
    }
    let mut seen = std::collections::HashSet::new();
    badges.retain(|b| !b.is_empty() && seen.insert(b.clone()));
    badges
}

/// Badge → PersonId of every usable badge ([`person_badges`]); a badge held by two persons keeps
/// the first and is logged.
pub fn badge_map(persons: &[AktionPerson], now: DateTime<Utc>, tz: Tz) -> HashMap<String, String> {
    let mut map: HashMap<String, String> = HashMap::new();
    for p in persons {
        for badge in person_badges(p, now, tz) {
            match map.get(&badge) {
                None => {
                    map.insert(badge, p.person_id.clone());
                }
                Some(first) if *first != p.person_id => tracing::warn!(
                    api = %Api::Aktion,
                    person = %p.person_id,
                    kept = %first,
                    "identifier listed for two persons; keeping the first"
                ),
                Some(_) => {}
            }
        }
    }
    map
}

/// A scheduled shift; `begin < end` always (a night shift ends on the next day).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AktionShift {
    pub person_id: String,
    pub name: String,
    pub begin: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub description: String,
    pub time_last_change: Option<DateTime<Utc>>,
}

/// Makes a night shift's end follow its begin. Aktion sends instants, so 22:00–06:00 arrives
/// correctly as two dates; but a shift whose end was stamped on the begin's date (end ≤ begin)
/// is a shift crossing midnight: its end moves forward by whole days until it follows the begin.
pub fn night_shift_end(begin: DateTime<Utc>, end: DateTime<Utc>) -> DateTime<Utc> {
    if end > begin {
        return end;
    }
    let days = (begin - end).num_days() + 1;
    end + chrono::Duration::days(days)
}

/// A C4 hardware event (model `C4HwEvents`): a passage, with its zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AktionHwEvent {
    /// `ID`: a GUID (canonical lower-case form).
    pub id: String,
    /// `HwStructureId`: the GUID of the hardware node.
    pub hw_structure_id: Option<String>,
    /// When the server stored it (what the `LastSync` watermark follows).
    pub date_created: DateTime<FixedOffset>,
    /// When it happened at the device.
    pub date: DateTime<FixedOffset>,
    /// Tenant-defined ("Event codes can be set by user"): see `sources.aktion.event_codes`.
    pub event_code: i64,
    /// 0 none, 1 arrival, 2 departure, 3 start / 4 end of an interruption.
    pub direction: i64,
    /// `OwnerId`: the GUID of the identifier's owner, none when Aktion knows no owner.
    pub owner_id: Option<String>,
    /// `Identifier`: hexadecimal `InternalNrLong` (normalised) or a vehicle's plate.
    pub identifier: Option<String>,
    pub zone: Option<String>,
    pub descriptions: Option<String>,
}

/// A `getC4HwEvents` answer: the events that could be read (oldest `DateCreated` first) and
/// how many malformed ones were skipped (each logged).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct C4Events {
    pub events: Vec<AktionHwEvent>,
    pub skipped: usize,
}

impl AktionHwEvent {
    /// Arrival and the end of an interruption (coming back) → in; departure and the start of an
    /// interruption (leaving for a doctor, a business trip...) → out; 0 and anything else say
    /// nothing about the gate.
    pub fn gate_direction(&self) -> Direction {
        match self.direction {
            1 | 4 => Direction::In,
            2 | 3 => Direction::Out,
            _ => Direction::Unknown,
        }
    }
}

/// The Aktion client. Cheap to clone; clones share the token and the rate limiter.
#[derive(Debug, Clone)]
pub struct AktionClient {
    inner: Arc<Inner>,
    page_size: u32,
}

#[derive(Debug)]
struct Inner {
    http: Http,
    base: Url,
    user_login: String,
    api_key: Secret,
    tokens: TokenCache,
    tz: Tz,
}

impl AktionClient {
    pub fn new(cfg: &AktionConfig, opts: HttpOptions) -> Result<AktionClient, CloudError> {
        let tokens = TokenCache::new(opts.refresh_margin);
        let http = Http::new(Api::Aktion, opts, &[&cfg.api_key])?;
        Ok(AktionClient {
            inner: Arc::new(Inner {
                base: base_url(Api::Aktion, &cfg.base_url)?,
                user_login: cfg.user_login.clone(),
                api_key: cfg.api_key.clone(),
                tokens,
                tz: cfg.timezone,
                http,
            }),
            page_size: DEFAULT_PAGE_SIZE,
        })
    }

    pub fn with_page_size(mut self, page_size: u32) -> AktionClient {
        self.page_size = page_size.max(1);
        self
    }

    /// The tenant's zone (`sources.aktion.timezone`).
    pub fn timezone(&self) -> Tz {
        self.inner.tz
    }

    /// Every person (`person/getAll`, all pages).
    pub async fn persons(&self) -> Result<Vec<AktionPerson>, CloudError> {
        let url = self.url("person/getAll")?;
        self.paged(CALL_PERSONS, url, parse_persons_page)
            .await
            .map_err(|e| explain(e, None))
    }

    /// The shifts of `person_id` overlapping `[from, to]` (both inclusive), all pages. With
    /// `changed_since`, only shifts whose `TimeLastChange` is not older (a refresh).
    pub async fn scheduled_shifts(
        &self,
        person_id: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        changed_since: Option<DateTime<Utc>>,
    ) -> Result<Vec<AktionShift>, CloudError> {
        let tz = self.inner.tz;
        let mut url = self.url("attendance/getScheduledShift")?;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("PersonId", person_id)
                .append_pair("TimeFrom", &local_param(from, tz))
                .append_pair("TimeTo", &local_param(to, tz));
            if let Some(c) = changed_since {
                q.append_pair("TimeLastChange", &local_param(c, tz));
            }
        }
        self.paged(CALL_SHIFTS, url, |v| parse_shifts_page(v, person_id))
            .await
            .map_err(|e| explain(e, None))
    }

    /// The events of controller `c4` the server lists for `LastSync` = `last_sync` (sent as the
    /// tenant's local `yyyy-MM-ddTHH:mm:ss`, so cut to the second: the caller drops what it has
    /// already read). Malformed events are skipped and logged.
    pub async fn c4_events(
        &self,
        c4: &str,
        last_sync: DateTime<Utc>,
    ) -> Result<C4Events, CloudError> {
        let mut url = self.url("HwStructure/getC4HwEvents")?;
        url.query_pairs_mut()
            .append_pair("C4Identification", c4)
            .append_pair("LastSync", &local_param(last_sync, self.inner.tz));
        let page = self
            .request(CALL_C4_EVENTS, &url, false)
            .await
            .map_err(|e| explain(e, Some(c4)))?;
        parse_events_page(page.unwrap_or_default(), self.inner.tz).map_err(|detail| {
            self.inner
                .http
                .error(CALL_C4_EVENTS, ErrorKind::Malformed { detail })
        })
    }

    /// Reads pages 1.. of `url` until `Paging.TotalPages` (or an empty page). `parse` answers a
    /// page's items, its paging and how many items it listed (malformed ones included).
    async fn paged<T>(
        &self,
        call: &'static str,
        url: Url,
        parse: impl Fn(Value) -> Result<(Vec<T>, Paging, usize), String>,
    ) -> Result<Vec<T>, CloudError> {
        let mut all = Vec::new();
        for page in 1..=MAX_PAGES {
            let mut page_url = url.clone();
            page_url
                .query_pairs_mut()
                .append_pair("PageNumber", &page.to_string())
                .append_pair("PageSize", &self.page_size.to_string());
            let Some(body) = self.request(call, &page_url, true).await? else {
                return Ok(all);
            };
            let (items, paging, listed) = parse(body)
                .map_err(|detail| self.inner.http.error(call, ErrorKind::Malformed { detail }))?;
            let empty = listed == 0;
            all.extend(items);
            if empty || u64::from(page) >= paging.total_pages {
                if (all.len() as u64) < paging.total_count {
                    tracing::warn!(
                        api = %Api::Aktion,
                        call,
                        expected = paging.total_count,
                        received = all.len(),
                        "fewer items than the server's TotalCount"
                    );
                }
                return Ok(all);
            }
        }
        Err(self.inner.http.error(
            call,
            ErrorKind::Malformed {
                detail: format!("more than {MAX_PAGES} pages"),
            },
        ))
    }

    /// One authenticated GET. `none_ok`: 404 with 1132 ("no scheduled action") is `Ok(None)`.
    async fn request(
        &self,
        call: &'static str,
        url: &Url,
        none_ok: bool,
    ) -> Result<Option<Value>, CloudError> {
        let inner = &self.inner;
        inner
            .http
            .send_authed(
                call,
                &inner.tokens,
                || self.login(),
                true,
                |client, token| {
                    let mut u = url.clone();
                    u.query_pairs_mut().append_pair("Token", token);
                    client.get(u)
                },
                |a: &Answer| parse_get_answer(a, none_ok),
            )
            .await
    }

    async fn login(&self) -> Result<IssuedToken, CloudError> {
        let inner = &self.inner;
        let url = self.url("login")?;
        inner
            .http
            .send(
                CALL_LOGIN,
                true,
                |client| {
                    client.post(url.clone()).json(&json!({
                        "UserLogin": inner.user_login,
                        "ApiKey": inner.api_key.expose(),
                    }))
                },
                parse_login_answer,
            )
            .await
    }

    fn url(&self, path: &str) -> Result<Url, CloudError> {
        self.inner.base.join(path).map_err(|e| {
            self.inner.http.error(
                "configure",
                ErrorKind::Config {
                    detail: format!("cannot join {path:?} to the base URL: {e}"),
                },
            )
        })
    }
}

/// The answer to an authenticated GET: its JSON object. `none_ok`: 404 with 1132 ("no scheduled
/// action") is `None`.
pub(crate) fn parse_get_answer(a: &Answer, none_ok: bool) -> Verdict<Option<Value>> {
    if a.status == StatusCode::OK {
        return match a.json::<Value>() {
            Ok(v) if v.is_object() => Verdict::Done(Some(v)),
            Ok(_) => Verdict::Fail(ErrorKind::Malformed {
                detail: format!("expected a JSON object: {}", a.snippet()),
            }),
            Err(k) => Verdict::Fail(k),
        };
    }
    let v = vendor_answer(a);
    if none_ok && error_number(&v) == Some(code::NO_SCHEDULED_ACTION) {
        return Verdict::Done(None);
    }
    verdict(a, v, false)
}

pub(crate) fn parse_login_answer(a: &Answer) -> Verdict<IssuedToken> {
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct LoginAnswer {
        token: String,
        expire_in_sec: Option<u64>,
    }
    if a.status != StatusCode::OK {
        return verdict(a, vendor_answer(a), true);
    }
    match a.json::<LoginAnswer>() {
        Ok(l) if !l.token.trim().is_empty() => Verdict::Done(IssuedToken {
            value: Secret::new(l.token.trim()),
            lifetime: l
                .expire_in_sec
                .map_or(DEFAULT_TOKEN_LIFETIME, Duration::from_secs),
        }),
        Ok(_) => Verdict::Fail(ErrorKind::Malformed {
            detail: "login answer without a Token".into(),
        }),
        Err(k) => Verdict::Fail(k),
    }
}

/// A `person/getAll` page: the persons that could be read, the paging, and how many were listed.
pub(crate) fn parse_persons_page(v: Value) -> Result<(Vec<AktionPerson>, Paging, usize), String> {
    let page: PersonsPage = serde_json::from_value(v).map_err(|e| e.to_string())?;
    let listed = page.persons.len();
    Ok((items(CALL_PERSONS, page.persons), page.paging, listed))
}

/// A `getScheduledShift` page of `person_id` (the page's own PersonId wins when it has one).
pub(crate) fn parse_shifts_page(
    v: Value,
    person_id: &str,
) -> Result<(Vec<AktionShift>, Paging, usize), String> {
    let page: ShiftsPage = serde_json::from_value(v).map_err(|e| e.to_string())?;
    let person = page.person_id.unwrap_or_else(|| person_id.to_string());
    let listed = page.shifts.len();
    let shifts = items::<ShiftItem>(CALL_SHIFTS, page.shifts)
        .into_iter()
        .map(|s| {
            let begin = s.begin.with_timezone(&Utc);
            AktionShift {
                person_id: person.clone(),
                name: s.name.unwrap_or_default(),
                begin,
                end: night_shift_end(begin, s.end.with_timezone(&Utc)),
                description: s.description.unwrap_or_default(),
                time_last_change: s.time_last_change.map(|t| t.with_timezone(&Utc)),
            }
        })
        .collect();
    Ok((shifts, page.paging, listed))
}

/// A `getC4HwEvents` answer (`{"C4HwEvents":[..]}`, model `HwStructGetC4HwEventsResp`): the
/// events that could be read, oldest `DateCreated` first. Zone-less dates are read in `tz`.
pub(crate) fn parse_events_page(v: Value, tz: Tz) -> Result<C4Events, String> {
    let page =
        serde_json::from_value::<EventsPage>(v).map_err(|e| format!("events answer: {e}"))?;
    let listed = page.c4_hw_events.len();
    let mut events: Vec<AktionHwEvent> = items::<EventWire>(CALL_C4_EVENTS, page.c4_hw_events)
        .into_iter()
        .filter_map(|w| {
            w.resolve(tz)
                .map_err(|e| skipped_item(Api::Aktion, CALL_C4_EVENTS, &e))
                .ok()
        })
        .collect();
    events.sort_by_key(|e| e.date_created);
    Ok(C4Events {
        skipped: listed - events.len(),
        events,
    })
}

/// Rewrites the vendor errors an operator must act on into what to fix: 1228 (the C4 controller
/// `c4` is unknown), 1227 / 1101 (the API user lacks a privilege), 1002 (a parameter missing or
/// not understood).
fn explain(mut e: CloudError, c4: Option<&str>) -> CloudError {
    let answer = match &mut e.kind {
        ErrorKind::Vendor(a) | ErrorKind::Auth(a) => a,
        _ => return e,
    };
    let said = answer.message.clone().unwrap_or_default();
    match (error_number(answer), c4) {
        (Some(code::HW_NOT_FOUND), Some(c4)) => {
            e.kind = ErrorKind::Config {
                detail: format!(
                    "C4 controller '{c4}' unknown (error 1228: {said}) — check sources.aktion.c4_controllers against the C4 identifications in Aktion"
                ),
            };
        }
        (Some(code::HW_PRIVILEGE), _) => {
            answer.message = Some(format!(
                "the API user lacks the privilege to show the physical HW structure and its events (error 1227: {said}) — grant it to sources.aktion.user_login in Aktion"
            ));
        }
        (Some(code::PERSONS_PRIVILEGE), _) => {
            answer.message = Some(format!(
                "the API user lacks the privilege View of agenda Persons (error 1101: {said}) — grant it to sources.aktion.user_login in Aktion"
            ));
        }
        (Some(code::PARAMETER), _) => {
            answer.message = Some(format!(
                "Aktion did not accept a parameter (error 1002: {said}) — a required parameter missing or a date not in yyyy-MM-ddTHH:mm:ss"
            ));
        }
        _ => {}
    }
    e
}

/// What an Aktion error number means for the call. `login`: a 401 is then about credentials.
fn verdict<T>(a: &Answer, v: VendorAnswer, login: bool) -> Verdict<T> {
    match error_number(&v) {
        Some(code::TOKEN_EXPIRED | code::TOKEN_NOT_FOUND) if !login => {
            Verdict::AuthExpired(ErrorKind::Auth(v))
        }
        // 401 like the token errors, but a new token would not help: back off instead.
        Some(code::RATE_POLICY) => Verdict::Retry {
            kind: ErrorKind::RateLimited {
                retry_after: a.retry_after(),
                answer: v,
            },
            after: a.retry_after(),
        },
        Some(code::BAD_LOGIN | code::BAD_API_KEY | code::IP_FILTER | code::IP_FILTER_PARSE) => {
            Verdict::Fail(ErrorKind::Auth(v))
        }
        _ if login && a.status == StatusCode::UNAUTHORIZED => Verdict::Fail(ErrorKind::Auth(v)),
        _ => by_status(a, v),
    }
}

fn error_number(v: &VendorAnswer) -> Option<i64> {
    v.code.as_deref().and_then(|c| c.parse().ok())
}

/// `{"Message","Code","ModelStateErr"}`, or the start of a non-JSON body (IIS pages).
fn vendor_answer(a: &Answer) -> VendorAnswer {
    let mut v = VendorAnswer {
        status: a.status.as_u16(),
        ..VendorAnswer::default()
    };
    match serde_json::from_slice::<Value>(&a.body) {
        Ok(body) => {
            v.code = match &body["Code"] {
                Value::Number(n) => Some(n.to_string()),
                Value::String(s) if !s.is_empty() => Some(s.clone()),
                _ => None,
            };
            v.message = body["Message"].as_str().map(str::to_string);
            if let Value::Array(items) = &body["ModelStateErr"] {
                v.reasons = items
                    .iter()
                    .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_string))
                    .collect();
            }
        }
        Err(_) if !a.body.is_empty() => v.message = Some(a.snippet()),
        Err(_) => {}
    }
    v
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct Paging {
    #[serde(default)]
    pub total_count: u64,
    #[serde(default)]
    pub total_pages: u64,
}

/// The items of a list that could be read; each malformed one is skipped and logged, so one bad
/// record cannot hold back the rest.
fn items<T: serde::de::DeserializeOwned>(call: &'static str, raw: Vec<Value>) -> Vec<T> {
    raw.into_iter()
        .enumerate()
        .filter_map(|(i, v)| {
            serde_json::from_value(v)
                .map_err(|e| skipped_item(Api::Aktion, call, &format!("item {i}: {e}")))
                .ok()
        })
        .collect()
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct PersonsPage {
    persons: Vec<Value>,
    #[serde(default)]
    paging: Paging,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ShiftItem {
    #[serde(default, deserialize_with = "de_opt_text")]
    name: Option<String>,
    #[serde(deserialize_with = "de_date")]
    begin: DateTime<FixedOffset>,
    #[serde(deserialize_with = "de_date")]
    end: DateTime<FixedOffset>,
    #[serde(default, deserialize_with = "de_opt_text")]
    description: Option<String>,
    #[serde(default, deserialize_with = "de_opt_date")]
    time_last_change: Option<DateTime<FixedOffset>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ShiftsPage {
    #[serde(default, deserialize_with = "de_opt_text")]
    person_id: Option<String>,
    shifts: Vec<Value>,
    #[serde(default)]
    paging: Paging,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct EventsPage {
    #[serde(rename = "C4HwEvents")]
    c4_hw_events: Vec<Value>,
}

/// A `C4HwEvents` item as the wire has it; its dates are resolved with the tenant's zone.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct EventWire {
    #[serde(rename = "ID", deserialize_with = "de_guid")]
    id: String,
    #[serde(default, deserialize_with = "de_opt_guid")]
    hw_structure_id: Option<String>,
    date_created: String,
    date: String,
    #[serde(deserialize_with = "de_opt_int")]
    event_code: Option<i64>,
    #[serde(default, deserialize_with = "de_opt_int")]
    direction: Option<i64>,
    #[serde(default, deserialize_with = "de_opt_guid")]
    owner_id: Option<String>,
    #[serde(default, deserialize_with = "de_opt_text")]
    identifier: Option<String>,
    #[serde(default, deserialize_with = "de_opt_text")]
    zone: Option<String>,
    #[serde(default, deserialize_with = "de_opt_text")]
    descriptions: Option<String>,
}

impl EventWire {
    fn resolve(self, tz: Tz) -> Result<AktionHwEvent, String> {
        let id = self.id;
        let date = |what: &str, raw: &str| {
            parse_aktion_date(raw, tz).map_err(|e| format!("event {id}: {what}: {e}"))
        };
        Ok(AktionHwEvent {
            date_created: date("DateCreated", &self.date_created)?,
            date: date("Date", &self.date)?,
            event_code: self
                .event_code
                .ok_or_else(|| format!("event {id}: no EventCode"))?,
            direction: self.direction.unwrap_or(0),
            hw_structure_id: self.hw_structure_id,
            owner_id: self.owner_id,
            identifier: self.identifier.as_deref().map(normalize_hex_badge),
            zone: self.zone,
            descriptions: self.descriptions,
            id,
        })
    }
}

#[cfg(all(test, feature = "kit"))]
pub(crate) mod tests {
    use super::*;
    use crate::kit::fakes::aktion::{
        self as fake, endpoint, AktionControl, FakeAktion, HwEvent, Identifier, OffsetSuffix,
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

    pub(crate) fn config(fake: &FakeAktion, key: &str) -> AktionConfig {
        AktionConfig {
            base_url: fake.base_url(),
            user_login: fake::DEFAULT_USER_LOGIN.into(),
            api_key: Secret::new(key),
            poll_interval_secs: 60,
            c4_controllers: vec!["C4-1".into()],
            people_interval_secs: 3600,
            shift_days: 2,
            // The fake's server time is +01:00.
            timezone: chrono_tz::Etc::GMTMinus1,
            lookback_hours: 24,
            event_codes: [(0, crate::model::AccessStatus::AccessOk)].into(),
            protime_person_ref: None,
        }
    }

    pub(crate) async fn start() -> (FakeAktion, AktionControl) {
        let fake = FakeAktion::start("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("fake aktion");
        let ctl = fake.control();
        ctl.seed_example();
        for i in 0..4 {
            ctl.add_person(fake::Person {
                person_id: format!("P{i}"),
                name: format!("N{i}"),
                surname: format!("S{i}"),
                department: "Logistics".into(),
                identifier_card1: format!("9000{i}"),
                identifier_card2: (i == 1).then(|| "777".to_string()),
                identifier_entry_code: Some("0000".into()),
                identifiers: if i == 2 {
                    vec![Identifier::card("ABC")]
                } else {
                    vec![]
                },
                lock: false,
                time_last_change: utc("2024-11-21T10:00:00Z"),
            });
        }
        ctl.add_c4("C4-1", 11, "Gate A");
        (fake, ctl)
    }

    fn client_for(fake: &FakeAktion, opts: HttpOptions) -> AktionClient {
        AktionClient::new(&config(fake, fake::DEFAULT_API_KEY), opts).expect("client")
    }

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("time")
            .with_timezone(&Utc)
    }

    fn event(created: &str, direction: u8) -> HwEvent {
        HwEvent {
            hw_structure_id: 11,
            date_created: utc(created),
            date: utc(created) - chrono::Duration::seconds(5),
            event_code: 1,
            direction,
            owner_id: Some("P1".into()),
            identifier: "90001".into(),
            zone: "Production".into(),
            descriptions: vec!["Passage".into()],
        }
    }

    #[tokio::test]
    async fn persons_are_paged_and_give_the_badge_map() {
        let (fake, ctl) = start().await;
        let client = client_for(&fake, fast_options()).with_page_size(2);
        let persons = client.persons().await.expect("persons");
        assert_eq!(persons.len(), 5);
        assert_eq!(ctl.wire().count(endpoint::PERSON_GET_ALL), 3);
        assert_eq!(ctl.wire().count(endpoint::LOGIN), 1);
        let map = badge_map(&persons, Utc::now(), chrono_tz::Etc::GMTMinus1);
        assert_eq!(map.get("123456").map(String::as_str), Some("100200300"));
        assert_eq!(map.get("777").map(String::as_str), Some("P1"));
        assert_eq!(map.get("ABC").map(String::as_str), Some("P2"));
        assert_eq!(map.get("0000"), None, "entry codes are not badges");
        assert!(persons[0].time_last_change.is_some());
        // The token travels in the query, as documented.
        let log = ctl.wire().log();
        let call = log
            .iter()
            .find(|r| r.endpoint == endpoint::PERSON_GET_ALL)
            .expect("logged");
        assert!(call.uri.contains("Token="), "{}", call.uri);
        fake.shutdown().await;
    }

    #[tokio::test]
    async fn night_shifts_span_midnight() {
        let (fake, ctl) = start().await;
        ctl.set_max_page_size(2);
        let client = client_for(&fake, fast_options());
        let shifts = client
            .scheduled_shifts(
                "100200300",
                utc("2019-06-15T00:00:00+02:00"),
                utc("2019-06-15T23:59:59+02:00"),
                None,
            )
            .await
            .expect("shifts");
        assert_eq!(shifts.len(), 3);
        assert_eq!(
            ctl.wire().count(endpoint::SCHEDULED_SHIFT),
            2,
            "capped pages"
        );
        let night = &shifts[2];
        assert_eq!(night.name, "night shift");
        assert_eq!(night.begin, utc("2019-06-15T22:00:00+02:00"));
        assert_eq!(night.end, utc("2019-06-16T06:00:00+02:00"));
        assert!(night.begin < night.end);
        // Refresh by TimeLastChange: only the shifts changed since.
        let changed = client
            .scheduled_shifts(
                "100200300",
                utc("2019-06-15T00:00:00+02:00"),
                utc("2019-06-15T23:59:59+02:00"),
                Some(utc("2024-11-21T09:00:00Z")),
            )
            .await
            .expect("changed");
        let names: Vec<_> = changed.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["morning shift", "night shift"]);
        // 1132 (nothing scheduled) is an empty list.
        let none = client
            .scheduled_shifts(
                "P0",
                utc("2019-06-15T00:00:00Z"),
                utc("2019-06-16T00:00:00Z"),
                None,
            )
            .await
            .expect("none");
        assert!(none.is_empty());
        // 1100 (unknown person) is an error naming the vendor's code.
        let err = client
            .scheduled_shifts(
                "nobody",
                utc("2019-06-15T00:00:00Z"),
                utc("2019-06-16T00:00:00Z"),
                None,
            )
            .await
            .expect_err("unknown person");
        assert!(
            matches!(&err.kind, ErrorKind::Vendor(a) if a.status == 404 && a.code.as_deref() == Some("1100")),
            "{err}"
        );
        fake.shutdown().await;
    }

    #[test]
    fn a_night_shift_end_stamped_on_the_begin_day_moves_to_the_next_day() {
        let begin = utc("2019-06-15T20:00:00Z");
        assert_eq!(
            night_shift_end(begin, utc("2019-06-15T04:00:00Z")),
            utc("2019-06-16T04:00:00Z")
        );
        assert_eq!(
            night_shift_end(begin, utc("2019-06-16T04:00:00Z")),
            utc("2019-06-16T04:00:00Z")
        );
        assert_eq!(night_shift_end(begin, begin), utc("2019-06-16T20:00:00Z"));
    }

    #[tokio::test]
    async fn c4_events_with_guid_ids_and_a_local_last_sync() {
        let (fake, ctl) = start().await;
        ctl.set_event_offset_suffix(OffsetSuffix::Alternate);
        let e1 = ctl.add_hw_event(event("2026-03-02T08:00:00.250Z", 1));
        let e2 = ctl.add_hw_event(event("2026-03-02T08:05:00Z", 2));
        let client = client_for(&fake, fast_options());
        let first = client
            .c4_events("C4-1", utc("2026-03-02T07:00:00Z"))
            .await
            .expect("events");
        let first = first.events;
        let ids: Vec<_> = first.iter().map(|e| e.id.clone()).collect();
        assert_eq!(ids, [e1.clone(), e2]);
        assert_eq!(first[0].gate_direction(), Direction::In);
        assert_eq!(first[1].gate_direction(), Direction::Out);
        assert_eq!(first[0].zone.as_deref(), Some("Production"));
        assert_eq!(first[0].owner_id, Some(fake::owner_guid("P1")));
        assert_eq!(first[0].hw_structure_id, Some(fake::hw_guid(11)));
        assert_eq!(first[0].descriptions.as_deref(), Some("Passage"));
        assert_eq!(
            first[0].date_created.with_timezone(&Utc),
            utc("2026-03-02T08:00:00.250Z")
        );
        // LastSync went as the tenant's local yyyy-MM-ddTHH:mm:ss (+01:00 here).
        let log = ctl.wire().log();
        let call = log
            .iter()
            .find(|r| r.endpoint == endpoint::HW_EVENTS)
            .expect("logged");
        assert!(
            call.uri.contains("LastSync=2026-03-02T08%3A00%3A00"),
            "{}",
            call.uri
        );
        // Whole seconds: the watermark's second comes again (the source drops what it read).
        let again = client
            .c4_events("C4-1", utc("2026-03-02T08:00:00.250Z"))
            .await
            .expect("again");
        assert_eq!(again.events.len(), 2, "{again:?}");
        let later = client
            .c4_events("C4-1", utc("2026-03-02T08:05:00Z"))
            .await
            .expect("nothing new");
        assert!(later.events.is_empty());
        fake.shutdown().await;
    }

    #[tokio::test]
    async fn an_expired_token_means_exactly_one_new_login() {
        let (fake, ctl) = start().await;
        let client = client_for(&fake, fast_options());
        client.persons().await.expect("persons");
        ctl.expire_tokens();
        client
            .scheduled_shifts(
                "100200300",
                utc("2019-06-15T00:00:00Z"),
                utc("2019-06-16T00:00:00Z"),
                None,
            )
            .await
            .expect("after 1001");
        assert_eq!(ctl.wire().count(endpoint::LOGIN), 2);
        assert_eq!(ctl.wire().count(endpoint::SCHEDULED_SHIFT), 2);
        fake.shutdown().await;
    }

    #[tokio::test]
    async fn tokens_are_renewed_before_they_run_out() {
        let (fake, ctl) = start().await;
        ctl.set_token_lifetime(Duration::from_secs(2));
        let client = client_for(
            &fake,
            HttpOptions {
                min_interval: Duration::from_millis(400),
                ..fast_options()
            },
        )
        .with_page_size(1);
        // 5 pages 400 ms apart outlive a 2 s token: it is renewed a quarter of its life early
        // (at 1.5 s), so the server never refuses it.
        let persons = client.persons().await.expect("persons");
        assert_eq!(persons.len(), 5);
        assert_eq!(ctl.wire().count(endpoint::PERSON_GET_ALL), 5);
        assert_eq!(ctl.wire().count(endpoint::LOGIN), 2);
        let refused = ctl
            .wire()
            .log()
            .iter()
            .filter(|r| r.status == Some(401))
            .count();
        assert_eq!(refused, 0);
        fake.shutdown().await;
    }

    #[tokio::test]
    async fn rate_policy_1008_backs_off_and_never_hammers() {
        let (fake, ctl) = start().await;
        let client = client_for(
            &fake,
            HttpOptions {
                backoff_min: Duration::from_millis(200),
                backoff_max: Duration::from_millis(200),
                ..fast_options()
            },
        );
        ctl.wire().fail_next_on(
            endpoint::PERSON_GET_ALL,
            1,
            Fault::RateLimited {
                retry_after_secs: 1,
            },
        );
        let started = Instant::now();
        client.persons().await.expect("after backing off");
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert_eq!(ctl.wire().count(endpoint::PERSON_GET_ALL), 2);
        assert_eq!(
            ctl.wire().count(endpoint::LOGIN),
            1,
            "1008 is not a token problem"
        );

        ctl.wire().fail_next_on(
            endpoint::PERSON_GET_ALL,
            100,
            Fault::RateLimited {
                retry_after_secs: 1,
            },
        );
        let started = Instant::now();
        let err = client.persons().await.expect_err("refused");
        assert!(
            matches!(&err.kind, ErrorKind::RateLimited { answer, .. } if answer.code.as_deref() == Some("1008")),
            "{err}"
        );
        assert_eq!(ctl.wire().count(endpoint::PERSON_GET_ALL), 6, "4 attempts");
        assert!(started.elapsed() >= Duration::from_millis(600));
        ctl.wire().clear_faults();
        fake.shutdown().await;
    }

    #[tokio::test]
    async fn rate_limit_is_honoured_between_pages() {
        let (fake, ctl) = start().await;
        let client = client_for(
            &fake,
            HttpOptions {
                min_interval: Duration::from_millis(200),
                ..fast_options()
            },
        )
        .with_page_size(2);
        let started = Instant::now();
        client.persons().await.expect("persons");
        // login + 3 pages, 200 ms apart.
        assert!(started.elapsed() >= Duration::from_millis(600));
        assert_eq!(ctl.wire().total(), 4);
        fake.shutdown().await;
    }

    #[tokio::test]
    async fn errors_are_clear_and_server_errors_retried() {
        let (fake, ctl) = start().await;
        let client = client_for(&fake, fast_options());
        ctl.wire()
            .fail_next_on(endpoint::PERSON_GET_ALL, 1, Fault::InternalError);
        ctl.wire()
            .fail_next_on(endpoint::PERSON_GET_ALL, 1, Fault::Unavailable);
        assert_eq!(client.persons().await.map(|p| p.len()), Ok(5));
        assert_eq!(ctl.wire().count(endpoint::PERSON_GET_ALL), 3);

        ctl.wire()
            .fail_next_on(endpoint::HW_EVENTS, 1, Fault::GarbageBody);
        let err = client
            .c4_events("C4-1", Utc::now())
            .await
            .expect_err("garbage");
        assert!(matches!(err.kind, ErrorKind::Malformed { .. }), "{err}");
        assert!(err
            .to_string()
            .starts_with("Aktion GET HwStructure/getC4HwEvents"));

        let err = client
            .c4_events("no-such-c4", Utc::now())
            .await
            .expect_err("1228");
        assert!(matches!(&err.kind, ErrorKind::Config { .. }), "{err}");
        assert!(
            err.to_string().contains(
                "C4 controller 'no-such-c4' unknown (error 1228: Hw structure physical not found) — check sources.aktion.c4_controllers"
            ),
            "{err}"
        );
        ctl.deny_persons(true);
        let err = client.persons().await.expect_err("1101");
        assert!(err.to_string().contains("error 1101"), "{err}");
        assert!(err.to_string().contains("View of agenda Persons"), "{err}");
        ctl.deny_persons(false);

        let bad = AktionClient::new(&config(&fake, "AAAAAAAAAAAAAAAAAAAAAA=="), fast_options())
            .expect("client");
        let err = bad.persons().await.expect_err("1003");
        assert!(
            matches!(&err.kind, ErrorKind::Auth(a) if a.code.as_deref() == Some("1003")),
            "{err}"
        );
        fake.shutdown().await;
    }

    #[test]
    fn a_malformed_item_is_skipped_and_the_rest_kept() {
        let good = json!({"ID": "0F8FAD5B-D9CB-469F-A165-70867728950E",
            "HwStructureId": "7c9e6679-7425-40de-944b-e07fc1f90ae7",
            "DateCreated": "/Date(1560578400000)/", "Date": "2019-06-15T08:00:00",
            "EventCode": 1, "Direction": 2, "OwnerId": null, "Identifier": "0009A1",
            "Zone": "Hall", "Descriptions": "x"});
        let numeric_id = json!({"ID": 7, "DateCreated": "/Date(1560578400000)/",
            "Date": "/Date(1560578400000)/", "EventCode": 1});
        let bad_date = json!({"ID": "1b4e28ba-2fa1-11d2-883f-0016d3cca427",
            "DateCreated": "yesterday", "Date": "/Date(1560578400000)/", "EventCode": 1});
        let bool_code = json!({"ID": "2b4e28ba-2fa1-11d2-883f-0016d3cca427",
            "DateCreated": "/Date(1560578400000)/", "Date": "/Date(1560578400000)/",
            "EventCode": true});
        let page = json!({"C4HwEvents": [numeric_id, bad_date, good, bool_code, "nonsense"]});
        let page = parse_events_page(page, chrono_tz::Europe::Prague).expect("page");
        assert_eq!(page.skipped, 4);
        let events = page.events;
        assert_eq!(events.len(), 1);
        let e = &events[0];
        assert_eq!(e.id, "0f8fad5b-d9cb-469f-a165-70867728950e");
        assert_eq!(e.gate_direction(), Direction::Out);
        assert_eq!(
            e.identifier.as_deref(),
            Some("9A1"),
            "hex without leading zeros"
        );
        assert_eq!(e.owner_id, None);
        // A zone-less date is the tenant's local time (CEST in June).
        assert_eq!(e.date.with_timezone(&Utc), utc("2019-06-15T06:00:00Z"));
        assert!(parse_events_page(json!({"Events": []}), chrono_tz::UTC).is_err());
    }

    #[test]
    fn locked_lost_password_or_expired_identifiers_are_not_badges() {
        let tz = chrono_tz::Europe::Prague;
        let now = utc("2026-03-02T12:00:00Z");
        let person: AktionPerson = serde_json::from_value(json!({
            "PersonId": "P1", "Lock": 0, "IdentifierCard1": "C1", "IdentifierCard2": "0000DEAD",
            "Identifiers": [
                {"InternalNrLong": "00AA", "RegistrationNr": "R-AA", "Type": 0, "Status": 1, "Lock": 0,
                 "ValidFrom": "2026-01-01T00:00:00", "ValidTo": "2026-12-31T23:59:59"},
                {"InternalNrLong": "DEAD", "RegistrationNr": "R-DEAD", "Type": 0, "Status": 1, "Lock": 1},
                {"InternalNrLong": "B0", "Status": 2, "Lock": 0},
                {"InternalNrLong": "C0", "Status": 1, "Lock": 0, "ValidTo": "2026-03-02T12:59:59"},
                {"InternalNrLong": "D0", "Status": 1, "Lock": 0, "ValidFrom": "2026-03-02T13:00:01"},
                {"InternalNrLong": "E0", "Type": 4, "Status": 1, "Lock": 0},
                {"InternalNrLong": "F0", "Status": 1, "Lock": "no"}
            ]
        }))
        .expect("person");
        assert_eq!(
            person.identifiers.len(),
            6,
            "the malformed identifier is skipped"
        );
        // 12:00Z is 13:00 in Prague: C0 expired at 12:59:59, D0 starts at 13:00:01.
        assert_eq!(person_badges(&person, now, tz), ["AA", "R-AA", "C1"]);
        assert!(!person.locked());
        let all_locked: AktionPerson =
            serde_json::from_value(json!({"PersonId": "P2", "Lock": 1})).expect("person");
        assert!(all_locked.locked());
        // A boolean Lock is not what the page documents: the person is malformed.
        assert!(
            serde_json::from_value::<AktionPerson>(json!({"PersonId": "P3", "Lock": true}))
                .is_err()
        );
    }

    #[test]
    fn aspnet_dates_with_and_without_offsets() {
        let t = |s: &str| DateTime::parse_from_rfc3339(s).expect("time");
        assert_eq!(
            parse_aspnet_date("/Date(1560578400000)/"),
            Ok(t("2019-06-15T06:00:00Z"))
        );
        assert_eq!(
            parse_aspnet_date(r"\/Date(1560578400000)\/"),
            Ok(t("2019-06-15T06:00:00Z"))
        );
        let with = parse_aspnet_date("/Date(1560578400000+0200)/").expect("offset");
        assert_eq!(with, t("2019-06-15T08:00:00+02:00"));
        assert_eq!(with.offset().local_minus_utc(), 7200);
        assert_eq!(
            parse_aspnet_date(r"\/Date(1560578400000-0530)\/"),
            Ok(t("2019-06-15T00:30:00-05:30"))
        );
        assert_eq!(
            parse_aspnet_date("/Date(-86400000)/"),
            Ok(t("1969-12-31T00:00:00Z"))
        );
        assert_eq!(
            parse_aspnet_date("2024-11-21T12:51:46.22378+01:00"),
            Ok(t("2024-11-21T12:51:46.22378+01:00"))
        );
        for bad in [
            "/Date()/",
            "/Date(abc)/",
            "/Date(1560578400000+02)/",
            "/Date(1560578400000+0260)/",
            "/Date(99999999999999999999)/",
            "2019-06-15T08:00:00",
            "",
        ] {
            assert!(parse_aspnet_date(bad).is_err(), "{bad:?}");
        }
        // Through JSON, as the wire delivers it (escaped slashes).
        let v: Value =
            serde_json::from_str(r#"{"d":"\/Date(1560578400000+0200)\/"}"#).expect("json");
        assert_eq!(
            v["d"].as_str().map(parse_aspnet_date),
            Some(Ok(t("2019-06-15T08:00:00+02:00")))
        );
    }
}

/// The answers transcribed from (or composed after) the vendor's help pages, read by the real
/// parse functions (see `tests/fixtures/aktion/README.md` for each file's page).
#[cfg(test)]
mod golden {
    use super::*;
    use bytes::Bytes;
    use reqwest::header::HeaderMap;

    fn fixture(name: &str) -> Value {
        let path = format!(
            "{}/tests/fixtures/aktion/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(&path).expect("fixture");
        serde_json::from_str(&text).expect("json")
    }

    fn answer(status: u16, name: &str) -> Answer {
        Answer {
            status: StatusCode::from_u16(status).expect("status"),
            headers: HeaderMap::new(),
            body: Bytes::from(fixture(name).to_string()),
        }
    }

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("t")
            .with_timezone(&Utc)
    }

    #[test]
    fn golden_answers_from_the_help_pages_parse() {
        let Verdict::Done(token) = parse_login_answer(&answer(200, "login.json")) else {
            panic!("login");
        };
        assert_eq!(token.value.expose(), "a45a039c-eb31-46f1-9ece-88aa5ccfe22c");
        assert_eq!(token.lifetime, Duration::from_secs(20));

        let (shifts, paging, listed) =
            parse_shifts_page(fixture("get-scheduled-shift.json"), "x").expect("shifts");
        assert_eq!((shifts.len(), listed, paging.total_pages), (3, 3, 1));
        assert_eq!(shifts[2].end, utc("2019-06-16T06:00:00+02:00"));

        let tz = chrono_tz::Europe::Prague;
        let events = parse_events_page(fixture("get-c4-hw-events.json"), tz)
            .expect("events")
            .events;
        assert_eq!(events.len(), 2);
        assert_eq!(
            events[0].id, "1b4e28ba-2fa1-11d2-883f-0016d3cca427",
            "oldest first"
        );
        assert_eq!(
            events[1].owner_id.as_deref(),
            Some("2a8f1e4c-5b7d-4e3a-9c61-0d2f8b7a6e51")
        );
        assert_eq!(
            events[1].hw_structure_id.as_deref(),
            Some("7c9e6679-7425-40de-944b-e07fc1f90ae7")
        );
        assert_eq!((events[1].event_code, events[1].direction), (3, 4));
        assert_eq!(events[0].identifier.as_deref(), Some("A1B2C3"));
        assert_eq!(
            events[1].date.with_timezone(&Utc),
            utc("2024-11-21T11:51:46.22378Z")
        );

        let (persons, paging, listed) =
            parse_persons_page(fixture("get-person-getall.json")).expect("persons");
        assert_eq!((persons.len(), listed, paging.total_count), (1, 1, 3));
        let p = &persons[0];
        assert_eq!(p.identifiers.len(), 2);
        assert!(!p.locked());
        assert_eq!(
            person_badges(p, utc("2026-03-02T12:00:00Z"), tz),
            [
                "AB12CD",
                "sample string 5",
                "sample string 15",
                "sample string 16"
            ]
        );

        let a = answer(404, "error-1228.json");
        let v = vendor_answer(&a);
        assert_eq!(error_number(&v), Some(code::HW_NOT_FOUND));
        assert!(matches!(
            parse_get_answer(&a, false),
            Verdict::Fail(ErrorKind::Vendor(_))
        ));
    }
}
