//! Change sources (what comes in) and reporters (what goes out), checked. They are run by
//! their own modules; here they are only parsed and validated.

use std::time::Duration;

use super::check::{self, Ctx, a, list};
use super::duration;
use super::error::quote;
use super::globs::Globs;
use super::refs::{Secret, SecretValue};
use super::schema::{ChangeSourceEntry, LookupEntry, ReporterEntry};

/// Default time between polls of a git poller (Buildbot's).
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(600);

/// A change source.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeSource {
    /// Its name (webhooks arrive at `/change_hook/NAME`).
    pub name: String,
    /// The project given to its changes.
    pub project: String,
    /// The category given to its changes.
    pub category: Option<String>,
    /// What it is.
    pub kind: ChangeSourceKind,
}

/// The kinds of change source.
#[derive(Debug, Clone, PartialEq)]
pub enum ChangeSourceKind {
    /// Polls a git repository.
    GitPoller {
        /// The repository.
        repourl: String,
        /// The branches to follow; `None` for the remote's default branch.
        branches: Option<Globs>,
        /// The time between polls.
        interval: Duration,
    },
    /// A forge's webhook.
    Webhook {
        /// Which forge's payloads.
        forge: Forge,
        /// The shared secret payloads are signed with, if any.
        secret: Option<SecretValue>,
    },
}

/// The webhook payload formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forge {
    /// GitHub (`X-Hub-Signature-256`).
    GitHub,
    /// GitLab (`X-Gitlab-Token`).
    GitLab,
    /// Gitea and Forgejo.
    Gitea,
    /// Kiln's own JSON change format.
    Generic,
}

const SOURCE_TYPES: &[&str] = &["git-poller", "github", "gitlab", "gitea", "generic"];

/// Resolves a `[[change_sources]]` entry (its name is checked by the caller).
pub(crate) fn resolve_change_source(
    ctx: &mut Ctx,
    key: &str,
    c: ChangeSourceEntry,
) -> ChangeSource {
    let given = [
        ("repourl", c.repourl.is_some()),
        ("branches", c.branches.is_some()),
        ("interval", c.interval.is_some()),
        ("secret", c.secret.is_some()),
    ];
    let kind = c.kind.as_str();
    let allowed: &[&str] = match kind {
        "git-poller" => &["repourl", "branches", "interval", "project", "category"],
        _ => &["secret", "project", "category"],
    };
    if SOURCE_TYPES.contains(&kind) {
        not_applicable(
            ctx,
            key,
            &given,
            allowed,
            &format!("{} {kind} change source", a(kind)),
        );
    }
    let kind = match kind {
        "git-poller" => {
            let repourl = match c.repourl {
                Some(u) if !u.trim().is_empty() => u,
                _ => {
                    ctx.error(
                        key,
                        "a git-poller needs repourl = \"...\", the repository to poll",
                    );
                    String::new()
                }
            };
            ChangeSourceKind::GitPoller {
                repourl,
                branches: c
                    .branches
                    .as_ref()
                    .and_then(|b| ctx.check(format!("{key}.branches"), Globs::new(b, true))),
                interval: c
                    .interval
                    .and_then(|t| {
                        ctx.check(
                            format!("{key}.interval"),
                            duration::parse_at_least(&t.0, Duration::from_secs(1)),
                        )
                    })
                    .unwrap_or(DEFAULT_POLL_INTERVAL),
            }
        }
        "github" | "gitlab" | "gitea" | "generic" => {
            let forge = match kind {
                "github" => Forge::GitHub,
                "gitlab" => Forge::GitLab,
                "gitea" => Forge::Gitea,
                _ => Forge::Generic,
            };
            let secret = secret(ctx, &format!("{key}.secret"), c.secret.as_ref());
            if c.secret.is_none() {
                ctx.warn(
                    key,
                    "the webhook has no secret, so anyone who can reach the master can post changes; set secret = \"%(secret:NAME)s\"",
                );
            }
            ChangeSourceKind::Webhook { forge, secret }
        }
        other => {
            ctx.error(
                format!("{key}.type"),
                format!(
                    "{} is not a change source type; give one of {}",
                    quote(other),
                    list(SOURCE_TYPES)
                ),
            );
            ChangeSourceKind::Webhook {
                forge: Forge::Generic,
                secret: None,
            }
        }
    };
    ChangeSource {
        name: c.name,
        project: c.project.unwrap_or_default(),
        category: c.category,
        kind,
    }
}

