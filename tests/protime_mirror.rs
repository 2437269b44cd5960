//! The Protime mirror against the fake Protime (paged initial load across empty pages, delta
//! links, stale versions, 409/410, expiring tokens), with the real agent binary, its store on
//! disk and a real Mosquitto receiving the mirrored clockings.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use badgegate::kit::fakes::protime::{
    endpoint, AccessClockingSpec, AccessStatus, FakeProtime, ProtimeControl, Terminal,
    DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET,
};
use badgegate::kit::fakes::Fault;
use badgegate::model::{local_to_instant, ClockingId, Direction};
use chrono::{NaiveDate, NaiveTime};
use support::*;

const LONG: Duration = Duration::from_secs(90);
const TZ: chrono_tz::Tz = chrono_tz::Europe::Brussels;

/// Protime knows persons 1 (badge 4711) and 2 (4712), terminal 10 with our terminal id `gate-1`
/// as its external code, and terminal 20 (`turnstile-x`) the agent has not configured.
async fn rig(seed: impl FnOnce(&ProtimeControl)) -> (FakeProtime, CloudRig) {
    let fake = FakeProtime::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let ctl = fake.control();
    ctl.add_people(&[(1, "4711"), (2, "4712")]);
    for (id, code) in [(10, "gate-1"), (20, "turnstile-x")] {
        ctl.add_terminal(Terminal {
            id,
            external_code: code.into(),
        });
    }
    seed(&ctl);
    let sink = format!(
        "\n[sinks.protime]\nbase_url = \"{}\"\ntoken_url = \"{}\"\nallow_insecure_http = true\nclient_id = \"{DEFAULT_CLIENT_ID}\"\nclient_secret_file = \"protime-secret\"\ntimezone = \"Europe/Brussels\"\nmirror = true\nmirror_interval_secs = 1\n",
        fake.base_url(),
        fake.token_url()
    );
    let rig = CloudRig::start(&[("protime-secret", DEFAULT_CLIENT_SECRET)], &sink).await;
    (fake, rig)
}

fn today() -> NaiveDate {
    chrono::Utc::now().with_timezone(&TZ).date_naive()
}

fn spec(person_id: i64, days_ago: u64, minute: u16, terminal_id: i64) -> AccessClockingSpec {
    AccessClockingSpec {
        person_id,
        date: today() - chrono::Days::new(days_ago),
        time_of_day_in_minutes: minute,
        terminal_id,
        status: AccessStatus::AccessOk,
    }
}

/// The id the agent gives a mirrored access clocking (content-derived).
fn id_of(s: &AccessClockingSpec) -> String {
    let terminal = match s.terminal_id {
        10 => "gate-1".to_owned(),
        other => format!("protime-{other}"),
    };
    let badge = format!("471{}", s.person_id);
    let m = u32::from(s.time_of_day_in_minutes);
    let local = s
        .date
        .and_time(NaiveTime::from_hms_opt(m / 60, m % 60, 0).unwrap());
    ClockingId::derive(
        SITE,
        &terminal,
        &badge,
        local_to_instant(local, TZ),
        Direction::Unknown,
    )
    .to_string()
}

fn ids<'a>(specs: impl IntoIterator<Item = &'a AccessClockingSpec>) -> HashSet<String> {
    specs.into_iter().map(id_of).collect()
}

