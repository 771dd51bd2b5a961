//! Commit statuses (`github-status`, `gitlab-status`, `gitea-status`): `pending` when a build
//! starts, its result when it ends, for each revision it builds, linking to the build's page.
//!
//! - GitHub: `POST {base}/repos/{owner}/{repo}/statuses/{sha}` with `Authorization: Bearer`,
//!   body `{state, target_url, description, context}`; states pending, success, failure, error.
//! - Gitea and Forgejo: `POST {base}/api/v1/repos/{owner}/{repo}/statuses/{sha}` with
//!   `Authorization: token`, the same body; also the state `warning`.
//! - GitLab: `POST {base}/api/v4/projects/{id}/statuses/{sha}` (the id is the URL-encoded
//!   `namespace/project` path) with `PRIVATE-TOKEN`, body `{state, target_url, description,
//!   name}`; states pending, success, failed, canceled.

use serde_json::{Value, json};

use super::payload::{BuildReport, build_url};
use super::{DeliveryError, Event};
use kiln_config::Forge;
use kiln_db::model::Results;

/// Where statuses go.
#[derive(Debug)]
pub struct Target<'a> {
    /// Which forge's API.
    pub forge: Forge,
    /// The API's base URL.
    pub base_url: &'a str,
    /// The API token.
    pub token: &'a str,
    /// The status context (a template over the build's properties).
    pub context: &'a str,
}

/// What a delivery came to, when it did not fail.
#[derive(Debug, PartialEq, Eq)]
pub enum Sent {
    /// A status was posted for every revision.
    Posted,
    /// There was nothing to post (no revision, or no repository on this forge).
    Nothing(String),
}

/// The `owner/repo` path of a repository URL: `https://host/owner/repo(.git)`,
/// `ssh://git@host/owner/repo.git`, `git@host:owner/repo.git`. GitLab paths may nest groups.
pub fn repo_path(url: &str) -> Option<String> {
    let rest = if let Some((_, rest)) = url.split_once("://") {
        rest.split_once('/')?.1
    } else {
        // scp-like: [user@]host:path
        let (host, path) = url.split_once(':')?;
        if host.contains('/') {
            return None;
        }
        path
    };
    let path = rest
        .trim_matches('/')
        .trim_end_matches(".git")
        .trim_matches('/');
    let parts: Vec<&str> = path.split('/').collect();
    (parts.len() >= 2 && parts.iter().all(|p| !p.is_empty())).then(|| path.to_owned())
}

/// The forge's name for a state.
pub fn state_name(forge: Forge, event: Event, result: Option<Results>) -> &'static str {
    let result = match (event, result) {
        (Event::BuildFinished, Some(r)) => r,
        _ => return "pending",
    };
    match (forge, result) {
        (_, Results::Retry) => "pending",
        (Forge::Gitea, Results::Warnings) => "warning",
        (_, Results::Success | Results::Warnings | Results::Skipped) => "success",
        (Forge::GitLab, Results::Failure | Results::Exception) => "failed",
        (Forge::GitLab, Results::Cancelled) => "canceled",
        (_, Results::Failure) => "failure",
        (_, Results::Exception | Results::Cancelled) => "error",
    }
}

fn percent_encode_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The URL a status for `sha` of repository `path` is posted to.
pub fn status_url(forge: Forge, base: &str, path: &str, sha: &str) -> String {
    let base = base.trim_end_matches('/');
    match forge {
        Forge::GitLab => format!(
            "{base}/api/v4/projects/{}/statuses/{sha}",
            percent_encode_path(path)
        ),
        Forge::Gitea => format!("{base}/api/v1/repos/{path}/statuses/{sha}"),
        Forge::GitHub | Forge::Generic => format!("{base}/repos/{path}/statuses/{sha}"),
    }
}

/// The context with `%(prop:NAME)s` placeholders filled from the build's properties.
fn render_context(template: &str, build: &BuildReport) -> String {
    let mut props = runtime::Properties::new();
    for (name, value) in &build.properties {
        props.set(name.clone(), value.clone(), "build");
    }
    if props.get("buildername").is_none()
        && let Some(b) = build.build["builder"].as_str()
    {
        props.set("buildername", json!(b), "build");
    }
    match kiln_protocol::props::interpolate(&json!(template), &props, &Default::default()) {
        Ok(Value::String(s)) => s,
        // A context naming a property the build lacks still gets a status, under the
        // template's own text.
        _ => template.to_owned(),
    }
}

