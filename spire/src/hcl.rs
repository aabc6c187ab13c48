//! A strict parser for the HCL version 1 text that SPIRE sends as `hcl_configuration`.
//!
//! SPIRE prints the `plugin_data` block back as HCL version 1 before sending it, so keys may
//! arrive quoted (`"endpoints" = [...]`) or bare (`endpoints = [...]`). The plugin's settings are
//! flat, so this parser accepts only top-level `key = value` attributes whose value is a string,
//! a number, a boolean or a list of those, with `#`, `//` and `/* */` comments. Anything else,
//! such as a nested block or a heredoc, is an error that names the line and column.

use std::fmt;

/// A value on the right of `=`.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    String(String),
    /// The number as written, so the caller decides between integer and float.
    Number(String),
    Bool(bool),
    List(Vec<Value>),
}

impl Value {
    /// Returns the HCL type name, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::String(_) => "string",
            Value::Number(_) => "number",
            Value::Bool(_) => "bool",
            Value::List(_) => "list",
        }
    }
}

/// One `key = value` line of the configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Attribute {
    pub key: String,
    pub value: Value,
    /// Line of the key, counted from 1.
    pub line: usize,
}

/// A syntax error, with the position where parsing stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}: {}", self.line, self.column, self.message)
    }
}

impl std::error::Error for ParseError {}

/// Parses HCL version 1 text into its top-level attributes, in the order written.
///
/// # Errors
///
/// Returns the first syntax error, or a key that is set twice.
pub fn parse(text: &str) -> Result<Vec<Attribute>, ParseError> {
    let mut parser = Parser { chars: text.chars().collect(), index: 0, line: 1, column: 1 };
    let mut attributes: Vec<Attribute> = Vec::new();
    loop {
        parser.skip_blank()?;
        if parser.peek().is_none() {
            return Ok(attributes);
        }
        let attribute = parser.attribute()?;
        if let Some(first) = attributes.iter().find(|seen| seen.key == attribute.key) {
            return Err(ParseError {
                line: attribute.line,
                column: 1,
                message: format!("key {:?} is set twice, first on line {}", attribute.key, first.line),
            });
        }
        attributes.push(attribute);
    }
}

struct Parser {
    chars: Vec<char>,
    index: usize,
    line: usize,
    column: usize,
}

