//! Fuzz entry points: one function per parser of outside input, each taking raw bytes, calling
//! the real parser and checking the invariants that are cheap to check. A panic is a finding.
//!
//! Shared by the cargo-fuzz targets (`fuzz/fuzz_targets/<name>.rs`, one line each) and the
//! stable regression test `tests/fuzz_corpus.rs`, which replays every seed in
//! `fuzz/corpus/<name>/` and every past crash in `fuzz/regressions/<name>/` through the same
//! function. [`TARGETS`] lists them, so neither side can forget one.

use std::path::Path;
use std::sync::OnceLock;

use bytes::Bytes;
use chrono::{DateTime, TimeZone, Utc};
use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};
use reqwest::StatusCode;

use crate::clouds::http::{parse_retry_after, Answer, Verdict};
use crate::clouds::{aktion, crosschex, protime};
use crate::config::Config;
use crate::model::{valid_badge, AccessStatus, Clocking, Source};
use crate::terminals::anviz::codec::{
    self, cmd, ClearRequest, Counts, Decoder, DownloadRequest, Frame, FrameError, Record, Request,
    Response, MAX_DATA_LEN,
};

/// A fuzz entry point: raw bytes in, a panic on a finding.
pub type Target = fn(&[u8]);

/// Every fuzz target by name (the name of its `fuzz_targets/` file and corpus folder).
pub const TARGETS: &[(&str, Target)] = &[
    ("tcb_frames", tcb_frames),
    ("ingest_body", ingest_body),
    ("protime_answer", protime_answer),
    ("aktion_answer", aktion_answer),
    ("crosschex_answer", crosschex_answer),
    ("config", config),
    ("people_file", people_file),
];

/// The statuses every cloud answer is judged under: success, the vendors' error envelopes
/// (400 validation, 401/403 auth, 404 Aktion "no scheduled action", 409/410 Protime delta,
/// 429 rate limit) and a proxy's 5xx.
const STATUSES: [u16; 12] = [200, 201, 202, 204, 400, 401, 403, 404, 409, 410, 429, 502];

/// "Now" for every target: a fixed instant keeps each input's outcome reproducible.
fn fixed_now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 2, 12, 0, 0)
        .single()
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Anviz TC-B

