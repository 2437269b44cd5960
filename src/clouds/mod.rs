//! Clients of the vendor clouds badgegate talks to: auth, paging and error envelopes, nothing
//! else. What to do with the data (watermarks, dedupe across polls, publishing, dead letters) is
//! the business of `sources/` and `sinks/`.
//!
//! - [`protime`]: Protime API (sink for time clockings; mirror of access clockings and people).
//! - [`crosschex`]: Anviz CrossChex Cloud (source of attendance records).
//! - [`aktion`]: Aktion.NEXT / Aktion CLOUD (source of people, scheduled shifts, C4 passages).
//!
//! All three share [`http`]: one retry/backoff/rate-limit/token-cache layer and one error type,
//! [`CloudError`], whose [`ErrorKind`] tells the caller what to do next.

pub mod aktion;
pub mod crosschex;
pub mod http;
pub mod protime;

pub use http::{
    install_crypto_provider, Api, CloudError, ErrorKind, HttpOptions, VendorAnswer, USER_AGENT,
};

/// 32 hex digits in the canonical GUID form 8-4-4-4-12 (the caller checked them).
pub(crate) fn hyphenated_guid(h: &str) -> String {
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(all(test, feature = "kit"))]
mod tests {
    //! Secrets never leak: every client runs through success and failure paths while a TRACE
    //! subscriber (and the `log` bridge, for reqwest/hyper) captures everything.

    use std::io::Write;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use chrono::{DateTime, NaiveDateTime, Utc};

    use super::aktion::AktionClient;
    use super::crosschex::CrossChexClient;
    use super::protime::{PersonRef, ProtimeClient, ProtimeClocking};
    use super::{CloudError, HttpOptions};
    use crate::config::Secret;
    use crate::kit::fakes::{aktion as fa, crosschex as fc, protime as fp, Fault};

