//! Config errors that point at the file, line and column, say what is wrong and how to fix it.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
    pub help: Option<String>,
    /// The offending source line, for display.
    pub snippet: String,
}

impl ConfigError {
    pub fn at(
        file: &Path,
        src: &str,
        span: Option<Range<usize>>,
        message: impl Into<String>,
        help: Option<String>,
    ) -> ConfigError {
        let offset = span.map(|s| s.start).unwrap_or(0).min(src.len());
        let before = &src[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
        let column = before[line_start..].chars().count() + 1;
        let snippet = src[line_start..].lines().next().unwrap_or("").to_string();
        ConfigError { file: file.to_path_buf(), line, column, message: message.into(), help, snippet }
    }

    /// An error about the file as a whole (it cannot be read, say).
    pub fn whole(file: &Path, message: impl Into<String>, help: Option<String>) -> ConfigError {
        ConfigError {
            file: file.to_path_buf(),
            line: 0,
            column: 0,
            message: message.into(),
            help,
            snippet: String::new(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            writeln!(f, "error: {}: {}", self.file.display(), self.message)?;
        } else {
            writeln!(f, "error: {}:{}:{}: {}", self.file.display(), self.line, self.column, self.message)?;
            let gutter = self.line.to_string().len();
            writeln!(f, "{:gutter$} |", "")?;
            writeln!(f, "{} | {}", self.line, self.snippet)?;
            writeln!(f, "{:gutter$} | {:>col$}", "", "^", col = self.column)?;
        }
        if let Some(h) = &self.help {
            writeln!(f, "help: {h}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}
