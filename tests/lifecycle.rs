//! Release lifecycle: marker forms, ids, retention, staging, activate/rollback, pin,
//! list/status output, finalize, markers while stopped or busy, healing.
mod common;

use common::*;
use serde_json::Value;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

const SITE: &str = "web";

/// `list SITE --json`, parsed, asserting exit 0.
fn list_json(cfg: &std::path::Path) -> Value {
    let out = cli_when_idle(cfg, &["list", SITE, "--json"]);
    assert_ok(&out, "list --json");
    stdout_json(&out)
}

/// (id, state) pairs of `list --json`, in output order.
fn list_states(v: &Value) -> Vec<(String, String)> {
    v["releases"]
        .as_array()
        .unwrap_or_else(|| panic!("list --json has no `releases` array: {v}"))
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap_or("<no id>").to_string(),
                r["state"].as_str().unwrap_or("<no state>").to_string(),
            )
        })
        .collect()
}

fn pairs(x: &[(&str, &str)]) -> Vec<(String, String)> {
    x.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[test]
fn marker_toml_with_id_and_message() {
    let site = Site::new();
    let (_cfg, mut svc) = start_site(&site, SITE, "", "");
    site.deploy(
        &as_refs(&small_build("v1")),
        "id = \"v1\"\nmessage = \"ship it: fix checkout\"\n",
    );
    svc.wait_release_event("release.activated", "v1");
    assert_eq!(site.current_id().as_deref(), Some("v1"));
    assert!(site.release("v1").join("index.html").is_file());
    assert!(!site.marker_path().exists(), "marker consumed");
    assert!(
        svc.log_text().contains("ship it: fix checkout"),
        "the marker's message should be logged; log:\n{}",
        svc.log_text()
    );
    svc.stop();
}

#[test]
fn marker_with_bare_id_line() {
    let site = Site::new();
    let (_cfg, mut svc) = start_site(&site, SITE, "", "");
    site.deploy(&as_refs(&small_build("bare")), "2024.06-hotfix_1\n");
    svc.wait_release_event("release.activated", "2024.06-hotfix_1");
    assert_eq!(site.current_id().as_deref(), Some("2024.06-hotfix_1"));
    svc.stop();
}

#[test]
fn empty_markers_get_distinct_timestamp_ids() {
    let site = Site::new();
    let (_cfg, mut svc) = start_site(&site, SITE, "", "");
    site.deploy(&as_refs(&small_build("one")), "");
    let a = svc.wait_count("release.activated", 1, WAIT);
    site.deploy(&as_refs(&small_build("two")), "");
    let evs = svc.wait_count("release.activated", 2, WAIT);
    let id1 = release_of(&a[0]).unwrap().to_string();
    let id2 = release_of(&evs[1]).unwrap().to_string();
    assert!(is_timestamp_id(&id1), "{id1:?}");
    assert!(is_timestamp_id(&id2), "{id2:?}");
    assert_ne!(id1, id2, "a taken timestamp id gets a -N suffix");
    if id1.len() == 16 && id2.starts_with(&id1) {
        assert_eq!(
            &id2[16..],
            "-2",
            "second id in the same second is suffixed -2"
        );
    }
    assert_eq!(site.current_id(), Some(id2));
    svc.stop();
}

#[test]
fn keep_three_prunes_to_newest_three_good() {
    let site = Site::new();
    let (_cfg, mut svc) = start_site(&site, SITE, "keep = 3", "");
    let ids: Vec<String> = (1..=7).map(|i| format!("r{i}")).collect();
    for id in &ids {
        deploy_and_activate(&site, &svc, id);
    }
    for old in ["r1", "r2", "r3", "r4"] {
        svc.wait_release_event("release.pruned", old);
    }
    wait_until(
        WAIT,
        || site.release_ids() == ["r5", "r6", "r7"],
        || format!("releases/ == [r5 r6 r7], is {:?}", site.release_ids()),
    );
    assert_eq!(site.current_id().as_deref(), Some("r7"));
    for kept in ["r5", "r6", "r7"] {
        assert!(
            svc.events_for("release.pruned", kept).is_empty(),
            "{kept} must not be pruned"
        );
    }
    svc.stop();
}

#[test]
fn prune_never_deletes_current_or_previous() {
    let site = Site::new();
    let (_cfg, mut svc) = start_site(&site, SITE, "keep = 1", "");
    for id in ["p1", "p2", "p3"] {
        deploy_and_activate(&site, &svc, id);
    }
    svc.wait_release_event("release.pruned", "p1");
    wait_until(
        WAIT,
        || site.release_ids() == ["p2", "p3"],
        || {
            format!(
                "keep=1 still keeps current p3 and previous p2; releases: {:?}",
                site.release_ids()
            )
        },
    );
    assert!(svc.events_for("release.pruned", "p2").is_empty());
    svc.stop();
}

#[test]
fn existing_id_rejected_unless_identical() {
    let site = Site::new();
    let (_cfg, mut svc) = start_site(&site, SITE, "", "");
    deploy_and_activate(&site, &svc, "v1");
    let v1_before = tree(&site.release("v1"), &[]);

    // Same id, different content: rejected; v1 untouched.
    site.deploy(&as_refs(&small_build("something else")), "id = \"v1\"\n");
    let rej = svc.wait_release_event("release.rejected", "v1");
    assert!(
        reason_of(&rej).contains("first difference: assets/app.js: different content"),
        "the rejection says what differs: {rej}"
    );
    assert_eq!(site.current_id().as_deref(), Some("v1"));
    assert_eq!(tree(&site.release("v1"), &[]), v1_before, "v1 altered");
    assert!(!site.marker_path().exists(), "rejected marker is consumed");

    // Same id, identical content: a no-op (not a rejection, no new release).
    site.deploy(&as_refs(&small_build("v1")), "id = \"v1\"\n");
    site.wait_marker_consumed(WAIT);
    // Barrier: markers are processed in order, so a later release of the same upload
    // (deploy-cache untouched while the no-op may still be running) proves it is done.
    site.drop_marker("id = \"v2\"\n");
    svc.wait_release_event("release.activated", "v2");
    assert_eq!(
        svc.events_for("release.rejected", "v1").len(),
        1,
        "identical content under an existing id must not be rejected; log:\n{}",
        svc.log_text()
    );
    assert_eq!(
        svc.events_for("release.activated", "v1").len(),
        1,
        "the no-op must not re-activate v1"
    );
    // The no-op is logged: a `release.finalized` of v1 marked unchanged.
    assert!(
        svc.events_for("release.finalized", "v1")
            .iter()
            .any(|e| e["unchanged"] == true),
        "the identical re-upload of v1 must be logged as unchanged; log:\n{}",
        svc.log_text()
    );
    assert_eq!(site.release_ids(), ["v1", "v2"]);
    assert_eq!(tree(&site.release("v1"), &[]), v1_before, "v1 altered");
    svc.stop();
}

#[test]
fn activate_false_stages_then_cli_activate_switches() {
    let site = Site::new();
    let (cfg, mut svc) = start_site(&site, SITE, "", "");
    deploy_and_activate(&site, &svc, "v1");

    site.deploy(
        &as_refs(&small_build("v2")),
        "id = \"v2\"\nactivate = false\n",
    );
    svc.wait_release_event("release.finalized", "v2");
    assert!(site.release("v2").is_dir(), "staged release exists");
    assert_eq!(
        site.current_id().as_deref(),
        Some("v1"),
        "activate=false must not switch"
    );
    assert!(svc.events_for("release.activated", "v2").is_empty());
    let states = list_states(&list_json(&cfg));
    assert_eq!(states, pairs(&[("v2", "staged"), ("v1", "current")]));

    let out = cli_when_idle(&cfg, &["activate", SITE, "v2"]);
    assert_ok(&out, "activate web v2");
    assert_eq!(
        site.current_id().as_deref(),
        Some("v2"),
        "activate returns only after current switched"
    );
    let states = list_states(&list_json(&cfg));
    assert_eq!(states, pairs(&[("v2", "current"), ("v1", "previous")]));
    svc.stop();
}

#[test]
fn rollback_to_previous_and_to_id() {
    let site = Site::new();
    let (cfg, mut svc) = start_site(&site, SITE, "", "");
    for id in ["v1", "v2", "v3"] {
        deploy_and_activate(&site, &svc, id);
    }
    let out = cli_when_idle(&cfg, &["rollback", SITE]);
    assert_ok(&out, "rollback web");
    assert_eq!(
        site.current_id().as_deref(),
        Some("v2"),
        "rollback -> previous"
    );

    let out = cli_when_idle(&cfg, &["rollback", SITE, "--to", "v1"]);
    assert_ok(&out, "rollback web --to v1");
    assert_eq!(site.current_id().as_deref(), Some("v1"), "rollback --to v1");

    let out = cli_when_idle(&cfg, &["rollback", SITE, "--to", "nope"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "rollback to an unknown id fails with 1; {}",
        show(&out)
    );
    assert_eq!(site.current_id().as_deref(), Some("v1"));
    // All three releases are still there.
    assert_eq!(site.release_ids(), ["v1", "v2", "v3"]);
    svc.stop();
}

#[test]
fn failed_release_is_never_chosen_by_rollback() {
    let site = Site::new();
    let hook = r#"before_activate = ["/bin/sh", "-c", "test \"$RELEASE_ID\" != bad"]"#;
    let (cfg, mut svc) = start_site(&site, SITE, "", hook);
    deploy_and_activate(&site, &svc, "v1");
    deploy_and_activate(&site, &svc, "v2");
    site.deploy(&as_refs(&small_build("bad")), "id = \"bad\"\n");
    svc.wait_release_event("hook.failed", "bad");
    assert_eq!(
        site.current_id().as_deref(),
        Some("v2"),
        "before_activate failure: not activated"
    );
    assert!(
        svc.events_for("release.activated", "bad").is_empty(),
        "failed release activated?"
    );
    assert!(site.release("bad").is_dir(), "failed release kept");

    let out = cli_when_idle(&cfg, &["rollback", SITE, "--to", "bad"]);
    assert_ne!(
        out.status.code(),
        Some(0),
        "rollback to a failed release must fail; {}",
        show(&out)
    );
    assert_eq!(site.current_id().as_deref(), Some("v2"));
    let out = cli_when_idle(&cfg, &["rollback", SITE]);
    assert_ok(&out, "rollback web");
    assert_eq!(
        site.current_id().as_deref(),
        Some("v1"),
        "rollback skips the failed release"
    );
    svc.stop();
}

#[test]
fn failing_health_check_rolls_back() {
    let site = Site::new();
    let extra = r#"health_check = ["/bin/sh", "-c", "test \"$RELEASE_ID\" != bad"]
health_retries = 2
health_interval = "1s""#;
    let (cfg, mut svc) = start_site(&site, SITE, "", extra);
    deploy_and_activate(&site, &svc, "v1");
    site.deploy(&as_refs(&small_build("bad")), "id = \"bad\"\n");
    svc.wait_release_event("health.failed", "bad");
    svc.wait_release_event("release.rolled_back", "bad");
    assert_eq!(
        site.current_id().as_deref(),
        Some("v1"),
        "auto_rollback brings current back to the previous good release"
    );
    let v = list_json(&cfg);
    let bad = v["releases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == "bad")
        .unwrap_or_else(|| panic!("bad missing from list: {v}"))
        .clone();
    assert_eq!(bad["state"], "failed", "{bad}");
    assert!(
        bad["reason"].as_str().is_some_and(|s| !s.is_empty()),
        "failed release has a reason: {bad}"
    );
    svc.stop();
}

#[test]
fn pin_protects_from_prune_and_dry_run_deletes_nothing() {
    let site = Site::new();
    let (cfg, mut svc) = start_site(&site, SITE, "keep = 2", "");
    deploy_and_activate(&site, &svc, "v1");
    let out = cli_when_idle(&cfg, &["pin", SITE, "v1"]);
    assert_ok(&out, "pin web v1");
    let v = list_json(&cfg);
    assert_eq!(v["releases"][0]["id"], "v1");
    assert_eq!(v["releases"][0]["pinned"], true, "pinned flag: {v}");

    for id in ["v2", "v3", "v4"] {
        deploy_and_activate(&site, &svc, id);
    }
    svc.wait_release_event("release.pruned", "v2");
    wait_until(
        WAIT,
        || site.release_ids() == ["v1", "v3", "v4"],
        || {
            format!(
                "pinned v1 kept, v2 pruned; releases: {:?}",
                site.release_ids()
            )
        },
    );
    assert!(svc.events_for("release.pruned", "v1").is_empty());

    let out = cli_when_idle(&cfg, &["unpin", SITE, "v1"]);
    assert_ok(&out, "unpin web v1");
    let out = cli_when_idle(&cfg, &["prune", SITE, "--dry-run"]);
    assert_ok(&out, "prune --dry-run");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("v1"),
        "dry run should say it would delete v1; {}",
        show(&out)
    );
    assert_eq!(
        site.release_ids(),
        ["v1", "v3", "v4"],
        "dry run deleted something"
    );

    let out = cli_when_idle(&cfg, &["prune", SITE]);
    assert_ok(&out, "prune");
    assert_eq!(
        site.release_ids(),
        ["v3", "v4"],
        "prune removes unpinned v1"
    );
    assert_eq!(site.current_id().as_deref(), Some("v4"));
    svc.stop();
}

#[test]
fn list_json_shape() {
    let site = Site::new();
    let hook = r#"before_activate = ["/bin/sh", "-c", "test \"$RELEASE_ID\" != bad"]"#;
    let (cfg, mut svc) = start_site(&site, SITE, "", hook);
    for id in ["v1", "v2", "v3"] {
        deploy_and_activate(&site, &svc, id);
    }
    site.deploy(&as_refs(&small_build("bad")), "id = \"bad\"\n");
    svc.wait_release_event("hook.failed", "bad");
    site.deploy(
        &as_refs(&small_build("v4")),
        "id = \"v4\"\nactivate = false\n",
    );
    svc.wait_release_event("release.finalized", "v4");

    let v = list_json(&cfg);
    assert_eq!(v["site"], SITE, "{v}");
    assert_eq!(v["current"], "v3", "{v}");
    assert_eq!(
        list_states(&v),
        pairs(&[
            ("v4", "staged"),
            ("bad", "failed"),
            ("v3", "current"),
            ("v2", "previous"),
            ("v1", "good"),
        ]),
        "newest first, with states; {v}"
    );
    for r in v["releases"].as_array().unwrap() {
        let id = r["id"].as_str().unwrap();
        assert_eq!(r["pinned"], false, "{r}");
        let created = r["created"].as_str().unwrap_or("");
        assert!(is_rfc3339(created), "created must be RFC 3339: {r}");
        let (files, bytes) = count_files_bytes(&site.release(id));
        assert_eq!(
            r["files"].as_u64(),
            Some(files),
            "files = regular files in the release: {r}"
        );
        assert_eq!(
            r["bytes"].as_u64(),
            Some(bytes),
            "bytes = total size of the release's files: {r}"
        );
        if id == "bad" {
            assert!(
                r["reason"].as_str().is_some_and(|s| !s.is_empty()),
                "failed release carries a reason: {r}"
            );
        }
    }

    // Human output names every release too.
    let out = cli_when_idle(&cfg, &["list", SITE]);
    assert_ok(&out, "list");
    let text = String::from_utf8_lossy(&out.stdout);
    for id in ["v1", "v2", "v3", "v4", "bad"] {
        assert!(text.contains(id), "human list lacks {id}: {text}");
    }
    svc.stop();
}

/// SPEC: `status --json` holds per site what `list --json` holds, plus `drift` and
/// `last_event`. With a SITE named it printed `{"sites": [...]}` only, so a script had to
/// dig the one site out of a list; the site's object is now at the top level, with the
/// `sites` list kept beside it for scripts written against that shape.
#[test]
fn status_json_of_one_site_is_that_sites_object_with_the_sites_list_kept() {
    let site = Site::new();
    let (cfg, mut svc) = start_site(&site, SITE, "", "");
    deploy_and_activate(&site, &svc, "v1");
    deploy_and_activate(&site, &svc, "v2");
    let out = cli_when_idle(&cfg, &["list", SITE, "--json"]);
    assert_ok(&out, "list --json");
    let list = stdout_json(&out);

    let out = cli_when_idle(&cfg, &["status", SITE, "--json"]);
    assert_ok(&out, "status SITE --json");
    let v = stdout_json(&out);
    for (key, want) in list.as_object().unwrap() {
        assert_eq!(&v[key], want, "`{key}` as in list --json: {v}");
    }
    for key in ["drift", "last_event", "pinned", "failed"] {
        assert!(v.get(key).is_some(), "status SITE --json has `{key}`: {v}");
    }
    assert_eq!(v["last_event"]["release"], "v2", "{v}");
    let sites = v["sites"].as_array().expect("the `sites` list is kept");
    assert_eq!(sites.len(), 1, "{v}");
    let mut top = v.clone();
    top.as_object_mut().unwrap().remove("sites");
    assert_eq!(sites[0], top, "`sites` holds the same object");

    // Without SITE: the list of every site, as before.
    let out = cli_when_idle(&cfg, &["status", "--json"]);
    assert_ok(&out, "status --json");
    let all = stdout_json(&out);
    let keys: Vec<&String> = all.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["sites"], "{all}");
    assert_eq!(all["sites"][0], top, "{all}");
    svc.stop();
}

#[test]
fn status_json_reports_site() {
    let site = Site::new();
    let (cfg, mut svc) = start_site(&site, SITE, "", "");
    deploy_and_activate(&site, &svc, "v1");
    deploy_and_activate(&site, &svc, "v2");
    for args in [vec!["status", SITE, "--json"], vec!["status", "--json"]] {
        let out = cli_when_idle(&cfg, &args);
        assert_ok(&out, &args.join(" "));
        let v = stdout_json(&out);
        let s = find_site_obj(&v, SITE, "current")
            .unwrap_or_else(|| panic!("no object for site `web` with `current` in {v}"));
        assert_eq!(s["current"], "v2", "{v}");
        assert!(s.get("drift").is_some(), "status has `drift`: {v}");
        assert!(
            s.get("last_event").is_some(),
            "status has `last_event`: {v}"
        );
        let rel = s["releases"]
            .as_array()
            .unwrap_or_else(|| panic!("status has a `releases` array: {v}"));
        let ids: Vec<&str> = rel.iter().filter_map(|r| r["id"].as_str()).collect();
        assert_eq!(ids, ["v2", "v1"], "{v}");
    }
    // The human form: nothing pinned or failed is said, not left blank.
    let out = cli_when_idle(&cfg, &["status", SITE]);
    let text = String::from_utf8_lossy(&out.stdout);
    for key in ["pinned:", "failed:"] {
        let line = text.lines().find(|l| l.trim_start().starts_with(key));
        assert!(
            line.is_some_and(|l| l.ends_with("(none)")),
            "{key} {line:?}\n{text}"
        );
    }
    svc.stop();
}

#[test]
fn finalize_cli_processes_deploy_cache_without_marker() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "", "");
    let out = cli(&cfg, &["init", SITE]);
    assert_ok(&out, "init");

    site.stage_upload(&as_refs(&small_build("f1")));
    let out = cli(&cfg, &["finalize", SITE, "--id", "f1"]);
    assert_ok(&out, "finalize --id f1");
    assert_eq!(site.current_id().as_deref(), Some("f1"));

    site.stage_upload(&as_refs(&small_build("f2")));
    let out = cli(&cfg, &["finalize", SITE, "--id", "f2", "--no-activate"]);
    assert_ok(&out, "finalize --id f2 --no-activate");
    assert!(site.release("f2").is_dir(), "f2 finalized");
    assert_eq!(
        fs::read(site.release("f2").join("index.html")).unwrap(),
        small_build("f2")[0].1
    );
    assert_eq!(
        site.current_id().as_deref(),
        Some("f1"),
        "--no-activate keeps current"
    );
    let states = list_states(&list_json(&cfg));
    assert_eq!(states, pairs(&[("f2", "staged"), ("f1", "current")]));
}

