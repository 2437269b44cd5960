//! The one HTTP layer the three cloud clients share, so each client only knows its vendor's wire
//! format: a reqwest client (rustls with the ring provider), a per-API rate limiter, bounded
//! retries with exponential backoff and full jitter that honour `Retry-After`, a token cache that
//! refreshes shortly before expiry and logs in again exactly once when a token is rejected, a
//! `User-Agent` on every request, timeouts, and one structured error type.
//!
//! Secrets (client secrets, API keys and every token obtained) are registered with a
//! [`Redactor`]: every error built here passes through it, so a vendor that echoes a token in its
//! error message (Aktion: "Token {0} already expired") cannot leak it into logs. Request URLs are
//! never logged with their query (Aktion carries its token there), and reqwest errors are
//! described without their URL.

use std::fmt;
use std::future::Future;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, RETRY_AFTER};
use reqwest::{Client, RequestBuilder, StatusCode, Url};
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::config::Secret;

/// `Service/Version (Company)`, the form Protime requires; sent to every vendor.
pub const USER_AGENT: &str = concat!("badgegate/", env!("CARGO_PKG_VERSION"), " (badgegate)");

/// Largest answer body read into memory (a gateway has little RAM; vendor pages are far smaller).
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
/// How much of an unexpected body an error quotes.
const SNIPPET_CHARS: usize = 160;
/// How many dynamic secrets (tokens) the redactor remembers besides the configured ones.
const MAX_REMEMBERED_TOKENS: usize = 32;

/// Which vendor cloud an error or a log line is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Api {
    Protime,
    CrossChex,
    Aktion,
}

impl Api {
    pub fn as_str(self) -> &'static str {
        match self {
            Api::Protime => "Protime",
            Api::CrossChex => "CrossChex Cloud",
            Api::Aktion => "Aktion",
        }
    }
}

impl fmt::Display for Api {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Transport, pacing and retry settings of one API client. The constructors carry each vendor's
/// defaults; tests shorten them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpOptions {
    /// Whole request, connect to last body byte. A POST that times out after it was written is
    /// reported as [`ErrorKind::AnswerLost`].
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// Minimum time between the starts of two requests to this API (login included).
    pub min_interval: Duration,
    /// Attempts per call for retryable failures (429, 5xx, network, vendor "slow down"), the first
    /// one included. Never zero.
    pub max_attempts: u32,
    /// Backoff between attempts when the vendor gives no `Retry-After`: full jitter in
    /// `[backoff_min, min(backoff_max, backoff_min·2ⁿ)]`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// A `Retry-After` longer than this is not slept through inside a call: the call fails with
    /// [`ErrorKind::RateLimited`] carrying the delay, and the caller reschedules.
    pub max_retry_after: Duration,
    /// A token is refreshed this long before it expires (at most a quarter of its lifetime, so
    /// Aktion's 20-second tokens are still used for 15 seconds).
    pub refresh_margin: Duration,
}

impl HttpOptions {
    /// Protime: no documented request rate; 25 ms between requests (40/s) drains a day's backlog
    /// of a plant in minutes without becoming a storm, and a tenant that objects answers 429 with
    /// `Retry-After`, which is honoured.
    pub fn protime() -> HttpOptions {
        HttpOptions {
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            min_interval: Duration::from_millis(25),
            max_attempts: 5,
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            max_retry_after: Duration::from_secs(300),
            refresh_margin: Duration::from_secs(60),
        }
    }

    /// CrossChex Cloud: about one request per 15 s per account (`FREQUENT_REQUEST` otherwise).
    pub fn crosschex() -> HttpOptions {
        HttpOptions {
            min_interval: Duration::from_secs(15),
            max_attempts: 4,
            backoff_min: Duration::from_secs(15),
            backoff_max: Duration::from_secs(120),
            ..HttpOptions::protime()
        }
    }

    /// Aktion: an undocumented "request rate policy" (error 1008); back off in seconds, not
    /// milliseconds, when it is violated.
    pub fn aktion() -> HttpOptions {
        HttpOptions {
            min_interval: Duration::from_millis(250),
            max_attempts: 4,
            backoff_min: Duration::from_secs(2),
            backoff_max: Duration::from_secs(60),
            ..HttpOptions::protime()
        }
    }
}

