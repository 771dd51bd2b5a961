//! Schedulers as the master uses them: the kind with its own fields, builder names resolved
//! (globs expanded), cron expressions and time zones parsed, dependents checked for cycles.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::check::{self, Ctx, check_regex, list};
use super::duration;
use super::error::quote;
use super::globs::{FileFilter, Globs};
use super::refs::PolicyRef;
use super::schema::{ForceParameterEntry, SchedulerEntry};

/// A scheduler: decides when builds happen, and on which builders.
#[derive(Debug, Clone, PartialEq)]
pub struct Scheduler {
    /// Its name.
    pub name: String,
    /// The builders it starts builds on (globs expanded; at least one).
    pub builders: Vec<String>,
    /// Properties of its builds.
    pub properties: BTreeMap<String, Value>,
    /// The reason given to its builds (a template), if set.
    pub reason: Option<String>,
    /// Its kind and the kind's settings.
    pub kind: SchedulerKind,
}

/// The kinds of scheduler, with Buildbot's meanings.
#[derive(Debug, Clone, PartialEq)]
pub enum SchedulerKind {
    /// Builds changes on one branch.
    SingleBranch {
        /// The branch.
        branch: String,
        /// Which changes count.
        filter: ChangeFilter,
    },
    /// Builds changes on any branch matching.
    AnyBranch {
        /// The branches, as globs; `None` for all.
        branches: Option<Globs>,
        /// Which changes count.
        filter: ChangeFilter,
    },
    /// Builds every `interval`.
    Periodic {
        /// The time between builds (at least a second).
        interval: Duration,
        /// Only if a change arrived since the last build.
        only_if_changed: bool,
    },
    /// Builds at the times of a cron expression.
    Nightly {
        /// When.
        cron: CronSchedule,
        /// The branch to build, or the repository's default.
        branch: Option<String>,
        /// Only if a change arrived since the last build.
        only_if_changed: bool,
    },
    /// Builds when a user asks (web UI, `kiln force`).
    Force {
        /// The parameters the user fills in, besides the reason.
        parameters: Vec<ForceParameter>,
    },
    /// Builds when a trigger step asks.
    Triggerable,
    /// Builds after a successful build set of another scheduler.
    Dependent {
        /// That scheduler.
        upstream: String,
    },
    /// Builds patches sent with `kiln try`.
    Try {
        /// Who may send them; `None` for every authenticated user.
        users: Option<Vec<String>>,
    },
}

impl SchedulerKind {
    /// The kind's name in `kiln.toml`.
    pub fn type_name(&self) -> &'static str {
        match self {
            SchedulerKind::SingleBranch { .. } => "single-branch",
            SchedulerKind::AnyBranch { .. } => "any-branch",
            SchedulerKind::Periodic { .. } => "periodic",
            SchedulerKind::Nightly { .. } => "nightly",
            SchedulerKind::Force { .. } => "force",
            SchedulerKind::Triggerable => "triggerable",
            SchedulerKind::Dependent { .. } => "dependent",
            SchedulerKind::Try { .. } => "try",
        }
    }
}

/// Which changes a branch scheduler considers.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChangeFilter {
    /// Only changes to this repository.
    pub repository: Option<String>,
    /// Only changes of this project.
    pub project: Option<String>,
    /// Only changes of this codebase.
    pub codebase: Option<String>,
    /// Only changes of this category.
    pub category: Option<String>,
    /// Wait for this long without changes before building (zero: build each change).
    pub tree_stable_timer: Duration,
    /// Which files matter; `None`: all do.
    pub file_is_important: Option<FileFilter>,
    /// Ignore unimportant changes instead of building them with the next important one.
    pub only_important: bool,
    /// A change-filter policy component.
    pub policy: Option<PolicyRef>,
}

/// A cron expression in a time zone.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    /// The expression, as written.
    pub expression: String,
    /// Its time zone.
    pub timezone: chrono_tz::Tz,
    cron: croner::Cron,
}

impl PartialEq for CronSchedule {
    fn eq(&self, other: &Self) -> bool {
        self.expression == other.expression && self.timezone == other.timezone
    }
}

