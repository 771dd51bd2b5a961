//! The web UI: one HTML page, a stylesheet and plain JavaScript modules from `master/http/ui/`,
//! embedded in the binary and served next to the API. `/` is the page, revalidated by its
//! ETag; the assets live under `/ui/<version>/`, where the version is a hash of them all, so a
//! browser keeps them for good and a new master is a new URL. Every answer carries a strict
//! Content-Security-Policy: scripts, styles and connections only from the master, no inline
//! script, and Trusted Types, so no string the page handles can ever become HTML.

use std::sync::{Arc, LazyLock};

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sha2::{Digest, Sha256};

use master::server::Master;

/// The policy of every UI answer. `require-trusted-types-for 'script'` with no policy allowed
/// makes the browser refuse any string assigned to `innerHTML` and the like: the UI builds its
/// pages from elements and text nodes only, and this keeps it so.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; \
     form-action 'self'; frame-ancestors 'none'; require-trusted-types-for 'script'; \
     trusted-types 'none'";

/// The path under which the assets are served, followed by the version.
const ASSET_PREFIX: &str = "/ui";

/// How long a browser keeps a versioned asset: a year, the conventional "forever".
const IMMUTABLE: &str = "public, max-age=31536000, immutable";

/// One embedded file of `master/http/ui/`.
struct Asset {
    /// Its path under `master/http/ui/` and under `/ui/<version>/`.
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const SVG: &str = "image/svg+xml";

macro_rules! assets {
    ($($path:literal => $content_type:expr,)*) => {
        &[$(Asset {
            path: $path,
            content_type: $content_type,
            body: include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/ui/", $path)),
        },)*]
    };
}

/// Every file of `master/http/ui/` but the page itself (a test checks that none is missing).
static ASSETS: &[Asset] = assets! {
    "app.js" => JS,
    "api.js" => JS,
    "dom.js" => JS,
    "format.js" => JS,
    "events.js" => JS,
    "page.js" => JS,
    "ansi.js" => JS,
    "logview.js" => JS,
    "pages/builders.js" => JS,
    "pages/grid.js" => JS,
    "pages/builds.js" => JS,
    "pages/build.js" => JS,
    "pages/queue.js" => JS,
    "pages/workers.js" => JS,
    "pages/force.js" => JS,
    "pages/modules.js" => JS,
    "pages/reporters.js" => JS,
    "style.css" => CSS,
    "favicon.svg" => SVG,
};

/// The page, with `{{assets}}` standing for the versioned asset path.
const INDEX: &str = include_str!("../ui/index.html");

/// What is computed once: the version, the page pointing at it, and the ETags.
struct Built {
    version: String,
    index: String,
    index_etag: String,
    etags: Vec<String>,
}

static BUILT: LazyLock<Built> = LazyLock::new(|| {
    let mut all = Sha256::new();
    let etags = ASSETS
        .iter()
        .map(|a| {
            all.update(a.path.as_bytes());
            all.update([0]);
            all.update(a.body);
            etag(a.body)
        })
        .collect();
    let version = hex::encode(&all.finalize()[..6]);
    let index = INDEX.replace("{{assets}}", &format!("{}/{version}", &ASSET_PREFIX[1..]));
    Built {
        index_etag: etag(index.as_bytes()),
        version,
        index,
        etags,
    }
});

/// A strong ETag: the start of the content's SHA-256.
fn etag(body: &[u8]) -> String {
    format!("\"{}\"", hex::encode(&Sha256::digest(body)[..8]))
}

/// Whether an `If-None-Match` header names `etag` (weak or strong, in a list, or `*`).
fn etag_matches(if_none_match: &str, etag: &str) -> bool {
    if_none_match
        .split(',')
        .map(|t| t.trim())
        .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == etag)
}

/// The UI's routes; merged into the API's router.
pub fn router() -> Router<Arc<Master>> {
    Router::new()
        .route("/", get(index))
        .route(&format!("{ASSET_PREFIX}/{{version}}/{{*path}}"), get(asset))
}

/// The headers every UI answer carries.
fn secured(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

/// A file, or 304 when the browser's copy (named by `If-None-Match`) is current.
fn file(
    request: &HeaderMap,
    etag: &str,
    cache_control: &'static str,
    content_type: &'static str,
    body: &'static [u8],
) -> Response {
    let fresh = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| etag_matches(v, etag));
    let headers = [
        (header::ETAG, etag.to_owned()),
        (header::CACHE_CONTROL, cache_control.to_owned()),
    ];
    let response = if fresh {
        (StatusCode::NOT_MODIFIED, headers).into_response()
    } else {
        (
            headers,
            [(header::CONTENT_TYPE, content_type.to_owned())],
            body,
        )
            .into_response()
    };
    secured(response)
}

