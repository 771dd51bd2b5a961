//! A build's properties, layered as Buildbot layers them (global, then the buildset's own:
//! scheduler, change and force-form properties, then builder, worker and build), each with its
//! source recorded; and the master's half of interpolation: `%(src:CODEBASE:ATTR)s`, which only
//! the master can answer. `%(prop:...)s` and `%(secret:...)s` are left for the worker, which
//! renders them when each step starts, so a step sees properties set by the steps before it.

use serde_json::{Map, Value};

use kiln_db::model::{SourceStamp, SourcedProperty};
use runtime::Properties;

/// Facts about the build itself, set with source "Build".
#[derive(Debug, Clone, Default)]
pub struct BuildFacts<'a> {
    /// The builder's name.
    pub builder: &'a str,
    /// The build number within its builder.
    pub number: i64,
    /// The worker running it.
    pub worker: Option<&'a str>,
    /// The scheduler that asked for it.
    pub scheduler: Option<&'a str>,
    /// Why.
    pub reason: &'a str,
    /// The authors of its changes.
    pub blamelist: &'a [String],
}

/// One layer of properties.
fn layer(props: &mut Properties, map: &Map<String, Value>, source: &str) {
    for (name, value) in map {
        props.set(name.clone(), value.clone(), source);
    }
}

/// The properties a build starts with. Later layers win.
pub fn for_build(
    global: &Map<String, Value>,
    buildset: &[SourcedProperty],
    builder_props: &Map<String, Value>,
    worker_props: &Map<String, Value>,
    stamps: &[SourceStamp],
    facts: &BuildFacts<'_>,
) -> Properties {
    let mut props = Properties::new();
    layer(&mut props, global, "Global");
    for p in buildset {
        props.set(p.name.clone(), p.value.clone(), p.source.clone());
    }
    layer(
        &mut props,
        builder_props,
        &format!("Builder {}", facts.builder),
    );
    if let Some(worker) = facts.worker {
        layer(&mut props, worker_props, &format!("Worker {worker}"));
    }
    // As Buildbot does, the first source stamp names the build's branch and revision.
    if let Some(ss) = stamps.first() {
        let opt = |v: &Option<String>| v.clone().map_or(Value::Null, Value::String);
        props.set("branch", opt(&ss.branch), "Build");
        props.set("revision", opt(&ss.revision), "Build");
        props.set("repository", Value::String(ss.repository.clone()), "Build");
        props.set("project", Value::String(ss.project.clone()), "Build");
        props.set("codebase", Value::String(ss.codebase.clone()), "Build");
    }
    props.set("buildername", Value::from(facts.builder), "Build");
    props.set("buildnumber", Value::from(facts.number), "Build");
    if let Some(w) = facts.worker {
        props.set("workername", Value::from(w), "Build");
    }
    if let Some(s) = facts.scheduler {
        props.set("scheduler", Value::from(s), "Build");
    }
    props.set("reason", Value::from(facts.reason), "Build");
    props.set("blamelist", Value::from(facts.blamelist.to_vec()), "Build");
    props
}

/// A `%(src:...)s` reference the master cannot answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceRefError {
    /// No source stamp for the codebase.
    #[error(
        "%(src:{codebase}:{attr})s: the build has no source stamp for codebase {codebase:?} (codebases: {known})"
    )]
    NoCodebase {
        /// Codebase asked for.
        codebase: String,
        /// Attribute asked for.
        attr: String,
        /// The build's codebases.
        known: String,
    },
    /// Unknown attribute.
    #[error(
        "%(src:{codebase}:{attr})s: unknown attribute {attr:?}; use branch, revision, repository, project or codebase"
    )]
    UnknownAttribute {
        /// Codebase asked for.
        codebase: String,
        /// Attribute asked for.
        attr: String,
    },
    /// The attribute is unset and no default was given.
    #[error(
        "%(src:{codebase}:{attr})s: the source stamp has no {attr}; give a default as %(src:{codebase}:{attr}:-DEFAULT)s"
    )]
    Unset {
        /// Codebase asked for.
        codebase: String,
        /// Attribute asked for.
        attr: String,
    },
    /// Not closed by `)s`.
    #[error("{0:?}: a %(src:...)s reference is not closed with \")s\"")]
    Unclosed(String),
}