/// An operator who finds an upload with its marker waiting (the service is stopped) and
/// runs `finalize` gets one release, the one the marker asks for, not a second copy.
#[test]
fn finalize_cli_with_a_marker_waiting_makes_one_release_from_it() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "", "");
    let out = cli(&cfg, &["init", SITE]);
    assert_ok(&out, "init");

    site.deploy(
        &as_refs(&small_build("m1")),
        "id = \"m1\"\nmessage = \"from the marker\"\n",
    );
    let out = cli(&cfg, &["--log-format", "json", "finalize", SITE]);
    assert_ok(&out, "finalize with a marker waiting");
    assert!(!site.marker_path().exists(), "the marker is consumed");
    assert_eq!(
        site.release_ids(),
        vec!["m1".to_string()],
        "one release, named by the marker: {}",
        show(&out)
    );
    assert_eq!(site.current_id().as_deref(), Some("m1"));
    let detected: Vec<Value> = stderr_events(&out)
        .into_iter()
        .filter(|v| v["event"] == "upload.detected")
        .collect();
    assert_eq!(detected.len(), 1, "one upload: {}", show(&out));
    assert_eq!(detected[0]["note"], "from the marker", "{}", show(&out));

    // Flags given on the command line win over the marker's keys.
    site.deploy(&as_refs(&small_build("m2")), "id = \"m2\"\n");
    let out = cli(&cfg, &["finalize", SITE, "--id", "m2b", "--no-activate"]);
    assert_ok(
        &out,
        "finalize --id m2b --no-activate with a marker waiting",
    );
    assert!(!site.marker_path().exists(), "the marker is consumed");
    assert_eq!(
        site.release_ids(),
        vec!["m1".to_string(), "m2b".to_string()],
        "{}",
        show(&out)
    );
    assert_eq!(
        site.current_id().as_deref(),
        Some("m1"),
        "--no-activate wins"
    );
}

