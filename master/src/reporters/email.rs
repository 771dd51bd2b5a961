//! The `email` reporter: a plain-text message through an SMTP relay (lettre), to the
//! configured `to` list and to the authors of the build's changes found by `lookup`: at a
//! domain (an author `Jane Doe <jane@laptop.local>` or `jane` is mailed at `jane@DOMAIN`), or
//! in a table (by identifier, address or user, ignoring case). Port 465 speaks TLS from the
//! start; any other port uses STARTTLS when the relay offers it.

use lettre::message::Mailbox;
use lettre::message::header::ContentType;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use super::payload::{BuildReport, BuildsetReport, build_url, buildset_url};
use super::{DeliveryError, Event};
use crate::server::Master;
use kiln_config::{Lookup, Reporter, ReporterKind};

/// The SMTP port when the relay names none.
pub const DEFAULT_PORT: u16 = 25;

/// A message to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mail {
    /// Recipients, in order, without repeats.
    pub to: Vec<String>,
    /// The subject line.
    pub subject: String,
    /// The plain-text body.
    pub body: String,
}

/// The address in an author's angle brackets (`Jane Doe <jane@laptop.local>`), else the
/// whole identifier, trimmed.
fn inner_address(author: &str) -> &str {
    match (author.rfind('<'), author.rfind('>')) {
        (Some(open), Some(close)) if open < close => author[open + 1..close].trim(),
        _ => author.trim(),
    }
}

/// The user part of an author's address or identifier, if it is one word.
fn author_user(author: &str) -> Option<&str> {
    let user = inner_address(author)
        .split('@')
        .next()
        .unwrap_or_default()
        .trim();
    (!user.is_empty() && !user.contains(char::is_whitespace)).then_some(user)
}

/// The address an author is mailed at: the user part of their identifier at `domain`.
pub fn author_address(author: &str, domain: &str) -> Option<String> {
    author_user(author).map(|user| format!("{user}@{domain}"))
}

/// The address `lookup` gives an author, if any. A table is searched, ignoring case, for the
/// whole identifier, then the address in its angle brackets, then that address's user part.
pub fn lookup_address(author: &str, lookup: &Lookup) -> Option<String> {
    match lookup {
        Lookup::Domain(domain) => author_address(author, domain),
        Lookup::Map(map) => [
            Some(author.trim()),
            Some(inner_address(author)),
            author_user(author),
        ]
        .into_iter()
        .flatten()
        .find_map(|key| map.get(&key.to_lowercase()).cloned()),
    }
}

fn recipients(reporter: &Reporter, blamelist: &[String]) -> Vec<String> {
    let ReporterKind::Email { to, lookup, .. } = &reporter.kind else {
        return Vec::new();
    };
    let mut out: Vec<String> = Vec::new();
    let authors = lookup
        .iter()
        .flat_map(|lookup| blamelist.iter().filter_map(|a| lookup_address(a, lookup)));
    for a in to.iter().cloned().chain(authors) {
        if !out.iter().any(|o| o.eq_ignore_ascii_case(&a)) {
            out.push(a);
        }
    }
    out
}

fn stamps_and_changes(
    out: &mut String,
    stamps: &[kiln_db::model::SourceStamp],
    changes: &[serde_json::Value],
    blamelist: &[String],
) {
    for s in stamps {
        out.push_str(&format!(
            "Source: {} {} at {}\n",
            s.repository,
            s.branch.as_deref().unwrap_or("(default branch)"),
            s.revision.as_deref().unwrap_or("(tip)")
        ));
    }
    if !blamelist.is_empty() {
        out.push_str(&format!("Blamelist: {}\n", blamelist.join(", ")));
    }
    if !changes.is_empty() {
        out.push_str("\nChanges:\n");
        for c in changes {
            let first = c["comments"]
                .as_str()
                .unwrap_or_default()
                .lines()
                .next()
                .unwrap_or_default();
            out.push_str(&format!(
                "- {} by {}: {}\n",
                c["revision"].as_str().unwrap_or("?"),
                c["author"].as_str().unwrap_or("?"),
                first
            ));
        }
    }
}

impl Mail {
    /// The message about a finished build.
    pub fn for_build(reporter: &Reporter, b: &BuildReport, master_url: &str, title: &str) -> Mail {
        let builder = b.build["builder"].as_str().unwrap_or_default();
        let number = b.build["number"].as_i64().unwrap_or_default();
        let results = b.build["results"].as_str().unwrap_or("UNKNOWN");
        let id = b.build["buildid"].as_i64().unwrap_or_default();
        // The state says more than the result only when a step or the master explained.
        let state = b.build["state_string"].as_str().unwrap_or_default();
        let why = if state.is_empty() || state == results {
            String::new()
        } else {
            format!(": {state}")
        };
        let mut body = format!(
            "Build {builder} #{number} ended {results}{why}\n\nBuild: {}\nWorker: {}\n",
            build_url(master_url, id),
            b.build["worker"].as_str().unwrap_or("-"),
        );
        stamps_and_changes(&mut body, &b.sourcestamps, &b.changes, &b.blamelist);
        Mail {
            to: recipients(reporter, &b.blamelist),
            subject: format!("{title}: {builder} #{number} {results}"),
            body,
        }
    }

