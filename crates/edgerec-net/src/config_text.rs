//! Where a value of a configuration file sits, so that both services' TOML configurations
//! name it the same way in an error: `config FILE, line N: key = value: problem`.
//!
//! Invariant: a value that came from a default (an empty span) is said to be the default,
//! never given a line it is not on.

use std::fmt::Display;
use std::ops::Range;
use std::path::Path;

/// A configuration file's name and text.
#[derive(Debug, Clone, Copy)]
pub struct ConfigText<'a> {
    /// The file, as the operator named it.
    pub file: &'a Path,
    /// Its text.
    pub text: &'a str,
}

impl ConfigText<'_> {
    /// The line (from 1) of byte offset `at`.
    pub fn line(&self, at: usize) -> usize {
        self.text[..at.min(self.text.len())]
            .bytes()
            .filter(|b| *b == b'\n')
            .count()
            + 1
    }

    /// `config FILE, line N: key = value: problem`; `(default)` for a default value.
    pub fn value_error(
        &self,
        key: &str,
        value: &dyn Display,
        span: Range<usize>,
        problem: &str,
    ) -> String {
        let at = if span == (0..0) {
            "(default)".to_string()
        } else {
            format!("line {}", self.line(span.start))
        };
        format!(
            "config {}, {at}: {key} = {value}: {problem}",
            self.file.display()
        )
    }

    /// `config FILE, line N: message` (without a line when there is no span): what the TOML
    /// parser said.
    pub fn parse_error(&self, span: Option<Range<usize>>, message: &str) -> String {
        let line = span
            .map(|s| format!(", line {}", self.line(s.start)))
            .unwrap_or_default();
        format!(
            "config {}{line}: {}",
            self.file.display(),
            message.trim_end()
        )
    }

    /// `config FILE: problem`.
    pub fn error(&self, problem: impl Display) -> String {
        format!("config {}: {problem}", self.file.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_named_with_their_line_or_as_the_default() {
        let text = "[lkm]\nskew_secs = 0\n";
        let c = ConfigText {
            file: Path::new("lkm.toml"),
            text,
        };
        let at = text.find('0').unwrap();
        assert_eq!(
            c.value_error("lkm.skew_secs", &0, at..at + 1, "must be 1 to 600"),
            "config lkm.toml, line 2: lkm.skew_secs = 0: must be 1 to 600"
        );
        assert_eq!(
            c.value_error("lkm.skew_secs", &60, 0..0, "x"),
            "config lkm.toml, (default): lkm.skew_secs = 60: x"
        );
        assert_eq!(
            c.parse_error(Some(6..7), "expected `=`\n"),
            "config lkm.toml, line 2: expected `=`"
        );
        assert_eq!(c.error("y"), "config lkm.toml: y");
    }
}
