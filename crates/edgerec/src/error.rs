//! The error of edgerec's commands, and the exit codes of the interface contract.
//!
//! A package's own failures come from [`erec::Error`] unchanged (its coarse crypto failures
//! stay coarse); this type adds what only the tools around the format can fail with. Exit
//! codes: 0 success, 1 other error, 2 usage, 3 wrong key, 4 corrupt (a package, an audit
//! log's chain, or a store that does not match its manifests), 5 unterminated (strict), 6 unsupported version or suite.

use erec::keys::KeyError;

/// What went wrong in a command.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a package failed.
    #[error(transparent)]
    Package(#[from] erec::Error),
    /// An audit log whose hash chain is broken: a line removed, moved or changed.
    #[error(transparent)]
    Audit(#[from] edgerec_lkm::audit::AuditError),
    /// Reading or writing failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The caller asked for something that cannot be done, and why.
    #[error("{0}")]
    Invalid(String),
    /// A store that does not hold what its appliances signed (`verify-store`): a manifest
    /// missing or forged, a recording missing, altered or listed by none.
    #[error("{0}")]
    Unverified(String),
}

impl From<KeyError> for Error {
    fn from(e: KeyError) -> Error {
        Error::Package(erec::Error::Key(e))
    }
}

impl From<erec::format::FormatError> for Error {
    fn from(e: erec::format::FormatError) -> Error {
        Error::Package(e.into())
    }
}

impl Error {
    /// The process exit code of the interface contract.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Package(e) => match e {
                erec::Error::WrongKey { .. } | erec::Error::KeyDestroyed { .. } => 3,
                erec::Error::Corrupt { .. } => 4,
                erec::Error::Unterminated { .. } => 5,
                erec::Error::Unsupported { .. } => 6,
                erec::Error::KeyUnavailable(_)
                | erec::Error::Key(_)
                | erec::Error::Io(_)
                | erec::Error::Invalid(_) => 1,
            },
            Error::Audit(_) | Error::Unverified(_) => 4,
            Error::Io(_) | Error::Invalid(_) => 1,
        }
    }
}
