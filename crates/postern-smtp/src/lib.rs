//! Sans-IO SMTP, submission and LMTP for Postern (in progress).