/// Records an error for each field given that the type does not take.
fn not_applicable(ctx: &mut Ctx, key: &str, given: &[(&str, bool)], allowed: &[&str], what: &str) {
    for (field, set) in given {
        if *set && !allowed.contains(field) {
            ctx.error(
                format!("{key}.{field}"),
                format!("does not apply to {what} (its fields: {})", list(allowed)),
            );
        }
    }
}

fn secret(ctx: &mut Ctx, key: &str, value: Option<&Secret>) -> Option<SecretValue> {
    value.and_then(|v| ctx.check(key, SecretValue::parse(v)))
}

/// A reporter.
#[derive(Debug, Clone, PartialEq)]
pub struct Reporter {
    /// Its name.
    pub name: String,
    /// The builders whose builds it reports (globs expanded); `None` for all.
    pub builders: Option<Vec<String>>,
    /// Whether it also reports buildsets (first failure, completion).
    pub buildsets: bool,
    /// What it is.
    pub kind: ReporterKind,
}

/// Which builds a reporter reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportMode {
    /// Every build.
    All,
    /// Builds that failed.
    Failing,
    /// Builds that failed after a success of the same builder.
    Problem,
}

/// The kinds of reporter.
#[derive(Debug, Clone, PartialEq)]
pub enum ReporterKind {
    /// Posts each finished build as JSON.
    Http {
        /// Where.
        url: String,
        /// The HMAC-SHA256 signing secret, if any.
        secret: Option<SecretValue>,
        /// Which builds.
        mode: ReportMode,
    },
    /// Sets commit statuses on a forge.
    CommitStatus {
        /// Which forge's API.
        forge: Forge,
        /// The API's base URL.
        base_url: String,
        /// The API token.
        token: SecretValue,
        /// The status context (a template).
        context: String,
    },
    /// Sends mail.
    Email {
        /// The SMTP relay, `host` or `host:port`.
        relay: String,
        /// The sender.
        from: String,
        /// Fixed recipients.
        to: Vec<String>,
        /// Where the authors of a build's changes are mailed, if anywhere.
        lookup: Option<Lookup>,
        /// Which builds.
        mode: ReportMode,
        /// SMTP user and password.
        smtp_auth: Option<(String, SecretValue)>,
    },
}

/// How an email reporter finds an author's address (`lookup`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Authors are mailed at `USER@DOMAIN`.
    Domain(String),
    /// Authors named here, by identifier, address or user (in lower case), are mailed at the
    /// address given; others are not mailed.
    Map(std::collections::BTreeMap<String, String>),
}

const REPORTER_TYPES: &[&str] = &[
    "http",
    "github-status",
    "gitlab-status",
    "gitea-status",
    "email",
];

/// Default status context of the commit-status reporters.
pub const DEFAULT_STATUS_CONTEXT: &str = "kiln/%(prop:buildername)s";

