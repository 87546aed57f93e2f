//! Whether a symlink of an upload stays inside its release. A lexical check is not
//! enough: `a -> b/..` where `b -> .` climbs out, so the target is resolved component by
//! component against the release tree, following in-tree symlinks (never reading through
//! them: only `lstat`/`readlink` on paths whose components are known directories).

use std::ffi::OsString;
use std::fs;
use std::path::{Component, Path, PathBuf};

/// Most symlinks followed while resolving one target (as the kernel's ELOOP limit).
const MAX_HOPS: usize = 40;

/// Checks that the symlink at `link_rel` (relative to `release`) with `target` resolves
/// inside `release`, or inside one of the configured `shared` entries when it goes through
/// the shared link (`public/storage -> ../storage/app/public`, with `storage` shared, is
/// the classic case). Dangling targets are fine as long as they stay inside.
pub fn check_inside(
    release: &Path,
    link_rel: &Path,
    target: &Path,
    shared: &[PathBuf],
) -> Result<(), String> {
    if target.is_absolute() {
        return Err(format!(
            "symlink {} -> {} is absolute",
            crate::events::shown(link_rel),
            target.display()
        ));
    }
    if target.as_os_str().is_empty() {
        return Err(format!(
            "symlink {} has an empty target",
            crate::events::shown(link_rel)
        ));
    }
    let escape = || {
        format!(
            "symlink {} -> {} points outside the release",
            crate::events::shown(link_rel),
            target.display()
        )
    };
    // The resolved directory so far, as components known to be real directories (or
    // missing: then the rest is lexical).
    let mut stack: Vec<OsString> = link_rel
        .parent()
        .map(|p| p.iter().map(|c| c.to_os_string()).collect())
        .unwrap_or_default();
    let mut pending: Vec<OsString> = components(target).into_iter().rev().collect();
    let mut hops = 0;
    let mut missing = false;
    // Inside a shared entry the stack may not shrink below this depth: the entry's
    // contents are the application's, so the rest is resolved lexically.
    let mut floor = 0;
    while let Some(c) = pending.pop() {
        if c == ".." {
            if stack.len() <= floor || stack.pop().is_none() {
                return Err(escape());
            }
            continue;
        }
        if c == "." {
            continue;
        }
        stack.push(c);
        if missing {
            continue;
        }
        let here: PathBuf = stack.iter().collect();
        if floor == 0 && shared.iter().any(|e| e == &here) {
            floor = stack.len();
            missing = true;
            continue;
        }
        match fs::symlink_metadata(release.join(&here)) {
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                if hops > MAX_HOPS {
                    return Err(format!("symlink {} loops", crate::events::shown(link_rel)));
                }
                let next = fs::read_link(release.join(&here)).map_err(|e| e.to_string())?;
                if next.is_absolute() {
                    return Err(escape());
                }
                stack.pop();
                pending.extend(components(&next).into_iter().rev());
            }
            Ok(_) => {}
            Err(_) => missing = true,
        }
    }
    Ok(())
}

fn components(p: &Path) -> Vec<OsString> {
    p.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::CurDir => Some(OsString::from(".")),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn check_inside_plain(r: &Path, l: &Path, t: &Path) -> Result<(), String> {
        check_inside(r, l, t, &[])
    }

    #[test]
    fn through_a_shared_link_stays_inside_the_entry() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::create_dir_all(r.join("public")).unwrap();
        symlink("../../shared/storage", r.join("storage")).unwrap();
        let shared = [PathBuf::from("storage")];
        let ok = |l: &str, t: &str| check_inside(r, Path::new(l), Path::new(t), &shared);
        assert!(ok("public/storage", "../storage/app/public").is_ok());
        assert!(ok("s", "storage").is_ok());
        assert!(ok("peek", "storage/../other").is_err());
        assert!(ok("peek2", "storage/app/../../x").is_err());
        assert!(ok("peek3", "storage/app/..").is_ok());
    }

    #[test]
    fn inside_and_outside() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::create_dir_all(r.join("a/b")).unwrap();
        fs::write(r.join("a/f"), b"").unwrap();
        assert!(check_inside_plain(r, Path::new("a/b/l"), Path::new("../f")).is_ok());
        assert!(check_inside_plain(r, Path::new("l"), Path::new("a/b/../f")).is_ok());
        assert!(check_inside_plain(r, Path::new("l"), Path::new("missing/x")).is_ok());
        assert!(check_inside_plain(r, Path::new("l"), Path::new("../x")).is_err());
        assert!(check_inside_plain(r, Path::new("a/l"), Path::new("../../x")).is_err());
        assert!(check_inside_plain(r, Path::new("l"), Path::new("/etc/passwd")).is_err());
        // b2 -> . at top, then b2/.. climbs out although it looks inside lexically.
        symlink(".", r.join("dot")).unwrap();
        assert!(check_inside_plain(r, Path::new("x"), Path::new("dot/..")).is_err());
        symlink("a/b", r.join("deep")).unwrap();
        assert!(check_inside_plain(r, Path::new("y"), Path::new("deep/../f")).is_ok());
        symlink("loop2", r.join("loop1")).unwrap();
        symlink("loop1", r.join("loop2")).unwrap();
        assert!(check_inside_plain(r, Path::new("z"), Path::new("loop1")).is_err());
    }
}
