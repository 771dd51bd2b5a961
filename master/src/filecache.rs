//! The master's file cache: uploaded modules stored by content, named by SHA-1 and verified by
//! SHA-256 and size, and served to workers at `GET /filecache/{sha1}`.
//!
//! SHA-1 names files because that is what the protocol carries; it is safe only because content
//! showing a SHA-1 collision attack pattern (SHAttered, SHAmbles) is refused before it is named
//! ([`digests`]), and because workers verify every file by its SHA-256 as well.

use std::sync::Arc;

use anyhow::Context;
use axum::extract::{Path, State};
use axum::http::{HeaderName, header};
use axum::response::{IntoResponse, Response};
use sha2::Digest;

use crate::api::ApiError;
use crate::db;
use crate::server::Master;

/// The route [`serve`] answers; the protocol's [`runtime::protocol::FILECACHE_PATH`] followed by
/// the name.
pub const ROUTE: &str = "/filecache/{sha1}";

/// The response header that carries the file's SHA-256, so a worker can tell a replaced file
/// from a broken transfer.
pub const SHA256_HEADER: HeaderName = HeaderName::from_static("x-kiln-sha256");

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

/// `GET /filecache/{sha1}`: the file's bytes (`application/octet-stream`, with its SHA-256 in
/// `x-kiln-sha256`); 400 for a name that is not a SHA-1, 404 for a file the master does not
/// have, both with a JSON `{"error": ...}`.
pub async fn serve(State(master): State<Arc<Master>>, Path(sha1): Path<String>) -> Response {
    match file(&master, &sha1).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

async fn file(master: &Master, sha1: &str) -> Result<Response, ApiError> {
    if !runtime::protocol::is_sha1(sha1) {
        return Err(ApiError::BadRequest(format!(
            "{sha1:?} is not a file name; files are named by their SHA-1, 40 lowercase hex digits"
        )));
    }
    let mut conn = master.db.pool().acquire().await?;
    let (sha256, content) = db::get_file(&mut conn, sha1).await?.ok_or_else(|| {
        ApiError::NotFound(format!(
            "the master has no file {sha1}; upload the module again"
        ))
    })?;
    drop(conn);
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, content.len().to_string()),
            (SHA256_HEADER, sha256),
        ],
        content,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;
    use serde_json::Value;

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

    #[test]
    fn the_route_is_the_protocols_path() {
        assert_eq!(
            ROUTE,
            format!("{}{{sha1}}", runtime::protocol::FILECACHE_PATH)
        );
    }

    async fn body(response: Response) -> Vec<u8> {
        axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap()
            .to_vec()
    }

    async fn json_error(response: Response) -> String {
        let v: Value = serde_json::from_slice(&body(response).await).unwrap();
        v["error"].as_str().unwrap().to_owned()
    }

    #[tokio::test]
    async fn stored_files_are_served_by_sha1() {
        let dir = tempfile::tempdir().unwrap();
        let origin = dir.path().join("kiln.toml");
        let config = crate::config::parse("[master]\nname = \"m1\"\n", &origin).unwrap();
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("kiln.sqlite").display()
        );
        let master = Master::start(config, Some(&url)).await.unwrap();
        let get = |name: &str| serve(State(master.clone()), Path(name.to_owned()));

        let content = b"\0asm a module".to_vec();
        let mut conn = master.db.pool().acquire().await.unwrap();
        let stored = store(&mut conn, &content, 1).await.unwrap().unwrap();
        assert_eq!(stored, digests(&content).unwrap());
        // Again: the same content is fine.
        assert_eq!(
            store(&mut conn, &content, 2).await.unwrap(),
            Ok(stored.clone())
        );
        // A collision is refused and nothing is stored.
        let [one, _] = shattered();
        assert_eq!(
            store(&mut conn, &one, 3).await.unwrap(),
            Err(CollisionError)
        );
        let one_sha1 = plain_sha1(&one);
        assert_eq!(db::get_file(&mut conn, &one_sha1).await.unwrap(), None);
        drop(conn);

        let response = get(&stored.sha1).await;
        assert_eq!(response.status(), StatusCode::OK);
        let headers = response.headers().clone();
        assert_eq!(headers[header::CONTENT_TYPE], "application/octet-stream");
        assert_eq!(headers[header::CONTENT_LENGTH], content.len().to_string());
        assert_eq!(headers[SHA256_HEADER], stored.sha256);
        assert_eq!(body(response).await, content);

        let response = get(&one_sha1).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        let error = json_error(response).await;
        assert!(error.contains(&one_sha1), "{error}");

        for bad in [
            stored.sha1.to_uppercase(),
            stored.sha1[1..].to_owned(),
            "..".to_owned(),
        ] {
            let response = get(&bad).await;
            assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{bad:?}");
            let error = json_error(response).await;
            assert!(error.contains("40 lowercase hex digits"), "{error}");
        }
    }
}
