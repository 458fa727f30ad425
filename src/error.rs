//! The crate's error: a status for machines and a message for people.

use crate::status::Status;
use std::fmt;

/// A failed call: which status to return and a message naming the argument or key and the fix.
#[derive(Debug, Clone, PartialEq)]
pub struct Error {
    pub status: Status,
    pub message: String,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(status: Status, message: impl Into<String>) -> Self {
        Error {
            status,
            message: message.into(),
        }
    }

    /// A bad argument across the API: `what` names the argument, `why` says what was expected.
    pub fn invalid_arg(message: impl Into<String>) -> Self {
        Error::new(Status::InvalidArgument, message)
    }

    pub fn unsupported(message: impl Into<String>) -> Self {
        Error::new(Status::Unsupported, message)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}",
            self.status.name().to_string_lossy(),
            self.message
        )
    }
}

impl std::error::Error for Error {}

/// Return early with `InvalidArgument` unless `cond` holds.
#[macro_export]
macro_rules! ensure_arg {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err($crate::error::Error::invalid_arg(format!($($fmt)+)));
        }
    };
}