impl CronSchedule {
    /// Parses a five-field expression (or `@daily` and friends) in a time zone.
    pub(crate) fn new(expression: &str, timezone: chrono_tz::Tz) -> Result<Self, String> {
        let cron = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Disallowed)
            .build()
            .parse(expression)
            .map_err(|e| {
                format!(
                    "{expression:?} is not a cron expression ({e}); write five fields: minute hour day-of-month month day-of-week, as \"0 3 * * 1-5\""
                )
            })?;
        Ok(CronSchedule {
            expression: expression.to_owned(),
            timezone,
            cron,
        })
    }

    /// The first time strictly after `after` that the expression matches.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = after.with_timezone(&self.timezone);
        self.cron
            .find_next_occurrence(&local, false)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }
}

/// A parameter of a force scheduler.
#[derive(Debug, Clone, PartialEq)]
pub struct ForceParameter {
    /// Its name, also the property's.
    pub name: String,
    /// Its label in the web UI.
    pub label: String,
    /// Whether a value must be given.
    pub required: bool,
    /// Its type, default and constraints.
    pub kind: ForceParameterKind,
}

/// The type of a force parameter.
#[derive(Debug, Clone, PartialEq)]
pub enum ForceParameterKind {
    /// Text, optionally matching a regular expression.
    String {
        /// The initial value.
        default: Option<String>,
        /// A regular expression the whole value must match.
        regex: Option<String>,
    },
    /// An integer.
    Int {
        /// The initial value.
        default: Option<i64>,
    },
    /// A checkbox.
    Bool {
        /// The initial value.
        default: bool,
    },
    /// One of a list.
    Choice {
        /// The values offered.
        choices: Vec<String>,
        /// The initial value (one of `choices`).
        default: Option<String>,
    },
}

/// The scheduler types, for messages.
pub(crate) const TYPES: &[&str] = &[
    "single-branch",
    "any-branch",
    "periodic",
    "nightly",
    "force",
    "triggerable",
    "dependent",
    "try",
];

/// The fields each type takes besides name, type, builders, properties and reason.
fn fields_of(kind: &str) -> &'static [&'static str] {
    const BRANCH: &[&str] = &[
        "branch",
        "repository",
        "project",
        "codebase",
        "category",
        "tree_stable_timer",
        "file_is_important",
        "only_important",
        "policy",
    ];
    const ANY: &[&str] = &[
        "branches",
        "repository",
        "project",
        "codebase",
        "category",
        "tree_stable_timer",
        "file_is_important",
        "only_important",
        "policy",
    ];
    match kind {
        "single-branch" => BRANCH,
        "any-branch" => ANY,
        "periodic" => &["interval", "only_if_changed"],
        "nightly" => &["cron", "timezone", "branch", "only_if_changed"],
        "force" => &["parameters"],
        "dependent" => &["upstream"],
        "try" => &["users"],
        _ => &[],
    }
}

