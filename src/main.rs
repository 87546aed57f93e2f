//! Entry point: parse the command line, set up logging, dispatch, map errors to the exit
//! codes of SPEC.md (0 ok, 1 failed, 2 usage/config, 75 busy).

use std::path::Path;
use std::process::ExitCode;

use clap::Parser;
use release_keeper::cli::{self, Cli, Command};
use release_keeper::{commands, events, service, Error};

fn run(cli: Cli) -> anyhow::Result<()> {
    let config = cli.config.as_deref();
    let root = cli.root.as_deref();
    if root.is_some() && site_of(&cli.command, root).is_none() {
        return Err(Error::Usage(
            "--root DIR names a site for `run` and the commands on a site; this command takes none"
                .into(),
        )
        .into());
    }
    let result = match &cli.command {
        Command::Run => service::run(config, root),
        Command::Manifest { dir, output } => commands::manifest(
            dir,
            output.as_deref(),
            cli.log_format == Some(events::LogFormat::Json),
        ),
        Command::CheckConfig => commands::check_config(config),
        Command::Completions { shell } => return Ok(cli::print_completions(*shell)?),
        Command::Man { dir } => return Ok(cli::write_man(dir.as_deref())?),
        other => {
            let json = cli.log_format == Some(events::LogFormat::Json);
            let site = site_of(&cli.command, cli.root.as_deref()).unwrap_or("");
            release_keeper::hooks::forward_interrupts(|sig| interrupted_note(json, site, sig));
            let cfg = commands::load_config(config, root)?;
            match other {
                Command::Status { site, json } => commands::status(&cfg, site.as_deref(), *json),
                Command::List { site, json } => commands::list(&cfg, site, *json),
                Command::Activate {
                    site,
                    id,
                    force,
                    wait,
                } => commands::activate(&cfg, site, id, *force, &wait.wait),
                Command::Rollback {
                    site,
                    to,
                    force,
                    wait,
                } => commands::rollback(&cfg, site, to.as_deref(), *force, &wait.wait),
                Command::Verify {
                    site,
                    id,
                    all,
                    json,
                } => commands::verify(&cfg, site, id.as_deref(), *all, *json),
                Command::Prune {
                    site,
                    dry_run,
                    wait,
                } => commands::prune(&cfg, site, *dry_run, &wait.wait),
                Command::Heal {
                    site,
                    dry_run,
                    wait,
                } => commands::heal(&cfg, site, *dry_run, &wait.wait),
                Command::Pin { site, id, wait } => commands::pin(&cfg, site, id, true, &wait.wait),
                Command::Unpin { site, id, wait } => {
                    commands::pin(&cfg, site, id, false, &wait.wait)
                }
                Command::Finalize {
                    site,
                    id,
                    no_activate,
                    wait,
                } => commands::finalize(&cfg, site, id.as_deref(), *no_activate, &wait.wait),
                Command::Init { site, owner } => commands::init(&cfg, site, owner.as_deref()),
                Command::Run
                | Command::Manifest { .. }
                | Command::CheckConfig
                | Command::Completions { .. }
                | Command::Man { .. } => Ok(()),
            }
        }
    };
    Ok(result?)
}

/// The site a command is about, if it names one (`root`: `--root` was given).
fn site_of<'a>(command: &'a Command, root: Option<&Path>) -> Option<&'a str> {
    match command {
        Command::Status { site, .. } => site.as_deref().or(root.map(|_| service::DEFAULT_SITE)),
        Command::List { site, .. }
        | Command::Activate { site, .. }
        | Command::Rollback { site, .. }
        | Command::Verify { site, .. }
        | Command::Prune { site, .. }
        | Command::Heal { site, .. }
        | Command::Pin { site, .. }
        | Command::Unpin { site, .. }
        | Command::Finalize { site, .. }
        | Command::Init { site, .. } => Some(site),
        Command::Run => root.map(|_| service::DEFAULT_SITE),
        Command::Manifest { .. }
        | Command::CheckConfig
        | Command::Completions { .. }
        | Command::Man { .. } => None,
    }
}

/// True when the raw arguments ask for `--log-format json` (for a command line clap
/// rejected, so there is no parsed `Cli` to ask).
fn json_requested(args: &[std::ffi::OsString]) -> bool {
    let mut words = args
        .iter()
        .skip(1)
        .take_while(|a| a.as_os_str() != "--")
        .map(|a| a.to_string_lossy());
    while let Some(w) = words.next() {
        if w == "--log-format=json"
            || (w == "--log-format" && words.next().as_deref() == Some("json"))
        {
            return true;
        }
    }
    false
}

/// What a command interrupted by `sig` says as it ends: in JSON, a `command.failed` line
/// like any other failure's (without a timestamp: it is written by the signal handler).
fn interrupted_note(json: bool, site: &str, sig: nix::sys::signal::Signal) -> Vec<u8> {
    let reason = format!(
        "interrupted by {}; what it was doing is finished or undone by the next healing pass \
         (the service's, or `release-keeper heal {}`)",
        sig.as_str(),
        if site.is_empty() { "SITE" } else { site }
    );
    let mut line = if json {
        serde_json::json!({
            "level": "ERROR",
            "event": events::COMMAND_FAILED,
            "site": site,
            "reason": reason,
            "exit_code": 128 + sig as i32,
            "message": "interrupted",
        })
        .to_string()
    } else {
        format!("release-keeper: {reason}")
    };
    line.push('\n');
    line.into_bytes()
}

/// Reports a command line clap rejected. With `--log-format json` it is a `command.failed`
/// event like any other failure: clap's plain multi-line message broke the one JSON
/// object per line of stderr (SPEC) for the very mistake a script most needs to see.
fn usage_error(e: clap::Error, args: &[std::ffi::OsString]) -> ExitCode {
    // --help and --version are clap "errors" printed to stdout: they stay as they are.
    if !e.use_stderr() || !json_requested(args) {
        e.exit()
    }
    events::init(Some(events::LogFormat::Json));
    let code = e.exit_code();
    let text = e.render().to_string();
    let text = text.trim_end();
    let text = text.strip_prefix("error: ").unwrap_or(text);
    // The message is the first paragraph on one line ("... not provided: <SITE>"); the
    // usage and tips that follow stay in `reason`.
    let first = text
        .split("\n\n")
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    tracing::error!(
        event = events::COMMAND_FAILED,
        site = "",
        reason = %text,
        exit_code = code,
        "{first}"
    );
    ExitCode::from(u8::try_from(code).unwrap_or(2))
}

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(e) => return usage_error(e, &args),
    };
    events::init(cli.log_format);
    let json = cli.log_format == Some(events::LogFormat::Json);
    let site = site_of(&cli.command, cli.root.as_deref())
        .unwrap_or("")
        .to_string();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = e.downcast_ref::<Error>().map_or(1, Error::exit_code);
            if json {
                // With `--log-format json` every line on stderr is one JSON object
                // (SPEC): a plain "release-keeper: ..." line after the events broke
                // `2>&1 | jq` at the very line that said what went wrong.
                tracing::error!(
                    event = events::COMMAND_FAILED,
                    site = %site,
                    reason = %e,
                    exit_code = code,
                    "{e}"
                );
            } else {
                // `{e}`, not `{e:#}`: the library's errors already end with their cause,
                // and the alternate form would print the OS error a second time.
                events::print_stderr(&format!("release-keeper: {e}"));
            }
            ExitCode::from(code as u8)
        }
    }
}