/// A marker that cannot be read is the uploader's request too: `finalize` rejects it as
/// the service would, and does not go on to deploy the upload against it (here: activate
/// a release the marker wanted staged).
#[test]
fn finalize_cli_with_an_unreadable_marker_waiting_releases_nothing() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "", "");
    let out = cli(&cfg, &["init", SITE]);
    assert_ok(&out, "init");
    site.deploy(
        &as_refs(&small_build("u1")),
        "id = \"u1\"\nactivate = \"no\"\n",
    );
    let out = cli(&cfg, &["--log-format", "json", "finalize", SITE]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        output_text(&out).contains("activate"),
        "the rejection names the bad key: {}",
        show(&out)
    );
    assert!(!site.marker_path().exists(), "the marker is consumed");
    assert!(
        site.release_ids().is_empty(),
        "nothing may be released against the marker: {:?}\n{}",
        site.release_ids(),
        show(&out)
    );
    assert_eq!(site.current_id(), None, "{}", show(&out));

    // The marker is gone: finalize again processes the upload on the command's terms.
    let out = cli(&cfg, &["finalize", SITE, "--id", "u1", "--no-activate"]);
    assert_ok(&out, "finalize after the rejected marker");
    assert_eq!(site.release_ids(), ["u1"]);
    assert_eq!(site.current_id(), None);
}

#[test]
fn marker_dropped_while_stopped_is_processed_at_start() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "", "");
    site.deploy(&as_refs(&small_build("offline")), "id = \"offline\"\n");
    let mut svc = Service::start_config(&cfg);
    svc.wait_release_event("release.activated", "offline");
    assert_eq!(site.current_id().as_deref(), Some("offline"));
    assert!(!site.marker_path().exists());
    svc.stop();

    // And again across a restart of a site that already has releases.
    site.deploy(&as_refs(&small_build("offline2")), "id = \"offline2\"\n");
    let mut svc = Service::start_config(&cfg);
    svc.wait_release_event("release.activated", "offline2");
    assert_eq!(site.current_id().as_deref(), Some("offline2"));
    svc.stop();
}

#[test]
fn second_marker_while_busy_is_not_lost() {
    let site = Site::new();
    // A slow before_activate hook keeps the keeper busy with the first release.
    let (_cfg, mut svc) = start_site(&site, SITE, "", r#"before_activate = ["/bin/sleep", "1"]"#);
    site.deploy(&as_refs(&small_build("same")), "id = \"a\"\n");
    site.wait_marker_consumed(WAIT);
    let busy = svc.events_for("release.activated", "a").is_empty();
    site.drop_marker("id = \"b\"\n");
    if !busy {
        eprintln!("note: first release finished before the second marker was dropped");
    }
    svc.wait_release_event("release.activated", "a");
    svc.wait_release_event("release.activated", "b");
    assert_eq!(site.current_id().as_deref(), Some("b"));
    assert_eq!(site.release_ids(), ["a", "b"]);
    svc.stop();
}

#[test]
fn release_is_not_shared_with_deploy_cache() {
    let site = Site::new();
    let (_cfg, mut svc) = start_site(&site, SITE, "", "");
    deploy_and_activate(&site, &svc, "v1");
    let up = site.deploy_cache().join("index.html");
    let rel = site.release("v1").join("index.html");
    assert_ne!(
        fs::metadata(&up).unwrap().ino(),
        fs::metadata(&rel).unwrap().ino(),
        "release file must not be a hard link of the deploy-cache file"
    );
    // An uploader writing in place must not alter the release.
    fs::write(&up, b"overwritten in place\n").unwrap();
    assert_eq!(fs::read(&rel).unwrap(), small_build("v1")[0].1);
    svc.stop();
}

#[test]
fn deleted_current_is_healed() {
    let site = Site::new();
    let (_cfg, mut svc) = start_site(&site, SITE, "", "");
    deploy_and_activate(&site, &svc, "v1");
    fs::remove_file(site.current_path()).unwrap();
    svc.wait_event("heal.repaired", |_| true, WAIT);
    wait_until(
        WAIT,
        || site.current_id().as_deref() == Some("v1"),
        || format!("current restored to v1, is {:?}", site.current_target()),
    );
    svc.stop();
}

#[test]
fn current_replaced_by_directory_is_moved_aside_and_healed() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "", "");
    let mut svc = Service::start_config(&cfg);
    deploy_and_activate(&site, &svc, "v1");
    svc.stop();

    // Hand edit while stopped: `current` becomes a real directory with data in it.
    fs::remove_file(site.current_path()).unwrap();
    write_tree(
        &site.current_path(),
        &[("precious.txt", b"do not lose me\n")],
    );
    let mut svc = Service::start_config(&cfg);
    wait_until(
        Duration::from_secs(10),
        || site.current_id().as_deref() == Some("v1"),
        || format!("current healed to v1, is {:?}", site.current_target()),
    );
    // The directory's content still exists somewhere under ROOT.
    let found = sh(
        &site.root,
        "grep -rl --exclude-dir=releases 'do not lose me' . || true",
    );
    assert!(
        !String::from_utf8_lossy(&found.stdout).trim().is_empty(),
        "a real `current` directory must be moved aside, not deleted"
    );
    svc.stop();
}