impl Parser {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.index).copied()
    }

    fn peek_second(&self) -> Option<char> {
        self.chars.get(self.index + 1).copied()
    }

    fn advance(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.index += 1;
        if c == '\n' {
            self.line += 1;
            self.column = 1;
        } else {
            self.column += 1;
        }
        Some(c)
    }

    fn error(&self, message: impl Into<String>) -> ParseError {
        ParseError { line: self.line, column: self.column, message: message.into() }
    }

    /// Skips white space, line breaks and comments.
    fn skip_blank(&mut self) -> Result<(), ParseError> {
        while let Some(c) = self.peek() {
            match (c, self.peek_second()) {
                (c, _) if c.is_whitespace() => {
                    self.advance();
                }
                ('#', _) | ('/', Some('/')) => self.skip_line_comment(),
                ('/', Some('*')) => self.skip_block_comment()?,
                _ => break,
            }
        }
        Ok(())
    }

    fn skip_line_comment(&mut self) {
        while let Some(c) = self.peek() {
            if c == '\n' {
                break;
            }
            self.advance();
        }
    }

    fn skip_block_comment(&mut self) -> Result<(), ParseError> {
        let start = self.error("unterminated /* comment");
        self.advance();
        self.advance();
        while let Some(c) = self.advance() {
            if c == '*' && self.peek() == Some('/') {
                self.advance();
                return Ok(());
            }
        }
        Err(start)
    }

    fn attribute(&mut self) -> Result<Attribute, ParseError> {
        let line = self.line;
        let key = self.key()?;
        self.skip_blank()?;
        match self.peek() {
            Some('=') => {
                self.advance();
            }
            Some('{') | Some('"') => {
                return Err(self.error(format!("key {key:?}: blocks are not supported, write {key} = value")));
            }
            Some(other) => return Err(self.error(format!("expected = after key {key:?}, found {other:?}"))),
            None => return Err(self.error(format!("expected = after key {key:?}, found the end of the text"))),
        }
        self.skip_blank()?;
        let value = self.value(&key)?;
        Ok(Attribute { key, value, line })
    }

    fn key(&mut self) -> Result<String, ParseError> {
        match self.peek() {
            Some('"') => self.string(),
            Some(c) if is_identifier_start(c) => Ok(self.identifier()),
            Some(other) => Err(self.error(format!("expected a key, found {other:?}"))),
            None => Err(self.error("expected a key, found the end of the text")),
        }
    }

    fn identifier(&mut self) -> String {
        let mut name = String::new();
        while let Some(c) = self.peek().filter(|c| is_identifier_part(*c)) {
            name.push(c);
            self.advance();
        }
        name
    }

    fn value(&mut self, key: &str) -> Result<Value, ParseError> {
        match self.peek() {
            Some('"') => Ok(Value::String(self.string()?)),
            Some('[') => self.list(key),
            Some(c) if c == '-' || c.is_ascii_digit() => self.number(key),
            Some(c) if is_identifier_start(c) => {
                let column = self.column;
                let word = self.identifier();
                match word.as_str() {
                    "true" => Ok(Value::Bool(true)),
                    "false" => Ok(Value::Bool(false)),
                    _ => Err(ParseError {
                        line: self.line,
                        column,
                        message: format!("key {key:?}: invalid value {word}, quote strings as \"{word}\""),
                    }),
                }
            }
            Some('{') => Err(self.error(format!("key {key:?}: objects are not supported"))),
            Some('<') => Err(self.error(format!("key {key:?}: heredoc strings are not supported"))),
            Some(other) => Err(self.error(format!("key {key:?}: invalid value starting with {other:?}"))),
            None => Err(self.error(format!("key {key:?}: missing value at the end of the text"))),
        }
    }

    /// Parses a quoted string with the escapes \" \\ \n \r \t.
    fn string(&mut self) -> Result<String, ParseError> {
        let start = self.error("unterminated string");
        self.advance();
        let mut text = String::new();
        loop {
            match self.advance() {
                Some('"') => return Ok(text),
                Some('\\') => {
                    let escaped = match self.advance() {
                        Some('"') => '"',
                        Some('\\') => '\\',
                        Some('n') => '\n',
                        Some('r') => '\r',
                        Some('t') => '\t',
                        Some(other) => return Err(self.error(format!("unsupported escape \\{other} in string"))),
                        None => return Err(start),
                    };
                    text.push(escaped);
                }
                Some('\n') | None => return Err(start),
                Some(c) => text.push(c),
            }
        }
    }

    fn number(&mut self, key: &str) -> Result<Value, ParseError> {
        let column = self.column;
        let mut text = String::new();
        while let Some(c) = self.peek().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '+' | '.')) {
            text.push(c);
            self.advance();
        }
        if is_number(&text) {
            Ok(Value::Number(text))
        } else {
            Err(ParseError { line: self.line, column, message: format!("key {key:?}: invalid number {text}") })
        }
    }

    fn list(&mut self, key: &str) -> Result<Value, ParseError> {
        let start = self.error(format!("key {key:?}: list is missing its closing ]"));
        self.advance();
        let mut items = Vec::new();
        loop {
            self.skip_blank()?;
            match self.peek() {
                Some(']') => {
                    self.advance();
                    return Ok(Value::List(items));
                }
                None => return Err(start),
                Some(_) => items.push(self.value(key)?),
            }
            self.skip_blank()?;
            match self.peek() {
                Some(',') => {
                    self.advance();
                }
                Some(']') => {}
                Some(other) => {
                    return Err(self.error(format!("key {key:?}: expected , or ] in list, found {other:?}")));
                }
                None => return Err(start),
            }
        }
    }
}

fn is_identifier_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_identifier_part(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')
}

