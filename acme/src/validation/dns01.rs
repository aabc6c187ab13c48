//! dns-01 (RFC 8555, section 8.4): a TXT record at
//! `_acme-challenge.<name>` must hold base64url(SHA-256(key authorization)).
//! For a wildcard identifier the record is at the name without `*.`.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::digest::{SHA256, digest};

use super::Context;
use super::identifier::Target;
use crate::problem::{Problem, ProblemType};

/// Maximum number of found TXT values quoted in a problem detail.
const QUOTED_VALUES: usize = 10;

/// Length at which a quoted TXT value is cut.
const QUOTE_CHARS: usize = 128;

/// Validates a dns-01 challenge for `target`.
pub(super) async fn validate(context: &Context<'_>, target: &Target, key_authorization: &str) -> Result<(), Problem> {
    let Target::Name(name) = target else {
        return Err(Problem::malformed(format!("IP identifier {target} cannot be validated with dns-01")));
    };
    let record_name = format!("_acme-challenge.{name}");
    let expected = URL_SAFE_NO_PAD.encode(digest(&SHA256, key_authorization.as_bytes()));

    context.progress.set(ProblemType::Dns, format!("looking up the TXT records at {record_name}"));
    let values = context.resolver.txt_values(&record_name).await?;
    if values.is_empty() {
        return Err(Problem::unauthorized(format!(
            "no TXT record found at {record_name}; expected one with {expected}"
        )));
    }
    if values.contains(&expected) {
        return Ok(());
    }

    let mut quoted: Vec<String> = values.iter().take(QUOTED_VALUES).map(|value| quote(value)).collect();
    if values.len() > QUOTED_VALUES {
        quoted.push(format!("and {} more", values.len() - QUOTED_VALUES));
    }
    Err(Problem::unauthorized(format!(
        "none of the {} TXT records at {record_name} is {expected}; found [{}]",
        values.len(),
        quoted.join(", ")
    )))
}

fn quote(value: &str) -> String {
    let mut chars = value.chars();
    let head: String = chars.by_ref().take(QUOTE_CHARS).collect();
    if chars.next().is_some() { format!("{head:?} (cut)") } else { format!("{head:?}") }
}
