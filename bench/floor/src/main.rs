//! The floor for `make bench`: a hello-world `lambda_runtime` binary with
//! the same runtime, tokio and tracing set-up as the functions but no SDK,
//! so its init time and RSS are what any Rust function pays at least.

use lambda_runtime::{service_fn, Error, LambdaEvent};
use serde_json::{json, Value};

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda_runtime::tracing::init_default_subscriber();
    lambda_runtime::run(service_fn(|_event: LambdaEvent<Value>| async {
        Ok::<_, Error>(json!({ "batchItemFailures": [] }))
    }))
    .await
}
