//! Files that hold a secret (an Entra credential, the database password): where a relative name
//! points (systemd's `$CREDENTIALS_DIRECTORY`), and whether a file may be read by others there.
//! A leaf: `remote` and `storage` both use it.

use std::path::{Component, Path, PathBuf};

/// Relative paths are systemd credentials (`LoadCredential=`) when the service has them.
pub fn resolve(file: &Path) -> PathBuf {
    match std::env::var_os("CREDENTIALS_DIRECTORY") {
        Some(dir) if file.is_relative() => Path::new(&dir).join(file),
        _ => file.to_owned(),
    }
}

/// Whether a file of `mode` at `path` is private enough for a secret: its owner's alone, or in
/// a credentials directory systemd made (its files show an ACL mask, 0440, in their group bits).
pub fn private_enough(path: &Path, mode: u32) -> bool {
    mode & 0o077 == 0 || in_systemd_credentials(path)
}

fn in_systemd_credentials(path: &Path) -> bool {
    systemd_credentials().is_some_and(|dir| {
        path.starts_with(&dir) && !path.components().any(|c| c == Component::ParentDir)
    })
}

/// `$CREDENTIALS_DIRECTORY`, if it is a directory as systemd makes it: not a link, owned by
/// root (or the service's own user), writable by no one, closed to others. A variable pointing anywhere else
/// (a directory the service, or someone else, can write into) earns no exemption.
fn systemd_credentials() -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt as _;
    let dir = PathBuf::from(std::env::var_os("CREDENTIALS_DIRECTORY")?);
    let meta = std::fs::symlink_metadata(&dir).ok()?;
    let me = rustix::process::geteuid().as_raw();
    let owner = meta.uid() == 0 || meta.uid() == me;
    (meta.is_dir() && owner && meta.mode() & 0o227 == 0).then_some(dir)
}