/// Resolves a `[[reporters]]` entry (its name is checked by the caller).
pub(crate) fn resolve_reporter(
    ctx: &mut Ctx,
    key: &str,
    r: ReporterEntry,
    builders: &[&str],
) -> Reporter {
    let kind = r.kind.as_str();
    let given = [
        ("mode", r.mode.is_some()),
        ("url", r.url.is_some()),
        ("secret", r.secret.is_some()),
        ("token", r.token.is_some()),
        ("base_url", r.base_url.is_some()),
        ("context", r.context.is_some()),
        ("relay", r.relay.is_some()),
        ("from", r.from.is_some()),
        ("to", r.to.is_some()),
        ("lookup", r.lookup.is_some()),
        ("smtp_user", r.smtp_user.is_some()),
        ("smtp_password", r.smtp_password.is_some()),
        ("buildsets", r.buildsets.is_some()),
    ];
    let allowed: &[&str] = match kind {
        "http" => &["url", "secret", "mode", "builders", "buildsets"],
        "email" => &[
            "relay",
            "from",
            "to",
            "lookup",
            "mode",
            "smtp_user",
            "smtp_password",
            "builders",
            "buildsets",
        ],
        _ => &["token", "base_url", "context", "builders"],
    };
    if REPORTER_TYPES.contains(&kind) {
        not_applicable(
            ctx,
            key,
            &given,
            allowed,
            &format!("{} {kind} reporter", a(kind)),
        );
    }
    let filter = r
        .builders
        .as_ref()
        .map(|b| check::builder_refs(ctx, &format!("{key}.builders"), b, builders));
    let mode = match r.mode.as_deref() {
        None | Some("all") => ReportMode::All,
        Some("failing") => ReportMode::Failing,
        Some("problem") => ReportMode::Problem,
        Some(other) => {
            ctx.error(
                format!("{key}.mode"),
                format!(
                    "{} is not a mode; give \"all\", \"failing\" or \"problem\"",
                    quote(other)
                ),
            );
            ReportMode::All
        }
    };
    let required = |ctx: &mut Ctx, field: &str, v: Option<String>, example: &str| -> String {
        match v {
            Some(v) if !v.trim().is_empty() => v,
            _ => {
                ctx.error(
                    key,
                    format!("{} {kind} reporter needs {field} = {example}", a(kind)),
                );
                String::new()
            }
        }
    };
    let kind = match kind {
        "http" => {
            let url = required(ctx, "url", r.url, "\"https://...\"");
            if !url.is_empty() {
                check_url(ctx, &format!("{key}.url"), &url);
            }
            ReporterKind::Http {
                url,
                secret: secret(ctx, &format!("{key}.secret"), r.secret.as_ref()),
                mode,
            }
        }
        "github-status" | "gitlab-status" | "gitea-status" => {
            let (forge, default_base) = match kind {
                "github-status" => (Forge::GitHub, Some("https://api.github.com")),
                "gitlab-status" => (Forge::GitLab, Some("https://gitlab.com")),
                _ => (Forge::Gitea, None),
            };
            let base_url = match (r.base_url, default_base) {
                (Some(u), _) => {
                    check_url(ctx, &format!("{key}.base_url"), &u);
                    u
                }
                (None, Some(d)) => d.to_owned(),
                (None, None) => {
                    ctx.error(
                        key,
                        format!(
                            "{} {kind} reporter needs base_url = \"https://...\", the forge's address",
                            a(kind)
                        ),
                    );
                    String::new()
                }
            };
            let token = match &r.token {
                Some(t) => secret(ctx, &format!("{key}.token"), Some(t)),
                None => {
                    ctx.error(
                        key,
                        format!(
                            "{} {kind} reporter needs token = \"%(secret:NAME)s\", an API token",
                            a(kind)
                        ),
                    );
                    None
                }
            };
            ReporterKind::CommitStatus {
                forge,
                base_url,
                token: token.unwrap_or(SecretValue::Named(String::new())),
                context: r
                    .context
                    .unwrap_or_else(|| DEFAULT_STATUS_CONTEXT.to_owned()),
            }
        }
        "email" => {
            let relay = required(ctx, "relay", r.relay, "\"smtp.example.org:587\"");
            if let Some((_, port)) = relay.rsplit_once(':')
                && port.parse::<u16>().is_err()
            {
                ctx.error(
                    format!("{key}.relay"),
                    format!("{}: give host or host:port", quote(&relay)),
                );
            }
            let from = required(ctx, "from", r.from, "\"kiln@example.org\"");
            if !from.is_empty() {
                check_address(ctx, &format!("{key}.from"), &from);
            }
            let to = r.to.unwrap_or_default();
            for a in &to {
                check_address(ctx, &format!("{key}.to"), a);
            }
            if to.is_empty() && r.lookup.is_none() {
                ctx.error(
                    key,
                    "an email reporter needs to = [...] or lookup = \"DOMAIN\" (or both), or it mails no one",
                );
            }
            let lookup = r
                .lookup
                .map(|l| resolve_lookup(ctx, &format!("{key}.lookup"), l));
            let smtp_auth = match (r.smtp_user, &r.smtp_password) {
                (Some(u), Some(p)) => {
                    secret(ctx, &format!("{key}.smtp_password"), Some(p)).map(|p| (u, p))
                }
                (None, None) => None,
                _ => {
                    ctx.error(key, "give both smtp_user and smtp_password, or neither");
                    None
                }
            };
            ReporterKind::Email {
                relay,
                from,
                to,
                lookup,
                mode,
                smtp_auth,
            }
        }
        other => {
            ctx.error(
                format!("{key}.type"),
                format!(
                    "{} is not a reporter type; give one of {}",
                    quote(other),
                    list(REPORTER_TYPES)
                ),
            );
            ReporterKind::Http {
                url: String::new(),
                secret: None,
                mode,
            }
        }
    };
    Reporter {
        name: r.name,
        builders: filter,
        buildsets: r.buildsets.unwrap_or(false),
        kind,
    }
}

