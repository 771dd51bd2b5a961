//! The argument groups several commands share, flattened into each with `#[command(flatten)]`:
//! where the master is ([`ClientArgs`]), where the farm is ([`FarmArgs`]); `--prop` is
//! [`crate::props::BuildProps`].

use std::path::PathBuf;

use clap::Args;

/// Options every command that talks to a master takes.
#[derive(Debug, Clone, Default, Args)]
pub struct ClientArgs {
    /// The master's URL. Default: `master` in ~/.config/kiln/client.toml, else
    /// http://127.0.0.1:8010.
    #[arg(long, value_name = "URL", env = "KILN_MASTER")]
    pub master: Option<String>,
    /// A file holding the API token (else KILN_TOKEN, else `token` in the client config file).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// A PEM file of certificate authorities to trust beside the public ones (a farm's private
    /// CA, or the master's own certificate if it is self-signed).
    #[arg(long, value_name = "FILE", env = "KILN_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
}

impl ClientArgs {
    /// A client of the master these options name.
    pub fn client(&self) -> anyhow::Result<kiln_client::Client> {
        kiln_client::Client::new(&kiln_client::ClientOptions {
            master: self.master.clone(),
            token_file: self.token_file.clone(),
            ca_cert: self.ca_cert.clone(),
        })
    }
}

/// Where the farm is: its configuration, and optionally another database.
#[derive(Debug, Args)]
pub struct FarmArgs {
    /// The master's configuration file.
    #[arg(
        long,
        short,
        value_name = "FILE",
        env = "KILN_CONFIG",
        default_value = "kiln.toml"
    )]
    pub config: PathBuf,
    /// The database URL (sqlite:///PATH or postgres://...), instead of the configuration's.
    #[arg(long, value_name = "URL", env = "KILN_DATABASE_URL")]
    pub db: Option<String>,
}
