//! Flotilla's integration tests: one binary, so the AWS SDK links once.

mod architecture;
mod budgets_and_manifests;
mod bytes_moto;
mod contract;
mod decide_fuzz;
mod economy;
mod events;
mod fingerprint;
mod fixtures;
mod hostile;
mod isolation;
mod lifecycle_moto;
mod lineage_moto;
mod lineage_sim;
mod moto;
mod moto_extension;
mod notices_moto;
mod once_moto;
mod once_sim;
mod reaper;
mod rejections;
mod scenarios;
mod schedules;
mod see_moto;
mod sharding;
mod sources_race;
