//! The CrossChex Cloud source against the fake CrossChex (envelopes, HTTP-200 errors, page caps,
//! expiring tokens, FREQUENT_REQUEST), with the real agent binary, its store on disk and a real
//! Mosquitto receiving the clockings.

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use badgegate::kit::fakes::crosschex::{
    endpoint, CrossChexControl, FakeCrossChex, Record, Shape, DEFAULT_API_KEY, DEFAULT_API_SECRET,
};
use badgegate::kit::fakes::Fault;
use badgegate::model::{local_to_instant, ClockingId, Direction};
use chrono::{NaiveDateTime, Timelike};
use serde_json::Value;
use support::*;

const LONG: Duration = Duration::from_secs(60);
const TZ: chrono_tz::Tz = chrono_tz::Europe::Brussels;
const CLAIMED: &str = "SER-1";
const UNCLAIMED: &str = "SER-2";

/// A fake account whose rate limit is 100 ms, and an agent reading it every second with
/// requests `request_interval_ms` apart. `seed` runs before the agent starts.
async fn rig(
    request_interval_ms: u64,
    extra: &str,
    seed: impl FnOnce(&CrossChexControl),
) -> (FakeCrossChex, CloudRig) {
    let fake = FakeCrossChex::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let ctl = fake.control();
    ctl.set_min_interval(Duration::from_millis(100));
    seed(&ctl);
    let source = format!(
        r#"
[[terminals]]
id = "door-1"
crosschex_serial = "{CLAIMED}"

[sources.crosschex]
base_url = "{}"
allow_insecure_http = true
api_key = "{DEFAULT_API_KEY}"
api_secret_file = "crosschex-secret"
timezone = "Europe/Brussels"
poll_interval_secs = 1
request_interval_ms = {request_interval_ms}
{extra}
"#,
        fake.base_url()
    );
    let rig = CloudRig::start(&[("crosschex-secret", DEFAULT_API_SECRET)], &source).await;
    (fake, rig)
}

fn local_now() -> NaiveDateTime {
    chrono::Utc::now().with_timezone(&TZ).naive_local()
}

fn minutes_ago(m: i64) -> NaiveDateTime {
    // Whole seconds: checktime has no fraction.
    let t = local_now() - chrono::Duration::minutes(m);
    t.with_nanosecond(0).unwrap()
}

fn record(serial: &str, workno: &str, checktime: NaiveDateTime) -> Record {
    Record {
        checktype: 56,
        checktime,
        device_serial: serial.into(),
        device_name: "FaceDeep3-IRT10".into(),
        first_name: "F".into(),
        last_name: format!("L{workno}"),
        workno: workno.into(),
    }
}

/// The id the agent gives a record: content-derived, so the test can compute it.
fn id_of(r: &Record) -> String {
    let terminal = if r.device_serial == CLAIMED {
        "door-1".to_owned()
    } else {
        format!("crosschex-{}", r.device_serial)
    };
    ClockingId::derive(
        SITE,
        &terminal,
        &r.workno,
        local_to_instant(r.checktime, TZ),
        Direction::Unknown,
    )
    .to_string()
}

fn ids(records: &[Record]) -> HashSet<String> {
    records.iter().map(id_of).collect()
}

/// Adds records to the fake and returns them.
fn upload(ctl: &CrossChexControl, records: Vec<Record>) -> Vec<Record> {
    for r in &records {
        ctl.add_record(r.clone());
    }
    records
}

