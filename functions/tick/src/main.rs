//! The scheduled tick: wakes every non-terminal job, so a lost message only
//! ever delays a job, then runs the reaper. A thin composition root.

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
    let ports = &ports;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| async move {
        handlers::tick(ports, &event.payload).await.map_err(Error::from)
    }))
    .await
}
