//! The permessage-deflate offer and the check of the server's answer (RFC 7692 section 7).
//!
//! We offer one extension, so the server may choose at most that one, with parameters that
//! answer our offer: each at most once, values in range, nothing we did not allow. Anything
//! else fails the handshake with a message that names the parameter.

use super::{Agreed, DeflateConfig};

pub(crate) const NAME: &str = "permessage-deflate";

/// The `Sec-WebSocket-Extensions` value we send, if deflate is enabled.
pub(crate) fn offer(config: &DeflateConfig) -> Option<String> {
    if !config.enabled {
        return None;
    }
    let mut offer = format!("{NAME}; client_max_window_bits");
    if config.client_max_window_bits < 15 {
        offer.push_str(&format!("={}", config.client_max_window_bits));
    }
    if config.server_max_window_bits < 15 {
        offer.push_str(&format!("; server_max_window_bits={}", config.server_max_window_bits));
    }
    if config.client_no_context_takeover {
        offer.push_str("; client_no_context_takeover");
    }
    if config.server_no_context_takeover {
        offer.push_str("; server_no_context_takeover");
    }
    Some(offer)
}

/// Checks the extensions the server chose (the elements of its `Sec-WebSocket-Extensions`):
/// Ok(None) for none (a plain connection), what was agreed for permessage-deflate, or why the
/// answer is refused.
pub(crate) fn accept(chosen: &[&str], config: &DeflateConfig) -> Result<Option<Agreed>, String> {
    let Some((first, others)) = chosen.split_first() else {
        return Ok(None);
    };
    let mut params = split_params(first);
    let name = params.next().unwrap_or_default();
    if !config.enabled || !name.eq_ignore_ascii_case(NAME) {
        return Err(format!("the server chose extension {}, which was not offered", quoted(name)));
    }
    if let Some(other) = others.first() {
        let other = split_params(other).next().unwrap_or_default();
        return Err(format!(
            "the server chose two extensions ({NAME} and {}); only {NAME} was offered, once",
            quoted(other)
        ));
    }
    agree(params, config).map(Some)
}

/// The parameters of the server's permessage-deflate, against our offer.
fn agree<'a>(params: impl Iterator<Item = &'a str>, config: &DeflateConfig) -> Result<Agreed, String> {
    let mut agreed = Agreed {
        client_window_bits: config.client_max_window_bits,
        server_window_bits: 15,
        client_no_context_takeover: config.client_no_context_takeover,
        server_no_context_takeover: false,
        level: config.level,
        threshold: config.threshold,
    };
    let mut seen: Vec<&str> = Vec::new();
    for param in params {
        let (key, value) = match param.split_once('=') {
            Some((k, v)) => (k.trim(), Some(unquote(v.trim()))),
            None => (param, None),
        };
        let key_lower = key.to_ascii_lowercase();
        if seen.iter().any(|s| s.eq_ignore_ascii_case(key)) {
            return Err(format!("{NAME} parameter {} appears twice", quoted(key)));
        }
        seen.push(key);
        match (key_lower.as_str(), value) {
            ("server_no_context_takeover", None) => agreed.server_no_context_takeover = true,
            ("client_no_context_takeover", None) => agreed.client_no_context_takeover = true,
            ("server_max_window_bits", Some(v)) => {
                let bits = window_bits(key, v)?;
                if bits > config.server_max_window_bits {
                    return Err(format!(
                        "{NAME} server_max_window_bits={bits} is more than the {} offered",
                        config.server_max_window_bits
                    ));
                }
                agreed.server_window_bits = bits;
            }
            ("client_max_window_bits", Some(v)) => {
                let bits = window_bits(key, v)?;
                if bits > config.client_max_window_bits {
                    return Err(format!(
                        "{NAME} client_max_window_bits={bits} is more than the {} offered",
                        config.client_max_window_bits
                    ));
                }
                agreed.client_window_bits = bits;
            }
            // Without a value: no limit beyond our own (we offered the parameter).
            ("client_max_window_bits", None) => {}
            ("server_no_context_takeover" | "client_no_context_takeover", Some(v)) => {
                return Err(format!("{NAME} parameter {key} must have no value (it has {})", quoted(v)))
            }
            ("server_max_window_bits", None) => {
                return Err(format!("{NAME} parameter server_max_window_bits needs a value from 8 to 15"))
            }
            _ => return Err(format!("{NAME} parameter {} is unknown (not offered)", quoted(param))),
        }
    }
    if config.server_no_context_takeover && !agreed.server_no_context_takeover {
        return Err(format!("{NAME} without server_no_context_takeover, which was requested"));
    }
    if config.server_max_window_bits < 15 && !seen.iter().any(|s| s.eq_ignore_ascii_case("server_max_window_bits")) {
        return Err(format!("{NAME} without server_max_window_bits, which was requested"));
    }
    Ok(agreed)
}

/// A window size: 8 to 15, digits only, no leading zero (RFC 7692 7.1.2).
fn window_bits(key: &str, value: &str) -> Result<u8, String> {
    match value {
        "8" | "9" | "10" | "11" | "12" | "13" | "14" | "15" => Ok(value.parse().expect("digits")),
        _ => Err(format!("{NAME} {key}={} is not a window size from 8 to 15", quoted(value))),
    }
}