/// What a vendor answered, as far as it could be understood.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VendorAnswer {
    /// HTTP status (CrossChex answers errors with 200).
    pub status: u16,
    /// The vendor's error code (`Unauthorized`, `TOKEN_EXPIRES`, `1001`, `invalid_client`...).
    pub code: Option<String>,
    pub message: Option<String>,
    pub reasons: Vec<String>,
}

impl fmt::Display for VendorAnswer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HTTP {}", self.status)?;
        if let Some(code) = &self.code {
            write!(f, " {code}")?;
        }
        if let Some(message) = &self.message {
            write!(f, ": {message}")?;
        }
        if !self.reasons.is_empty() {
            write!(f, " ({})", self.reasons.join("; "))?;
        }
        Ok(())
    }
}

/// What went wrong, independent of which API and call (see [`CloudError`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ErrorKind {
    /// No connection could be made: nothing was sent. Retry later.
    #[error("cannot reach the server ({detail})")]
    Unreachable { detail: String },
    /// The connection failed during a call that is safe to repeat. Retry later.
    #[error("network failure ({detail})")]
    Network { detail: String },
    /// A non-idempotent request was (or may have been) sent, but its answer was lost: the vendor
    /// MAY have processed it. Check before sending again.
    #[error(
        "the answer was lost after the request was sent ({detail}); it may have been processed"
    )]
    AnswerLost { detail: String },
    /// The vendor refused our credentials or the token (again, after one fresh login), or the
    /// client lacks a permission. Fix the configuration.
    #[error("authentication or permission refused: {0}")]
    Auth(VendorAnswer),
    /// The vendor kept saying "slow down" for every attempt, or asked for a longer pause than
    /// [`HttpOptions::max_retry_after`]. Retry after `retry_after` (when given).
    #[error("rate limited{}: {answer}", retry_after.map(|d| format!(" (retry after {} s)", d.as_secs())).unwrap_or_default())]
    RateLimited {
        retry_after: Option<Duration>,
        answer: VendorAnswer,
    },
    /// The vendor refused this request's content (validation). Sending it again cannot succeed:
    /// dead-letter it with the reasons.
    #[error("rejected by the vendor's validation: {}", reasons.join("; "))]
    Rejected { reasons: Vec<String> },
    /// Protime 410: the delta token expired; do a full re-sync.
    #[error("the delta token expired (HTTP 410); a full re-sync is needed")]
    DeltaExpired,
    /// Protime 409: another delta request is active for this collection; back off and retry.
    #[error("another delta request is active (HTTP 409); back off and retry")]
    DeltaBusy,
    /// Any other vendor error answer (after retries when it was a 5xx).
    #[error("the vendor answered with an error: {0}")]
    Vendor(VendorAnswer),
    /// The answer could not be understood (not JSON, missing fields, links to another host...).
    #[error("malformed answer: {detail}")]
    Malformed { detail: String },
    /// A paged listing came back with fewer items than the vendor's total, even after re-reading.
    #[error("incomplete listing: the vendor counts {expected} items but {received} were received")]
    Incomplete { expected: u64, received: u64 },
    /// The client could not be built or a request could not be formed (bad URL...).
    #[error("invalid client configuration: {detail}")]
    Config { detail: String },
}

impl ErrorKind {
    /// Every text a vendor or a library contributed, with secrets replaced by `***`.
    fn redacted(self, r: &Redactor) -> ErrorKind {
        let answer = |a: VendorAnswer| VendorAnswer {
            status: a.status,
            code: a.code.map(|c| r.redact(&c)),
            message: a.message.map(|m| r.redact(&m)),
            reasons: a.reasons.iter().map(|s| r.redact(s)).collect(),
        };
        match self {
            ErrorKind::Unreachable { detail } => ErrorKind::Unreachable {
                detail: r.redact(&detail),
            },
            ErrorKind::Network { detail } => ErrorKind::Network {
                detail: r.redact(&detail),
            },
            ErrorKind::AnswerLost { detail } => ErrorKind::AnswerLost {
                detail: r.redact(&detail),
            },
            ErrorKind::Auth(a) => ErrorKind::Auth(answer(a)),
            ErrorKind::RateLimited {
                retry_after,
                answer: a,
            } => ErrorKind::RateLimited {
                retry_after,
                answer: answer(a),
            },
            ErrorKind::Rejected { reasons } => ErrorKind::Rejected {
                reasons: reasons.iter().map(|s| r.redact(s)).collect(),
            },
            ErrorKind::Vendor(a) => ErrorKind::Vendor(answer(a)),
            ErrorKind::Malformed { detail } => ErrorKind::Malformed {
                detail: r.redact(&detail),
            },
            ErrorKind::Config { detail } => ErrorKind::Config {
                detail: r.redact(&detail),
            },
            k @ (ErrorKind::DeltaExpired | ErrorKind::DeltaBusy | ErrorKind::Incomplete { .. }) => {
                k
            }
        }
    }
}

