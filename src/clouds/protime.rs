//! Protime API client (myProtime connector): OAuth2 client-credentials tokens, `POST /clockings`
//! with the duplicate check a lost answer needs, the access-clockings delta feed, and people.
//!
//! Vendor quirks handled here:
//! - No idempotency key: a `POST /clockings` whose answer was lost MAY have been stored. So may
//!   one answered 5xx or 408 (a reverse proxy in front of a slow backend answers 502/504 while the
//!   backend goes on and stores it). All of these are reported as [`ErrorKind::AnswerLost`]
//!   (never retried here); the caller looks the clocking up with
//!   [`ProtimeClient::find_clocking`] before sending it again. Only 429 (and failures to connect,
//!   where nothing was sent) are retried in place.
//! - Protime books overnight clockings on the day its schedule says, not on the date sent: a
//!   00:30 clocking may come back dated the day before at minute 1470. The lookup lists the dates
//!   around the clocking's and compares absolute minutes.
//! - Lists answer `{"value":[..],"nextLink":".."}` and an EMPTY `value` with a `nextLink` is not
//!   the end: only a missing `nextLink` is.
//! - The first `?delta` round lists plain items; `deltaLink` answers wrap them in
//!   `{"changeType":"InsertOrUpdate"|"Delete","data":{..}}`. Both are parsed into
//!   [`AccessChange`]s.
//! - `changeVersion` is opaque and sorts as a string; an item not newer than the one held is
//!   stale ([`apply_access_changes`]).
//! - Model validation errors come as `{"validationErrors":..}` without the `error` wrapper.
//! - The status `UnknownBadgeNumber` (newer pages) is read as `UnknownBadge`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::{Datelike, NaiveDate};
use reqwest::header::{CONTENT_TYPE, LOCATION};
use reqwest::{StatusCode, Url};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::http::{
    base_url, by_status, form_body, same_origin_link, skipped_item, Answer, Api, CloudError,
    ErrorKind, Http, HttpOptions, IssuedToken, TokenCache, VendorAnswer, Verdict,
};
use crate::config::{ProtimeConfig, Secret};
use crate::model::AccessStatus;

/// Scopes (`connector-protimeapi-<collection>.read|.write`).
pub const SCOPE_CLOCKINGS_WRITE: &str = "connector-protimeapi-clockings.write";
/// Needed for the duplicate check before a re-send.
pub const SCOPE_CLOCKINGS_READ: &str = "connector-protimeapi-clockings.read";
pub const SCOPE_ACCESS_CLOCKINGS_READ: &str = "connector-protimeapi-access-clockings.read";
pub const SCOPE_PEOPLE_READ: &str = "connector-protimeapi-people.read";

/// The external references every read asks for, so items can be matched by badge and terminal
/// code rather than by Protime's internal ids.
const EXTERNAL_REFERENCES: &str = "(people,@badge-number)(terminals,@external-code)";
/// A token answer without `expires_in` is trusted this long.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(300);
/// A listing longer than this many pages is treated as a vendor loop, not data.
const MAX_PAGES: usize = 10_000;

/// The token call, as named in errors (a refused login is not a refused API call).
pub const CALL_TOKEN: &str = "POST connect/token";
const CALL_POST_CLOCKING: &str = "POST /clockings";
const CALL_FIND_CLOCKING: &str = "GET /clockings";
const CALL_ACCESS_INITIAL: &str = "GET /access-clockings?delta";
const CALL_ACCESS_DELTA: &str = "GET /delta/access-clockings";
const CALL_PEOPLE: &str = "GET /people";

/// The external references the duplicate check asks for when the person is named by
/// `@employee-number`: the listed clockings must carry the reference they are matched on.
const EXTERNAL_REFERENCES_BY_EMPLOYEE: &str = "(people,@employee-number)(terminals,@external-code)";

/// Who clocked: Protime's internal id, or a predefined external reference of the person
/// (`@badge-number`, `@employee-number`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PersonRef {
    Id(i64),
    BadgeNumber(String),
    EmployeeNumber(String),
}

/// Where: Protime's internal terminal id, or its `@external-code`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TerminalRef {
    Id(i64),
    ExternalCode(String),
}

/// `kind` of a time clocking; the agent sends `InOut`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClockingKind {
    InOut,
    Reason,
    Activity,
    ActivityEnd,
}

/// A time clocking to create: `date` and `time_of_day_in_minutes` are the tenant's wall clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtimeClocking {
    pub person: PersonRef,
    pub date: NaiveDate,
    /// -1440..=2880 (Protime allows previous/next-day minutes for time clockings).
    pub time_of_day_in_minutes: i32,
    pub kind: ClockingKind,
    pub terminal: Option<TerminalRef>,
}

/// A confirmed `POST /clockings`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PostOutcome {
    /// `201 Created`; `location` is the new clocking's URL when the tenant sent one.
    Created { location: Option<String> },
    /// `202 Accepted` (some tenants): queued for processing at `operation_location`.
    Accepted { operation_location: Option<String> },
}

impl ProtimeClocking {
    /// Minutes since 0001-01-01 00:00 of the tenant's wall clock: the same instant whichever day
    /// Protime books it on (`2026-07-02` minute 30 = `2026-07-01` minute 1470).
    pub fn absolute_minute(&self) -> i64 {
        absolute_minute(self.date, self.time_of_day_in_minutes)
    }
}

fn absolute_minute(date: NaiveDate, minutes: i32) -> i64 {
    i64::from(date.num_days_from_ce()) * 1440 + i64::from(minutes)
}

/// A time clocking as Protime lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteClocking {
    pub id: i64,
    pub person_id: Option<i64>,
    pub badge_number: Option<String>,
    /// Present only when the listing asked for `(people,@employee-number)`.
    pub employee_number: Option<String>,
    pub date: NaiveDate,
    pub time_of_day_in_minutes: i32,
    /// The minute as first registered, present only when someone edited the clocking.
    pub original_time_of_day_in_minutes: Option<i32>,
    pub kind: ClockingKind,
    pub terminal_id: Option<i64>,
    pub terminal_code: Option<String>,
}

/// An access clocking (read only in Protime).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessClocking {
    pub id: i64,
    /// Opaque; sorts as a string.
    pub change_version: String,
    pub person_id: Option<i64>,
    pub badge_number: Option<String>,
    /// The tenant's local date; access clockings always happen on the actual date.
    pub date: NaiveDate,
    /// 0..=1439, the tenant's wall clock.
    pub time_of_day_in_minutes: u16,
    pub terminal_id: Option<i64>,
    pub terminal_code: Option<String>,
    pub status: AccessStatus,
}

/// One item of the delta feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessChange {
    Upsert(AccessClocking),
    Delete { id: i64, change_version: String },
}

impl AccessChange {
    pub fn id(&self) -> i64 {
        match self {
            AccessChange::Upsert(a) => a.id,
            AccessChange::Delete { id, .. } => *id,
        }
    }

    pub fn change_version(&self) -> &str {
        match self {
            AccessChange::Upsert(a) => &a.change_version,
            AccessChange::Delete { change_version, .. } => change_version,
        }
    }
}

/// A delta round: the changes in order, and the `deltaLink` for the next round (persist it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessDelta {
    pub changes: Vec<AccessChange>,
    pub delta_link: String,
}

/// What the mirror holds per access-clocking id. A deletion is kept as a tombstone with its
/// version, so that a stale `InsertOrUpdate` arriving after it cannot resurrect the item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HeldAccess {
    Live(AccessClocking),
    Deleted { change_version: String },
}

impl HeldAccess {
    pub fn change_version(&self) -> &str {
        match self {
            HeldAccess::Live(a) => &a.change_version,
            HeldAccess::Deleted { change_version } => change_version,
        }
    }
}

/// What [`apply_access_changes`] did with one change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    Inserted(i64),
    Updated(i64),
    Deleted(i64),
    /// Not newer than what is held (lower or equal `changeVersion`): ignored.
    Stale(i64),
}

