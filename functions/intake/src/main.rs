//! Intake: SQS job submissions and EventBridge scheduled events. A thin
//! composition root; the logic is `flotilla_shared::intake`.

// No function over 80 lines of code (clippy.toml); `make lint` denies warnings.
#![warn(clippy::too_many_lines)]

use flotilla_shared::{aws, handlers};
use lambda_runtime::{service_fn, Error, LambdaEvent};
use serde_json::Value;

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda_runtime::tracing::init_default_subscriber();
    let env = aws::Environment::from_env()?;
    let config = aws::load_config().await;
    let ports = aws::ports(&config, &env);
    lambda_runtime::run(service_fn(|event: LambdaEvent<Value>| async {
        handlers::intake_event(&ports, event).await.map_err(Error::from)
    }))
    .await
}
