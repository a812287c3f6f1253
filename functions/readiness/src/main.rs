//! The readiness step: a thin composition root. The logic is `flotilla_shared::steps::readiness`.

use aws_lambda_events::event::sqs::SqsEvent;
use flotilla_shared::{aws, handlers, lifecycle::Step};
use lambda_runtime::{service_fn, Error, LambdaEvent};

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda_runtime::tracing::init_default_subscriber();
    let env = aws::Environment::from_env()?;
    let config = aws::load_config().await;
    let ports = aws::ports(&config, &env);
    lambda_runtime::run(service_fn(|event: LambdaEvent<SqsEvent>| async {
        Ok::<_, Error>(handlers::step_batch(&ports, Step::Readiness, event.payload).await)
    }))
    .await
}