/// Neither the API secret nor any token the fake issued is in the agent's log.
fn assert_no_secrets(fake: &FakeCrossChex, rig: &CloudRig) {
    let tokens = fake.control().wire().log().into_iter().filter_map(|r| {
        let body: Value = serde_json::from_str(&r.body).ok()?;
        body["authorize"]["token"].as_str().map(str::to_owned)
    });
    rig.assert_log_hides(std::iter::once(DEFAULT_API_SECRET.to_owned()).chain(tokens));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_become_clockings_across_capped_pages_late_uploads_and_token_expiry() {
    let mut first = Vec::new();
    let (fake, mut rig) = rig(200, "", |ctl| {
        // The live-client shape, a server that caps per_page at 2 whatever is asked.
        ctl.set_shape(Shape::Bare);
        ctl.set_per_page_cap(2);
        first = upload(
            ctl,
            vec![
                record(CLAIMED, "7", minutes_ago(50)),
                record(CLAIMED, "8", minutes_ago(40)),
                record(UNCLAIMED, "9", minutes_ago(30)),
                record(UNCLAIMED, "10", minutes_ago(20)),
                record(CLAIMED, "11", minutes_ago(10)),
            ],
        );
    })
    .await;
    let ctl = fake.control();
    let got = rig.sub.collect_ids(&ids(&first), LONG).await;
    let seven = got
        .iter()
        .find(|v| v["badge"] == "7")
        .expect("badge 7 arrived");
    assert_eq!(seven["source"], "crosschex");
    assert_eq!(seven["terminal"], "door-1", "claimed by crosschex_serial");
    assert_eq!(
        seven["direction"], "unknown",
        "checktype is not a direction"
    );
    assert_eq!(seven["status"], "AccessOk", "decided by the local engine");
    // The "+00:00" label was read as Brussels wall-clock time.
    let label = first[0].checktime;
    assert_eq!(seven["date"], label.format("%Y-%m-%d").to_string());
    assert_eq!(
        seven["time_of_day_minutes"],
        u64::from(label.hour() * 60 + label.minute())
    );
    assert_eq!(
        seven["occurred_at"],
        local_to_instant(label, TZ).to_rfc3339()
    );
    let nine = got.iter().find(|v| v["badge"] == "9").unwrap();
    assert_eq!(nine["terminal"], format!("crosschex-{UNCLAIMED}"));

    // A device uploads late: behind the watermark, inside the overlap window.
    let late = upload(&ctl, vec![record(UNCLAIMED, "12", minutes_ago(90))]);
    rig.sub.collect_ids(&ids(&late), LONG).await;

    // Every token issued so far expires: one new login, and the records keep coming.
    let logins = ctl.wire().count(endpoint::TOKEN);
    ctl.expire_tokens();
    let after = upload(&ctl, vec![record(CLAIMED, "13", minutes_ago(1))]);
    rig.sub.collect_ids(&ids(&after), LONG).await;
    assert_eq!(ctl.wire().count(endpoint::TOKEN), logins + 1);

    // The overlap is read at every poll, but nothing was submitted twice.
    let stored = "badgegate_source_clockings_total{source=\"crosschex\"}";
    assert_eq!(rig.metric(stored).await, 7.0);
    assert_eq!(rig.metric("badgegate_clockings_duplicate_total").await, 0.0);
    let health = rig.source_health("crosschex").await;
    assert_eq!(health["up"], true, "{health}");
    assert_eq!(health["clockings"], 7);
    assert!(
        health["position"].as_str().unwrap().starts_with("through "),
        "{health}"
    );
    assert_no_secrets(&fake, &rig);
    assert!(rig.agent.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_garbage_and_an_outage_are_survived_without_a_request_storm() {
    let (fake, mut rig) = rig(500, "", |_| {}).await;
    let ctl = fake.control();
    let started = Instant::now();

    // FREQUENT_REQUEST three times: the agent backs off and gets through.
    ctl.wire().fail_next_on(
        endpoint::GET_RECORD,
        3,
        Fault::RateLimited {
            retry_after_secs: 15,
        },
    );
    let first = upload(&ctl, vec![record(CLAIMED, "21", minutes_ago(5))]);
    rig.sub.collect_ids(&ids(&first), LONG).await;
    let requests = ctl.wire().total();
    let allowed = started.elapsed().as_secs_f64() / 0.5 + 2.0;
    assert!(
        (requests as f64) <= allowed,
        "{requests} requests in {:?}: a storm",
        started.elapsed()
    );

    // A proxy's garbage page: a clear error naming the API and the call, then recovery.
    ctl.wire()
        .fail_next_on(endpoint::GET_RECORD, 1, Fault::GarbageBody);
    rig.wait_source_error(
        "crosschex",
        "CrossChex Cloud attendance.record/getrecord: malformed answer",
    )
    .await;
    let second = upload(&ctl, vec![record(UNCLAIMED, "22", minutes_ago(4))]);
    rig.sub.collect_ids(&ids(&second), LONG).await;
    rig.wait_source("crosschex", "up again", |h| h["up"] == true)
        .await;

    // The cloud unreachable for a while: records uploaded meanwhile all arrive afterwards.
    ctl.wire().set_outage(true);
    let during = upload(
        &ctl,
        (0..3)
            .map(|i| record(CLAIMED, &format!("3{i}"), minutes_ago(3 - i)))
            .collect(),
    );
    rig.wait_source_error("crosschex", "CrossChex Cloud").await;
    let (status, health) = rig.api.get_json(&rig.agent, "/healthz").await;
    assert_eq!(status, 200, "the agent keeps working: {health}");
    ctl.wire().set_outage(false);
    rig.sub.collect_ids(&ids(&during), LONG).await;
    assert_no_secrets(&fake, &rig);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_sync_it_resumes_from_its_watermark_without_gaps_or_duplicates() {
    // Three days to catch up (read a day per step), two pages per day.
    let mut all = Vec::new();
    let (fake, mut rig) = rig(100, "lookback_hours = 72\noverlap_mins = 60", |ctl| {
        ctl.set_per_page_cap(4);
        all = upload(
            ctl,
            (0..23)
                .map(|i| {
                    let serial = if i % 2 == 0 { CLAIMED } else { UNCLAIMED };
                    record(
                        serial,
                        &format!("{}", 100 + i),
                        minutes_ago(60 * 3 * (23 - i) + 30),
                    )
                })
                .collect(),
        );
    })
    .await;
    let ctl = fake.control();
    // The first day is committed before the second day's first page is asked for: kill the agent
    // once a read of the second day has arrived (how many pages the first day took does not matter).
    assert!(ctl.wire().wait_for(endpoint::GET_RECORD, 1, LONG).await);
    let first_begin = begin_times(&ctl)[0];
    let mut reads = 1;
    while !begin_times(&ctl)
        .iter()
        .any(|b| *b >= first_begin + chrono::Duration::hours(23))
    {
        reads += 1;
        assert!(
            ctl.wire().wait_for(endpoint::GET_RECORD, reads, LONG).await,
            "no read of the second day after {reads} reads"
        );
    }
    rig.agent.kill9();
    let before = ctl.wire().count(endpoint::GET_RECORD) as usize;

    rig.agent.spawn();
    rig.sub.collect_ids(&ids(&all), LONG).await;
    // It resumed from its watermark (a day in, less the overlap), not from the lookback start.
    let resumed = begin_times(&ctl)[before];
    assert!(
        resumed >= first_begin + chrono::Duration::hours(23),
        "resumed at {resumed}, first read began at {first_begin}"
    );
    assert_eq!(
        rig.metric("badgegate_clockings_duplicate_total").await,
        0.0,
        "nothing read before the kill was submitted again"
    );
    rig.api.wait_drained(&rig.agent, LONG).await;
}

/// `begin_time` of every getrecord the fake received, in order.
fn begin_times(ctl: &CrossChexControl) -> Vec<NaiveDateTime> {
    window_times(ctl, "begin_time")
}

/// `end_time` of every getrecord the fake received, in order.
fn end_times(ctl: &CrossChexControl) -> Vec<NaiveDateTime> {
    window_times(ctl, "end_time")
}

fn window_times(ctl: &CrossChexControl, field: &str) -> Vec<NaiveDateTime> {
    ctl.wire()
        .log()
        .iter()
        .filter(|r| r.endpoint == endpoint::GET_RECORD)
        .filter_map(|r| serde_json::from_str::<Value>(&r.body).ok())
        .filter_map(|b| {
            b["payload"][field]
                .as_str()
                .and_then(|t| NaiveDateTime::parse_from_str(t, "%Y-%m-%dT%H:%M:%S+00:00").ok())
        })
        .collect()
}

/// A card shown `minutes` ago at the device: its wall clock then, and the instant.
fn device_local_moment(minutes: i64) -> (NaiveDateTime, chrono::DateTime<chrono::FixedOffset>) {
    let wall = minutes_ago(minutes);
    (wall, local_to_instant(wall, TZ))
}

/// The one clocking of `r`, read as happening at `instant`, arrives with that instant.
async fn assert_read_at(
    rig: &mut CloudRig,
    r: &Record,
    instant: chrono::DateTime<chrono::FixedOffset>,
) {
    let id = ClockingId::derive(SITE, "door-1", &r.workno, instant, Direction::Unknown).to_string();
    let got = rig.sub.collect_ids(&HashSet::from([id]), LONG).await;
    let c = got
        .iter()
        .find(|v| v["badge"] == r.workno.as_str())
        .unwrap();
    let at = chrono::DateTime::parse_from_rfc3339(c["occurred_at"].as_str().unwrap()).unwrap();
    assert_eq!(at, instant, "{c}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crosschex_checktime_local_is_read_in_the_device_zone() {
    let (wall, instant) = device_local_moment(30);
    // The account labels the device's wall clock "+00:00".
    let r = record(CLAIMED, "21", wall);
    let seeded = r.clone();
    let (fake, mut rig) = rig(100, "checktime = \"local\"", |ctl| {
        ctl.add_record(seeded);
    })
    .await;
    assert_read_at(&mut rig, &r, instant).await;
    // The read window is labelled on the same scale: it ends near the local wall clock now.
    let ends = end_times(&fake.control());
    let last = *ends.last().unwrap();
    assert!((last - local_now()).num_minutes().abs() <= 1, "{last}");
    assert!(rig.agent.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crosschex_checktime_utc_is_read_as_utc() {
    let (_, instant) = device_local_moment(30);
    // The account labels the same moment in UTC.
    let label = instant.naive_utc();
    let r = record(CLAIMED, "22", label);
    let seeded = r.clone();
    let (fake, mut rig) = rig(100, "checktime = \"utc\"", |ctl| {
        ctl.add_record(seeded);
    })
    .await;
    assert_read_at(&mut rig, &r, instant).await;
    let ends = end_times(&fake.control());
    let last = *ends.last().unwrap();
    let utc_now = chrono::Utc::now().naive_utc();
    assert!((last - utc_now).num_minutes().abs() <= 1, "{last}");
    assert!(rig.agent.terminate().success());
}
