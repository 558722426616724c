//! The simulated model as a memory extractor: deterministic answers to the gateway's two
//! memory calls, recognised by their `json_schema` name, so memory works offline and its
//! tests are exact.
//!
//! - `memory_facts`: facts found by patterns in the user's lines ("my name is …", "I live
//!   in …", "I moved to …", "I like / love / hate …", "I am allergic to …", "I work as …").
//! - `memory_decisions`: each fact against the memories shown, by word overlap (Jaccard):
//!   nearly the same words → `NONE`, half of them shared → `UPDATE` that memory, less →
//!   `ADD`.

use serde_json::{Value, json};

/// The answer text for a memory call, or `None` when `schema` is not one of them.
pub fn answer(schema: &str, input: &str) -> Option<String> {
    match schema {
        "memory_facts" => Some(json!({"facts": facts(input)}).to_string()),
        "memory_decisions" => Some(decisions(input).to_string()),
        _ => None,
    }
}

/// Patterns: what the user says, and the fact it becomes.
const PATTERNS: &[(&str, &str)] = &[
    ("my name is ", "Name is "),
    ("i live in ", "Lives in "),
    ("i moved to ", "Lives in "),
    ("i am allergic to ", "Is allergic to "),
    ("i'm allergic to ", "Is allergic to "),
    ("i work as ", "Works as "),
    ("i like ", "Likes "),
    ("i love ", "Loves "),
    ("i hate ", "Hates "),
];

/// The facts in the user's lines of a transcript (`role: text` lines).
fn facts(transcript: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in transcript.lines() {
        let Some(text) = line.strip_prefix("user:") else {
            continue;
        };
        let lower = text.to_lowercase();
        for (said, fact) in PATTERNS {
            let mut from = 0;
            while let Some(at) = lower[from..].find(said) {
                let start = from + at + said.len();
                // A whole word: at the start or after a non-letter.
                let boundary = from + at == 0
                    || !lower[..from + at]
                        .chars()
                        .next_back()
                        .is_some_and(char::is_alphabetic);
                // The object ends at punctuation or where the next clause begins.
                let rest = &lower[start..];
                let end = [
                    rest.find(['.', ',', '!', '?', ';', '\n']),
                    rest.find(" and "),
                    rest.find(" but "),
                ]
                .into_iter()
                .flatten()
                .min()
                .map_or(lower.len(), |e| start + e);
                let object = text.get(start..end).unwrap_or_default().trim();
                if boundary && !object.is_empty() {
                    let fact = format!("{fact}{object}");
                    if !out.contains(&fact) {
                        out.push(fact);
                    }
                }
                from = end.max(start);
            }
        }
    }
    out
}

fn words(text: &str) -> std::collections::BTreeSet<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

fn jaccard(a: &str, b: &str) -> f64 {
    let (a, b) = (words(a), words(b));
    let union = a.union(&b).count();
    if union == 0 {
        return 0.0;
    }
    a.intersection(&b).count() as f64 / union as f64
}

/// Decisions for `{"existing_memories": [{id, text}], "new_facts": [...]}`.
fn decisions(input: &str) -> Value {
    let input: Value = serde_json::from_str(input).unwrap_or(Value::Null);
    let existing: Vec<(String, String)> = input
        .get("existing_memories")
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .filter_map(|m| {
                    Some((
                        m.get("id")?.as_str()?.to_owned(),
                        m.get("text")?.as_str()?.to_owned(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    let facts = input
        .get("new_facts")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut out = Vec::new();
    let mut touched = std::collections::BTreeSet::new();
    for (i, fact) in facts.iter().filter_map(Value::as_str).enumerate() {
        let best = existing
            .iter()
            .filter(|(id, _)| !touched.contains(id))
            .map(|(id, text)| (id, jaccard(fact, text)))
            .max_by(|a, b| a.1.total_cmp(&b.1));
        match best {
            Some((id, score)) if score >= 0.9 => {
                touched.insert(id.clone());
                out.push(json!({"id": id, "text": fact, "event": "NONE"}));
            }
            Some((id, score)) if score >= 0.5 => {
                touched.insert(id.clone());
                out.push(json!({"id": id, "text": fact, "event": "UPDATE"}));
            }
            _ => out.push(json!({"id": format!("new{i}"), "text": fact, "event": "ADD"})),
        }
    }
    json!({"memory": out})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_come_from_the_users_lines_only() {
        let transcript = "user: Hi! My name is Ada and I live in Paris. I am allergic to peanuts.\n\
                          assistant: my name is Bot\n\
                          user: I like green tea. I work as a nurse\n";
        assert_eq!(
            facts(transcript),
            vec![
                "Name is Ada",
                "Lives in Paris",
                "Is allergic to peanuts",
                "Works as a nurse",
                "Likes green tea"
            ]
        );
        assert!(facts("user: hello there\n").is_empty());
    }

    #[test]
    fn a_move_updates_where_the_user_lives() {
        let input = json!({
            "existing_memories": [{"id": "0", "text": "Likes tea"}, {"id": "1", "text": "Lives in Paris"}],
            "new_facts": ["Lives in Lyon", "Likes tea", "Hates cilantro"]
        })
        .to_string();
        let out = decisions(&input);
        let events: Vec<(&str, &str)> = out["memory"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| (d["id"].as_str().unwrap(), d["event"].as_str().unwrap()))
            .collect();
        assert_eq!(
            events,
            vec![("1", "UPDATE"), ("0", "NONE"), ("new2", "ADD")]
        );
    }
}
