//! API tokens as the database keeps them: a token is `kiln_` and 32 random bytes in hex, shown
//! once when it is made; only its SHA-256 is stored (a token is high-entropy, so one SHA-256
//! suffices and looking it up by its hash leaks nothing about the secret).

use kiln_protocol::api::TOKEN_PREFIX;
use sha2::Digest;

/// A new random token.
pub fn new_token() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("{TOKEN_PREFIX}{}", hex::encode(bytes))
}

/// What the database keeps of a token.
pub fn token_hash(token: &str) -> String {
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}
