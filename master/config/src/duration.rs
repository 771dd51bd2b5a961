//! Durations as written in `kiln.toml` (`"30s"`, `"10m"`, `"1h 30m"`), via humantime.

use std::time::Duration;

/// Parses a duration; the error says how to write one.
pub(crate) fn parse(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    if !trimmed.is_empty() && trimmed.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "{text:?} has no unit; write \"{trimmed}s\" for seconds (or m, h, d)"
        ));
    }
    humantime::parse_duration(trimmed).map_err(|e| {
        format!("{text:?} is not a duration ({e}); write a number and a unit, such as \"30s\", \"10m\" or \"1h 30m\"")
    })
}

/// Parses a duration that must be at least `min`.
pub(crate) fn parse_at_least(text: &str, min: Duration) -> Result<Duration, String> {
    let d = parse(text)?;
    if d < min {
        return Err(format!(
            "{text:?} is too short; give at least {}",
            humantime::format_duration(min)
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("0s"), Ok(Duration::ZERO));
        assert_eq!(
            parse("10"),
            Err("\"10\" has no unit; write \"10s\" for seconds (or m, h, d)".into())
        );
        assert!(
            parse("soon")
                .unwrap_err()
                .starts_with("\"soon\" is not a duration (")
        );
        assert_eq!(
            parse_at_least("0s", Duration::from_secs(1)),
            Err("\"0s\" is too short; give at least 1s".into())
        );
    }
}
