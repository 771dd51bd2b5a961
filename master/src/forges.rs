//! Each forge's payloads turned into changes: GitHub (`push`, `pull_request`, `ping`), GitLab
//! (`Push Hook`, `Tag Push Hook`, `Merge Request Hook`), Gitea and Forgejo (`push`,
//! `pull_request`), and Kiln's own change JSON. Pure functions of the event and the body, so
//! every mapping is unit-tested on the forges' documented samples.
//!
//! What a change gets, whatever the forge: the branch (a tag's name for a tag, with category
//! `tag`), revision, author and committer as `Name <email>`, the files added, modified and
//! removed, the message as comments, the repository's clone URL, the project (the source's, or
//! the forge's `owner/name`), the category (the source's, or `push`, `tag`, `pull`), a link to
//! the commit or pull request, when it was made, and the property `event`. A pull or merge
//! request is one change of its head commit on the ref the forge keeps for it in the base
//! repository (`refs/pull/N/head`, `refs/merge-requests/N/head`), with properties `pr_number`,
//! `pr_title`, `pr_url`, `pr_action`, `head_ref`, `head_sha`, `head_repository`, `base_ref`,
//! `base_sha`, `base_repository` and `fork`; one from a fork (or whose head repository cannot
//! be told, such as a deleted fork) is untrusted.

use serde_json::{Map, Value, json};

use kiln_config::{ChangeSource, Forge};
use kiln_db::model::NewChange;

/// Why a delivery cannot be read: bad JSON, a missing field, an event Kiln does not handle, a
/// change that fails validation. The webhook endpoint answers it as a 400 with this message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub String);

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a delivery asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    /// Changes to record, oldest first.
    Changes(Vec<NewChange>),
    /// A delivery understood that builds nothing (a ping, a deleted branch, a closed pull
    /// request), and why.
    Ignored(String),
}

/// The forge's zero object id: a ref created (as `before`) or deleted (as `after`).
const ZERO_SHA: &str = "0000000000000000000000000000000000000000";

/// Parses one delivery of `event` for `source`.
pub fn parse(
    forge: Forge,
    event: &str,
    body: &[u8],
    source: &ChangeSource,
) -> Result<Parsed, Malformed> {
    let payload: Value = serde_json::from_slice(body)
        .map_err(|e| Malformed(format!("the delivery's body is not valid JSON: {e}")))?;
    let ctx = Ctx { source, event };
    match (forge, event) {
        (Forge::GitHub, "ping") => Ok(Parsed::Ignored(
            "ping: the hook is set up; Kiln builds on push and pull_request".into(),
        )),
        (Forge::GitHub, "push") | (Forge::Gitea, "push") => ctx.push(&payload),
        (Forge::GitHub, "pull_request") | (Forge::Gitea, "pull_request") => {
            ctx.pull_request(forge, &payload)
        }
        (Forge::GitLab, "Push Hook") | (Forge::GitLab, "Tag Push Hook") => {
            ctx.gitlab_push(&payload)
        }
        (Forge::GitLab, "Merge Request Hook") => ctx.gitlab_merge_request(&payload),
        (Forge::Generic, _) => ctx.generic(payload),
        (forge, other) => Err(Malformed(format!(
            "event {other:?} is not one Kiln handles; {}",
            match forge {
                Forge::GitHub => "send only push and pull_request events (ping is answered)",
                Forge::GitLab =>
                    "send only push, tag push and merge request events (Push Hook, Tag Push Hook, Merge Request Hook)",
                _ => "send only push and pull request events",
            }
        ))),
    }
}

/// One delivery being parsed.
struct Ctx<'a> {
    source: &'a ChangeSource,
    event: &'a str,
}

/// A string at a dotted path, if there is one.
fn str_at<'v>(v: &'v Value, path: &str) -> Option<&'v str> {
    at(v, path).and_then(Value::as_str)
}

fn at<'v>(v: &'v Value, path: &str) -> Option<&'v Value> {
    path.split('.')
        .try_fold(v, |v, key| v.get(key))
        .filter(|v| !v.is_null())
}

/// A string the payload must have.
fn need<'v>(v: &'v Value, path: &str, what: &str) -> Result<&'v str, Malformed> {
    str_at(v, path).ok_or_else(|| {
        Malformed(format!(
            "the {what} payload has no {path} (a string); is this a delivery of that event?"
        ))
    })
}

/// A list of strings (a commit's files); anything else reads as none.
fn strings(v: Option<&Value>) -> impl Iterator<Item = &str> {
    v.and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
}

