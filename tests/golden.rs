//! Golden answers: the Protime and CrossChex answers transcribed from (or composed after) the
//! vendors' published pages (`tests/fixtures/<vendor>/README.md` names each file's page), served
//! byte for byte by a bare HTTP server and read by the real clients through their public calls,
//! so every answer goes through the same parse functions the agent and the fuzz targets use.
//!
//! The server knows nothing of either API: each test maps a request (method, path, the
//! `continuationToken`/`deltaToken` it carries, or CrossChex's `nameSpace`) to a fixture file.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{Method, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::Router;
use badgegate::clouds::crosschex::CrossChexClient;
use badgegate::clouds::protime::{
    AccessChange, ClockingKind, PersonRef, PostOutcome, ProtimeClient, ProtimeClocking,
};
use badgegate::clouds::{ErrorKind, HttpOptions};
use badgegate::config::{CheckTime, CrossChexConfig, ProtimeConfig, ProtimePersonRef, Secret};
use badgegate::model::AccessStatus;
use chrono::{NaiveDate, NaiveDateTime};
use serde_json::Value;

/// What the server sees of a request.
struct Request {
    method: Method,
    path: String,
    query: String,
    body: Value,
}

/// A route answers with a status and a fixture file name, or `Location: <value>` for a
/// header-only answer.
type Route = dyn Fn(&Request) -> (u16, &'static str) + Send + Sync;

fn fixture(vendor: &str, name: &str) -> String {
    let path = format!(
        "{}/tests/fixtures/{vendor}/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str::<Value>(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    text
}

/// Serves `route`'s fixture (from `tests/fixtures/<vendor>/`) for every request.
async fn serve(vendor: &'static str, route: Arc<Route>) -> SocketAddr {
    let handler = move |method: Method, uri: Uri, body: Bytes| {
        let route = route.clone();
        async move {
            let req = Request {
                method,
                path: uri.path().to_string(),
                query: uri.query().unwrap_or_default().to_string(),
                body: serde_json::from_slice(&body).unwrap_or(Value::Null),
            };
            let (status, name) = route(&req);
            let status = StatusCode::from_u16(status).expect("status");
            // A header-only answer (the page shows no body): `Location: <value>`.
            if let Some(location) = name.strip_prefix("Location: ") {
                return (status, [("location", location)]).into_response();
            }
            (
                status,
                [("content-type", "application/json")],
                fixture(vendor, name),
            )
                .into_response()
        }
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, Router::new().fallback(handler)).await;
    });
    addr
}

fn options() -> HttpOptions {
    HttpOptions {
        timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(2),
        min_interval: Duration::ZERO,
        max_attempts: 2,
        backoff_min: Duration::from_millis(10),
        backoff_max: Duration::from_millis(20),
        max_retry_after: Duration::from_secs(1),
        refresh_margin: Duration::from_secs(60),
    }
}

// ---------------------------------------------------------------------------------------------
// Protime

const API: &str = "/connector/protimeapi/api/v1";

fn protime(addr: SocketAddr) -> ProtimeClient {
    badgegate::clouds::http::install_crypto_provider();
    let cfg = ProtimeConfig {
        base_url: format!("http://{addr}{API}/"),
        token_url: format!("http://{addr}/tenants/acme/connect/token"),
        client_id: "your-client-id".into(),
        client_secret: Secret::new("your-client-secret"),
        timezone: chrono_tz::Europe::Brussels,
        mirror: true,
        mirror_interval_secs: 60,
        mirror_days: 7,
        people_interval_secs: 3600,
        retry_max_secs: 60,
        person_ref: ProtimePersonRef::BadgeNumber,
    };
    ProtimeClient::new(&cfg, options()).expect("client")
}

