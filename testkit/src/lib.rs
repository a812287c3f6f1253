//! Test support for Flotilla, kept out of the product crate: the simulated
//! cloud that implements every port (`fake`), the seeded simulator that
//! runs the production reconciler, intake and reaper on it and checks their
//! invariants (`sim`), and the decision function's property checker
//! (`decide_fuzz`, also driven by `fuzz/`).

pub mod decide_fuzz;
pub mod fake;
#[cfg(feature = "aws")]
pub mod sim;
