//! The Protime sink against the fake Protime (wire format, quirks, faults), with the real agent
//! binary, its store on disk and a real Mosquitto (the MQTT sink runs beside it).

mod support;

use std::time::Duration;

use badgegate::kit::fakes::protime::{
    endpoint, FakeProtime, Person, PostFault, Terminal, SCOPE_CLOCKINGS_WRITE,
};
use badgegate::kit::fakes::Fault;
use serde_json::Value;
use support::*;

const LONG: Duration = Duration::from_secs(60);

struct Rig {
    _mosquitto: Mosquitto,
    fake: FakeProtime,
    _dir: tempfile::TempDir,
    agent: AgentProc,
    api: Api,
}

async fn rig() -> Rig {
    rig_with("").await
}

/// `extra` goes first into the config, inside the `[[terminals]]` table of gate-2; the
/// `[sinks.protime]` section follows it, then `sink_extra` inside that section.
async fn rig_with_sink(extra: &str, sink_extra: &str) -> Rig {
    let mosquitto = Mosquitto::start();
    let fake = FakeProtime::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let ctl = fake.control();
    ctl.add_people(&[(1, "4711"), (2, "4712")]);
    ctl.add_terminal(Terminal {
        id: 10,
        external_code: "gate-1".into(),
    });
    ctl.add_terminal(Terminal {
        id: 20,
        external_code: "gate-2".into(),
    });
    let dir = tempfile::tempdir().unwrap();
    let sink = format!("{extra}{}{sink_extra}", protime_sink(dir.path(), &fake));
    let agent = AgentProc::start_with(dir.path(), &mosquitto.url(), "", &sink);
    Rig {
        _mosquitto: mosquitto,
        fake,
        _dir: dir,
        agent,
        api: Api::new(),
    }
}

async fn rig_with(extra: &str) -> Rig {
    rig_with_sink(extra, "").await
}

/// The `person` of every POST /clockings the fake received, in order.
fn posted_people(fake: &FakeProtime) -> Vec<Value> {
    fake.control()
        .wire()
        .log()
        .into_iter()
        .filter(|r| r.endpoint == endpoint::POST_CLOCKINGS)
        .filter_map(|r| serde_json::from_str::<Value>(&r.body).ok())
        .map(|b| b["person"].clone())
        .collect()
}

