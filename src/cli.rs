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
    /// One site at DIR, named `default`, with built-in defaults and no config file: for
    /// `run`, and for the commands on a site (`status`, `list default`, `rollback default`...).
    #[arg(long, global = true, value_name = "DIR")]
    pub root: Option<PathBuf>,
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
    #[arg(long, num_args = 0..=1, default_missing_value = "forever", value_name = "DURATION",
        value_parser = wait_duration)]
    pub wait: Option<String>,
}

/// Checks `--wait`'s optional value when it is parsed. `--wait` takes the word after it
/// when there is one, so `activate --wait shop v1` took `shop` for the DURATION and then
/// complained that ID was missing, pointing away from the real mistake.
fn wait_duration(s: &str) -> Result<String, String> {
    if s == "forever" {
        return Ok(s.to_string());
    }
    crate::config::parse_duration(s)
        .map(|_| s.to_string())
        .map_err(|e| {
            format!(
                "{e} (--wait takes the word after it as its DURATION: put --wait after the \
                 positional arguments, or write --wait=DURATION)"
            )
        })
}

/// The commands of SPEC.md.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service in the foreground for every configured site (or the one --root names).
    Run,
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
        /// Allow a release that failed before, or whose last verify found drift.
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
        /// Allow a target whose last verify found drift (a plain rollback then no longer
        /// passes over a drifted previous release).
        #[arg(long)]
        force: bool,
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
    ///
    /// A marker already waiting in deploy-cache/ is used (consumed) for this release;
    /// --id and --no-activate override its keys.
    Finalize {
        /// Site name.
        site: String,
        /// Release id (overrides the waiting marker's `id`).
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
        /// Give the layout to this user (and its group): the user the service runs as.
        /// Run as root without it, the `release-keeper` user is assumed when it exists.
        #[arg(long, value_name = "USER")]
        owner: Option<String>,
    },
    /// Validate the config; errors name file, line and column.
    CheckConfig,
    /// Print a shell completion script (for packaging; not part of the documented CLI).
    #[command(hide = true)]
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the man page release-keeper(1), or with --dir write it and one page per
    /// command into DIR (for packaging; not part of the documented CLI).
    #[command(hide = true)]
    Man {
        /// Directory for release-keeper.1 and release-keeper-COMMAND.1.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

// ---------------------------------------------------------------------------------------------
// Man page and completions, generated from `Cli` so they never drift from the parser.

/// Writes the completion script for `shell` to stdout.
pub fn print_completions(shell: clap_complete::Shell) -> std::io::Result<()> {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    let mut out = std::io::stdout().lock();
    clap_complete::generate(shell, &mut cmd, "release-keeper", &mut out);
    std::io::Write::flush(&mut out)
}

/// Sections of release-keeper(1) that clap does not know about (roff).
const MAN_EXTRA: &str = r#".SH "EXIT STATUS"
.TP
\fB0\fR
Success.
.TP
\fB1\fR
The operation failed or found a problem (drift, rejected upload, health check failed).
.TP
\fB2\fR
Usage or config error.
.TP
\fB75\fR
The site is busy (locked) and \fB\-\-wait\fR was not given; for \fBrun\fR, another
service already serves one of its sites.
.SH SIGNALS
The service (\fBrun\fR) reloads the config and runs a healing pass on \fBSIGHUP\fR
(a bad config is rejected with \fBconfig.rejected\fR and the running one stays), and on
\fBSIGTERM\fR or \fBSIGINT\fR finishes or cleanly undoes in\-flight work and exits 0.
Under systemd it speaks the notify protocol: READY=1, STATUS=, RELOADING=1, STOPPING=1,
WATCHDOG=1.
.SH ENVIRONMENT
.TP
\fBRELEASE_KEEPER_CONFIG\fR
Config file used when \fB\-\-config\fR is not given.
.TP
\fBRELEASE_KEEPER_LOG\fR
Log filter (tracing EnvFilter syntax), default \fBinfo\fR.
.TP
\fBJOURNAL_STREAM\fR, \fBNOTIFY_SOCKET\fR, \fBWATCHDOG_USEC\fR
Set by systemd: logs go to the journal with structured fields (unless
\fB\-\-log\-format\fR is given), and the service notifies systemd.
.SH FILES
.TP
\fI/etc/release\-keeper/config.toml\fR
The config: \fB[defaults]\fR and \fB[sites.NAME]\fR.
.TP
\fI/etc/release\-keeper/sites.d/*.toml\fR
One more site per file, named after the file.
.TP
\fIROOT/deploy\-cache/\fR, \fIROOT/releases/\fR, \fIROOT/current\fR, \fIROOT/.release\-keeper/\fR
A site's drop directory, releases, current release and the keeper's state.
.SH "SEE ALSO"
\fBsystemd.service\fR(5), \fBsha256sum\fR(1), \fBjournalctl\fR(1)
"#;

/// Renders release-keeper(1) to `out`: clap's page with our sections before VERSION.
fn render_main_page(cmd: &clap::Command, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut page)?;
    let page = String::from_utf8_lossy(&page);
    let at = page.find(".SH VERSION").unwrap_or(page.len());
    out.write_all(page[..at].as_bytes())?;
    out.write_all(MAN_EXTRA.as_bytes())?;
    out.write_all(page[at..].as_bytes())
}

/// Prints release-keeper(1) to stdout, or writes it and one page per command into `dir`.
pub fn write_man(dir: Option<&std::path::Path>) -> std::io::Result<()> {
    use clap::CommandFactory;
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let Some(dir) = dir else {
        let mut out = std::io::stdout().lock();
        render_main_page(&cmd, &mut out)?;
        return std::io::Write::flush(&mut out);
    };
    std::fs::create_dir_all(dir)?;
    let mut page = Vec::new();
    render_main_page(&cmd, &mut page)?;
    std::fs::write(dir.join("release-keeper.1"), page)?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        clap_mangen::Man::new(sub.clone()).generate_to(dir)?;
    }
    Ok(())
}
