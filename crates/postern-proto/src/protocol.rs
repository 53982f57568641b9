//! The services Postern fronts.

use std::fmt;

/// A mail service, as a listener speaks it and a backend serves it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Protocol {
    /// IMAP4 (RFC 9051 / 3501).
    Imap,
    /// POP3 (RFC 1939).
    Pop3,
    /// Message submission with authentication (RFC 6409; ports 587 and 465).
    Submission,
    /// SMTP relay from other MTAs (RFC 5321; port 25), routed by recipient.
    Smtp,
    /// Local delivery (RFC 2033), routed by recipient.
    Lmtp,
}

impl Protocol {
    /// The lower-case name used in configuration, logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Imap => "imap",
            Protocol::Pop3 => "pop3",
            Protocol::Submission => "submission",
            Protocol::Smtp => "smtp",
            Protocol::Lmtp => "lmtp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
