//! The documentation matches the code.

use std::collections::BTreeSet;

/// Keys in the first column of docs/config.md's tables.
fn documented_keys() -> BTreeSet<String> {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/config.md")).unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn config_reference_lists_exactly_the_keys_in_the_code() {
    let code: BTreeSet<String> = badgegate::config::known_keys().into_iter().collect();
    let docs = documented_keys();
    assert!(code.len() > 40, "introspection found only {code:?}");
    let undocumented: Vec<_> = code.difference(&docs).collect();
    let unknown: Vec<_> = docs.difference(&code).collect();
    assert!(
        undocumented.is_empty(),
        "keys in the code but not in docs/config.md: {undocumented:?}"
    );
    assert!(
        unknown.is_empty(),
        "keys in docs/config.md but not in the code: {unknown:?}"
    );
}

#[test]
fn config_reference_example_is_valid() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/config.md")).unwrap();
    let example = text
        .split("```toml\n")
        .nth(1)
        .and_then(|s| s.split("```").next())
        .expect("an example");
    badgegate::config::Config::parse(example, std::path::Path::new("/etc/badgegate"))
        .unwrap_or_else(|e| panic!("the documented example is invalid:\n{e}"));
}