#[test]
fn hooks_run_in_release_with_env() {
    let site = Site::new();
    let log = site.tmp_path("hook-env.log");
    let script = format!(
        "printf '%s|%s|%s|%s|%s|%s\\n' \"$1\" \"$(pwd -P)\" \"$RELEASE_ID\" \"$RELEASE_PATH\" \"$PREVIOUS_RELEASE_ID\" \"$SITE_NAME|$SITE_ROOT\" >> {}",
        log.display()
    );
    let extra = format!(
        "before_activate = [\"/bin/sh\", \"-c\", {s:?}, \"sh\", \"before\"]\n\
         after_activate = [\"/bin/sh\", \"-c\", {s:?}, \"sh\", \"after\"]\n\
         health_check = [\"/bin/sh\", \"-c\", {s:?}, \"sh\", \"health\"]\n",
        s = script
    );
    let (_cfg, mut svc) = start_site(&site, SITE, "", &extra);
    deploy_and_activate(&site, &svc, "v1");
    deploy_and_activate(&site, &svc, "v2");
    let root = fs::canonicalize(&site.root).unwrap();
    let rel2 = site.release("v2");
    let text = fs::read_to_string(&log).unwrap_or_default();
    let v2_lines: Vec<&str> = text.lines().filter(|l| l.contains("|v2|")).collect();
    for phase in ["before", "after", "health"] {
        let line = v2_lines
            .iter()
            .find(|l| l.starts_with(&format!("{phase}|")))
            .unwrap_or_else(|| panic!("{phase} hook did not run for v2; hook log:\n{text}"));
        let f: Vec<&str> = line.split('|').collect();
        assert_eq!(f.len(), 7, "{line}");
        assert_eq!(
            Path::new(f[1]),
            fs::canonicalize(&rel2).unwrap(),
            "{phase}: cwd is the release; {line}"
        );
        assert_eq!(f[2], "v2", "{phase}: RELEASE_ID; {line}");
        assert!(
            Path::new(f[3]).is_absolute(),
            "{phase}: RELEASE_PATH absolute; {line}"
        );
        assert_eq!(
            fs::canonicalize(f[3]).unwrap(),
            fs::canonicalize(&rel2).unwrap(),
            "{phase}: RELEASE_PATH is releases/v2; {line}"
        );
        assert!(
            !f[3].contains(".partial"),
            "{phase}: RELEASE_PATH is releases/<id>; {line}"
        );
        assert_eq!(f[4], "v1", "{phase}: PREVIOUS_RELEASE_ID; {line}");
        assert_eq!(f[5], SITE, "{phase}: SITE_NAME; {line}");
        assert_eq!(
            fs::canonicalize(f[6]).unwrap(),
            root,
            "{phase}: SITE_ROOT; {line}"
        );
    }
    svc.stop();
}

#[test]
fn shared_entries_and_links_are_created() {
    let site = Site::new();
    let extra = "shared = [\"storage\", \".env\"]\nlinks = { htdocs = \"current/public\" }";
    let (_cfg, mut svc) = start_site(&site, SITE, "", extra);
    // The upload carries its own `storage/` dir: it is replaced by the shared link.
    site.deploy(
        &[
            ("public/index.html", b"<p>pub</p>\n" as &[u8]),
            ("storage/placeholder", b"x\n"),
        ],
        "id = \"v1\"\n",
    );
    svc.wait_release_event("release.activated", "v1");
    let rel = site.release("v1");
    for e in ["storage", ".env"] {
        let link = rel.join(e);
        let md = fs::symlink_metadata(&link)
            .unwrap_or_else(|err| panic!("releases/v1/{e} missing: {err}"));
        assert!(md.file_type().is_symlink(), "releases/v1/{e} is a symlink");
        assert_eq!(
            fs::canonicalize(&link).ok(),
            fs::canonicalize(site.root.join("shared").join(e)).ok(),
            "releases/v1/{e} -> ROOT/shared/{e}"
        );
        assert!(
            site.root.join("shared").join(e).exists(),
            "shared/{e} created"
        );
    }
    assert_eq!(
        fs::read(site.root.join("htdocs/index.html")).unwrap(),
        b"<p>pub</p>\n",
        "htdocs -> current/public"
    );
    // `.env` had nothing to seed it: made a directory, which the log says is a guess.
    let made: Vec<String> = svc
        .events("shared.linked")
        .iter()
        .filter(|v| v["path"] == ".env")
        .filter_map(|v| v["created"].as_str().map(str::to_string))
        .collect();
    assert!(
        made.len() == 1 && made[0].starts_with("empty directory") && made[0].contains("file"),
        "{made:?}"
    );
    // A deleted link is recreated by healing.
    fs::remove_file(site.root.join("htdocs")).unwrap();
    wait_until(
        WAIT,
        || site.root.join("htdocs/index.html").exists(),
        || "healing to recreate the htdocs link".into(),
    );
    svc.stop();
}

/// A shared file seeded from the upload (`.env` with the database password) keeps the
/// uploader's read bits: a 0600 secret must not become world-readable in `shared/`.
#[test]
fn shared_file_seeded_from_the_upload_is_not_made_world_readable() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "", "shared = [\".env\", \"config/app.ini\"]");
    let out = cli(&cfg, &["init", SITE]);
    assert_ok(&out, "init");
    clear_dir(&site.deploy_cache());
    write_tree_modes(
        &site.deploy_cache(),
        &[
            ("index.html", b"<p>hi</p>\n" as &[u8], 0o644),
            (".env", b"DB_PASSWORD=hunter2\n", 0o600),
            ("config/app.ini", b"[app]\n", 0o664),
        ],
    );
    write_sha256sums(&site.deploy_cache());
    let out = cli(&cfg, &["finalize", SITE, "--id", "v1"]);
    assert_ok(&out, "finalize");
    let shared = site.root.join("shared");
    assert_eq!(
        fs::read(shared.join(".env")).unwrap(),
        b"DB_PASSWORD=hunter2\n",
        "shared/.env seeded from the upload"
    );
    assert_eq!(
        mode(&shared.join(".env")),
        0o600,
        "shared/.env keeps the upload's 0600"
    );
    assert_eq!(
        mode(&shared.join("config/app.ini")),
        0o644,
        "no group or other write bit in shared/ (owner may edit it)"
    );
}

#[test]
fn deploy_never_recreates_a_missing_shared_file_as_a_directory() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "", "shared = [\".env\"]");
    assert_ok(&cli(&cfg, &["init", SITE]), "init");
    clear_dir(&site.deploy_cache());
    write_tree(
        &site.deploy_cache(),
        &[("index.html", b"v1\n"), (".env", b"DB_PASSWORD=hunter2\n")],
    );
    write_sha256sums(&site.deploy_cache());
    assert_ok(&cli(&cfg, &["finalize", SITE, "--id", "v1"]), "finalize v1");
    let env = site.root.join("shared/.env");
    fs::remove_file(&env).unwrap();
    // The next build has no `.env` of its own (the usual case: secrets live in shared/).
    clear_dir(&site.deploy_cache());
    write_tree(&site.deploy_cache(), &[("index.html", b"v2\n")]);
    write_sha256sums(&site.deploy_cache());
    let out = cli(
        &cfg,
        &["--log-format", "json", "finalize", SITE, "--id", "v2"],
    );
    assert_ok(&out, "finalize v2");
    assert!(
        fs::symlink_metadata(&env).is_err(),
        "shared/.env, a file that went missing, must be left for the operator to restore, \
         not made a directory: {:?}",
        fs::symlink_metadata(&env).map(|m| m.file_type())
    );
    let warned = stderr_events(&out).into_iter().any(|e| {
        e["event"] == "site.error" && e["path"] == ".env" && reason_of(&e).contains("restore")
    });
    assert!(warned, "the missing shared file is logged; {}", show(&out));
    // Once restored, the release's link works without another deploy.
    fs::write(&env, b"DB_PASSWORD=hunter2\n").unwrap();
    assert_eq!(
        fs::read(site.release("v2").join(".env")).unwrap(),
        b"DB_PASSWORD=hunter2\n"
    );
}

/// Overwrites a file of a read-only release in place, keeping its mode.
fn tamper(path: &Path, bytes: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    let m = mode(path);
    fs::set_permissions(path, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(path, bytes).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(m)).unwrap();
}

