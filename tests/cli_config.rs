//! Command line and configuration: check-config diagnostics, run without a config,
//! global option placement, the lifetime lock, init, manifest.
mod common;

use common::*;
use serde_json::Value;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

/// Writes `text` to `<tmp>/config.toml` and returns its path.
fn config_file(site: &Site, text: &str) -> std::path::PathBuf {
    let p = site.config_path();
    fs::write(&p, text).unwrap();
    p
}

/// Asserts check-config exits 2 and names `path:line:col` for the given line.
fn assert_config_error(path: &Path, line: usize) {
    let out = cli(path, &["check-config"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "check-config on a bad config exits 2; {}",
        show(&out)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    let prefix = format!("{}:{line}:", path.display());
    let ok = err.match_indices(&prefix).any(|(i, _)| {
        let rest = &err[i + prefix.len()..];
        rest.chars().next().is_some_and(|c| c.is_ascii_digit())
    });
    assert!(ok, "stderr should contain `{prefix}<col>`; {}", show(&out));
}

#[test]
fn check_config_accepts_good_config() {
    let site = Site::new();
    let text = format!(
        r#"[defaults]
keep = 4
keep_failed = 1
marker = ".release-ready"
manifest = "SHA256SUMS"
require_manifest = true
upload_timeout = "10m"
hook_timeout = "60s"
health_retries = 3
health_interval = "2s"
auto_rollback = true
heal_interval = "60s"
verify_interval = "1h"
settle_time = "0s"

[sites.shop]
root = "{}"
shared = ["storage", ".env"]
links = {{ htdocs = "current/public" }}
before_activate = ["/bin/true"]
after_activate = ["/bin/true"]
health_check = ["/bin/true"]
"#,
        site.root.display()
    );
    let cfg = config_file(&site, &text);
    let out = cli(&cfg, &["check-config"]);
    assert_ok(&out, "check-config on the SPEC's example config");
}

#[test]
fn check_config_unknown_key_names_line() {
    let site = Site::new();
    let cfg = config_file(
        &site,
        &format!(
            "[defaults]\nkeep = 3\n\n[sites.web]\nroot = \"{}\"\nbogus_key = 1\n",
            site.root.display()
        ),
    );
    assert_config_error(&cfg, 6);
}

#[test]
fn check_config_unknown_key_in_defaults_names_line() {
    let site = Site::new();
    let cfg = config_file(
        &site,
        &format!(
            "[defaults]\nkeep = 3\nkeeep_failed = 1\n\n[sites.web]\nroot = \"{}\"\n",
            site.root.display()
        ),
    );
    assert_config_error(&cfg, 3);
}

#[test]
fn check_config_bad_duration_names_line() {
    let site = Site::new();
    let cfg = config_file(
        &site,
        &format!(
            "[defaults]\nkeep = 3\nupload_timeout = \"ten minutes\"\n\n[sites.web]\nroot = \"{}\"\n",
            site.root.display()
        ),
    );
    assert_config_error(&cfg, 3);
}

/// A manifest or marker named like an upload's temporary file is a config error at the
/// key. A manifest `checksums.part`, `SUMS.filepart` or rsync's `.SUMS.Ab3xY9` would look
/// in flight in every upload: each one waited for up to `upload_timeout`, then rejected.
/// A marker `.~tmp~` would be the directory rsync `--delay-updates` makes at the start of
/// a transfer, claimed (and removed, with the files rsync holds in it); a marker
/// `DONE.part` would be taken as dropped while still being written.
#[test]
fn check_config_rejects_a_manifest_or_marker_named_like_a_file_in_flight() {
    let site = Site::new();
    let root = site.root.display();
    let cases = [
        (
            "manifest",
            ["checksums.part", "SUMS.filepart", ".SUMS.Ab3xY9", ".~tmp~"],
        ),
        (
            "marker",
            [".~tmp~", "DONE.part", "ready.filepart", ".ready.Ab3xY9"],
        ),
    ];
    for (key, names) in cases {
        for name in names {
            // In the site, and in [defaults].
            for (text, line) in [
                (
                    format!("[sites.web]\nroot = \"{root}\"\n{key} = \"{name}\"\n"),
                    3,
                ),
                (
                    format!("[defaults]\n{key} = \"{name}\"\n[sites.web]\nroot = \"{root}\"\n"),
                    2,
                ),
            ] {
                let cfg = config_file(&site, &text);
                assert_config_error(&cfg, line);
                let out = cli(&cfg, &["check-config"]);
                let err = String::from_utf8_lossy(&out.stderr);
                assert!(err.contains("in flight"), "{key} {name}: {}", show(&out));
            }
        }
    }
}

/// SPEC: the manifest "stays in the release (it is part of the upload)". A `shared` entry
/// of the manifest's name replaced it by a link to `shared/`, seeded once from the first
/// upload: every later release then showed that first manifest. A config error at the
/// entry, whether the manifest name is the default, set in `[defaults]` or in the site.
#[test]
fn check_config_rejects_a_shared_entry_that_is_the_manifest() {
    let site = Site::new();
    let root = site.root.display();
    for (text, line) in [
        (format!("[sites.web]\nroot = \"{root}\"\nshared = [\"storage\", \"SHA256SUMS\"]\n"), 3),
        (format!("[defaults]\nmanifest = \"SUMS\"\n[sites.web]\nroot = \"{root}\"\nshared = [\"SUMS\"]\n"), 5),
        (format!("[sites.web]\nroot = \"{root}\"\nshared = [\"SUMS/x\"]\nmanifest = \"SUMS\"\n"), 3),
    ] {
        let cfg = config_file(&site, &text);
        assert_config_error(&cfg, line);
        let out = cli(&cfg, &["check-config"]);
        assert!(output_text(&out).contains("manifest"), "{text}: {}", show(&out));
    }
    // The default manifest name is an ordinary shared entry once the manifest is renamed.
    let cfg = config_file(
        &site,
        &format!(
            "[sites.web]\nroot = \"{root}\"\nmanifest = \"SUMS\"\nshared = [\"SHA256SUMS\"]\n"
        ),
    );
    assert_ok(
        &cli(&cfg, &["check-config"]),
        "shared SHA256SUMS with manifest SUMS",
    );
}

#[test]
fn check_config_relative_root_names_line() {
    let site = Site::new();
    let cfg = config_file(
        &site,
        "# sites\n[sites.web]\nkeep = 2\nroot = \"srv/web\"\n",
    );
    assert_config_error(&cfg, 4);
}

/// A site defined both as `[sites.NAME]` and by `sites.d/NAME.toml` is a config error
/// that, like every other, names file, line and column: the main config's `[sites.NAME]`
/// (its `root`), with the sites.d file in the message.
#[test]
fn check_config_site_defined_twice_names_line_and_both_files() {
    let site = Site::new();
    let cfg = config_file(
        &site,
        &format!(
            "[defaults]\nkeep = 3\n\n[sites.blog]\nroot = \"{}\"\n",
            site.root.display()
        ),
    );
    let d = site.tmp_path("sites.d");
    fs::create_dir(&d).unwrap();
    fs::write(d.join("blog.toml"), "root = \"/srv/other\"\n").unwrap();
    assert_config_error(&cfg, 5);
    let out = cli(&cfg, &["check-config"]);
    assert!(
        output_text(&out).contains("sites.d/blog.toml"),
        "{}",
        show(&out)
    );
}

#[test]
fn check_config_error_in_sites_d_names_that_file() {
    let site = Site::new();
    let cfg = config_file(&site, "[defaults]\nkeep = 3\n");
    let d = site.tmp_path("sites.d");
    fs::create_dir(&d).unwrap();
    let blog = d.join("blog.toml");
    fs::write(
        &blog,
        format!(
            "root = \"{}\"\nhealth_interval = \"soon\"\n",
            site.root.display()
        ),
    )
    .unwrap();
    let out = cli(&cfg, &["check-config"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:2:", blog.display())),
        "error should name sites.d/blog.toml line 2; {}",
        show(&out)
    );
}

#[test]
fn sites_d_file_is_a_site_named_after_the_file() {
    let site = Site::new();
    let cfg = config_file(&site, "[defaults]\nkeep = 3\n");
    let d = site.tmp_path("sites.d");
    fs::create_dir(&d).unwrap();
    fs::write(
        d.join("blog.toml"),
        format!("root = \"{}\"\n", site.root.display()),
    )
    .unwrap();
    let out = cli(&cfg, &["check-config"]);
    assert_ok(&out, "check-config with sites.d");
    let out = cli(&cfg, &["init", "blog"]);
    assert_ok(&out, "init blog (from sites.d/blog.toml)");
    assert!(site.releases_dir().is_dir());
}

#[test]
fn check_config_missing_root_is_only_a_warning() {
    let site = Site::new();
    let missing = site.tmp_path("not-yet");
    let cfg = config_file(
        &site,
        &format!("[sites.web]\nroot = \"{}\"\n", missing.display()),
    );
    let out = cli(&cfg, &["check-config"]);
    assert_ok(&out, "check-config with a root that does not exist yet");
    let all = output_text(&out);
    assert!(
        all.contains(missing.to_str().unwrap()),
        "a missing root is warned about; {}",
        show(&out)
    );
}

/// A hook whose program is missing or not executable would fail every activation:
/// check-config says so (a warning: it may be installed before the first deploy).
#[test]
fn check_config_warns_about_a_hook_program_that_cannot_run() {
    let site = Site::new();
    let not_exec = site.tmp_path("health.sh");
    fs::write(&not_exec, "#!/bin/sh\n").unwrap();
    let cfg = site.write_config(
        "web",
        "",
        &format!(
            "before_activate = [\"/nonexistent/migrate\", \"--force\"]\nhealth_check = [\"{}\"]\nafter_activate = [\"/bin/true\"]",
            not_exec.display()
        ),
    );
    let out = cli(&cfg, &["check-config"]);
    assert_ok(&out, "check-config with hooks that cannot run yet");
    let all = output_text(&out);
    for needle in ["before_activate: /nonexistent/migrate", "is not executable"] {
        assert!(all.contains(needle), "{needle:?}; {}", show(&out));
    }
    assert!(!all.contains("after_activate"), "{}", show(&out));
}

/// A `hook_user` that does not exist (a typo, a user not created yet) fails every hook,
/// so every activation: check-config warns, naming the site and the user, as it does for
/// a hook program that cannot run. A site without hooks never uses it: no warning.
#[test]
fn check_config_warns_about_a_hook_user_that_does_not_exist() {
    let site = Site::new();
    let other = site.tmp_path("other");
    let cfg = config_file(
        &site,
        &format!(
            "[defaults]\nhook_user = \"no-such-user-rk\"\n\n[sites.web]\nroot = \"{}\"\n\
             health_check = [\"/bin/true\"]\n\n[sites.plain]\nroot = \"{}\"\n",
            site.root.display(),
            other.display()
        ),
    );
    let out = cli(&cfg, &["check-config", "--log-format", "json"]);
    assert_ok(&out, "check-config with an unknown hook_user");
    let warned: Vec<Value> = stderr_events(&out)
        .into_iter()
        .filter(|e| e["event"] == "site.error")
        .collect();
    assert_eq!(warned.len(), 1, "one warning, for web only; {}", show(&out));
    assert_eq!(warned[0]["site"], "web", "{}", show(&out));
    assert!(
        reason_of(&warned[0]).contains("no-such-user-rk"),
        "{}",
        show(&out)
    );
}

/// A `metrics_file` in a directory that does not exist (node_exporter not installed yet,
/// a typo) is never written: check-config warns, naming the site and the directory.
#[test]
fn check_config_warns_about_a_metrics_file_whose_directory_does_not_exist() {
    let site = Site::new();
    let missing = site.tmp_path("no-collector-dir");
    let cfg = config_file(
        &site,
        &format!(
            "[sites.web]\nroot = \"{}\"\nmetrics_file = \"{}/rk.prom\"\n",
            site.root.display(),
            missing.display()
        ),
    );
    let out = cli(&cfg, &["check-config", "--log-format", "json"]);
    assert_ok(&out, "check-config with a missing metrics directory");
    let warned: Vec<Value> = stderr_events(&out)
        .into_iter()
        .filter(|e| e["event"] == "site.error" && e["key"] == "metrics_file")
        .collect();
    assert_eq!(warned.len(), 1, "{}", show(&out));
    assert!(
        reason_of(&warned[0]).contains("no-collector-dir"),
        "{}",
        show(&out)
    );
}

/// A site whose root does not exist yet keeps the `status --json` shape of every other
/// site (monitoring reads `.failed`, `.pinned`), and the human output says the root is
/// missing instead of looking like an empty, healthy site.
#[test]
fn status_of_a_site_whose_root_is_missing_keeps_its_shape_and_says_so() {
    let site = Site::new();
    let missing = site.tmp_path("not-yet");
    let cfg = config_file(
        &site,
        &format!("[sites.web]\nroot = \"{}\"\n", missing.display()),
    );
    let out = cli(&cfg, &["status", "--json"]);
    assert_ok(&out, "status --json with a missing root");
    let doc = stdout_json(&out);
    let web = &doc["sites"][0];
    for key in [
        "site",
        "current",
        "previous",
        "releases",
        "pinned",
        "failed",
        "drift",
        "last_event",
    ] {
        assert!(
            web.get(key).is_some(),
            "status --json of a missing root lacks {key:?}: {web}"
        );
    }
    assert_eq!(web["pinned"], serde_json::json!([]), "{web}");
    assert_eq!(web["failed"], serde_json::json!([]), "{web}");

    let out = cli(&cfg, &["status"]);
    assert_ok(&out, "status with a missing root");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.contains("does not exist") && text.contains(missing.to_str().unwrap()),
        "human status must say the root is missing: {}",
        show(&out)
    );
}

/// `status` of all sites with one site's journal unreadable printed nothing at all: the
/// healthy sites are shown, the broken one says its error (a document of the same shape
/// with `error` in JSON), and the command exits 1. `status` or `list` of that site alone
/// fails, its JSON document saying why.
#[test]
fn status_of_all_sites_shows_the_others_when_one_journal_cannot_be_read() {
    let site = Site::new();
    let broken = site.tmp_path("broken");
    let cfg = config_file(
        &site,
        &format!(
            "[sites.web]\nroot = \"{}\"\n[sites.zz]\nroot = \"{}\"\n",
            site.root.display(),
            broken.display()
        ),
    );
    assert_ok(&cli(&cfg, &["init", "web"]), "init web");
    assert_ok(&cli(&cfg, &["init", "zz"]), "init zz");
    site.stage_upload(&as_refs(&small_build("v1")));
    assert_ok(&cli(&cfg, &["finalize", "web", "--id", "v1"]), "finalize");
    // A directory where the journal should be: reading it fails.
    let journal = broken.join(".release-keeper/journal");
    let _ = fs::remove_file(&journal);
    fs::create_dir_all(&journal).unwrap();

    let out = cli(&cfg, &["status", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let doc = stdout_json(&out);
    let sites = doc["sites"].as_array().expect("sites");
    let by = |n: &str| sites.iter().find(|s| s["site"] == n).cloned();
    let web = by("web").unwrap_or_else(|| panic!("web is shown: {doc}"));
    assert_eq!(web["current"], "v1", "{doc}");
    let zz = by("zz").unwrap_or_else(|| panic!("zz is shown: {doc}"));
    assert!(
        zz["error"].as_str().is_some_and(|e| e.contains("journal")),
        "{doc}"
    );
    assert_eq!(zz["releases"], serde_json::json!([]), "same shape: {doc}");

    let out = cli(&cfg, &["status"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.contains("site web") && text.contains("v1") && text.contains("site zz"),
        "{}",
        show(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("journal"),
        "the failure is said on stderr: {}",
        show(&out)
    );

    // Named alone, each still prints its one JSON document, with the error in it.
    for args in [
        &["status", "zz", "--json"][..],
        &["list", "zz", "--json"][..],
    ] {
        let out = cli(&cfg, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", show(&out));
        let doc = stdout_json(&out);
        assert_eq!(doc["site"], "zz", "{args:?}: {doc}");
        assert!(
            doc["error"].as_str().is_some_and(|e| e.contains("journal")),
            "{args:?}: {doc}"
        );
        assert_eq!(doc["releases"], serde_json::json!([]), "{args:?}: {doc}");
    }
}

/// A reader that closed its end of the pipe early (`status | head -1`, `list | grep -q`)
/// made the command print "<stdout>: Broken pipe" and exit 1, even for a `pin` that was
/// done: a `pipefail` script took a success for a failure. The output is dropped now;
/// the exit code is the operation's.
#[test]
fn a_closed_stdout_pipe_does_not_fail_a_command_that_succeeded() {
    let site = Site::new();
    let cfg = site.write_config("web", "", "");
    assert_ok(&cli(&cfg, &["init", "web"]), "init");
    site.stage_upload(&as_refs(&small_build("v1")));
    assert_ok(&cli(&cfg, &["finalize", "web", "--id", "v1"]), "finalize");
    let closed_pipe = || {
        let (read, write) = nix::unistd::pipe().expect("pipe");
        drop(read);
        std::process::Stdio::from(write)
    };
    for args in [
        &["status", "web", "--json"][..],
        &["list", "web"][..],
        &["pin", "web", "v1"][..],
    ] {
        let out = std::process::Command::new(BIN)
            .arg("--config")
            .arg(&cfg)
            .args(args)
            .env_remove("JOURNAL_STREAM")
            .stdout(closed_pipe())
            .stderr(std::process::Stdio::piped())
            .output()
            .expect("run release-keeper");
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?} with its reader gone: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !String::from_utf8_lossy(&out.stderr).contains("Broken pipe"),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v = stdout_json(&cli(&cfg, &["list", "web", "--json"]));
    assert_eq!(v["releases"][0]["pinned"], true, "the pin was done: {v}");
}

#[test]
fn unknown_site_is_an_error() {
    let site = Site::new();
    let cfg = site.write_config("web", "", "");
    let out = cli(&cfg, &["list", "nosuchsite"]);
    assert!(
        matches!(out.status.code(), Some(1) | Some(2)),
        "unknown site must fail; {}",
        show(&out)
    );
}

#[test]
fn bad_usage_exits_2() {
    let out = cli_raw(&["no-such-command"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let site = Site::new();
    let cfg = site.write_config("web", "", "");
    let out = cli(&cfg, &["prune", "web", "--frobnicate"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
}

#[test]
fn run_root_without_config_file() {
    assert!(
        !Path::new("/etc/release-keeper/config.toml").exists(),
        "test assumes no system config"
    );
    let site = Site::new();
    fs::remove_dir(site.deploy_cache()).unwrap();
    let mut svc = Service::start_root(&site.root);
    for d in ["deploy-cache", "releases", "shared", ".release-keeper"] {
        assert!(
            site.root.join(d).is_dir(),
            "service creates missing {d}/ at start"
        );
    }
    site.deploy(&as_refs(&small_build("x")), "id = \"x1\"\n");
    let ev = svc.wait_release_event("release.activated", "x1");
    for k in ["timestamp", "level", "event", "site"] {
        assert!(ev.get(k).is_some(), "log events have top-level `{k}`: {ev}");
    }
    let name = ev["site"].as_str().unwrap_or_default().to_string();
    assert!(!name.is_empty(), "site name in events: {ev}");
    svc.stop();
    assert!(
        !svc.events("daemon.stopping").is_empty(),
        "daemon.stopping logged on SIGTERM; log:\n{}",
        svc.log_text()
    );
}

/// The site `run --root DIR` serves is managed with the same `--root DIR` (no config file
/// needed for the demo of the quick start either): `status`, `list default`,
/// `rollback default` work on it, while the service runs. `--root` with `--config`, with a
/// site other than `default`, or with a command on no site is a usage error (exit 2).
#[test]
fn commands_on_the_site_of_run_root_take_the_same_root() {
    let site = Site::new();
    let root = site.root.to_str().unwrap().to_string();
    let mut svc = Service::start_root(&site.root);
    for id in ["v1", "v2"] {
        site.deploy(&as_refs(&small_build(id)), &format!("id = \"{id}\"\n"));
        svc.wait_release_event("release.activated", id);
    }
    // Whatever the environment names, --root uses no config file.
    let env = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_release-keeper"))
            .args(args)
            .env("RELEASE_KEEPER_CONFIG", "/nonexistent/config.toml")
            .output()
            .unwrap()
    };
    let status = stdout_json(&env(&["--root", &root, "status", "--json"]));
    let doc = status["sites"]
        .as_array()
        .and_then(|s| s.first())
        .cloned()
        .unwrap_or(status.clone());
    assert_eq!(doc["current"], "v2", "{status}");
    assert_eq!(doc["previous"], "v1", "{status}");
    let list = stdout_json(&env(&["list", "default", "--root", &root, "--json"]));
    assert_eq!(list["current"], "v2", "{list}");
    let out = env(&["rollback", "default", "--root", &root]);
    assert_ok(&out, "rollback default --root DIR");
    assert_eq!(site.current_id().as_deref(), Some("v1"));

    // A root not made yet: the hint names the command that makes it, --root and all.
    let later = site.tmp_path("later");
    let later = later.to_str().unwrap();
    let out = env(&["--root", later, "status"]);
    assert_ok(&out, "status --root of a root not made yet");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!(
            "`release-keeper --root {later} init default` creates it"
        )),
        "{}",
        show(&out)
    );

    let cfg = site.write_config("web", "", "");
    for (args, says) in [
        (vec!["list", "shop", "--root", &root], "unknown site"),
        (
            vec!["--config", cfg.to_str().unwrap(), "--root", &root, "status"],
            "--config",
        ),
        (vec!["--root", &root, "check-config"], "--root"),
        (
            vec!["--root", cfg.to_str().unwrap(), "status"],
            "is not a directory",
        ),
    ] {
        let out = env(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", show(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(says),
            "{args:?}: {}",
            show(&out)
        );
    }
    svc.stop();
}

#[test]
fn global_options_before_or_after_the_command() {
    let site = Site::new();
    let cfg = site.write_config("web", "", "");
    let c = cfg.to_str().unwrap();
    let out = cli_raw(&["check-config", "--config", c]);
    assert_ok(&out, "check-config --config FILE");
    let out = cli_raw(&["--config", c, "check-config"]);
    assert_ok(&out, "--config FILE check-config");

    for args in [
        vec!["run", "--config", c, "--log-format", "json"],
        vec!["--log-format", "json", "--config", c, "run"],
        vec!["--config", c, "run", "--log-format", "json"],
    ] {
        let mut svc = Service::spawn(&args);
        let ev = svc.wait_started();
        assert!(
            svc.json_lines().iter().all(|v| v.get("event").is_some()),
            "--log-format json gives JSON events ({args:?}); started: {ev}"
        );
        svc.stop();
    }
}

#[test]
fn second_service_for_same_site_refuses_to_start() {
    let site = Site::new();
    let cfg = site.write_config("web", "", "");
    let mut first = Service::start_config(&cfg);
    let second = Service::spawn_config(&cfg);
    let st = second.wait_exit(Duration::from_secs(10));
    assert_eq!(
        st.code(),
        Some(75),
        "a second service for the same site must refuse to start, busy (75); log:\n{}",
        second.log_text()
    );
    assert!(first.is_running(), "the first service keeps running");
    // The first one still works.
    site.deploy(&as_refs(&small_build("v1")), "id = \"v1\"\n");
    first.wait_release_event("release.activated", "v1");
    first.stop();
}

#[test]
fn second_service_with_root_flag_refuses_to_start() {
    let site = Site::new();
    let mut first = Service::start_root(&site.root);
    let second = Service::spawn(&[
        "run",
        "--root",
        site.root.to_str().unwrap(),
        "--log-format",
        "json",
    ]);
    let st = second.wait_exit(Duration::from_secs(10));
    assert_eq!(
        st.code(),
        Some(75),
        "second `run --root` on the same root must refuse, busy (75); {st:?}"
    );
    first.stop();
}

/// `run --root` uses built-in defaults and no config file: an explicit `--config` beside
/// it (with its hooks and health check) must not be silently ignored, or deploys would
/// run without the checks the operator believes are in place.
#[test]
fn run_root_with_explicit_config_is_a_usage_error() {
    let site = Site::new();
    let cfg = site.write_config("web", "", "health_check = [\"/bin/false\"]");
    let mut svc = Service::spawn(&[
        "--config",
        cfg.to_str().unwrap(),
        "run",
        "--root",
        site.root.to_str().unwrap(),
        "--log-format",
        "json",
    ]);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while svc.is_running() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if svc.is_running() {
        svc.terminate();
        panic!(
            "`run --root` with --config started and ignored the config; log:\n{}",
            svc.log_text()
        );
    }
    let st = svc.wait_exit(Duration::from_secs(1));
    assert_eq!(st.code(), Some(2), "usage error; log:\n{}", svc.log_text());
    assert!(
        svc.log_text().contains("--config"),
        "the error names the conflicting option; log:\n{}",
        svc.log_text()
    );
}

#[test]
fn init_creates_layout() {
    let site = Site::new();
    let cfg = site.write_config("web", "", "");
    let out = cli(&cfg, &["init", "web"]);
    assert_ok(&out, "init web");
    for d in ["deploy-cache", "releases", "shared", ".release-keeper"] {
        assert!(site.root.join(d).is_dir(), "init creates {d}/");
    }
}

/// A root that is a symlink to a directory (`/var/www/shop -> /srv/shop`) is that
/// directory for `init` as for every other command: `init` said it "exists but is not a
/// directory", while `finalize` worked through it.
#[test]
fn init_follows_a_root_that_is_a_symlink_to_a_directory() {
    let site = Site::new();
    let link = site.tmp_path("www-shop");
    std::os::unix::fs::symlink(&site.root, &link).unwrap();
    let cfg = config_file(
        &site,
        &format!("[sites.web]\nroot = \"{}/\"\n", link.display()),
    );
    let out = cli(&cfg, &["init", "web"]);
    assert_ok(&out, "init through the link");
    assert!(site.root.join("releases").is_dir() && site.root.join(".release-keeper").is_dir());
    assert!(fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    if nix::unistd::geteuid().is_root() {
        assert_ok(
            &cli(&cfg, &["init", "web", "--owner", "nobody"]),
            "init --owner",
        );
        let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(fs::metadata(&site.root).unwrap().uid(), nobody.uid.as_raw());
    }
}

/// `sudo release-keeper init web --owner USER` under `umask 077`, with two parents of
/// the root missing: the parents `init` makes are 0755, so the owner (and the web server)
/// can reach the root through them; they came out 0700, root's, as the umask made them.
/// A parent that already existed keeps its mode.
#[test]
fn init_makes_the_missing_parents_of_the_root_traversable_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let site = Site::new();
    let existing = site.tmp_path("srv");
    fs::create_dir(&existing).unwrap();
    fs::set_permissions(&existing, fs::Permissions::from_mode(0o710)).unwrap();
    let root = existing.join("www/sites/shop");
    let cfg = config_file(
        &site,
        &format!("[sites.web]\nroot = \"{}\"\n", root.display()),
    );
    let mut args = vec!["--config", cfg.to_str().unwrap(), "init", "web"];
    if nix::unistd::geteuid().is_root() {
        args.extend(["--owner", "nobody"]);
    }
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg("umask 077; exec \"$0\" \"$@\"")
        .arg(BIN)
        .args(&args)
        .env_remove("RELEASE_KEEPER_CONFIG")
        .output()
        .unwrap();
    assert_ok(&out, "init under umask 077");
    for d in [
        existing.join("www"),
        existing.join("www/sites"),
        root.clone(),
    ] {
        assert_eq!(mode(&d) & 0o7777, 0o755, "{} is 0755", d.display());
    }
    assert_eq!(
        mode(&existing) & 0o7777,
        0o710,
        "a parent that existed is left as it was"
    );
}

/// A layout made by hand before `init` (here everything 0777) gets from `init` the modes
/// nobody but the keeper may exceed: `releases/` not writable by group or others (they
/// could rename one release over another), `.release-keeper/` and its directories at most
/// 0750. `init` says what it changed, and a second `init` changes nothing.
#[test]
fn init_tightens_the_keepers_directories_made_before_it() {
    use std::os::unix::fs::PermissionsExt;
    let site = Site::new();
    let cfg = site.write_config("web", "", "");
    let state = site.root.join(".release-keeper");
    for d in [
        site.releases_dir(),
        state.clone(),
        state.join("manifests"),
        state.join("claims"),
        site.root.join("shared"),
    ] {
        fs::create_dir_all(&d).unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o777)).unwrap();
    }
    fs::set_permissions(site.deploy_cache(), fs::Permissions::from_mode(0o2770)).unwrap();
    let out = cli(&cfg, &["init", "web"]);
    assert_ok(&out, "init web");
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    for (d, want) in [
        (site.releases_dir(), 0o755),
        (state.clone(), 0o750),
        (state.join("manifests"), 0o750),
        (state.join("claims"), 0o750),
    ] {
        assert_eq!(mode(&d) & 0o7777, want, "{}", d.display());
        assert!(
            said.contains(&format!("{} was mode 0777, now {want:04o}", d.display())),
            "init says what it changed: {said}"
        );
    }
    // What uploaders and the application share is left as the operator set it.
    assert_eq!(mode(&site.root.join("shared")) & 0o7777, 0o777);
    if !nix::unistd::geteuid().is_root()
        || nix::unistd::User::from_name("release-keeper")
            .ok()
            .flatten()
            .is_none()
    {
        assert_eq!(mode(&site.deploy_cache()) & 0o7777, 0o2770);
    }
    let again = cli(&cfg, &["init", "web"]);
    assert_ok(&again, "init web again");
    assert!(
        !String::from_utf8_lossy(&again.stdout).contains("was mode"),
        "nothing left to change: {}",
        show(&again)
    );
}

/// `sudo release-keeper init shop`, as the install steps run it: the layout must be
/// usable by the service's own user (`User=release-keeper`), not owned by root, and
/// `deploy-cache/` group-writable for the uploaders' group whatever the caller's umask.
#[test]
fn init_as_root_hands_the_layout_to_the_service_user() {
    let site = Site::new();
    let cfg = site.write_config("web", "", "");
    let out = cli(&cfg, &["init", "web", "--owner", "nobody"]);
    if !nix::unistd::geteuid().is_root() {
        // Only root can give files away: a plain user is told so.
        assert_eq!(out.status.code(), Some(1), "{}", show(&out));
        return;
    }
    assert_ok(&out, "init web --owner nobody");
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("user nobody");
    for d in [
        "",
        "deploy-cache",
        "releases",
        "shared",
        ".release-keeper",
        ".release-keeper/manifests",
        ".release-keeper/claims",
    ] {
        let m = fs::metadata(site.root.join(d)).unwrap();
        assert_eq!(
            (m.uid(), m.gid()),
            (nobody.uid.as_raw(), nobody.gid.as_raw()),
            "ROOT/{d} belongs to the service user; {}",
            show(&out)
        );
    }
    assert_eq!(
        mode(&site.deploy_cache()),
        0o775,
        "deploy-cache/ is group-writable for uploaders"
    );
    let out = cli(&cfg, &["init", "web", "--owner", "no-such-user-rk"]);
    assert_eq!(out.status.code(), Some(2), "unknown owner: {}", show(&out));
    assert!(
        output_text(&out).contains("no-such-user-rk"),
        "{}",
        show(&out)
    );
}

/// `sudo release-keeper finalize|rollback|...` on a site the service runs as its own
/// user: what the command makes (releases, the lock, state files) must stay the service's,
/// or the service can no longer prune those releases or take that lock. As root, the
/// command acts as the owner of the site's `.release-keeper/`.
#[test]
fn commands_run_as_root_leave_files_the_service_user_owns() {
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    let site = Site::new();
    // The service user must be able to reach the root.
    fs::set_permissions(
        site.tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let cfg = site.write_config("web", "", "");
    assert_ok(&cli(&cfg, &["init", "web", "--owner", "nobody"]), "init");
    site.stage_upload(&as_refs(&small_build("v1")));
    let out = cli(&cfg, &["finalize", "web", "--id", "v1"]);
    assert_ok(&out, "finalize as root");
    let out = cli(&cfg, &["pin", "web", "v1"]);
    assert_ok(&out, "pin as root");
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("user nobody")
        .uid
        .as_raw();
    let mut owned_by_root = Vec::new();
    for top in ["releases", ".release-keeper", "current"] {
        let mut stack = vec![site.root.join(top)];
        while let Some(p) = stack.pop() {
            let m = fs::symlink_metadata(&p).unwrap();
            if m.uid() != nobody {
                owned_by_root.push(p.clone());
            }
            if m.is_dir() {
                stack.extend(fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
            }
        }
    }
    assert!(
        owned_by_root.is_empty(),
        "left to root, not the service user: {owned_by_root:?}"
    );
}

#[test]
fn manifest_command_output_passes_sha256sum_check() {
    let site = Site::new();
    let build = site.tmp_path("build");
    write_tree(
        &build,
        &[
            ("index.html", b"<h1>hi</h1>\n" as &[u8]),
            ("a/b/c.txt", b"c\n"),
            ("a/empty.txt", b""),
            ("dir with space/file name.txt", b"spaced\n"),
            ("big.bin", &vec![7u8; 300_000]),
        ],
    );
    write_symlink(&build, "a/link", "b/c.txt");
    let out = cli_raw(&["manifest", build.to_str().unwrap()]);
    assert_ok(&out, "manifest DIR");
    let m = build.join(MANIFEST);
    assert!(m.is_file(), "`manifest DIR` writes DIR/SHA256SUMS");
    let check = sh(&build, "sha256sum -c --strict SHA256SUMS");
    let ok_lines = String::from_utf8_lossy(&check.stdout)
        .lines()
        .filter(|l| l.ends_with(": OK"))
        .count();
    assert_eq!(
        ok_lines, 5,
        "every regular file is listed once (not itself, not the link)"
    );

    // Re-running with a marker present: neither the manifest itself nor the marker is listed.
    fs::write(build.join(MARKER), b"").unwrap();
    let out = cli_raw(&["manifest", build.to_str().unwrap()]);
    assert_ok(&out, "manifest DIR (again)");
    let text = fs::read_to_string(&m).unwrap();
    assert!(!text.contains(MANIFEST), "manifest lists itself:\n{text}");
    assert!(!text.contains(MARKER), "manifest lists the marker:\n{text}");
    assert_eq!(text.lines().count(), 5, "{text}");
    sh(&build, "sha256sum -c --strict --quiet SHA256SUMS");
}

/// `manifest DIR` does not list symlinks, so its manifest is right either way; but a
/// symlink the keeper rejects (absolute, or escaping the release) is flagged at once, in
/// CI, not found later as a rejected deploy. In-tree ones are not.
#[test]
fn manifest_command_warns_about_symlinks_the_keeper_rejects() {
    let site = Site::new();
    let build = site.tmp_path("build");
    write_tree(
        &build,
        &[("index.html", b"hi\n" as &[u8]), ("a/b.txt", b"b\n")],
    );
    write_symlink(&build, "home.html", "index.html");
    write_symlink(&build, "a/up", "../index.html");
    write_symlink(&build, "etc", "/etc/passwd");
    write_symlink(&build, "a/out", "../../elsewhere");
    let out = cli_raw(&["manifest", build.to_str().unwrap()]);
    assert_ok(&out, "manifest DIR with symlinks");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning: symlink etc -> /etc/passwd is absolute")
            && err.contains("warning: symlink a/out -> ../../elsewhere points outside"),
        "{}",
        show(&out)
    );
    assert!(
        !err.contains("home.html") && !err.contains("a/up"),
        "in-tree symlinks are fine: {}",
        show(&out)
    );
    assert_eq!(
        fs::read_to_string(build.join(MANIFEST))
            .unwrap()
            .lines()
            .count(),
        2
    );
}

#[test]
fn manifest_command_with_output_file_and_odd_names() {
    let site = Site::new();
    let build = site.tmp_path("build");
    write_tree(
        &build,
        &[
            ("back\\slash.txt", b"bs\n" as &[u8]),
            ("new\nline.txt", b"nl\n"),
            ("plain.txt", b"p\n"),
        ],
    );
    let out_file = site.tmp_path("sums.txt");
    let out = manifest_into(&build, &out_file);
    assert_ok(&out, "manifest DIR -o FILE");
    assert!(out_file.is_file(), "-o FILE is written");
    assert!(
        !build.join(MANIFEST).exists(),
        "with -o the build dir is left alone"
    );
    sh(
        &build,
        &format!("sha256sum -c --strict --quiet '{}'", out_file.display()),
    );
}

/// `release-keeper manifest BUILD -o OUT`.
fn manifest_into(build: &Path, out: &Path) -> std::process::Output {
    cli_raw(&[
        "manifest",
        build.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ])
}

/// Runs `manifest build -o build/<out>` twice (a CI job re-run) and checks the output
/// never lists itself, which would make `sha256sum -c` fail on its stale hash.
fn manifest_twice_into_the_build(out: &str, files: &[(&str, &[u8])]) {
    let site = Site::new();
    let build = site.tmp_path("build");
    write_tree(&build, files);
    let out_file = build.join(out);
    for run in 1..=2 {
        let result = manifest_into(&build, &out_file);
        assert_ok(&result, &format!("manifest DIR -o DIR/{out} (run {run})"));
        let counted = format!("({} file", files.len());
        assert!(
            String::from_utf8_lossy(&result.stdout).contains(&counted),
            "{} files counted: {}",
            files.len(),
            show(&result)
        );
        let text = fs::read_to_string(&out_file).unwrap();
        assert!(
            !text.contains(out),
            "run {run}: the output lists itself:\n{text}"
        );
    }
    sh(&build, &format!("sha256sum -c --strict --quiet {out}"));
}

/// A site with `manifest = "MANIFEST.sha256"` writes it with `-o build/MANIFEST.sha256`.
#[test]
fn manifest_output_inside_the_build_dir_does_not_list_itself() {
    manifest_twice_into_the_build("MANIFEST.sha256", &[("index.html", b"x\n")]);
}

/// The same for an output in a subdirectory of the build (`-o build/meta/SHA256SUMS`).
#[test]
fn manifest_output_in_a_subdirectory_of_the_build_does_not_list_itself() {
    manifest_twice_into_the_build(
        "meta/SHA256SUMS",
        &[("index.html", b"x\n"), ("meta/info", b"i\n")],
    );
}

/// A site with `manifest = "CHECKSUMS"` whose build holds a file named `SHA256SUMS` (a
/// vendored list, say): `manifest build -o build/CHECKSUMS` lists that file like any other,
/// and the upload is accepted. It used to be left out as if it were a stale manifest, and
/// the keeper then rejected the upload for a file its manifest did not list.
#[test]
fn manifest_into_the_build_under_another_name_lists_a_sha256sums_of_the_build() {
    let site = Site::new();
    let build = site.tmp_path("build");
    write_tree(
        &build,
        &[
            ("index.html", b"x\n" as &[u8]),
            ("SHA256SUMS", b"vendored\n"),
        ],
    );
    let out_file = build.join("CHECKSUMS");
    let out = manifest_into(&build, &out_file);
    assert_ok(&out, "manifest DIR -o DIR/CHECKSUMS");
    let text = fs::read_to_string(&out_file).unwrap();
    assert!(text.contains("  SHA256SUMS\n"), "{text}");
    assert!(
        !text.contains("  CHECKSUMS\n"),
        "the output never lists itself: {text}"
    );
    let cfg = site.write_config("web", "manifest = \"CHECKSUMS\"", "");
    let built: Vec<(String, Vec<u8>)> = ["index.html", "SHA256SUMS", "CHECKSUMS"]
        .iter()
        .map(|n| (n.to_string(), fs::read(build.join(n)).unwrap()))
        .collect();
    let files: Vec<(&str, &[u8])> = built
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_slice()))
        .collect();
    write_tree(&site.deploy_cache(), &files);
    finalize_expecting(&cfg, "web", "v1", &[], 0);
    // Written to stdout, a SHA256SUMS in the build is still taken for a stale manifest.
    let out = cli_raw(&["manifest", build.to_str().unwrap(), "-o", "-"]);
    assert_ok(&out, "manifest DIR -o -");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("  SHA256SUMS"),
        "{}",
        show(&out)
    );
}

/// `-o` naming a fifo (or a device: `-o /dev/null` as root) writes through it, as the
/// shell's `>` does. The output used to be renamed over it, replacing the node with a
/// regular file; as root, `-o /dev/null` destroyed /dev/null.
#[test]
fn manifest_output_to_a_fifo_is_written_through_it() {
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let site = Site::new();
    let build = site.tmp_path("build");
    write_tree(&build, &[("index.html", b"x\n" as &[u8])]);
    let fifo = site.tmp_path("sums.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    // The reading end, opened without waiting for a writer, so the keeper's open does not
    // block; and if the keeper never writes to it, reading ends at once instead of hanging.
    let mut reader = fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let out = manifest_into(&build, &fifo);
    assert_ok(&out, "manifest DIR -o FIFO");
    assert!(
        fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo(),
        "the fifo is still a fifo, not replaced by a file"
    );
    let mut got = String::new();
    reader.read_to_string(&mut got).unwrap();
    let want = format!("{}  index.html\n", sha256_hex(b"x\n"));
    assert_eq!(
        got,
        want,
        "the manifest went through the fifo: {}",
        show(&out)
    );
    assert!(
        !fs::read_dir(site.tmp.path()).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(".rk-tmp")),
        "no temporary file left beside it"
    );
}

/// `-o LINK` writes where the link points, as the shell's `>` does: the target file gets
/// the manifest (replaced atomically, as any regular output file), the link stays a link.
/// A dangling link gets its target created. The link itself used to be replaced by a file.
#[test]
fn manifest_output_to_a_symlink_writes_its_target() {
    let site = Site::new();
    let build = site.tmp_path("build");
    write_tree(&build, &[("index.html", b"x\n" as &[u8])]);
    let want = format!("{}  index.html\n", sha256_hex(b"x\n"));
    fs::create_dir(site.tmp_path("out")).unwrap();
    fs::write(site.tmp_path("out/sums.txt"), b"stale\n").unwrap();
    for (link, target) in [("sums-link", "out/sums.txt"), ("new-link", "out/new.txt")] {
        let link = site.tmp_path(link);
        std::os::unix::fs::symlink(target, &link).unwrap();
        let out = manifest_into(&build, &link);
        assert_ok(&out, "manifest DIR -o LINK");
        assert_eq!(
            fs::read_link(&link).ok().as_deref(),
            Some(Path::new(target)),
            "{} stays a link to {target}",
            link.display()
        );
        assert_eq!(
            fs::read_to_string(site.tmp_path(target)).unwrap(),
            want,
            "{target}, the link's target, holds the manifest"
        );
    }
}

/// `-o` into a directory that does not exist fails naming the path the user gave, not the
/// temporary name the file is written under first.
#[test]
fn manifest_output_error_names_the_given_path() {
    let site = Site::new();
    let build = site.tmp_path("build");
    write_tree(&build, &[("index.html", b"x\n" as &[u8])]);
    let target = site.tmp_path("no/such/dir/SHA256SUMS");
    let out = manifest_into(&build, &target);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(target.to_str().unwrap()) && !err.contains(".rk-tmp"),
        "the error must name {target:?}, not a temporary name: {err}"
    );
}

#[test]
fn manifest_written_by_keeper_is_accepted_by_keeper() {
    let site = Site::new();
    let mut svc = Service::start_root(&site.root);
    write_tree(
        &site.deploy_cache(),
        &[
            ("index.html", b"x\n" as &[u8]),
            ("dir with space/f.txt", b"f\n"),
        ],
    );
    let out = cli_raw(&["manifest", site.deploy_cache().to_str().unwrap()]);
    assert_ok(&out, "manifest deploy-cache");
    site.drop_marker("id = \"m1\"\n");
    svc.wait_release_event("release.activated", "m1");
    svc.stop();
}

#[test]
fn mutating_command_while_service_works_is_busy_75_unless_wait() {
    let site = Site::new();
    let hook = r#"before_activate = ["/bin/sh", "-c", "if [ \"$RELEASE_ID\" = v2 ]; then touch \"$SITE_ROOT/../hook-v2-started\"; sleep 3; fi"]"#;
    let cfg = site.write_config("web", "", hook);
    let mut svc = Service::start_config(&cfg);
    site.deploy(&as_refs(&small_build("v1")), "id = \"v1\"\n");
    svc.wait_release_event("release.activated", "v1");
    site.deploy(&as_refs(&small_build("v2")), "id = \"v2\"\n");
    let flag = site.tmp_path("hook-v2-started");
    wait_until(
        WAIT,
        || flag.exists(),
        || "the v2 before_activate hook to start".into(),
    );

    let out = cli(&cfg, &["pin", "web", "v1"]);
    assert_eq!(
        out.status.code(),
        Some(75),
        "pin while the service holds the op lock (hook running) exits 75; {}",
        show(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--wait"),
        "the busy error says how to wait instead; {}",
        show(&out)
    );
    // `--wait 0`: a zero wait, written without a unit, is still busy, not a usage error.
    let out = cli(&cfg, &["pin", "web", "v1", "--wait", "0"]);
    assert_eq!(out.status.code(), Some(75), "pin --wait 0; {}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("after waiting 0"),
        "the busy error says it waited; {}",
        show(&out)
    );
    let out = cli(&cfg, &["pin", "web", "v1", "--wait", "15s"]);
    assert_ok(&out, "pin --wait 15s");
    svc.wait_release_event("release.activated", "v2");
    let out = cli(&cfg, &["list", "web", "--json"]);
    assert_ok(&out, "list");
    let v = stdout_json(&out);
    let v1 = v["releases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == "v1")
        .cloned();
    assert_eq!(
        v1.map(|r| r["pinned"].clone()),
        Some(serde_json::Value::Bool(true)),
        "{v}"
    );
    svc.stop();
}

#[test]
fn every_json_event_carries_event_and_site() {
    let site = Site::new();
    // A health check failing its first attempt, a shared entry and an upload without a
    // manifest: each logs a diagnostic beside the listed events, and those lines too
    // must carry `event` and `site`.
    let flag = site.tmp_path("health-failed-once");
    let cfg = site.write_config(
        "web",
        "require_manifest = false\nhealth_retries = 2\nhealth_interval = \"50ms\"\n",
        &format!(
            "shared = [\"storage\"]\nhealth_check = [\"/bin/sh\", \"-c\", \
             \"test -e {0} || {{ touch {0}; exit 1; }}\"]",
            flag.display()
        ),
    );
    let mut svc = Service::start_config(&cfg);
    site.stage_upload(&as_refs(&small_build("v1")));
    fs::remove_file(site.deploy_cache().join(MANIFEST)).unwrap();
    site.drop_marker("id = \"v1\"\n");
    svc.wait_release_event("release.activated", "v1");
    svc.stop();
    let lines = svc.json_lines();
    assert!(!lines.is_empty());
    for v in &lines {
        assert!(
            v.get("event").and_then(Value::as_str).is_some(),
            "SPEC: every event carries `event`; offending line: {v}"
        );
        if v["event"] != "watch.overflow" {
            assert_eq!(
                v["site"], "web",
                "SPEC: every event carries `event` and `site`; offending line: {v}"
            );
        }
        assert!(
            v.get("timestamp").is_some() && v.get("level").is_some(),
            "{v}"
        );
    }
    for ev in [
        "daemon.started",
        "daemon.stopping",
        "upload.unverified",
        "shared.linked",
        "health.attempt_failed",
    ] {
        assert!(
            lines.iter().any(|v| v["event"] == ev),
            "`{ev}` logged; log:\n{}",
            svc.log_text()
        );
    }
}

#[test]
fn config_from_env_var() {
    let site = Site::new();
    let cfg = site.write_config("web", "", "");
    let out = std::process::Command::new(BIN)
        .arg("init")
        .arg("web")
        .env("RELEASE_KEEPER_CONFIG", &cfg)
        .output()
        .unwrap();
    assert_ok(&out, "RELEASE_KEEPER_CONFIG=FILE init web");
    assert!(site.releases_dir().is_dir());
}

#[test]
fn two_sites_in_one_service() {
    let a = Site::new();
    let b_root = a.tmp_path("broot");
    fs::create_dir_all(b_root.join("deploy-cache")).unwrap();
    let cfg = a.config_path();
    fs::write(
        &cfg,
        format!(
            "[sites.alpha]\nroot = \"{}\"\n\n[sites.beta]\nroot = \"{}\"\nkeep = 2\n",
            a.root.display(),
            b_root.display()
        ),
    )
    .unwrap();
    let mut svc = Service::start_config(&cfg);
    a.deploy(&as_refs(&small_build("a")), "id = \"a1\"\n");
    write_tree(&b_root.join("deploy-cache"), &as_refs(&small_build("b")));
    write_sha256sums(&b_root.join("deploy-cache"));
    fs::write(b_root.join("deploy-cache").join(MARKER), "id = \"b1\"\n").unwrap();
    let ea = svc.wait_release_event("release.activated", "a1");
    let eb = svc.wait_release_event("release.activated", "b1");
    assert_eq!(ea["site"], "alpha", "{ea}");
    assert_eq!(eb["site"], "beta", "{eb}");
    assert_eq!(a.current_id().as_deref(), Some("a1"));
    assert_eq!(
        fs::read_link(b_root.join("current")).unwrap(),
        Path::new("releases/b1")
    );
    let out = cli(&cfg, &["status", "--json"]);
    assert_ok(&out, "status --json");
    let v = stdout_json(&out);
    assert!(find_site_obj(&v, "alpha", "current").is_some(), "{v}");
    assert!(find_site_obj(&v, "beta", "current").is_some(), "{v}");
    svc.stop();
}

#[test]
fn root_created_later_is_waited_for() {
    let site = Site::new();
    let later = site.tmp_path("later");
    let cfg = config_file(
        &site,
        &format!(
            "[defaults]\nheal_interval = \"1s\"\n\n[sites.web]\nroot = \"{}\"\n",
            later.display()
        ),
    );
    let mut svc = Service::spawn_config(&cfg);
    std::thread::sleep(Duration::from_millis(300)); // give it time to start (not an assertion)
    assert!(
        svc.is_running(),
        "a missing root is not fatal; log:\n{}",
        svc.log_text()
    );
    fs::create_dir_all(later.join("deploy-cache")).unwrap();
    write_tree(&later.join("deploy-cache"), &as_refs(&small_build("l")));
    write_sha256sums(&later.join("deploy-cache"));
    fs::write(later.join("deploy-cache").join(MARKER), "id = \"l1\"\n").unwrap();
    svc.wait_release_event("release.activated", "l1");
    assert_eq!(
        fs::read_link(later.join("current")).unwrap(),
        Path::new("releases/l1")
    );
    svc.stop();
}

#[test]
fn text_logs_to_a_pipe_have_no_colour_codes() {
    let site = Site::new();
    let missing = site.tmp_path("not-yet");
    let cfg = config_file(
        &site,
        &format!("[sites.web]\nroot = \"{}\"\n", missing.display()),
    );
    // NO_COLOR would hide the bug: the keeper itself must see stderr is not a terminal.
    let out = std::process::Command::new(BIN)
        .args(["--log-format", "text", "--config", cfg.to_str().unwrap()])
        .arg("check-config")
        .env_remove("NO_COLOR")
        .env_remove("JOURNAL_STREAM")
        .output()
        .unwrap();
    assert_ok(&out, "check-config with a root that does not exist yet");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("root does not exist yet"),
        "the warning is logged; {}",
        show(&out)
    );
    assert!(
        !err.contains('\u{1b}'),
        "text logs on a pipe must be plain, without ANSI escapes; stderr: {err:?}"
    );
}

/// One event, one line, in the text format too: a reason quoting a hook's multi-line
/// stderr went out raw, and its later lines (no timestamp, no `event=`) escaped a `grep`
/// for the event and any line-based log reader.
#[test]
fn text_logs_keep_a_multi_line_hook_failure_on_one_line() {
    let site = Site::new();
    let hook = r#"before_activate = ["/bin/sh", "-c", "case \"$RELEASE_ID\" in bad*) printf 'first line\nsecond line\n' >&2; exit 1;; esac"]"#;
    let cfg = site.write_config("web", "", hook);
    site.stage_upload(&as_refs(&small_build("bad1")));
    let out = std::process::Command::new(BIN)
        .args(["--log-format", "text", "--config", cfg.to_str().unwrap()])
        .args(["finalize", "web", "--id", "bad1"])
        .env_remove("JOURNAL_STREAM")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err
        .lines()
        .find(|l| l.contains("event=hook.failed "))
        .unwrap_or_else(|| panic!("no hook.failed line; {}", show(&out)));
    assert!(
        line.contains("first line") && line.contains("second line"),
        "the whole reason is on the event's line: {line:?}; {}",
        show(&out)
    );
    assert!(
        !err.lines().any(|l| l.starts_with("second line")),
        "no line of an event starts without its timestamp; {}",
        show(&out)
    );
}

#[test]
fn os_error_is_named_once_in_the_error_message() {
    let site = Site::new();
    // A directory where the file should be: EISDIR (a missing file has its own message).
    let dir = site.tmp_path("config-dir.toml");
    fs::create_dir(&dir).unwrap();
    let out = cli(&dir, &["check-config"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.matches("os error 21").count(),
        1,
        "the cause is printed once, not repeated after itself; stderr: {err:?}"
    );
}

/// A config without sites is valid (a site may be added and reloaded later), but the
/// service and `status` must say that nothing is watched instead of looking healthy.
#[test]
fn a_config_without_sites_is_said_to_watch_nothing() {
    let site = Site::new();
    let cfg = site.tmp.path().join("empty.toml");
    fs::write(&cfg, "[defaults]\nkeep = 3\n").unwrap();
    let out = cli(&cfg, &["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("no sites configured"),
        "{}",
        show(&out)
    );
    let mut svc = Service::start_config(&cfg);
    let ev = svc.wait_event(
        "site.error",
        |v| {
            v["reason"]
                .as_str()
                .is_some_and(|r| r.contains("no sites configured"))
        },
        WAIT,
    );
    assert!(
        ev["reason"].as_str().unwrap_or("").contains("empty.toml"),
        "the warning names the config file: {ev}"
    );
    svc.stop();
}

/// The site root deleted and made again under a running service takes the lifetime lock's
/// file with it: the service must lock the new file, or a second service could start for
/// the same site and both would deploy into it.
#[test]
fn lifetime_lock_is_taken_again_after_the_root_is_recreated() {
    let site = Site::new();
    let cfg = site.write_config("web", "heal_interval = \"1s\"", "");
    let mut first = Service::start_config(&cfg);
    // Moved away first: the service heals what a slow `rm -rf` leaves for a moment.
    let gone = site.tmp.path().join("old-root");
    fs::rename(&site.root, &gone).unwrap();
    fs::remove_dir_all(&gone).unwrap();
    let out = cli(&cfg, &["init", "web"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    first.wait_event(
        "heal.repaired",
        |v| {
            v["what"]
                .as_str()
                .is_some_and(|w| w.ends_with("service.lock"))
        },
        WAIT,
    );
    let second = Service::spawn_config(&cfg);
    let st = second.wait_exit(Duration::from_secs(10));
    assert!(
        !st.success() && second.log_text().contains("already running"),
        "a second service must still refuse to start; exit {st:?}; log:\n{}",
        second.log_text()
    );
    site.deploy(&as_refs(&small_build("v1")), "id = \"v1\"\n");
    first.wait_release_event("release.activated", "v1");
    first.stop();
}

/// After the README's `run --root`, the next command a new user types has no config:
/// the error says which file was looked for and how to name one.
#[test]
fn a_missing_config_file_says_how_to_name_one() {
    let site = Site::new();
    let missing = site.tmp_path("nope.toml");
    let out = cli(&missing, &["status"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(missing.to_str().unwrap())
            && err.contains("no such config file")
            && err.contains("--config")
            && err.contains("RELEASE_KEEPER_CONFIG"),
        "{}",
        show(&out)
    );
}

/// Writes `files` into `dir` with a manifest named `manifest` (real `sha256sum`), then
/// the marker `marker` holding `id`.
fn upload_named(dir: &Path, files: &[(&str, &[u8])], manifest: &str, marker: &str, id: &str) {
    clear_dir(dir);
    write_tree(dir, files);
    let names: Vec<&str> = files.iter().map(|(n, _)| *n).collect();
    sh(dir, &format!("sha256sum {} > {manifest}", names.join(" ")));
    fs::write(dir.join(marker), format!("id = \"{id}\"\n")).unwrap();
}

/// `marker` and `manifest` set to other names take effect wherever they are set: in
/// `[defaults]` (every site), in `[sites.NAME]` (that site only) and in a `sites.d/` file,
/// and again after a SIGHUP changes them. The custom manifest is the one read and it stays
/// in the release; with another marker name a `.release-ready` in the upload is an
/// ordinary uploaded file: not consumed, and rejected as not in the manifest.
#[test]
fn custom_marker_and_manifest_names_apply_per_site_and_on_reload() {
    let site = Site::new();
    let beta = site.tmp_path("beta");
    let gamma = site.tmp_path("gamma");
    let sites_d = site.tmp_path("sites.d");
    for d in [
        &beta.join("deploy-cache"),
        &gamma.join("deploy-cache"),
        &sites_d,
    ] {
        fs::create_dir_all(d).unwrap();
    }
    let cfg = site.config_path();
    let main = |marker: &str| {
        format!(
            "[defaults]\nmarker = \"{marker}\"\nmanifest = \"checksums.sha256\"\n\n\
             [sites.alpha]\nroot = \"{}\"\n\n[sites.beta]\nroot = \"{}\"\nmarker = \".ready\"\n",
            site.root.display(),
            beta.display()
        )
    };
    fs::write(&cfg, main("DEPLOY_DONE")).unwrap();
    fs::write(
        sites_d.join("gamma.toml"),
        format!("root = \"{}\"\nmanifest = \"SUMS\"\n", gamma.display()),
    )
    .unwrap();
    let mut svc = Service::start_config(&cfg);
    let files: &[(&str, &[u8])] = &[("index.html", b"<h1>hi</h1>\n"), ("a/b.txt", b"b\n")];

    // alpha: a stray `.release-ready` beside the upload is a file like any other.
    upload_named(
        &site.deploy_cache(),
        files,
        "checksums.sha256",
        "DEPLOY_DONE",
        "a1",
    );
    fs::write(site.marker_path(), "id = \"a0\"\n").unwrap();
    let rej = svc.wait_release_event("release.rejected", "a1");
    let reason = reason_of(&rej);
    assert!(
        reason.contains(".release-ready") && reason.contains("checksums.sha256"),
        "the default marker name is an unlisted file of the upload: {rej}"
    );
    assert!(
        site.marker_path().exists(),
        ".release-ready is not the marker here"
    );
    fs::remove_file(site.marker_path()).unwrap();
    fs::write(site.deploy_cache().join("DEPLOY_DONE"), "id = \"a1\"\n").unwrap();
    svc.wait_release_event("release.activated", "a1");
    assert!(site.release("a1").join("checksums.sha256").is_file());
    assert!(!site.release("a1").join("DEPLOY_DONE").exists());

    // beta overrides the marker; gamma (sites.d) overrides the manifest, keeps the marker.
    upload_named(
        &beta.join("deploy-cache"),
        files,
        "checksums.sha256",
        ".ready",
        "b1",
    );
    upload_named(
        &gamma.join("deploy-cache"),
        files,
        "SUMS",
        "DEPLOY_DONE",
        "g1",
    );
    let eb = svc.wait_release_event("release.activated", "b1");
    let eg = svc.wait_release_event("release.activated", "g1");
    assert_eq!(
        (eb["site"].as_str(), eg["site"].as_str()),
        (Some("beta"), Some("gamma"))
    );
    assert!(beta.join("releases/b1/checksums.sha256").is_file());
    assert!(gamma.join("releases/g1/SUMS").is_file());
    assert!(!gamma.join("releases/g1/checksums.sha256").exists());

    // SIGHUP with another default marker: the new name is the one consumed.
    fs::write(&cfg, main("GO")).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(svc.pid()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    svc.wait_count("config.reloaded", 1, Duration::from_secs(10));
    upload_named(&site.deploy_cache(), files, "checksums.sha256", "GO", "a2");
    svc.wait_release_event("release.activated", "a2");
    upload_named(&gamma.join("deploy-cache"), files, "SUMS", "GO", "g2");
    svc.wait_release_event("release.activated", "g2");
    svc.stop();
}

/// A root that exists but is not a directory (a file, or a path through a file) can never
/// be served: it is a bad path, reported at the `root` key (file:line:column, exit 2) by
/// `check-config`, by `run` and by every command that loads the config, instead of
/// "root does not exist yet" and a service waiting for it forever.
#[test]
fn a_root_that_is_a_file_is_a_config_error_naming_the_line() {
    let site = Site::new();
    let file = site.tmp_path("a-file");
    fs::write(&file, b"not a directory").unwrap();
    for (root, what) in [
        (file.clone(), "exists and is not a directory"),
        (file.join("below"), "is inside a file"),
    ] {
        let cfg = config_file(
            &site,
            &format!(
                "# shop\n[sites.shop]\nkeep = 2\nroot = \"{}\"\n",
                root.display()
            ),
        );
        assert_config_error(&cfg, 4);
        let out = cli(&cfg, &["check-config"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(what) && !err.contains("does not exist yet"),
            "check-config should say the root {what}; {}",
            show(&out)
        );
        let out = cli(&cfg, &["status"]);
        assert_eq!(out.status.code(), Some(2), "status: {}", show(&out));
        let prefix = format!("{}:4:", cfg.display());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(&prefix),
            "status names {prefix}; {}",
            show(&out)
        );
        let svc = Service::spawn_config(&cfg);
        let status = svc.wait_exit(Duration::from_secs(10));
        assert_eq!(
            status.code(),
            Some(2),
            "run refuses a root that is not a directory; log:\n{}",
            svc.log_text()
        );
        assert!(
            svc.log_text().contains(&prefix),
            "run names {prefix}; log:\n{}",
            svc.log_text()
        );
    }
}

/// The largest durations and counts a config accepts are the operator's to choose: a stop
/// during an activation adds them up (the time that work may still take) and must not
/// overflow and panic, leaving the site undecided and the service dead with no exit 0.
#[test]
fn the_largest_accepted_timeouts_do_not_crash_a_stop_during_an_activation() {
    let site = Site::new();
    let started = site.tmp_path("health-check-started");
    let check = format!(
        "health_check = [\"/bin/sh\", \"-c\", \"touch '{}'; sleep 2\"]\n\
         after_activate = [\"/bin/true\"]\nbefore_activate = [\"/bin/true\"]",
        started.display()
    );
    let cfg = site.write_config(
        "shop",
        "hook_timeout = \"18446744073709551615ms\"\nhealth_retries = 4294967295\n\
         health_interval = \"18446744073709551615ms\"",
        &check,
    );
    let out = cli(&cfg, &["check-config"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let mut svc = Service::start_config(&cfg);
    site.deploy(&[("index.html", b"v1")], "id = \"v1\"\n");
    wait_until(
        Duration::from_secs(20),
        || started.exists(),
        || format!("the health check of v1 to start; log:\n{}", svc.log_text()),
    );
    svc.stop(); // asserts exit 0
    assert_eq!(
        site.current_id().as_deref(),
        Some("v1"),
        "the activation under way is finished; log:\n{}",
        svc.log_text()
    );
}

/// A hook program named without a `/` is looked up in the hooks' fixed PATH when the hook
/// runs: check-config warns when it is not there (every activation would fail on it),
/// as it does for a missing absolute program, and stays quiet for one that is.
#[test]
fn check_config_warns_about_a_bare_hook_program_not_in_the_hooks_path() {
    let site = Site::new();
    let cfg = site.write_config(
        "web",
        "",
        "before_activate = [\"no-such-program-rk\", \"--force\"]\nafter_activate = [\"true\"]",
    );
    let out = cli(&cfg, &["check-config"]);
    assert_ok(&out, "check-config with a bare hook program");
    let all = output_text(&out);
    assert!(
        all.contains("before_activate: no-such-program-rk: not found in the hooks' PATH"),
        "{}",
        show(&out)
    );
    assert!(!all.contains("after_activate"), "{}", show(&out));
}

/// `run --root` given a file (or a path through one) is a bad argument, exit 2 like a
/// config `root` that is not a directory, not an operation that failed (1).
#[test]
fn run_root_that_is_a_file_is_a_usage_error() {
    let site = Site::new();
    let file = site.tmp_path("a-file");
    fs::write(&file, b"not a directory").unwrap();
    for root in [file.clone(), file.join("below")] {
        let out = cli_raw(&["run", "--root", root.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{}", show(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(root.to_str().unwrap()) && err.contains("not a directory"),
            "{}",
            show(&out)
        );
    }
}

/// A site a reload adds whose root another service already serves cannot start (the
/// lifetime lock): the reloaded service says so (`site.error` naming the site) instead of
/// listing it as served and silently ignoring it, and a later reload, once the other
/// service is gone, starts it.
#[test]
fn a_site_added_by_reload_that_another_service_holds_is_reported_and_retried_next_reload() {
    let site = Site::new();
    let cfg_a = site.write_config("x", "", "");
    let mut a = Service::start_config(&cfg_a);
    let other = tempfile::tempdir().unwrap();
    let cfg_b = other.path().join("config.toml");
    fs::write(&cfg_b, "").unwrap();
    let mut b = Service::start_config(&cfg_b);
    let hup = |svc: &Service| {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(svc.pid()),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap()
    };
    fs::write(
        &cfg_b,
        format!("[sites.y]\nroot = \"{}\"\n", site.root.display()),
    )
    .unwrap();
    hup(&b);
    let err = b.wait_event("site.error", |v| v["site"] == "y", Duration::from_secs(10));
    assert!(
        err.to_string().contains("already running"),
        "the error says why: {err}; log:\n{}",
        b.log_text()
    );
    a.stop();
    hup(&b);
    b.wait_count("config.reloaded", 2, Duration::from_secs(10));
    deploy_and_activate(&site, &b, "v1");
    b.stop();
}

/// A site (or any table) written twice in one file, say a block pasted in again at the
/// end of a long config, is an error naming both places: the second at file:line:column,
/// the first by its line. So is a key set twice in one table.
#[test]
fn check_config_site_defined_twice_in_one_file_names_both_lines() {
    let site = Site::new();
    let root = site.root.display();
    let cfg = config_file(
        &site,
        &format!(
            "[sites.shop]\nroot = \"{root}\"\n\n[sites.blog]\nroot = \"/srv/blog\"\n\n[sites.shop]\nkeep = 3\n"
        ),
    );
    assert_config_error(&cfg, 7);
    let out = cli(&cfg, &["check-config"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("[sites.shop] is defined twice") && err.contains("at line 1"),
        "both places named; {}",
        show(&out)
    );

    let cfg = config_file(
        &site,
        &format!("[sites.shop]\nroot = \"{root}\"\nkeep = 2\nkeep_failed = 1\nkeep = 3\n"),
    );
    assert_config_error(&cfg, 5);
    let out = cli(&cfg, &["check-config"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("duplicate key \"keep\"") && err.contains("already set at line 3"),
        "both places named; {}",
        show(&out)
    );
}

/// A config that cannot be read (here a directory where the file should be, or a file
/// where `sites.d/` should be) says it is the config that could not be read, with the path
/// and the OS error, and exits 2.
#[test]
fn an_unreadable_config_says_it_cannot_read_the_config() {
    let site = Site::new();
    let dir = site.tmp_path("config-dir.toml");
    fs::create_dir(&dir).unwrap();
    let out = cli(&dir, &["status"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}: cannot read the config: ", dir.display())),
        "{}",
        show(&out)
    );

    let cfg = config_file(&site, "");
    fs::write(site.tmp_path("sites.d"), "not a directory").unwrap();
    let out = cli(&cfg, &["check-config"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("sites.d: cannot read the config: "),
        "{}",
        show(&out)
    );
}

/// A `*.toml` in `sites.d/` that is not a regular file (a FIFO left by a tool) is an
/// error naming it, not a check-config (or a reload) blocked for good reading it.
#[test]
fn a_fifo_in_sites_d_is_an_error_not_a_hang() {
    let site = Site::new();
    let cfg = config_file(&site, "");
    let d = site.tmp_path("sites.d");
    fs::create_dir(&d).unwrap();
    let fifo = d.join("blog.toml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let started = std::time::Instant::now();
    let out = cli(&cfg, &["check-config"]);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "check-config blocked on the FIFO"
    );
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(fifo.to_str().unwrap()) && err.contains("not a regular file"),
        "{}",
        show(&out)
    );
}

/// A duration spelled out, "10 minutes" or "30sec", is an error at the value that says
/// what to write instead ("10m", "30s"), not only that a unit is missing or unknown.
#[test]
fn check_config_bad_duration_suggests_what_to_write() {
    let site = Site::new();
    for (value, suggestion) in [
        ("10 minutes", "write \"10m\""),
        ("30sec", "write \"30s\""),
        ("2 Hours", "write \"2h\""),
    ] {
        let cfg = site.write_config("web", "", &format!("upload_timeout = \"{value}\""));
        assert_config_error(&cfg, 6);
        let out = cli(&cfg, &["check-config"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(suggestion), "{value}: {}", show(&out));
    }
}
