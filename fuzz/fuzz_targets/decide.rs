//! The reconciler's decision function fed observations and action results
//! that libFuzzer chooses byte by byte: it must never panic, and never
//! delete a volume it attached whose policy wants a snapshot unless a
//! `completed` snapshot of it was observed.
#![no_main]

use flotilla_testkit::decide_fuzz::run_bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(violation) = run_bytes(data) {
        panic!("{violation}");
    }
});
