//! `flotilla plan --spot-history`: the Region's recent spot prices for the
//! spec's instance types, read with DescribeSpotPriceHistory.

use anyhow::Result;
use chrono::{DateTime, Duration, Utc};

use flotilla_shared::plan::{spot_quotes, Prices, SpotPoint};

/// How far back the history is read. Spot prices move slowly (AWS sets them
/// "gradually based on long-term trends in supply and demand"), so a day
/// holds the prices a job starting now would meet.
pub const WINDOW_HOURS: i64 = 24;

/// The Linux prices of `types` in the last day: every change in the window,
/// plus the price in force at its start (the API returns that one too).
pub async fn history(ec2: &aws_sdk_ec2::Client, types: &[String], now: DateTime<Utc>) -> Result<Vec<SpotPoint>> {
    let start = now - Duration::hours(WINDOW_HOURS);
    let types = types.iter().map(|t| aws_sdk_ec2::types::InstanceType::from(t.as_str())).collect();
    let mut pages = ec2
        .describe_spot_price_history()
        .set_instance_types(Some(types))
        .product_descriptions("Linux/UNIX")
        .start_time(aws_smithy_types::DateTime::from_secs(start.timestamp()))
        .end_time(aws_smithy_types::DateTime::from_secs(now.timestamp()))
        .into_paginator()
        .items()
        .send();
    let mut points = Vec::new();
    while let Some(item) = pages.next().await {
        let item = item
            .map_err(|e| anyhow::anyhow!("DescribeSpotPriceHistory: {}", aws_sdk_ec2::error::DisplayErrorContext(e)))?;
        let (Some(instance_type), Some(zone), Some(price)) =
            (item.instance_type(), item.availability_zone(), item.spot_price())
        else {
            continue;
        };
        if let Ok(usd_per_hour) = price.parse::<f64>() {
            points.push(SpotPoint {
                instance_type: instance_type.as_str().to_string(),
                zone: zone.to_string(),
                usd_per_hour,
            });
        }
    }
    Ok(points)
}

/// Put the quotes on top of `prices`, saying where they came from. Returns
/// the types the history had nothing for.
pub fn apply(
    prices: &mut Prices,
    points: &[SpotPoint],
    types: &[String],
    region: &str,
    now: DateTime<Utc>,
) -> Vec<String> {
    let quotes = spot_quotes(points);
    let zones = quotes.values().map(|(_, z)| *z).max().unwrap_or(0);
    for (instance_type, (usd, _)) in &quotes {
        prices.spot_hour.insert(instance_type.clone(), *usd);
    }
    prices.spot_hour_from = Some(format!(
        "DescribeSpotPriceHistory in {region} (Linux/UNIX): the highest price of {zones} Availability Zone(s) in the {WINDOW_HOURS} h to {}",
        now.format("%Y-%m-%d %H:%M UTC")
    ));
    types.iter().filter(|t| !quotes.contains_key(*t)).cloned().collect()
}