async fn protime_queue(api: &Api, agent: &AgentProc) -> (u64, u64) {
    let (_, v) = api.get_json(agent, "/v1/queue/stats").await;
    let s = v["sinks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["sink"] == "protime")
        .cloned()
        .unwrap();
    (
        s["pending"].as_u64().unwrap(),
        s["dead_letters"].as_u64().unwrap(),
    )
}

async fn wait_protime(api: &Api, agent: &AgentProc, want: (u64, u64)) {
    eventually(&format!("protime queue {want:?}"), LONG, || async {
        protime_queue(api, agent).await == want
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clockings_reach_protime_once_rejections_become_dead_letters_and_replay() {
    // Bound whole: the temporary directory holds the config and the store.
    let rig = rig().await;
    let Rig {
        fake, agent, api, ..
    } = &rig;
    let ctl = fake.control();

    // 23:30 UTC on 1 July is 01:30 on 2 July in Brussels.
    let (s, _) = api
        .post(
            agent,
            &clocking("gate-1", "4711", "2026-07-01T23:30:00Z", "in"),
        )
        .await;
    assert_eq!(s, 202);
    wait_protime(api, agent, (0, 0)).await;
    let stored = ctl.clockings();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].person_id, 1);
    assert_eq!(stored[0].date.to_string(), "2026-07-02");
    assert_eq!(stored[0].time_of_day_in_minutes, 90);
    assert_eq!(stored[0].kind.as_str(), "InOut");
    assert_eq!(stored[0].terminal_id, Some(10));

    // Protime stores the next POST but the connection drops before the answer: the agent
    // looks it up instead of posting again.
    ctl.wire()
        .fail_next_on(endpoint::POST_CLOCKINGS, 1, Fault::ProcessThenDrop);
    api.post(
        agent,
        &clocking("gate-2", "4712", "2026-07-02T08:00:00+02:00", "out"),
    )
    .await;
    wait_protime(api, agent, (0, 0)).await;
    assert_eq!(
        ctl.clockings().len(),
        2,
        "the lost answer produced no duplicate"
    );
    assert!(
        ctl.wire().count(endpoint::GET_CLOCKINGS) >= 1,
        "it looked before re-sending"
    );

    // An unknown badge is rejected: a dead letter, and the queue goes on.
    api.post(
        agent,
        &clocking("gate-1", "9999", "2026-07-02T08:05:00+02:00", "in"),
    )
    .await;
    api.post(
        agent,
        &clocking("gate-1", "4711", "2026-07-02T08:06:00+02:00", "out"),
    )
    .await;
    wait_protime(api, agent, (0, 1)).await;
    assert_eq!(ctl.clockings().len(), 3);
    assert_eq!(
        api.metric(agent, "badgegate_dead_letters{sink=\"protime\"}")
            .await,
        1.0
    );
    let (_, health) = api.get_json(agent, "/healthz").await;
    assert_eq!(health["dead_letters"], 1);
    let cfg = agent.config_path.to_str().unwrap().to_owned();
    let listed = tokio::task::spawn_blocking({
        let cfg = cfg.clone();
        move || {
            badgegate()
                .args([
                    "queue", "list", "--config", &cfg, "--sink", "protime", "--json",
                ])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let line: Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(line["badge"], "9999");
    assert!(
        line["dead_letters"][0]["reason"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("badge"),
        "{line}"
    );

    // The badge gets a person in Protime; the dead letter is replayed and delivered.
    ctl.add_person(Person {
        id: 3,
        badge_number: "9999".into(),
        employee_number: "E3".into(),
        first_name: "Late".into(),
        last_name: "Arrival".into(),
    });
    let out = tokio::task::spawn_blocking(move || {
        badgegate()
            .args([
                "queue",
                "replay-dead-letters",
                "--config",
                &cfg,
                "--sink",
                "protime",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("1 dead letter(s)"));
    wait_protime(api, agent, (0, 0)).await;
    let stored = ctl.clockings();
    assert_eq!(stored.len(), 4);
    assert!(stored.iter().any(|c| c.person_id == 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_while_a_post_is_in_flight_never_duplicates() {
    let mut rig = rig().await;
    let Rig {
        fake, agent, api, ..
    } = &mut rig;
    let ctl = fake.control();
    // Protime processes the POST, then takes its time to answer.
    ctl.wire().fail_next_on(
        endpoint::POST_CLOCKINGS,
        1,
        Fault::SlowAnswer(Duration::from_secs(30)),
    );
    api.post(
        agent,
        &clocking("gate-1", "4711", "2026-07-02T08:00:00+02:00", "in"),
    )
    .await;
    assert!(ctl.wire().wait_for(endpoint::POST_CLOCKINGS, 1, LONG).await);
    eventually("the POST was processed", LONG, || async {
        ctl.clockings().len() == 1
    })
    .await;
    agent.kill9();

    agent.spawn();
    wait_protime(api, agent, (0, 0)).await;
    assert_eq!(
        ctl.clockings().len(),
        1,
        "found by the lookup, not posted again"
    );
    assert!(ctl.wire().count(endpoint::GET_CLOCKINGS) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protime_unreachable_for_a_while_then_everything_delivered() {
    let rig = rig().await;
    let Rig {
        fake, agent, api, ..
    } = &rig;
    let ctl = fake.control();
    ctl.wire().set_outage(true);
    let items: Vec<Value> = (0..20)
        .map(|i| {
            clocking(
                if i % 2 == 0 { "gate-1" } else { "gate-2" },
                if i % 3 == 0 { "4711" } else { "4712" },
                &format!("2026-07-03T09:{i:02}:00+02:00"),
                "in",
            )
        })
        .collect();
    api.post_all(agent, &items).await;
    eventually("Protime marked unreachable", LONG, || async {
        api.get_json(agent, "/healthz").await.1["protime"]["last_error"].is_string()
    })
    .await;
    assert_eq!(protime_queue(api, agent).await, (20, 0));
    ctl.wire().set_outage(false);
    wait_protime(api, agent, (0, 0)).await;
    assert_eq!(ctl.clockings().len(), 20, "each exactly once");
}

/// The dead letters' reasons `queue list` shows for the Protime sink.
async fn dead_letter_reasons(agent: &AgentProc) -> Vec<String> {
    let cfg = agent.config_path.to_str().unwrap().to_owned();
    let listed = tokio::task::spawn_blocking(move || {
        badgegate()
            .args([
                "queue", "list", "--config", &cfg, "--sink", "protime", "--json",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    String::from_utf8_lossy(&listed.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .flat_map(|v| {
            v["dead_letters"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter_map(|d| d["reason"].as_str().map(str::to_owned))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_502_after_the_post_landed_is_looked_up_not_reposted() {
    let rig = rig().await;
    let Rig {
        fake, agent, api, ..
    } = &rig;
    let ctl = fake.control();
    // What a reverse proxy in front of a slow backend does: the backend stores the clocking,
    // the proxy answers 502/504/408; and once the connection is reset after the store.
    ctl.fail_post(23, PostFault::StoreThenAnswer(502));
    ctl.fail_post(41, PostFault::StoreThenAnswer(504));
    ctl.fail_post(97, PostFault::StoreThenAnswer(408));
    ctl.fail_post(150, PostFault::StoreThenReset);
    let items: Vec<Value> = (0..300)
        .map(|i| {
            clocking(
                if i % 2 == 0 { "gate-1" } else { "gate-2" },
                if i % 3 == 0 { "4711" } else { "4712" },
                &format!("2026-07-03T{:02}:{:02}:00+02:00", 6 + i / 60, i % 60),
                "in",
            )
        })
        .collect();
    api.post_all(agent, &items).await;
    eventually(
        "300 clockings delivered",
        Duration::from_secs(240),
        || async { protime_queue(api, agent).await == (0, 0) },
    )
    .await;
    let stored = ctl.clockings();
    let distinct: std::collections::BTreeSet<_> = stored
        .iter()
        .map(|c| (c.person_id, c.date, c.time_of_day_in_minutes, c.terminal_id))
        .collect();
    assert_eq!(distinct.len(), 300, "every clocking arrived");
    assert_eq!(stored.len(), 300, "and none twice");
    assert_eq!(
        ctl.wire().count(endpoint::POST_CLOCKINGS),
        300,
        "the four in doubt were found by the lookup, not posted again"
    );
    assert!(ctl.wire().count(endpoint::GET_CLOCKINGS) >= 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clockings_of_one_badge_in_one_minute_both_arrive_once() {
    let rig = rig().await;
    let Rig {
        fake, agent, api, ..
    } = &rig;
    let ctl = fake.control();
    // An In at 08:00:10 and an Out at 08:00:40: Protime keeps both as the same InOut minute.
    api.post(
        agent,
        &clocking("gate-1", "4711", "2026-07-02T08:00:10+02:00", "in"),
    )
    .await;
    wait_protime(api, agent, (0, 0)).await;
    // The Out's POST is cut before Protime processed it: the lookup finds the In, which is not
    // the Out.
    ctl.wire()
        .fail_next_on(endpoint::POST_CLOCKINGS, 1, Fault::DropConnection);
    api.post(
        agent,
        &clocking("gate-1", "4711", "2026-07-02T08:00:40+02:00", "out"),
    )
    .await;
    wait_protime(api, agent, (0, 0)).await;
    assert_eq!(ctl.clockings().len(), 2, "the Out was not taken for the In");
    assert!(ctl.wire().count(endpoint::GET_CLOCKINGS) >= 1, "it looked");
    assert_eq!(ctl.wire().count(endpoint::POST_CLOCKINGS), 3);

    // A third one that minute lands behind a 502: found (three matches, two delivered before),
    // not posted again.
    ctl.fail_post(4, PostFault::StoreThenAnswer(502));
    api.post(
        agent,
        &clocking("gate-1", "4711", "2026-07-02T08:00:55+02:00", "in"),
    )
    .await;
    wait_protime(api, agent, (0, 0)).await;
    assert_eq!(ctl.clockings().len(), 3);
    assert_eq!(ctl.wire().count(endpoint::POST_CLOCKINGS), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clocking_redated_overnight_is_found_by_the_lookup() {
    let rig = rig().await;
    let Rig {
        fake, agent, api, ..
    } = &rig;
    let ctl = fake.control();
    // The schedule books clockings before 06:00 on the night shift that began the day before.
    ctl.set_overnight_until(Some(360));
    ctl.wire()
        .fail_next_on(endpoint::POST_CLOCKINGS, 1, Fault::ProcessThenDrop);
    api.post(
        agent,
        &clocking("gate-1", "4711", "2026-07-02T00:30:00+02:00", "out"),
    )
    .await;
    wait_protime(api, agent, (0, 0)).await;
    let stored = ctl.clockings();
    assert_eq!(
        stored.len(),
        1,
        "found on the previous date, not posted again"
    );
    assert_eq!(stored[0].date.to_string(), "2026-07-01");
    assert_eq!(stored[0].time_of_day_in_minutes, 1470);
    assert_eq!(ctl.wire().count(endpoint::POST_CLOCKINGS), 1);
    assert!(ctl.wire().count(endpoint::GET_CLOCKINGS) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_409_becomes_a_dead_letter_and_the_queue_moves_on() {
    let rig = rig().await;
    let Rig {
        fake, agent, api, ..
    } = &rig;
    let ctl = fake.control();
    ctl.add_people(&[(3, "4713")]);
    ctl.refuse_badge("4713", 409);
    api.post(
        agent,
        &clocking("gate-1", "4713", "2026-07-02T08:00:00+02:00", "in"),
    )
    .await;
    api.post(
        agent,
        &clocking("gate-1", "4711", "2026-07-02T08:01:00+02:00", "in"),
    )
    .await;
    api.post(
        agent,
        &clocking("gate-2", "4712", "2026-07-02T08:02:00+02:00", "in"),
    )
    .await;
    wait_protime(api, agent, (0, 1)).await;
    assert_eq!(ctl.clockings().len(), 2, "the queue went on");
    assert_eq!(
        ctl.wire().count(endpoint::POST_CLOCKINGS),
        3,
        "the refused one was posted once"
    );
    let reasons = dead_letter_reasons(agent).await;
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    assert!(reasons[0].contains("409"), "{reasons:?}");
    assert!(
        reasons[0].contains("locked"),
        "Protime's reason: {reasons:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_missing_scope_is_reported_as_configuration() {
    let rig = rig().await;
    let Rig {
        fake, agent, api, ..
    } = &rig;
    let ctl = fake.control();
    // The client's grant lost clockings.write: tokens come without it, POSTs answer 401.
    ctl.withhold_scope(SCOPE_CLOCKINGS_WRITE, 401);
    api.post(
        agent,
        &clocking("gate-1", "4711", "2026-07-02T08:00:00+02:00", "in"),
    )
    .await;
    let last_error = || async {
        let (_, health) = api.get_json(agent, "/healthz").await;
        health["protime"]["last_error"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    eventually("the missing scope reported", LONG, || async {
        last_error().await.contains(SCOPE_CLOCKINGS_WRITE)
    })
    .await;
    let reported = last_error().await;
    assert!(reported.starts_with("configuration problem"), "{reported}");
    // Not the clocking's fault: no dead letter, it waits in the queue.
    assert_eq!(protime_queue(api, agent).await, (1, 0));
    assert!(ctl.clockings().is_empty());
    // One attempt (and the one fresh login a 401 earns), then a slow retry, not a storm.
    assert_eq!(ctl.wire().count(endpoint::POST_CLOCKINGS), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn employee_number_reference_is_sent_when_configured() {
    let rig = rig_with_sink("", "person_ref = \"employee-number\"\n").await;
    let Rig {
        fake, agent, api, ..
    } = &rig;
    let ctl = fake.control();
    // The second POST is stored but its answer lost: the lookup must find it by employee number.
    ctl.fail_post(2, PostFault::StoreThenAnswer(502));
    api.post_all(
        agent,
        &[
            clocking("gate-1", "E1", "2026-07-03T08:00:00+02:00", "in"),
            clocking("gate-1", "E2", "2026-07-03T08:01:00+02:00", "in"),
            clocking("gate-1", "E1", "2026-07-03T12:00:00+02:00", "out"),
        ],
    )
    .await;
    wait_protime(api, agent, (0, 0)).await;
    let people = posted_people(fake);
    assert_eq!(
        people.len(),
        3,
        "the one in doubt was found, not posted again"
    );
    for (person, employee) in people.iter().zip(["E1", "E2", "E1"]) {
        assert_eq!(
            *person,
            serde_json::json!({"externalReferences": {"@employee-number": employee}})
        );
    }
    let mut persons: Vec<i64> = ctl.clockings().iter().map(|c| c.person_id).collect();
    persons.sort();
    assert_eq!(
        persons,
        [1, 1, 2],
        "E1 is person 1, E2 person 2; none twice"
    );
    let lookups: Vec<String> = ctl
        .wire()
        .log()
        .into_iter()
        .filter(|r| r.endpoint == endpoint::GET_CLOCKINGS)
        .map(|r| r.uri)
        .collect();
    assert!(!lookups.is_empty());
    for uri in &lookups {
        assert!(
            uri.contains("%40employee-number") || uri.contains("@employee-number"),
            "the lookup asks for the reference it matches on: {uri}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminal_override_of_person_ref_wins() {
    // gate-2 (a TC-B-style terminal whose "badge" is the employee number) overrides the sink.
    let rig = rig_with_sink(
        "protime_person_ref = \"employee-number\"\n",
        "person_ref = \"badge-number\"\n",
    )
    .await;
    let Rig {
        fake, agent, api, ..
    } = &rig;
    api.post_all(
        agent,
        &[
            clocking("gate-1", "4711", "2026-07-03T08:00:00+02:00", "in"),
            clocking("gate-2", "E2", "2026-07-03T02:00:00-04:00", "in"),
        ],
    )
    .await;
    wait_protime(api, agent, (0, 0)).await;
    let people = posted_people(fake);
    assert!(
        people.contains(&serde_json::json!({"externalReferences": {"@badge-number": "4711"}})),
        "{people:?}"
    );
    assert!(
        people.contains(&serde_json::json!({"externalReferences": {"@employee-number": "E2"}})),
        "{people:?}"
    );
    let mut persons: Vec<i64> = fake
        .control()
        .clockings()
        .iter()
        .map(|c| c.person_id)
        .collect();
    persons.sort();
    assert_eq!(persons, [1, 2]);
}
