//! The one quoting function: whatever the word, POSIX shell reads it back
//! as exactly that one word. Checked with a small reader of sh quoting
//! rules (the unit tests check the same through a real bash, more slowly).
#![no_main]

use flotilla_shared::shell::quote;
use libfuzzer_sys::fuzz_target;

/// Read one shell word made of bare safe characters and single-quoted runs,
/// joined by `\'`. None if anything else (an expansion, a space, a second
/// word) appears unquoted.
fn read_word(quoted: &str) -> Option<String> {
    let safe = |c: char| c.is_ascii_alphanumeric() || "_-./=:,+@%".contains(c);
    let mut word = String::new();
    let mut chars = quoted.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => loop {
                match chars.next()? {
                    '\'' => break,
                    inner => word.push(inner),
                }
            },
            '\\' => word.push(chars.next().filter(|c| *c == '\'')?),
            c if safe(c) => word.push(c),
            _ => return None,
        }
    }
    Some(word)
}

fuzz_target!(|data: &[u8]| {
    let Ok(word) = std::str::from_utf8(data) else { return };
    if word.contains('\0') {
        return; // no shell word can hold a NUL; spec validation refuses them
    }
    let quoted = quote(word);
    assert_eq!(read_word(&quoted).as_deref(), Some(word), "quote({word:?}) = {quoted:?}");
    assert!(!quoted.is_empty());
});
