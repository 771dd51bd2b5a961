//! Who may do what through the API: roles, API tokens, and the checks every request passes.
//!
//! A token is `kiln_` and 32 random bytes in hex, shown once when it is made (`kiln token
//! create`); the database keeps its SHA-256 only. A token is high-entropy, so one SHA-256
//! suffices (no password stretching), and looking it up by its hash leaks nothing about the
//! secret. Requests without a token get the `[master] anonymous` role (`read` by default).
//!
//! Cross-site requests: the API takes credentials only from the `Authorization` header,
//! which a browser never adds on its own, so a page on another site cannot act with a user's
//! token. Where anonymous requests may act (`anonymous = "force"`, as in the demo), a request
//! that a browser marks as coming from another site (`Sec-Fetch-Site: cross-site`, or an
//! `Origin` that is not this master) is refused.

use axum::http::{HeaderMap, Method, header};
pub use kiln_db::tokens::{new_token, token_hash};
pub use kiln_protocol::api::{ROLES, Role, TOKEN_PREFIX, is_token};

/// Who is asking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's name; None for an anonymous request.
    pub name: Option<String>,
    /// What they may do; None when anonymous requests may do nothing.
    pub role: Option<Role>,
}

impl Caller {
    /// Whether the caller may do what `needed` allows.
    pub fn may(&self, needed: Role) -> bool {
        self.role.is_some_and(|r| r >= needed)
    }

    /// Who they are, for logs and records (`token "ci"`, `anonymous`).
    pub fn label(&self) -> String {
        match &self.name {
            Some(n) => format!("token {n:?}"),
            None => "anonymous".into(),
        }
    }
}

/// How long a stream ticket may be used to open a stream or a download.
pub const TICKET_LIFETIME: std::time::Duration = std::time::Duration::from_secs(60);
/// Most tickets outstanding at once (each is a few dozen bytes; older ones go first).
const MAX_TICKETS: usize = 10_000;

/// Short-lived tickets that stand in for a token where a browser cannot send one: an
/// `EventSource` and a plain link send no `Authorization` header, so a page whose user has
/// a token asks `POST /api/v2/auth/ticket` (with the token) for a ticket and puts it in the
/// URL (`?ticket=`). A ticket carries its token's name and role, opens only the event
/// stream and raw log downloads (`GET`), and expires after [`TICKET_LIFETIME`], so one left in
/// a history or a proxy's log is soon worth nothing. Kept in memory (hashed, as tokens are):
/// a ticket is good on the master that issued it.
#[derive(Debug, Default)]
pub struct Tickets {
    issued: std::sync::Mutex<std::collections::HashMap<String, (Caller, std::time::Instant)>>,
}

impl Tickets {
    /// Issues a ticket for `caller`.
    pub fn issue(&self, caller: &Caller) -> String {
        let ticket = format!("kilnt_{}", hex::encode(rand::random::<[u8; 24]>()));
        let now = std::time::Instant::now();
        let mut issued = self.issued.lock().unwrap_or_else(|e| e.into_inner());
        issued.retain(|_, (_, at)| now.duration_since(*at) < TICKET_LIFETIME);
        if issued.len() >= MAX_TICKETS
            && let Some(oldest) = issued
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(k, _)| k.clone())
        {
            issued.remove(&oldest);
        }
        issued.insert(token_hash(&ticket), (caller.clone(), now));
        ticket
    }

    /// Who a ticket stands for, if it is one this master issued and it has not expired.
    pub fn redeem(&self, ticket: &str) -> Option<Caller> {
        let issued = self.issued.lock().unwrap_or_else(|e| e.into_inner());
        let (caller, at) = issued.get(&token_hash(ticket))?;
        (at.elapsed() < TICKET_LIFETIME).then(|| caller.clone())
    }
}

/// Whether a `GET` of `path` may be opened with a ticket: the event stream and raw logs.
pub fn ticket_opens(path: &str) -> bool {
    path == "/api/v2/events"
        || path
            .strip_prefix("/api/v2/logs/")
            .and_then(|rest| rest.strip_suffix("/raw"))
            .is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
}

/// Why a request's credentials were not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The Authorization header is not `Bearer kiln_...`.
    #[error(
        "the Authorization header must be \"Bearer \" and a Kiln API token (kiln_ and 64 hex digits); make one with `kiln token create`"
    )]
    Malformed,
    /// No such token (revoked, or never made).
    #[error("this API token is not known to the master (revoked, or made for another farm)")]
    Unknown,
    /// An anonymous request named a host that is not this master's (DNS rebinding).
    #[error(
        "the Host header {0:?} is not an address of this master: reach it by IP address, localhost or the host of [master] url, or send an API token"
    )]
    UnknownHost(String),
    /// A stream ticket that is unknown, expired, or used for something it does not open.
    #[error(
        "this ticket is unknown or expired (tickets last a minute and open only the event stream and raw logs); ask POST /api/v2/auth/ticket for another"
    )]
    BadTicket,
    /// The request came from another site's page.
    #[error(
        "cross-site request refused: actions come from the master's own pages or a client with an API token"
    )]
    CrossSite,
}