/// Resolves a `[[schedulers]]` entry (its name is checked by the caller).
pub(crate) fn resolve(
    ctx: &mut Ctx,
    key: &str,
    mut s: SchedulerEntry,
    builders: &[&str],
) -> Scheduler {
    let properties = check::properties(
        ctx,
        &format!("{key}.properties"),
        std::mem::take(&mut s.properties),
    );
    let kind_name = s.kind.as_str();
    if !TYPES.contains(&kind_name) {
        ctx.error(
            format!("{key}.type"),
            format!(
                "{} is not a scheduler type; give one of {}",
                quote(kind_name),
                list(TYPES)
            ),
        );
    }
    let given: Vec<(&str, bool)> = vec![
        ("branch", s.branch.is_some()),
        ("branches", s.branches.is_some()),
        ("repository", s.repository.is_some()),
        ("project", s.project.is_some()),
        ("codebase", s.codebase.is_some()),
        ("category", s.category.is_some()),
        ("tree_stable_timer", s.tree_stable_timer.is_some()),
        ("file_is_important", s.file_is_important.is_some()),
        ("only_important", s.only_important.is_some()),
        ("policy", s.policy.is_some()),
        ("interval", s.interval.is_some()),
        ("only_if_changed", s.only_if_changed.is_some()),
        ("cron", s.cron.is_some()),
        ("timezone", s.timezone.is_some()),
        ("parameters", s.parameters.is_some()),
        ("upstream", s.upstream.is_some()),
        ("users", s.users.is_some()),
    ];
    if TYPES.contains(&kind_name) {
        let allowed = fields_of(kind_name);
        for (field, set) in given {
            if set && !allowed.contains(&field) {
                ctx.error(
                    format!("{key}.{field}"),
                    format!(
                        "does not apply to {} {kind_name} scheduler (its own fields: {})",
                        check::a(kind_name),
                        list(allowed)
                    ),
                );
            }
        }
    }

    let names = match &s.builders {
        None => {
            ctx.error(
                key,
                format!(
                    "has no builders; add builders = [...] with the builders it starts (defined: {})",
                    list(builders)
                ),
            );
            Vec::new()
        }
        Some(b) if b.is_empty() => {
            ctx.error(
                format!("{key}.builders"),
                format!(
                    "is empty; name at least one builder (defined: {})",
                    list(builders)
                ),
            );
            Vec::new()
        }
        Some(b) => check::builder_refs(ctx, &format!("{key}.builders"), b, builders),
    };

    let filter = |ctx: &mut Ctx, s: &SchedulerEntry| -> ChangeFilter {
        let file_is_important = s
            .file_is_important
            .as_ref()
            .and_then(|p| ctx.check(format!("{key}.file_is_important"), FileFilter::new(p)));
        let only_important = s.only_important.unwrap_or(false);
        if only_important && s.file_is_important.is_none() {
            ctx.error(
                format!("{key}.only_important"),
                "needs file_is_important, which says which files are important",
            );
        }
        ChangeFilter {
            repository: s.repository.clone(),
            project: s.project.clone(),
            codebase: s.codebase.clone(),
            category: s.category.clone(),
            tree_stable_timer: s
                .tree_stable_timer
                .as_ref()
                .and_then(|t| ctx.check(format!("{key}.tree_stable_timer"), duration::parse(&t.0)))
                .unwrap_or(Duration::ZERO),
            file_is_important,
            only_important,
            policy: s.policy.as_ref().and_then(|p| {
                ctx.check(
                    format!("{key}.policy"),
                    PolicyRef::parse(p, &ctx.dir.clone()),
                )
            }),
        }
    };

    let kind = match kind_name {
        "single-branch" => {
            let branch = match &s.branch {
                Some(b) if !b.trim().is_empty() => b.clone(),
                Some(_) => {
                    ctx.error(
                        format!("{key}.branch"),
                        "is empty; name the branch to build",
                    );
                    String::new()
                }
                None => {
                    ctx.error(
                        key,
                        "a single-branch scheduler needs branch = \"...\" (use any-branch for several branches)",
                    );
                    String::new()
                }
            };
            SchedulerKind::SingleBranch {
                branch,
                filter: filter(ctx, &s),
            }
        }
        "any-branch" => SchedulerKind::AnyBranch {
            branches: s
                .branches
                .as_ref()
                .and_then(|b| ctx.check(format!("{key}.branches"), Globs::new(b, true))),
            filter: filter(ctx, &s),
        },
        "periodic" => {
            let interval = match &s.interval {
                Some(t) => ctx.check(
                    format!("{key}.interval"),
                    duration::parse_at_least(&t.0, Duration::from_secs(1)),
                ),
                None => {
                    ctx.error(
                        key,
                        "a periodic scheduler needs interval = \"...\", as \"1h\"",
                    );
                    None
                }
            };
            SchedulerKind::Periodic {
                interval: interval.unwrap_or(Duration::from_secs(3600)),
                only_if_changed: s.only_if_changed.unwrap_or(false),
            }
        }
        "nightly" => {
            let timezone = match &s.timezone {
                None => Some(chrono_tz::UTC),
                Some(tz) => ctx.check(
                    format!("{key}.timezone"),
                    chrono_tz::Tz::from_str(tz).map_err(|_| {
                        format!(
                            "{} is not a time zone; give an IANA name, as \"Europe/Paris\" or \"UTC\"",
                            quote(tz)
                        )
                    }),
                ),
            };
            let cron = match &s.cron {
                None => {
                    ctx.error(
                        key,
                        "a nightly scheduler needs cron = \"...\", as \"0 3 * * *\" (03:00 every day)",
                    );
                    None
                }
                Some(c) => ctx.check(
                    format!("{key}.cron"),
                    CronSchedule::new(c, timezone.unwrap_or(chrono_tz::UTC)),
                ),
            };
            SchedulerKind::Nightly {
                cron: cron.unwrap_or_else(|| {
                    CronSchedule::new("0 0 * * *", chrono_tz::UTC).expect("a valid expression")
                }),
                branch: s.branch.clone(),
                only_if_changed: s.only_if_changed.unwrap_or(false),
            }
        }
        "force" => SchedulerKind::Force {
            parameters: force_parameters(ctx, key, s.parameters.unwrap_or_default()),
        },
        "dependent" => {
            if s.upstream.is_none() {
                ctx.error(
                    key,
                    "a dependent scheduler needs upstream = \"...\", the scheduler whose builds it follows",
                );
            }
            SchedulerKind::Dependent {
                upstream: s.upstream.unwrap_or_default(),
            }
        }
        "try" => {
            if let Some(users) = &s.users
                && users.iter().any(|u| u.trim().is_empty())
            {
                ctx.error(format!("{key}.users"), "has an empty user name; remove it");
            }
            SchedulerKind::Try { users: s.users }
        }
        _ => SchedulerKind::Triggerable,
    };
    Scheduler {
        name: s.name.clone(),
        builders: names,
        properties,
        reason: s.reason,
        kind,
    }
}