/// Accepts decimal integers and floats with an optional exponent, such as -3, 1.5 or 2e10.
fn is_number(text: &str) -> bool {
    let unsigned = text.strip_prefix('-').unwrap_or(text);
    let (mantissa, exponent) = match unsigned.split_once(['e', 'E']) {
        Some((mantissa, exponent)) => (mantissa, Some(exponent)),
        None => (unsigned, None),
    };
    let digits = |part: &str| !part.is_empty() && part.chars().all(|c| c.is_ascii_digit());
    let mantissa_ok = match mantissa.split_once('.') {
        Some((whole, fraction)) => digits(whole) && digits(fraction),
        None => digits(mantissa),
    };
    let exponent_ok = exponent.is_none_or(|exponent| digits(exponent.strip_prefix(['+', '-']).unwrap_or(exponent)));
    mantissa_ok && exponent_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> Vec<(String, Value)> {
        match parse(text) {
            Ok(attributes) => attributes.into_iter().map(|a| (a.key, a.value)).collect(),
            Err(error) => panic!("parse {text:?} failed: {error}"),
        }
    }

    fn parse_error(text: &str) -> ParseError {
        match parse(text) {
            Ok(attributes) => panic!("parse {text:?} succeeded with {attributes:?}"),
            Err(error) => error,
        }
    }

    fn string(text: &str) -> Value {
        Value::String(text.to_owned())
    }

    #[test]
    fn quoted_and_bare_keys() {
        let attributes = parsed("\"endpoints\" = [\"a:1\"]\nbundle_path = \"/etc/b.pem\"\n");
        assert_eq!(attributes[0], ("endpoints".to_owned(), Value::List(vec![string("a:1")])));
        assert_eq!(attributes[1], ("bundle_path".to_owned(), string("/etc/b.pem")));
    }

    #[test]
    fn empty_text_has_no_attributes() {
        assert!(parsed("").is_empty());
        assert!(parsed("  \n# only a comment\n").is_empty());
    }

    #[test]
    fn lists_span_lines_with_trailing_comma() {
        let text = "endpoints = [\n  \"a:1\",\n  # second node\n  \"b:2\",\n]\n";
        let expected = Value::List(vec![string("a:1"), string("b:2")]);
        assert_eq!(parsed(text), vec![("endpoints".to_owned(), expected)]);
    }

    #[test]
    fn empty_and_nested_lists() {
        assert_eq!(parsed("a = []"), vec![("a".to_owned(), Value::List(vec![]))]);
        let nested = Value::List(vec![Value::List(vec![Value::Number("1".to_owned())])]);
        assert_eq!(parsed("a = [[1]]"), vec![("a".to_owned(), nested)]);
    }

    #[test]
    fn numbers_and_bools() {
        let attributes = parsed("a = 3\nb = -1.5\nc = 2e3\nd = true\ne = false");
        let values: Vec<Value> = attributes.into_iter().map(|(_, value)| value).collect();
        assert_eq!(
            values,
            vec![
                Value::Number("3".to_owned()),
                Value::Number("-1.5".to_owned()),
                Value::Number("2e3".to_owned()),
                Value::Bool(true),
                Value::Bool(false)
            ]
        );
    }

    #[test]
    fn all_comment_styles() {
        let text = "# hash\n// slashes\n/* block\n comment */ a = \"x\" // after\nb = \"y\" # after";
        assert_eq!(parsed(text), vec![("a".to_owned(), string("x")), ("b".to_owned(), string("y"))]);
    }

    #[test]
    fn string_escapes() {
        assert_eq!(parsed(r#"a = "q\"b\\n\n\tt""#), vec![("a".to_owned(), string("q\"b\\n\n\tt"))]);
    }

    #[test]
    fn comment_markers_inside_strings_are_text() {
        assert_eq!(parsed(r#"a = "x#y//z""#), vec![("a".to_owned(), string("x#y//z"))]);
    }

    #[test]
    fn duplicate_key_names_both_lines() {
        let error = parse_error("a = \"1\"\n\"a\" = \"2\"");
        assert_eq!(error.line, 2);
        assert!(error.message.contains("\"a\" is set twice, first on line 1"), "{error}");
    }

    #[test]
    fn syntax_errors_name_key_and_position() {
        let cases = [
            ("unquoted word", "a = word", 1, 5, "key \"a\": invalid value word"),
            ("missing equals", "a \"x\"", 1, 3, "blocks are not supported"),
            ("block", "a {\n}", 1, 3, "key \"a\": blocks are not supported"),
            ("object value", "a = {}", 1, 5, "objects are not supported"),
            ("heredoc", "a = <<EOF\nx\nEOF", 1, 5, "heredoc"),
            ("unterminated string", "a = \"x\nb = 1", 1, 5, "unterminated string"),
            ("unclosed list", "a = [\"x\",\n", 1, 5, "key \"a\": list is missing its closing ]"),
            ("list without comma", "a = [\"x\" \"y\"]", 1, 10, "expected , or ]"),
            ("bad number", "port = 12ab", 1, 8, "key \"port\": invalid number 12ab"),
            ("missing value", "a =", 1, 4, "missing value"),
            ("bad key", "= 1", 1, 1, "expected a key"),
            ("bad escape", r#"a = "\q""#, 1, 8, "unsupported escape \\q"),
            ("unterminated comment", "/* a = 1", 1, 1, "unterminated /* comment"),
        ];
        for (name, text, line, column, message) in cases {
            let error = parse_error(text);
            assert!(error.message.contains(message), "{name}: message {:?} lacks {message:?}", error.message);
            assert_eq!((error.line, error.column), (line, column), "{name}: position of {error}");
        }
    }

    #[test]
    fn number_forms() {
        for good in ["0", "42", "-7", "1.25", "1e9", "1.5E-3"] {
            assert!(is_number(good), "{good} is a number");
        }
        for bad in ["", "-", "1.", ".5", "1e", "0x10", "1-2"] {
            assert!(!is_number(bad), "{bad} is not a number");
        }
    }
}
