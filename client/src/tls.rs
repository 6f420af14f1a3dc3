//! Certificate fingerprints, the way a server is pinned (docs/PROTOCOL.md §2).

use sha2::{Digest, Sha256};

/// The fingerprint of a certificate: the SHA-256 of its DER encoding as 64 lowercase hex digits,
/// as `weir serve` prints it and `weir send --pin` takes it.
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Parses a fingerprint as printed by [`fingerprint`]: 64 hex digits, either case, optionally
/// with `:` between bytes (as `openssl x509 -fingerprint -sha256` prints it).
pub fn parse_fingerprint(text: &str) -> Result<[u8; 32], String> {
    let digits: String = text.trim().chars().filter(|&c| c != ':').collect();
    if digits.len() != 64 || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!(
            "fingerprint `{text}` is not 64 hex digits (the SHA-256 of the certificate)"
        ));
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&digits[2 * i..2 * i + 2], 16)
            .map_err(|_| format!("fingerprint `{text}` is not hex"))?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_sha256_hex_and_parses_back() {
        let hex = fingerprint(b"abc");
        assert_eq!(
            hex,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let bytes = parse_fingerprint(&hex).expect("parses");
        assert_eq!(bytes[0], 0xba);
        assert_eq!(bytes[31], 0xad);
        let colons: Vec<String> = bytes.iter().map(|b| format!("{b:02X}")).collect();
        assert_eq!(parse_fingerprint(&colons.join(":")), Ok(bytes));
    }

    #[test]
    fn a_bad_fingerprint_is_named() {
        assert_eq!(
            parse_fingerprint("abc"),
            Err("fingerprint `abc` is not 64 hex digits (the SHA-256 of the certificate)".into())
        );
    }
}
