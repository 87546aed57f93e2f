//! The command line (clap). The man page and completions can be generated from `Cli`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::events::LogFormat;

/// release-keeper: verified, atomic, self-healing releases from a drop directory.
#[derive(Debug, Parser)]
#[command(name = "release-keeper", version, about, propagate_version = true)]
pub struct Cli {
    /// Config file (default: $RELEASE_KEEPER_CONFIG, else /etc/release-keeper/config.toml).
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Log format on stderr (default: journal under systemd, else text).
    #[arg(long, global = true, value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// `--wait [DURATION]` for commands that take the site's operation lock.
#[derive(Debug, Clone, Args)]
pub struct Wait {
    /// Wait for a busy site (forever, or up to DURATION) instead of exiting 75.
    #[arg(long, num_args = 0..=1, default_missing_value = "forever", value_name = "DURATION")]
    pub wait: Option<String>,
}

/// The commands of SPEC.md.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service in the foreground for every configured site.
    Run {
        /// Serve one site at DIR with built-in defaults and no config file.
        #[arg(long, value_name = "DIR")]
        root: Option<PathBuf>,
    },
    /// Show current, previous, releases, pins, failures, drift and the last event per site.
    Status {
        /// Only this site.
        site: Option<String>,
        /// One JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// List a site's releases, newest first.
    List {
        /// Site name.
        site: String,
        /// One JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Switch `current` to a good release (hooks and health check run).
    Activate {
        /// Site name.
        site: String,
        /// Release id.
        id: String,
        /// Allow a release that failed before.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        wait: Wait,
    },
    /// Go back to the previous good release, or to --to ID.
    Rollback {
        /// Site name.
        site: String,
        /// Target release.
        #[arg(long, value_name = "ID")]
        to: Option<String>,
        #[command(flatten)]
        wait: Wait,
    },
    /// Re-hash releases against their stored manifests (default: current).
    Verify {
        /// Site name.
        site: String,
        /// Release id.
        id: Option<String>,
        /// Every release.
        #[arg(long, conflicts_with = "id")]
        all: bool,
        /// One JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Apply the retention policy.
    Prune {
        /// Site name.
        site: String,
        /// Only say what would be deleted and why.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        wait: Wait,
    },
    /// Run the healing pass once and say what it did.
    Heal {
        /// Site name.
        site: String,
        /// Only say what would be done.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        wait: Wait,
    },
    /// Protect a release from pruning.
    Pin {
        /// Site name.
        site: String,
        /// Release id.
        id: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Remove the protection.
    Unpin {
        /// Site name.
        site: String,
        /// Release id.
        id: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Process deploy-cache/ now, as if a marker were dropped.
    Finalize {
        /// Site name.
        site: String,
        /// Release id.
        #[arg(long)]
        id: Option<String>,
        /// Stage the release without switching to it.
        #[arg(long)]
        no_activate: bool,
        #[command(flatten)]
        wait: Wait,
    },
    /// Write a SHA256SUMS for a build directory (hashes in parallel).
    Manifest {
        /// The build directory.
        dir: PathBuf,
        /// Output file (default DIR/SHA256SUMS; "-" for stdout).
        #[arg(short = 'o', long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Create a site's layout with the right permissions.
    Init {
        /// Site name.
        site: String,
    },
    /// Validate the config; errors name file, line and column.
    CheckConfig,
}
