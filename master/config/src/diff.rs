//! What changed between two configurations, for a reload (SIGHUP, `kiln reconfig`).

use std::fmt;

use super::Config;

/// Names added, removed and changed in one list of the configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// In the new configuration only, in its order.
    pub added: Vec<String>,
    /// In the old configuration only, in its order.
    pub removed: Vec<String>,
    /// In both, but different, in the new configuration's order.
    pub changed: Vec<String>,
}

impl Changes {
    fn of<T: PartialEq>(old: &[T], new: &[T], name: impl Fn(&T) -> &str) -> Changes {
        let find = |list: &[T], n: &str| list.iter().position(|x| name(x) == n);
        let mut c = Changes::default();
        for n in new {
            match find(old, name(n)) {
                None => c.added.push(name(n).to_owned()),
                Some(i) if old[i] != *n => c.changed.push(name(n).to_owned()),
                Some(_) => {}
            }
        }
        for o in old {
            if find(new, name(o)).is_none() {
                c.removed.push(name(o).to_owned());
            }
        }
        c
    }

    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// The difference between a running configuration and a new one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigDiff {
    /// Workers.
    pub workers: Changes,
    /// Builders (including those a matrix generates).
    pub builders: Changes,
    /// Schedulers.
    pub schedulers: Changes,
    /// Change sources.
    pub change_sources: Changes,
    /// Reporters.
    pub reporters: Changes,
    /// Whether the global properties changed.
    pub properties: bool,
    /// Whether the secret providers changed.
    pub secrets: bool,
    /// Whether any hook changed.
    pub hooks: bool,
    /// `[master]` settings that changed (`name`, `database`, `listen`, `url`, `title`,
    /// `heartbeat`, `tls`, `anonymous`). `name`, `database`, `listen` and `tls` take effect only after a
    /// restart.
    pub master: Vec<&'static str>,
}

/// The `[master]` settings a reload cannot apply.
pub const RESTART_SETTINGS: &[&str] = &["name", "database", "listen", "tls"];

impl ConfigDiff {
    pub(crate) fn between(old: &Config, new: &Config) -> ConfigDiff {
        let (a, b) = (&old.master, &new.master);
        let master = [
            ("name", a.name != b.name),
            ("database", a.database != b.database),
            ("listen", a.listen != b.listen),
            ("url", a.url != b.url),
            ("title", a.title != b.title),
            ("heartbeat", a.heartbeat != b.heartbeat),
            ("tls", a.tls != b.tls),
            ("anonymous", a.anonymous != b.anonymous),
        ]
        .into_iter()
        .filter_map(|(k, changed)| changed.then_some(k))
        .collect();
        ConfigDiff {
            workers: Changes::of(&old.workers, &new.workers, |w| &w.name),
            builders: Changes::of(&old.builders, &new.builders, |b| &b.name),
            schedulers: Changes::of(&old.schedulers, &new.schedulers, |s| &s.name),
            change_sources: Changes::of(&old.change_sources, &new.change_sources, |c| &c.name),
            reporters: Changes::of(&old.reporters, &new.reporters, |r| &r.name),
            properties: old.properties != new.properties,
            secrets: old.secrets != new.secrets,
            hooks: old.hooks != new.hooks,
            master,
        }
    }

    /// Whether the configurations are the same.
    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
            && self.builders.is_empty()
            && self.schedulers.is_empty()
            && self.change_sources.is_empty()
            && self.reporters.is_empty()
            && !self.properties
            && !self.secrets
            && !self.hooks
            && self.master.is_empty()
    }

    /// The changed `[master]` settings that need a restart to take effect.
    pub fn needs_restart(&self) -> Vec<&'static str> {
        self.master
            .iter()
            .copied()
            .filter(|k| RESTART_SETTINGS.contains(k))
            .collect()
    }
}

/// One line per changed part: `builders: added a, b; changed c; removed d`, or `no changes`.
impl fmt::Display for ConfigDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut lines = Vec::new();
        for (what, c) in [
            ("workers", &self.workers),
            ("builders", &self.builders),
            ("schedulers", &self.schedulers),
            ("change sources", &self.change_sources),
            ("reporters", &self.reporters),
        ] {
            let parts: Vec<String> = [
                ("added", &c.added),
                ("changed", &c.changed),
                ("removed", &c.removed),
            ]
            .into_iter()
            .filter(|(_, names)| !names.is_empty())
            .map(|(verb, names)| format!("{verb} {}", names.join(", ")))
            .collect();
            if !parts.is_empty() {
                lines.push(format!("{what}: {}", parts.join("; ")));
            }
        }
        for (what, changed) in [
            ("properties", self.properties),
            ("secrets", self.secrets),
            ("hooks", self.hooks),
        ] {
            if changed {
                lines.push(format!("{what}: changed"));
            }
        }
        if !self.master.is_empty() {
            let restart = self.needs_restart();
            let mut line = format!("master: changed {}", self.master.join(", "));
            if !restart.is_empty() {
                line.push_str(&format!(" (needs a restart: {})", restart.join(", ")));
            }
            lines.push(line);
        }
        if lines.is_empty() {
            f.write_str("no changes")
        } else {
            f.write_str(&lines.join("\n"))
        }
    }
}
