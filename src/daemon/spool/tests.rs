use super::*;
use crate::policy::claims::Kind;

fn renewal(id: i64) -> Write {
    Write::Row {
        id,
        expected: KeyText::from_bytes(vec![0xff, b'a']),
        at: 7,
        change: Change::Renew {
            key: KeyText::new("new.key.text"),
            facts: KeyFacts {
                kind: Kind::Purchase,
                client_id: "app".into(),
                user_id: None,
                issued_at: 1,
                expires_at: 2,
            },
            next_at: 3,
        },
        event: None,
    }
}

#[test]
fn entries_round_trip_and_a_torn_line_is_skipped() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::for_process(dir.path());
    spool.append(&renewal(1)).unwrap();
    spool.append(&renewal(2)).unwrap();
    let mode = std::fs::metadata(spool.path())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // A crash in the middle of an append.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(spool.path())
        .unwrap();
    f.write_all(b"\n{\"id\":3,\"expec").unwrap();
    drop(f);
    // And an entry after it, as a later run would append.
    spool.append(&renewal(4)).unwrap();
    let (writes, skipped) = spool.read().unwrap();
    assert_eq!(skipped, 1);
    assert_eq!(writes.len(), 3);
    assert_eq!(
        writes[2].key_id(),
        4,
        "the entry after the torn one is whole"
    );
    let Write::Row {
        id,
        expected,
        change,
        ..
    } = &writes[1]
    else {
        panic!("not a row write")
    };
    assert_eq!(*id, 2);
    assert_eq!(
        expected.cas_bytes(),
        &[0xff, b'a'],
        "the key's bytes, not a lossy rendering"
    );
    assert!(matches!(change, Change::Renew { key, .. } if key.expose() == "new.key.text"));
    assert!(
        Spool::orphans(dir.path()).unwrap().is_empty(),
        "a spool whose owner holds it is nobody's orphan"
    );
    spool.clear().unwrap();
    assert!(!spool.path().exists());
}

/// A full disk fails the first append: the file it created goes with it, not left empty
/// (and locked) while the process lives; a failed append after an entry keeps the entry.
#[test]
fn a_failed_append_leaves_no_empty_spool_and_keeps_what_it_holds() {
    let dir = tempfile::tempdir().unwrap();
    let full = |file: &mut std::fs::File, line: &[u8]| {
        file.write_all(&line[..line.len() / 2])?;
        Err(std::io::Error::from(std::io::ErrorKind::StorageFull))
    };
    let spool = Spool::for_process(dir.path());
    assert!(spool.append_with(&renewal(1), full).is_err());
    let left: Vec<_> = std::fs::read_dir(dir.path().join(DIR))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    spool.append(&renewal(2)).unwrap();
    assert!(spool.append_with(&renewal(3), full).is_err());
    let (writes, skipped) = spool.read().unwrap();
    assert_eq!((writes.len(), skipped), (1, 0));
    assert_eq!(writes[0].key_id(), 2);
    assert!(
        Spool::orphans(dir.path()).unwrap().is_empty(),
        "still its owner's"
    );
}

#[test]
fn a_spool_is_an_orphan_once_its_owner_lets_go() {
    let dir = tempfile::tempdir().unwrap();
    let owner = Spool::for_process(dir.path());
    owner.append(&renewal(1)).unwrap();
    std::fs::write(dir.path().join("other.spool"), "").unwrap();
    assert!(Spool::orphans(dir.path()).unwrap().is_empty());
    // The owner dies: its handle, and so its lock, goes.
    let path = owner.path().to_owned();
    drop(owner);
    let orphans = Spool::orphans(dir.path()).unwrap();
    assert_eq!(orphans.len(), 1);
    assert_eq!(orphans[0].path(), path);
    assert_eq!(orphans[0].read().unwrap().0.len(), 1);
}

/// A member of the state directory's group can put anything there: only files storekeyd
/// wrote are taken, at once (no FIFO waited on, no `/dev/zero` read), and a spool an earlier
/// version left beside the database is still applied.
#[test]
fn only_a_spool_storekeyd_wrote_is_taken() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let own = Spool::for_process(dir.path());
    own.append(&renewal(1)).unwrap();
    let own_path = own.path().to_owned();
    drop(own);
    let spools = dir.path().join(DIR);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode(&spools),
        0o700,
        "the spools' directory is the service's alone"
    );
    // What an earlier version left beside the database: taken.
    let legacy = dir.path().join("storekeyd-1-00000000.spool");
    std::fs::copy(&own_path, &legacy).unwrap();
    std::fs::set_permissions(&legacy, std::fs::Permissions::from_mode(0o600)).unwrap();
    // Planted: a FIFO, a link to /dev/zero, a file others may read, a long line.
    // Not the mkfifo command: a fork while another test holds a spool would hold its lock.
    rustix::fs::mknodat(
        rustix::fs::CWD,
        spools.join("storekeyd-2-fifo.spool"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    std::os::unix::fs::symlink("/dev/zero", dir.path().join("storekeyd-3-zero.spool")).unwrap();
    let open = dir.path().join("storekeyd-4-open.spool");
    std::fs::copy(&own_path, &open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    let long = spools.join("storekeyd-5-long.spool");
    let mut text = "x".repeat(files::MAX_LINE * 3);
    text.push_str(&std::fs::read_to_string(&own_path).unwrap());
    std::fs::write(&long, text).unwrap();
    std::fs::set_permissions(&long, std::fs::Permissions::from_mode(0o600)).unwrap();

    if rustix::process::geteuid().is_root() {
        // Another user's file, mode 0600 and all.
        let foreign = spools.join("storekeyd-6-foreign.spool");
        std::fs::copy(legacy.clone(), &foreign).unwrap();
        std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).unwrap();
    }

    let orphans = Spool::orphans(dir.path()).unwrap();
    let mut taken: Vec<_> = orphans.iter().map(|s| s.path().to_owned()).collect();
    taken.sort();
    let mut expected = vec![own_path, legacy, long];
    expected.sort();
    assert_eq!(taken, expected);
    for spool in &orphans {
        let (writes, skipped) = spool.read().unwrap();
        assert_eq!(writes.len(), 1, "{}", spool.path().display());
        let long_line = spool.path().ends_with("storekeyd-5-long.spool");
        assert_eq!(
            skipped,
            usize::from(long_line),
            "{}",
            spool.path().display()
        );
    }
}

#[test]
fn the_spools_directory_is_closed_if_open_and_refused_if_not_ours() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let spools = dir.path().join(DIR);
    std::fs::create_dir(&spools).unwrap();
    std::fs::set_permissions(&spools, std::fs::Permissions::from_mode(0o2770)).unwrap();
    Spool::for_process(dir.path()).append(&renewal(1)).unwrap();
    let mode = std::fs::metadata(&spools).unwrap().permissions().mode();
    assert_eq!(mode & 0o7777, 0o700);

    let other = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(elsewhere.path(), other.path().join(DIR)).unwrap();
    let e = Spool::for_process(other.path())
        .append(&renewal(1))
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("must be a directory of the service's own user"),
        "{e}"
    );
    assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 0);
}
