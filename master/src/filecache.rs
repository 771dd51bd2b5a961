//! The master's file cache: uploaded modules stored by content, named by SHA-1 and verified by
//! SHA-256 and size, and served to workers at `GET /filecache/{sha1}` (by the HTTP layer).
//!
//! SHA-1 names files because that is what the protocol carries; it is safe only because content
//! showing a SHA-1 collision attack pattern (SHAttered, SHAmbles) is refused before it is named
//! ([`digests`]), and because workers verify every file by its SHA-256 as well.

use anyhow::Context;
use kiln_db as db;
use sha2::Digest;

/// A file's names and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digests {
    /// SHA-1 in lowercase hex: the file's name.
    pub sha1: String,
    /// SHA-256 in lowercase hex: what workers verify it against.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

/// The content carries a SHA-1 collision attack pattern, so another file may have its SHA-1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "refused: this file contains a SHA-1 collision attack pattern (like SHAttered); it cannot be \
     named by SHA-1 safely"
)]
pub struct CollisionError;

/// The digests of `bytes`, refusing content built to collide under SHA-1 (checked with the
/// collision detection of `sha1-checked`, as Git does).
pub fn digests(bytes: &[u8]) -> Result<Digests, CollisionError> {
    let sha1 = match sha1_checked::Sha1::try_digest(bytes) {
        sha1_checked::CollisionResult::Ok(hash) => hex::encode(hash),
        sha1_checked::CollisionResult::Mitigated(_)
        | sha1_checked::CollisionResult::Collision(_) => {
            return Err(CollisionError);
        }
    };
    Ok(Digests {
        sha1,
        sha256: hex::encode(sha2::Sha256::digest(bytes)),
        size: bytes.len() as u64,
    })
}

/// Stores `bytes` in the database under their SHA-1 (storing the same content twice is fine)
/// and returns their digests, or the collision refusal (nothing stored).
pub async fn store(
    conn: &mut sqlx::AnyConnection,
    bytes: &[u8],
    now: i64,
) -> anyhow::Result<Result<Digests, CollisionError>> {
    let digests = match digests(bytes) {
        Ok(d) => d,
        Err(e) => return Ok(Err(e)),
    };
    let inserted = db::insert_file(conn, &digests.sha1, &digests.sha256, bytes, now)
        .await
        .with_context(|| format!("storing file {}", digests.sha1))?;
    if !inserted {
        // Already there: make sure it is this content, not another under the same name (stored
        // before collisions were checked, or damaged since).
        let (sha256, _) = db::get_file(conn, &digests.sha1)
            .await
            .with_context(|| format!("reading file {}", digests.sha1))?
            .with_context(|| format!("file {} vanished while it was stored", digests.sha1))?;
        anyhow::ensure!(
            sha256 == digests.sha256,
            "file {}: the database already holds different content under this SHA-1 (SHA-256 {sha256}, \
             this upload's is {}); delete that row from the `files` table and upload again",
            digests.sha1,
            digests.sha256
        );
    }
    Ok(Ok(digests))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_of_ordinary_content() {
        assert_eq!(
            digests(b"hello world").unwrap(),
            Digests {
                sha1: "2aae6c35c94fcfb415dbe95f408b9ce91ee846ed".into(),
                sha256: "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9".into(),
                size: 11,
            }
        );
        assert_eq!(
            digests(b"").unwrap(),
            Digests {
                sha1: "da39a3ee5e6b4b0d3255bfef95601890afd80709".into(),
                sha256: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855".into(),
                size: 0,
            }
        );
    }

    // The first 320 bytes of shattered-1.pdf and shattered-2.pdf (https://shattered.io, also
    // in the tests of the sha1-checked crate): a PDF and JPEG header, then two different
    // 128-byte near-collision block pairs. The two prefixes have the same SHA-1, so every file
    // that starts with either does too.
    const COMMON: &str = concat!(
        "255044462d312e330a25e2e3cfd30a0a0a312030206f626a0a3c3c2f57696474",
        "682032203020522f4865696768742033203020522f547970652034203020522f",
        "537562747970652035203020522f46696c7465722036203020522f436f6c6f72",
        "53706163652037203020522f4c656e6774682038203020522f42697473506572",
        "436f6d706f6e656e7420383e3e0a73747265616d0affd8fffe00245348412d31",
        "20697320646561642121212121852fec092339759c39b1a1c63c4c97e1fffe01",
    );
    const BLOCKS_1: &str = concat!(
        "7346dc9166b67e118f029ab621b2560ff9ca67cca8c7f85ba84c79030c2b3de2",
        "18f86db3a90901d5df45c14f26fedfb3dc38e96ac22fe7bd728f0e45bce046d2",
        "3c570feb141398bb552ef5a0a82be331fea48037b8b5d71f0e332edf93ac3500",
        "eb4ddc0decc1a864790c782c76215660dd309791d06bd0af3f98cda4bc4629b1",
    );
    const BLOCKS_2: &str = concat!(
        "7f46dc93a6b67e013b029aaa1db2560b45ca67d688c7f84b8c4c791fe02b3df6",
        "14f86db1690901c56b45c1530afedfb76038e972722fe7ad728f0e4904e046c2",
        "30570fe9d41398abe12ef5bc942be33542a4802d98b5d70f2a332ec37fac3514",
        "e74ddc0f2cc1a874cd0c78305a21566461309789606bd0bf3f98cda8044629a1",
    );

    fn shattered() -> [Vec<u8>; 2] {
        [BLOCKS_1, BLOCKS_2].map(|blocks| hex::decode(format!("{COMMON}{blocks}")).unwrap())
    }

    /// SHA-1 without collision detection, as an attacker would compute it.
    fn plain_sha1(bytes: &[u8]) -> String {
        let mut h = sha1_checked::Sha1::builder()
            .detect_collision(false)
            .build();
        sha1_checked::Digest::update(&mut h, bytes);
        hex::encode(h.try_finalize().hash())
    }

    #[test]
    fn a_sha1_collision_is_refused() {
        let [one, two] = shattered();
        // The sample is a real collision: different content, one SHA-1.
        assert_ne!(one, two);
        assert_eq!(plain_sha1(&one), plain_sha1(&two));
        assert_eq!(plain_sha1(&one), "f92d74e3874587aaf443d1db961d4e26dde13e9c");
        for (i, bytes) in [one, two].iter().enumerate() {
            assert_eq!(digests(bytes), Err(CollisionError), "shattered-{}", i + 1);
            // Whatever follows the colliding blocks, the pattern is still there.
            let mut longer = bytes.clone();
            longer.extend_from_slice(b"\n%%EOF\n");
            assert_eq!(digests(&longer), Err(CollisionError), "shattered-{}", i + 1);
        }
        assert_eq!(
            CollisionError.to_string(),
            "refused: this file contains a SHA-1 collision attack pattern (like SHAttered); it \
             cannot be named by SHA-1 safely"
        );
    }
}
