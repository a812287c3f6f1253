//! Fleet sizing and cost estimate. Pure: planning creates nothing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::SpecError;
use crate::spec::{FleetSpec, JobSpec, Market, SnapshotPolicy, VolumeSource, WorkSpec};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub instance_count: u32,
    /// How the count was reached, in words.
    pub sizing: String,
    pub instance_type: String,
    pub market: Market,
    pub volumes_per_instance: u32,
    /// How many work items the shards split (`fleet.items`, or what `work` gave).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items: Option<u64>,
    /// `s3://<bucket>/work/<job>/<digest>/`: shard i's items are in `<i>.txt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifests: Option<String>,
    /// None when the price table has no price for the first instance type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimate: Option<Estimate>,
}

/// What the job should cost, before anything launches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    /// Billed hours per instance: its share of the items at the benchmark
    /// rate plus start-up and teardown, or the whole deadline for a count.
    pub hours_per_instance: f64,
    pub instance_hours: f64,
    pub instances_usd: f64,
    /// Data volumes for as long as their instances live.
    pub volumes_usd: f64,
    /// One month of the snapshots the policy takes, at full volume size.
    pub snapshots_usd: f64,
    /// `debug_hold_minutes` of one instance and its volumes: the first shard
    /// that fails for good is held that long after the job fails.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub hold_usd: f64,
    pub total_usd: f64,
    /// Every instance and volume for the whole deadline.
    pub max_usd: f64,
    /// On-demand USD per hour of each instance type the spec names, and the
    /// spot factor: the report prices the realized hours with them.
    pub hourly_usd: BTreeMap<String, f64>,
    pub spot_factor: f64,
    /// Spot USD per hour of the types a quote priced (`Prices::spot_hour`);
    /// the others are priced at `spot_factor` x on-demand.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub spot_hourly_usd: BTreeMap<String, f64>,
    /// Where the spot price of the first instance type came from, in words.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub spot_price_from: String,
    /// Data volumes' USD per instance-hour (all of one instance's volumes).
    pub volumes_hourly_usd: f64,
}

fn is_zero(value: &f64) -> bool {
    *value == 0.0
}

/// Start-up (boot, agent, attach) and teardown (snapshot wait aside) billed
/// on every instance beyond its share of the work.
pub const OVERHEAD_MINUTES: f64 = 3.0;

/// Hours in a month, as AWS prices EBS per GiB-month.
const HOURS_PER_MONTH: f64 = 730.0;

/// The price table: `shared/prices.json`, with any entries of an override on top.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prices {
    #[serde(default, skip_serializing)]
    pub about: String,
    #[serde(default)]
    pub spot_factor: Option<f64>,
    #[serde(default)]
    pub snapshot_gib_month: Option<f64>,
    #[serde(default)]
    pub volume_gib_month: BTreeMap<String, f64>,
    #[serde(default)]
    pub instance_hour: BTreeMap<String, f64>,
    /// Quoted spot USD per hour by instance type (e.g. from the Region's
    /// DescribeSpotPriceHistory); a type without a quote is priced at
    /// `spot_factor` x on-demand.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub spot_hour: BTreeMap<String, f64>,
    /// Where `spot_hour` came from, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spot_hour_from: Option<String>,
}

impl Prices {
    pub fn builtin() -> Prices {
        serde_json::from_str(include_str!("../prices.json")).expect("shared/prices.json parses")
    }

    /// The built-in table with `json`'s entries replacing or adding to it.
    pub fn with_override(json: &str) -> Result<Prices, String> {
        Prices::builtin().over(json)
    }

