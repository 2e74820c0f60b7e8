//! `sluice keys`: making API keys for the configuration file.

use anyhow::Result;

/// `sluice keys` actions.
#[derive(clap::Subcommand)]
pub enum KeysCmd {
    /// Print a fresh random key (shown once) and its `[[keys]]` entry for the config file.
    New {
        /// Name that logs and metrics show for this key.
        #[arg(long)]
        name: String,
    },
}

/// Runs a `sluice keys` action.
pub fn run_cli(action: KeysCmd) -> Result<()> {
    match action {
        KeysCmd::New { name } => {
            let (key, hash) = sluice_gateway::auth::new_key();
            println!("API key (shown only now; store it): {key}");
            println!();
            println!("# Add to the config file; the server keeps only the hash.");
            println!("[[keys]]\nname = {name:?}\nkey_sha256 = \"{hash}\"");
        }
    }
    Ok(())
}