/// The token page's answer for the token call, `answer` for every other call.
fn protime_route(
    answer: impl Fn(&Request) -> (u16, &'static str) + Send + Sync + 'static,
) -> Arc<Route> {
    Arc::new(move |r: &Request| {
        if r.method == Method::POST && r.path == "/tenants/acme/connect/token" {
            (200, "token.json")
        } else {
            answer(r)
        }
    })
}

fn date(s: &str) -> NaiveDate {
    NaiveDate::parse_from_str(s, "%Y-%m-%d").expect("date")
}

#[tokio::test]
async fn protime_clockings_list_follows_next_link_past_an_empty_page() {
    static SECOND_PAGE: AtomicUsize = AtomicUsize::new(0);
    let addr = serve(
        "protime",
        protime_route(|r| {
            assert_eq!(r.path, format!("{API}/clockings"));
            if r.query.contains("continuationToken=eyJ2YWxpZGF0...") {
                SECOND_PAGE.fetch_add(1, Ordering::SeqCst);
                (200, "clockings-page-2.json")
            } else {
                (200, "clockings-page-1.json")
            }
        }),
    )
    .await;
    let wanted = ProtimeClocking {
        person: PersonRef::Id(1),
        date: date("2024-01-02"),
        time_of_day_in_minutes: 480,
        kind: ClockingKind::InOut,
        terminal: None,
    };
    let found = protime(addr).find_clocking(&wanted).await.expect("list");
    assert_eq!(
        SECOND_PAGE.load(Ordering::SeqCst),
        1,
        "the nextLink was followed"
    );
    assert_eq!(found.len(), 1);
    let c = &found[0];
    assert_eq!((c.id, c.person_id), (21369, Some(1)));
    assert_eq!(
        (c.date, c.time_of_day_in_minutes),
        (date("2024-01-02"), 480)
    );
    assert_eq!(c.kind, ClockingKind::InOut);
    assert_eq!(
        (c.terminal_id, c.original_time_of_day_in_minutes),
        (None, None)
    );
}

/// The first-clocking-integration tutorial's answer to `POST /clockings`: `201 Created` with
/// `Location: /connector/protimeapi/api/v1/clockings/19250` and no body.
#[tokio::test]
async fn protime_post_clocking_created_with_location() {
    let addr = serve(
        "protime",
        protime_route(|r| {
            assert_eq!(
                (&r.method, r.path.as_str()),
                (&Method::POST, "/connector/protimeapi/api/v1/clockings")
            );
            assert_eq!(r.body["person"]["id"], 1);
            assert_eq!(r.body["timeOfDayInMinutes"], 510);
            (
                201,
                "Location: /connector/protimeapi/api/v1/clockings/19250",
            )
        }),
    )
    .await;
    let clocking = ProtimeClocking {
        person: PersonRef::Id(1),
        date: date("2026-01-15"),
        time_of_day_in_minutes: 510,
        kind: ClockingKind::InOut,
        terminal: None,
    };
    let outcome = protime(addr).post_clocking(&clocking).await.expect("post");
    assert!(
        matches!(
            &outcome,
            PostOutcome::Created { location: Some(l) } if l == "/connector/protimeapi/api/v1/clockings/19250"
        ),
        "{outcome:?}"
    );
}

#[tokio::test]
async fn protime_access_clockings_initial_round_then_delta_link() {
    const FIRST_DELTA_LINK: &str = "/connector/protimeapi/api/v1/delta/access-clockings?deltaToken=eyJEZWx0YUlkIjozMDA4MCwiU3RhcnRpbmdDdXJzb3IiOjQ1NTIyLCJUaW1lU3RhbXAiOiIyMDI1LTAxLTEwVDEzOjMxOjE0LjE2Njk3NjhaIn0=";
    let addr = serve(
        "protime",
        protime_route(|r| {
            if r.path == format!("{API}/delta/access-clockings") {
                (200, "access-clockings-delta.json")
            } else if r.query.contains("continuationToken=") {
                (200, "access-clockings-initial-page-2.json")
            } else {
                assert_eq!(r.path, format!("{API}/access-clockings"));
                (200, "access-clockings-initial-page-1.json")
            }
        }),
    )
    .await;
    let client = protime(addr);

    let initial = client
        .access_clockings_initial(date("2024-12-01"))
        .await
        .expect("initial round");
    assert_eq!(initial.delta_link, FIRST_DELTA_LINK);
    assert_eq!(initial.changes.len(), 2);
    let AccessChange::Upsert(a) = &initial.changes[0] else {
        panic!(
            "the initial round lists plain items: {:?}",
            initial.changes[0]
        );
    };
    assert_eq!(
        (a.id, a.change_version.as_str()),
        (1234, "0000090200004BD0000A")
    );
    assert_eq!(
        (a.person_id, a.badge_number.as_deref()),
        (Some(17), Some("6767676"))
    );
    assert_eq!(
        (a.date, a.time_of_day_in_minutes),
        (date("2024-12-01"), 487)
    );
    assert_eq!(
        (a.terminal_id, a.terminal_code.as_deref()),
        (Some(3), Some("GATE-1"))
    );
    assert_eq!(a.status, AccessStatus::AccessOk);
    let AccessChange::Upsert(b) = &initial.changes[1] else {
        panic!("upsert expected");
    };
    assert_eq!((b.id, b.time_of_day_in_minutes), (1235, 1439));
    assert_eq!(b.status, AccessStatus::UnknownBadge);

    let delta = client
        .access_clockings_delta(&initial.delta_link)
        .await
        .expect("delta round");
    assert_eq!(
        delta.delta_link,
        "/connector/protimeapi/api/v1/delta/access-clockings?deltaToken=eyJkZWx0YUlk..."
    );
    assert_eq!(delta.changes.len(), 2);
    let AccessChange::Upsert(u) = &delta.changes[0] else {
        panic!("InsertOrUpdate expected: {:?}", delta.changes[0]);
    };
    assert_eq!((u.id, u.time_of_day_in_minutes), (1250, 0));
    assert_eq!(u.status, AccessStatus::AntiPassbackError);
    assert_eq!(u.change_version, "0000090200004BD0000C");
    assert!(matches!(
        &delta.changes[1],
        AccessChange::Delete { id: 1234, change_version } if change_version == "0000090200004BD0000D"
    ));
}

#[tokio::test]
async fn protime_people_page_gives_the_badge_map() {
    let addr = serve(
        "protime",
        protime_route(|r| {
            assert_eq!(r.path, format!("{API}/people"));
            (200, "people-page.json")
        }),
    )
    .await;
    let people = protime(addr).people().await.expect("people");
    assert_eq!(people.len(), 2);
    assert_eq!(people[0].id, 17);
    assert_eq!(people[0].badge_number.as_deref(), Some("6767676"));
    assert_eq!(
        (
            people[0].first_name.as_deref(),
            people[0].last_name.as_deref()
        ),
        (Some("An"), Some("Peeters"))
    );
    assert_eq!(
        (people[1].id, people[1].badge_number.as_deref()),
        (18, None)
    );
}

#[tokio::test]
async fn protime_error_bodies_map_to_error_kinds() {
    let addr = serve(
        "protime",
        protime_route(|r| {
            if r.path.starts_with(&format!("{API}/delta/")) {
                (410, "error-generic.json")
            } else if r.path == format!("{API}/people") {
                (403, "error-generic.json")
            } else {
                (400, "error-400-reasons.json")
            }
        }),
    )
    .await;
    let client = protime(addr);

    let e = client
        .access_clockings_initial(date("2024-12-01"))
        .await
        .expect_err("400");
    let ErrorKind::Vendor(v) = &e.kind else {
        panic!("a GET refused with 400 is the vendor's verdict: {e:?}");
    };
    assert_eq!((v.status, v.code.as_deref()), (400, Some("BadRequest")));
    assert_eq!(v.message.as_deref(), Some("The request was invalid"));
    assert_eq!(v.reasons, ["The provided date range is invalid"]);

    let e = client
        .access_clockings_delta("/connector/protimeapi/api/v1/delta/access-clockings?deltaToken=x")
        .await
        .expect_err("410");
    assert!(matches!(e.kind, ErrorKind::DeltaExpired), "{e:?}");

    let e = client.people().await.expect_err("403");
    let ErrorKind::Auth(v) = &e.kind else {
        panic!("403 (scope) is an auth failure: {e:?}");
    };
    assert_eq!((v.status, v.code.as_deref()), (403, Some("ErrorCode")));
    assert_eq!(v.message.as_deref(), Some("Human-readable description"));
}

// ---------------------------------------------------------------------------------------------
// CrossChex

fn crosschex(addr: SocketAddr) -> CrossChexClient {
    badgegate::clouds::http::install_crypto_provider();
    let cfg = CrossChexConfig {
        base_url: format!("http://{addr}/"),
        api_key: "a48f4d4ab5c6d00296431e4addfec375".into(),
        api_secret: Secret::new("6eb2a47a22e60627d3f148b44138eeda"),
        timezone: chrono_tz::Europe::Brussels,
        poll_interval_secs: 60,
        request_interval_ms: 0,
        overlap_mins: 120,
        lookback_hours: 24,
        checktime: CheckTime::Local,
        protime_person_ref: None,
    };
    CrossChexClient::new(&cfg, options()).expect("client")
}

fn name_space(r: &Request) -> &str {
    assert_eq!((r.method.clone(), r.path.as_str()), (Method::POST, "/"));
    r.body["header"]["nameSpace"].as_str().unwrap_or_default()
}

fn local(s: &str) -> NaiveDateTime {
    NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S").expect("time")
}

#[tokio::test]
async fn crosschex_token_and_getrecord_answers_from_the_post() {
    let addr = serve(
        "crosschex",
        Arc::new(|r: &Request| match name_space(r) {
            "authorize.token" => (200, "token.json"),
            "attendance.record" => {
                // The token of the post's answer is the one sent back.
                assert!(r.body["authorize"]["token"]
                    .as_str()
                    .is_some_and(|t| t.ends_with(".4jelxAUXaxjcxisIxAUkw3Bp9ljhQBFLw9O_6BgH6kw")));
                (200, "getrecord.json")
            }
            other => panic!("unexpected nameSpace {other:?}"),
        }),
    )
    .await;
    let records = crosschex(addr)
        .get_records(local("2022-06-01T12:46:43"), local("2022-10-24T12:46:43"))
        .await
        .expect("records");
    assert_eq!(records.len(), 1);
    let r = &records[0];
    assert_eq!(r.checktype, 128);
    assert_eq!(r.checktime, local("2022-07-20T20:15:05"));
    assert_eq!(r.device_serial, "1750120622290025");
    assert_eq!(r.device_name.as_deref(), Some("FaceDeep3-IRT10"));
    assert_eq!(r.workno, "1");
    assert_eq!(
        (
            r.first_name.as_deref(),
            r.last_name.as_deref(),
            r.uuid.as_deref()
        ),
        (Some("1"), Some("1"), None)
    );
    // The `+00:00` label carries the account's local wall clock.
    assert_eq!(
        r.occurred_at(CheckTime::Local, chrono_tz::Europe::Brussels)
            .to_rfc3339(),
        "2022-07-20T20:15:05+02:00"
    );
}

#[tokio::test]
async fn crosschex_exception_answers_map_to_error_kinds() {
    let refused = serve(
        "crosschex",
        Arc::new(|r: &Request| match name_space(r) {
            "authorize.token" => (200, "exception-auth-error.json"),
            other => panic!("no call before a token: {other:?}"),
        }),
    )
    .await;
    let e = crosschex(refused)
        .get_records(local("2022-06-01T12:46:43"), local("2022-10-24T12:46:43"))
        .await
        .expect_err("AUTH_ERROR");
    let ErrorKind::Auth(v) = &e.kind else {
        panic!("AUTH_ERROR at login is an auth failure: {e:?}");
    };
    assert_eq!((v.status, v.code.as_deref()), (200, Some("AUTH_ERROR")));

    let missing = serve(
        "crosschex",
        Arc::new(|r: &Request| match name_space(r) {
            "authorize.token" => (200, "token.json"),
            _ => (200, "exception-miss-param.json"),
        }),
    )
    .await;
    let e = crosschex(missing)
        .get_records(local("2022-06-01T12:46:43"), local("2022-10-24T12:46:43"))
        .await
        .expect_err("MISS_PARAM");
    let ErrorKind::Vendor(v) = &e.kind else {
        panic!("MISS_PARAM is the vendor's verdict: {e:?}");
    };
    assert_eq!((v.status, v.code.as_deref()), (200, Some("MISS_PARAM")));
    assert_eq!(v.message.as_deref(), Some("begin_time is required"));
}
