//! Base64url without padding (RFC 4648, section 5), the encoding of every
//! binary field in JOSE and ACME (RFC 7515, section 2).
//!
//! Decoding is strict: one byte string has exactly one accepted encoding,
//! so thumbprints and signing inputs computed from the text a client sent
//! match those computed from the decoded bytes.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::problem::Problem;

/// The number of characters of a rejected value that an error detail quotes.
const QUOTED_CHARS: usize = 64;

/// Encodes `bytes` as base64url without padding.
pub fn encode(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes the base64url value of the request field `field`.
///
/// Rejects `=` padding, the standard alphabet's `+` and `/`, whitespace,
/// a length that no byte string encodes to and unused trailing bits that
/// are not zero. The error is `malformed` and names the field and the value.
pub fn decode(field: &str, value: &str) -> Result<Vec<u8>, Problem> {
    if let Some(reason) = find_rejected_character(value) {
        return Err(invalid(field, value, &reason));
    }
    URL_SAFE_NO_PAD.decode(value).map_err(|error| invalid(field, value, &describe(&error, value.len())))
}

/// Explains the first character that base64url without padding never contains.
fn find_rejected_character(value: &str) -> Option<String> {
    let (offset, character) =
        value.char_indices().find(|(_, c)| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))?;
    let reason = match character {
        '=' => format!("'=' padding at offset {offset} is not allowed"),
        '+' | '/' => {
            format!("'{character}' at offset {offset} is from the standard base64 alphabet; base64url uses '-' and '_'")
        }
        c if c.is_whitespace() => format!("whitespace {c:?} at offset {offset} is not allowed"),
        c => format!("character {c:?} at offset {offset} is not in the base64url alphabet"),
    };
    Some(reason)
}

/// Explains a decoding error of a value of `length` characters, all of them
/// from the base64url alphabet.
fn describe(error: &base64::DecodeError, length: usize) -> String {
    match error {
        base64::DecodeError::InvalidLength(_) => {
            format!("a length of {length} characters leaves one character over, which no byte string encodes to")
        }
        base64::DecodeError::InvalidLastSymbol(offset, _) => {
            format!(
                "the last character, at offset {offset}, has unused bits that are not zero (non-canonical encoding)"
            )
        }
        other => other.to_string(),
    }
}

fn invalid(field: &str, value: &str, reason: &str) -> Problem {
    Problem::malformed(format!(
        "field \"{field}\" is not valid base64url without padding: {reason} (value {})",
        quote(value)
    ))
}

/// Quotes `value` for an error detail, escaped and cut to [`QUOTED_CHARS`]
/// characters.
pub(crate) fn quote(value: &str) -> String {
    match value.char_indices().nth(QUOTED_CHARS) {
        Some((cut, _)) => format!("{:?}... ({} characters)", &value[..cut], value.chars().count()),
        None => format!("{value:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::problem::ProblemType;

    fn rejected(field: &str, value: &str) -> Problem {
        match decode(field, value) {
            Ok(bytes) => panic!("{value:?} decoded to {bytes:?} but should be rejected"),
            Err(problem) => problem,
        }
    }

    #[test]
    fn round_trip_all_lengths() {
        let bytes: Vec<u8> = (0..=255).collect();
        for length in 0..bytes.len() {
            let text = encode(&bytes[..length]);
            assert!(!text.contains('='), "{text}");
            assert_eq!(decode("field", &text).expect("own encoding decodes"), &bytes[..length]);
        }
    }

    #[test]
    fn encode_uses_url_alphabet() {
        assert_eq!(encode(&[0xfb, 0xff]), "-_8");
        assert_eq!(encode(b"{}"), "e30");
        assert_eq!(encode(b""), "");
    }

    #[test]
    fn decode_rejects_padding() {
        let problem = rejected("payload", "e30=");
        assert!(problem.is(ProblemType::Malformed));
        assert!(problem.detail.contains("\"payload\""), "{}", problem.detail);
        assert!(problem.detail.contains("\"e30=\""), "{}", problem.detail);
        assert!(problem.detail.contains("padding"), "{}", problem.detail);
    }

    #[test]
    fn decode_rejects_standard_alphabet() {
        for value in ["-_8+", "ab/c"] {
            let problem = rejected("signature", value);
            assert!(problem.is(ProblemType::Malformed));
            assert!(problem.detail.contains("\"signature\""), "{}", problem.detail);
            assert!(problem.detail.contains(&format!("{value:?}")), "{}", problem.detail);
            assert!(problem.detail.contains("standard base64 alphabet"), "{}", problem.detail);
        }
    }

    #[test]
    fn decode_rejects_whitespace() {
        for value in ["e30 ", "e3\n0", "\te30"] {
            let problem = rejected("protected", value);
            assert!(problem.is(ProblemType::Malformed));
            assert!(problem.detail.contains("whitespace"), "{}", problem.detail);
            assert!(problem.detail.contains(&format!("{value:?}")), "{}", problem.detail);
        }
    }

    #[test]
    fn decode_rejects_non_canonical_bits() {
        // "e30" encodes "{}"; "e31" differs only in the two unused low bits.
        let problem = rejected("payload", "e31");
        assert!(problem.is(ProblemType::Malformed));
        assert!(problem.detail.contains("non-canonical"), "{}", problem.detail);
        assert!(problem.detail.contains("\"e31\""), "{}", problem.detail);
    }

    #[test]
    fn decode_rejects_impossible_length() {
        let problem = rejected("payload", "abcde");
        assert!(problem.is(ProblemType::Malformed));
        assert!(problem.detail.contains("length of 5"), "{}", problem.detail);
    }

    #[test]
    fn decode_rejects_other_characters() {
        let problem = rejected("kid", "ab.c");
        assert!(problem.is(ProblemType::Malformed));
        assert!(problem.detail.contains("'.'"), "{}", problem.detail);
        assert!(problem.detail.contains("\"ab.c\""), "{}", problem.detail);
    }

    #[test]
    fn detail_truncates_long_values() {
        let value = format!("{}=", "A".repeat(1000));
        let problem = rejected("payload", &value);
        assert!(problem.detail.contains(&format!("\"{}\"...", "A".repeat(QUOTED_CHARS))), "{}", problem.detail);
        assert!(problem.detail.contains("(1001 characters)"), "{}", problem.detail);
        assert!(problem.detail.len() < 300, "{}", problem.detail);
    }

    #[test]
    fn quote_cuts_on_character_boundary() {
        let value = "é".repeat(100);
        let quoted = quote(&value);
        assert!(quoted.starts_with(&format!("\"{}\"", "é".repeat(QUOTED_CHARS))), "{quoted}");
    }
}
