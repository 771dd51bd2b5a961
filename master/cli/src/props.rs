//! `NAME=VALUE` properties, parsed one way for every command that takes them (`step run`,
//! `build run`, `force`, `try`, `sendchange`): clap calls [`PropArg::parse`] for each flag, so
//! a name the master would refuse is refused before anything is sent or run.

use std::fmt;

use serde_json::Value;

/// One `NAME=VALUE` from the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PropArg {
    /// The property's name, checked by the rule every property name follows.
    pub name: String,
    /// The text after the first `=`, as given.
    pub value: String,
}

impl PropArg {
    /// Splits at the first `=` and checks the name (clap's value parser for every property
    /// flag); the message says what to write.
    pub fn parse(text: &str) -> Result<PropArg, String> {
        let Some((name, value)) = text.split_once('=').filter(|(n, _)| !n.is_empty()) else {
            return Err("write NAME=VALUE".into());
        };
        kiln_protocol::check_property_name(name)?;
        Ok(PropArg {
            name: name.to_owned(),
            value: value.to_owned(),
        })
    }

    /// The value read as JSON if it parses, else as a string (`n=3` is a number, `n=x` the
    /// string "x", `n="3"` the string "3").
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.value).unwrap_or_else(|_| Value::String(self.value.clone()))
    }
}

impl fmt::Display for PropArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.name, self.value)
    }
}

/// `--prop NAME=VALUE`, the build properties of a local run (`kiln step run`, `kiln build run`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct BuildProps {
    /// A build property, NAME=VALUE; VALUE is read as JSON if it parses, else as a string
    /// (source "Command line": it wins over the configuration's properties).
    #[arg(long = "prop", value_name = "NAME=VALUE", value_parser = PropArg::parse)]
    pub props: Vec<PropArg>,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn names_are_checked_and_values_read_as_json_or_text() {
        let p = PropArg::parse("jobs=8").unwrap();
        assert_eq!((p.name.as_str(), p.json()), ("jobs", json!(8)));
        assert_eq!(PropArg::parse("who=ada=b").unwrap().json(), json!("ada=b"));
        assert_eq!(PropArg::parse("s=\"3\"").unwrap().json(), json!("3"));
        assert_eq!(PropArg::parse("empty=").unwrap().json(), json!(""));
        assert_eq!(PropArg::parse("=1").unwrap_err(), "write NAME=VALUE");
        assert_eq!(PropArg::parse("novalue").unwrap_err(), "write NAME=VALUE");
        let long = format!("{}=1", "n".repeat(300));
        for bad in ["x\n=1", "x\t=1", long.as_str()] {
            let e = PropArg::parse(bad).unwrap_err();
            assert!(!e.is_empty() && e != "write NAME=VALUE", "{bad:?}: {e}");
        }
    }

    #[test]
    fn every_property_flag_uses_the_one_parser() {
        use clap::Parser;
        #[derive(Debug, Parser)]
        struct Cmd {
            #[command(flatten)]
            props: BuildProps,
        }
        let ok = Cmd::try_parse_from(["x", "--prop", "a=1", "--prop", "b=two"]).unwrap();
        assert_eq!(ok.props.props.len(), 2);
        let err = Cmd::try_parse_from(["x", "--prop", "bad\u{7}=1"]).unwrap_err();
        assert!(err.to_string().contains("--prop <NAME=VALUE>"), "{err}");
    }
}