    /// This table with `json`'s entries replacing or adding to it.
    pub fn over(&self, json: &str) -> Result<Prices, String> {
        let extra: Prices = serde_json::from_str(json).map_err(|e| format!("price table: {e}"))?;
        let numbers =
            extra.instance_hour.values().chain(extra.volume_gib_month.values()).chain(extra.spot_hour.values());
        if numbers
            .chain(extra.spot_factor.iter())
            .chain(extra.snapshot_gib_month.iter())
            .any(|p| !p.is_finite() || *p < 0.0)
        {
            return Err("price table: every price must be a number >= 0".into());
        }
        let mut prices = self.clone();
        prices.instance_hour.extend(extra.instance_hour);
        prices.volume_gib_month.extend(extra.volume_gib_month);
        if !extra.spot_hour.is_empty() {
            prices.spot_hour.extend(extra.spot_hour);
            prices.spot_hour_from = extra.spot_hour_from.or(Some("the price table's spot_hour".into()));
        }
        prices.spot_factor = extra.spot_factor.or(prices.spot_factor);
        prices.snapshot_gib_month = extra.snapshot_gib_month.or(prices.snapshot_gib_month);
        Ok(prices)
    }

    /// USD per hour of one instance in this market.
    pub fn hourly(&self, instance_type: &str, market: Market) -> Option<f64> {
        if market == Market::Spot {
            if let Some(quoted) = self.spot_hour.get(instance_type) {
                return Some(*quoted);
            }
        }
        let price = *self.instance_hour.get(instance_type)?;
        Some(if market == Market::Spot { price * self.spot_factor() } else { price })
    }

    /// Spot usually runs at 30-40% of on-demand; the table takes the high end.
    pub fn spot_factor(&self) -> f64 {
        self.spot_factor.unwrap_or(0.4)
    }

    /// Where a spot price of this type comes from, in words.
    pub fn spot_price_from(&self, instance_type: &str) -> String {
        match (self.spot_hour.get(instance_type), &self.spot_hour_from) {
            (Some(_), Some(from)) => from.clone(),
            (Some(_), None) => "the price table's spot_hour".into(),
            (None, _) => format!("a fixed fraction: {} x on-demand (spot_factor)", self.spot_factor()),
        }
    }
}

/// One price of a spot price history (DescribeSpotPriceHistory's shape).
#[derive(Debug, Clone, PartialEq)]
pub struct SpotPoint {
    pub instance_type: String,
    pub zone: String,
    pub usd_per_hour: f64,
}

/// Spot USD per hour of each type from a window of its history: the highest
/// price any Availability Zone charged in it. A fleet's instances land in
/// whichever zones have capacity, so the estimate takes the dearest one
/// rather than the cheapest; the history also carries the price in force
/// at the window's start. Returns, per type, the price and how many zones
/// quoted it.
pub fn spot_quotes(points: &[SpotPoint]) -> BTreeMap<String, (f64, usize)> {
    let mut by_type: BTreeMap<&str, BTreeMap<&str, f64>> = BTreeMap::new();
    for point in points.iter().filter(|p| p.usd_per_hour.is_finite() && p.usd_per_hour >= 0.0) {
        let zone = by_type.entry(&point.instance_type).or_default().entry(&point.zone).or_insert(0.0);
        *zone = zone.max(point.usd_per_hour);
    }
    by_type
        .into_iter()
        .map(|(t, zones)| (t.to_string(), (zones.values().copied().fold(0.0, f64::max), zones.len())))
        .collect()
}

/// How many items the spec itself gives: `fleet.items` or the explicit
/// list. An S3 prefix is counted only once intake lists it.
pub fn given_items(spec: &JobSpec) -> Option<u64> {
    match (&spec.work, &spec.fleet) {
        (Some(WorkSpec::List(list)), _) => Some(list.len() as u64),
        (None, FleetSpec::Sized { items, .. }) => *items,
        _ => None,
    }
}