/// `Name <email>`, or the part there is.
fn person(name: Option<&str>, email: Option<&str>) -> Option<String> {
    let name = name.map(str::trim).filter(|n| !n.is_empty());
    let email = email.map(str::trim).filter(|e| !e.is_empty());
    match (name, email) {
        (Some(n), Some(e)) => Some(format!("{n} <{e}>")),
        (Some(n), None) => Some(n.to_owned()),
        (None, Some(e)) => Some(format!("<{e}>")),
        (None, None) => None,
    }
}

/// An RFC 3339 time in ms; `None` for anything else (the change then gets the time it came).
fn time_ms(v: Option<&str>) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(v?)
        .ok()
        .map(|t| t.timestamp_millis())
}

/// Files in first-seen order, each once.
fn files<'v>(lists: impl IntoIterator<Item = Option<&'v Value>>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for list in lists {
        for f in strings(list) {
            if !out.iter().any(|o| o == f) {
                out.push(f.to_owned());
            }
        }
    }
    out
}

impl Ctx<'_> {
    /// A change with what every change of this source gets.
    fn change(&self, project: &str, category: &str) -> NewChange {
        let mut properties = Map::new();
        properties.insert("event".into(), json!(self.event));
        NewChange {
            project: if self.source.project.is_empty() {
                project.to_owned()
            } else {
                self.source.project.clone()
            },
            category: Some(
                self.source
                    .category
                    .clone()
                    .unwrap_or_else(|| category.to_owned()),
            ),
            source: self.source.name.clone(),
            properties,
            trusted: Some(true),
            ..Default::default()
        }
    }

    /// A commit as GitHub, Gitea and GitLab list them in a push.
    fn commit_change(
        &self,
        base: &NewChange,
        c: &Value,
        fallback_author: Option<&str>,
    ) -> NewChange {
        let author = person(str_at(c, "author.name"), str_at(c, "author.email"))
            .or_else(|| str_at(c, "author.username").map(str::to_owned))
            .or_else(|| fallback_author.map(str::to_owned))
            .unwrap_or_default();
        let committer = person(str_at(c, "committer.name"), str_at(c, "committer.email"))
            .filter(|who| *who != author);
        NewChange {
            author,
            committer,
            comments: str_at(c, "message").unwrap_or_default().to_owned(),
            revision: str_at(c, "id").map(str::to_owned),
            revlink: str_at(c, "url").map(str::to_owned),
            when_ms: time_ms(str_at(c, "timestamp")),
            files: files([c.get("added"), c.get("modified"), c.get("removed")]),
            ..base.clone()
        }
    }

    /// GitHub's and Gitea's `push`: one change per new commit of a branch, or one for the
    /// commit a tag (or a branch made without new commits) points at.
    fn push(&self, p: &Value) -> Result<Parsed, Malformed> {
        let what = "push";
        let reference = need(p, "ref", what)?;
        let after = str_at(p, "after").unwrap_or_default();
        if p.get("deleted").and_then(Value::as_bool) == Some(true) || after == ZERO_SHA {
            return Ok(Parsed::Ignored(format!(
                "the push deleted {reference}; nothing to build"
            )));
        }
        let Some((name, category)) = ref_name(reference) else {
            return Ok(Parsed::Ignored(format!(
                "the push updated {reference}, which is neither a branch nor a tag"
            )));
        };
        let repository = str_at(p, "repository.clone_url")
            .or_else(|| str_at(p, "repository.html_url"))
            .unwrap_or_default();
        let project = str_at(p, "repository.full_name").unwrap_or_default();
        let mut base = self.change(project, category);
        base.branch = Some(name.to_owned());
        base.repository = repository.to_owned();
        if category == "tag" {
            base.properties.insert("tag".into(), json!(name));
        }
        // Who pushed, when a commit names no one (GitHub: pusher.name; Gitea: pusher.login).
        let pusher = person(str_at(p, "pusher.name"), str_at(p, "pusher.email"))
            .or_else(|| str_at(p, "pusher.login").map(str::to_owned))
            .or_else(|| str_at(p, "sender.login").map(str::to_owned));
        let commits: Vec<&Value> = p
            .get("commits")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            // GitHub marks commits already pushed to another branch as not distinct.
            .filter(|c| c.get("distinct").and_then(Value::as_bool) != Some(false))
            .collect();
        let mut changes: Vec<NewChange> = commits
            .iter()
            .map(|c| self.commit_change(&base, c, pusher.as_deref()))
            .collect();
        if changes.is_empty() {
            match p.get("head_commit").filter(|h| h.is_object()) {
                Some(head) => changes.push(self.commit_change(&base, head, pusher.as_deref())),
                None if after.len() >= 7 => {
                    // A tag or branch pointed at an existing commit, with no commit listed.
                    let mut c = base.clone();
                    c.author = pusher.clone().unwrap_or_else(|| "unknown".into());
                    c.revision = Some(after.to_owned());
                    c.comments = format!("{reference} set to {after}");
                    changes.push(c);
                }
                None => {
                    return Ok(Parsed::Ignored(format!(
                        "the push of {reference} lists no commit; nothing to build"
                    )));
                }
            }
        }
        Ok(Parsed::Changes(changes))
    }

    /// GitHub's and Gitea's `pull_request`: opened, reopened or new commits build its head.
    fn pull_request(&self, forge: Forge, p: &Value) -> Result<Parsed, Malformed> {
        let what = "pull_request";
        let action = need(p, "action", what)?;
        // GitHub says `synchronize`, Gitea and Forgejo `synchronized`.
        if !matches!(
            action,
            "opened" | "reopened" | "synchronize" | "synchronized"
        ) {
            return Ok(Parsed::Ignored(format!(
                "pull request action {action:?} builds nothing (opened, reopened and new \
                 commits do)"
            )));
        }
        let pr = p
            .get("pull_request")
            .filter(|v| v.is_object())
            .ok_or_else(|| {
                Malformed("the pull_request payload has no pull_request object".into())
            })?;
        let number = at(pr, "number")
            .or_else(|| p.get("number"))
            .and_then(Value::as_i64)
            .ok_or_else(|| Malformed("the pull_request payload has no number".into()))?;
        let head_sha = need(pr, "head.sha", what)?;
        let head_ref = str_at(pr, "head.ref").unwrap_or_default();
        let base_ref = str_at(pr, "base.ref").unwrap_or_default();
        // The base repository: GitHub gives it in base.repo; Gitea's payload may give only
        // its id there, and the repository the hook belongs to is the base.
        let base_repo = str_at(pr, "base.repo.clone_url")
            .or_else(|| str_at(p, "repository.clone_url"))
            .unwrap_or_default();
        let head_repo = str_at(pr, "head.repo.clone_url");
        let fork = match forge {
            Forge::GitHub => github_fork(pr),
            _ => gitea_fork(pr, p),
        };
        let project = str_at(pr, "base.repo.full_name")
            .or_else(|| str_at(p, "repository.full_name"))
            .unwrap_or_default();
        let title = str_at(pr, "title").unwrap_or_default();
        let url = str_at(pr, "html_url").unwrap_or_default();
        let user = str_at(pr, "user.login")
            .or_else(|| str_at(p, "sender.login"))
            .unwrap_or("unknown");
        let email = str_at(pr, "user.email").filter(|e| e.contains('@'));
        let mut c = self.change(project, "pull");
        c.author = person(Some(user), email).unwrap_or_else(|| user.to_owned());
        c.branch = Some(format!("refs/pull/{number}/head"));
        c.revision = Some(head_sha.to_owned());
        c.repository = base_repo.to_owned();
        c.revlink = (!url.is_empty()).then(|| url.to_owned());
        c.when_ms = time_ms(str_at(pr, "updated_at"));
        c.comments = pr_comments("Pull request", "#", number, title, str_at(pr, "body"));
        c.trusted = Some(!fork);
        let props = [
            ("pr_number", json!(number)),
            ("pr_title", json!(title)),
            ("pr_url", json!(url)),
            ("pr_action", json!(action)),
            ("head_ref", json!(head_ref)),
            ("head_sha", json!(head_sha)),
            ("head_repository", json!(head_repo.unwrap_or_default())),
            ("base_ref", json!(base_ref)),
            (
                "base_sha",
                json!(str_at(pr, "base.sha").unwrap_or_default()),
            ),
            ("base_repository", json!(base_repo)),
            ("fork", json!(fork)),
        ];
        c.properties
            .extend(props.into_iter().map(|(k, v)| (k.to_owned(), v)));
        Ok(Parsed::Changes(vec![c]))
    }

    /// GitLab's `Push Hook` and `Tag Push Hook`.
    fn gitlab_push(&self, p: &Value) -> Result<Parsed, Malformed> {
        let what = if self.event == "Tag Push Hook" {
            "Tag Push Hook"
        } else {
            "Push Hook"
        };
        let reference = need(p, "ref", what)?;
        let after = str_at(p, "after").unwrap_or_default();
        if after == ZERO_SHA {
            return Ok(Parsed::Ignored(format!(
                "the push deleted {reference}; nothing to build"
            )));
        }
        let Some((name, category)) = ref_name(reference) else {
            return Ok(Parsed::Ignored(format!(
                "the push updated {reference}, which is neither a branch nor a tag"
            )));
        };
        let repository = str_at(p, "project.git_http_url")
            .or_else(|| str_at(p, "repository.git_http_url"))
            .unwrap_or_default();
        let project = str_at(p, "project.path_with_namespace").unwrap_or_default();
        let mut base = self.change(project, category);
        base.branch = Some(name.to_owned());
        base.repository = repository.to_owned();
        if category == "tag" {
            base.properties.insert("tag".into(), json!(name));
        }
        let pusher = person(str_at(p, "user_name"), str_at(p, "user_email"))
            .or_else(|| str_at(p, "user_username").map(str::to_owned));
        let mut changes: Vec<NewChange> = p
            .get("commits")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|c| self.commit_change(&base, c, pusher.as_deref()))
            .collect();
        if changes.is_empty() {
            // A tag, or a branch made without new commits: the commit it points at.
            let Some(sha) = str_at(p, "checkout_sha").filter(|s| !s.is_empty()) else {
                return Ok(Parsed::Ignored(format!(
                    "the push of {reference} names no commit; nothing to build"
                )));
            };
            let mut c = base.clone();
            c.author = pusher.unwrap_or_else(|| "unknown".into());
            c.revision = Some(sha.to_owned());
            c.comments = str_at(p, "message")
                .filter(|m| !m.is_empty())
                .map_or_else(|| format!("{reference} set to {sha}"), str::to_owned);
            changes.push(c);
        }
        Ok(Parsed::Changes(changes))
    }

    /// GitLab's `Merge Request Hook`: opened, reopened, or updated with new commits.
    fn gitlab_merge_request(&self, p: &Value) -> Result<Parsed, Malformed> {
        let what = "Merge Request Hook";
        let mr = p
            .get("object_attributes")
            .filter(|v| v.is_object())
            .ok_or_else(|| {
                Malformed(format!(
                    "the {what} payload has no object_attributes object"
                ))
            })?;
        let action = need(mr, "action", what)?;
        let builds = match action {
            "open" | "reopen" => true,
            // An update builds only when it brought commits (GitLab then sends `oldrev`).
            "update" => mr.get("oldrev").is_some_and(|v| !v.is_null()),
            _ => false,
        };
        if !builds {
            return Ok(Parsed::Ignored(format!(
                "merge request action {action:?} builds nothing (open, reopen and new commits \
                 do)"
            )));
        }
        let iid = mr
            .get("iid")
            .and_then(Value::as_i64)
            .ok_or_else(|| Malformed(format!("the {what} payload has no object_attributes.iid")))?;
        let sha = need(mr, "last_commit.id", what)?;
        let source_id = mr.get("source_project_id").and_then(Value::as_i64);
        let target_id = mr.get("target_project_id").and_then(Value::as_i64);
        // A merge request whose projects cannot be told apart is treated as from a fork.
        let fork = source_id.is_none() || source_id != target_id;
        let target_repo = str_at(mr, "target.git_http_url")
            .or_else(|| str_at(p, "project.git_http_url"))
            .unwrap_or_default();
        let project = str_at(mr, "target.path_with_namespace")
            .or_else(|| str_at(p, "project.path_with_namespace"))
            .unwrap_or_default();
        let title = str_at(mr, "title").unwrap_or_default();
        let url = str_at(mr, "url").unwrap_or_default();
        let mut c = self.change(project, "pull");
        c.author = person(
            str_at(mr, "last_commit.author.name"),
            str_at(mr, "last_commit.author.email"),
        )
        .or_else(|| person(str_at(p, "user.name"), str_at(p, "user.email")))
        .unwrap_or_else(|| "unknown".into());
        c.branch = Some(format!("refs/merge-requests/{iid}/head"));
        c.revision = Some(sha.to_owned());
        c.repository = target_repo.to_owned();
        c.revlink = (!url.is_empty()).then(|| url.to_owned());
        c.when_ms = time_ms(str_at(mr, "last_commit.timestamp"));
        c.comments = pr_comments("Merge request", "!", iid, title, str_at(mr, "description"));
        c.trusted = Some(!fork);
        let props = [
            ("pr_number", json!(iid)),
            ("pr_title", json!(title)),
            ("pr_url", json!(url)),
            ("pr_action", json!(action)),
            (
                "head_ref",
                json!(str_at(mr, "source_branch").unwrap_or_default()),
            ),
            ("head_sha", json!(sha)),
            (
                "head_repository",
                json!(str_at(mr, "source.git_http_url").unwrap_or_default()),
            ),
            (
                "base_ref",
                json!(str_at(mr, "target_branch").unwrap_or_default()),
            ),
            ("base_sha", json!(str_at(mr, "oldrev").unwrap_or_default())),
            ("base_repository", json!(target_repo)),
            ("fork", json!(fork)),
        ];
        c.properties
            .extend(props.into_iter().map(|(k, v)| (k.to_owned(), v)));
        Ok(Parsed::Changes(vec![c]))
    }

    /// Kiln's own JSON: one change, or a list of them, as `POST /api/v2/changes` takes.
    fn generic(&self, payload: Value) -> Result<Parsed, Malformed> {
        let many = payload.is_array();
        let list: Vec<NewChange> = if many {
            serde_json::from_value(payload)
        } else {
            serde_json::from_value(payload).map(|c| vec![c])
        }
        .map_err(|e| {
            Malformed(format!(
                "the body is not a Kiln change{}: {e} (fields: author, committer, comments, \
                 branch, revision, revlink, when_ms, category, repository, codebase, project, \
                 files, properties, source_key, trusted)",
                if many { " list" } else { "" }
            ))
        })?;
        if list.is_empty() {
            return Ok(Parsed::Ignored("the list of changes is empty".into()));
        }
        let changes = list
            .into_iter()
            .map(|mut c| {
                c.source = self.source.name.clone();
                if c.project.is_empty() {
                    c.project = self.source.project.clone();
                }
                if c.category.is_none() {
                    c.category = self.source.category.clone();
                }
                c
            })
            .collect();
        Ok(Parsed::Changes(changes))
    }
}

