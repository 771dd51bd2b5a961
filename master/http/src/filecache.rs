//! `GET /filecache/{sha1}`: the master's file cache ([`master::filecache`]) served to workers.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderName, header};
use axum::response::{IntoResponse, Response};
use master::server::Master;

use crate::ApiError;

/// The route [`serve`] answers; the protocol's [`kiln_protocol::FILECACHE_PATH`] followed by
/// the name.
pub const ROUTE: &str = "/filecache/{sha1}";

/// The response header that carries the file's SHA-256, so a worker can tell a replaced file
/// from a broken transfer.
pub const SHA256_HEADER: HeaderName = HeaderName::from_static("x-kiln-sha256");

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
    if !kiln_protocol::is_sha1(sha1) {
        return Err(ApiError::BadRequest(format!(
            "{sha1:?} is not a file name; files are named by their SHA-1, 40 lowercase hex digits"
        )));
    }
    let mut conn = master.db.pool().acquire().await?;
    let (sha256, content) = kiln_db::get_file(&mut conn, sha1).await?.ok_or_else(|| {
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
    use master::filecache::{digests, store};
    use serde_json::Value;

    use super::*;

    #[test]
    fn the_route_is_the_protocols_path() {
        assert_eq!(ROUTE, format!("{}{{sha1}}", kiln_protocol::FILECACHE_PATH));
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
        let config = kiln_config::parse("[master]\nname = \"m1\"\n", &origin).unwrap();
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
        // A name the master does not hold (collisions are refused by `store`, tested beside it).
        let one_sha1 = digests(b"never stored").unwrap().sha1;
        assert_eq!(kiln_db::get_file(&mut conn, &one_sha1).await.unwrap(), None);
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
