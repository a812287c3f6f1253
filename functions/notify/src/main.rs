//! The notifier: the notify queue's notices onto EventBridge, and answers
//! to Step Functions tasks. A thin composition root; the logic is the
//! library beside it.

// No function over 80 lines of code (clippy.toml); `make lint` denies warnings.
#![warn(clippy::too_many_lines)]

use aws_lambda_events::event::sqs::SqsEvent;
use lambda_runtime::{service_fn, Error, LambdaEvent};

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda_runtime::tracing::init_default_subscriber();
    let config = notify::quick_calls(&flotilla_shared::aws::load_config().await);
    let notifier = notify::Notifier::from_env(&config)?;
    let notifier = &notifier;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<SqsEvent>| async move {
        let now = chrono::Utc::now();
        // Lambda's deadline as an Instant; none under cargo lambda's local runtime.
        let deadline = flotilla_shared::handlers::invocation_deadline(event.context.deadline, 0, now)
            .and_then(|at| (at - now).to_std().ok())
            .map(|left| std::time::Instant::now() + left);
        Ok::<_, Error>(notifier.handle(event.payload, deadline).await)
    }))
    .await
}
