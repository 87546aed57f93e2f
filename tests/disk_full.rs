//! A disk too small for the upload, or the keeper's own directories refusing writes (a
//! read-only mount, wrong permissions): the release is deferred (not dropped), nothing is
//! left behind, `current` is untouched, and the upload is finalized once the server is
//! fixed. Needs root (it mounts a small tmpfs or a read-only bind mount); skipped
//! otherwise.

mod common;

use std::fs;
use std::process::Command;

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Unmounts the tmpfs when the test ends, whatever happens.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Makes `releases/` a read-only bind mount of itself, undone when the guard drops; None
/// where bind mounts are not possible (not root).
fn read_only_releases(site: &Site) -> Option<Mount> {
    let releases = site.releases_dir();
    let bind = Command::new("mount")
        .arg("--bind")
        .arg(&releases)
        .arg(&releases)
        .status()
        .is_ok_and(|s| s.success());
    if !bind {
        return None;
    }
    let mount = Mount(releases.clone());
    let ro = Command::new("mount")
        .args(["-o", "remount,ro,bind"])
        .arg(&releases)
        .status()
        .unwrap();
    assert!(ro.success(), "remount read-only failed");
    Some(mount)
}

/// Serves the site, activates v1, makes `releases/` read-only and drops v2, which cannot
/// be built; None (skipped) where bind mounts are not possible (not root).
fn v2_deferred_by_read_only_releases(site: &Site) -> Option<(Service, Mount)> {
    let mut svc = Service::start_root(&site.root);
    deploy_and_activate(site, &svc, "v1");
    let Some(mount) = read_only_releases(site) else {
        eprintln!("skipped: cannot bind-mount here (needs root)");
        svc.stop();
        return None;
    };
    site.deploy(&as_refs(&small_build("v2")), "id = \"v2\"\n");
    Some((svc, mount))
}

fn mount_tmpfs(dir: &std::path::Path, size: &str) -> Option<Mount> {
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    ok.then(|| Mount(dir.to_path_buf()))
}

#[test]
fn upload_larger_than_free_space_is_deferred_then_finalized_when_space_returns() {
    let site = Site::new();
    let Some(mount) = mount_tmpfs(&site.root, "40m") else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    fs::create_dir_all(site.deploy_cache()).unwrap();
    let mut svc = Service::start_root(&site.root);

    // 20 MiB of upload: with the upload itself on the same 40 MiB filesystem, the release
    // (20 MiB plus margin) does not fit.
    let blobs: Vec<(String, Vec<u8>)> = (0..20)
        .map(|i| (format!("assets/blob{i}.bin"), vec![i as u8; 1024 * 1024]))
        .collect();
    let files: Vec<(&str, &[u8])> = blobs
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_slice()))
        .collect();
    site.deploy(&files, "id = \"big\"\n");
    let ev = svc.wait_event("release.rejected", |v| v["retrying"] == true, WAIT);
    assert!(
        reason_of(&ev).contains("not enough free space"),
        "reason should say why: {ev}"
    );
    assert!(
        ev["message"]
            .as_str()
            .is_some_and(|m| m.contains("not enough space")),
        "the message names the cause: {ev}"
    );
    assert_eq!(site.current_id(), None, "current must stay untouched");
    // Nothing but a trigger (SIGHUP, the heal timer, a marker) retries: the keeper's own
    // claim of the marker once woke a second attempt at once, racing the checks below.
    std::thread::sleep(std::time::Duration::from_millis(700));
    let attempts = svc
        .events("release.rejected")
        .into_iter()
        .filter(|v| v["retrying"] == true)
        .count();
    assert_eq!(
        attempts, 1,
        "the deferred upload was retried without a trigger"
    );
    assert!(
        site.hidden_release_entries().is_empty() && site.release_ids().is_empty(),
        "no partial or release left behind: {:?}",
        site.releases_entries()
    );
    assert_eq!(
        site.claim_count(),
        1,
        "the upload must be kept for a retry, not dropped"
    );

    // Space returns; SIGHUP (or the heal timer, or the next marker) retries it.
    let st = Command::new("mount")
        .args(["-o", "remount,size=200m"])
        .arg(&mount.0)
        .status()
        .unwrap();
    assert!(st.success(), "remount failed");
    kill(Pid::from_raw(svc.pid()), Signal::SIGHUP).unwrap();
    svc.wait_release_event("release.activated", "big");
    assert_eq!(site.current_id().as_deref(), Some("big"));
    assert_eq!(
        fs::read(site.release("big").join("assets/blob7.bin")).unwrap(),
        vec![7u8; 1024 * 1024]
    );
    svc.stop();
    drop(mount);
}