/// The body of one status.
pub fn body(
    forge: Forge,
    state: &str,
    target_url: &str,
    description: &str,
    context: &str,
) -> Value {
    match forge {
        Forge::GitLab => json!({
            "state": state,
            "target_url": target_url,
            "description": description,
            "name": context,
        }),
        _ => json!({
            "state": state,
            "target_url": target_url,
            "description": description,
            "context": context,
        }),
    }
}

/// Posts the build's status for each revision it builds.
pub async fn post(
    client: &reqwest::Client,
    target: &Target<'_>,
    event: Event,
    build: &BuildReport,
    master_url: &str,
) -> Result<Sent, DeliveryError> {
    let id = build.build["buildid"].as_i64().unwrap_or_default();
    let result = build.build["results"]
        .as_str()
        .and_then(|s| Results::ALL.iter().copied().find(|r| r.as_str() == s))
        .or_else(|| {
            build.build["results"]
                .as_i64()
                .and_then(kiln_db::model::results_from_code)
        });
    let state = state_name(target.forge, event, result);
    let builder = build.build["builder"].as_str().unwrap_or_default();
    let number = build.build["number"].as_i64().unwrap_or_default();
    let description = match (event, result) {
        (Event::BuildFinished, Some(r)) => format!("Build {builder} #{number}: {r}"),
        _ => format!("Build {builder} #{number} started"),
    };
    let context = render_context(target.context, build);
    let target_url = build_url(master_url, id);
    let mut posted = 0;
    for stamp in &build.sourcestamps {
        let Some(sha) = stamp.revision.as_deref().filter(|s| !s.is_empty()) else {
            continue;
        };
        let Some(path) = repo_path(&stamp.repository) else {
            continue;
        };
        let url = status_url(target.forge, target.base_url, &path, sha);
        let json = body(target.forge, state, &target_url, &description, &context);
        let request = client
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(json.to_string());
        let request = match target.forge {
            Forge::GitLab => request.header("PRIVATE-TOKEN", target.token),
            Forge::Gitea => request.header("Authorization", format!("token {}", target.token)),
            Forge::GitHub | Forge::Generic => request
                .header("Authorization", format!("Bearer {}", target.token))
                .header("Accept", "application/vnd.github+json"),
        };
        let response = request
            .send()
            .await
            .map_err(|e| DeliveryError::unreachable(&url, &e))?;
        super::check_status(&url, response).await?;
        posted += 1;
    }
    Ok(if posted > 0 {
        Sent::Posted
    } else {
        Sent::Nothing(
            "the build has no revision of a repository the forge knows (owner/repo)".to_owned(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_paths() {
        assert_eq!(
            repo_path("https://github.com/kiln/farm.git").as_deref(),
            Some("kiln/farm")
        );
        assert_eq!(
            repo_path("git@gitlab.com:group/sub/proj.git").as_deref(),
            Some("group/sub/proj")
        );
        assert_eq!(repo_path("ssh://git@host:2222/o/r").as_deref(), Some("o/r"));
        assert_eq!(repo_path("/srv/git/repo"), None);
        assert_eq!(repo_path("https://host/only"), None);
    }

    #[test]
    fn urls_and_states() {
        assert_eq!(
            status_url(Forge::GitLab, "https://gitlab.com/", "g/p", "abc"),
            "https://gitlab.com/api/v4/projects/g%2Fp/statuses/abc"
        );
        assert_eq!(
            status_url(Forge::Gitea, "http://h", "o/r", "abc"),
            "http://h/api/v1/repos/o/r/statuses/abc"
        );
        assert_eq!(
            state_name(Forge::GitLab, Event::BuildFinished, Some(Results::Failure)),
            "failed"
        );
        assert_eq!(
            state_name(Forge::GitHub, Event::BuildStarted, None),
            "pending"
        );
        assert_eq!(
            state_name(Forge::Gitea, Event::BuildFinished, Some(Results::Warnings)),
            "warning"
        );
    }
}