/// Applies delta changes in order to `held`. A change whose `changeVersion` is not greater (as a
/// string, the documented order) than the held one for its id is stale and ignored; a `Delete`
/// leaves a tombstone. Returns what happened to each change, in order.
pub fn apply_access_changes(
    held: &mut BTreeMap<i64, HeldAccess>,
    changes: impl IntoIterator<Item = AccessChange>,
) -> Vec<Applied> {
    changes
        .into_iter()
        .map(|change| {
            let id = change.id();
            let previous = held.get(&id);
            if previous.is_some_and(|h| change.change_version() <= h.change_version()) {
                return Applied::Stale(id);
            }
            let was_live = matches!(previous, Some(HeldAccess::Live(_)));
            match change {
                AccessChange::Upsert(a) => {
                    held.insert(id, HeldAccess::Live(a));
                    if was_live {
                        Applied::Updated(id)
                    } else {
                        Applied::Inserted(id)
                    }
                }
                AccessChange::Delete { change_version, .. } => {
                    held.insert(id, HeldAccess::Deleted { change_version });
                    Applied::Deleted(id)
                }
            }
        })
        .collect()
}

/// A person as Protime lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtimePerson {
    pub id: i64,
    pub badge_number: Option<String>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
}

/// Badge number → Protime person id. A badge listed for two people keeps the first (and is
/// logged): Protime should not allow it, and guessing would misattribute clockings.
pub fn badge_map(people: &[ProtimePerson]) -> HashMap<String, i64> {
    let mut map = HashMap::new();
    for p in people {
        let Some(badge) = p.badge_number.as_deref().map(str::trim) else {
            continue;
        };
        if badge.is_empty() {
            continue;
        }
        if let Some(first) = map.get(badge) {
            if *first != p.id {
                tracing::warn!(
                    api = %Api::Protime,
                    person = p.id,
                    kept = *first,
                    "badge number listed for two people; keeping the first"
                );
            }
            continue;
        }
        map.insert(badge.to_string(), p.id);
    }
    map
}

/// The Protime client. Cheap to clone; clones share the token and the rate limiter.
#[derive(Debug, Clone)]
pub struct ProtimeClient {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    http: Http,
    base: Url,
    token_url: Url,
    client_id: String,
    client_secret: Secret,
    scopes: String,
    tokens: TokenCache,
}

impl ProtimeClient {
    /// A client for `cfg`. It asks for the clockings scopes (write, and read for the duplicate
    /// check) and, when `cfg.mirror` is on, for access clockings and people too: a tenant refuses
    /// the whole token when one scope requested is not granted.
    pub fn new(cfg: &ProtimeConfig, opts: HttpOptions) -> Result<ProtimeClient, CloudError> {
        let mut scopes = vec![SCOPE_CLOCKINGS_WRITE, SCOPE_CLOCKINGS_READ];
        if cfg.mirror {
            scopes.extend([SCOPE_ACCESS_CLOCKINGS_READ, SCOPE_PEOPLE_READ]);
        }
        let tokens = TokenCache::new(opts.refresh_margin);
        let http = Http::new(Api::Protime, opts, &[&cfg.client_secret])?;
        let token_url = Url::parse(cfg.token_url.trim()).map_err(|e| {
            http.error(
                "configure",
                ErrorKind::Config {
                    detail: format!("token URL {:?}: {e}", cfg.token_url),
                },
            )
        })?;
        Ok(ProtimeClient {
            inner: Arc::new(Inner {
                base: base_url(Api::Protime, &cfg.base_url)?,
                token_url,
                client_id: cfg.client_id.clone(),
                client_secret: cfg.client_secret.clone(),
                scopes: scopes.join(" "),
                tokens,
                http,
            }),
        })
    }

    /// The scopes this client asks for, space separated (as sent to the token endpoint).
    pub fn scopes(&self) -> &str {
        &self.inner.scopes
    }

    /// `POST /clockings`. Retries 429 (after `Retry-After`) and failures to connect; never
    /// retries once the request may have been processed: a lost answer, a timeout, a 5xx or a 408
    /// is [`ErrorKind::AnswerLost`]. 400, 404, 409 and 422 are [`ErrorKind::Rejected`] with the
    /// vendor's reasons (sending the same content again cannot succeed); 401/403 are
    /// [`ErrorKind::Auth`] (see [`scope_for_call`]).
    pub async fn post_clocking(&self, c: &ProtimeClocking) -> Result<PostOutcome, CloudError> {
        let url = self.url("clockings")?;
        let body = ClockingBody::from(c);
        self.inner
            .http
            .send_authed(
                CALL_POST_CLOCKING,
                &self.inner.tokens,
                || self.login(),
                false,
                |client, token| client.post(url.clone()).bearer_auth(token).json(&body),
                parse_post_answer,
            )
            .await
    }

    /// Every listed clocking that is `c` as Protime keeps it: same person, kind, terminal (when
    /// `c` names one) and instant. The instant is compared as an absolute minute over the dates
    /// from the day before to the day after `c.date`, because Protime books overnight clockings
    /// on the day its schedule says (a 00:30 clocking may be listed the day before at 1470); an
    /// edited clocking also matches by its `originalTimeOfDayInMinutes`. Soft-deleted clockings
    /// are listed by Protime and counted: they were stored. Two clockings of one badge in one
    /// minute are identical here, so the caller counts matches (see the Protime sink).
    ///
    /// With a [`PersonRef::Id`] the filter names the person; with an external reference it lists
    /// the days, asks for that same reference (`@badge-number` or `@employee-number`) and
    /// matches on it: a clocking posted by employee number is found by employee number. Follows
    /// `nextLink` across empty pages.
    pub async fn find_clocking(
        &self,
        c: &ProtimeClocking,
    ) -> Result<Vec<RemoteClocking>, CloudError> {
        let day = |d: Option<NaiveDate>| d.unwrap_or(c.date).format("%Y-%m-%d");
        let (from, to) = (day(c.date.pred_opt()), day(c.date.succ_opt()));
        let filter = match &c.person {
            PersonRef::Id(id) => {
                format!("person in ({id}) and date ge '{from}' and date le '{to}'")
            }
            PersonRef::BadgeNumber(_) | PersonRef::EmployeeNumber(_) => {
                format!("date ge '{from}' and date le '{to}'")
            }
        };
        let references = match &c.person {
            PersonRef::EmployeeNumber(_) => EXTERNAL_REFERENCES_BY_EMPLOYEE,
            PersonRef::Id(_) | PersonRef::BadgeNumber(_) => EXTERNAL_REFERENCES,
        };
        let mut url = self.url("clockings")?;
        url.query_pairs_mut()
            .append_pair("filter", &filter)
            .append_pair("externalReferences", references);
        let mut found = Vec::new();
        let mut bad = None;
        self.list(
            CALL_FIND_CLOCKING,
            url,
            false,
            |item: Value| match parse_clocking(&item) {
                Ok(r) if is_same_clocking(c, &r) => found.push(r),
                Ok(_) => {}
                Err(e) => bad = Some(e),
            },
        )
        .await?;
        // An item we cannot read might be ours: counting without it could make the caller post
        // a duplicate, so the lookup fails (and is repeated later) instead.
        match bad {
            Some(detail) => Err(self
                .inner
                .http
                .error(CALL_FIND_CLOCKING, ErrorKind::Malformed { detail })),
            None => Ok(found),
        }
    }

    /// The initial delta round: `GET /access-clockings?filter=date ge '<from>'&delta`, every page
    /// (following `nextLink` across empty pages) until the `deltaLink`. All items come back as
    /// [`AccessChange::Upsert`].
    pub async fn access_clockings_initial(
        &self,
        from: NaiveDate,
    ) -> Result<AccessDelta, CloudError> {
        let mut url = self.url("access-clockings")?;
        url.query_pairs_mut()
            .append_pair("filter", &format!("date ge '{}'", from.format("%Y-%m-%d")))
            .append_pair("externalReferences", EXTERNAL_REFERENCES)
            .append_key_only("delta");
        self.delta_round(CALL_ACCESS_INITIAL, url).await
    }

