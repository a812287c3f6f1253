//! The spec parser and validator on arbitrary input: an answer, never a
//! panic; and a spec that validates serializes to one that parses back equal
//! and still validates (what intake stores is what it checked).
#![no_main]

use flotilla_shared::spec::{parse, validate};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(body) = std::str::from_utf8(data) else { return };
    let Ok(spec) = parse(body) else { return };
    if validate(&spec).is_ok() {
        let again = parse(&serde_json::to_string(&spec).expect("serialize")).expect("a valid spec parses back");
        assert_eq!(again, spec);
        validate(&again).expect("and validates again");
    }
});