#[test]
fn verify_detects_drift() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "verify_interval = \"1s\"", "");
    let mut svc = Service::start_config(&cfg);
    deploy_and_activate(&site, &svc, "v1");
    deploy_and_activate(&site, &svc, "v2");

    let out = cli_when_idle(&cfg, &["verify", SITE]);
    assert_ok(&out, "verify on an intact release");
    let out = cli_when_idle(&cfg, &["verify", SITE, "--all"]);
    assert_ok(&out, "verify --all on intact releases");

    tamper(
        &site.release("v2").join("assets/app.js"),
        b"alert('pwned')\n",
    );
    let out = cli_when_idle(&cfg, &["verify", SITE]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "drift -> exit 1; {}",
        show(&out)
    );
    let text = output_text(&out);
    assert!(
        text.contains("assets/app.js"),
        "verify names the drifted path; {}",
        show(&out)
    );
    let out = cli_when_idle(&cfg, &["verify", SITE, "v1"]);
    assert_ok(&out, "verify v1 (intact)");
    let out = cli_when_idle(&cfg, &["verify", SITE, "--all"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "verify --all sees drift; {}",
        show(&out)
    );

    // The service re-hashes the current release every verify_interval.
    let ev = svc.wait_event("drift.detected", |_| true, WAIT);
    assert!(
        ev.to_string().contains("assets/app.js"),
        "drift.detected carries the paths: {ev}"
    );
    let out = cli_when_idle(&cfg, &["status", SITE, "--json"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "drift is a problem found: {}",
        show(&out)
    );
    let v = stdout_json(&out);
    let s = find_site_obj(&v, SITE, "drift").unwrap_or_else(|| panic!("no drift in {v}"));
    let drift = &s["drift"];
    assert!(
        !(drift.is_null()
            || drift == &Value::Bool(false)
            || drift.as_array().is_some_and(|a| a.is_empty())),
        "status reports the drift: {v}"
    );
    svc.stop();
}

#[test]
fn heal_cli_dry_run_then_heal() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "", "");
    let mut svc = Service::start_config(&cfg);
    deploy_and_activate(&site, &svc, "v1");
    svc.stop();

    fs::remove_file(site.current_path()).unwrap();
    let out = cli(&cfg, &["heal", SITE, "--dry-run"]);
    assert!(
        matches!(out.status.code(), Some(0) | Some(1)),
        "heal --dry-run runs; {}",
        show(&out)
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).trim().is_empty(),
        "heal --dry-run says what it would do; {}",
        show(&out)
    );
    assert!(
        site.current_target().is_none(),
        "heal --dry-run must not change anything"
    );
    let out = cli(&cfg, &["heal", SITE]);
    assert_ok(&out, "heal");
    assert_eq!(
        site.current_id().as_deref(),
        Some("v1"),
        "heal restores current"
    );
}

#[test]
fn leftover_partial_is_cleaned_at_start() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "", "");
    let mut svc = Service::start_config(&cfg);
    deploy_and_activate(&site, &svc, "v1");
    svc.stop();
    // A crash left a half-built release behind.
    write_tree(
        &site.releases_dir().join(".partial.v2"),
        &[("index.html", b"half" as &[u8])],
    );
    let mut svc = Service::start_config(&cfg);
    wait_until(
        WAIT,
        || site.hidden_release_entries().is_empty(),
        || {
            format!(
                "leftover .partial.* removed; releases/: {:?}",
                site.releases_entries()
            )
        },
    );
    assert_eq!(site.release_ids(), ["v1"]);
    assert_eq!(site.current_id().as_deref(), Some("v1"));
    svc.stop();
}

#[test]
fn sighup_reloads_config_and_rejects_bad_one() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "keep = 5", "");
    let mut svc = Service::start_config(&cfg);
    let pid = svc.pid();
    deploy_and_activate(&site, &svc, "v1");

    site.write_config(SITE, "keep = 5\nrequire_manifest = false", "");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    svc.wait_event("config.reloaded", |_| true, WAIT);
    // The new setting is in effect: an upload without manifest is accepted.
    site.stage_upload(&as_refs(&small_build("v2")));
    fs::remove_file(site.deploy_cache().join(MANIFEST)).unwrap();
    site.drop_marker("id = \"v2\"\n");
    svc.wait_release_event("release.activated", "v2");

    fs::write(&cfg, "[defaults]\nkeep = \"many\"\n").unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    svc.wait_event("config.rejected", |_| true, WAIT);
    assert!(
        svc.is_running(),
        "a bad config on SIGHUP must not stop the service"
    );
    // The old config stays: the site still works.
    deploy_and_activate(&site, &svc, "v3");
    svc.stop();
}

/// A reload that changes a site restarts it at once: work in progress (here an upload
/// waiting up to `upload_timeout` for a file in flight) is undone and redone under the
/// new config, instead of holding the reload (and `systemctl reload`, and SIGTERM) for as
/// long as that work takes.
#[test]
fn sighup_changing_a_busy_site_restarts_it_at_once_and_redoes_its_upload() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "keep = 5\nupload_timeout = \"60s\"", "");
    let mut svc = Service::start_config(&cfg);
    let pid = nix::unistd::Pid::from_raw(svc.pid());
    deploy_and_activate(&site, &svc, "v1");

    site.stage_upload(&as_refs(&small_build("v2")));
    let dc = site.deploy_cache();
    fs::rename(dc.join("index.html"), dc.join("index.html.part")).unwrap();
    site.drop_marker("id = \"v2\"\n");
    svc.wait_release_event("upload.waiting", "v2");

    site.write_config(SITE, "keep = 4\nupload_timeout = \"60s\"", "");
    let sent = std::time::Instant::now();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    svc.wait_event("config.reloaded", |_| true, Duration::from_secs(10));
    assert!(
        sent.elapsed() < Duration::from_secs(10),
        "the reload waited {:?} for the site's upload",
        sent.elapsed()
    );
    assert!(svc.events_for("release.rejected", "v2").is_empty());
    // The upload completes: the restarted site finishes it.
    fs::rename(dc.join("index.html.part"), dc.join("index.html")).unwrap();
    svc.wait_release_event("release.activated", "v2");
    assert_eq!(site.current_id().as_deref(), Some("v2"));
    svc.stop();
}

#[test]
fn failed_releases_do_not_count_toward_keep_and_keep_failed_applies() {
    let site = Site::new();
    let hook =
        r#"before_activate = ["/bin/sh", "-c", "case \"$RELEASE_ID\" in bad*) exit 1;; esac"]"#;
    let (_cfg, mut svc) = start_site(&site, SITE, "keep = 2\nkeep_failed = 1", hook);
    deploy_and_activate(&site, &svc, "v1");
    for bad in ["bad1", "bad2"] {
        site.deploy(&as_refs(&small_build(bad)), &format!("id = \"{bad}\"\n"));
        svc.wait_release_event("hook.failed", bad);
    }
    deploy_and_activate(&site, &svc, "v2");
    deploy_and_activate(&site, &svc, "v3");
    svc.wait_release_event("release.pruned", "v1");
    svc.wait_release_event("release.pruned", "bad1");
    wait_until(
        WAIT,
        || site.release_ids() == ["bad2", "v2", "v3"],
        || {
            format!(
                "keep=2 good (v2 v3) + keep_failed=1 (bad2); releases: {:?}",
                site.release_ids()
            )
        },
    );
    svc.stop();
}

#[test]
fn prune_uses_journal_order_and_spares_foreign_dirs() {
    let site = Site::new();
    let (_cfg, mut svc) = start_site(&site, SITE, "keep = 3", "");
    // Something the keeper did not create.
    write_tree(
        &site.releases_dir().join("handmade"),
        &[("note.txt", b"mine" as &[u8])],
    );
    for id in ["p1", "p2", "p3"] {
        deploy_and_activate(&site, &svc, id);
    }
    // Make the oldest release look newest by mtime (p1 is still kept with keep=3).
    assert_eq!(site.release_ids(), ["handmade", "p1", "p2", "p3"]);
    sh(
        &site.releases_dir(),
        "touch -h -d '2099-01-01 00:00' p1 p1/index.html",
    );
    deploy_and_activate(&site, &svc, "p4");
    svc.wait_release_event("release.pruned", "p1");
    wait_until(
        WAIT,
        || site.release_ids() == ["handmade", "p2", "p3", "p4"],
        || {
            format!(
                "journal order (not mtime) decides: p1 pruned, p2 kept; foreign dirs kept; releases: {:?}",
                site.release_ids()
            )
        },
    );
    assert!(svc.events_for("release.pruned", "p2").is_empty());
    assert_eq!(
        fs::read(site.releases_dir().join("handmade/note.txt")).unwrap(),
        b"mine"
    );
    svc.stop();
}

#[test]
fn activate_unknown_id_fails() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "", "");
    let mut svc = Service::start_config(&cfg);
    deploy_and_activate(&site, &svc, "v1");
    let out = cli_when_idle(&cfg, &["activate", SITE, "nope"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    for args in [
        &["activate", SITE, "../v1"][..],
        &["pin", SITE, "../v1"],
        &["unpin", SITE, "-"],
        &["rollback", SITE, "--to", "v1/.."],
        &["verify", SITE, "/etc"],
    ] {
        let out = cli_when_idle(&cfg, args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "a release id that is not a valid id is a usage error (exit 2): {args:?}; {}",
            show(&out)
        );
    }
    assert_eq!(site.current_id().as_deref(), Some("v1"));
    svc.stop();
}

#[test]
fn list_of_empty_site() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "", "");
    assert_ok(&cli(&cfg, &["init", SITE]), "init");
    let v = list_json(&cfg);
    assert_eq!(v["site"], SITE, "{v}");
    assert!(v["current"].is_null(), "no current yet: {v}");
    assert_eq!(v["releases"], serde_json::json!([]), "{v}");
}

