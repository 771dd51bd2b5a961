//! Glob lists (branches, builder names) and the file-is-important filter, compiled once.

use std::fmt;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

/// Compiled globs, compared and printed by their patterns.
#[derive(Clone)]
pub struct Globs {
    patterns: Vec<String>,
    set: GlobSet,
}

impl Globs {
    /// Compiles `patterns`. With `paths`, `*` stops at `/` and `**` crosses it (file paths,
    /// branch names); otherwise `*` matches anything.
    pub(crate) fn new(patterns: &[String], paths: bool) -> Result<Globs, String> {
        let mut builder = GlobSetBuilder::new();
        for p in patterns {
            let glob = GlobBuilder::new(p)
                .literal_separator(paths)
                .backslash_escape(true)
                .build()
                .map_err(|e| format!("{p:?} is not a valid glob: {}", e.kind()))?;
            builder.add(glob);
        }
        let set = builder
            .build()
            .map_err(|e| format!("the globs are not valid: {e}"))?;
        Ok(Globs {
            patterns: patterns.to_vec(),
            set,
        })
    }

    /// Whether any of the globs matches.
    pub fn is_match(&self, text: &str) -> bool {
        self.set.is_match(text)
    }

    /// The patterns, as written.
    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }
}

impl PartialEq for Globs {
    fn eq(&self, other: &Self) -> bool {
        self.patterns == other.patterns
    }
}

impl fmt::Debug for Globs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Globs").field(&self.patterns).finish()
    }
}

/// Buildbot's `fileIsImportant` as globs: a file is important if it matches an include
/// (or there are none) and no exclude (`!pattern`).
#[derive(Debug, Clone, PartialEq)]
pub struct FileFilter {
    include: Option<Globs>,
    exclude: Option<Globs>,
}

impl FileFilter {
    /// Compiles the patterns; those starting with `!` exclude.
    pub(crate) fn new(patterns: &[String]) -> Result<FileFilter, String> {
        let (exclude, include): (Vec<&String>, Vec<&String>) =
            patterns.iter().partition(|p| p.starts_with('!'));
        let exclude: Vec<String> = exclude.iter().map(|p| p[1..].to_owned()).collect();
        let include: Vec<String> = include.into_iter().cloned().collect();
        let compile = |ps: &[String]| -> Result<Option<Globs>, String> {
            if ps.is_empty() {
                Ok(None)
            } else {
                Globs::new(ps, true).map(Some)
            }
        };
        Ok(FileFilter {
            include: compile(&include)?,
            exclude: compile(&exclude)?,
        })
    }

    /// Whether a changed file is important.
    pub fn is_important(&self, path: &str) -> bool {
        self.include.as_ref().is_none_or(|g| g.is_match(path))
            && !self.exclude.as_ref().is_some_and(|g| g.is_match(path))
    }

    /// Whether a change is important: at least one of its files is. A change that lists no
    /// files is important (Buildbot's rule: nothing says it is not).
    pub fn change_is_important<'a>(&self, files: impl IntoIterator<Item = &'a str>) -> bool {
        let mut any = false;
        for f in files {
            if self.is_important(f) {
                return true;
            }
            any = true;
        }
        !any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_filter() {
        let f = FileFilter::new(&["src/**".into(), "!src/**/*.md".into()]).unwrap();
        assert!(f.is_important("src/a/b.rs"));
        assert!(!f.is_important("src/a/README.md"));
        assert!(!f.is_important("docs/x.rs"));
        assert!(f.change_is_important(["docs/x", "src/x.rs"]));
        assert!(!f.change_is_important(["docs/x"]));
        assert!(f.change_is_important([]));
        let only_exclude = FileFilter::new(&["!docs/**".into()]).unwrap();
        assert!(only_exclude.is_important("src/x.rs"));
        assert!(!only_exclude.is_important("docs/a/b"));
    }

    #[test]
    fn globs() {
        let g = Globs::new(&["release/*".into()], true).unwrap();
        assert!(g.is_match("release/1.0"));
        assert!(!g.is_match("release/1.0/x"));
        assert!(!g.is_match("main"));
        assert_eq!(
            Globs::new(&["a[".into()], true).unwrap_err(),
            "\"a[\" is not a valid glob: unclosed character class; missing ']'"
        );
    }
}
