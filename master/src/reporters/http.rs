//! The `http` reporter: posts a build's (or buildset's) JSON to a URL, signed with
//! HMAC-SHA256 of the body when the reporter has a secret, in the header GitHub uses for its
//! webhooks, so a receiver can check it the same way:
//! `X-Kiln-Signature-256: sha256=HEX`. `X-Kiln-Event` names the event and `X-Kiln-Delivery`
//! the delivery (the same on every retry, so a receiver can ignore a repeat).

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::DeliveryError;

/// The signature header.
pub const SIGNATURE_HEADER: &str = "X-Kiln-Signature-256";

/// `sha256=HEX` of `body` under `secret`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Posts `body` to `url`.
pub async fn post(
    client: &reqwest::Client,
    url: &str,
    secret: Option<&str>,
    event: &str,
    delivery: i64,
    body: Vec<u8>,
) -> Result<(), DeliveryError> {
    let mut request = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("X-Kiln-Event", event)
        .header("X-Kiln-Delivery", delivery.to_string());
    if let Some(secret) = secret {
        request = request.header(SIGNATURE_HEADER, sign(secret.as_bytes(), &body));
    }
    let response = request
        .body(body)
        .send()
        .await
        .map_err(|e| DeliveryError::unreachable(url, &e))?;
    super::check_status(url, response).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_of_the_body() {
        // RFC 4231 test case 2.
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