/// A failed cloud call: which API, which call, and what happened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{api} {call}: {kind}")]
pub struct CloudError {
    pub api: Api,
    /// The call as the vendor names it (`POST /clockings`, `attendance.record/getrecord`...).
    pub call: &'static str,
    pub kind: ErrorKind,
}

impl CloudError {
    /// Worth retrying later as is (the cloud or the uplink was unwell, or asked us to slow down).
    pub fn is_transient(&self) -> bool {
        match &self.kind {
            ErrorKind::Unreachable { .. }
            | ErrorKind::Network { .. }
            | ErrorKind::RateLimited { .. }
            | ErrorKind::DeltaBusy
            | ErrorKind::Incomplete { .. } => true,
            ErrorKind::Vendor(a) => a.status >= 500 || a.status == 408,
            _ => false,
        }
    }

    /// The request may have been processed although no success was seen.
    pub fn may_have_landed(&self) -> bool {
        matches!(self.kind, ErrorKind::AnswerLost { .. })
    }
}

/// Installs rustls' ring crypto provider as the process default, once. ring (not aws-lc-rs)
/// because the gateway build cross-compiles for armv7/aarch64 with a plain gcc.
pub fn install_crypto_provider() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        // Err only means another provider was installed first, which serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Replaces known secrets in text with `***`. Its `Debug` shows only how many it knows.
#[derive(Default)]
pub(crate) struct Redactor {
    state: Mutex<RedactorState>,
}

impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.lock();
        write!(
            f,
            "Redactor({} secrets, {} tokens)",
            st.fixed.len(),
            st.tokens.len()
        )
    }
}

#[derive(Default)]
struct RedactorState {
    fixed: Vec<String>,
    tokens: Vec<String>,
}

impl Redactor {
    fn lock(&self) -> std::sync::MutexGuard<'_, RedactorState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A configured secret, remembered for the client's lifetime.
    pub fn add_fixed(&self, secret: &str) {
        if !secret.is_empty() {
            let mut st = self.lock();
            if !st.fixed.iter().any(|s| s == secret) {
                st.fixed.push(secret.to_string());
            }
        }
    }

    /// A token; only the most recent ones are remembered.
    pub fn add_token(&self, token: &str) {
        if token.is_empty() {
            return;
        }
        let mut st = self.lock();
        if st.tokens.iter().any(|s| s == token) {
            return;
        }
        if st.tokens.len() >= MAX_REMEMBERED_TOKENS {
            st.tokens.remove(0);
        }
        st.tokens.push(token.to_string());
    }

    pub fn redact(&self, text: &str) -> String {
        let st = self.lock();
        let mut out = text.to_string();
        for s in st.fixed.iter().chain(&st.tokens) {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), "***");
            }
        }
        out
    }
}

/// Minimum spacing between the starts of requests to one API. Callers queue in order.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    min_interval: Duration,
    next: tokio::sync::Mutex<Option<Instant>>,
}

impl RateLimiter {
    pub fn new(min_interval: Duration) -> RateLimiter {
        RateLimiter {
            min_interval,
            next: tokio::sync::Mutex::new(None),
        }
    }

    /// Waits until a request may start, and books the slot.
    pub async fn acquire(&self) {
        let mut next = self.next.lock().await;
        if let Some(at) = *next {
            // Sleeping with the lock held is the point: later callers wait behind this one.
            tokio::time::sleep_until(at).await;
        }
        *next = Instant::now().checked_add(self.min_interval);
    }
}

/// A token as a vendor issued it.
pub(crate) struct IssuedToken {
    pub value: Secret,
    pub lifetime: Duration,
}

/// One cached token per client. Logins are single-flight: concurrent callers wait for the one
/// login in progress instead of each asking for a token (Protime rate-limits token requests).
#[derive(Debug)]
pub(crate) struct TokenCache {
    slot: tokio::sync::Mutex<Option<CachedToken>>,
    margin: Duration,
}