/// `releases/` refusing writes is the server's fault, not the upload's: rejecting the
/// upload consumed it, so it was not deployed once the operator fixed the mount or the
/// permissions. It is kept and finalized at the next healing pass after the fix.
#[test]
fn releases_dir_refusing_writes_defers_the_upload_until_fixed() {
    let site = Site::new();
    let Some((mut svc, mount)) = v2_deferred_by_read_only_releases(&site) else {
        return;
    };
    let ev = svc.wait_event("release.rejected", |v| v["retrying"] == true, WAIT);
    assert!(
        reason_of(&ev).contains("releases"),
        "the reason names the directory that refused: {ev}"
    );
    // The message said "not enough space for the release" whatever the cause, sending
    // the operator to look at free space instead of the mount or the permissions.
    let message = ev["message"].as_str().unwrap_or_default();
    assert!(
        !message.contains("space") && message.contains("cannot write its own directories"),
        "the message names the cause: {ev}"
    );
    assert_eq!(site.current_id().as_deref(), Some("v1"));
    assert_eq!(
        site.claim_count(),
        1,
        "the upload must be kept for a retry, not dropped"
    );

    drop(mount);
    kill(Pid::from_raw(svc.pid()), Signal::SIGHUP).unwrap();
    svc.wait_release_event("release.activated", "v2");
    assert_eq!(site.current_id().as_deref(), Some("v2"));
    svc.stop();
}

/// Runs `cmd`, true when it succeeded.
fn ran(cmd: &mut Command) -> bool {
    cmd.status().map(|s| s.success()).unwrap_or(false)
}

