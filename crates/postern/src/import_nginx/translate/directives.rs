//! What both blocks share about directives: the argument forms (times, sizes,
//! on/off), variables, and the directives that have no Postern equivalent.

use std::time::Duration;

use super::super::parse::{Directive, Loc};
use super::super::units::{parse_size, parse_time};
use super::Ctx;

/// A directive's single time argument (`30s`, `1m 30s`); a warning otherwise.
pub(super) fn time_arg(ctx: &mut Ctx<'_>, d: &Directive) -> Option<(Duration, Loc)> {
    match parse_time(d.arg(0)) {
        Some(t) if d.args.len() == 1 => Some((t, d.loc.clone())),
        _ => {
            ctx.warn(d, format!("\"{}\" is not a time; not mapped", d.arg(0)));
            None
        }
    }
}

/// A directive's single size argument (`16k`); a warning otherwise.
pub(super) fn size_arg(ctx: &mut Ctx<'_>, d: &Directive) -> Option<(u64, Loc)> {
    match parse_size(d.arg(0)) {
        Some(s) if d.args.len() == 1 => Some((s, d.loc.clone())),
        _ => {
            ctx.warn(d, format!("\"{}\" is not a size; not mapped", d.arg(0)));
            None
        }
    }
}

/// `on` or `off`; a warning otherwise.
pub(super) fn on_off(ctx: &mut Ctx<'_>, d: &Directive) -> Option<bool> {
    match d.arg(0) {
        "on" => Some(true),
        "off" => Some(false),
        other => {
            ctx.warn(d, format!("\"{other}\": expected on or off; not mapped"));
            None
        }
    }
}

/// Variables are nginx's run-time values: Postern has none, so each one kept as
/// written is a difference the operator must see.
pub(super) fn check_variables(ctx: &mut Ctx<'_>, d: &Directive) {
    let vars: Vec<&str> = d
        .args
        .iter()
        .filter(|a| a.has_variable())
        .map(|a| a.value.as_str())
        .collect();
    if !vars.is_empty() {
        let msg = format!(
            "nginx variable(s) in {}: kept as written, Postern does not expand variables",
            vars.join(" ")
        );
        ctx.warn(d, msg);
    }
}

/// Directives with no Postern equivalent, and why. Shared by mail {} and stream {}.
pub(super) fn unmapped_reason(name: &str) -> Option<&'static str> {
    Some(match name {
        "imap_capabilities" | "pop3_capabilities" | "smtp_capabilities" => {
            "Postern advertises its own pre-login capabilities (submission: the extensions every backend's EHLO offers); a static list is not configurable"
        }
        "proxy_pass_error_message" => {
            "not configurable: Postern answers a refused backend login with its protocol's usual failure"
        }
        "resolver" | "resolver_timeout" => {
            "Postern does no reverse DNS lookups (no Client-Host to the auth server, no XCLIENT NAME)"
        }
        "error_log" | "access_log" | "log_format" | "open_log_file_cache" => {
            "Postern logs to standard error ([log] level)"
        }
        "proxy" => "a no-op in nginx too",
        "proxy_buffer" | "proxy_buffer_size" => "Postern bounds backend replies itself",
        "smtp_greeting_delay" => "not supported",
        "imap_auth" => {
            "Postern offers PLAIN and LOGIN (and XOAUTH2/OAUTHBEARER with [imap] oauth = true); CRAM-MD5 and EXTERNAL are not supported"
        }
        "auth_http_pass_client_cert"
        | "ssl_verify_client"
        | "ssl_client_certificate"
        | "ssl_trusted_certificate"
        | "ssl_verify_depth"
        | "ssl_crl"
        | "ssl_ocsp"
        | "ssl_ocsp_cache"
        | "ssl_ocsp_responder" => "Postern does not request client certificates",
        "ssl_protocols"
        | "ssl_ciphers"
        | "ssl_prefer_server_ciphers"
        | "ssl_ecdh_curve"
        | "ssl_dhparam"
        | "ssl_conf_command"
        | "ssl_session_cache"
        | "ssl_session_tickets"
        | "ssl_session_ticket_key"
        | "ssl_session_timeout"
        | "ssl_certificate_compression"
        | "ssl_early_data"
        | "ssl_buffer_size"
        | "ssl_handshake_timeout"
        | "ssl_reject_handshake"
        | "ssl_stapling"
        | "ssl_stapling_verify"
        | "ssl_alpn" => {
            "Postern's TLS is rustls with fixed safe settings: TLS 1.2 and 1.3, its own cipher suites and resumption"
        }
        "ssl_password_file" => {
            "encrypted private keys are not supported: give Postern a decrypted key"
        }
        "limit_conn"
        | "limit_conn_zone"
        | "limit_conn_log_level"
        | "limit_rate"
        | "allow"
        | "deny" => {
            "Postern's [limits] (per-address connections, rate, failed logins) are on by default; tune them there"
        }
        "proxy_smtp_auth" => {
            "Postern replays AUTH with the auth server's Auth-Pass, except to backends declared with [backends.NAME.submission] login = \"xclient\""
        }
        "map" | "geo" | "split_clients" | "js_import" | "js_set" | "js_access" | "js_preread"
        | "njs" | "perl" => "variables and scripts have no Postern equivalent",
        "variables_hash_max_size"
        | "variables_hash_bucket_size"
        | "server_names_hash_max_size"
        | "server_names_hash_bucket_size"
        | "tcp_nodelay"
        | "preread_buffer_size"
        | "preread_timeout"
        | "proxy_download_rate"
        | "proxy_upload_rate"
        | "proxy_socket_keepalive"
        | "proxy_half_close"
        | "proxy_requests"
        | "proxy_responses"
        | "proxy_bind"
        | "ssl_preread"
        | "proxy_next_upstream"
        | "proxy_next_upstream_tries"
        | "proxy_next_upstream_timeout"
        | "proxy_ssl_name"
        | "proxy_ssl_server_name"
        | "proxy_ssl_verify"
        | "proxy_ssl_trusted_certificate"
        | "proxy_ssl_protocols"
        | "proxy_ssl_ciphers"
        | "proxy_ssl_certificate"
        | "proxy_ssl_certificate_key"
        | "proxy_ssl_session_reuse"
        | "status_zone"
        | "health_check"
        | "health_check_timeout" => "no Postern equivalent (see docs/migrating-from-nginx.md)",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unmapped_directives_have_reasons() {
        for name in [
            "ssl_protocols",
            "resolver",
            "proxy_pass_error_message",
            "limit_conn",
            "map",
        ] {
            assert!(unmapped_reason(name).is_some(), "{name}");
        }
        // Directives that are mapped (or unknown) have none.
        for name in ["listen", "auth_http", "ssl_certificate", "frobnicate"] {
            assert!(unmapped_reason(name).is_none(), "{name}");
        }
    }
}