    /// One delta round from a stored `deltaLink`: the changes since that link was issued, and the
    /// next link. [`ErrorKind::DeltaExpired`] (410): start over with
    /// [`Self::access_clockings_initial`]; [`ErrorKind::DeltaBusy`] (409): back off, retry later.
    pub async fn access_clockings_delta(
        &self,
        delta_link: &str,
    ) -> Result<AccessDelta, CloudError> {
        let url = same_origin_link(&self.inner.base, delta_link)
            .map_err(|k| self.inner.http.error(CALL_ACCESS_DELTA, k))?;
        self.delta_round(CALL_ACCESS_DELTA, url).await
    }

    /// Every person with their `@badge-number` (see [`badge_map`]).
    pub async fn people(&self) -> Result<Vec<ProtimePerson>, CloudError> {
        let mut url = self.url("people")?;
        url.query_pairs_mut()
            .append_pair("externalReferences", "(people,@badge-number)");
        let mut people = Vec::new();
        self.list(CALL_PEOPLE, url, false, |item: Value| {
            match parse_person(item) {
                Ok(p) => people.push(p),
                Err(e) => skipped_item(Api::Protime, CALL_PEOPLE, &e),
            }
        })
        .await?;
        Ok(people)
    }

    /// One round; an item that cannot be understood is skipped (and logged) so that it cannot
    /// hold the delta feed on the same link forever.
    async fn delta_round(&self, call: &'static str, url: Url) -> Result<AccessDelta, CloudError> {
        let mut changes = Vec::new();
        let delta_link = self
            .list(call, url, true, |item: Value| {
                match parse_access_item(&item) {
                    Ok(c) => changes.push(c),
                    Err(e) => skipped_item(Api::Protime, call, &e),
                }
            })
            .await?;
        match delta_link {
            Some(delta_link) => Ok(AccessDelta {
                changes,
                delta_link,
            }),
            None => Err(self.inner.http.error(
                call,
                ErrorKind::Malformed {
                    detail: "the last page has neither nextLink nor deltaLink".into(),
                },
            )),
        }
    }

    /// Follows `nextLink` from `first` until a page has none (an empty `value` is not the end);
    /// returns that last page's `deltaLink`.
    async fn list(
        &self,
        call: &'static str,
        first: Url,
        delta: bool,
        mut on_item: impl FnMut(Value),
    ) -> Result<Option<String>, CloudError> {
        let mut url = first;
        for _ in 0..MAX_PAGES {
            let page: Page = self.get_page(call, &url, delta).await?;
            page.value.into_iter().for_each(&mut on_item);
            let Some(next) = page.next_link else {
                return Ok(page.delta_link);
            };
            let next = same_origin_link(&self.inner.base, &next)
                .map_err(|k| self.inner.http.error(call, k))?;
            if next == url {
                return Err(self.inner.http.error(
                    call,
                    ErrorKind::Malformed {
                        detail: "nextLink points to the page just read".into(),
                    },
                ));
            }
            url = next;
        }
        Err(self.inner.http.error(
            call,
            ErrorKind::Malformed {
                detail: format!("more than {MAX_PAGES} pages"),
            },
        ))
    }

    async fn get_page(
        &self,
        call: &'static str,
        url: &Url,
        delta: bool,
    ) -> Result<Page, CloudError> {
        self.inner
            .http
            .send_authed(
                call,
                &self.inner.tokens,
                || self.login(),
                true,
                |client, token| client.get(url.clone()).bearer_auth(token),
                |a: &Answer| parse_page_answer(a, delta),
            )
            .await
    }

    /// OAuth2 client credentials (form body, as documented).
    async fn login(&self) -> Result<IssuedToken, CloudError> {
        let inner = &self.inner;
        let body = form_body(&[
            ("grant_type", "client_credentials"),
            ("client_id", &inner.client_id),
            ("client_secret", inner.client_secret.expose()),
            ("scope", &inner.scopes),
        ]);
        inner
            .http
            .send(
                CALL_TOKEN,
                true,
                |client| {
                    client
                        .post(inner.token_url.clone())
                        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                        .body(body.clone())
                },
                parse_token_answer,
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

/// One page of a listing (`delta`: of the delta feed, where 409 and 410 mean something).
pub(crate) fn parse_page_answer(a: &Answer, delta: bool) -> Verdict<Page> {
    match a.status {
        StatusCode::OK => match a.json::<Page>() {
            Ok(p) => Verdict::Done(p),
            Err(k) => Verdict::Fail(k),
        },
        StatusCode::GONE if delta => Verdict::Fail(ErrorKind::DeltaExpired),
        StatusCode::CONFLICT if delta => Verdict::Fail(ErrorKind::DeltaBusy),
        _ => by_status(a, vendor_answer(a)),
    }
}

pub(crate) fn parse_token_answer(a: &Answer) -> Verdict<IssuedToken> {
    #[derive(Deserialize)]
    struct TokenAnswer {
        access_token: String,
        expires_in: Option<u64>,
    }
    match a.status {
        StatusCode::OK => match a.json::<TokenAnswer>() {
            Ok(t) if !t.access_token.is_empty() => Verdict::Done(IssuedToken {
                value: Secret::new(t.access_token),
                lifetime: t
                    .expires_in
                    .map_or(DEFAULT_TOKEN_LIFETIME, Duration::from_secs),
            }),
            Ok(_) => Verdict::Fail(ErrorKind::Malformed {
                detail: "empty access_token".into(),
            }),
            Err(k) => Verdict::Fail(k),
        },
        // invalid_client / invalid_scope / unsupported_grant_type: configuration, not transient.
        StatusCode::BAD_REQUEST | StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            Verdict::Fail(ErrorKind::Auth(vendor_answer(a)))
        }
        _ => by_status(a, vendor_answer(a)),
    }
}

pub(crate) fn parse_post_answer(a: &Answer) -> Verdict<PostOutcome> {
    let header = |name: &str| a.header(name).map(str::to_string);
    match a.status {
        StatusCode::CREATED => Verdict::Done(PostOutcome::Created {
            location: header(LOCATION.as_str()),
        }),
        StatusCode::ACCEPTED => Verdict::Done(PostOutcome::Accepted {
            operation_location: header("operation-location"),
        }),
        StatusCode::BAD_REQUEST => {
            let v = vendor_answer(a);
            let mut reasons = v.reasons;
            if reasons.is_empty() {
                reasons.extend(v.message);
            }
            Verdict::Fail(ErrorKind::Rejected { reasons })
        }
        // Protime refuses this clocking for good (404: what it refers to does not exist, 409:
        // conflicts with what Protime holds, 422: a business rule). Sending it again cannot
        // succeed; the whole answer is the reason. A 404 without Protime's error envelope is not
        // Protime speaking (a wrong base URL, a proxy): a configuration problem, not a verdict on
        // this clocking.
        StatusCode::NOT_FOUND | StatusCode::CONFLICT | StatusCode::UNPROCESSABLE_ENTITY
            if a.status != StatusCode::NOT_FOUND || has_error_envelope(a) =>
        {
            Verdict::Fail(ErrorKind::Rejected {
                reasons: vec![vendor_answer(a).to_string()],
            })
        }
        // A 5xx or a 408 answers for whatever sits in front of the backend (Protime's gateway,
        // a reverse proxy): the backend may have stored the clocking after, or while, the proxy
        // gave up. In doubt, like a lost answer: never a blind retry of the POST.
        s if s.is_server_error() || s == StatusCode::REQUEST_TIMEOUT => {
            Verdict::Fail(ErrorKind::AnswerLost {
                detail: format!("{}", vendor_answer(a)),
            })
        }
        // A success status we do not know (a proxy's 200 page...): we cannot tell whether the
        // clocking was stored, so it is treated like a lost answer.
        s if s.is_success() => Verdict::Fail(ErrorKind::AnswerLost {
            detail: format!("unexpected HTTP {} answer: {}", s.as_u16(), a.snippet()),
        }),
        _ => by_status(a, vendor_answer(a)),
    }
}

/// Whether the body is Protime's `{"error":{..}}` envelope (or its `validationErrors`).
fn has_error_envelope(a: &Answer) -> bool {
    serde_json::from_slice::<Value>(&a.body)
        .is_ok_and(|v| v["error"].is_object() || v.get("validationErrors").is_some())
}

/// The scope a refused call needs: what to grant when Protime answers 401/403 (or the token
/// endpoint `invalid_scope`) for it. `None` for calls this module does not make.
pub fn scope_for_call(call: &str) -> Option<&'static str> {
    match call {
        CALL_POST_CLOCKING => Some(SCOPE_CLOCKINGS_WRITE),
        CALL_FIND_CLOCKING => Some(SCOPE_CLOCKINGS_READ),
        CALL_ACCESS_INITIAL | CALL_ACCESS_DELTA => Some(SCOPE_ACCESS_CLOCKINGS_READ),
        CALL_PEOPLE => Some(SCOPE_PEOPLE_READ),
        _ => None,
    }
}

/// Protime's error body: `{"error":{"code","message","reasons"}}`, OAuth's
/// `{"error":"..","error_description":".."}` or `{"validationErrors":..}`; otherwise the start of
/// the body.
fn vendor_answer(a: &Answer) -> VendorAnswer {
    let mut v = VendorAnswer {
        status: a.status.as_u16(),
        ..VendorAnswer::default()
    };
    let Ok(body) = serde_json::from_slice::<Value>(&a.body) else {
        if !a.body.is_empty() {
            v.message = Some(a.snippet());
        }
        return v;
    };
    match &body["error"] {
        Value::Object(e) => {
            v.code = e.get("code").and_then(Value::as_str).map(str::to_string);
            v.message = e.get("message").and_then(Value::as_str).map(str::to_string);
            v.reasons = strings(e.get("reasons").unwrap_or(&Value::Null));
        }
        Value::String(code) => {
            v.code = Some(code.clone());
            v.message = body["error_description"].as_str().map(str::to_string);
        }
        _ => {}
    }
    if let Some(errors) = body.get("validationErrors") {
        v.code.get_or_insert_with(|| "validationErrors".into());
        v.reasons.extend(validation_reasons(errors));
    }
    v
}

/// `validationErrors` as `field: message` lines (a map of field → messages, or a plain list).
fn validation_reasons(errors: &Value) -> Vec<String> {
    match errors {
        Value::Object(map) => map
            .iter()
            .flat_map(|(field, msgs)| {
                let msgs = strings(msgs);
                if msgs.is_empty() {
                    vec![field.clone()]
                } else {
                    msgs.into_iter().map(|m| format!("{field}: {m}")).collect()
                }
            })
            .collect(),
        other => strings(other),
    }
}

fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::Null => vec![],
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect(),
        other => vec![other.to_string()],
    }
}

