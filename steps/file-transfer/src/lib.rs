//! The file transfer steps, as Buildbot's FileUpload, DirectoryUpload and FileDownload: move
//! files between the workdir and the farm's file store (locally, a directory). The host does
//! the copying: it never follows a symlink, never leaves the workdir, enforces the grant's size
//! limit and records SHA-1 and SHA-256; these steps check their arguments, apply their own size
//! limit and report.

use guest_sdk::Artifact;
use guest_sdk::prelude::*;
use serde::Deserialize;

/// The arguments; `mode` is fixed by the built-in (`file-upload`, `directory-upload`,
/// `file-download`).
#[derive(Debug, Deserialize)]
#[serde(tag = "mode", rename_all = "kebab-case", deny_unknown_fields)]
enum Args {
    /// A regular file of the workdir to the store.
    FileUpload {
        source: String,
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        max_size: Option<u64>,
        #[serde(default)]
        property: Option<String>,
    },
    /// A directory of the workdir to the store, as a tar stream.
    DirectoryUpload {
        source: String,
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        max_size: Option<u64>,
        #[serde(default)]
        property: Option<String>,
    },
    /// A file of the store into the workdir.
    FileDownload {
        name: String,
        dest: String,
        #[serde(default)]
        max_size: Option<u64>,
    },
}

/// The last part of a path, for a default artifact name.
fn base_name(path: &str) -> &str {
    path.trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or(path)
}

fn report(
    ctx: &mut StepContext,
    verb: &str,
    a: &Artifact,
    max_size: Option<u64>,
    property: Option<&str>,
) -> StepResult {
    ctx.stdout(&format!(
        "{verb} {}: {} bytes, sha1 {}, sha256 {}",
        a.name, a.size, a.sha1, a.sha256
    ));
    ctx.set_statistic("bytes", a.size as f64);
    if let Some(p) = property {
        ctx.set_property(
            p,
            serde_json::json!({"name": a.name, "size": a.size, "sha1": a.sha1, "sha256": a.sha256}),
        )?;
    }
    if let Some(max) = max_size
        && a.size > max
    {
        return Err(Error::msg(format!(
            "{} is {} bytes, more than max_size {max}",
            a.name, a.size
        )));
    }
    ctx.set_summary(&format!("{verb} {} ({} bytes)", a.name, a.size));
    Ok(Outcome::Success)
}

fn run(ctx: &mut StepContext) -> StepResult {
    match ctx.args::<Args>()? {
        Args::FileUpload {
            source,
            name,
            max_size,
            property,
        } => {
            if let Some(max) = max_size {
                // Checked before copying when the size is known; symlinks are not followed.
                let meta = std::fs::symlink_metadata(&source)
                    .map_err(|e| Error::msg(format!("{source}: {e}")))?;
                if meta.len() > max {
                    return Err(Error::msg(format!(
                        "{source} is {} bytes, more than max_size {max}",
                        meta.len()
                    )));
                }
            }
            let name = name.unwrap_or_else(|| base_name(&source).to_owned());
            let a = ctx.upload(&source, &name)?;
            report(ctx, "uploaded", &a, max_size, property.as_deref())
        }
        Args::DirectoryUpload {
            source,
            name,
            max_size,
            property,
        } => {
            let name = name.unwrap_or_else(|| format!("{}.tar", base_name(&source)));
            let a = ctx.upload_directory(&source, &name)?;
            report(ctx, "uploaded", &a, max_size, property.as_deref())
        }
        Args::FileDownload {
            name,
            dest,
            max_size,
        } => {
            let a = ctx.download(&name, &dest)?;
            if let Some(max) = max_size
                && a.size > max
            {
                let _ = std::fs::remove_file(&dest);
                return Err(Error::msg(format!(
                    "{name} is {} bytes, more than max_size {max}; removed {dest}",
                    a.size
                )));
            }
            report(ctx, "downloaded", &a, None, None)
        }
    }
}

guest_sdk::step!(run);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_checked_and_names_default() {
        let parse =
            |v: serde_json::Value| serde_json::from_value::<Args>(v).map_err(|e| e.to_string());
        assert!(parse(serde_json::json!({"mode": "file-upload", "source": "a/b.tar"})).is_ok());
        assert!(
            parse(serde_json::json!({"mode": "file-download", "name": "x"}))
                .unwrap_err()
                .starts_with("missing field `dest`")
        );
        assert!(
            parse(serde_json::json!({"mode": "file-upload", "src": "x"}))
                .unwrap_err()
                .starts_with("unknown field `src`")
        );
        assert_eq!(base_name("dist/app.tar"), "app.tar");
        assert_eq!(base_name("dist/"), "dist");
    }
}