#[derive(Debug)]
struct CachedToken {
    value: Secret,
    refresh_at: Instant,
}

impl TokenCache {
    pub fn new(margin: Duration) -> TokenCache {
        TokenCache {
            slot: tokio::sync::Mutex::new(None),
            margin,
        }
    }

    /// The cached token, or a fresh one from `login` when none is cached or it is about to expire.
    pub async fn get<L, F>(&self, login: &L) -> Result<Secret, CloudError>
    where
        L: Fn() -> F,
        F: Future<Output = Result<IssuedToken, CloudError>>,
    {
        let mut slot = self.slot.lock().await;
        if let Some(t) = slot.as_ref() {
            if Instant::now() < t.refresh_at {
                return Ok(t.value.clone());
            }
        }
        let issued = login().await?;
        let margin = self.margin.min(issued.lifetime / 4);
        let now = Instant::now();
        let refresh_at = now
            .checked_add(issued.lifetime.saturating_sub(margin))
            .unwrap_or(now);
        *slot = Some(CachedToken {
            value: issued.value.clone(),
            refresh_at,
        });
        Ok(issued.value)
    }

    /// Forgets `used` after the vendor rejected it (but keeps a newer token another caller got).
    pub async fn invalidate(&self, used: &Secret) {
        let mut slot = self.slot.lock().await;
        if slot.as_ref().is_some_and(|t| &t.value == used) {
            *slot = None;
        }
    }
}