    /// The message about a buildset's first failure or completion.
    pub fn for_buildset(
        reporter: &Reporter,
        event: Event,
        b: &BuildsetReport,
        master_url: &str,
        title: &str,
    ) -> Mail {
        let id = b.buildset["buildsetid"].as_i64().unwrap_or_default();
        let what = match event {
            Event::BuildsetFirstFailure => "has a failed build".to_owned(),
            _ => format!(
                "completed {}",
                b.buildset["results"].as_str().unwrap_or("UNKNOWN")
            ),
        };
        let mut body = format!(
            "Buildset {id} ({}) {what}.\n\nBuildset: {}\n",
            b.buildset["reason"].as_str().unwrap_or_default(),
            buildset_url(master_url, id)
        );
        for build in &b.builds {
            body.push_str(&format!(
                "- {} #{}: {} {}\n",
                build["builder"].as_str().unwrap_or_default(),
                build["number"].as_i64().unwrap_or_default(),
                build["results"].as_str().unwrap_or("running"),
                build_url(master_url, build["buildid"].as_i64().unwrap_or_default())
            ));
        }
        stamps_and_changes(&mut body, &b.sourcestamps, &b.changes, &b.blamelist);
        Mail {
            to: recipients(reporter, &b.blamelist),
            subject: format!("{title}: buildset {id} {what}"),
            body,
        }
    }
}

/// Sends `mail` through the reporter's relay.
pub async fn send(m: &Master, reporter: &Reporter, mail: Mail) -> Result<(), DeliveryError> {
    let ReporterKind::Email {
        relay,
        from,
        smtp_auth,
        ..
    } = &reporter.kind
    else {
        return Err(DeliveryError::permanent("not an email reporter"));
    };
    if mail.to.is_empty() {
        // Checked at load time for `to`; a blamelist can still be empty.
        return Ok(());
    }
    let bad =
        |what: &str, e: &dyn std::fmt::Display| DeliveryError::permanent(format!("{what}: {e}"));
    let from: Mailbox = from
        .parse()
        .map_err(|e| bad(&format!("from {from:?}"), &e))?;
    let mut message = Message::builder()
        .from(from)
        .subject(mail.subject)
        .header(ContentType::TEXT_PLAIN);
    for to in &mail.to {
        let to: Mailbox = to
            .parse()
            .map_err(|e| bad(&format!("recipient {to:?}"), &e))?;
        message = message.to(to);
    }
    let message = message
        .body(mail.body)
        .map_err(|e| bad("cannot build the message", &e))?;
    let (host, port) = match relay.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|e| bad(&format!("relay {relay:?}"), &e))?,
        ),
        None => (relay.as_str(), DEFAULT_PORT),
    };
    let tls = TlsParameters::new(host.to_owned()).map_err(|e| bad("TLS", &e))?;
    let mut transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
        .port(port)
        .timeout(Some(super::SEND_TIMEOUT))
        .tls(if port == 465 {
            Tls::Wrapper(tls)
        } else {
            Tls::Opportunistic(tls)
        });
    if let Some((user, password)) = smtp_auth {
        let password = super::secret(m, password)?;
        transport = transport.credentials(Credentials::new(user.clone(), password));
    }
    transport.build().send(message).await.map_err(|e| {
        let message = format!("SMTP {relay}: {e}");
        if e.is_permanent() {
            DeliveryError::permanent(message)
        } else {
            DeliveryError::transient(message)
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authors_are_mailed_at_the_lookup_domain() {
        assert_eq!(
            author_address("Jane Doe <jane@laptop.local>", "example.org").as_deref(),
            Some("jane@example.org")
        );
        assert_eq!(
            author_address("bob", "example.org").as_deref(),
            Some("bob@example.org")
        );
        assert_eq!(author_address("Two Words", "example.org"), None);
        assert_eq!(author_address(" <> ", "example.org"), None);
    }

    #[test]
    fn authors_are_found_in_a_lookup_table_by_identifier_address_or_user() {
        // As resolved from the file: keys in lower case.
        let map = Lookup::Map(
            [
                ("jane", "jane@corp.example"),
                ("bob@laptop.local", "robert@corp.example"),
                ("carol c <carol@home>", "carol@corp.example"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        );
        let found = |a: &str| lookup_address(a, &map);
        assert_eq!(found("jane").as_deref(), Some("jane@corp.example"));
        assert_eq!(
            found("Jane Doe <Jane@laptop.local>").as_deref(),
            Some("jane@corp.example"),
            "by the user part, ignoring case"
        );
        assert_eq!(
            found("Bob <bob@laptop.local>").as_deref(),
            Some("robert@corp.example"),
            "by the address"
        );
        assert_eq!(
            found("bob@laptop.local").as_deref(),
            Some("robert@corp.example")
        );
        assert_eq!(
            found("bob@elsewhere").as_deref(),
            None,
            "another bob's address is not his"
        );
        assert_eq!(
            found(" Carol C <carol@home> ").as_deref(),
            Some("carol@corp.example"),
            "by the whole identifier"
        );
        assert_eq!(found("dave <dave@x>"), None, "not named: not mailed");
        assert_eq!(found(""), None);
        assert_eq!(found("<>"), None);
        let domain = Lookup::Domain("example.org".into());
        assert_eq!(
            lookup_address("Jane Doe <jane@laptop.local>", &domain).as_deref(),
            Some("jane@example.org")
        );
    }

    #[test]
    fn recipients_come_from_to_then_the_lookup_without_repeats() {
        let reporter = Reporter {
            name: "mail".into(),
            builders: None,
            buildsets: false,
            kind: ReporterKind::Email {
                relay: "127.0.0.1:25".into(),
                from: "kiln@example.org".into(),
                to: vec!["team@example.org".into(), "Jane@Corp.example".into()],
                lookup: Some(Lookup::Map(
                    [("jane".to_owned(), "jane@corp.example".to_owned())].into(),
                )),
                mode: kiln_config::ReportMode::All,
                smtp_auth: None,
            },
        };
        assert_eq!(
            recipients(
                &reporter,
                &["Jane Doe <jane@laptop.local>".into(), "stranger".into()]
            ),
            vec!["team@example.org", "Jane@Corp.example"]
        );
    }
}
