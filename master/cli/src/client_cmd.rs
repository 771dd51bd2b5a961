//! What the `kiln` commands that talk to a running master through its API share (`force`,
//! `builds`, `status`, `workers`, `sendchange`, `step upload|list|delete`, `try`: one module
//! each): running one on a small runtime, and their exit statuses.
//!
//! Exit status: 0 when done (with `force --wait`: the build's SUCCESS or WARNINGS), 1 for a
//! FAILURE or a master that cannot be reached or failed, 2 for input the master or Kiln
//! refused, 3 for any other build result (EXCEPTION, RETRY, CANCELLED, SKIPPED).

use std::future::Future;
use std::process::ExitCode;

use serde_json::Value;

use kiln_client::ClientError;

/// Runs a client command on a runtime of its own; a [`ClientError`] is printed here with
/// its own exit status (1 or 2), other errors go up as bad input.
pub(crate) fn block_on(
    f: impl Future<Output = anyhow::Result<ExitCode>>,
) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match rt.block_on(f) {
        Ok(code) => Ok(code),
        Err(e) => match e.downcast_ref::<ClientError>() {
            Some(c) => {
                eprintln!("kiln: error: {e:#}");
                Ok(ExitCode::from(c.exit_code()))
            }
            None => Err(e),
        },
    }
}

pub(crate) fn print_json(v: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}