/// `GET /`: the page. Revalidated on every visit (a 304 when unchanged), so a new master's
/// assets are picked up at once.
async fn index(request: HeaderMap) -> Response {
    let built = &*BUILT;
    file(
        &request,
        &built.index_etag,
        "no-cache",
        "text/html; charset=utf-8",
        built.index.as_bytes(),
    )
}

/// `GET /ui/{version}/{path}`: an asset of this master's version, cached for good. Another
/// version's asset is not served in its place: the browser would keep the wrong file forever.
async fn asset(Path((version, path)): Path<(String, String)>, request: HeaderMap) -> Response {
    let built = &*BUILT;
    let found = ASSETS.iter().position(|a| a.path == path);
    match found {
        Some(i) if version == built.version => {
            let a = &ASSETS[i];
            file(&request, &built.etags[i], IMMUTABLE, a.content_type, a.body)
        }
        _ => secured(
            (
                StatusCode::NOT_FOUND,
                [(header::CACHE_CONTROL, "no-store")],
                format!(
                    "no UI file {ASSET_PREFIX}/{version}/{path} on this master (its UI is version {}); reload the page",
                    built.version
                ),
            )
                .into_response(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_of_the_ui_directory_is_embedded() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("ui");
        let mut found = Vec::new();
        let mut dirs = vec![root.clone()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                } else {
                    let relative = path.strip_prefix(&root).unwrap();
                    found.push(relative.to_str().unwrap().replace('\\', "/"));
                }
            }
        }
        found.retain(|p| p != "index.html");
        found.sort();
        let mut embedded: Vec<&str> = ASSETS.iter().map(|a| a.path).collect();
        embedded.sort();
        assert_eq!(found, embedded);
    }

    #[test]
    fn every_module_imported_is_embedded_and_preloaded() {
        let paths: Vec<&str> = ASSETS.iter().map(|a| a.path).collect();
        for a in ASSETS.iter().filter(|a| a.path.ends_with(".js")) {
            let text = std::str::from_utf8(a.body).unwrap();
            let dir = a.path.rsplit_once('/').map_or("", |(d, _)| d);
            for import in text.lines().filter_map(|l| {
                l.strip_prefix("import ")
                    .and_then(|l| l.split_once(" from \""))
                    .and_then(|(_, rest)| rest.split_once('"'))
                    .map(|(target, _)| target)
            }) {
                let resolved = match (dir, import) {
                    (_, i) if i.starts_with("../") => i[3..].to_owned(),
                    ("", i) => i.trim_start_matches("./").to_owned(),
                    (d, i) => format!("{d}/{}", i.trim_start_matches("./")),
                };
                assert!(
                    paths.contains(&resolved.as_str()),
                    "{} imports {import}, which is not embedded",
                    a.path
                );
            }
            if a.path != "app.js" {
                let preload = format!(
                    "<link rel=\"modulepreload\" href=\"{{{{assets}}}}/{}\">",
                    a.path
                );
                assert!(
                    INDEX.contains(&preload),
                    "index.html does not preload {}",
                    a.path
                );
            }
        }
        for reference in INDEX.split("{{assets}}/").skip(1) {
            let path = reference.split('"').next().unwrap();
            assert!(
                paths.contains(&path),
                "index.html names {path}, which is not embedded"
            );
        }
    }

    #[test]
    fn the_page_points_at_this_version() {
        let built = &*BUILT;
        assert_eq!(built.version.len(), 12);
        assert!(!built.index.contains("{{"));
        assert!(
            built
                .index
                .contains(&format!("src=\"ui/{}/app.js\"", built.version))
        );
    }

    #[test]
    fn if_none_match_lists_and_weak_tags_match() {
        assert!(etag_matches("\"abc\"", "\"abc\""));
        assert!(etag_matches("W/\"abc\"", "\"abc\""));
        assert!(etag_matches("\"x\", \"abc\"", "\"abc\""));
        assert!(etag_matches("*", "\"abc\""));
        assert!(!etag_matches("\"abd\"", "\"abc\""));
        assert!(!etag_matches("", "\"abc\""));
    }
}