/// The bearer token of a request, if it carries one.
pub fn bearer(headers: &HeaderMap) -> Result<Option<&str>, AuthError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let text = value.to_str().map_err(|_| AuthError::Malformed)?;
    let token = text
        .strip_prefix("Bearer ")
        .or_else(|| text.strip_prefix("bearer "))
        .map(str::trim)
        .ok_or(AuthError::Malformed)?;
    if !is_token(token) {
        return Err(AuthError::Malformed);
    }
    Ok(Some(token))
}

/// Refuses a state-changing request that a browser says came from another site. Requests with
/// a token are not affected (a browser never sends one by itself), nor are safe methods.
pub fn check_same_site(method: &Method, headers: &HeaderMap) -> Result<(), AuthError> {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return Ok(());
    }
    if headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|s| s == "cross-site")
    {
        return Err(AuthError::CrossSite);
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        // "http://host:port" must name the host the request was sent to.
        let origin_host = origin.split_once("://").map_or("", |(_, h)| h);
        if origin == "null" || origin_host != host {
            return Err(AuthError::CrossSite);
        }
    }
    Ok(())
}

/// Refuses an anonymous request whose `Host` is a name other than this master's: a page
/// of another site that made its own name resolve to this master (DNS rebinding) sends its
/// name, and would otherwise read the API, or act where anonymous requests may act, through
/// a visitor's browser. IP addresses cannot be rebound, so they pass, as do `localhost` and
/// the host of `[master] url` (`master_url`).
pub fn check_host(headers: &HeaderMap, master_url: &str) -> Result<(), AuthError> {
    let Some(host) = headers.get(header::HOST) else {
        // HTTP/1.0 without Host: not a browser.
        return Ok(());
    };
    let host = host.to_str().unwrap_or("").to_ascii_lowercase();
    // "name:port", "1.2.3.4:port", "[::1]:port", or without the port.
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host.as_str(), |(n, _)| n)
    };
    let ours = master_url
        .split_once("://")
        .map_or("", |(_, rest)| rest)
        .split(['/', '?'])
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    let ours = if let Some(rest) = ours.strip_prefix('[') {
        rest.split(']').next().unwrap_or("").to_owned()
    } else {
        ours.rsplit_once(':')
            .map_or(ours.clone(), |(n, _)| n.to_owned())
    };
    if name.parse::<std::net::IpAddr>().is_ok() || name == "localhost" || name == ours {
        Ok(())
    } else {
        Err(AuthError::UnknownHost(host))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn roles_include_the_ones_before() {
        assert!(
            Role::Admin > Role::Upload && Role::Upload > Role::Force && Role::Force > Role::Read
        );
        let c = Caller {
            name: None,
            role: Some(Role::Force),
        };
        assert!(c.may(Role::Read) && c.may(Role::Force) && !c.may(Role::Upload));
        assert!(
            !Caller {
                name: None,
                role: None
            }
            .may(Role::Read)
        );
        assert_eq!(Role::parse("upload"), Ok(Role::Upload));
        assert!(
            Role::parse("root")
                .unwrap_err()
                .contains("read, force, upload and admin")
        );
    }

    #[test]
    fn tokens_are_random_shaped_and_hashed() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert!(is_token(&a), "{a}");
        assert!(!is_token("kiln_123") && !is_token(&a.replace("kiln_", "kiin_")));
        assert_eq!(token_hash(&a).len(), 64);
        assert_ne!(token_hash(&a), token_hash(&b));
    }

    #[test]
    fn bearer_headers_are_checked() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), Ok(None));
        let t = new_token();
        h.insert(
            header::AUTHORIZATION,
            format!("Bearer {t}").parse().unwrap(),
        );
        assert_eq!(bearer(&h), Ok(Some(t.as_str())));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic dXNlcjpwdw=="),
        );
        assert_eq!(bearer(&h), Err(AuthError::Malformed));
    }

    #[test]
    fn only_hosts_that_cannot_be_rebound_are_served_anonymously() {
        let check = |host: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::HOST, host.parse().unwrap());
            check_host(&h, "https://ci.example.org/")
        };
        for ok in [
            "127.0.0.1:8010",
            "10.0.0.5",
            "[::1]:8010",
            "localhost:8010",
            "CI.example.org",
            "ci.example.org:443",
        ] {
            assert_eq!(check(ok), Ok(()), "{ok}");
        }
        assert_eq!(
            check("evil.example:8010"),
            Err(AuthError::UnknownHost("evil.example:8010".into()))
        );
        assert!(check("ci.example.org.evil.example").is_err());
    }

    #[test]
    fn cross_site_actions_are_refused() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8010"));
        assert!(
            check_same_site(&Method::POST, &h).is_ok(),
            "curl sends no Origin"
        );
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:8010"),
        );
        assert!(check_same_site(&Method::POST, &h).is_ok());
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://evil.example"),
        );
        assert_eq!(
            check_same_site(&Method::POST, &h),
            Err(AuthError::CrossSite)
        );
        assert!(check_same_site(&Method::GET, &h).is_ok());
        h.remove(header::ORIGIN);
        h.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert_eq!(
            check_same_site(&Method::DELETE, &h),
            Err(AuthError::CrossSite)
        );
    }
}