fn render_src_in(text: &str, stamps: &[SourceStamp]) -> Result<String, SourceRefError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        if rest.starts_with("%%") {
            out.push_str("%%");
            rest = &rest[2..];
            continue;
        }
        let Some(body) = rest.strip_prefix("%(src:") else {
            out.push('%');
            rest = &rest[1..];
            continue;
        };
        let Some(end) = body.find(")s") else {
            return Err(SourceRefError::Unclosed(text.to_owned()));
        };
        let spec = &body[..end];
        rest = &body[end + 2..];
        let (codebase, attr_default) = spec.split_once(':').unwrap_or(("", spec));
        let (attr, default) = match attr_default.split_once(":-") {
            Some((a, d)) => (a, Some(d)),
            None => (attr_default, None),
        };
        let Some(ss) = stamps.iter().find(|s| s.codebase == codebase) else {
            return Err(SourceRefError::NoCodebase {
                codebase: codebase.into(),
                attr: attr.into(),
                known: stamps
                    .iter()
                    .map(|s| format!("{:?}", s.codebase))
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        let value = match attr {
            "branch" => ss.branch.clone(),
            "revision" => ss.revision.clone(),
            "repository" => Some(ss.repository.clone()).filter(|s| !s.is_empty()),
            "project" => Some(ss.project.clone()).filter(|s| !s.is_empty()),
            "codebase" => Some(ss.codebase.clone()),
            _ => {
                return Err(SourceRefError::UnknownAttribute {
                    codebase: codebase.into(),
                    attr: attr.into(),
                });
            }
        };
        match (value, default) {
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => {
                return Err(SourceRefError::Unset {
                    codebase: codebase.into(),
                    attr: attr.into(),
                });
            }
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Replaces every `%(src:CODEBASE:ATTR)s` (`%(src::branch)s` for the default codebase) in the
/// strings of `args`, leaving other interpolations for the worker.
pub fn render_sources(args: &Value, stamps: &[SourceStamp]) -> Result<Value, SourceRefError> {
    Ok(match args {
        Value::String(s) if s.contains("%(src:") => Value::String(render_src_in(s, stamps)?),
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| render_sources(v, stamps))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), render_sources(v, stamps)?)))
                .collect::<Result<_, _>>()?,
        ),
        other => other.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn stamp() -> Vec<SourceStamp> {
        vec![
            SourceStamp {
                repository: "https://example.org/app.git".into(),
                branch: Some("main".into()),
                ..Default::default()
            },
            SourceStamp {
                codebase: "lib".into(),
                revision: Some("abc".into()),
                ..Default::default()
            },
        ]
    }

    #[test]
    fn source_references_render_and_leave_the_rest_to_the_worker() {
        let args = json!({
            "repourl": "%(src::repository)s",
            "argv": ["git", "checkout", "%(src:lib:revision)s", "%(prop:x)s", "100%% %(src::branch)s"],
            "n": 3,
            "ref": "%(src::revision:-HEAD)s",
            "literal": "%%(src::branch)s",
        });
        assert_eq!(
            render_sources(&args, &stamp()).unwrap(),
            json!({
                "repourl": "https://example.org/app.git",
                "argv": ["git", "checkout", "abc", "%(prop:x)s", "100%% main"],
                "n": 3,
                "ref": "HEAD",
                "literal": "%%(src::branch)s",
            })
        );
    }

    #[test]
    fn bad_source_references_say_what_to_write() {
        let e = |s: &str| render_sources(&json!(s), &stamp()).unwrap_err().to_string();
        assert_eq!(
            e("%(src:web:branch)s"),
            "%(src:web:branch)s: the build has no source stamp for codebase \"web\" (codebases: \"\", \"lib\")"
        );
        assert_eq!(
            e("%(src::colour)s"),
            "%(src::colour)s: unknown attribute \"colour\"; use branch, revision, repository, project or codebase"
        );
        assert_eq!(
            e("%(src::revision)s"),
            "%(src::revision)s: the source stamp has no revision; give a default as %(src::revision:-DEFAULT)s"
        );
        assert_eq!(
            e("x %(src::branch"),
            "\"x %(src::branch\": a %(src:...)s reference is not closed with \")s\""
        );
    }

    #[test]
    fn layers_later_win_and_sources_are_recorded() {
        let global = json!({"a": 1, "b": 1, "c": 1, "d": 1})
            .as_object()
            .unwrap()
            .clone();
        let buildset = vec![SourcedProperty {
            name: "b".into(),
            value: json!(2),
            source: "Scheduler nightly".into(),
        }];
        let builder = json!({"c": 3}).as_object().unwrap().clone();
        let worker = json!({"d": 4}).as_object().unwrap().clone();
        let blame = vec!["ada".to_string()];
        let p = for_build(
            &global,
            &buildset,
            &builder,
            &worker,
            &stamp(),
            &BuildFacts {
                builder: "linux",
                number: 7,
                worker: Some("w1"),
                scheduler: Some("nightly"),
                reason: "because",
                blamelist: &blame,
            },
        );
        let src = |n: &str| p.get_property(n).unwrap().source.clone();
        assert_eq!(p.get("a"), Some(&json!(1)));
        assert_eq!(src("a"), "Global");
        assert_eq!(
            (p.get("b"), src("b").as_str()),
            (Some(&json!(2)), "Scheduler nightly")
        );
        assert_eq!(src("c"), "Builder linux");
        assert_eq!(src("d"), "Worker w1");
        assert_eq!(p.get("branch"), Some(&json!("main")));
        assert_eq!(p.get("revision"), Some(&Value::Null));
        assert_eq!(p.get("buildnumber"), Some(&json!(7)));
        assert_eq!(p.get("workername"), Some(&json!("w1")));
        assert_eq!(p.get("blamelist"), Some(&json!(["ada"])));
    }
}
