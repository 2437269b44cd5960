//! Which stored clockings `queue list | export` and `GET /v1/queue/clockings` show, from its text
//! form (CLI flags, query parameters) and back. One parser for both ways in, so the CLI and the
//! local API accept and refuse exactly the same selections, with the same messages.

use std::collections::HashMap;

use chrono::{DateTime, FixedOffset};

use crate::store::{QueueFilter, SinkId};

impl QueueFilter {
    /// Parse the selection's text form: a sink name, a terminal id, and RFC 3339 times.
    pub fn parse(
        sink: Option<&str>,
        terminal: Option<&str>,
        since: Option<&str>,
        until: Option<&str>,
    ) -> Result<QueueFilter, String> {
        let sink = sink
            .map(|s| {
                SinkId::from_name(s).ok_or_else(|| format!("unknown sink {s:?} (mqtt, protime)"))
            })
            .transpose()?;
        Ok(QueueFilter {
            sink,
            terminal: terminal.map(str::to_owned),
            since: time("since", since)?,
            until: time("until", until)?,
        })
    }

    /// Parse the query parameters `sink`, `terminal`, `since` and `until` (others are ignored).
    pub fn from_query(q: &HashMap<String, String>) -> Result<QueueFilter, String> {
        let get = |k: &str| q.get(k).map(String::as_str);
        QueueFilter::parse(get("sink"), get("terminal"), get("since"), get("until"))
    }

    /// The selection as query parameters: what [`QueueFilter::from_query`] reads back.
    pub fn to_query(&self) -> Vec<(&'static str, String)> {
        [
            ("sink", self.sink.map(|s| s.as_str().to_owned())),
            ("terminal", self.terminal.clone()),
            ("since", self.since.map(|t| t.to_rfc3339())),
            ("until", self.until.map(|t| t.to_rfc3339())),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect()
    }
}

fn time(key: &str, value: Option<&str>) -> Result<Option<DateTime<FixedOffset>>, String> {
    value
        .map(|v| {
            DateTime::parse_from_rfc3339(v)
                .map_err(|e| format!("{key} {v:?} is not RFC 3339 with an offset: {e}"))
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_form_reads_back_the_same_selection() {
        let f = QueueFilter::parse(
            Some("protime"),
            Some("gate 1"),
            Some("2026-11-22T06:00:00.250+01:00"),
            Some("2026-11-23T06:00:00Z"),
        )
        .unwrap();
        let q: HashMap<String, String> = f
            .to_query()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        let back = QueueFilter::from_query(&q).unwrap();
        assert_eq!(back.sink, Some(SinkId::Protime));
        assert_eq!(back.terminal.as_deref(), Some("gate 1"));
        assert_eq!(back.since, f.since);
        assert_eq!(back.since.unwrap().offset(), f.since.unwrap().offset());
        assert_eq!(back.until, f.until);
        assert!(QueueFilter::parse(None, None, None, None)
            .unwrap()
            .to_query()
            .is_empty());
    }

    #[test]
    fn bad_selections_name_the_parameter() {
        let e = QueueFilter::parse(Some("kafka"), None, None, None).unwrap_err();
        assert_eq!(e, "unknown sink \"kafka\" (mqtt, protime)");
        let e = QueueFilter::parse(None, None, Some("yesterday"), None).unwrap_err();
        assert!(e.starts_with("since \"yesterday\" is not RFC 3339"), "{e}");
        let e = QueueFilter::parse(None, None, None, Some("2026-11-22T06:00:00")).unwrap_err();
        assert!(e.starts_with("until "), "{e}");
    }
}
