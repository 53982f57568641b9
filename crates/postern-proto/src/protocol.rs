//! The services Postern fronts.

use std::fmt;

/// A mail service, as a listener speaks it and a backend serves it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Protocol {
    /// IMAP4 (RFC 9051 / 3501).
    Imap,
}

impl Protocol {
    /// The lower-case name used in configuration, logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Imap => "imap",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
