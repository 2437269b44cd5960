//! The Aktion source against the fake Aktion (20-second tokens in the query, 1001/1008 errors,
//! `\/Date(ms)\/` dates, paged persons and shifts, the C4 event feed), with the real agent binary,
//! its store on disk and a real Mosquitto receiving the passages.

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use badgegate::kit::fakes::aktion::{
    endpoint, AktionControl, FakeAktion, HwEvent, Identifier, OffsetSuffix, Person, Shift,
    DEFAULT_API_KEY, DEFAULT_USER_LOGIN,
};
use badgegate::kit::fakes::Fault;
use badgegate::model::{ClockingId, Direction};
use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use serde_json::Value;
use support::*;

const LONG: Duration = Duration::from_secs(90);

/// Aktion knows P1 (card 90001) and P2 (card 90002, every identifier locked); controller C4-1
/// is the agent's terminal `door-a` (outside → production), C4-2 is claimed by no terminal. The
/// fake's server time is +01:00, the tenant zone configured is `Etc/GMT-1` (the same).
async fn rig(extra: &str, seed: impl FnOnce(&AktionControl)) -> (FakeAktion, CloudRig) {
    let fake = FakeAktion::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let ctl = fake.control();
    ctl.set_event_offset_suffix(OffsetSuffix::Alternate);
    for (i, lock) in [(1, false), (2, true)] {
        ctl.add_person(Person {
            person_id: format!("P{i}"),
            name: format!("Name{i}"),
            surname: format!("Surname{i}"),
            department: "Production".into(),
            identifier_card1: format!("9000{i}"),
            identifier_card2: None,
            identifier_entry_code: Some("1234".into()),
            identifiers: vec![],
            lock,
            time_last_change: Utc::now() - chrono::Duration::days(3),
        });
    }
    ctl.add_c4("C4-1", 11, "Gate A");
    ctl.add_c4("C4-2", 12, "Gate B");
    seed(&ctl);
    let c4s = if extra.contains("c4_controllers") {
        ""
    } else {
        r#"c4_controllers = ["C4-1", "C4-2"]"#
    };
    let source = format!(
        r#"
[[zones]]
name = "production"

[[terminals]]
id = "door-a"
aktion_c4 = "C4-1"
zone_from = "outside"
zone_to = "production"

[sources.aktion]
base_url = "{}"
allow_insecure_http = true
user_login = "{DEFAULT_USER_LOGIN}"
api_key_file = "aktion-key"
poll_interval_secs = 1
timezone = "Etc/GMT-1"
{c4s}
{extra}
"#,
        fake.base_url()
    );
    let rig = CloudRig::start(&[("aktion-key", DEFAULT_API_KEY)], &source).await;
    (fake, rig)
}

/// A passage `secs_ago` seconds ago, uploaded to the server a second later.
fn event(hw: i64, owner: Option<&str>, identifier: &str, direction: u8, secs_ago: i64) -> HwEvent {
    let date = Utc::now() - chrono::Duration::seconds(secs_ago);
    let date = DateTime::from_timestamp_millis(date.timestamp_millis()).unwrap();
    HwEvent {
        hw_structure_id: hw,
        date_created: date + chrono::Duration::seconds(1),
        date,
        event_code: 0,
        direction,
        owner_id: owner.map(str::to_owned),
        identifier: identifier.into(),
        zone: "Production".into(),
        descriptions: vec!["Passage".into()],
    }
}

fn id_of(e: &HwEvent) -> String {
    let terminal = if e.hw_structure_id == 11 {
        "door-a"
    } else {
        "aktion-C4-2"
    };
    let direction = match e.direction {
        1 => Direction::In,
        2 => Direction::Out,
        _ => Direction::Unknown,
    };
    ClockingId::derive(
        SITE,
        terminal,
        &e.identifier,
        e.date.fixed_offset(),
        direction,
    )
    .to_string()
}