/// A vendor's answer, fully read.
#[derive(Debug)]
pub(crate) struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    /// The body as JSON, or a [`ErrorKind::Malformed`] that quotes the start of it.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ErrorKind> {
        serde_json::from_slice(&self.body).map_err(|e| ErrorKind::Malformed {
            detail: format!(
                "HTTP {} body is not the expected JSON ({e}): {}",
                self.status.as_u16(),
                self.snippet()
            ),
        })
    }

    /// The start of the body, printable, for error messages.
    pub fn snippet(&self) -> String {
        let text = String::from_utf8_lossy(&self.body);
        let mut out: String = text
            .chars()
            .take(SNIPPET_CHARS)
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        if text.chars().count() > SNIPPET_CHARS {
            out.push('…');
        }
        if out.trim().is_empty() {
            "(empty body)".to_string()
        } else {
            format!("`{}`", out.trim())
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// `Retry-After` as seconds or as an HTTP date.
    pub fn retry_after(&self) -> Option<Duration> {
        self.header(RETRY_AFTER.as_str())
            .and_then(|v| parse_retry_after(v, chrono::Utc::now()))
    }
}

/// Parses `Retry-After: <seconds>` or `Retry-After: <HTTP-date>` (a date in the past is zero).
pub(crate) fn parse_retry_after(v: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    Some(
        (at.with_timezone(&chrono::Utc) - now)
            .to_std()
            .unwrap_or(Duration::ZERO),
    )
}

/// How a client judged one answer.
pub(crate) enum Verdict<T> {
    Done(T),
    /// Final: no retry helps.
    Fail(ErrorKind),
    /// Transient: try again after `after` (or the backoff when `None`).
    Retry {
        kind: ErrorKind,
        after: Option<Duration>,
    },
    /// The token was refused: log in again (once) and repeat.
    AuthExpired(ErrorKind),
}

/// The verdict for answers every vendor means the same way: 401 (token refused), 403
/// (permission), 408/429/5xx (transient, with `Retry-After`), anything else a vendor error.
pub(crate) fn by_status<T>(answer: &Answer, vendor: VendorAnswer) -> Verdict<T> {
    let status = answer.status;
    if status == StatusCode::UNAUTHORIZED {
        Verdict::AuthExpired(ErrorKind::Auth(vendor))
    } else if status == StatusCode::FORBIDDEN {
        Verdict::Fail(ErrorKind::Auth(vendor))
    } else if status == StatusCode::TOO_MANY_REQUESTS {
        let retry_after = answer.retry_after();
        Verdict::Retry {
            kind: ErrorKind::RateLimited {
                retry_after,
                answer: vendor,
            },
            after: retry_after,
        }
    } else if status.is_server_error() || status == StatusCode::REQUEST_TIMEOUT {
        Verdict::Retry {
            kind: ErrorKind::Vendor(vendor),
            after: None,
        }
    } else {
        Verdict::Fail(ErrorKind::Vendor(vendor))
    }
}

/// Why one logical call ended without a result (before it becomes a [`CloudError`]).
enum Failure {
    Failed(ErrorKind),
    AuthExpired(ErrorKind),
}

/// The shared client: one per API client instance.
#[derive(Debug)]
pub(crate) struct Http {
    api: Api,
    client: Client,
    opts: HttpOptions,
    limiter: RateLimiter,
    redactor: Redactor,
}

impl Http {
    /// Builds the reqwest client; `secrets` are redacted from every error for the client's life.
    pub fn new(api: Api, opts: HttpOptions, secrets: &[&Secret]) -> Result<Http, CloudError> {
        install_crypto_provider();
        let redactor = Redactor::default();
        for s in secrets {
            redactor.add_fixed(s.expose());
        }
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        let client = Client::builder()
            .user_agent(USER_AGENT)
            .default_headers(headers)
            .timeout(opts.timeout)
            .connect_timeout(opts.connect_timeout)
            // Retries are ours (they must know which calls are safe to repeat); redirects would
            // carry credentials to wherever the vendor points.
            .retry(reqwest::retry::never())
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| CloudError {
                api,
                call: "build client",
                kind: ErrorKind::Config {
                    detail: describe(e),
                },
            })?;
        let opts = HttpOptions {
            max_attempts: opts.max_attempts.max(1),
            ..opts
        };
        Ok(Http {
            api,
            limiter: RateLimiter::new(opts.min_interval),
            client,
            opts,
            redactor,
        })
    }

    /// The error for `call`, with secrets redacted.
    pub fn error(&self, call: &'static str, kind: ErrorKind) -> CloudError {
        CloudError {
            api: self.api,
            call,
            kind: kind.redacted(&self.redactor),
        }
    }

    /// One logical call without a token.
    pub async fn send<T>(
        &self,
        call: &'static str,
        idempotent: bool,
        build: impl Fn(&Client) -> RequestBuilder,
        interpret: impl Fn(&Answer) -> Verdict<T>,
    ) -> Result<T, CloudError> {
        match self.attempts(call, idempotent, &build, &interpret).await {
            Ok(t) => Ok(t),
            Err(Failure::Failed(k) | Failure::AuthExpired(k)) => Err(self.error(call, k)),
        }
    }

    /// One logical call with a token from `tokens` (obtained with `login` when needed). A refused
    /// token is dropped and the call repeated exactly once with a fresh one.
    pub async fn send_authed<T, L, F>(
        &self,
        call: &'static str,
        tokens: &TokenCache,
        login: L,
        idempotent: bool,
        build: impl Fn(&Client, &str) -> RequestBuilder,
        interpret: impl Fn(&Answer) -> Verdict<T>,
    ) -> Result<T, CloudError>
    where
        L: Fn() -> F,
        F: Future<Output = Result<IssuedToken, CloudError>>,
    {
        let token = tokens.get(&login).await?;
        self.redactor.add_token(token.expose());
        let first = self
            .attempts(
                call,
                idempotent,
                &|c: &Client| build(c, token.expose()),
                &interpret,
            )
            .await;
        match first {
            Ok(t) => return Ok(t),
            Err(Failure::Failed(k)) => return Err(self.error(call, k)),
            Err(Failure::AuthExpired(k)) => {
                tracing::debug!(
                    api = %self.api,
                    call,
                    reason = %k.redacted(&self.redactor),
                    "token refused; logging in again once"
                );
            }
        }
        tokens.invalidate(&token).await;
        let token = tokens.get(&login).await?;
        self.redactor.add_token(token.expose());
        match self
            .attempts(
                call,
                idempotent,
                &|c: &Client| build(c, token.expose()),
                &interpret,
            )
            .await
        {
            Ok(t) => Ok(t),
            Err(Failure::Failed(k) | Failure::AuthExpired(k)) => Err(self.error(call, k)),
        }
    }

    /// Attempts `call` until success, a final failure, or `max_attempts` transient failures.
    async fn attempts<T>(
        &self,
        call: &'static str,
        idempotent: bool,
        build: &impl Fn(&Client) -> RequestBuilder,
        interpret: &impl Fn(&Answer) -> Verdict<T>,
    ) -> Result<T, Failure> {
        let mut backoff = Backoff::new(self.opts.backoff_min, self.opts.backoff_max);
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.limiter.acquire().await;
            let verdict = match self.once(call, idempotent, build).await {
                Ok(answer) => interpret(&answer),
                Err(kind) => kind,
            };
            let (kind, after) = match verdict {
                Verdict::Done(t) => return Ok(t),
                Verdict::Fail(k) => return Err(Failure::Failed(k)),
                Verdict::AuthExpired(k) => return Err(Failure::AuthExpired(k)),
                Verdict::Retry { kind, after } => (kind, after),
            };
            if attempt >= self.opts.max_attempts {
                return Err(Failure::Failed(kind));
            }
            let delay = match after {
                Some(d) if d > self.opts.max_retry_after => {
                    return Err(Failure::Failed(kind));
                }
                Some(d) => d,
                None => backoff.next_delay(),
            };
            tracing::warn!(
                api = %self.api,
                call,
                attempt,
                max_attempts = self.opts.max_attempts,
                delay_ms = delay.as_millis() as u64,
                reason = %kind.redacted(&self.redactor),
                "retrying after a transient failure"
            );
            tokio::time::sleep(delay).await;
        }
    }

    /// One HTTP exchange. Transport failures come back as the verdict they imply.
    async fn once<T>(
        &self,
        call: &'static str,
        idempotent: bool,
        build: &impl Fn(&Client) -> RequestBuilder,
    ) -> Result<Answer, Verdict<T>> {
        let request = build(&self.client).build().map_err(|e| {
            Verdict::Fail(ErrorKind::Config {
                detail: describe(e),
            })
        })?;
        // The path only: Aktion carries its token in the query string.
        tracing::trace!(
            api = %self.api,
            call,
            method = %request.method(),
            path = request.url().path(),
            "sending request"
        );
        let started = Instant::now();
        let transport = |e: reqwest::Error| {
            if e.is_connect() {
                // Nothing was sent: safe to retry whatever the method.
                Verdict::Retry {
                    kind: ErrorKind::Unreachable {
                        detail: describe(e),
                    },
                    after: None,
                }
            } else if idempotent {
                Verdict::Retry {
                    kind: ErrorKind::Network {
                        detail: describe(e),
                    },
                    after: None,
                }
            } else {
                Verdict::Fail(ErrorKind::AnswerLost {
                    detail: describe(e),
                })
            }
        };
        let mut response = self.client.execute(request).await.map_err(transport)?;
        let status = response.status();
        let headers = std::mem::take(response.headers_mut());
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(transport)? {
            if body.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(Verdict::Fail(ErrorKind::Malformed {
                    detail: format!("HTTP {status} body larger than {MAX_BODY_BYTES} bytes"),
                }));
            }
            body.extend_from_slice(&chunk);
        }
        tracing::debug!(
            api = %self.api,
            call,
            status = status.as_u16(),
            bytes = body.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "answer received"
        );
        Ok(Answer {
            status,
            headers,
            body: Bytes::from(body),
        })
    }
}

