use std::fmt;
use std::path::Path;

use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use crate::HsmError;

/// A token PIN. The memory that contains it is zeroed on drop, it cannot be cloned, and its
/// `Debug` output is `Pin(..)`.
pub struct Pin(Zeroizing<String>);

impl Pin {
    /// Wraps a PIN given as a string.
    pub fn new(secret: String) -> Pin {
        Pin(Zeroizing::new(secret))
    }

    /// Reads a PIN from a file. One trailing newline (`\n` or `\r\n`) is removed, so files
    /// written with `echo` work.
    ///
    /// # Errors
    ///
    /// [`HsmError::InvalidPinSource`] naming the path if the file cannot be read, is not
    /// UTF-8 or contains an empty PIN.
    pub fn from_file(path: &Path) -> Result<Pin, HsmError> {
        let invalid =
            |reason: String| HsmError::InvalidPinSource { origin: format!("file {}", path.display()), reason };

        let bytes = Zeroizing::new(std::fs::read(path).map_err(|error| invalid(error.to_string()))?);
        let text = std::str::from_utf8(&bytes).map_err(|_| invalid("file content is not valid UTF-8".to_owned()))?;

        let trimmed = text.strip_suffix("\r\n").or_else(|| text.strip_suffix('\n')).unwrap_or(text);
        if trimmed.is_empty() {
            return Err(invalid("file contains no PIN".to_owned()));
        }
        Ok(Pin::new(trimmed.to_owned()))
    }

    /// Reads a PIN from the environment variable `var`.
    ///
    /// # Errors
    ///
    /// [`HsmError::InvalidPinSource`] naming the variable if it is unset, empty or not
    /// valid Unicode.
    pub fn from_env(var: &str) -> Result<Pin, HsmError> {
        let invalid = |reason: &str| HsmError::InvalidPinSource {
            origin: format!("environment variable {var}"),
            reason: reason.to_owned(),
        };

        match std::env::var(var) {
            Ok(secret) if secret.is_empty() => Err(invalid("variable is empty")),
            Ok(secret) => Ok(Pin::new(secret)),
            Err(std::env::VarError::NotPresent) => Err(invalid("variable is not set")),
            Err(std::env::VarError::NotUnicode(_)) => Err(invalid("variable value is not valid Unicode")),
        }
    }

    /// Returns the PIN. Callers must not log or store it.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }

    /// Copies the PIN into cryptoki's secret type, which also zeroes its memory on drop.
    pub(crate) fn to_auth_pin(&self) -> AuthPin {
        AuthPin::from(self.0.as_str().to_owned())
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("Pin(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn debug_hides_secret() {
        let pin = Pin::new("s3cret-4711".to_owned());
        let debug = format!("{pin:?}");
        assert_eq!(debug, "Pin(..)");
        assert!(!debug.contains("s3cret"));
    }

    #[test]
    fn from_file_trims_one_newline() {
        let cases = [
            ("1234\n", "1234"),
            ("1234\r\n", "1234"),
            ("1234", "1234"),
            ("1234\n\n", "1234\n"),
            (" 12 34 \n", " 12 34 "),
        ];
        for (content, expected) in cases {
            let mut file = tempfile::NamedTempFile::new().expect("temporary file");
            file.write_all(content.as_bytes()).expect("write PIN file");
            let pin = Pin::from_file(file.path()).expect("readable PIN file");
            assert_eq!(pin.expose_secret(), expected, "file content {content:?}");
        }
    }

    #[test]
    fn from_file_missing_names_path() {
        let directory = tempfile::tempdir().expect("temporary directory");
        let path = directory.path().join("no-such-pin");
        let error = Pin::from_file(&path).expect_err("missing file must fail");

        let message = error.to_string();
        assert!(matches!(error, HsmError::InvalidPinSource { .. }));
        assert!(message.contains(&path.display().to_string()), "message {message:?} does not name the path");
    }

    #[test]
    fn from_file_rejects_empty_pin() {
        let mut file = tempfile::NamedTempFile::new().expect("temporary file");
        file.write_all(b"\n").expect("write PIN file");
        let error = Pin::from_file(file.path()).expect_err("empty PIN must fail");
        assert!(error.to_string().contains("contains no PIN"));
    }

    #[test]
    fn from_file_rejects_invalid_utf8_without_content() {
        let mut file = tempfile::NamedTempFile::new().expect("temporary file");
        file.write_all(&[0xff, 0xfe, b'7']).expect("write PIN file");
        let error = Pin::from_file(file.path()).expect_err("invalid UTF-8 must fail");
        let message = format!("{error} {error:?}");
        assert!(message.contains("not valid UTF-8"));
        assert!(!message.contains("255"), "message {message:?} shows file bytes");
    }

    #[test]
    fn from_env_missing_names_variable() {
        let name = "SIGIL_HSM_TEST_PIN_THAT_IS_NEVER_SET";
        let error = Pin::from_env(name).expect_err("unset variable must fail");
        let message = error.to_string();
        assert!(message.contains(name), "message {message:?} does not name the variable");
        assert!(message.contains("not set"));
    }
}