/// Checks that a URL is http(s) with a host.
pub(crate) fn check_url(ctx: &mut Ctx, key: &str, url: &str) {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"));
    if rest.is_none_or(|r| r.is_empty() || r.starts_with('/') || r.contains(char::is_whitespace)) {
        ctx.error(
            key,
            format!(
                "{} is not an http:// or https:// URL with a host",
                quote(url)
            ),
        );
    }
}

/// Checks an email reporter's `lookup`: a mail domain, or a non-empty table of authors to
/// mail addresses whose names differ in more than case.
fn resolve_lookup(ctx: &mut Ctx, key: &str, l: LookupEntry) -> Lookup {
    match l {
        LookupEntry::Domain(domain) => {
            if domain.is_empty() || domain.contains(['@', ' ']) {
                ctx.error(
                    key,
                    format!(
                        "{}: give a mail domain, as \"example.org\", or a table of authors to addresses, as {{ \"jane\" = \"jane@example.org\" }}",
                        quote(&domain)
                    ),
                );
            }
            Lookup::Domain(domain)
        }
        LookupEntry::Map(entries) => {
            if entries.is_empty() {
                ctx.error(
                    key,
                    "the table names no author; map each to an address, as { \"jane\" = \"jane@example.org\" }, or give a mail domain",
                );
            }
            let mut map = std::collections::BTreeMap::new();
            let mut written: std::collections::BTreeMap<String, String> = Default::default();
            for (author, address) in entries {
                let at = format!("{key}.{}", quote(&author));
                let name = author.trim().to_lowercase();
                if name.is_empty() {
                    ctx.error(
                        &at,
                        "an empty author; give an author's name, address or user name",
                    );
                    continue;
                }
                check_address(ctx, &at, &address);
                if let Some(first) = written.get(&name) {
                    ctx.error(
                        &at,
                        format!(
                            "names the same author as {} (authors are matched ignoring case); keep one",
                            quote(first)
                        ),
                    );
                    continue;
                }
                written.insert(name.clone(), author);
                map.insert(name, address);
            }
            Lookup::Map(map)
        }
    }
}

fn check_address(ctx: &mut Ctx, key: &str, address: &str) {
    let ok = address.split_once('@').is_some_and(|(user, domain)| {
        !user.is_empty() && !domain.is_empty() && !domain.contains('@')
    }) && !address.contains(char::is_whitespace);
    if !ok {
        ctx.error(
            key,
            format!("{} is not a mail address (user@domain)", quote(address)),
        );
    }
}