/// A reqwest error with its cause chain and without its URL (which may carry a token).
pub(crate) fn describe(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut out = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Logs a listed item that could not be understood and was skipped: the call goes on with the
/// rest, so one bad item cannot hold back everything listed after it.
pub(crate) fn skipped_item(api: Api, call: &'static str, reason: &str) {
    tracing::warn!(%api, call, %reason, "malformed item in the vendor's answer skipped");
}

/// Parses a configured base URL; a path is made to end with `/` so that joining relative paths
/// appends to it (`.../api/v1` + `clockings` = `.../api/v1/clockings`).
pub(crate) fn base_url(api: Api, raw: &str) -> Result<Url, CloudError> {
    let config = |detail: String| CloudError {
        api,
        call: "configure",
        kind: ErrorKind::Config { detail },
    };
    let mut url = Url::parse(raw.trim()).map_err(|e| config(format!("base URL {raw:?}: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(config(format!(
            "base URL {raw:?}: scheme must be http or https"
        )));
    }
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    url.set_query(None);
    url.set_fragment(None);
    Ok(url)
}

/// Resolves a link a vendor returned (server-relative or absolute) against `base`, refusing links
/// to another origin: the request will carry our token.
pub(crate) fn same_origin_link(base: &Url, link: &str) -> Result<Url, ErrorKind> {
    let url = base.join(link).map_err(|e| ErrorKind::Malformed {
        detail: format!("unusable link {link:?}: {e}"),
    })?;
    if url.origin() != base.origin() {
        return Err(ErrorKind::Malformed {
            detail: format!(
                "link points to another origin ({}), not following it",
                url.origin().ascii_serialization()
            ),
        });
    }
    Ok(url)
}

