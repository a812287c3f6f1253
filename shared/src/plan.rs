//! Fleet sizing and cost estimate. Pure: planning creates nothing.

use serde::{Deserialize, Serialize};

use crate::error::SpecError;
use crate::spec::{FleetSpec, JobSpec, Market, VolumeSource};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub instance_count: u32,
    /// How the count was reached, in words.
    pub sizing: String,
    pub instance_type: String,
    pub market: Market,
    /// Upper bound: every instance for the whole deadline, plus volumes.
    pub max_cost_usd: Option<f64>,
    pub volumes_per_instance: u32,
}

/// `ceil(items / (rate * minutes))`, rejected if it exceeds `max_instances`
/// rather than silently missing the deadline.
pub fn fleet_size(fleet: &FleetSpec) -> Result<(u32, String), SpecError> {
    match fleet {
        FleetSpec::Count { count } => Ok((*count, format!("{count} instance(s) as requested"))),
        FleetSpec::Sized { items, items_per_instance_minute, within_minutes, max_instances } => {
            let per_instance = items_per_instance_minute * f64::from(*within_minutes);
            let needed = (*items as f64 / per_instance).ceil();
            if needed > f64::from(*max_instances) {
                return Err(SpecError::new(format!(
                    "fleet: {items} items at {items_per_instance_minute}/instance-minute within {within_minutes} min needs {needed} instances, above max_instances {max_instances}"
                )));
            }
            let count = needed.max(1.0) as u32;
            Ok((
                count,
                format!(
                    "ceil({items} items / ({items_per_instance_minute} items/instance-min x {within_minutes} min)) = {count}"
                ),
            ))
        }
    }
}

pub fn plan(spec: &JobSpec) -> Result<Plan, SpecError> {
    let (instance_count, sizing) = fleet_size(&spec.fleet)?;
    let instance_type = spec.instance_types[0].clone();
    let hours = f64::from(spec.deadline_minutes) / 60.0;
    let volume_gib: u32 = spec
        .volumes
        .iter()
        .map(|v| match &v.source {
            VolumeSource::New { size_gib, .. } => *size_gib,
            _ => 0,
        })
        .sum();
    let max_cost_usd = hourly_price(&instance_type).map(|price| {
        let price = if spec.market == Market::Spot { price * SPOT_FACTOR } else { price };
        // gp3 is $0.08 per GiB-month; a month is ~730 hours.
        let volumes = f64::from(volume_gib) * 0.08 / 730.0 * hours;
        let total = f64::from(instance_count) * (price * hours + volumes);
        (total * 100.0).ceil() / 100.0
    });
    Ok(Plan {
        instance_count,
        sizing,
        instance_type,
        market: spec.market,
        max_cost_usd,
        volumes_per_instance: spec.volumes.len() as u32,
    })
}

/// Spot usually runs at 30-40% of on-demand; the estimate takes the high end.
const SPOT_FACTOR: f64 = 0.4;

/// Linux on-demand USD per hour in us-east-1, for the estimate only.
fn hourly_price(instance_type: &str) -> Option<f64> {
    let price = match instance_type {
        "t3.micro" => 0.0104,
        "t3.small" => 0.0208,
        "t3.medium" => 0.0416,
        "t3.large" => 0.0832,
        "t4g.micro" => 0.0084,
        "t4g.small" => 0.0168,
        "t4g.medium" => 0.0336,
        "m7g.large" => 0.0816,
        "m7g.xlarge" => 0.1632,
        "m7i.large" => 0.1008,
        "m7i.xlarge" => 0.2016,
        "c7g.large" => 0.0725,
        "c7g.xlarge" => 0.145,
        "c7i.large" => 0.0893,
        "r7g.large" => 0.1071,
        _ => return None,
    };
    Some(price)
}

/// Which items shard `index` of `count` processes: contiguous, sizes differ by at most one.
pub fn shard_range(items: u64, index: u32, count: u32) -> std::ops::Range<u64> {
    let count = u64::from(count.max(1));
    let index = u64::from(index).min(count - 1);
    let base = items / count;
    let extra = items % count;
    let start = index * base + index.min(extra);
    let len = base + u64::from(index < extra);
    start..start + len
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn benchmark_sizing_matches_the_worked_example() {
        // One instance does 100 files in 10 min; 202 files in 10 min needs 3.
        let fleet =
            FleetSpec::Sized { items: 202, items_per_instance_minute: 10.0, within_minutes: 10, max_instances: 50 };
        assert_eq!(fleet_size(&fleet).expect("fits").0, 3);
        let exact =
            FleetSpec::Sized { items: 200, items_per_instance_minute: 10.0, within_minutes: 10, max_instances: 50 };
        assert_eq!(fleet_size(&exact).expect("fits").0, 2);
    }

    #[test]
    fn sizing_above_max_is_refused_with_numbers() {
        let fleet =
            FleetSpec::Sized { items: 10_000, items_per_instance_minute: 1.0, within_minutes: 10, max_instances: 20 };
        let err = fleet_size(&fleet).expect_err("too many");
        assert!(err.to_string().contains("needs 1000 instances, above max_instances 20"), "{err}");
    }

    proptest! {
        #[test]
        fn shards_cover_every_item_once(items in 0u64..10_000, count in 1u32..300) {
            let mut next = 0;
            for index in 0..count {
                let range = shard_range(items, index, count);
                prop_assert_eq!(range.start, next);
                prop_assert!(range.end - range.start <= items / u64::from(count) + 1);
                next = range.end;
            }
            prop_assert_eq!(next, items);
        }
    }
}