/// `ceil(items / (rate * minutes))`, rejected if it exceeds `max_instances`
/// rather than silently missing the deadline.
pub fn fleet_size(fleet: &FleetSpec, items: Option<u64>) -> Result<(u32, String), SpecError> {
    match fleet {
        FleetSpec::Count { count } => Ok((*count, format!("{count} instance(s) as requested"))),
        FleetSpec::Sized { items_per_instance_minute, within_minutes, max_instances, .. } => {
            let Some(items) = items else {
                return Err(SpecError::new("fleet: the number of items is not known yet"));
            };
            let per_instance = items_per_instance_minute * f64::from(*within_minutes);
            let needed = (items as f64 / per_instance).ceil();
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

/// Plan from what the spec gives.
pub fn plan(spec: &JobSpec, prices: &Prices) -> Result<Plan, SpecError> {
    plan_for(spec, given_items(spec), prices)
}

/// Plan for `items` work items (what intake listed under an S3 prefix).
pub fn plan_for(spec: &JobSpec, items: Option<u64>, prices: &Prices) -> Result<Plan, SpecError> {
    let (instance_count, sizing) = fleet_size(&spec.fleet, items)?;
    if let Some(items) = items {
        if items < u64::from(instance_count) {
            let at = if spec.work.is_some() { "work" } else { "fleet.items" };
            return Err(SpecError::new(format!(
                "{at}: {items} item(s) cannot keep {instance_count} instances busy; every shard needs at least one"
            )));
        }
    }
    let instance_type = spec.instance_types[0].clone();
    let estimate = estimate(spec, instance_count, items, prices);
    if let Some(budget) = spec.budget_usd {
        match &estimate {
            None => {
                return Err(SpecError::new(format!(
                    "budget_usd: the price table has no price for {instance_type}, so the budget cannot be checked; add it to the table or drop the budget"
                )))
            }
            Some(e) if e.total_usd > budget => {
                return Err(SpecError::new(format!(
                    "budget_usd: the estimate is ${:.2} ({instance_count} x {instance_type}, {:.2} instance-hours: instances ${:.2}, volumes ${:.2}, snapshots ${:.2}{}), above the budget ${budget:.2}",
                    e.total_usd, e.instance_hours, e.instances_usd, e.volumes_usd, e.snapshots_usd,
                    if e.hold_usd > 0.0 { format!(", debug hold ${:.2}", e.hold_usd) } else { String::new() }
                )))
            }
            Some(_) => {}
        }
    }
    Ok(Plan {
        instance_count,
        sizing,
        instance_type,
        market: spec.market,
        volumes_per_instance: spec.volumes.len() as u32,
        items,
        manifests: None,
        estimate,
    })
}

fn estimate(spec: &JobSpec, count: u32, items: Option<u64>, prices: &Prices) -> Option<Estimate> {
    let hourly = prices.hourly(&spec.instance_types[0], spec.market)?;
    let deadline_hours = f64::from(spec.deadline_minutes) / 60.0;
    let work_minutes = match (&spec.fleet, items) {
        // The busiest shard's items at the benchmark rate.
        (FleetSpec::Sized { items_per_instance_minute, .. }, Some(items)) => {
            (items.div_ceil(u64::from(count.max(1))) as f64) / items_per_instance_minute
        }
        _ => f64::from(spec.deadline_minutes),
    };
    let hours_per_instance = ((work_minutes + OVERHEAD_MINUTES) / 60.0).min(deadline_hours);
    let mut volumes_hourly = 0.0;
    let mut snapshot_gib = 0.0;
    for volume in &spec.volumes {
        let (gib, kind) = match &volume.source {
            VolumeSource::New { size_gib, volume_type } => (f64::from(*size_gib), volume_type.as_str()),
            // A restored snapshot's size is unknown before it is described.
            _ => continue,
        };
        let per_month = prices.volume_gib_month.get(kind).copied().unwrap_or(0.08);
        volumes_hourly += gib * per_month / HOURS_PER_MONTH;
        if volume.snapshot != SnapshotPolicy::Never {
            snapshot_gib += gib;
        }
    }
    let n = f64::from(count);
    let hold_hours = spec.debug_hold_minutes.map_or(0.0, |m| f64::from(m) / 60.0);
    let hold_usd = cents(hold_hours * (hourly + volumes_hourly));
    let instances_usd = cents(n * hourly * hours_per_instance);
    let volumes_usd = cents(n * volumes_hourly * hours_per_instance);
    let snapshots_usd = cents(n * snapshot_gib * prices.snapshot_gib_month.unwrap_or(0.05));
    let hourly_usd =
        spec.instance_types.iter().filter_map(|t| Some((t.clone(), prices.hourly(t, Market::OnDemand)?))).collect();
    let spot_hourly_usd =
        spec.instance_types.iter().filter_map(|t| Some((t.clone(), *prices.spot_hour.get(t)?))).collect();
    // Each part of the bound is rounded as its part of the estimate is, so
    // the bound is never below the estimate.
    let max_usd = cents(
        cents(n * hourly * deadline_hours) + cents(n * volumes_hourly * deadline_hours) + snapshots_usd + hold_usd,
    );
    Some(Estimate {
        hours_per_instance,
        instance_hours: n * hours_per_instance,
        instances_usd,
        volumes_usd,
        snapshots_usd,
        total_usd: cents(instances_usd + volumes_usd + snapshots_usd + hold_usd),
        hold_usd,
        max_usd,
        hourly_usd,
        spot_factor: prices.spot_factor(),
        volumes_hourly_usd: volumes_hourly,
        spot_hourly_usd,
        spot_price_from: if spec.market == Market::Spot {
            prices.spot_price_from(&spec.instance_types[0])
        } else {
            String::new()
        },
    })
}

/// Up to the next cent, ignoring float noise (24 x 0.05 is 1.2000000000000002).
pub(crate) fn cents(usd: f64) -> f64 {
    // `+ 0.0` turns the -0.0 that `ceil` gives a zero price into 0.0, which
    // would print as "$-0.00".
    ((usd * 100.0) - 1e-6).ceil().max(0.0) / 100.0 + 0.0
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
        let fleet = FleetSpec::Sized {
            items: Some(202),
            items_per_instance_minute: 10.0,
            within_minutes: 10,
            max_instances: 50,
        };
        assert_eq!(fleet_size(&fleet, Some(202)).expect("fits").0, 3);
        let exact = FleetSpec::Sized {
            items: Some(200),
            items_per_instance_minute: 10.0,
            within_minutes: 10,
            max_instances: 50,
        };
        assert_eq!(fleet_size(&exact, Some(200)).expect("fits").0, 2);
    }

    #[test]
    fn sizing_above_max_is_refused_with_numbers() {
        let fleet = FleetSpec::Sized {
            items: Some(10_000),
            items_per_instance_minute: 1.0,
            within_minutes: 10,
            max_instances: 20,
        };
        let err = fleet_size(&fleet, Some(10_000)).expect_err("too many");
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

    fn spec(json: serde_json::Value) -> JobSpec {
        let mut base = serde_json::json!({
            "instance_types": ["t3.micro"], "image": "ami-12345678",
            "run": {"commands": [["true"]]}, "deadline_minutes": 30,
            "fleet": {"items": 202, "items_per_instance_minute": 10, "within_minutes": 10, "max_instances": 5},
            "volumes": [{"name": "data", "source": {"new": {"size_gib": 8}}, "device": "/dev/sdf", "mount_point": "/data"}]
        });
        for (k, v) in json.as_object().expect("object") {
            base[k] = v.clone();
        }
        let spec: JobSpec = serde_json::from_value(base).expect("spec");
        crate::spec::validate(&spec).expect("valid");
        spec
    }

    #[test]
    fn the_worked_example_is_priced_from_the_table_and_a_budget_rejects_above_it() {
        let prices = Prices::builtin();
        let worked = plan(&spec(serde_json::json!({})), &prices).expect("plan");
        assert_eq!((worked.instance_count, worked.items), (3, Some(202)));
        let e = worked.estimate.expect("t3.micro is priced");
        // The busiest shard has 68 items at 10/min: 6.8 min plus 3 min overhead.
        assert!((e.hours_per_instance - 9.8 / 60.0).abs() < 1e-9, "{e:?}");
        assert!((e.instance_hours - 3.0 * 9.8 / 60.0).abs() < 1e-9);
        assert_eq!(e.instances_usd, 0.01); // 0.49 h x $0.0104, rounded up to the cent
        assert_eq!(e.volumes_usd, 0.01);
        assert_eq!(e.snapshots_usd, 1.2); // 3 x 8 GiB x $0.05 for a month
        assert_eq!(e.total_usd, 1.22);
        assert!(e.max_usd >= e.total_usd);
        let err = plan_for(&spec(serde_json::json!({"budget_usd": 1.0})), Some(202), &prices).expect_err("over");
        assert!(err.message.starts_with("budget_usd: the estimate is $1.22"), "{}", err.message);
        assert!(err.message.ends_with("above the budget $1.00"), "{}", err.message);
        plan_for(&spec(serde_json::json!({"budget_usd": 1.22})), Some(202), &prices).expect("fits");
        // An override replaces the built-in price.
        let dear = Prices::with_override(r#"{"instance_hour": {"t3.micro": 10.0}}"#).expect("table");
        let err = plan(&spec(serde_json::json!({"budget_usd": 2.0})), &dear).expect_err("dear");
        assert!(err.message.contains("above the budget $2.00"), "{}", err.message);
        assert!(Prices::with_override(r#"{"instance_hour": {"t3.micro": -1}}"#).is_err());
        // No price, no budget check: said so rather than guessed.
        let err = plan(&spec(serde_json::json!({"budget_usd": 1.0, "instance_types": ["x9.huge"]})), &prices)
            .expect_err("unpriced");
        assert!(err.message.contains("no price for x9.huge"), "{}", err.message);
    }

    #[test]
    fn a_zero_price_prints_as_zero_and_the_bound_is_never_below_the_estimate() {
        assert_eq!(format!("{:.2}", cents(0.0)), "0.00");
        // Parts rounded up one by one once summed past a bound rounded once:
        // $0.12 estimated, "at most" $0.11.
        let prices = Prices::builtin();
        let s = spec(serde_json::json!({"fleet": {"count": 2}, "deadline_minutes": 10}));
        let e = plan(&s, &prices).expect("plan").estimate.expect("priced");
        assert!(e.max_usd >= e.total_usd, "{e:?}");
    }

    /// A debug hold bills one instance and its volumes for its length: it is
    /// in the estimate `budget_usd` is judged by, and in the bound.
    #[test]
    fn a_debug_hold_is_in_the_estimate_the_budget_and_the_bound() {
        let prices = Prices::builtin();
        let plain = spec(serde_json::json!({"instance_types": ["g5.xlarge"]}));
        let held = spec(serde_json::json!({"instance_types": ["g5.xlarge"], "debug_hold_minutes": 60}));
        let without = plan(&plain, &prices).expect("plan").estimate.expect("priced");
        let with = plan(&held, &prices).expect("plan").estimate.expect("priced");
        // An hour of one g5.xlarge ($1.006) and its 8 GiB gp3 volume.
        assert_eq!(with.hold_usd, 1.01);
        assert!((with.total_usd - without.total_usd - 1.01).abs() < 0.011, "{with:?}");
        assert!(with.max_usd >= without.max_usd + 1.0 && with.max_usd >= with.total_usd);
        let budget = without.total_usd + 0.5;
        let mut tight = held.clone();
        tight.budget_usd = Some(budget);
        let err = plan(&tight, &prices).expect_err("the hold does not fit");
        assert!(err.message.contains("debug hold $1.01"), "{}", err.message);
    }

    #[test]
    fn fewer_items_than_instances_is_rejected() {
        let s = spec(serde_json::json!({"fleet": {"count": 5}, "work": {"list": ["a", "b"]}}));
        let err = plan(&s, &Prices::builtin()).expect_err("idle shards");
        assert_eq!(err.message, "work: 2 item(s) cannot keep 5 instances busy; every shard needs at least one");
    }
}
