//! The decision function's property checker (`flotilla_testkit::decide_fuzz`)
//! over seeds: `make test` runs 300, `make fuzz` FLOTILLA_FUZZ_CASES.

use flotilla_testkit::decide_fuzz::run;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("FLOTILLA_FUZZ_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(300)
    ))]
    #[test]
    fn decide_never_panics_nor_deletes_an_unsnapshotted_volume(seed in any::<u64>()) {
        prop_assert_eq!(run(seed), Ok(()));
    }
}
