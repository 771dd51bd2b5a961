//! The farm's file store as a step sees it: files uploaded from and downloaded to the workdir,
//! with their SHA-1 (the file cache's name) and SHA-256 (what is verified). Locally, and in
//! `kiln step run`, the store is a directory.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha1::Digest as _;

/// A stored file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    /// Its name in the store.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-1, lowercase hex.
    pub sha1: String,
    /// SHA-256, lowercase hex.
    pub sha256: String,
}

/// Why the store refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A name the store does not accept.
    #[error(
        "artifact name {0:?} is not valid: use letters, digits, '.', '_', '-' and '/' between parts"
    )]
    BadName(String),
    /// No such artifact.
    #[error("no artifact named {0:?}")]
    NotFound(String),
    /// Bigger than allowed.
    #[error("{what} is larger than the {limit}-byte limit")]
    TooLarge {
        /// What was too large.
        what: String,
        /// The limit.
        limit: u64,
    },
    /// The store could not read or write.
    #[error("file store: {0}")]
    Io(#[from] io::Error),
}

/// Where artifacts live.
pub trait ArtifactStore: Send + Sync {
    /// Stores the bytes of `src` under `name`, refusing more than `limit` bytes.
    fn put(&self, name: &str, src: &mut dyn Read, limit: u64) -> Result<Artifact, StoreError>;

    /// Opens the artifact `name` for reading, with its size.
    fn get(&self, name: &str) -> Result<(Box<dyn Read + Send>, u64), StoreError>;
}

/// Checks an artifact name: relative parts of `[A-Za-z0-9._-]`, separated by '/', no `.`/`..`.
pub fn check_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= 512
        && name.split('/').all(|part| {
            !part.is_empty()
                && part != "."
                && part != ".."
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        });
    if ok {
        Ok(())
    } else {
        Err(StoreError::BadName(name.to_owned()))
    }
}

/// Copies `src` to `dst`, at most `limit` bytes, hashing as it goes.
pub fn copy_hashing(
    src: &mut dyn Read,
    dst: &mut dyn Write,
    limit: u64,
    what: &str,
) -> Result<(u64, String, String), StoreError> {
    let mut sha1 = sha1::Sha1::new();
    let mut sha256 = sha2::Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut size = 0u64;
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        size += n as u64;
        if size > limit {
            return Err(StoreError::TooLarge {
                what: what.to_owned(),
                limit,
            });
        }
        sha1.update(&buf[..n]);
        sha256.update(&buf[..n]);
        dst.write_all(&buf[..n])?;
    }
    Ok((
        size,
        hex::encode(sha1.finalize()),
        hex::encode(sha256.finalize()),
    ))
}

/// A file store in a local directory.
#[derive(Debug, Clone)]
pub struct DirStore {
    root: PathBuf,
}

impl DirStore {
    /// A store in `root`, created when the first file is stored.
    pub fn new(root: impl Into<PathBuf>) -> io::Result<Self> {
        Ok(DirStore { root: root.into() })
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

impl ArtifactStore for DirStore {
    fn put(&self, name: &str, src: &mut dyn Read, limit: u64) -> Result<Artifact, StoreError> {
        check_name(name)?;
        let dest = self.root.join(name);
        let parent = dest.parent().expect("joined a name");
        std::fs::create_dir_all(parent)?;
        let mut tmp = tempfile::NamedTempFile::new_in(parent)?;
        let (size, sha1, sha256) = copy_hashing(src, tmp.as_file_mut(), limit, name)?;
        tmp.as_file().sync_data()?;
        tmp.persist(&dest).map_err(|e| e.error)?;
        Ok(Artifact {
            name: name.to_owned(),
            size,
            sha1,
            sha256,
        })
    }

    fn get(&self, name: &str) -> Result<(Box<dyn Read + Send>, u64), StoreError> {
        check_name(name)?;
        match File::open(self.root.join(name)) {
            Ok(f) => {
                let size = f.metadata()?.len();
                Ok((Box::new(f), size))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(StoreError::NotFound(name.to_owned()))
            }
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_name("dist/app-1.0.tar.gz").is_ok());
        for bad in ["", "../x", "a//b", "/abs", "a/./b", "sp ace", "a\\b"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn round_trip_with_known_digests() {
        let dir = tempfile::tempdir().unwrap();
        let store = DirStore::new(dir.path()).unwrap();
        let a = store.put("x/hello.txt", &mut &b"hello\n"[..], 100).unwrap();
        assert_eq!(a.size, 6);
        assert_eq!(a.sha1, "f572d396fae9206628714fb2ce00f72e94f2258f");
        assert_eq!(
            a.sha256,
            "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"
        );
        let (mut r, size) = store.get("x/hello.txt").unwrap();
        let mut s = String::new();
        r.read_to_string(&mut s).unwrap();
        assert_eq!((s.as_str(), size), ("hello\n", 6));
        assert!(matches!(
            store.put("big", &mut &[0u8; 10][..], 5),
            Err(StoreError::TooLarge { .. })
        ));
        assert!(!dir.path().join("big").exists());
        assert!(matches!(store.get("nope"), Err(StoreError::NotFound(_))));
    }
}