/// A write the disk fails after the kernel accepted it (a full thin volume, a failing
/// disk) shows only when the release is flushed: `syncfs` reports the lost writeback. The
/// release must not be renamed into place or activated, and the upload must be kept and
/// finalized once the disk works again. The disk here is an ext4 image on a loop device
/// whose backing file lives on a tmpfs too small for it: ext4 sees plenty of free space
/// and accepts every write, and the writeback of those past the tmpfs's size fails (as
/// ENOSPC, what a thin volume gives too).
#[test]
fn a_write_lost_on_its_way_to_disk_fails_the_flush_and_defers_the_upload_until_fixed() {
    let site = Site::new();
    let backing = site.tmp_path("backing");
    fs::create_dir_all(&backing).unwrap();
    let Some(tmpfs) = mount_tmpfs(&backing, "40m") else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let image = backing.join("disk.img");
    fs::File::create(&image)
        .unwrap()
        .set_len(256 * 1024 * 1024)
        .unwrap();
    if !ran(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-O", "^has_journal"])
        .arg(&image))
    {
        eprintln!("skipped: mkfs.ext4 is missing");
        return;
    }
    fs::create_dir_all(&site.root).unwrap();
    if !ran(Command::new("mount")
        .args(["-o", "loop"])
        .arg(&image)
        .arg(&site.root))
    {
        eprintln!("skipped: cannot mount a loop device here");
        return;
    }
    // Dropped before the tmpfs under it.
    let disk = Mount(site.root.clone());
    fs::create_dir_all(site.deploy_cache()).unwrap();
    let mut svc = Service::start_root(&site.root);
    deploy_and_activate(&site, &svc, "v1");

    // 24 MiB that do not compress, written through to the image: the tmpfs holds them
    // and the little else the disk has, but not a second copy of them (the release).
    let blobs: Vec<(String, Vec<u8>)> = (0..24u32)
        .map(|i| {
            let mut b = vec![0u8; 1024 * 1024];
            let mut x = 0x9e37_79b9_u32.wrapping_mul(i + 1);
            for c in b.chunks_mut(4) {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                c.copy_from_slice(&x.to_le_bytes());
            }
            (format!("assets/blob{i}.bin"), b)
        })
        .collect();
    let files: Vec<(&str, &[u8])> = blobs
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_slice()))
        .collect();
    site.stage_upload(&files);
    assert!(
        ran(Command::new("sync").arg("-f").arg(&site.root)),
        "sync of the upload"
    );
    site.drop_marker("id = \"v2\"\n");

    let ev = svc.wait_event(
        "release.rejected",
        |v| release_of(v) == Some("v2") && v["retrying"] == true,
        WAIT,
    );
    let reason = reason_of(&ev);
    // The whole tree's `syncfs`, or one file's fsync when the release is flushed file by
    // file (`finalize::Durability`), whichever met the lost write.
    assert!(
        reason.contains(".partial.v2") && reason.contains("No space left on device"),
        "the reason names the flush that failed: {ev}"
    );
    assert_eq!(
        site.current_id().as_deref(),
        Some("v1"),
        "current must stay on the release that is on disk"
    );
    assert!(
        !site.release("v2").exists() && site.hidden_release_entries().is_empty(),
        "no release or partial left behind: {:?}",
        site.releases_entries()
    );
    assert_eq!(
        site.claim_count(),
        1,
        "the upload must be kept for a retry, not dropped"
    );

    // The disk works again: the next trigger finalizes the upload.
    assert!(
        ran(Command::new("mount")
            .args(["-o", "remount,size=400m"])
            .arg(&tmpfs.0)),
        "remount failed"
    );
    kill(Pid::from_raw(svc.pid()), Signal::SIGHUP).unwrap();
    svc.wait_release_event("release.activated", "v2");
    assert_eq!(
        fs::read(site.release("v2").join("assets/blob7.bin")).unwrap(),
        blobs[7].1
    );
    svc.stop();
    drop(disk);
    drop(tmpfs);
}

/// An upload kept for a retry is gone from `deploy-cache/` once the next one is uploaded
/// and marked: the retry must not build the newer upload under the kept one's id and
/// `activate` (a staged build went live as the release the earlier marker named). The
/// kept one is rejected as superseded, and the newer one goes its own way.
#[test]
fn an_upload_kept_for_a_retry_is_superseded_by_the_next_marker() {
    let site = Site::new();
    let Some((mut svc, mount)) = v2_deferred_by_read_only_releases(&site) else {
        return;
    };
    svc.wait_event(
        "release.rejected",
        |v| release_of(v) == Some("v2") && v["retrying"] == true,
        WAIT,
    );
    // The next upload, to be staged only, replaces v2's in deploy-cache/.
    site.deploy(
        &as_refs(&small_build("staged")),
        "id = \"v3\"\nactivate = false\n",
    );
    let ev = svc.wait_event(
        "release.rejected",
        |v| release_of(v) == Some("v2") && v["retrying"] != true,
        WAIT,
    );
    assert!(reason_of(&ev).contains("superseded"), "{ev}");

    drop(mount);
    kill(Pid::from_raw(svc.pid()), Signal::SIGHUP).unwrap();
    svc.wait_release_event("release.finalized", "v3");
    wait_until(
        WAIT,
        || site.claim_count() == 0,
        || "the claims to be done with".into(),
    );
    assert_eq!(
        site.release_ids(),
        ["v1", "v3"],
        "no v2 built from v3's upload"
    );
    assert_eq!(
        site.current_id().as_deref(),
        Some("v1"),
        "v3 is only staged"
    );
    assert!(svc.events_for("release.activated", "v2").is_empty());
    svc.stop();
}
