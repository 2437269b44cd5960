//! The local badge map (`access.people_file`): CSV with a header row naming the columns
//! `badge`, `person` and (optionally) `groups`, `name`, `locked`, in any order. One row per badge;
//! a person with several badges has several rows. `groups` holds group names separated by `;`.
//! Fields may be quoted (`"a, b"`, with `""` for a quote inside).
//!
//! ```text
//! badge,person,groups
//! 4711,E-1001,production;maintenance
//! 4712,E-1001,production
//! 0815,E-2002,
//! ```

use std::collections::HashMap;

use super::directory::Person;

/// Parse the file's text. Every problem is reported (up to the whole file), each naming its line.
pub fn parse(text: &str) -> Result<Vec<Person>, Vec<String>> {
    let mut errors = Vec::new();
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim_end_matches('\r')))
        .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
    let Some((header_line, header)) = lines.next() else {
        return Ok(Vec::new());
    };
    let columns: Vec<String> = match split(header) {
        Ok(c) => c.iter().map(|c| c.trim().to_ascii_lowercase()).collect(),
        Err(e) => return Err(vec![format!("line {header_line}: {e}")]),
    };
    let col = |name: &str| columns.iter().position(|c| c == name);
    let (Some(badge_col), Some(person_col)) = (col("badge"), col("person")) else {
        return Err(vec![format!(
            "line {header_line}: the header row must name the columns badge and person (and optionally groups, name, locked), e.g. \"badge,person,groups\""
        )]);
    };
    if let Some(unknown) = columns
        .iter()
        .find(|c| !["badge", "person", "groups", "name", "locked"].contains(&c.as_str()))
    {
        errors.push(format!(
            "line {header_line}: unknown column {unknown:?} (expected badge, person, groups, name, locked)"
        ));
    }
    let (groups_col, name_col, locked_col) = (col("groups"), col("name"), col("locked"));

    let mut people: Vec<Person> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut badges: HashMap<String, (usize, String)> = HashMap::new();
    for (n, line) in lines {
        let fields = match split(line) {
            Ok(f) => f,
            Err(e) => {
                errors.push(format!("line {n}: {e}"));
                continue;
            }
        };
        if fields.len() > columns.len() {
            errors.push(format!(
                "line {n}: {} fields but the header names {} columns",
                fields.len(),
                columns.len()
            ));
            continue;
        }
        let field = |i: Option<usize>| {
            i.and_then(|i| fields.get(i))
                .map(|s| s.trim())
                .unwrap_or_default()
        };
        let badge = field(Some(badge_col));
        let person = field(Some(person_col));
        if badge.is_empty() || person.is_empty() {
            errors.push(format!("line {n}: badge and person must not be empty"));
            continue;
        }
        if badge.chars().count() > 64 || badge.chars().any(char::is_control) {
            errors.push(format!(
                "line {n}: badge {badge:?} must be 1 to 64 printable characters"
            ));
            continue;
        }
        if let Some((first, owner)) = badges.get(badge) {
            if owner != person {
                errors.push(format!(
                    "line {n}: badge {badge:?} already belongs to person {owner:?} (line {first})"
                ));
            }
            continue;
        }
        badges.insert(badge.to_owned(), (n, person.to_owned()));
        let locked = match field(locked_col).to_ascii_lowercase().as_str() {
            "" | "false" | "no" | "0" => false,
            "true" | "yes" | "1" => true,
            other => {
                errors.push(format!(
                    "line {n}: locked {other:?} is not true/false (yes/no, 1/0)"
                ));
                continue;
            }
        };
        let groups = field(groups_col)
            .split(';')
            .map(str::trim)
            .filter(|g| !g.is_empty())
            .map(str::to_owned);
        let name = Some(field(name_col)).filter(|s| !s.is_empty());
        let idx = *index.entry(person.to_owned()).or_insert_with(|| {
            people.push(Person {
                id: person.to_owned(),
                name: None,
                badges: Vec::new(),
                groups: Vec::new(),
                locked: false,
            });
            people.len() - 1
        });
        let p = &mut people[idx];
        p.badges.push(badge.to_owned());
        for g in groups {
            if !p.groups.contains(&g) {
                p.groups.push(g);
            }
        }
        p.locked |= locked;
        if p.name.is_none() {
            p.name = name.map(str::to_owned);
        }
    }
    if errors.is_empty() {
        Ok(people)
    } else {
        Err(errors)
    }
}

/// One CSV line into its fields (quotes as in RFC 4180, within one line).
fn split(line: &str) -> Result<Vec<String>, String> {
    let mut fields = Vec::new();
    let mut cur = String::new();
    let mut chars = line.chars().peekable();
    let mut quoted = false;
    let mut was_quoted = false;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                cur.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => cur.push(c),
            (false, '"') if cur.trim().is_empty() && !was_quoted => {
                cur.clear();
                quoted = true;
                was_quoted = true;
            }
            (false, ',') => {
                fields.push(std::mem::take(&mut cur));
                was_quoted = false;
            }
            (false, '"') => return Err("a quote in the middle of a field".into()),
            (false, c) => cur.push(c),
        }
    }
    if quoted {
        return Err("a quoted field is not closed".into());
    }
    fields.push(cur);
    Ok(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_become_people_with_all_their_badges_and_groups() {
        let people = parse(
            "badge,person,groups\n4711,E-1,production;maintenance\n4712,E-1,production\n0815,E-2,\n\"99,1\",\"E \"\"3\"\"\",lab\n",
        )
        .unwrap();
        assert_eq!(people.len(), 3);
        assert_eq!(people[0].id, "E-1");
        assert_eq!(people[0].badges, vec!["4711", "4712"]);
        assert_eq!(people[0].groups, vec!["production", "maintenance"]);
        assert_eq!(people[1].badges, vec!["0815"], "leading zeros kept");
        assert!(people[1].groups.is_empty());
        assert_eq!(people[2].id, "E \"3\"");
        assert_eq!(people[2].badges, vec!["99,1"]);
    }

    #[test]
    fn optional_columns_in_any_order() {
        let people =
            parse("person,locked,badge,name\r\nE-9,yes,1,Ann\r\n# a comment\r\n\r\nE-8,,2,\r\n")
                .unwrap();
        assert!(people[0].locked);
        assert_eq!(people[0].name.as_deref(), Some("Ann"));
        assert!(!people[1].locked);
    }

    #[test]
    fn every_bad_line_is_reported_with_its_number() {
        let errors = parse(
            "badge,person,groups\n1,A,\n1,B,\n,C,\n2,D,x,y\n\"3,E,\n4,F,g\"h\n"
                .to_string()
                .as_str(),
        )
        .unwrap_err();
        let lines: Vec<&str> = errors
            .iter()
            .map(|e| e.split(':').next().unwrap())
            .collect();
        assert_eq!(
            lines,
            ["line 3", "line 4", "line 5", "line 6", "line 7"],
            "{errors:?}"
        );
        assert!(errors[0].contains("already belongs to person \"A\""));
        let header = parse("id,name\n1,2\n").unwrap_err();
        assert!(header[0].contains("badge and person"), "{header:?}");
        assert!(parse("").unwrap().is_empty());
    }
}
