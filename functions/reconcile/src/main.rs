//! The reconciler: wakes and EC2/SSM events for one job at a time. A thin
//! composition root; the logic is `flotilla_shared::reconcile`.

// No function over 80 lines of code (clippy.toml); `make lint` denies warnings.
#![warn(clippy::too_many_lines)]

use aws_lambda_events::event::sqs::SqsEvent;
use flotilla_shared::{aws, handlers};
use lambda_runtime::{service_fn, Error, LambdaEvent};

/// Stop acting this long before the function's timeout, to save and re-queue.
const SAFETY_MARGIN_MS: i64 = 15_000;

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda_runtime::tracing::init_default_subscriber();
    let env = aws::Environment::from_env()?;
    let config = aws::load_config().await;
    let ports = aws::ports(&config, &env);
    let most_ms = i64::from(env.settings.pass_budget_seconds) * 1000;
    let ports = &ports;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<SqsEvent>| async move {
        let deadline = handlers::invocation_deadline(event.context.deadline, SAFETY_MARGIN_MS, chrono::Utc::now());
        let most = chrono::Duration::milliseconds(most_ms);
        Ok::<_, Error>(handlers::reconcile_batch(ports, event.payload, most, deadline).await)
    }))
    .await
}