/// The extension's name, then its parameters, each trimmed.
fn split_params(extension: &str) -> impl Iterator<Item = &str> {
    extension.split(';').map(|p| p.trim_matches(|c: char| matches!(c, ' ' | '\t' | '\r' | '\n')))
}

/// A parameter value without its quotes (RFC 7692 7.1: a quoted value is read as the token).
fn unquote(value: &str) -> &str {
    value.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(value)
}

/// A value from the response, quoted for an error message, cut to a readable length.
fn quoted(value: &str) -> String {
    let cut: String = value.chars().take(60).collect();
    if cut.len() < value.len() {
        format!("{cut:?}...")
    } else {
        format!("{cut:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agreed(answer: &str) -> Agreed {
        accept(&[answer], &DeflateConfig::default()).unwrap().unwrap()
    }

    fn refused(answers: &[&str], config: &DeflateConfig) -> String {
        accept(answers, config).unwrap_err()
    }

    #[test]
    fn the_default_offer() {
        assert_eq!(offer(&DeflateConfig::default()).unwrap(), "permessage-deflate; client_max_window_bits");
        assert_eq!(offer(&DeflateConfig { enabled: false, ..Default::default() }), None);
        let tuned = DeflateConfig {
            client_max_window_bits: 10,
            server_max_window_bits: 9,
            client_no_context_takeover: true,
            server_no_context_takeover: true,
            ..Default::default()
        };
        assert_eq!(
            offer(&tuned).unwrap(),
            "permessage-deflate; client_max_window_bits=10; server_max_window_bits=9; client_no_context_takeover; \
             server_no_context_takeover"
        );
    }

    #[test]
    fn no_extension_is_a_plain_connection() {
        assert_eq!(accept(&[], &DeflateConfig::default()), Ok(None));
    }

    #[test]
    fn every_valid_answer_is_accepted() {
        let plain = agreed("permessage-deflate");
        assert_eq!((plain.client_window_bits, plain.server_window_bits), (15, 15));
        assert!(!plain.client_no_context_takeover && !plain.server_no_context_takeover);
        let all = agreed(
            "Permessage-Deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=8; \
             client_max_window_bits=\"9\"",
        );
        assert!(all.client_no_context_takeover && all.server_no_context_takeover);
        assert_eq!((all.client_window_bits, all.server_window_bits), (9, 8));
        assert_eq!(agreed("permessage-deflate;client_max_window_bits").client_window_bits, 15);
        for bits in 8..=15 {
            let a =
                agreed(&format!("permessage-deflate; server_max_window_bits={bits}; client_max_window_bits={bits}"));
            assert_eq!((a.client_window_bits, a.server_window_bits), (bits, bits));
        }
    }

    #[test]
    fn what_was_requested_must_be_answered() {
        let config =
            DeflateConfig { server_no_context_takeover: true, server_max_window_bits: 10, ..Default::default() };
        let a = accept(&["permessage-deflate; server_no_context_takeover; server_max_window_bits=10"], &config);
        assert_eq!(a.unwrap().unwrap().server_window_bits, 10);
        assert!(refused(&["permessage-deflate; server_max_window_bits=10"], &config).contains("server_no_context"));
        assert!(refused(&["permessage-deflate; server_no_context_takeover"], &config).contains("server_max_window"));
        let more = refused(&["permessage-deflate; server_no_context_takeover; server_max_window_bits=11"], &config);
        assert!(more.contains("more than the 10 offered"), "{more}");
        let client =
            DeflateConfig { client_max_window_bits: 12, client_no_context_takeover: true, ..Default::default() };
        let a = accept(&["permessage-deflate"], &client).unwrap().unwrap();
        assert_eq!((a.client_window_bits, a.client_no_context_takeover), (12, true));
        assert!(refused(&["permessage-deflate; client_max_window_bits=13"], &client).contains("13"));
    }

    #[test]
    fn invalid_answers_are_refused_naming_what_is_wrong() {
        let d = DeflateConfig::default();
        for (answer, named) in [
            ("permessage-deflate; server_no_context_takeover; server_no_context_takeover", "appears twice"),
            ("permessage-deflate; client_max_window_bits=10; Client_Max_Window_Bits=11", "appears twice"),
            ("permessage-deflate; server_max_window_bits=7", "\"7\" is not a window size"),
            ("permessage-deflate; server_max_window_bits=16", "\"16\""),
            ("permessage-deflate; client_max_window_bits=08", "\"08\""),
            ("permessage-deflate; client_max_window_bits=", "\"\""),
            ("permessage-deflate; server_max_window_bits", "needs a value"),
            ("permessage-deflate; server_no_context_takeover=1", "must have no value"),
            ("permessage-deflate; x_custom=1", "x_custom=1"),
            ("x-webkit-deflate-frame", "x-webkit-deflate-frame\", which was not offered"),
        ] {
            let message = refused(&[answer], &d);
            assert!(message.contains(named), "{answer}: {message}");
        }
        assert!(refused(&["permessage-deflate", "permessage-deflate"], &d).contains("two extensions"));
        assert!(refused(&["permessage-deflate", "x-other"], &d).contains("x-other"));
        let off = DeflateConfig { enabled: false, ..Default::default() };
        assert!(refused(&["permessage-deflate"], &off).contains("not offered"));
    }
}