/// Config whose before_activate hook signals `<tmp>/hook-<id>` then sleeps 3s for release `slow`.
fn slow_hook() -> &'static str {
    r#"before_activate = ["/bin/sh", "-c", "if [ \"$RELEASE_ID\" = slow ]; then touch \"$SITE_ROOT/../hook-slow\"; sleep 3; fi"]"#
}

#[test]
fn sigterm_during_work_exits_0_and_release_completes() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "", slow_hook());
    let mut svc = Service::start_config(&cfg);
    deploy_and_activate(&site, &svc, "v1");
    site.deploy(&as_refs(&small_build("slow")), "id = \"slow\"\n");
    let flag = site.tmp_path("hook-slow");
    wait_until(WAIT, || flag.exists(), || "slow hook to start".into());
    svc.stop(); // asserts exit 0 within 10s
    assert!(
        site.hidden_release_entries()
            .iter()
            .all(|n| !n.starts_with(".partial")),
        "work is finished or cleanly undone: {:?}",
        site.releases_entries()
    );
    let cur = site.current_id();
    assert!(
        cur.as_deref() == Some("v1") || cur.as_deref() == Some("slow"),
        "current is v1 or slow, never broken: {cur:?}"
    );
    // Next start: the interrupted release is redone (or was finished).
    fs::remove_file(&flag).unwrap();
    let mut svc = Service::start_config(&cfg);
    wait_until(
        WAIT,
        || site.current_id().as_deref() == Some("slow"),
        || {
            format!(
                "interrupted release `slow` to be activated after restart; current {:?}; log:\n{}",
                site.current_id(),
                svc.log_text()
            )
        },
    );
    svc.stop();
}

#[test]
fn crash_during_work_is_redone_at_next_start() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "", slow_hook());
    let svc = Service::start_config(&cfg);
    deploy_and_activate(&site, &svc, "v1");
    site.deploy(&as_refs(&small_build("slow")), "id = \"slow\"\n");
    let flag = site.tmp_path("hook-slow");
    wait_until(WAIT, || flag.exists(), || "slow hook to start".into());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(svc.pid()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    svc.wait_exit(Duration::from_secs(10));
    drop(svc);
    assert!(!site.marker_path().exists(), "marker had been consumed");
    assert_eq!(site.current_id().as_deref(), Some("v1"));

    fs::remove_file(&flag).unwrap();
    let mut svc = Service::start_config(&cfg);
    svc.wait_release_event("release.activated", "slow");
    assert_eq!(site.current_id().as_deref(), Some("slow"));
    assert!(
        site.hidden_release_entries()
            .iter()
            .all(|n| !n.starts_with(".partial")),
        "{:?}",
        site.releases_entries()
    );
    assert_eq!(
        tree(&site.release("slow"), &[])
            .into_iter()
            .filter(|(_, e)| matches!(e, Entry::File(_)))
            .count(),
        3,
        "redone release is complete"
    );
    svc.stop();
}

#[test]
fn human_list_keeps_files_and_bytes_in_their_columns() {
    let site = Site::new();
    let (cfg, mut svc) = start_site(&site, SITE, "", "");
    deploy_and_activate(&site, &svc, "v1");
    svc.stop();
    let out = cli(&cfg, &["list", SITE]);
    assert_ok(&out, "list");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default();
    let row = lines
        .find(|l| l.starts_with("v1 "))
        .unwrap_or_else(|| panic!("no row for v1 in:\n{text}"));
    // Right-aligned numbers end where their header word ends.
    for word in ["FILES", "BYTES"] {
        let end = header
            .find(word)
            .unwrap_or_else(|| panic!("no {word} column in header {header:?}"))
            + word.len();
        let cell = row.get(..end).unwrap_or(row);
        assert!(
            cell.ends_with(|c: char| c.is_ascii_digit()) && row[end..].starts_with(' '),
            "{word} value must end under its header (column {end});\n{header}\n{row}"
        );
    }
}

/// Release ids run to 128 characters (SPEC). The ID column was 28 wide, so a row with a
/// longer id pushed its state, created time, files and bytes to the right of the header
/// and of every other row. The column is as wide as the longest id now.
#[test]
fn human_list_columns_line_up_with_a_128_character_id() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "", "");
    assert_ok(&cli(&cfg, &["init", SITE]), "init");
    let long = format!("v{}", "1.2_3-".repeat(30))[..128].to_string();
    for id in ["v1", long.as_str()] {
        site.stage_upload(&as_refs(&small_build(id)));
        assert_ok(&cli(&cfg, &["finalize", SITE, "--id", id]), "finalize");
    }
    let out = cli(&cfg, &["list", SITE]);
    assert_ok(&out, "list");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "a header and two rows:\n{text}");
    let state_at = lines[0].find("STATE").expect("a STATE column");
    for (line, state) in [(lines[1], "current"), (lines[2], "previous")] {
        assert_eq!(
            line.get(state_at..state_at + state.len()),
            Some(state),
            "the state stands under STATE (column {state_at}):\n{text}"
        );
    }
    assert!(lines[1].starts_with(&format!("{long} ")), "{text}");
}

/// SPEC prunes "after each activation (and on prune)": staging a release (activate =
/// false) switches nothing, so it must not delete a good release that a rollback could
/// still go to; the next activation applies the policy.
#[test]
fn staging_a_release_prunes_nothing() {
    let site = Site::new();
    let (cfg, mut svc) = start_site(&site, SITE, "keep = 3", "");
    for id in ["v1", "v2", "v3"] {
        deploy_and_activate(&site, &svc, id);
    }
    site.deploy(
        &as_refs(&small_build("v4")),
        "id = \"v4\"\nactivate = false\n",
    );
    svc.wait_release_event("release.finalized", "v4");
    // The worker holds the operation lock until it is done with the upload.
    let out = cli_when_idle(&cfg, &["heal", SITE, "--dry-run"]);
    assert_ok(&out, "heal --dry-run (waiting for the worker)");
    assert!(
        svc.events_for("release.pruned", "v1").is_empty() && site.release("v1").is_dir(),
        "staging v4 pruned v1 although nothing was activated; releases: {:?}",
        site.release_ids()
    );

    let out = cli_when_idle(&cfg, &["activate", SITE, "v4"]);
    assert_ok(&out, "activate web v4");
    assert_eq!(
        site.release_ids(),
        ["v2", "v3", "v4"],
        "the activation prunes"
    );
    svc.stop();
}

/// A link's target is relative to the link's own directory, as for any symlink: a nested
/// link written as if from the root dangles. It is made, but the operator is told where it
/// points and why; the correctly written one is not warned about.
#[test]
fn a_nested_link_that_dangles_is_reported_with_where_it_points() {
    let site = Site::new();
    let extra = "[sites.web.links]\n\"web/htdocs\" = \"current/public\"\n\"www/htdocs\" = \"../current/public\"\n";
    let (_cfg, mut svc) = start_site(&site, SITE, "", extra);
    site.deploy(
        &[("public/index.html", b"<p>pub</p>\n" as &[u8])],
        "id = \"v1\"\n",
    );
    svc.wait_release_event("release.activated", "v1");
    assert_eq!(
        fs::read(site.root.join("www/htdocs/index.html")).unwrap(),
        b"<p>pub</p>\n"
    );
    let ev = svc.wait_event(
        "site.error",
        |v| v["link"].as_str() == Some("web/htdocs"),
        WAIT,
    );
    let reason = reason_of(&ev);
    assert!(
        reason.contains("web/current/public") && reason.contains("relative to the link"),
        "{ev}"
    );
    assert!(
        svc.events("site.error")
            .iter()
            .all(|v| v["link"].as_str() != Some("www/htdocs")),
        "the link written from its own directory resolves: no warning"
    );
    svc.stop();
}

/// Without an id the release is named by UTC time `YYYYMMDDTHHMMSSZ`, then `-2`, `-3` for
/// more uploads in the same second. Three `finalize` runs inside one second (as measured
/// by `date -u` around them, from the start of a fresh second; retried when they straddle
/// a second) must give exactly `T`, `T-2`, `T-3`.
#[test]
fn generated_ids_are_utc_time_then_suffixed_2_and_3_in_the_same_second() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "", "");
    site.stage_upload(&as_refs(&small_build("t")));
    let utc_now = || {
        let out = sh(&site.root, "date -u +%Y%m%dT%H%M%SZ");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    for _round in 0..5 {
        // Start at a fresh second: one an earlier, straddling round has used would go on
        // with its suffixes.
        let last = utc_now();
        while utc_now() == last {
            std::thread::sleep(Duration::from_millis(20));
        }
        let before_ids = site.release_ids();
        let t0 = utc_now();
        for _ in 0..3 {
            let out = cli(&cfg, &["finalize", SITE, "--no-activate"]);
            assert_ok(&out, "finalize --no-activate");
        }
        let t1 = utc_now();
        let new: Vec<String> = site
            .release_ids()
            .into_iter()
            .filter(|id| !before_ids.contains(id))
            .collect();
        if t0 != t1 {
            continue;
        }
        assert_eq!(
            new,
            [t0.clone(), format!("{t0}-2"), format!("{t0}-3")],
            "three releases in the UTC second {t0}"
        );
        return;
    }
    panic!("three finalize runs never fit in one second");
}

