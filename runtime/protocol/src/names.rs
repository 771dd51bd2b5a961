//! Names and their rules: what a worker, builder, scheduler, change source or reporter may be
//! called (names appear in URLs, file names and messages), shared by the configuration, the
//! worker's flags and the API's clients.

pub use crate::props::{MAX_PROPERTY_NAME, check_property_name};

/// Longest name, in characters.
pub const MAX_NAME: usize = 100;

/// Checks the name of a worker, builder, scheduler, change source or reporter.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.chars().count() <= MAX_NAME
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid name; use 1 to {MAX_NAME} letters, digits, '-', '_' and '.', not starting with '-' or '.'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_rule() {
        for good in ["linux", "w-1", "a.b_c", "é"] {
            assert_eq!(check_name(good), Ok(()), "{good}");
        }
        let long = "x".repeat(MAX_NAME + 1);
        for bad in ["", ".hidden", "-flag", "a/b", "a b", long.as_str()] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