fn add(ctl: &AktionControl, events: Vec<HwEvent>) -> HashSet<String> {
    events
        .into_iter()
        .map(|e| {
            let id = id_of(&e);
            ctl.add_hw_event(e);
            id
        })
        .collect()
}

/// Neither the API key nor any token (sent in the query) is in the agent's log.
fn assert_no_secrets(fake: &FakeAktion, rig: &CloudRig) {
    let tokens: HashSet<String> = fake
        .control()
        .wire()
        .query_values("Token")
        .into_iter()
        .collect();
    rig.assert_log_hides(std::iter::once(DEFAULT_API_KEY.to_owned()).chain(tokens));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passages_persons_and_shifts_come_from_aktion() {
    let now = Utc::now();
    let today = now.date_naive().and_time(chrono::NaiveTime::MIN).and_utc();
    let mut want = HashSet::new();
    let (fake, mut rig) = rig("people_interval_secs = 1", |ctl| {
        want = add(
            ctl,
            vec![
                event(11, Some("P1"), "90001", 1, 120),
                event(11, Some("P1"), "90001", 2, 60),
                event(12, None, "55555", 0, 30),
            ],
        );
        let shift = |name: &str, begin: i64, end: i64| Shift {
            person_id: "P1".into(),
            name: name.into(),
            begin: today + chrono::Duration::hours(begin),
            end: today + chrono::Duration::hours(end),
            description: String::new(),
            time_last_change: now - chrono::Duration::days(2),
        };
        ctl.add_shift(shift("morning", 6, 14));
        // A night shift: 22:00 to 06:00 the next day.
        ctl.add_shift(shift("night", 22, 30));
        // Long past: outside the window held.
        ctl.add_shift(shift("last month", -24 * 30, -24 * 30 + 8));
    })
    .await;
    let ctl = fake.control();
    let got = rig.sub.collect_ids(&want, LONG).await;
    let arrival = got.iter().find(|v| v["direction"] == "in").unwrap();
    assert_eq!(arrival["source"], "aktion");
    assert_eq!(arrival["terminal"], "door-a", "claimed by aktion_c4");
    assert_eq!(arrival["badge"], "90001");
    assert_eq!(arrival["person"], "P1");
    assert_eq!(arrival["status"], "AccessOk", "Aktion's verdict");
    let departure = got.iter().find(|v| v["direction"] == "out").unwrap();
    assert_eq!(departure["terminal"], "door-a");
    let unknown = got.iter().find(|v| v["badge"] == "55555").unwrap();
    assert_eq!(unknown["terminal"], "aktion-C4-2");
    assert_eq!(unknown["status"], "UnknownBadge", "no owner in Aktion");
    assert_eq!(unknown["person"], Value::Null);
    assert_eq!(unknown["direction"], "unknown");

    // Persons and the two shifts of the window (the night one crossing midnight).
    eventually("persons and shifts loaded", LONG, || async {
        let h = rig.source_health("aktion").await;
        h["people"] == 2 && h["shifts"] == 2
    })
    .await;
    // Refreshed by TimeLastChange: a shift changed since the last look is picked up.
    ctl.add_shift(Shift {
        person_id: "P2".into(),
        name: "afternoon".into(),
        begin: today + chrono::Duration::hours(14),
        end: today + chrono::Duration::hours(22),
        description: String::new(),
        time_last_change: Utc::now(),
    });
    eventually("the changed shift is loaded", LONG, || async {
        rig.source_health("aktion").await["shifts"] == 3
    })
    .await;
    assert!(
        ctl.wire()
            .log()
            .iter()
            .any(|r| r.endpoint == endpoint::SCHEDULED_SHIFT && r.uri.contains("TimeLastChange=")),
        "refreshes ask by TimeLastChange"
    );

    // Every token expires (1001): one new login, the passages keep coming.
    let logins = ctl.wire().count(endpoint::LOGIN);
    ctl.expire_tokens();
    let later = add(&ctl, vec![event(11, Some("P1"), "90001", 1, 1)]);
    rig.sub.collect_ids(&later, LONG).await;
    assert!(ctl.wire().count(endpoint::LOGIN) > logins);
    assert_eq!(
        rig.metric("badgegate_clockings_duplicate_total").await,
        0.0,
        "LastSync: no event was read twice"
    );
    assert_eq!(rig.source_health("aktion").await["up"], true);
    assert_no_secrets(&fake, &rig);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_policy_restarts_garbage_and_outages_lose_nothing_and_duplicate_nothing() {
    let mut first = HashSet::new();
    let (fake, mut rig) = rig("", |ctl| {
        first = add(ctl, vec![event(11, Some("P1"), "90001", 1, 300)]);
    })
    .await;
    let ctl = fake.control();
    rig.sub.collect_ids(&first, LONG).await;

    // 1008 "request rate policy violated", twice: a back-off in seconds, then through.
    let started = Instant::now();
    let before = ctl.wire().total();
    ctl.wire().fail_next_on(
        endpoint::HW_EVENTS,
        2,
        Fault::RateLimited {
            retry_after_secs: 1,
        },
    );
    let after_1008 = add(&ctl, vec![event(12, Some("P2"), "90002", 2, 200)]);
    rig.sub.collect_ids(&after_1008, LONG).await;
    let requests = ctl.wire().total() - before;
    let allowed = started.elapsed().as_secs_f64() / 0.25 + 2.0;
    assert!(
        (requests as f64) <= allowed,
        "{requests} requests in {:?}: a storm",
        started.elapsed()
    );

    // Killed; passages land meanwhile; restarted: read from the stored LastSync.
    rig.agent.kill9();
    let seen = ctl.wire().count(endpoint::HW_EVENTS) as usize;
    let while_down = add(
        &ctl,
        vec![
            event(11, Some("P1"), "90001", 2, 100),
            event(12, None, "77777", 1, 90),
        ],
    );
    rig.agent.spawn();
    rig.sub.collect_ids(&while_down, LONG).await;
    let resumed: Vec<_> = ctl
        .wire()
        .log()
        .into_iter()
        .filter(|r| r.endpoint == endpoint::HW_EVENTS)
        .skip(seen)
        .take(2)
        .collect();
    assert!(
        resumed.iter().all(|r| r.uri.contains("LastSync=")),
        "resumed from the watermark: {resumed:?}"
    );
    assert_eq!(rig.metric("badgegate_clockings_duplicate_total").await, 0.0);

    // Garbage: a clear error naming the API and the call; then it recovers.
    ctl.wire()
        .fail_next_on(endpoint::HW_EVENTS, 1, Fault::GarbageBody);
    rig.wait_source_error(
        "aktion",
        "Aktion GET HwStructure/getC4HwEvents: malformed answer",
    )
    .await;
    rig.wait_source("aktion", "up again", |h| h["up"] == true)
        .await;

    // Aktion unreachable for a while: the passages of that time arrive afterwards.
    ctl.wire().set_outage(true);
    let during = add(&ctl, vec![event(11, Some("P1"), "90001", 1, 5)]);
    rig.wait_source_error("aktion", "Aktion ").await;
    ctl.wire().set_outage(false);
    rig.sub.collect_ids(&during, LONG).await;
    rig.api.wait_drained(&rig.agent, LONG).await;
    assert_no_secrets(&fake, &rig);
}

fn code(mut e: HwEvent, event_code: i32) -> HwEvent {
    e.event_code = event_code;
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c4_events_with_guid_ids_become_clockings() {
    let mut want = HashSet::new();
    let (fake, mut rig) = rig("", |ctl| {
        want = add(
            ctl,
            vec![
                event(11, Some("P1"), "90001", 1, 50),
                event(11, Some("P1"), "90001", 2, 40),
            ],
        );
    })
    .await;
    let ctl = fake.control();
    let got = rig.sub.collect_ids(&want, LONG).await;
    assert!(got
        .iter()
        .all(|v| v["person"] == "P1" && v["status"] == "AccessOk"));
    // Polls go on every second; the watermark's second comes back each time (whole-second
    // LastSync) and is dropped by GUID: never stored twice.
    let polls = ctl.wire().count(endpoint::HW_EVENTS);
    eventually("a few more polls", LONG, || async {
        ctl.wire().count(endpoint::HW_EVENTS) >= polls + 6
    })
    .await;
    assert_eq!(rig.metric("badgegate_clockings_duplicate_total").await, 0.0);
    assert_eq!(rig.source_health("aktion").await["clockings"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_poll_sends_last_sync_from_lookback() {
    let mut want = HashSet::new();
    let (fake, mut rig) = rig("lookback_hours = 2", |ctl| {
        // Stored 3 h ago: before the lookback, not read.
        add(ctl, vec![event(11, Some("P1"), "90001", 1, 3 * 3600)]);
        want = add(ctl, vec![event(11, Some("P1"), "90001", 2, 3600)]);
    })
    .await;
    let ctl = fake.control();
    rig.sub.collect_ids(&want, LONG).await;
    let sent = ctl.wire().query_values("LastSync");
    // As logged on the wire: percent-encoded.
    let first = sent
        .first()
        .expect("LastSync sent on the first poll")
        .replace("%3A", ":");
    let local = NaiveDateTime::parse_from_str(&first, "%Y-%m-%dT%H:%M:%S")
        .unwrap_or_else(|e| panic!("{first:?} is not yyyy-MM-ddTHH:mm:ss: {e}"));
    let at = chrono_tz::Etc::GMTMinus1
        .from_local_datetime(&local)
        .single()
        .unwrap()
        .with_timezone(&Utc);
    let expected = Utc::now() - chrono::Duration::hours(2);
    assert!(
        (at - expected).num_seconds().abs() < 300,
        "LastSync {first} (+01:00) is not 2 h back"
    );
    // Later polls send the newest DateCreated read.
    eventually("a poll from the watermark", LONG, || async {
        ctl.wire().query_values("LastSync").len() >= 3
    })
    .await;
    let newest = ctl
        .wire()
        .query_values("LastSync")
        .last()
        .unwrap()
        .replace("%3A", ":");
    assert!(newest > first, "{newest} after {first}");
    assert_eq!(rig.source_health("aktion").await["clockings"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locked_or_expired_identifiers_are_not_badges() {
    let mut want = HashSet::new();
    let (_fake, mut rig) = rig("", |ctl| {
        let yesterday = (Utc::now() - chrono::Duration::days(1))
            .with_timezone(&chrono_tz::Etc::GMTMinus1)
            .naive_local();
        let mut locked = Identifier::card("A10");
        locked.lock = true;
        let mut expired = Identifier::card("A20");
        expired.valid_to = Some(yesterday);
        let mut lost = Identifier::card("A40");
        lost.status = 2;
        ctl.add_person(Person {
            person_id: "P3".into(),
            name: "Name3".into(),
            surname: "Surname3".into(),
            department: "Production".into(),
            identifier_card1: "A30".into(),
            identifier_card2: None,
            identifier_entry_code: None,
            identifiers: vec![locked, expired, lost],
            lock: false,
            time_last_change: Utc::now(),
        });
        want = add(
            ctl,
            vec![
                event(11, Some("P3"), "A10", 1, 40),
                event(11, Some("P3"), "A20", 1, 30),
                event(11, Some("P3"), "A30", 1, 20),
                event(11, Some("P3"), "A40", 1, 15),
                event(11, Some("P2"), "90002", 1, 10),
            ],
        );
    })
    .await;
    let got = rig.sub.collect_ids(&want, LONG).await;
    let by_badge = |b: &str| got.iter().find(|v| v["badge"] == b).unwrap().clone();
    assert_eq!(by_badge("A30")["person"], "P3", "the open card is a badge");
    for badge in ["A10", "A20", "A40", "90002"] {
        assert_eq!(
            by_badge(badge)["person"],
            Value::Null,
            "{badge} is no badge"
        );
    }
    eventually("persons loaded", LONG, || async {
        rig.source_health("aktion").await["people"] == 3
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_event_code_is_not_access_ok() {
    let mut want = HashSet::new();
    let (fake, mut rig) = rig(r#"event_codes = { "17" = "AccessRefused" }"#, |ctl| {
        want = add(
            ctl,
            vec![
                code(event(11, Some("P1"), "90001", 1, 30), 17),
                code(event(11, Some("P1"), "90001", 1, 20), 0),
                code(event(11, Some("P1"), "90001", 2, 10), 99),
            ],
        );
    })
    .await;
    let _ctl = fake.control();
    let got = rig.sub.collect_ids(&want, LONG).await;
    let refused: Vec<_> = got
        .iter()
        .filter(|v| v["status"] == "AccessRefused")
        .collect();
    assert_eq!(refused.len(), 1, "{got:?}");
    assert_eq!(refused[0]["person"], "P1", "a known person, refused");
    let plain = got
        .iter()
        .find(|v| v["direction"] == "in" && v["status"] != "AccessRefused");
    assert_eq!(plain.unwrap()["status"], "AccessOk", "EventCode 0: {got:?}");
    // EventCode 99 is unmapped: no Aktion verdict, the access engine decided (P1 is known).
    let unmapped = got.iter().find(|v| v["direction"] == "out").unwrap();
    assert_eq!(unmapped["person"], "P1");
    rig.wait_source("aktion", "the unmapped code is counted", |h| {
        h["position"]
            .as_str()
            .is_some_and(|p| p.contains("unmapped EventCodes: 99 (1×)"))
    })
    .await;
    assert!(rig
        .agent
        .log()
        .contains("EventCode not in sources.aktion.event_codes"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_controller_1228_shows_in_status() {
    let mut want = HashSet::new();
    let extra = "c4_controllers = [\"C4-1\", \"C4-9\"]\npeople_interval_secs = 1";
    let (fake, mut rig) = rig(extra, |ctl| {
        want = add(ctl, vec![event(11, Some("P1"), "90001", 1, 20)]);
    })
    .await;
    let ctl = fake.control();
    rig.wait_source_error(
        "aktion",
        "C4 controller 'C4-9' unknown (error 1228: Hw structure physical not found) — check sources.aktion.c4_controllers",
    )
    .await;
    // The other controller is read all the same.
    rig.sub.collect_ids(&want, LONG).await;
    // `badgegate status` shows it.
    let cfg = rig.agent.config_path.to_str().unwrap().to_owned();
    let o = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_badgegate"))
            .args(["status", "--config", &cfg, "--json"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let status = String::from_utf8_lossy(&o.stdout);
    assert!(
        status.contains("C4 controller 'C4-9' unknown (error 1228"),
        "{status}"
    );
    // A privilege missing in Aktion: 1101 says what to grant.
    ctl.deny_persons(true);
    rig.wait_source_error(
        "aktion",
        "lacks the privilege View of agenda Persons (error 1101",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_event_is_skipped_not_stuck() {
    let mut before = HashSet::new();
    let (fake, mut rig) = rig("", |ctl| {
        before = add(ctl, vec![event(11, Some("P1"), "90001", 1, 40)]);
        ctl.add_malformed_hw_event(event(11, Some("P1"), "90001", 2, 30));
        before.extend(add(ctl, vec![event(11, Some("P1"), "90001", 1, 20)]));
    })
    .await;
    let ctl = fake.control();
    rig.sub.collect_ids(&before, LONG).await;
    rig.wait_source("aktion", "the malformed event is counted", |h| {
        h["skipped"].as_u64().is_some_and(|n| n >= 1) && h["up"] == true
    })
    .await;
    assert!(rig.agent.log().contains("is not a GUID"));
    // The feed moves on.
    let after = add(&ctl, vec![event(11, Some("P1"), "90001", 2, 1)]);
    rig.sub.collect_ids(&after, LONG).await;
}