const PARAMETER_TYPES: &[&str] = &["string", "int", "bool", "choice"];

fn force_parameters(
    ctx: &mut Ctx,
    key: &str,
    entries: Vec<ForceParameterEntry>,
) -> Vec<ForceParameter> {
    let mut out: Vec<ForceParameter> = Vec::new();
    for (i, p) in entries.into_iter().enumerate() {
        let pkey = format!("{key}.parameters[{i}]");
        if let Err(e) = kiln_protocol::props::check_property_name(&p.name) {
            ctx.error(format!("{pkey}.name"), e);
        } else if p.name == "reason" {
            ctx.error(
                format!("{pkey}.name"),
                "\"reason\" is always asked for; choose another name",
            );
        } else if out.iter().any(|o| o.name == p.name) {
            ctx.error(
                format!("{pkey}.name"),
                format!("parameter {} is defined twice", quote(&p.name)),
            );
        }
        let kind = p.kind.as_str();
        if p.choices.is_some() && kind != "choice" {
            ctx.error(
                format!("{pkey}.choices"),
                format!("only a choice parameter has choices (this one is {kind:?})"),
            );
        }
        if p.regex.is_some() && kind != "string" {
            ctx.error(
                format!("{pkey}.regex"),
                format!("only a string parameter has a regex (this one is {kind:?})"),
            );
        }
        let dkey = format!("{pkey}.default");
        let wrong_default = |ctx: &mut Ctx, want: &str| {
            ctx.error(
                &dkey,
                format!(
                    "{} is not {want}, the type of this parameter",
                    p.default.as_ref().map_or(String::new(), |d| d.to_string())
                ),
            )
        };
        let kind = match kind {
            "string" => {
                let default = match &p.default {
                    None => None,
                    Some(toml::Value::String(s)) => Some(s.clone()),
                    Some(_) => {
                        wrong_default(ctx, "a string");
                        None
                    }
                };
                if let Some(re) = &p.regex {
                    ctx.check(format!("{pkey}.regex"), check_regex(re));
                }
                ForceParameterKind::String {
                    default,
                    regex: p.regex,
                }
            }
            "int" => ForceParameterKind::Int {
                default: match &p.default {
                    None => None,
                    Some(toml::Value::Integer(n)) => Some(*n),
                    Some(_) => {
                        wrong_default(ctx, "an integer");
                        None
                    }
                },
            },
            "bool" => ForceParameterKind::Bool {
                default: match &p.default {
                    None => false,
                    Some(toml::Value::Boolean(b)) => *b,
                    Some(_) => {
                        wrong_default(ctx, "true or false");
                        false
                    }
                },
            },
            "choice" => {
                let choices = p.choices.unwrap_or_default();
                if choices.is_empty() {
                    ctx.error(
                        &pkey,
                        "a choice parameter needs choices = [...], at least one",
                    );
                }
                let default = match &p.default {
                    None => None,
                    Some(toml::Value::String(s)) if choices.contains(s) => Some(s.clone()),
                    Some(toml::Value::String(s)) => {
                        ctx.error(
                            &dkey,
                            format!(
                                "{} is not one of the choices ({})",
                                quote(s),
                                list(&choices)
                            ),
                        );
                        None
                    }
                    Some(_) => {
                        wrong_default(ctx, "a string");
                        None
                    }
                };
                ForceParameterKind::Choice { choices, default }
            }
            other => {
                ctx.error(
                    format!("{pkey}.type"),
                    format!(
                        "{} is not a parameter type; give one of {}",
                        quote(other),
                        list(PARAMETER_TYPES)
                    ),
                );
                continue;
            }
        };
        out.push(ForceParameter {
            label: p.label.unwrap_or_else(|| p.name.clone()),
            name: p.name,
            required: p.required.unwrap_or(false),
            kind,
        });
    }
    out
}

