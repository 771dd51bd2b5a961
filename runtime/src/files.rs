//! Safe access to files of the workdir on the guest's behalf. The host never follows or creates
//! symlinks for a guest: every open resolves beneath the workdir with `openat2`
//! (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`), so `..`, absolute paths and symlinks cannot leave
//! it, and files are replaced by rename rather than written through.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use rustix::fs::{Mode, OFlags, ResolveFlags};

/// Checks that a guest-supplied path is relative, non-empty, and has no `..` or `.` tricks.
pub fn check_relative(path: &str) -> Result<&Path, String> {
    if path.is_empty() {
        return Err("path is empty".into());
    }
    if path.contains('\0') {
        return Err(format!("path {path:?} contains a NUL byte"));
    }
    let p = Path::new(path);
    for c in p.components() {
        match c {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => return Err(format!("path {path:?} leaves the workdir (`..`)")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!(
                    "path {path:?} is absolute; paths are relative to the workdir"
                ));
            }
        }
    }
    Ok(p)
}

fn resolve_flags() -> ResolveFlags {
    ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS
}

fn describe(err: rustix::io::Errno, path: &Path) -> String {
    match err {
        rustix::io::Errno::LOOP | rustix::io::Errno::XDEV => {
            format!(
                "{} is or passes through a symlink, which Kiln never follows",
                path.display()
            )
        }
        rustix::io::Errno::NOENT => format!("{} does not exist", path.display()),
        other => format!("{}: {}", path.display(), io::Error::from(other)),
    }
}