#[derive(Deserialize)]
pub(crate) struct Page {
    pub value: Vec<Value>,
    #[serde(rename = "nextLink")]
    pub next_link: Option<String>,
    #[serde(rename = "deltaLink")]
    pub delta_link: Option<String>,
}

#[derive(Deserialize, Default)]
struct ExtRefs {
    #[serde(rename = "@badge-number")]
    badge_number: Option<String>,
    #[serde(rename = "@employee-number")]
    employee_number: Option<String>,
    #[serde(rename = "@external-code")]
    external_code: Option<String>,
}

#[derive(Deserialize, Default)]
struct RefItem {
    id: Option<i64>,
    #[serde(rename = "externalReferences", default)]
    external_references: ExtRefs,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PersonItem {
    id: i64,
    first_name: Option<String>,
    last_name: Option<String>,
    #[serde(default)]
    external_references: ExtRefs,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ClockingItem {
    id: i64,
    #[serde(default)]
    person: Option<RefItem>,
    date: NaiveDate,
    time_of_day_in_minutes: i32,
    #[serde(default)]
    original_time_of_day_in_minutes: Option<i32>,
    kind: ClockingKind,
    #[serde(default)]
    terminal: Option<RefItem>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AccessItem {
    id: i64,
    change_version: String,
    #[serde(default)]
    person: Option<RefItem>,
    date: NaiveDate,
    time_of_day_in_minutes: u16,
    #[serde(default)]
    terminal: Option<RefItem>,
    status: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ClockingBody {
    person: Value,
    date: String,
    time_of_day_in_minutes: i32,
    kind: ClockingKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    terminal: Option<Value>,
}

impl From<&ProtimeClocking> for ClockingBody {
    fn from(c: &ProtimeClocking) -> Self {
        ClockingBody {
            person: match &c.person {
                PersonRef::Id(id) => serde_json::json!({ "id": id }),
                PersonRef::BadgeNumber(b) => {
                    serde_json::json!({ "externalReferences": { "@badge-number": b } })
                }
                PersonRef::EmployeeNumber(n) => {
                    serde_json::json!({ "externalReferences": { "@employee-number": n } })
                }
            },
            date: c.date.format("%Y-%m-%d").to_string(),
            time_of_day_in_minutes: c.time_of_day_in_minutes,
            kind: c.kind,
            terminal: c.terminal.as_ref().map(|t| match t {
                TerminalRef::Id(id) => serde_json::json!({ "id": id }),
                TerminalRef::ExternalCode(code) => {
                    serde_json::json!({ "externalReferences": { "@external-code": code } })
                }
            }),
        }
    }
}

pub(crate) fn parse_person(item: Value) -> Result<ProtimePerson, String> {
    let p = serde_json::from_value::<PersonItem>(item).map_err(|e| format!("person item: {e}"))?;
    Ok(ProtimePerson {
        id: p.id,
        badge_number: p.external_references.badge_number,
        first_name: p.first_name,
        last_name: p.last_name,
    })
}

pub(crate) fn parse_clocking(item: &Value) -> Result<RemoteClocking, String> {
    let c = ClockingItem::deserialize(item).map_err(|e| format!("clocking item: {e}"))?;
    let person = c.person.unwrap_or_default();
    let terminal = c.terminal.unwrap_or_default();
    Ok(RemoteClocking {
        id: c.id,
        person_id: person.id,
        badge_number: person.external_references.badge_number,
        employee_number: person.external_references.employee_number,
        date: c.date,
        time_of_day_in_minutes: c.time_of_day_in_minutes,
        original_time_of_day_in_minutes: c.original_time_of_day_in_minutes,
        kind: c.kind,
        terminal_id: terminal.id,
        terminal_code: terminal.external_references.external_code,
    })
}

/// Whether a listed clocking is the one we (may have) posted.
fn is_same_clocking(c: &ProtimeClocking, r: &RemoteClocking) -> bool {
    let person = match &c.person {
        PersonRef::Id(id) => r.person_id == Some(*id),
        PersonRef::BadgeNumber(b) => r.badge_number.as_deref() == Some(b.as_str()),
        PersonRef::EmployeeNumber(n) => r.employee_number.as_deref() == Some(n.as_str()),
    };
    let terminal = match &c.terminal {
        None => true,
        Some(TerminalRef::Id(id)) => r.terminal_id == Some(*id),
        Some(TerminalRef::ExternalCode(code)) => r.terminal_code.as_deref() == Some(code.as_str()),
    };
    let at = c.absolute_minute();
    let instant = absolute_minute(r.date, r.time_of_day_in_minutes) == at
        || r.original_time_of_day_in_minutes
            .is_some_and(|m| absolute_minute(r.date, m) == at);
    person && terminal && instant && r.kind == c.kind
}

/// A plain item (initial round) or a `{"changeType","data"}` wrapper (deltaLink rounds).
pub(crate) fn parse_access_item(item: &Value) -> Result<AccessChange, String> {
    let Some(change_type) = item.get("changeType") else {
        return parse_access_clocking(item).map(AccessChange::Upsert);
    };
    let data = &item["data"];
    match change_type.as_str() {
        Some("InsertOrUpdate") => parse_access_clocking(data).map(AccessChange::Upsert),
        Some("Delete") => {
            let id = data["id"].as_i64();
            let version = data["changeVersion"].as_str();
            match (id, version) {
                (Some(id), Some(v)) => Ok(AccessChange::Delete {
                    id,
                    change_version: v.to_string(),
                }),
                _ => Err(format!("Delete change without id/changeVersion: {data}")),
            }
        }
        _ => Err(format!("unknown changeType {change_type}")),
    }
}

fn parse_access_clocking(v: &Value) -> Result<AccessClocking, String> {
    let a = AccessItem::deserialize(v).map_err(|e| format!("access clocking item: {e}"))?;
    // An unknown status is an error rather than a guess: the mirror feeds access decisions.
    let status = a
        .status
        .parse::<AccessStatus>()
        .map_err(|()| format!("access clocking {}: unknown status {:?}", a.id, a.status))?;
    if a.time_of_day_in_minutes > 1439 {
        return Err(format!(
            "access clocking {}: timeOfDayInMinutes {} outside 0..1439",
            a.id, a.time_of_day_in_minutes
        ));
    }
    let person = a.person.unwrap_or_default();
    let terminal = a.terminal.unwrap_or_default();
    Ok(AccessClocking {
        id: a.id,
        change_version: a.change_version,
        person_id: person.id,
        badge_number: person.external_references.badge_number,
        date: a.date,
        time_of_day_in_minutes: a.time_of_day_in_minutes,
        terminal_id: terminal.id,
        terminal_code: terminal.external_references.external_code,
        status,
    })
}

#[cfg(all(test, feature = "kit"))]
pub(crate) mod tests {
    use super::*;
    use crate::kit::fakes::protime::{
        self as fake, endpoint, AccessClockingSpec, FakeProtime, PostAnswer, ProtimeControl,
    };
    use crate::kit::fakes::Fault;
    use std::time::Instant;

    /// Short pacing so tests run fast; the logic is the production one.
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

    pub(crate) fn config(fake: &FakeProtime, secret: &str) -> ProtimeConfig {
        ProtimeConfig {
            base_url: fake.base_url(),
            token_url: fake.token_url(),
            client_id: fake::DEFAULT_CLIENT_ID.into(),
            client_secret: Secret::new(secret),
            timezone: chrono_tz::Europe::Brussels,
            mirror: true,
            mirror_interval_secs: 60,
            mirror_days: 7,
            people_interval_secs: 3600,
            retry_max_secs: 60,
            person_ref: crate::config::ProtimePersonRef::BadgeNumber,
        }
    }

    pub(crate) async fn start() -> (FakeProtime, ProtimeControl) {
        let fake = FakeProtime::start("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("fake protime");
        let ctl = fake.control();
        for (id, badge) in [(1, "6767676"), (2, "1111"), (3, "2222")] {
            ctl.add_person(fake::Person {
                id,
                badge_number: badge.into(),
                employee_number: format!("E{id}"),
                first_name: format!("First{id}"),
                last_name: format!("Last{id}"),
            });
        }
        ctl.add_terminal(fake::Terminal {
            id: 7,
            external_code: "gate-north".into(),
        });
        (fake, ctl)
    }

    fn client_for(fake: &FakeProtime, opts: HttpOptions) -> ProtimeClient {
        ProtimeClient::new(&config(fake, fake::DEFAULT_CLIENT_SECRET), opts).expect("client")
    }

    fn day(s: &str) -> NaiveDate {
        NaiveDate::parse_from_str(s, "%Y-%m-%d").expect("date")
    }

    pub(crate) fn clocking(badge: &str, minutes: i32) -> ProtimeClocking {
        ProtimeClocking {
            person: PersonRef::BadgeNumber(badge.into()),
            date: day("2026-03-02"),
            time_of_day_in_minutes: minutes,
            kind: ClockingKind::InOut,
            terminal: Some(TerminalRef::ExternalCode("gate-north".into())),
        }
    }

    fn access(person_id: i64, date: &str, minutes: u16) -> AccessClockingSpec {
        AccessClockingSpec {
            person_id,
            date: day(date),
            time_of_day_in_minutes: minutes,
            terminal_id: 7,
            status: fake::AccessStatus::AccessOk,
        }
    }

    #[tokio::test]
    async fn posts_clockings_with_user_agent_and_one_token() {
        let (fake, ctl) = start().await;
        let client = client_for(&fake, fast_options());
        let out = client
            .post_clocking(&clocking("6767676", 480))
            .await
            .expect("post");
        let PostOutcome::Created {
            location: Some(loc),
        } = out
        else {
            panic!("expected 201 with Location, got {out:?}");
        };
        assert!(loc.contains("/clockings/"), "{loc}");
        client
            .post_clocking(&ProtimeClocking {
                person: PersonRef::Id(2),
                terminal: Some(TerminalRef::Id(7)),
                ..clocking("x", 490)
            })
            .await
            .expect("post by ids");
        let stored = ctl.clockings();
        assert_eq!(stored.len(), 2);
        assert_eq!(
            (stored[0].person_id, stored[0].time_of_day_in_minutes),
            (1, 480)
        );
        assert_eq!(stored[0].terminal_id, Some(7));
        assert_eq!(stored[1].person_id, 2);
        assert_eq!(ctl.token_requests(), 1, "the token is reused");
        let log = ctl.wire().log();
        assert!(log.iter().all(|r| r
            .headers
            .iter()
            .any(|(k, v)| k == "user-agent" && v == crate::clouds::USER_AGENT)));
        let token_req = log
            .iter()
            .find(|r| r.endpoint == endpoint::TOKEN)
            .expect("token request");
        assert!(token_req.body.contains("grant_type=client_credentials"));
        assert!(token_req
            .body
            .contains("connector-protimeapi-clockings.write"));

        ctl.set_post_answer(PostAnswer::Accepted);
        let out = client
            .post_clocking(&clocking("1111", 500))
            .await
            .expect("202");
        assert!(matches!(
            out,
            PostOutcome::Accepted {
                operation_location: Some(_)
            }
        ));
        fake.shutdown().await;
    }

    #[tokio::test]
    async fn expired_token_means_exactly_one_new_login() {
        let (fake, ctl) = start().await;
        let client = client_for(&fake, fast_options());
        client
            .post_clocking(&clocking("6767676", 480))
            .await
            .expect("first");
        ctl.expire_tokens();
        client
            .post_clocking(&clocking("6767676", 481))
            .await
            .expect("after expiry");
        assert_eq!(ctl.token_requests(), 2);
        // first POST, the one refused with 401, its single repetition.
        assert_eq!(ctl.wire().count(endpoint::POST_CLOCKINGS), 3);
        assert_eq!(ctl.clockings().len(), 2);
        fake.shutdown().await;
    }

    #[tokio::test]
    async fn rejected_credentials_are_an_auth_error_without_retry_storm() {
        let (fake, ctl) = start().await;
        let client =
            ProtimeClient::new(&config(&fake, "wrong-secret"), fast_options()).expect("client");
        let err = client
            .post_clocking(&clocking("6767676", 480))
            .await
            .expect_err("bad secret");
        assert!(
            matches!(&err.kind, ErrorKind::Auth(a) if a.code.as_deref() == Some("invalid_client")),
            "{err}"
        );
        assert_eq!(ctl.token_requests(), 1);
        assert_eq!(ctl.wire().count(endpoint::POST_CLOCKINGS), 0);
        fake.shutdown().await;
    }

    #[tokio::test]
    async fn validation_errors_are_rejections_with_reasons() {
        let (fake, ctl) = start().await;
        let client = client_for(&fake, fast_options());
        let err = client
            .post_clocking(&clocking("no-such-badge", 480))
            .await
            .expect_err("unknown badge");
        let ErrorKind::Rejected { reasons } = &err.kind else {
            panic!("expected Rejected, got {err}");
        };
        assert!(
            reasons.iter().any(|r| r.contains("no-such-badge")),
            "{reasons:?}"
        );
        assert_eq!(err.api, Api::Protime);
        assert_eq!(err.call, "POST /clockings");
        assert!(!err.is_transient());
        assert_eq!(ctl.wire().count(endpoint::POST_CLOCKINGS), 1, "not retried");
        fake.shutdown().await;
    }

    #[tokio::test]
    async fn retry_after_is_honoured_on_429() {
        let (fake, ctl) = start().await;
        let client = client_for(&fake, fast_options());
        ctl.wire().fail_next_on(
            endpoint::POST_CLOCKINGS,
            1,
            Fault::RateLimited {
                retry_after_secs: 1,
            },
        );
        let started = Instant::now();
        client
            .post_clocking(&clocking("6767676", 480))
            .await
            .expect("after retry");
        assert!(started.elapsed() >= Duration::from_secs(1));
        assert_eq!(ctl.wire().count(endpoint::POST_CLOCKINGS), 2);
        assert_eq!(ctl.clockings().len(), 1);

        // A Retry-After beyond max_retry_after goes back to the caller at once.
        ctl.wire().fail_next_on(
            endpoint::POST_CLOCKINGS,
            1,
            Fault::RateLimited {
                retry_after_secs: 3600,
            },
        );
        let err = client
            .post_clocking(&clocking("6767676", 481))
            .await
            .expect_err("too long");
        assert!(
            matches!(err.kind, ErrorKind::RateLimited { retry_after: Some(d), .. } if d == Duration::from_secs(3600)),
            "{err}"
        );
        assert!(err.is_transient());
        assert_eq!(ctl.wire().count(endpoint::POST_CLOCKINGS), 3);
        fake.shutdown().await;
    }

    #[tokio::test]
    async fn requests_are_spaced_by_the_rate_limiter() {
        let (fake, ctl) = start().await;
        ctl.set_page_size(1);
        let client = client_for(
            &fake,
            HttpOptions {
                min_interval: Duration::from_millis(150),
                ..fast_options()
            },
        );
        let started = Instant::now();
        let people = client.people().await.expect("people");
        assert_eq!(people.len(), 3);
        // token + 3 pages, 150 ms apart, and nothing more.
        assert!(started.elapsed() >= Duration::from_millis(450));
        assert_eq!(ctl.wire().total(), 4);
        fake.shutdown().await;
    }

    #[tokio::test]
    async fn a_5xx_or_408_on_the_post_is_in_doubt_and_never_reposted() {
        let (fake, ctl) = start().await;
        let client = client_for(&fake, fast_options());
        // A proxy's 502/504/408 after the backend stored it, and Protime's own 500/503.
        ctl.fail_post(1, fake::PostFault::StoreThenAnswer(502));
        ctl.fail_post(2, fake::PostFault::StoreThenAnswer(504));
        ctl.fail_post(3, fake::PostFault::StoreThenAnswer(408));
        for (i, want) in [502, 504, 408].into_iter().enumerate() {
            let c = clocking("6767676", 480 + i as i32);
            let err = client.post_clocking(&c).await.expect_err("in doubt");
            assert!(err.may_have_landed(), "{err}");
            assert!(err.to_string().contains(&want.to_string()), "{err}");
            assert_eq!(client.find_clocking(&c).await.expect("lookup").len(), 1);
        }
        ctl.wire()
            .fail_next_on(endpoint::POST_CLOCKINGS, 1, Fault::InternalError);
        ctl.wire()
            .fail_next_on(endpoint::POST_CLOCKINGS, 1, Fault::Unavailable);
        for _ in 0..2 {
            let err = client
                .post_clocking(&clocking("1111", 600))
                .await
                .expect_err("in doubt");
            assert!(err.may_have_landed(), "{err}");
        }
        assert_eq!(
            ctl.wire().count(endpoint::POST_CLOCKINGS),
            5,
            "one POST each"
        );
        assert_eq!(ctl.clockings().len(), 3, "the proxy's victims were stored");
        // 429 says "not processed": that one is retried in place.
        ctl.wire().fail_next_on(
            endpoint::POST_CLOCKINGS,
            1,
            Fault::RateLimited {
                retry_after_secs: 0,
            },
        );
        client
            .post_clocking(&clocking("1111", 600))
            .await
            .expect("after 429");
        assert_eq!(ctl.wire().count(endpoint::POST_CLOCKINGS), 7);

        ctl.wire()
            .fail_next_on(endpoint::PEOPLE, 100, Fault::Unavailable);
        let err = client.people().await.expect_err("persistent 503");
        assert!(
            matches!(&err.kind, ErrorKind::Vendor(a) if a.status == 503),
            "{err}"
        );
        assert!(err.is_transient());
        assert_eq!(ctl.wire().count(endpoint::PEOPLE), 4, "max_attempts");
        ctl.wire().clear_faults();
        fake.shutdown().await;
    }

    #[tokio::test]
    async fn a_reset_after_the_post_was_stored_is_in_doubt() {
        let (fake, ctl) = start().await;
        let client = client_for(&fake, fast_options());
        ctl.fail_post(2, fake::PostFault::StoreThenReset);
        client
            .post_clocking(&clocking("6767676", 480))
            .await
            .expect("first");
        let c = clocking("6767676", 481);
        let err = client.post_clocking(&c).await.expect_err("reset");
        assert!(err.may_have_landed(), "{err}");
        assert_eq!(client.find_clocking(&c).await.expect("lookup").len(), 1);
        assert_eq!(ctl.clockings().len(), 2);
        fake.shutdown().await;
    }

    #[tokio::test]
    async fn permanent_refusals_are_rejected_with_protimes_reason() {
        let (fake, ctl) = start().await;
        let client = client_for(&fake, fast_options());
        for status in [404, 409, 422] {
            ctl.refuse_badge("1111", status);
            let err = client
                .post_clocking(&clocking("1111", 600))
                .await
                .expect_err("refused");
            let ErrorKind::Rejected { reasons } = &err.kind else {
                panic!("{status}: {err}");
            };
            let reason = reasons.join("; ");
            assert!(reason.contains(&format!("HTTP {status}")), "{reason}");
            assert!(
                reason.contains("clocking"),
                "Protime's reason kept: {reason}"
            );
        }
        assert_eq!(ctl.wire().count(endpoint::POST_CLOCKINGS), 3, "not retried");
        assert!(ctl.clockings().is_empty());
        fake.shutdown().await;
    }

    #[test]
    fn a_404_without_protimes_envelope_is_not_a_verdict_on_the_clocking() {
        let answer = |body: &'static str| Answer {
            status: StatusCode::NOT_FOUND,
            headers: Default::default(),
            body: bytes::Bytes::from_static(body.as_bytes()),
        };
        assert!(matches!(
            parse_post_answer(&answer("<html>Not Found</html>")),
            Verdict::Fail(ErrorKind::Vendor(_))
        ));
        assert!(matches!(
            parse_post_answer(&answer(r#"{"error":{"code":"NotFound","message":"m"}}"#)),
            Verdict::Fail(ErrorKind::Rejected { .. })
        ));
    }

    #[tokio::test]
    async fn a_missing_scope_is_an_auth_error_of_the_call_that_needs_it() {
        let (fake, ctl) = start().await;
        let client = client_for(&fake, fast_options());
        ctl.withhold_scope(fake::SCOPE_CLOCKINGS_WRITE, 401);
        let err = client
            .post_clocking(&clocking("1111", 600))
            .await
            .expect_err("no scope");
        assert!(matches!(err.kind, ErrorKind::Auth(_)), "{err}");
        assert_eq!(scope_for_call(err.call), Some(SCOPE_CLOCKINGS_WRITE));
        // A 401 means one fresh login and one more try, no more.
        assert_eq!(ctl.wire().count(endpoint::POST_CLOCKINGS), 2);
        assert!(ctl.clockings().is_empty());
        fake.shutdown().await;
    }

    #[tokio::test]
    async fn the_lookup_finds_redated_clockings_and_every_same_minute_one() {
        let (fake, ctl) = start().await;
        let client = client_for(&fake, fast_options());
        // 00:30 on 2 March, booked by the schedule on 1 March at minute 1470.
        ctl.set_overnight_until(Some(360));
        let night = clocking("6767676", 30);
        client.post_clocking(&night).await.expect("post");
        let stored = ctl.clockings();
        assert_eq!(
            (stored[0].date, stored[0].time_of_day_in_minutes),
            (day("2026-03-01"), 1470)
        );
        assert_eq!(client.find_clocking(&night).await.expect("find").len(), 1);
        let last = ctl.wire().log().last().cloned().expect("logged");
        assert!(last.uri.contains("2026-03-01"), "{}", last.uri);
        // Two identical clockings of one minute are both listed: the caller counts.
        ctl.set_overnight_until(None);
        let day_shift = clocking("6767676", 480);
        client.post_clocking(&day_shift).await.expect("in");
        client.post_clocking(&day_shift).await.expect("out");
        assert_eq!(
            client.find_clocking(&day_shift).await.expect("find").len(),
            2
        );
        fake.shutdown().await;
    }

    #[tokio::test]
    async fn garbage_answers_are_clear_errors() {
        let (fake, ctl) = start().await;
        let client = client_for(&fake, fast_options());
        ctl.wire()
            .fail_next_on(endpoint::PEOPLE, 1, Fault::GarbageBody);
        let err = client.people().await.expect_err("garbage");
        assert!(matches!(err.kind, ErrorKind::Malformed { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("GET /people"), "{text}");
        assert!(text.contains("502 Bad Gateway"), "{text}");
        // A 200 page instead of 201 on the POST cannot prove anything was stored or not.
        ctl.wire()
            .fail_next_on(endpoint::POST_CLOCKINGS, 1, Fault::GarbageBody);
        let err = client
            .post_clocking(&clocking("6767676", 480))
            .await
            .expect_err("garbage");
        assert!(err.may_have_landed(), "{err}");
        fake.shutdown().await;
    }

    #[tokio::test]
    async fn a_lost_answer_is_found_instead_of_posted_twice() {
        let (fake, ctl) = start().await;
        let client = client_for(&fake, fast_options());
        let c = clocking("6767676", 480);
        ctl.wire()
            .fail_next_on(endpoint::POST_CLOCKINGS, 1, Fault::ProcessThenDrop);
        let err = client.post_clocking(&c).await.expect_err("answer lost");
        assert!(matches!(err.kind, ErrorKind::AnswerLost { .. }), "{err}");
        assert!(err.may_have_landed());
        assert_eq!(
            ctl.wire().count(endpoint::POST_CLOCKINGS),
            1,
            "never re-sent"
        );
        // What a sink does next: look before re-sending.
        let found = client.find_clocking(&c).await.expect("lookup");
        let [found] = found.as_slice() else {
            panic!("the clocking landed once: {found:?}");
        };
        assert_eq!(found.badge_number.as_deref(), Some("6767676"));
        assert_eq!(found.terminal_code.as_deref(), Some("gate-north"));
        assert_eq!(ctl.clockings().len(), 1, "exactly one stored");
        // A different minute is not the same clocking.
        assert_eq!(
            client.find_clocking(&clocking("6767676", 481)).await,
            Ok(vec![])
        );
        // By person id the filter names the person.
        let by_id = ProtimeClocking {
            person: PersonRef::Id(1),
            terminal: Some(TerminalRef::Id(7)),
            ..c.clone()
        };
        assert_eq!(client.find_clocking(&by_id).await.expect("by id").len(), 1);
        let last = ctl.wire().log().last().cloned().expect("logged");
        assert!(last.uri.contains("person+in+%281%29"), "{}", last.uri);
        fake.shutdown().await;
    }

    #[tokio::test]
    async fn an_employee_number_clocking_is_posted_and_looked_up_by_employee_number() {
        let (fake, ctl) = start().await;
        let client = client_for(&fake, fast_options());
        // Person 1: badge 6767676, employee number E1.
        let c = ProtimeClocking {
            person: PersonRef::EmployeeNumber("E1".into()),
            ..clocking("6767676", 480)
        };
        client.post_clocking(&c).await.expect("posted");
        let posted = ctl.wire().log().last().cloned().expect("logged");
        let body: Value = serde_json::from_str(&posted.body).expect("json");
        assert_eq!(
            body["person"],
            serde_json::json!({"externalReferences": {"@employee-number": "E1"}})
        );
        assert_eq!(ctl.clockings()[0].person_id, 1);
        let found = client.find_clocking(&c).await.expect("lookup");
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].employee_number.as_deref(), Some("E1"));
        let lookup = ctl.wire().log().last().cloned().expect("logged");
        assert!(lookup.uri.contains("employee-number"), "{}", lookup.uri);
        // Another person's employee number, or the badge value taken as one, is not a match.
        for other in ["E2", "6767676"] {
            let c = ProtimeClocking {
                person: PersonRef::EmployeeNumber(other.into()),
                ..c.clone()
            };
            assert_eq!(client.find_clocking(&c).await, Ok(vec![]), "{other}");
        }
        fake.shutdown().await;
    }

    #[tokio::test]
    async fn a_timeout_after_sending_is_an_answer_lost_too() {
        let (fake, ctl) = start().await;
        let client = client_for(
            &fake,
            HttpOptions {
                timeout: Duration::from_millis(300),
                ..fast_options()
            },
        );
        client.people().await.expect("warm up the token");
        let c = clocking("1111", 600);
        ctl.wire().fail_next_on(
            endpoint::POST_CLOCKINGS,
            1,
            Fault::SlowAnswer(Duration::from_secs(2)),
        );
        let err = client.post_clocking(&c).await.expect_err("timeout");
        assert!(err.may_have_landed(), "{err}");
        assert_eq!(client.find_clocking(&c).await.expect("lookup").len(), 1);
        assert_eq!(ctl.clockings().len(), 1);
        assert_eq!(ctl.wire().count(endpoint::POST_CLOCKINGS), 1);
        fake.shutdown().await;
    }

    #[tokio::test]
    async fn the_uplink_down_then_back_delivers_exactly_once() {
        let (fake, ctl) = start().await;
        let client = client_for(&fake, fast_options());
        client.people().await.expect("token");
        let c = clocking("6767676", 480);
        ctl.wire().set_outage(true);
        let err = client.post_clocking(&c).await.expect_err("down");
        // Refused connections are plainly transient; a connection cut after the request was
        // written cannot be told apart from a lost answer, so it is reported as one.
        assert!(err.is_transient() || err.may_have_landed(), "{err}");
        ctl.wire().set_outage(false);
        if err.may_have_landed() {
            assert_eq!(client.find_clocking(&c).await, Ok(vec![]));
        }
        client.post_clocking(&c).await.expect("back up");
        assert_eq!(ctl.clockings().len(), 1);
        fake.shutdown().await;
    }

    #[tokio::test]
    async fn find_follows_next_links_across_empty_pages() {
        let (fake, ctl) = start().await;
        let client = client_for(&fake, fast_options());
        for m in 0..5 {
            client
                .post_clocking(&clocking("2222", 400 + m))
                .await
                .expect("post");
        }
        ctl.set_page_size(2);
        ctl.set_empty_pages(2);
        ctl.set_absolute_links(true);
        let found = client
            .find_clocking(&clocking("2222", 404))
            .await
            .expect("find");
        let minutes: Vec<i32> = found.iter().map(|f| f.time_of_day_in_minutes).collect();
        assert_eq!(minutes, vec![404]);
        // 3 data pages, each preceded by 2 empty ones.
        assert_eq!(ctl.wire().count(endpoint::GET_CLOCKINGS), 9);
        fake.shutdown().await;
    }

    #[tokio::test]
    async fn access_clockings_delta_round_trip() {
        let (fake, ctl) = start().await;
        ctl.set_page_size(2);
        ctl.set_empty_pages(1);
        ctl.set_spell_unknown_badge_number(true);
        let a = ctl.add_access_clocking(access(1, "2026-03-02", 480));
        let b = ctl.add_access_clocking(access(2, "2026-03-02", 490));
        let c = ctl.add_access_clocking(AccessClockingSpec {
            status: fake::AccessStatus::UnknownBadge,
            ..access(3, "2026-03-02", 500)
        });
        ctl.add_access_clocking(access(1, "2026-02-01", 100)); // before `from`
        let client = client_for(&fake, fast_options());

        let initial = client
            .access_clockings_initial(day("2026-03-01"))
            .await
            .expect("initial");
        let mut held = BTreeMap::new();
        let applied = apply_access_changes(&mut held, initial.changes);
        assert_eq!(
            applied,
            vec![
                Applied::Inserted(a),
                Applied::Inserted(b),
                Applied::Inserted(c)
            ]
        );
        let HeldAccess::Live(first) = &held[&a] else {
            panic!("live");
        };
        assert_eq!(first.badge_number.as_deref(), Some("6767676"));
        assert_eq!(first.terminal_code.as_deref(), Some("gate-north"));
        let HeldAccess::Live(unknown) = &held[&c] else {
            panic!("live");
        };
        assert_eq!(unknown.status, AccessStatus::UnknownBadge);
        // 2 data pages, each after one empty page.
        assert_eq!(ctl.wire().count(endpoint::ACCESS_CLOCKINGS), 4);

        // Changes: an update, a delete, a new one, and a stale re-send of the old version.
        assert!(ctl.update_access_clocking(a, access(1, "2026-03-02", 481)));
        assert!(ctl.delete_access_clocking(b));
        let d = ctl.add_access_clocking(access(2, "2026-03-03", 10));
        assert!(ctl.resend_stale_access_clocking(a));
        let mut link = initial.delta_link;
        let mut applied = Vec::new();
        // Each deltaLink answer is one page (page size 2): read until no change is left.
        loop {
            let delta = client.access_clockings_delta(&link).await.expect("delta");
            link = delta.delta_link;
            if delta.changes.is_empty() {
                break;
            }
            applied.extend(apply_access_changes(&mut held, delta.changes));
        }
        assert_eq!(
            applied,
            vec![
                Applied::Updated(a),
                Applied::Deleted(b),
                Applied::Inserted(d),
                Applied::Stale(a)
            ]
        );
        let HeldAccess::Live(updated) = &held[&a] else {
            panic!("live");
        };
        assert_eq!(updated.time_of_day_in_minutes, 481, "stale version ignored");
        assert!(matches!(held[&b], HeldAccess::Deleted { .. }));

        // 409: another delta is active → DeltaBusy, not retried here.
        ctl.set_delta_conflicts(1);
        let before = ctl.wire().count(endpoint::DELTA_ACCESS_CLOCKINGS);
        let err = client
            .access_clockings_delta(&link)
            .await
            .expect_err("busy");
        assert_eq!(err.kind, ErrorKind::DeltaBusy);
        assert!(err.is_transient());
        assert_eq!(
            ctl.wire().count(endpoint::DELTA_ACCESS_CLOCKINGS),
            before + 1
        );
        client
            .access_clockings_delta(&link)
            .await
            .expect("after backing off");

        // 410: the token expired → DeltaExpired; a new initial round works.
        ctl.expire_delta_tokens();
        let err = client
            .access_clockings_delta(&link)
            .await
            .expect_err("gone");
        assert_eq!(err.kind, ErrorKind::DeltaExpired);
        assert!(!err.is_transient());
        let resync = client
            .access_clockings_initial(day("2026-03-01"))
            .await
            .expect("re-sync");
        assert_eq!(resync.changes.len(), 3);
        fake.shutdown().await;
    }

    #[tokio::test]
    async fn people_give_the_badge_map() {
        let (fake, ctl) = start().await;
        ctl.set_page_size(2);
        ctl.set_empty_pages(1);
        let client = client_for(&fake, fast_options());
        let people = client.people().await.expect("people");
        assert_eq!(people.len(), 3);
        let map = badge_map(&people);
        assert_eq!(map.get("6767676"), Some(&1));
        assert_eq!(map.get("2222"), Some(&3));
        fake.shutdown().await;
    }

    #[tokio::test]
    async fn links_to_another_host_are_not_followed() {
        let (fake, _ctl) = start().await;
        let client = client_for(&fake, fast_options());
        let err = client
            .access_clockings_delta("http://203.0.113.9/delta/access-clockings?deltaToken=x")
            .await
            .expect_err("foreign link");
        assert!(matches!(err.kind, ErrorKind::Malformed { .. }), "{err}");
        fake.shutdown().await;
    }

    fn held(id: i64, version: &str, minutes: u16) -> AccessChange {
        AccessChange::Upsert(AccessClocking {
            id,
            change_version: version.into(),
            person_id: Some(1),
            badge_number: None,
            date: day("2026-03-02"),
            time_of_day_in_minutes: minutes,
            terminal_id: Some(7),
            terminal_code: None,
            status: AccessStatus::AccessOk,
        })
    }

    #[test]
    fn apply_ignores_stale_versions_and_keeps_tombstones() {
        let mut map = BTreeMap::new();
        let applied = apply_access_changes(
            &mut map,
            vec![
                held(1, "0005", 10),
                held(1, "0004", 11),
                held(1, "0005", 12),
                AccessChange::Delete {
                    id: 1,
                    change_version: "0007".into(),
                },
                held(1, "0006", 13),
                held(1, "0008", 14),
                AccessChange::Delete {
                    id: 2,
                    change_version: "0001".into(),
                },
            ],
        );
        assert_eq!(
            applied,
            vec![
                Applied::Inserted(1),
                Applied::Stale(1),
                Applied::Stale(1),
                Applied::Deleted(1),
                Applied::Stale(1),
                Applied::Inserted(1),
                Applied::Deleted(2),
            ]
        );
        assert!(matches!(&map[&1], HeldAccess::Live(a) if a.time_of_day_in_minutes == 14));
    }

    #[test]
    fn access_items_parse_both_shapes_and_reject_nonsense() {
        let plain = serde_json::json!({"changeVersion":"01","id":5,"person":{"id":1},
            "date":"2026-03-02","timeOfDayInMinutes":5,"terminal":{"id":7},"status":"UnknownBadgeNumber"});
        let Ok(AccessChange::Upsert(a)) = parse_access_item(&plain) else {
            panic!("plain item");
        };
        assert_eq!(a.status, AccessStatus::UnknownBadge);
        let wrapped =
            serde_json::json!({"changeType":"Delete","data":{"id":5,"changeVersion":"02"}});
        assert_eq!(
            parse_access_item(&wrapped),
            Ok(AccessChange::Delete {
                id: 5,
                change_version: "02".into()
            })
        );
        let mut bad_status = plain.clone();
        bad_status["status"] = "Teleported".into();
        assert!(parse_access_item(&bad_status).is_err());
        let mut bad_minutes = plain;
        bad_minutes["timeOfDayInMinutes"] = 1440.into();
        assert!(parse_access_item(&bad_minutes).is_err());
        assert!(parse_access_item(&serde_json::json!({"changeType":"Explode"})).is_err());
        assert!(parse_access_item(&serde_json::json!([1, 2])).is_err());
    }

    #[test]
    fn validation_errors_read_as_field_messages() {
        let v = serde_json::json!({"person.id":["No person found with id 9."],"date":[]});
        assert_eq!(
            validation_reasons(&v),
            vec![
                "date".to_string(),
                "person.id: No person found with id 9.".into()
            ]
        );
        assert_eq!(
            validation_reasons(&serde_json::json!(["a", 1])),
            vec!["a", "1"]
        );
    }
}
