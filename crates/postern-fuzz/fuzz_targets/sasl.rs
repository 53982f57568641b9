//! SASL decoding: base64 responses and PLAIN messages, round trip where valid.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern_proto::sasl;

fuzz_target!(|data: &[u8]| {
    if let Ok(decoded) = sasl::decode_response(data) {
        if let Ok(creds) = sasl::decode_plain(&decoded) {
            let again = sasl::encode_plain(&creds);
            let back = sasl::decode_plain(again.expose()).unwrap();
            assert_eq!(back, creds);
        }
    }
    let _ = sasl::decode_plain(data);
    let _ = sasl::identity(data);
});