/// Makes release `id` of `small_build(id)` with `finalize` (no service) and returns the
/// command's output.
fn finalize_release(site: &Site, cfg: &Path, id: &str) -> std::process::Output {
    site.stage_upload(&as_refs(&small_build(id)));
    cli(cfg, &["finalize", SITE, "--id", id, "--log-format", "json"])
}

/// A failure reason quotes a hook's stderr, often several lines: the human `list` keeps
/// one row per release, or the reason's later lines read as rows of their own.
#[test]
fn human_list_keeps_a_multi_line_failure_reason_on_its_row() {
    let site = Site::new();
    let hook = r#"before_activate = ["/bin/sh", "-c", "case \"$RELEASE_ID\" in bad*) printf 'line one\nline two\n' >&2; exit 1;; esac"]"#;
    let cfg = site.write_config(SITE, "", hook);
    assert_ok(&finalize_release(&site, &cfg, "v1"), "finalize v1");
    let out = finalize_release(&site, &cfg, "bad1");
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let out = cli(&cfg, &["list", SITE]);
    assert_ok(&out, "list");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(
        text.lines().count(),
        3,
        "a header and one row per release:\n{text}"
    );
    let row = text
        .lines()
        .find(|l| l.starts_with("bad1 "))
        .unwrap_or_else(|| panic!("no row for bad1:\n{text}"));
    assert!(
        row.contains("line one line two"),
        "the reason stays on bad1's row: {row:?}"
    );
}

/// `release.pruned` carries what the deletion freed, `files` and `bytes` (SPEC: every
/// event carries them where they apply), beside `release` and `reason`.
#[test]
fn release_pruned_event_names_the_files_and_bytes_deleted() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "keep = 1", "");
    for id in ["v1", "v2"] {
        assert_ok(&finalize_release(&site, &cfg, id), id);
    }
    let listed = list_json(&cfg);
    let v1 = listed["releases"]
        .as_array()
        .and_then(|a| a.iter().find(|r| r["id"] == "v1").cloned())
        .unwrap_or_else(|| panic!("v1 not listed: {listed}"));
    let out = finalize_release(&site, &cfg, "v3");
    assert_ok(&out, "finalize v3");
    let ev = stderr_events(&out)
        .into_iter()
        .find(|v| v["event"] == "release.pruned")
        .unwrap_or_else(|| panic!("no release.pruned: {}", show(&out)));
    assert_eq!(ev["release"], "v1", "{ev}");
    assert!(
        ev["reason"].as_str().is_some_and(|r| r.contains("keep")),
        "{ev}"
    );
    assert!(v1["files"].as_u64().is_some_and(|n| n > 0), "{v1}");
    assert_eq!(ev["files"], v1["files"], "{ev}");
    assert_eq!(ev["bytes"], v1["bytes"], "{ev}");
}

/// With the `current` link deleted by hand and no service to heal it yet, `prune` still
/// spares the release before the last current one: it took "no current" as the point to
/// count from, protected only the last current as "previous", and deleted the release a
/// rollback would go to.
#[test]
fn prune_with_the_current_link_deleted_keeps_the_rollback_target() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "keep = 1", "");
    for id in ["v1", "v2", "v3"] {
        assert_ok(&finalize_release(&site, &cfg, id), id);
    }
    assert_eq!(site.release_ids(), ["v2", "v3"]);
    fs::remove_file(site.current_path()).unwrap();
    let out = cli(&cfg, &["prune", SITE]);
    assert_ok(&out, "prune");
    assert_eq!(
        site.release_ids(),
        ["v2", "v3"],
        "v3 was current and v2 its previous; neither may go: {}",
        show(&out)
    );
}

/// `status` lists pinned and failed releases among the releases it shows: one deleted by
/// hand was gone from `releases` but still listed as pinned or failed.
#[test]
fn status_pinned_and_failed_lists_leave_out_releases_deleted_by_hand() {
    let site = Site::new();
    let hook =
        r#"before_activate = ["/bin/sh", "-c", "case \"$RELEASE_ID\" in bad*) exit 1;; esac"]"#;
    let cfg = site.write_config(SITE, "", hook);
    assert_ok(&finalize_release(&site, &cfg, "v1"), "finalize v1");
    assert_ok(&finalize_release(&site, &cfg, "v2"), "finalize v2");
    assert_eq!(finalize_release(&site, &cfg, "bad1").status.code(), Some(1));
    assert_ok(&cli(&cfg, &["pin", SITE, "v1"]), "pin v1");
    for id in ["v1", "bad1"] {
        make_writable(&site.release(id));
        fs::remove_dir_all(site.release(id)).unwrap();
    }
    let out = cli(&cfg, &["status", SITE, "--json"]);
    assert_ok(&out, "status --json");
    let doc = stdout_json(&out);
    let s = &doc["sites"][0];
    assert_eq!(s["pinned"], serde_json::json!([]), "{s}");
    assert_eq!(s["failed"], serde_json::json!([]), "{s}");
}

/// Pinning a pinned release (or unpinning one that is not) succeeds and says the state
/// already held, instead of reporting a change and journaling a record that changed
/// nothing (which `status` then showed as the last event).
#[test]
fn pin_twice_says_already_pinned_and_records_nothing() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "", "");
    assert_ok(&finalize_release(&site, &cfg, "v1"), "finalize v1");
    assert_ok(&cli(&cfg, &["pin", SITE, "v1"]), "pin v1");
    let last = |cfg: &Path| {
        let out = cli(cfg, &["status", SITE, "--json"]);
        assert_ok(&out, "status");
        stdout_json(&out)["sites"][0]["last_event"]["seq"].clone()
    };
    let before = last(&cfg);
    for (cmd, word) in [("pin", "already pinned"), ("unpin", "unpinned")] {
        let out = cli(&cfg, &[cmd, SITE, "v1"]);
        assert_ok(&out, cmd);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(word),
            "{cmd}: {}",
            show(&out)
        );
    }
    let out = cli(&cfg, &["unpin", SITE, "v1"]);
    assert_ok(&out, "unpin again");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("is not pinned"),
        "{}",
        show(&out)
    );
    let after = last(&cfg);
    assert_eq!(
        after.as_u64(),
        before.as_u64().map(|s| s + 1),
        "only the one real change (the unpin) is journaled"
    );
}

/// `activate` of a staged release that fails its checks applies the retention policy, as
/// a failed activation after an upload does: the failed releases beyond `keep_failed`
/// went only at the next successful activation.
#[test]
fn a_failed_activate_prunes_failed_releases_beyond_keep_failed() {
    let site = Site::new();
    let hook =
        r#"before_activate = ["/bin/sh", "-c", "case \"$RELEASE_ID\" in bad*) exit 1;; esac"]"#;
    let cfg = site.write_config(SITE, "keep_failed = 1", hook);
    assert_ok(&finalize_release(&site, &cfg, "v1"), "finalize v1");
    for bad in ["bad1", "bad2"] {
        site.stage_upload(&as_refs(&small_build(bad)));
        let out = cli(&cfg, &["finalize", SITE, "--id", bad, "--no-activate"]);
        assert_ok(&out, "finalize --no-activate");
    }
    for bad in ["bad1", "bad2"] {
        let out = cli(&cfg, &["activate", SITE, bad, "--log-format", "json"]);
        assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    }
    assert_eq!(
        site.release_ids(),
        ["bad2", "v1"],
        "keep_failed = 1: bad1 goes once bad2 failed too"
    );
    // A refusal (a failed release without --force) changes nothing and prunes nothing.
    let out = cli(&cfg, &["activate", SITE, "bad2"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert_eq!(site.release_ids(), ["bad2", "v1"]);
}

/// Unmounts what it was given when dropped, so a failing test leaves no mount behind.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// `releases/` on a filesystem of its own (a volume mounted there): the rename into
/// `.release-keeper/trash/` fails with EXDEV, so every pruning failed and old releases
/// piled up until the disk was full. Needs root (a tmpfs mount); skipped without it.
#[test]
fn pruning_works_with_releases_on_its_own_filesystem() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "keep = 1", "");
    fs::create_dir_all(site.releases_dir()).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "tmpfs"])
        .arg(site.releases_dir())
        .output()
        .is_ok_and(|o| o.status.success());
    if !mounted {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    }
    let _guard = Mounted(site.releases_dir());
    for id in ["v1", "v2", "v3"] {
        assert_ok(&finalize_release(&site, &cfg, id), id);
    }
    assert_eq!(
        site.releases_entries(),
        ["v2", "v3"],
        "v1 pruned, nothing hidden left behind"
    );
    let l = list_json(&cfg);
    assert_eq!(
        list_states(&l),
        pairs(&[("v3", "current"), ("v2", "previous")])
    );
}