/// The TC-B stream decoder, both directions. The first byte sets the read size (1..=64) the
/// rest is fed in, so the bytes are decoded twice: at once and in chunks. Checks:
/// - chunking changes nothing: the same frames and rejected frames, the same garbage bytes;
/// - what is left buffered cannot be a complete frame;
/// - every frame re-encodes to bytes that decode to the same frame and nothing else;
/// - every payload the agent or the simulator reads round-trips through its encoder.
pub fn tcb_frames(data: &[u8]) {
    let Some((&first, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(first % 64) + 1;
    let requests = decode_stream::<Request>(stream, chunk);
    for req in &requests {
        let bytes = codec::encode_request(req).expect("a decoded request re-encodes");
        assert_eq!(
            decode_stream::<Request>(&bytes, bytes.len()),
            std::slice::from_ref(req)
        );
        request_payload(req);
    }
    let responses = decode_stream::<Response>(stream, chunk);
    for resp in &responses {
        let bytes = codec::encode_response(resp).expect("a decoded response re-encodes");
        assert_eq!(
            decode_stream::<Response>(&bytes, bytes.len()),
            std::slice::from_ref(resp)
        );
        response_payload(resp);
    }
}

/// Decodes `stream` at once and in `chunk`-byte reads, checks both agree, returns the frames.
fn decode_stream<F: Frame + Clone + PartialEq + std::fmt::Debug>(
    stream: &[u8],
    chunk: usize,
) -> Vec<F> {
    let whole = run_decoder::<F>(std::iter::once(stream));
    let split = run_decoder::<F>(stream.chunks(chunk.max(1)));
    assert_eq!(whole.0, split.0, "read boundaries changed the frames");
    assert_eq!(whole.1, split.1, "read boundaries changed the garbage");
    assert_eq!(whole.2, split.2, "read boundaries changed what is buffered");
    whole
        .0
        .into_iter()
        .filter_map(|r| r.ok())
        .collect::<Vec<F>>()
}

/// Frames and rejected frames in order, garbage bytes skipped, bytes left buffered.
type Decoded<F> = (Vec<Result<F, FrameError>>, usize, usize);

fn run_decoder<'a, F: Frame>(reads: impl Iterator<Item = &'a [u8]>) -> Decoded<F> {
    let mut decoder = Decoder::<F>::new();
    let mut frames = Vec::new();
    let mut garbage = 0;
    let mut fed = 0;
    for read in reads {
        decoder.push(read);
        fed += read.len();
        while let Some(next) = decoder.next_frame() {
            match next {
                Err(FrameError::Garbage { skipped }) => {
                    assert!(skipped > 0, "a garbage report skips at least one byte");
                    garbage += skipped;
                }
                other => frames.push(other),
            }
        }
        assert!(decoder.buffered() <= fed);
    }
    // The largest frame is a response header (9) + 400 + CRC (2): more than that left buffered
    // would be a frame the decoder should have decided on.
    assert!(
        decoder.buffered() < 9 + MAX_DATA_LEN + 2,
        "{} bytes left buffered",
        decoder.buffered()
    );
    (frames, garbage, decoder.buffered())
}

fn request_payload(req: &Request) {
    match req.cmd {
        cmd::DOWNLOAD_RECORDS => {
            if let Ok(d) = DownloadRequest::decode(&req.data) {
                assert_eq!(d.encode().expect("decoded download re-encodes"), *req.data);
            }
        }
        cmd::CLEAR_RECORDS => {
            // Types 0 and 1 ignore the count bytes: compare the decoded values, not the bytes.
            if let Ok(c) = ClearRequest::decode(&req.data) {
                let bytes = c.encode().expect("decoded clear request re-encodes");
                assert_eq!(ClearRequest::decode(&bytes), Ok(c));
            }
        }
        cmd::SET_CLOCK => clock_payload(&req.data),
        _ => {}
    }
}

fn response_payload(resp: &Response) {
    let data = &resp.data;
    if resp.is_realtime_push() {
        if let Ok(r) = Record::from_slice(data) {
            assert_eq!(r.encode().expect("decoded record re-encodes"), **data);
        }
        return;
    }
    match resp.cmd() {
        cmd::GET_COUNTS => {
            if let Ok(c) = Counts::decode(data) {
                assert_eq!(c.encode().expect("decoded counts re-encode"), **data);
            }
        }
        cmd::DOWNLOAD_RECORDS => {
            if let Ok(records) = codec::decode_download_answer(data) {
                if !records.is_empty() {
                    let bytes =
                        codec::encode_download_answer(&records).expect("decoded records re-encode");
                    assert_eq!(bytes, *data);
                }
            }
        }
        cmd::CLEAR_RECORDS => {
            if let Ok(Some(n)) = codec::decode_clear_answer(data) {
                let bytes = codec::encode_clear_answer(n).expect("decoded count re-encodes");
                assert_eq!(bytes, **data);
            }
        }
        cmd::GET_CLOCK => clock_payload(data),
        _ => {}
    }
}

fn clock_payload(data: &[u8]) {
    if let Ok(t) = codec::decode_clock(data) {
        assert_eq!(
            codec::encode_clock(t).expect("decoded clock re-encodes"),
            data
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Local ingest API

/// The configuration the ingest target validates against: two terminals, one with a fixed
/// direction, and a small batch limit so the limit is reachable.
const INGEST_CONFIG: &str = r#"
[agent]
site = "fuzz"
data_dir = "/nonexistent/badgegate-fuzz"
timezone = "Europe/Brussels"
[http]
max_batch = 8
[mqtt]
url = "mqtt://127.0.0.1:1883"
[[terminals]]
id = "kiosk"
kind = "http"
[[terminals]]
id = "gate-in"
kind = "http"
direction = "in"
timezone = "America/New_York"
"#;

fn ingest_config() -> &'static Config {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    CONFIG.get_or_init(|| {
        Config::parse(INGEST_CONFIG, Path::new("/nonexistent"))
            .unwrap_or_else(|e| panic!("the fuzz ingest config is invalid: {e}"))
    })
}

/// A `POST /v1/clockings` body. Accepted: 1..=max_batch clockings, each on a configured
/// terminal with a valid badge, from the HTTP source; each becomes a stored clocking (as
/// `Ingest::submit` makes it) at the same instant, with a stable id, a minute of day in
/// 0..=1439, a JSON payload and a store encoding that decodes to the same clocking. Refused: a
/// 400, and the index it names is an element of the batch.
pub fn ingest_body(data: &[u8]) {
    let config = ingest_config();
    match crate::http::parse_clockings_body(config, data) {
        Ok(batch) => {
            assert!(!batch.is_empty() && batch.len() <= config.http.max_batch);
            let received_at = fixed_now();
            for new in batch {
                let term = config
                    .terminal(&new.terminal)
                    .expect("a configured terminal");
                assert!(valid_badge(&new.badge), "{new:?}");
                assert_eq!(new.source, Source::Http);
                assert!(new.person.is_none());
                let make = || {
                    let status = new.status.unwrap_or(AccessStatus::AccessOk);
                    Clocking::from_new("fuzz", term.timezone, new.clone(), status, received_at)
                };
                let c = make();
                assert_eq!(c.occurred_at, new.occurred_at, "the instant is kept");
                assert_eq!(c.id, make().id, "ids are stable");
                assert!(c.time_of_day_minutes() < 1440, "{c:?}");
                let json: serde_json::Value =
                    serde_json::from_slice(&c.to_json()).expect("the MQTT payload is JSON");
                assert_eq!(json["badge"].as_str(), Some(c.badge.as_str()));
                let stored = postcard::to_allocvec(&c).expect("a clocking encodes");
                let back: Clocking = postcard::from_bytes(&stored).expect("and decodes");
                assert_eq!(back, c);
            }
        }
        Err(e) => {
            assert_eq!(e.status(), StatusCode::BAD_REQUEST, "{e:?}");
            assert!(!e.code().is_empty());
            if let Some(i) = e.index() {
                assert!(i < config.http.max_batch, "{e:?}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Cloud answers

/// The answer a client would see: `body` with `status`, and the body's first line as
/// `Retry-After` when it is a valid header value (the 429 and Aktion 1008 paths read it).
fn answers(body: &[u8]) -> impl Iterator<Item = Answer> + '_ {
    let first_line = body.split(|&b| b == b'\n').next().unwrap_or_default();
    if let Ok(text) = std::str::from_utf8(first_line) {
        let _ = parse_retry_after(text, fixed_now());
    }
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_bytes(first_line) {
        headers.insert(RETRY_AFTER, v);
    }
    let body = Bytes::copy_from_slice(body);
    STATUSES.into_iter().map(move |s| Answer {
        status: StatusCode::from_u16(s).unwrap_or(StatusCode::OK),
        headers: headers.clone(),
        body: body.clone(),
    })
}

/// A verdict's success value; every other verdict must carry an error that can be displayed.
fn done<T>(v: Verdict<T>) -> Option<T> {
    match v {
        Verdict::Done(t) => Some(t),
        Verdict::Fail(k) | Verdict::AuthExpired(k) | Verdict::Retry { kind: k, .. } => {
            let _ = k.to_string();
            None
        }
    }
}

/// Protime: token, `POST /clockings` and list answers (plain and delta), and every listed item
/// as a clocking, an access clocking (change) and a person.
pub fn protime_answer(data: &[u8]) {
    for a in answers(data) {
        if let Some(t) = done(protime::parse_token_answer(&a)) {
            assert!(!t.value.expose().is_empty());
        }
        done(protime::parse_post_answer(&a));
        for delta in [false, true] {
            let Some(page) = done(protime::parse_page_answer(&a, delta)) else {
                continue;
            };
            for item in page.value {
                let _ = protime::parse_clocking(&item);
                if let Ok(protime::AccessChange::Upsert(c)) = protime::parse_access_item(&item) {
                    assert!(c.time_of_day_in_minutes <= 1439, "{c:?}");
                }
                let _ = protime::parse_person(item);
            }
        }
    }
}

/// Aktion: login answers, and GET answers read as a persons page, a shifts page (a shift always
/// ends after it begins) and a C4 events page.
pub fn aktion_answer(data: &[u8]) {
    for a in answers(data) {
        if let Some(t) = done(aktion::parse_login_answer(&a)) {
            assert!(!t.value.expose().is_empty());
        }
        for none_ok in [false, true] {
            let Some(Some(v)) = done(aktion::parse_get_answer(&a, none_ok)) else {
                continue;
            };
            let _ = aktion::parse_persons_page(v.clone());
            if let Ok((shifts, _, listed)) = aktion::parse_shifts_page(v.clone(), "P-1") {
                assert!(shifts.len() <= listed);
                for s in &shifts {
                    assert!(s.end > s.begin, "{s:?}");
                }
            }
            if let Ok(page) = aktion::parse_events_page(v, chrono_tz::Europe::Prague) {
                for w in page.events.windows(2) {
                    assert!(w[0].date_created <= w[1].date_created, "oldest first");
                }
            }
        }
    }
}

/// CrossChex: login and `getrecord` answers in both shapes, errors arriving with HTTP 200.
pub fn crosschex_answer(data: &[u8]) {
    for a in answers(data) {
        if let Some(t) = done(crosschex::parse_token_answer(&a, fixed_now())) {
            assert!(!t.value.expose().is_empty());
        }
        if let Some(page) = done(crosschex::parse_getrecord_answer(&a)) {
            for r in &page.list {
                assert!(!r.device_serial.is_empty() && !r.workno.is_empty(), "{r:?}");
                let _ = r.key();
                for reading in [
                    crate::config::CheckTime::Local,
                    crate::config::CheckTime::Utc,
                ] {
                    let _ = r.occurred_at(reading, chrono_tz::Europe::Brussels);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Files the operator writes

/// The TOML configuration. Relative `*_file` paths resolve in a directory that does not exist.
/// Valid: at least one sink, every terminal found by its id. Invalid: at least one problem.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text, Path::new("/nonexistent/badgegate-fuzz")) {
        Ok(c) => {
            assert!(!c.sink_names().is_empty());
            for t in &c.terminals {
                assert!(c.terminal(&t.id).is_some(), "{}", t.id);
            }
        }
        Err(e) => assert!(!e.0.is_empty()),
    }
}

/// The people file (CSV). Valid: every person has badges, every badge is valid and belongs to
/// exactly one person, person ids are unique. Invalid: at least one message.
pub fn people_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match crate::access::people_file::parse(text) {
        Ok(people) => {
            let mut ids = std::collections::HashSet::new();
            let mut badges = std::collections::HashSet::new();
            for p in &people {
                assert!(!p.id.is_empty() && ids.insert(p.id.as_str()), "{p:?}");
                assert!(!p.badges.is_empty(), "{p:?}");
                for b in &p.badges {
                    assert!(valid_badge(b), "{b:?}");
                    assert!(badges.insert(b.as_str()), "badge {b:?} listed twice");
                }
            }
        }
        Err(errors) => assert!(!errors.is_empty()),
    }
}
