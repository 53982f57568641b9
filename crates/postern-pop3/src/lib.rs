//! Sans-IO POP3 for Postern (in progress).
