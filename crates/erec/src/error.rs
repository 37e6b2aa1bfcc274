//! The one error type of reading and writing packages.
//!
//! Crypto failures are deliberately coarse: a bad header MAC, a failed unwrap and a bad
//! record tag all read "authentication failed", so that nobody learns from the error which
//! check fired. Structural failures name the check (they involve no secret). The variants
//! are the outcomes a caller tells apart (edgerec's command line maps them onto its exit
//! codes: wrong key, corrupt, unterminated, unsupported).

use crate::format::FormatError;
use crate::keys::{KekId, KeyError};

/// What went wrong reading or writing a package.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No recipient of the package is a key that was offered.
    #[error("wrong key: the package is sealed to {}; the key(s) offered are {}",
        list(.recipients), if .offered.is_empty() { "not listable".to_string() } else { list(.offered) })]
    WrongKey {
        /// The kek ids the package is sealed to.
        recipients: Vec<KekId>,
        /// The kek ids offered (empty when the key source cannot list them).
        offered: Vec<KekId>,
    },
    /// The package's key was destroyed in the key manager: it can never be opened again.
    #[error(
        "key destroyed: the package is sealed to {kek_id}, which the key manager destroyed; it cannot be opened"
    )]
    KeyDestroyed {
        /// The destroyed key.
        kek_id: KekId,
    },
    /// A check failed: the package is damaged or was tampered with.
    #[error("corrupt package: {what}{}", .record.map(|r| format!(" (record {r})")).unwrap_or_default())]
    Corrupt {
        /// Which check; for crypto checks always "authentication failed".
        what: &'static str,
        /// The record index, when the failure is in a record.
        record: Option<u32>,
    },
    /// The package ends without its end record (a crash, or a cut copy).
    #[error("unterminated package: it ends after {records} verified records without an end record")]
    Unterminated {
        /// Records verified before the end of the file.
        records: u32,
    },
    /// An unknown version or suite.
    #[error("unsupported package version {version} or suite {suite}")]
    Unsupported {
        /// The version byte.
        version: u8,
        /// The suite byte.
        suite: u8,
    },
    /// The key source could not answer.
    #[error("key source unavailable: {0}")]
    KeyUnavailable(String),
    /// A key file or key problem.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// Reading or writing failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The caller asked for something the format does not allow.
    #[error("{0}")]
    Invalid(String),
}

fn list(ids: &[KekId]) -> String {
    ids.iter().map(KekId::to_hex).collect::<Vec<_>>().join(", ")
}

impl Error {
    /// A structural failure, with the record index where known.
    pub fn from_format(e: FormatError, record: Option<u32>) -> Error {
        match e {
            FormatError::Unsupported { version, suite } => Error::Unsupported { version, suite },
            FormatError::Corrupt(what) => Error::Corrupt { what, record },
        }
    }

    /// The coarse crypto failure.
    pub fn auth(record: Option<u32>) -> Error {
        Error::Corrupt {
            what: "authentication failed",
            record,
        }
    }
}

impl From<FormatError> for Error {
    fn from(e: FormatError) -> Error {
        Error::from_format(e, None)
    }
}