/// A branch's or tag's short name and the category of a push to it.
fn ref_name(reference: &str) -> Option<(&str, &'static str)> {
    if let Some(b) = reference.strip_prefix("refs/heads/") {
        Some((b, "push"))
    } else {
        reference.strip_prefix("refs/tags/").map(|t| (t, "tag"))
    }
}

/// The comments of a pull or merge request's change.
fn pr_comments(kind: &str, sigil: &str, n: i64, title: &str, body: Option<&str>) -> String {
    let mut text = format!("{kind} {sigil}{n}: {title}");
    if let Some(body) = body.map(str::trim).filter(|b| !b.is_empty()) {
        text.push_str("\n\n");
        text.push_str(body);
    }
    text
}

/// Whether a GitHub pull request comes from another repository than its base (a missing
/// head repository, as for a deleted fork, counts as one).
fn github_fork(pr: &Value) -> bool {
    let head = at(pr, "head.repo.id").and_then(Value::as_i64);
    let base = at(pr, "base.repo.id").and_then(Value::as_i64);
    match (head, base) {
        (Some(h), Some(b)) => h != b,
        _ => {
            let head = str_at(pr, "head.repo.full_name");
            head.is_none() || head != str_at(pr, "base.repo.full_name")
        }
    }
}

/// The same for Gitea and Forgejo, whose branches carry `repo_id` and may carry `repo`.
fn gitea_fork(pr: &Value, p: &Value) -> bool {
    let id = |side: &str| {
        at(pr, &format!("{side}.repo_id"))
            .or_else(|| at(pr, &format!("{side}.repo.id")))
            .and_then(Value::as_i64)
    };
    let base = id("base").or_else(|| at(p, "repository.id").and_then(Value::as_i64));
    match (id("head"), base) {
        (Some(h), Some(b)) => h != b,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fixture from `master/tests/payloads/`.
    fn sample(path: &str) -> Vec<u8> {
        let file = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/payloads/");
        std::fs::read(format!("{file}{path}")).unwrap()
    }

    fn source(forge_project: &str, category: Option<&str>) -> ChangeSource {
        ChangeSource {
            name: "hook".into(),
            project: forge_project.into(),
            category: category.map(str::to_owned),
            kind: kiln_config::ChangeSourceKind::Webhook {
                forge: Forge::Generic,
                secret: None,
            },
        }
    }

    fn changes(forge: Forge, event: &str, path: &str) -> Vec<NewChange> {
        match parse(forge, event, &sample(path), &source("", None)).unwrap() {
            Parsed::Changes(c) => c,
            Parsed::Ignored(why) => panic!("{path} ignored: {why}"),
        }
    }

    fn ignored(forge: Forge, event: &str, body: &[u8]) -> String {
        match parse(forge, event, body, &source("", None)).unwrap() {
            Parsed::Ignored(why) => why,
            Parsed::Changes(c) => panic!("not ignored: {c:?}"),
        }
    }

    #[test]
    fn a_github_push_is_a_change_per_commit() {
        let c = changes(Forge::GitHub, "push", "github/push.json");
        assert_eq!(c.len(), 1);
        let c = &c[0];
        assert_eq!(
            c.author,
            "Codertocat <21031067+Codertocat@users.noreply.github.com>"
        );
        assert_eq!(c.committer, None, "the same person committed");
        assert_eq!(c.comments, "Initial commit");
        assert_eq!(c.branch.as_deref(), Some("master"));
        assert_eq!(
            c.revision.as_deref(),
            Some("6113728f27ae82c7b1a177c8d03f9e96e0adf246")
        );
        assert_eq!(
            c.revlink.as_deref(),
            Some(
                "https://github.com/Codertocat/Hello-World/commit/6113728f27ae82c7b1a177c8d03f9e96e0adf246"
            )
        );
        assert_eq!(
            c.repository,
            "https://github.com/Codertocat/Hello-World.git"
        );
        assert_eq!(c.project, "Codertocat/Hello-World");
        assert_eq!(c.category.as_deref(), Some("push"));
        assert_eq!(c.files, vec!["README.md"]);
        assert_eq!(c.when_ms, Some(1_557_933_565_000));
        assert_eq!(c.source, "hook");
        assert_eq!(c.trusted, Some(true));
        assert_eq!(c.properties["event"], "push");
        crate::changes::validate(c).unwrap();
    }

    #[test]
    fn a_github_tag_push_is_a_tag_change_and_a_deletion_builds_nothing() {
        // The same delivery as for a branch, to a tag (GitHub lists no commits for a new tag
        // on an existing commit, and gives head_commit).
        let mut p: Value = serde_json::from_slice(&sample("github/push.json")).unwrap();
        p["ref"] = json!("refs/tags/v1.0");
        p["commits"] = json!([]);
        let body = serde_json::to_vec(&p).unwrap();
        let Parsed::Changes(c) = parse(Forge::GitHub, "push", &body, &source("", None)).unwrap()
        else {
            panic!("ignored")
        };
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].branch.as_deref(), Some("v1.0"));
        assert_eq!(c[0].category.as_deref(), Some("tag"));
        assert_eq!(c[0].properties["tag"], "v1.0");
        assert_eq!(
            c[0].revision.as_deref(),
            Some("6113728f27ae82c7b1a177c8d03f9e96e0adf246")
        );
        let why = ignored(
            Forge::GitHub,
            "push",
            &sample("github/push-tag-deleted.json"),
        );
        assert_eq!(
            why,
            "the push deleted refs/tags/simple-tag; nothing to build"
        );
        let why = ignored(Forge::GitHub, "ping", &sample("github/ping.json"));
        assert!(why.starts_with("ping:"), "{why}");
    }

    #[test]
    fn a_github_pull_request_builds_its_head_and_a_fork_is_untrusted() {
        let c = changes(
            Forge::GitHub,
            "pull_request",
            "github/pull_request-opened.json",
        );
        assert_eq!(c.len(), 1);
        let c = &c[0];
        assert_eq!(c.author, "Codertocat");
        assert_eq!(c.branch.as_deref(), Some("refs/pull/2/head"));
        assert_eq!(
            c.revision.as_deref(),
            Some("ec26c3e57ca3a959ca5aad62de7213c562f8c821")
        );
        assert_eq!(
            c.repository,
            "https://github.com/Codertocat/Hello-World.git"
        );
        assert_eq!(c.category.as_deref(), Some("pull"));
        assert_eq!(
            c.comments,
            "Pull request #2: Update the README with new information.\n\nThis is a pretty simple \
             change that we need to pull into master."
        );
        assert_eq!(
            c.revlink.as_deref(),
            Some("https://github.com/Codertocat/Hello-World/pull/2")
        );
        assert_eq!(c.trusted, Some(true), "same repository");
        assert_eq!(c.properties["pr_number"], 2);
        assert_eq!(c.properties["head_ref"], "changes");
        assert_eq!(c.properties["base_ref"], "master");
        assert_eq!(
            c.properties["base_sha"],
            "f95f852bd8fca8fcc58a9a2d6c842781e32a215e"
        );
        assert_eq!(c.properties["fork"], false);
        crate::changes::validate(c).unwrap();

        let fork = &changes(
            Forge::GitHub,
            "pull_request",
            "github/pull_request-fork.json",
        )[0];
        assert_eq!(fork.trusted, Some(false));
        assert_eq!(fork.properties["fork"], true);
        assert_eq!(
            fork.properties["head_repository"],
            "https://github.com/Octocoders/Hello-World.git"
        );
        // Still built from the base repository, where GitHub keeps the pull request's ref.
        assert_eq!(
            fork.repository,
            "https://github.com/Codertocat/Hello-World.git"
        );

        // A deleted fork has no head repository: untrusted all the same.
        let mut p: Value =
            serde_json::from_slice(&sample("github/pull_request-fork.json")).unwrap();
        p["pull_request"]["head"]["repo"] = Value::Null;
        let body = serde_json::to_vec(&p).unwrap();
        let Parsed::Changes(c) =
            parse(Forge::GitHub, "pull_request", &body, &source("", None)).unwrap()
        else {
            panic!("ignored")
        };
        assert_eq!(c[0].trusted, Some(false));

        // Closing builds nothing.
        p["action"] = json!("closed");
        let why = ignored(
            Forge::GitHub,
            "pull_request",
            &serde_json::to_vec(&p).unwrap(),
        );
        assert!(why.starts_with("pull request action \"closed\""), "{why}");
    }

    #[test]
    fn gitlab_pushes_tags_and_merge_requests() {
        let c = changes(Forge::GitLab, "Push Hook", "gitlab/push.json");
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].author, "Jordi Mallach <jordi@softcatala.org>");
        assert_eq!(
            c[0].comments,
            "Update Catalan translation to e38cb41.\n\nSee https://gitlab.com/gitlab-org/gitlab for more information"
        );
        assert_eq!(
            c[0].files,
            vec!["CHANGELOG", "app/controller/application.rb"]
        );
        assert_eq!(c[0].when_ms, Some(1_323_692_851_000));
        assert_eq!(c[1].branch.as_deref(), Some("master"));
        assert_eq!(
            c[1].revision.as_deref(),
            Some("da1560886d4f094c3e6c9ef40349f7d38b5d27d7")
        );
        assert_eq!(c[1].repository, "http://example.com/mike/diaspora.git");
        assert_eq!(c[1].project, "mike/diaspora");
        assert_eq!(c[1].category.as_deref(), Some("push"));
        for c in &c {
            crate::changes::validate(c).unwrap();
        }

        let t = changes(Forge::GitLab, "Tag Push Hook", "gitlab/tag_push.json");
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].branch.as_deref(), Some("v1.0.0"));
        assert_eq!(t[0].category.as_deref(), Some("tag"));
        assert_eq!(
            t[0].revision.as_deref(),
            Some("82b3d5ae55f7080f1e6022629cdb57bfae7cccc7")
        );
        assert_eq!(t[0].author, "John Smith");
        crate::changes::validate(&t[0]).unwrap();

        let mr = changes(
            Forge::GitLab,
            "Merge Request Hook",
            "gitlab/merge_request.json",
        );
        assert_eq!(mr.len(), 1);
        let mr = &mr[0];
        assert_eq!(mr.branch.as_deref(), Some("refs/merge-requests/1/head"));
        assert_eq!(
            mr.revision.as_deref(),
            Some("da1560886d4f094c3e6c9ef40349f7d38b5d27d7")
        );
        assert_eq!(mr.author, "GitLab dev user <gitlabdev@dv6700.(none)>");
        assert_eq!(
            mr.repository,
            "http://example.com/awesome_space/awesome_project.git"
        );
        assert_eq!(mr.comments, "Merge request !1: MS-Viewport");
        assert_eq!(mr.trusted, Some(true), "source and target are project 14");
        assert_eq!(mr.properties["head_ref"], "ms-viewport");
        crate::changes::validate(mr).unwrap();

        // From another project: untrusted. Merged: nothing to build.
        let mut p: Value = serde_json::from_slice(&sample("gitlab/merge_request.json")).unwrap();
        p["object_attributes"]["source_project_id"] = json!(15);
        let body = serde_json::to_vec(&p).unwrap();
        let Parsed::Changes(c) = parse(
            Forge::GitLab,
            "Merge Request Hook",
            &body,
            &source("", None),
        )
        .unwrap() else {
            panic!("ignored")
        };
        assert_eq!(c[0].trusted, Some(false));
        p["object_attributes"]["action"] = json!("merge");
        let why = ignored(
            Forge::GitLab,
            "Merge Request Hook",
            &serde_json::to_vec(&p).unwrap(),
        );
        assert!(why.starts_with("merge request action \"merge\""), "{why}");
        // An update without new commits builds nothing; with them (oldrev), it does.
        p["object_attributes"]["action"] = json!("update");
        ignored(
            Forge::GitLab,
            "Merge Request Hook",
            &serde_json::to_vec(&p).unwrap(),
        );
        p["object_attributes"]["oldrev"] = json!("95790bf891e76fee5e1747ab589903a6a1f80f22");
        let body = serde_json::to_vec(&p).unwrap();
        assert!(matches!(
            parse(
                Forge::GitLab,
                "Merge Request Hook",
                &body,
                &source("", None)
            )
            .unwrap(),
            Parsed::Changes(_)
        ));
    }

    #[test]
    fn gitea_pushes_and_pull_requests() {
        let c = changes(Forge::Gitea, "push", "gitea/push.json");
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].author, "Gitea <someone@gitea.io>");
        assert_eq!(c[0].branch.as_deref(), Some("develop"));
        assert_eq!(c[0].repository, "http://localhost:3000/gitea/webhooks.git");
        assert_eq!(c[0].comments, "Webhooks Yay!");
        assert_eq!(c[0].when_ms, Some(1_489_427_531_000));

        let pr = &changes(
            Forge::Gitea,
            "pull_request",
            "gitea/pull_request-synchronized.json",
        )[0];
        assert_eq!(pr.branch.as_deref(), Some("refs/pull/2/head"));
        assert_eq!(
            pr.revision.as_deref(),
            Some("788ed8d02d3b7fcfcf6386dbcbca696aa1d4dc25")
        );
        assert_eq!(pr.author, "test <test@noreply.localhost>");
        assert_eq!(
            pr.repository,
            "http://127.0.0.1:3000/Test-CI/multi-line-secrets.git"
        );
        assert_eq!(pr.trusted, Some(true), "head and base are repository 6");
        assert_eq!(pr.properties["pr_action"], "synchronized");
        crate::changes::validate(pr).unwrap();

        let mut p: Value =
            serde_json::from_slice(&sample("gitea/pull_request-synchronized.json")).unwrap();
        p["pull_request"]["head"]["repo_id"] = json!(7);
        let body = serde_json::to_vec(&p).unwrap();
        let Parsed::Changes(c) =
            parse(Forge::Gitea, "pull_request", &body, &source("", None)).unwrap()
        else {
            panic!("ignored")
        };
        assert_eq!(c[0].trusted, Some(false));
    }

    #[test]
    fn the_source_names_project_and_category_when_it_sets_them() {
        let body = sample("github/push.json");
        let Parsed::Changes(c) =
            parse(Forge::GitHub, "push", &body, &source("web", Some("ci"))).unwrap()
        else {
            panic!("ignored")
        };
        assert_eq!(c[0].project, "web");
        assert_eq!(c[0].category.as_deref(), Some("ci"));
    }

    #[test]
    fn the_generic_hook_takes_kilns_change_json() {
        let s = source("proj", None);
        let one = br#"{"author": "Ada <ada@example.org>", "branch": "main", "revision": "1a2b",
                       "files": ["src/lib.rs"], "comments": "fix", "trusted": false}"#;
        let Parsed::Changes(c) = parse(Forge::Generic, "change", one, &s).unwrap() else {
            panic!("ignored")
        };
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].source, "hook");
        assert_eq!(c[0].project, "proj");
        assert_eq!(c[0].trusted, Some(false));
        let two = br#"[{"author": "a"}, {"author": "b", "project": "other"}]"#;
        let Parsed::Changes(c) = parse(Forge::Generic, "change", two, &s).unwrap() else {
            panic!("ignored")
        };
        assert_eq!(c[1].project, "other");
        let e = parse(Forge::Generic, "change", br#"{"autor": "typo"}"#, &s).unwrap_err();
        assert!(e.0.contains("unknown field `autor`"), "{e:?}");
    }

    #[test]
    fn bad_input_is_a_clear_error_never_a_panic() {
        let s = source("", None);
        let cases: &[(Forge, &str, &[u8], &str)] = &[
            (Forge::GitHub, "push", b"{not json", "not valid JSON"),
            (Forge::GitHub, "push", b"[]", "has no ref"),
            (Forge::GitHub, "push", b"{\"ref\": 7}", "has no ref"),
            (
                Forge::GitHub,
                "issues",
                b"{}",
                "event \"issues\" is not one Kiln handles",
            ),
            (
                Forge::GitHub,
                "pull_request",
                b"{\"action\": \"opened\"}",
                "no pull_request object",
            ),
            (
                Forge::GitHub,
                "pull_request",
                b"{\"action\": \"opened\", \"pull_request\": {\"number\": 1}}",
                "has no head.sha",
            ),
            (Forge::GitLab, "Note Hook", b"{}", "Merge Request Hook"),
            (
                Forge::GitLab,
                "Merge Request Hook",
                b"{}",
                "no object_attributes",
            ),
            (Forge::Gitea, "create", b"{}", "not one Kiln handles"),
            (Forge::Generic, "change", b"\"text\"", "not a Kiln change"),
        ];
        for (forge, event, body, expected) in cases {
            let e = parse(*forge, event, body, &s).unwrap_err();
            assert!(
                e.0.contains(expected),
                "{forge:?} {event}: {} lacks {expected:?}",
                e.0
            );
        }
    }
}