/// `application/x-www-form-urlencoded` body from pairs.
pub(crate) fn form_body(pairs: &[(&str, &str)]) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    s.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn retry_after_takes_seconds_and_http_dates() {
        let now = chrono::DateTime::parse_from_rfc3339("2015-10-21T07:28:00Z")
            .map(|d| d.with_timezone(&chrono::Utc))
            .expect("time");
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn redactor_hides_fixed_secrets_and_tokens() {
        let r = Redactor::default();
        r.add_fixed("s3cret-value");
        r.add_token("tok-123456");
        assert_eq!(
            r.redact("Token tok-123456 expired; key s3cret-value"),
            "Token *** expired; key ***"
        );
        for i in 0..(MAX_REMEMBERED_TOKENS + 5) {
            r.add_token(&format!("token-{i:04}"));
        }
        assert_eq!(r.redact("s3cret-value"), "***");
        assert_eq!(
            r.redact("token-0000"),
            "token-0000",
            "oldest tokens forgotten"
        );
        let last = format!("token-{:04}", MAX_REMEMBERED_TOKENS + 4);
        assert_eq!(r.redact(&last), "***");
    }

    #[test]
    fn links_are_resolved_against_the_base_origin_only() {
        let base = base_url(
            Api::Protime,
            "https://t.myprotime.eu/connector/protimeapi/api/v1",
        )
        .expect("base");
        assert_eq!(base.path(), "/connector/protimeapi/api/v1/");
        let rel = same_origin_link(
            &base,
            "/connector/protimeapi/api/v1/people?continuationToken=x",
        )
        .expect("relative");
        assert_eq!(
            rel.as_str(),
            "https://t.myprotime.eu/connector/protimeapi/api/v1/people?continuationToken=x"
        );
        let abs = same_origin_link(&base, "https://t.myprotime.eu/x?y=1").expect("absolute");
        assert_eq!(abs.path(), "/x");
        assert!(same_origin_link(&base, "https://evil.example/steal").is_err());
        assert!(base_url(Api::Aktion, "ftp://x/").is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn token_cache_refreshes_shortly_before_expiry() {
        let cache = TokenCache::new(Duration::from_secs(60));
        let logins = AtomicU32::new(0);
        let login = || async {
            let n = logins.fetch_add(1, Ordering::SeqCst);
            Ok(IssuedToken {
                value: Secret::new(format!("t{n}")),
                lifetime: Duration::from_secs(1800),
            })
        };
        assert_eq!(
            cache.get(&login).await.map(|s| s.expose().to_string()),
            Ok("t0".into())
        );
        tokio::time::advance(Duration::from_secs(1800 - 61)).await;
        assert_eq!(
            cache.get(&login).await.map(|s| s.expose().to_string()),
            Ok("t0".into())
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(
            cache.get(&login).await.map(|s| s.expose().to_string()),
            Ok("t1".into())
        );
        // A short-lived token (Aktion: 20 s) is refreshed a quarter of its life early, not 60 s.
        let short = TokenCache::new(Duration::from_secs(60));
        let login20 = || async {
            logins.fetch_add(1, Ordering::SeqCst);
            Ok(IssuedToken {
                value: Secret::new("a"),
                lifetime: Duration::from_secs(20),
            })
        };
        short.get(&login20).await.map(|_| ()).expect("login");
        tokio::time::advance(Duration::from_secs(14)).await;
        short.get(&login20).await.map(|_| ()).expect("cached");
        assert_eq!(logins.load(Ordering::SeqCst), 3);
        tokio::time::advance(Duration::from_secs(2)).await;
        short.get(&login20).await.map(|_| ()).expect("refreshed");
        assert_eq!(logins.load(Ordering::SeqCst), 4);
        // Invalidating a token another caller already replaced keeps the newer one.
        let newer = short.get(&login20).await.expect("cached");
        short.invalidate(&Secret::new("other")).await;
        assert_eq!(short.get(&login20).await, Ok(newer));
        assert_eq!(logins.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limiter_spaces_request_starts() {
        let limiter = RateLimiter::new(Duration::from_secs(15));
        let start = Instant::now();
        limiter.acquire().await;
        limiter.acquire().await;
        limiter.acquire().await;
        assert_eq!(start.elapsed(), Duration::from_secs(30));
    }
}