/// Checks that every dependent's upstream exists and that dependents form no cycle.
pub(crate) fn check_dependents(ctx: &mut Ctx, schedulers: &[(String, Scheduler)]) {
    let upstream_of = |name: &str| {
        schedulers.iter().find_map(|(_, s)| match &s.kind {
            SchedulerKind::Dependent { upstream } if s.name == name => Some(upstream.as_str()),
            _ => None,
        })
    };
    let names: Vec<&str> = schedulers.iter().map(|(_, s)| s.name.as_str()).collect();
    let mut reported: Vec<&str> = Vec::new();
    for (key, s) in schedulers {
        let SchedulerKind::Dependent { upstream } = &s.kind else {
            continue;
        };
        if upstream.is_empty() {
            continue;
        }
        if !names.contains(&upstream.as_str()) {
            let others: Vec<&str> = names.iter().copied().filter(|n| *n != s.name).collect();
            ctx.error(
                format!("{key}.upstream"),
                format!(
                    "names scheduler {}, which is not defined (defined: {})",
                    quote(upstream),
                    list(others)
                ),
            );
            continue;
        }
        // Follow the chain of upstreams; coming back to `s` is a cycle.
        let mut chain = vec![s.name.as_str()];
        let mut at = upstream.as_str();
        let cycle = loop {
            if at == s.name {
                break true;
            }
            if chain.contains(&at) {
                break false; // a cycle further up, reported from one of its members
            }
            chain.push(at);
            match upstream_of(at) {
                Some(next) => at = next,
                None => break false,
            }
        };
        if cycle && !chain.iter().any(|n| reported.contains(n)) {
            reported.extend(chain.iter().copied());
            chain.push(s.name.as_str());
            ctx.error(
                format!("{key}.upstream"),
                format!(
                    "dependent schedulers form a cycle ({}), so none of them would ever build; make one depend on a scheduler that is not dependent",
                    chain.join(" -> ")
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cron_in_a_time_zone() {
        let c = CronSchedule::new("0 3 * * 1-5", chrono_tz::Europe::Paris).unwrap();
        let after: DateTime<Utc> = "2025-01-03T12:00:00Z".parse().unwrap(); // a Friday
        assert_eq!(
            c.next_after(after).unwrap().to_rfc3339(),
            "2025-01-06T02:00:00+00:00"
        );
        assert!(CronSchedule::new("0 3 * *", chrono_tz::UTC).is_err());
        assert!(CronSchedule::new("0 0 3 * * *", chrono_tz::UTC).is_err());
        assert!(CronSchedule::new("@daily", chrono_tz::UTC).is_ok());
    }
}