async fn protime_pending(rig: &CloudRig) -> u64 {
    let (_, v) = rig.api.get_json(&rig.agent, "/v1/queue/stats").await;
    v["sinks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["sink"] == "protime")
        .and_then(|s| s["pending"].as_u64())
        .unwrap()
}

/// Neither the client secret nor any bearer token the fake saw is in the agent's log.
fn assert_no_secrets(fake: &FakeProtime, rig: &CloudRig) {
    let tokens = fake.control().wire().log().into_iter().flat_map(|r| {
        r.headers
            .into_iter()
            .filter(|(k, _)| k == "authorization")
            .filter_map(|(_, v)| v.strip_prefix("Bearer ").map(str::to_owned))
    });
    rig.assert_log_hides(std::iter::once(DEFAULT_CLIENT_SECRET.to_owned()).chain(tokens));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_clockings_are_mirrored_with_their_status_and_never_echoed_to_protime() {
    let mut initial = Vec::new();
    let (fake, mut rig) = rig(|ctl| {
        // Two items per page, an empty page (with a nextLink) before each one.
        ctl.set_page_size(2);
        ctl.set_empty_pages(1);
        ctl.set_spell_unknown_badge_number(true);
        initial = vec![
            spec(1, 0, 480, 10),
            AccessClockingSpec {
                status: AccessStatus::AntiPassbackError,
                ..spec(2, 0, 490, 20)
            },
            AccessClockingSpec {
                status: AccessStatus::UnknownBadge,
                ..spec(2, 1, 1439, 10)
            },
        ];
        for s in &initial {
            ctl.add_access_clocking(s.clone());
        }
        // Older than mirror_days (7): not loaded.
        ctl.add_access_clocking(spec(1, 30, 600, 10));
    })
    .await;
    let ctl = fake.control();
    let got = rig.sub.collect_ids(&ids(&initial), LONG).await;
    let first = got.iter().find(|v| v["id"] == id_of(&initial[0])).unwrap();
    assert_eq!(first["source"], "protime");
    assert_eq!(
        first["terminal"], "gate-1",
        "@external-code is our terminal id"
    );
    assert_eq!(first["person"], "1");
    assert_eq!(first["badge"], "4711");
    assert_eq!(
        first["status"], "AccessOk",
        "Protime's status, not a local one"
    );
    assert_eq!(first["time_of_day_minutes"], 480);
    assert_eq!(first["direction"], "unknown");
    let second = got.iter().find(|v| v["id"] == id_of(&initial[1])).unwrap();
    assert_eq!(second["terminal"], "protime-20");
    assert_eq!(second["status"], "AntiPassbackError");
    let third = got.iter().find(|v| v["id"] == id_of(&initial[2])).unwrap();
    assert_eq!(
        third["status"], "UnknownBadge",
        "UnknownBadgeNumber on the wire"
    );
    assert_eq!(third["time_of_day_minutes"], 1439);

    // No echo: nothing mirrored is queued for, or posted to, Protime; a local clocking is.
    assert_eq!(protime_pending(&rig).await, 0);
    assert_eq!(ctl.wire().count(endpoint::POST_CLOCKINGS), 0);
    let (s, _) = rig
        .api
        .post(
            &rig.agent,
            &clocking("gate-1", "4711", "2026-07-02T08:00:00+02:00", "in"),
        )
        .await;
    assert_eq!(s, 202);
    assert!(ctl.wire().wait_for(endpoint::POST_CLOCKINGS, 1, LONG).await);
    eventually("the local clocking confirmed", LONG, || async {
        protime_pending(&rig).await == 0
    })
    .await;
    assert_eq!(ctl.clockings().len(), 1, "only the local clocking");

    // Deltas: an update, a deletion, a new one, and a stale re-send of the old version.
    let a = ctl
        .access_clockings()
        .into_iter()
        .find(|c| c.spec == initial[0])
        .unwrap();
    let b = ctl
        .access_clockings()
        .into_iter()
        .find(|c| c.spec == initial[1])
        .unwrap();
    let updated = spec(1, 0, 481, 10);
    let added = spec(2, 0, 700, 10);
    assert!(ctl.update_access_clocking(a.id, updated.clone()));
    assert!(ctl.delete_access_clocking(b.id));
    ctl.add_access_clocking(added.clone());
    assert!(ctl.resend_stale_access_clocking(a.id));
    rig.sub.collect_ids(&ids([&updated, &added]), LONG).await;
    // One more full delta round after that: the stale re-send was not submitted.
    let deltas = ctl.wire().count(endpoint::DELTA_ACCESS_CLOCKINGS);
    assert!(
        ctl.wire()
            .wait_for(endpoint::DELTA_ACCESS_CLOCKINGS, deltas + 2, LONG)
            .await
    );
    assert_eq!(rig.metric("badgegate_clockings_duplicate_total").await, 0.0);
    assert_eq!(
        rig.metric("badgegate_source_clockings_total{source=\"protime\"}")
            .await,
        5.0
    );

    // Tokens expire mid-run: one re-login, the mirror goes on.
    let logins = ctl.token_requests();
    ctl.expire_tokens();
    let later = spec(1, 0, 900, 20);
    ctl.add_access_clocking(later.clone());
    rig.sub.collect_ids(&ids([&later]), LONG).await;
    assert_eq!(ctl.token_requests(), logins + 1);

    let health = rig.source_health("protime").await;
    assert_eq!(health["up"], true, "{health}");
    assert_eq!(health["people"], 2, "the badge map was loaded");
    assert_eq!(health["position"], "delta");
    // The one token served the sink and the mirror alike: no login per call.
    assert!(ctl.token_requests() <= 3, "{}", ctl.token_requests());
    assert_no_secrets(&fake, &rig);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_expired_links_conflicts_garbage_and_outages_lose_nothing_and_duplicate_nothing() {
    let mut initial = Vec::new();
    let (fake, mut rig) = rig(|ctl| {
        initial = vec![spec(1, 0, 400, 10), spec(2, 0, 401, 20)];
        for s in &initial {
            ctl.add_access_clocking(s.clone());
        }
    })
    .await;
    let ctl = fake.control();
    rig.sub.collect_ids(&ids(&initial), LONG).await;
    rig.api.wait_drained(&rig.agent, LONG).await;

    // Killed; a change lands meanwhile; restarted: it resumes from the stored deltaLink.
    rig.agent.kill9();
    let loads = ctl.wire().count(endpoint::ACCESS_CLOCKINGS);
    let while_down = spec(1, 0, 402, 10);
    ctl.add_access_clocking(while_down.clone());
    rig.agent.spawn();
    rig.sub.collect_ids(&ids([&while_down]), LONG).await;
    assert_eq!(
        ctl.wire().count(endpoint::ACCESS_CLOCKINGS),
        loads,
        "no initial load again"
    );

    // 409: another delta is active; the agent backs off and carries on.
    ctl.set_delta_conflicts(2);
    let after_conflict = spec(2, 0, 403, 10);
    ctl.add_access_clocking(after_conflict.clone());
    rig.sub.collect_ids(&ids([&after_conflict]), LONG).await;

    // 410: the link expired; a full re-sync recognises what is held and stores only the new.
    ctl.expire_delta_tokens();
    let after_expiry = spec(1, 0, 404, 20);
    ctl.add_access_clocking(after_expiry.clone());
    rig.sub.collect_ids(&ids([&after_expiry]), LONG).await;
    assert!(
        ctl.wire().count(endpoint::ACCESS_CLOCKINGS) > loads,
        "re-synced"
    );
    assert_eq!(rig.metric("badgegate_clockings_duplicate_total").await, 0.0);

    // 429 with Retry-After: the next delta call waits that long, no sooner.
    ctl.wire().fail_next_on(
        endpoint::DELTA_ACCESS_CLOCKINGS,
        1,
        Fault::RateLimited {
            retry_after_secs: 2,
        },
    );
    let limited = || {
        ctl.wire()
            .log()
            .iter()
            .any(|r| r.endpoint == endpoint::DELTA_ACCESS_CLOCKINGS && r.status == Some(429))
    };
    eventually("the 429 was answered", LONG, || async { limited() }).await;
    let limited_at = std::time::Instant::now();
    let calls = ctl.wire().count(endpoint::DELTA_ACCESS_CLOCKINGS);
    assert!(
        ctl.wire()
            .wait_for(endpoint::DELTA_ACCESS_CLOCKINGS, calls + 1, LONG)
            .await
    );
    assert!(
        limited_at.elapsed() >= Duration::from_millis(1800),
        "Retry-After ignored: {:?}",
        limited_at.elapsed()
    );

    // Garbage from a proxy: a clear error naming the API and the call; then it recovers.
    ctl.wire()
        .fail_next_on(endpoint::DELTA_ACCESS_CLOCKINGS, 1, Fault::GarbageBody);
    rig.wait_source_error(
        "protime",
        "Protime GET /delta/access-clockings: malformed answer",
    )
    .await;
    rig.wait_source("protime", "up again", |h| h["up"] == true)
        .await;

    // Protime unreachable for a while: what changed meanwhile arrives afterwards.
    ctl.wire().set_outage(true);
    let during = spec(2, 0, 405, 20);
    ctl.add_access_clocking(during.clone());
    rig.wait_source_error("protime", "Protime GET").await;
    ctl.wire().set_outage(false);
    rig.sub.collect_ids(&ids([&during]), LONG).await;
    assert_eq!(rig.metric("badgegate_clockings_duplicate_total").await, 0.0);
    assert_eq!(ctl.wire().count(endpoint::POST_CLOCKINGS), 0, "no echo");
    assert_no_secrets(&fake, &rig);
}