    const PROTIME_SECRET: &str = "pt-client-secret-7f3a91";
    const CROSSCHEX_SECRET: &str = "cc0ffee0ddba11deadbeef0123456789";
    /// Base64 of 16 bytes, as Aktion requires ("foobarbazqux1234").
    const AKTION_KEY: &str = "Zm9vYmFyYmF6cXV4MTIzNA==";

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
        type Writer = Capture;
        fn make_writer(&'a self) -> Capture {
            self.clone()
        }
    }

    impl Capture {
        fn text(&self) -> String {
            String::from_utf8_lossy(
                &self
                    .0
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            )
            .into_owned()
        }
    }

    fn fast() -> HttpOptions {
        HttpOptions {
            timeout: Duration::from_millis(500),
            connect_timeout: Duration::from_secs(2),
            min_interval: Duration::ZERO,
            max_attempts: 2,
            backoff_min: Duration::from_millis(5),
            backoff_max: Duration::from_millis(10),
            max_retry_after: Duration::from_secs(1),
            refresh_margin: Duration::from_secs(60),
        }
    }

    /// Display and Debug of an error or a client.
    fn both(out: &mut Vec<String>, e: &CloudError) {
        out.push(e.to_string());
        out.push(format!("{e:?}"));
    }

    /// The middle (claims) segment of a JWT: it carries CrossChex's api secret in base64.
    fn jwt_claims(token: &str) -> Option<String> {
        token.split('.').nth(1).map(str::to_string)
    }

    #[tokio::test]
    async fn no_secret_reaches_logs_errors_or_debug_output() {
        // The log→tracing bridge is global; a second init (another test) is fine to ignore.
        let _ = tracing_log::LogTracer::init();
        // tracing-core treats a lone registered dispatcher specially: a callsite first hit on
        // another test thread then computes its interest with THAT thread's (empty) default and
        // caches "never". A second, inert dispatcher makes every callsite's interest account for
        // all registered dispatchers, ours included.
        let _inert = tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default());
        let capture = Capture::default();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(capture.clone())
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let any = "127.0.0.1:0".parse().expect("addr");
        let mut texts: Vec<String> = Vec::new();

        // --- Protime
        let protime = fp::FakeProtime::start(any).await.expect("protime");
        let pctl = protime.control();
        pctl.set_client(fp::DEFAULT_CLIENT_ID, PROTIME_SECRET);
        pctl.add_person(fp::Person {
            id: 1,
            badge_number: "6767676".into(),
            employee_number: "E1".into(),
            first_name: "A".into(),
            last_name: "B".into(),
        });
        let pcfg = super::protime::tests::config(&protime, PROTIME_SECRET);
        let pc = ProtimeClient::new(&pcfg, fast()).expect("client");
        texts.push(format!("{pc:?}"));
        let clocking = ProtimeClocking {
            person: PersonRef::BadgeNumber("6767676".into()),
            date: chrono::NaiveDate::from_ymd_opt(2026, 3, 2).expect("date"),
            time_of_day_in_minutes: 480,
            kind: super::protime::ClockingKind::InOut,
            terminal: None,
        };
        pc.post_clocking(&clocking).await.expect("post");
        pctl.expire_tokens();
        pc.post_clocking(&clocking).await.expect("post after 401");
        pctl.wire()
            .fail_next_on(fp::endpoint::POST_CLOCKINGS, 1, Fault::ProcessThenDrop);
        let errors = [
            pc.post_clocking(&clocking).await.err(),
            pc.post_clocking(&ProtimeClocking {
                person: PersonRef::BadgeNumber("nobody".into()),
                ..clocking.clone()
            })
            .await
            .err(),
        ];
        for e in errors.iter().flatten() {
            both(&mut texts, e);
        }
        pctl.wire().fail_next_on(
            fp::endpoint::PEOPLE,
            1,
            Fault::RateLimited {
                retry_after_secs: 3600,
            },
        );
        pctl.wire()
            .fail_next_on(fp::endpoint::GET_CLOCKINGS, 1, Fault::GarbageBody);
        for e in [
            pc.people().await.err(),
            pc.find_clocking(&clocking).await.err(),
        ]
        .iter()
        .flatten()
        {
            both(&mut texts, e);
        }
        let wrong = ProtimeClient::new(
            &crate::config::ProtimeConfig {
                client_secret: Secret::new("pt-wrong-secret-0000"),
                ..pcfg.clone()
            },
            fast(),
        )
        .expect("client");
        if let Err(e) = wrong.people().await {
            both(&mut texts, &e);
        }
        let protime_tokens: Vec<String> = pctl
            .wire()
            .log()
            .iter()
            .flat_map(|r| r.headers.clone())
            .filter(|(k, _)| k == "authorization")
            .filter_map(|(_, v)| v.strip_prefix("Bearer ").map(str::to_string))
            .collect();
        assert!(protime_tokens.len() >= 2, "two tokens were used");

        // --- CrossChex
        let crosschex = fc::FakeCrossChex::start(any).await.expect("crosschex");
        let cctl = crosschex.control();
        cctl.set_min_interval(Duration::ZERO);
        cctl.set_credentials(fc::DEFAULT_API_KEY, CROSSCHEX_SECRET);
        cctl.add_record(fc::Record {
            checktype: 1,
            checktime: NaiveDateTime::parse_from_str("2026-03-02 08:00:00", "%Y-%m-%d %H:%M:%S")
                .expect("time"),
            device_serial: "1".into(),
            device_name: "D".into(),
            first_name: "F".into(),
            last_name: "L".into(),
            workno: "7".into(),
        });
        let ccfg = super::crosschex::tests::config(&crosschex, CROSSCHEX_SECRET);
        let cc = CrossChexClient::new(&ccfg, fast()).expect("client");
        texts.push(format!("{cc:?}"));
        let day = |h: u32| {
            chrono::NaiveDate::from_ymd_opt(2026, 3, 2)
                .and_then(|d| d.and_hms_opt(h, 0, 0))
                .expect("time")
        };
        cc.get_records(day(0), day(23)).await.expect("records");
        cctl.expire_tokens();
        cc.get_records(day(0), day(23))
            .await
            .expect("after TOKEN_EXPIRES");
        cctl.wire().fail_next_on(
            fc::endpoint::GET_RECORD,
            2,
            Fault::RateLimited {
                retry_after_secs: 15,
            },
        );
        if let Err(e) = cc.get_records(day(0), day(23)).await {
            both(&mut texts, &e);
        }
        cctl.wire()
            .fail_next_on(fc::endpoint::GET_RECORD, 1, Fault::GarbageBody);
        if let Err(e) = cc.get_records(day(0), day(23)).await {
            both(&mut texts, &e);
        }
        let wrong = CrossChexClient::new(
            &crate::config::CrossChexConfig {
                api_secret: Secret::new("cc-wrong-secret-000000"),
                ..ccfg.clone()
            },
            fast(),
        )
        .expect("client");
        if let Err(e) = wrong.get_records(day(0), day(23)).await {
            both(&mut texts, &e);
        }
        let crosschex_tokens: Vec<String> = cctl
            .wire()
            .log()
            .iter()
            .filter_map(|r| serde_json::from_str::<serde_json::Value>(&r.body).ok())
            .filter_map(|b| b["authorize"]["token"].as_str().map(str::to_string))
            .collect();
        assert!(crosschex_tokens.len() >= 2, "two tokens were used");

        // --- Aktion (its error messages echo the token: "Token {0} already expired")
        let aktion = fa::FakeAktion::start(any).await.expect("aktion");
        let actl = aktion.control();
        actl.set_credentials(fa::DEFAULT_USER_LOGIN, AKTION_KEY);
        actl.seed_example();
        actl.add_c4("C4", 1, "Gate");
        let acfg = super::aktion::tests::config(&aktion, AKTION_KEY);
        let ac = AktionClient::new(&acfg, fast()).expect("client");
        texts.push(format!("{ac:?}"));
        ac.persons().await.expect("persons");
        actl.expire_tokens();
        ac.persons().await.expect("after 1001");
        let t = |s: &str| {
            DateTime::parse_from_rfc3339(s)
                .expect("time")
                .with_timezone(&Utc)
        };
        ac.scheduled_shifts(
            "100200300",
            t("2019-06-15T00:00:00Z"),
            t("2019-06-16T00:00:00Z"),
            None,
        )
        .await
        .expect("shifts");
        actl.wire().fail_next_on(
            fa::endpoint::HW_EVENTS,
            2,
            Fault::RateLimited {
                retry_after_secs: 1,
            },
        );
        if let Err(e) = ac.c4_events("C4", chrono::Utc::now()).await {
            both(&mut texts, &e);
        }
        actl.wire()
            .fail_next_on(fa::endpoint::PERSON_GET_ALL, 1, Fault::GarbageBody);
        if let Err(e) = ac.persons().await {
            both(&mut texts, &e);
        }
        let wrong = AktionClient::new(
            &crate::config::AktionConfig {
                api_key: Secret::new("d3JvbmctYXBpLWtleS0wMA=="),
                ..acfg.clone()
            },
            fast(),
        )
        .expect("client");
        if let Err(e) = wrong.persons().await {
            both(&mut texts, &e);
        }
        let aktion_tokens = actl.wire().query_values("Token");
        assert!(aktion_tokens.len() >= 2, "two tokens were used");

        protime.shutdown().await;
        crosschex.shutdown().await;
        aktion.shutdown().await;
        drop(_guard);

        let logs = capture.text();
        // The capture works and saw the interesting paths.
        assert!(logs.contains("sending request"), "TRACE captured");
        assert!(logs.contains("token refused; logging in again once"));
        assert!(logs.contains("retrying after a transient failure"));
        assert!(texts.len() >= 20, "{}", texts.len());
        // The vendor's own words survive redaction ("Token *** already expired").
        assert!(logs.contains("Token *** already expired"), "{logs}");

        let mut secrets: Vec<String> = [
            PROTIME_SECRET,
            "pt-wrong-secret-0000",
            CROSSCHEX_SECRET,
            "cc-wrong-secret-000000",
            AKTION_KEY,
            "d3JvbmctYXBpLWtleS0wMA==",
        ]
        .map(String::from)
        .to_vec();
        secrets.extend(protime_tokens);
        secrets.extend(crosschex_tokens.iter().filter_map(|t| jwt_claims(t)));
        secrets.extend(crosschex_tokens);
        secrets.extend(aktion_tokens);
        for secret in &secrets {
            assert!(!logs.contains(secret.as_str()), "a secret was logged");
            for text in &texts {
                assert!(
                    !text.contains(secret.as_str()),
                    "a secret is in an error or Debug output: {text}"
                );
            }
        }
    }
}
