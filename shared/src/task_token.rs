//! A Step Functions task token in a body Flotilla received: found, so a
//! rejected job's caller still gets its answer, and redacted, since the
//! record keeps the body for the report and whoever holds a token can end
//! its caller's task. A body that does not parse as JSON (a trailing comma)
//! is read leniently: every `"task_token": "..."` in its text.

use serde_json::Value;

const KEY: &str = "task_token";
const REDACTED: &str = "<redacted>";

/// The body with every task token replaced by `<redacted>`.
pub fn redacted(body: &str) -> String {
    if let Ok(mut value) = serde_json::from_str::<Value>(body) {
        if redact_value(&mut value) {
            return value.to_string();
        }
        // No key named task_token once parsed: nothing to hide.
        return body.to_string();
    }
    let mut out = String::with_capacity(body.len());
    let mut rest = body;
    while let Some(raw) = raw_value(rest) {
        out.push_str(&rest[..raw.start]);
        out.push_str(REDACTED);
        rest = &rest[raw.end..];
    }
    out.push_str(rest);
    out
}

/// The token the job's caller waits with: `notify.task_token` of a body
/// that parses; otherwise the only `"task_token"` string in its text, with
/// its JSON escapes read.
pub fn find(body: &str) -> Option<String> {
    let token = match serde_json::from_str::<Value>(body) {
        Ok(value) => value.pointer("/notify/task_token").and_then(Value::as_str).map(str::to_string),
        Err(_) => lenient_token(body),
    };
    // Step Functions' tokens are at most 1,024 characters.
    token.filter(|t: &String| !t.is_empty() && t.len() <= 1024)
}

/// The one `"task_token"` string of a text that is not JSON, its escapes
/// read; none when there are several (which is `notify`'s cannot be told)
/// or it is not closed.
fn lenient_token(body: &str) -> Option<String> {
    let first = raw_value(body).filter(|raw| raw.closed)?;
    if raw_value(&body[first.end..]).is_some() {
        return None;
    }
    serde_json::from_str(&body[first.start - 1..first.end + 1]).ok()
}

/// Every string under a key named task_token, at any depth, replaced.
fn redact_value(value: &mut Value) -> bool {
    match value {
        Value::Object(map) => {
            let mut found = false;
            for (key, inner) in map.iter_mut() {
                if key == KEY && inner.is_string() {
                    *inner = Value::String(REDACTED.into());
                    found = true;
                } else {
                    found |= redact_value(inner);
                }
            }
            found
        }
        Value::Array(items) => items.iter_mut().fold(false, |found, item| redact_value(item) | found),
        _ => false,
    }
}

/// Where a `"task_token"` key's string value is in a text that is not JSON.
struct Raw {
    /// Byte offsets of its contents, inside the quotes.
    start: usize,
    end: usize,
    /// The closing quote was found; otherwise it runs to the end of the text.
    closed: bool,
}

/// The first `"task_token"` key's string value in `text`.
fn raw_value(text: &str) -> Option<Raw> {
    let pattern = format!("\"{KEY}\"");
    let mut from = 0;
    while let Some(found) = text[from..].find(&pattern) {
        let key_end = from + found + pattern.len();
        from = key_end;
        let rest = text[key_end..].trim_start();
        let Some(after) = rest.strip_prefix(':') else { continue };
        let after_trim = after.trim_start();
        if !after_trim.starts_with('"') {
            continue;
        }
        let start = text.len() - after_trim.len() + 1;
        let mut escaped = false;
        for (offset, c) in text[start..].char_indices() {
            match c {
                '\\' if !escaped => escaped = true,
                '"' if !escaped => return Some(Raw { start, end: start + offset, closed: true }),
                _ => escaped = false,
            }
        }
        return Some(Raw { start, end: text.len(), closed: false });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::{find, redacted};

    #[test]
    fn every_token_is_redacted_in_a_body_that_parses() {
        let body = r#"{"id":"a","notify":{"task_token":"AAA\"BBB"},"env":{"x":[{"task_token":"CCC"}]}}"#;
        let out = redacted(body);
        assert!(!out.contains("AAA") && !out.contains("BBB") && !out.contains("CCC"), "{out}");
        assert_eq!(out.matches("<redacted>").count(), 2, "{out}");
        assert_eq!(find(body).as_deref(), Some("AAA\"BBB"));
    }

    #[test]
    fn every_token_is_redacted_in_a_body_that_does_not_parse() {
        let body = r#"{"id":"a", "task_token": "first\\one", "notify": {"task_token" : "AAA\"BBB",},}"#;
        let out = redacted(body);
        assert!(!out.contains("first") && !out.contains("AAA") && !out.contains("BBB"), "{out}");
        assert_eq!(out.matches("<redacted>").count(), 2, "{out}");
        // Two tokens: which one is notify's cannot be told, so none is answered.
        assert_eq!(find(body), None);
        let one = r#"{"id":"a", "notify": {"task_token" : "AAA\\BBB",},}"#;
        // The escapes read: the token as Step Functions gave it.
        assert_eq!(find(one).as_deref(), Some("AAA\\BBB"));
    }

    #[test]
    fn a_token_whose_string_never_closes_is_redacted_to_the_end() {
        let body = r#"{"notify": {"task_token": "SECRET-UNTIL-THE-END"#;
        assert_eq!(redacted(body), r#"{"notify": {"task_token": "<redacted>"#);
        assert_eq!(find(body), None);
    }

    #[test]
    fn a_key_spelled_with_an_escape_is_still_found_when_the_body_parses() {
        let body = r#"{"notify":{"task\u005ftoken":"SECRET"}}"#;
        assert!(!redacted(body).contains("SECRET"));
        assert_eq!(find(body).as_deref(), Some("SECRET"));
    }

    #[test]
    fn a_body_without_a_token_is_kept_as_it_came() {
        let body = "{ \"id\": \"a\",\n  \"task_token\": 5 }";
        assert_eq!(redacted(body), body);
        assert_eq!(redacted("not json, \"task_token\""), "not json, \"task_token\"");
    }
}
