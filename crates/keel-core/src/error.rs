//! The core error: a value from outside (a request, a config file, a CLI flag) that does not
//! parse into a domain type. Every variant says what was wrong and what is accepted.

/// Why a value could not become a domain type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A value did not have the form its type requires.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// What was being parsed, e.g. "workspace name".
        what: &'static str,
        /// What is wrong and what is accepted.
        reason: String,
    },
}

impl Error {
    pub(crate) fn invalid(what: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            what,
            reason: reason.into(),
        }
    }
}

/// The core result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