/// `keep_failed` keeps the latest failures for inspection: a release staged earlier that
/// fails when it is activated now is the one to look at, and was deleted by the pruning
/// right after its own failure (it is older by release order than an earlier failure).
#[test]
fn keep_failed_keeps_the_release_that_failed_last() {
    let site = Site::new();
    let hook =
        r#"before_activate = ["/bin/sh", "-c", "case \"$RELEASE_ID\" in bad*) exit 1;; esac"]"#;
    let cfg = site.write_config(SITE, "keep_failed = 1", hook);
    assert_ok(&finalize_release(&site, &cfg, "v1"), "finalize v1");
    site.stage_upload(&as_refs(&small_build("bad-staged")));
    let out = cli(
        &cfg,
        &["finalize", SITE, "--id", "bad-staged", "--no-activate"],
    );
    assert_ok(&out, "stage bad-staged");
    assert_eq!(finalize_release(&site, &cfg, "bad1").status.code(), Some(1));
    let out = cli(&cfg, &["activate", SITE, "bad-staged"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert_eq!(
        site.release_ids(),
        ["bad-staged", "v1"],
        "bad-staged failed last and is kept; bad1 goes"
    );
}

/// `prune --dry-run` and `heal --dry-run` change nothing, not even the layout of a root
/// that was never initialised: run as root, they left a root-owned `.release-keeper/`
/// (and lock) that the service's user could not work in.
#[test]
fn dry_runs_make_no_directory_in_an_uninitialised_root() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "", "");
    fs::remove_dir(site.deploy_cache()).unwrap();
    for cmd in ["prune", "heal"] {
        let out = cli(&cfg, &[cmd, SITE, "--dry-run"]);
        assert_ok(&out, &format!("{cmd} --dry-run"));
        let left: Vec<_> = fs::read_dir(&site.root)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(
            left.is_empty(),
            "{cmd} --dry-run made {left:?}; {}",
            show(&out)
        );
    }
    // A directory where the lock file belongs: the dry run says it would be moved aside
    // (as healing does), and leaves it.
    assert_ok(&finalize_release(&site, &cfg, "v1"), "finalize v1");
    let lock = site.root.join(".release-keeper/lock");
    fs::remove_file(&lock).unwrap();
    fs::create_dir(&lock).unwrap();
    let out = cli(&cfg, &["heal", SITE, "--dry-run"]);
    assert_ok(&out, "heal --dry-run");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("would move"),
        "{}",
        show(&out)
    );
    assert!(lock.is_dir(), "the dry run moved the lock directory");
}

/// An id finalized again after its release was deleted by hand is one release: its older
/// journal record stayed live, so `list` showed the id twice, the stale record counted
/// toward `keep` on its own, and pruning it deleted the new release of that id.
#[test]
fn an_id_reused_after_its_release_was_deleted_by_hand_is_one_release_and_kept() {
    let site = Site::new();
    let cfg = site.write_config(SITE, "keep = 2", "");
    assert_ok(&finalize_release(&site, &cfg, "old"), "finalize old");
    site.stage_upload(&as_refs(&small_build("reused")));
    let stage = |what: &str| {
        let out = cli(&cfg, &["finalize", SITE, "--id", "reused", "--no-activate"]);
        assert_ok(&out, what);
    };
    stage("stage reused");
    make_writable(&site.release("reused"));
    fs::remove_dir_all(site.release("reused")).unwrap();
    site.stage_upload(&as_refs(&small_build("reused, rebuilt")));
    stage("stage reused again");
    let ids = |v: &Value| -> Vec<String> { list_states(v).into_iter().map(|(id, _)| id).collect() };
    assert_eq!(
        ids(&list_json(&cfg)),
        ["reused", "old"],
        "the reused id must be listed once"
    );

    // keep = 2: n1 (current) and the staged reused are the newest two good releases, old is
    // the previous one; nothing is to be pruned.
    assert_ok(&finalize_release(&site, &cfg, "n1"), "finalize n1");
    assert!(
        site.release("reused").is_dir(),
        "the re-uploaded release `reused` was pruned although it is among the newest keep = 2; \
         releases left: {:?}",
        site.release_ids()
    );
    assert_eq!(
        list_states(&list_json(&cfg)),
        [
            ("n1".to_string(), "current".to_string()),
            ("reused".to_string(), "staged".to_string()),
            ("old".to_string(), "previous".to_string()),
        ]
    );
}

/// README: a changed or removed site does not hold a reload. One in the middle of an
/// activation (its health check takes 5 s) did: the reload waited for the activation to
/// end before it applied anything, so a site the same reload added was not served
/// meanwhile. The busy site's worker now finishes the activation and is replaced after.
#[test]
fn a_reload_does_not_wait_for_the_activation_of_a_changed_site() {
    let a = Site::new();
    let b = Site::new();
    let (slow, started) = (a.tmp_path("slow"), a.tmp_path("check-started"));
    let cfg = a.tmp_path("config.toml");
    let write = |keep: u32, with_b: bool| {
        let mut text = format!(
            "[sites.a]\nroot = \"{}\"\nkeep = {keep}\nhealth_retries = 1\n\
             health_check = [\"/bin/sh\", \"-c\", \"if [ -e '{}' ]; then touch '{}'; sleep 5; fi\"]\n",
            a.root.display(),
            slow.display(),
            started.display()
        );
        if with_b {
            text.push_str(&format!("\n[sites.b]\nroot = \"{}\"\n", b.root.display()));
        }
        fs::write(&cfg, text).unwrap();
    };
    write(5, false);
    let mut svc = Service::start_config(&cfg);
    fs::write(&slow, b"").unwrap();
    a.deploy(&as_refs(&small_build("v1")), "id = \"v1\"\n");
    wait_until(
        WAIT,
        || started.exists(),
        || format!("a's health check to start; log:\n{}", svc.log_text()),
    );
    fs::remove_file(&slow).unwrap();

    // a changed (keep), b added, while a's check runs.
    write(4, true);
    let t0 = std::time::Instant::now();
    let pid = nix::unistd::Pid::from_raw(svc.pid());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    svc.wait_event("config.reloaded", |v| v["added"] == "b", WAIT);
    b.deploy(&as_refs(&small_build("b1")), "id = \"b1\"\n");
    svc.wait_release_event("release.activated", "b1");
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(3) && svc.events_for("release.activated", "v1").is_empty(),
        "b served {took:?} after the reload, before a's activation ended; log:\n{}",
        svc.log_text()
    );

    // a's activation ends as it would have; then a is served under its new config.
    svc.wait_release_event("release.activated", "v1");
    assert_eq!(a.current_id().as_deref(), Some("v1"));
    a.deploy(&as_refs(&small_build("v2")), "id = \"v2\"\n");
    svc.wait_release_event("release.activated", "v2");
    assert_eq!(a.current_id().as_deref(), Some("v2"));
    svc.stop();
}

/// A sparse file of the upload (a preallocated database) keeps its holes in the release:
/// written out whole, 64 MiB of zeros took 64 MiB of disk for a file the upload held in
/// a few KiB.
#[test]
fn a_sparse_file_stays_sparse_in_the_release() {
    use std::os::unix::fs::MetadataExt;
    let site = Site::new();
    let cfg = site.write_config(SITE, "", "");
    clear_dir(&site.deploy_cache());
    write_tree(
        &site.deploy_cache(),
        &[("index.html", b"<p>db</p>\n" as &[u8])],
    );
    let db = site.deploy_cache().join("data.db");
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = fs::File::create(&db).unwrap();
        f.write_all(b"header").unwrap();
        f.seek(SeekFrom::Start(32 * 1024 * 1024)).unwrap();
        f.write_all(b"middle").unwrap();
        // Ends in a hole.
        f.set_len(64 * 1024 * 1024).unwrap();
    }
    let uploaded = fs::metadata(&db).unwrap();
    if uploaded.blocks() * 512 >= uploaded.len() {
        eprintln!("skipped: this filesystem does not keep holes");
        return;
    }
    write_sha256sums(&site.deploy_cache());
    finalize_expecting(&cfg, SITE, "v1", &[], 0);
    let released = fs::metadata(site.release("v1").join("data.db")).unwrap();
    assert_eq!(released.len(), 64 * 1024 * 1024, "same length");
    assert!(
        released.blocks() * 512 <= uploaded.blocks() * 512 + 64 * 1024,
        "release takes {} bytes on disk, the upload {}",
        released.blocks() * 512,
        uploaded.blocks() * 512
    );
    assert_eq!(
        sha256_hex(&fs::read(site.release("v1").join("data.db")).unwrap()),
        sha256_hex(&fs::read(&db).unwrap()),
        "same content"
    );
    let out = cli(&cfg, &["verify", SITE, "v1"]);
    assert_ok(&out, "verify of the sparse release");
}
