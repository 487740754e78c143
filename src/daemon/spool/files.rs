//! The spool's files on disk: its private directory, the checks a file must pass before it is
//! read, and a reader that holds a batch of entries at a time with bounded lines.

use std::path::Path;

use super::{Entry, SpoolError, write};
use crate::storage::Write;

/// An entry is a key (at most 16 KiB), its claims and an event: a longer line is no entry.
pub(super) const MAX_LINE: usize = 256 * 1024;
/// Far past any outage's spool (about 4 KiB a renewal): a larger file is refused, not read.
pub(super) const MAX_FILE: u64 = 16 << 30;

/// Reads a spool's entries a batch at a time.
pub(super) struct Reader {
    pub(super) path: String,
    pub(super) lines: std::io::BufReader<std::io::Take<std::fs::File>>,
}

impl Reader {
    /// Up to `n` entries, and how many lines were skipped: a line that does not parse (cut short
    /// by a crash: its append never returned, so nobody took it as written) or is too long to be
    /// an entry. Empty at the end of the file.
    pub(super) fn next_batch(&mut self, n: usize) -> Result<(Vec<Write>, usize), SpoolError> {
        let (mut writes, mut skipped) = (Vec::new(), 0);
        while writes.len() < n {
            let Some(line) = self.next_line()? else {
                break;
            };
            match line {
                Some(line) if line.iter().all(u8::is_ascii_whitespace) => {}
                Some(line) => match serde_json::from_slice::<Entry>(&line)
                    .map_err(|e| e.to_string())
                    .and_then(write)
                {
                    Ok(w) => writes.push(w),
                    Err(_) => skipped += 1,
                },
                None => skipped += 1,
            }
        }
        Ok((writes, skipped))
    }

    /// The next line without its newline (`None` inside: too long, and skipped to its end), or
    /// `None` at the end of the file.
    fn next_line(&mut self) -> Result<Option<Option<Vec<u8>>>, SpoolError> {
        use std::io::{BufRead as _, Read as _};
        let failed = |source| SpoolError::Io {
            path: self.path.clone(),
            source,
        };
        let mut line = Vec::new();
        let read = (&mut self.lines)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(failed)?;
        if read == 0 {
            return Ok(None);
        }
        if line.last() == Some(&b'\n') {
            line.pop();
            return Ok(Some(Some(line)));
        }
        if line.len() <= MAX_LINE {
            return Ok(Some(Some(line)));
        }
        // Too long: drop the rest of it, a buffer at a time.
        loop {
            let buf = self.lines.fill_buf().map_err(failed)?;
            if buf.is_empty() {
                return Ok(Some(None));
            }
            match buf.iter().position(|&b| b == b'\n') {
                Some(at) => {
                    self.lines.consume(at + 1);
                    return Ok(Some(None));
                }
                None => {
                    let len = buf.len();
                    self.lines.consume(len);
                }
            }
        }
    }
}

/// Opens a spool only if it is one storekeyd wrote: never through a link, never blocking on a
/// FIFO, and then only a regular file of this process's user, mode 0600 or stricter, under
/// [`MAX_FILE`] bytes. `lock` opens it for appending too, which a lock needs on some systems.
pub(super) fn open_checked(path: &Path, lock: bool) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
    let flags = rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .append(lock)
        .custom_flags(i32::try_from(flags.bits()).unwrap_or(0))
        .open(path)?;
    let meta = file.metadata()?;
    let refuse = |why: String| Err(std::io::Error::new(std::io::ErrorKind::InvalidData, why));
    if !meta.file_type().is_file() {
        return refuse("not a regular file".to_owned());
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return refuse(format!(
            "owned by uid {}, not the service's {me}",
            meta.uid()
        ));
    }
    if meta.mode() & 0o077 != 0 {
        return refuse(format!("mode {:o}, not 0600", meta.mode() & 0o777));
    }
    if meta.len() > MAX_FILE {
        return refuse(format!("{} bytes, more than a spool can be", meta.len()));
    }
    Ok(file)
}

/// Creates `dir` mode 0700, or checks that it is a directory of this process's user that no one
/// else may enter (closing it if it is ours but open).
pub(super) fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => return sync_dir(dir),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = std::fs::symlink_metadata(dir)?;
    let me = rustix::process::geteuid().as_raw();
    if !meta.is_dir() || meta.uid() != me {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "`{}` must be a directory of the service's own user (uid {me}); remove it",
                dir.display()
            ),
        ));
    }
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

pub(super) fn sync_dir(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => std::fs::File::open(dir)?.sync_all(),
        _ => Ok(()),
    }
}