/// Opens the workdir itself, for resolving paths beneath it.
pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        path,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Opens a regular file beneath `root` for reading.
pub fn open_read(root: impl AsFd, rel: &Path) -> Result<File, String> {
    let fd = rustix::fs::openat2(
        root,
        rel,
        OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NONBLOCK,
        Mode::empty(),
        resolve_flags(),
    )
    .map_err(|e| describe(e, rel))?;
    let file = File::from(fd);
    let meta = file
        .metadata()
        .map_err(|e| format!("{}: {e}", rel.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", rel.display()));
    }
    Ok(file)
}

/// Checks that `rel` is an existing directory beneath `root` reached without symlinks.
pub fn check_dir(root: impl AsFd, rel: &Path) -> Result<(), String> {
    rustix::fs::openat2(
        root,
        rel,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        resolve_flags(),
    )
    .map(drop)
    .map_err(|e| match e {
        rustix::io::Errno::NOTDIR => format!("{} is not a directory", rel.display()),
        e => describe(e, rel),
    })
}

/// Writes a new regular file at `rel` beneath `root` from `fill`, creating missing parent
/// directories. The data goes to a temporary file in the same directory that is then renamed
/// over `rel`, so an existing symlink at `rel` is replaced, never written through.
pub fn write_replacing<T>(
    root: impl AsFd,
    rel: &Path,
    fill: impl FnOnce(&mut File) -> Result<T, String>,
) -> Result<T, String> {
    let root = root.as_fd();
    let name = rel
        .file_name()
        .ok_or_else(|| format!("{} names no file", rel.display()))?;
    let parent = rel.parent().filter(|p| !p.as_os_str().is_empty());
    let dir: OwnedFd = match parent {
        None => rustix::fs::openat2(
            root,
            ".",
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            resolve_flags(),
        )
        .map_err(|e| describe(e, rel))?,
        Some(parent) => make_dirs(root, parent)?,
    };
    let tmp = format!(".kiln-tmp-{}-{}", std::process::id(), unique());
    let fd = rustix::fs::openat(
        &dir,
        tmp.as_str(),
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::from_raw_mode(0o644),
    )
    .map_err(|e| describe(e, rel))?;
    let mut file = File::from(fd);
    let result = fill(&mut file);
    let result = result.and_then(|v| {
        rustix::fs::renameat(&dir, tmp.as_str(), &dir, name).map_err(|e| describe(e, rel))?;
        Ok(v)
    });
    if result.is_err() {
        let _ = rustix::fs::unlinkat(&dir, tmp.as_str(), rustix::fs::AtFlags::empty());
    }
    result
}

fn make_dirs(root: impl AsFd, rel: &Path) -> Result<OwnedFd, String> {
    let mut dir = rustix::fs::openat2(
        root,
        ".",
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        resolve_flags(),
    )
    .map_err(|e| describe(e, rel))?;
    for part in rel.components() {
        let Component::Normal(part) = part else {
            continue;
        };
        match rustix::fs::mkdirat(&dir, part, Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(describe(e, rel)),
        }
        dir = rustix::fs::openat2(
            &dir,
            part,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            resolve_flags(),
        )
        .map_err(|e| match e {
            rustix::io::Errno::NOTDIR => format!("{} is not a directory", rel.display()),
            e => describe(e, rel),
        })?;
    }
    Ok(dir)
}

/// Writes the directory `rel` beneath `root` as a tar stream: regular files with their mode and
/// mtime, directories, and symlinks stored as links (never followed); other file types are
/// skipped. Entries are sorted, so the same tree gives the same stream. Returns the number of
/// entries.
pub fn pack_directory(root: impl AsFd, rel: &Path, out: &mut dyn io::Write) -> Result<u64, String> {
    let dir = rustix::fs::openat2(
        root,
        rel,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        resolve_flags(),
    )
    .map_err(|e| match e {
        rustix::io::Errno::NOTDIR => format!("{} is not a directory", rel.display()),
        e => describe(e, rel),
    })?;
    let mut tar = tar::Builder::new(out);
    tar.follow_symlinks(false);
    let mut count = 0;
    pack_into(&mut tar, dir, Path::new(""), &mut count)?;
    tar.finish()
        .map_err(|e| format!("writing the tar stream: {e}"))?;
    Ok(count)
}

fn pack_into(
    tar: &mut tar::Builder<&mut dyn io::Write>,
    dir: OwnedFd,
    prefix: &Path,
    count: &mut u64,
) -> Result<(), String> {
    use rustix::fs::{AtFlags, FileType};
    let mut names: Vec<std::ffi::OsString> = Vec::new();
    let listing =
        rustix::fs::Dir::read_from(&dir).map_err(|e| format!("{}: {e}", prefix.display()))?;
    for entry in listing {
        let entry = entry.map_err(|e| format!("{}: {e}", prefix.display()))?;
        let name = std::ffi::OsStr::from_bytes(entry.file_name().to_bytes());
        if name != "." && name != ".." {
            names.push(name.to_owned());
        }
    }
    names.sort();
    for name in names {
        let path = prefix.join(&name);
        let st = rustix::fs::statat(&dir, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let mut header = tar::Header::new_gnu();
        header.set_mode(st.st_mode & 0o7777);
        header.set_mtime(u64::try_from(st.st_mtime).unwrap_or(0));
        let io_err = |e: io::Error| format!("{}: {e}", path.display());
        match FileType::from_raw_mode(st.st_mode) {
            FileType::RegularFile => {
                let fd = rustix::fs::openat(
                    &dir,
                    name.as_os_str(),
                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| format!("{}: {e}", path.display()))?;
                header.set_entry_type(tar::EntryType::Regular);
                header.set_size(u64::try_from(st.st_size).unwrap_or(0));
                tar.append_data(&mut header, &path, File::from(fd))
                    .map_err(io_err)?;
            }
            FileType::Directory => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_size(0);
                tar.append_data(&mut header, &path, io::empty())
                    .map_err(io_err)?;
                let sub = rustix::fs::openat(
                    &dir,
                    name.as_os_str(),
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| format!("{}: {e}", path.display()))?;
                pack_into(tar, sub, &path, count)?;
            }
            FileType::Symlink => {
                let target = rustix::fs::readlinkat(&dir, name.as_os_str(), Vec::new())
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_size(0);
                let target = std::ffi::OsStr::from_bytes(target.to_bytes()).to_owned();
                tar.append_link(&mut header, &path, target)
                    .map_err(io_err)?;
            }
            // Sockets, FIFOs and devices have no place in an artifact.
            _ => continue,
        }
        *count += 1;
    }
    Ok(())
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    #[test]
    fn relative_paths_only() {
        assert!(check_relative("a/b.txt").is_ok());
        assert!(check_relative("./a").is_ok());
        assert_eq!(
            check_relative("../x").unwrap_err(),
            "path \"../x\" leaves the workdir (`..`)"
        );
        assert!(
            check_relative("/etc/passwd")
                .unwrap_err()
                .contains("absolute")
        );
        assert!(check_relative("").is_err());
    }

    #[test]
    fn symlinks_are_never_followed_or_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "top secret").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("link")).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("dirlink")).unwrap();
        let root = open_dir(dir.path()).unwrap();

        let err = open_read(&root, Path::new("link")).unwrap_err();
        assert_eq!(
            err,
            "link is or passes through a symlink, which Kiln never follows"
        );
        assert!(open_read(&root, Path::new("dirlink/secret")).is_err());
        assert!(write_replacing(&root, Path::new("dirlink/new"), |_| Ok(())).is_err());

        // Writing at a symlink's path replaces the link; the target is untouched.
        write_replacing(&root, Path::new("link"), |f| {
            f.write_all(b"mine").map_err(|e| e.to_string())
        })
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(outside.path().join("secret")).unwrap(),
            "top secret"
        );
        let mut s = String::new();
        open_read(&root, Path::new("link"))
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "mine");

        write_replacing(&root, Path::new("deep/er/file"), |f| {
            f.write_all(b"x").map_err(|e| e.to_string())
        })
        .unwrap();
        assert!(dir.path().join("deep/er/file").is_file());
        check_dir(&root, Path::new("deep/er")).unwrap();
        assert_eq!(
            check_dir(&root, Path::new("deep/er/file")).unwrap_err(),
            "deep/er/file is not a directory"
        );
    }

    #[test]
    fn directories_pack_as_tar_without_following_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.txt"), "A").unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/b.txt"), "BB").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("link")).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("sub/dirlink")).unwrap();
        let root = open_dir(dir.path()).unwrap();

        let mut stream = Vec::new();
        assert_eq!(
            pack_directory(&root, Path::new("."), &mut stream).unwrap(),
            5
        );
        let mut archive = tar::Archive::new(&stream[..]);
        let mut seen = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let mut body = String::new();
            entry.read_to_string(&mut body).unwrap();
            let link = entry
                .link_name()
                .unwrap()
                .map(|l| l.display().to_string())
                .unwrap_or_default();
            seen.push(format!(
                "{} {:?} {body}{link}",
                entry.path().unwrap().display(),
                entry.header().entry_type()
            ));
        }
        let outside = outside.path().display();
        assert_eq!(
            seen,
            [
                "a.txt Regular A".to_owned(),
                "link Symlink /etc/passwd".to_owned(),
                "sub Directory ".to_owned(),
                "sub/b.txt Regular BB".to_owned(),
                format!("sub/dirlink Symlink {outside}"),
            ]
        );
        let err = pack_directory(&root, Path::new("sub/dirlink"), &mut Vec::new()).unwrap_err();
        assert_eq!(
            err,
            "sub/dirlink is or passes through a symlink, which Kiln never follows"
        );
    }
}
