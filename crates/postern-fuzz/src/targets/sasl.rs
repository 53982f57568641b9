//! SASL decoding: base64 responses, PLAIN messages (round trip where valid), LOGIN
//! identities and the bearer-token messages (XOAUTH2, OAUTHBEARER), whose user must be
//! a piece of the message.

use postern_proto::sasl;

/// One fuzz input; panics on a broken invariant.
pub fn run(data: &[u8]) {
    if let Ok(decoded) = sasl::decode_response(data)
        && let Ok(creds) = sasl::decode_plain(&decoded)
    {
        let again = sasl::encode_plain(&creds);
        let back = sasl::decode_plain(again.expose()).unwrap();
        assert_eq!(back, creds);
    }
    let _ = sasl::decode_plain(data);
    let _ = sasl::identity(data);
    for creds in [sasl::decode_xoauth2(data), sasl::decode_oauthbearer(data)]
        .into_iter()
        .flatten()
    {
        assert!(!creds.user.is_empty());
        // The token travels on unchanged: the whole message, as received.
        assert_eq!(creds.password.expose().as_slice(), data);
    }
}
