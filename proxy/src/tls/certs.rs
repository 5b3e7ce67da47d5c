//! PEM parsing (rustls-pki-types) and certificate facts (x509-parser): SANs, subject, serial,
//! validity, SHA-256, for `DownstreamTls`, SAN matching, XFCC and admin `/certs`.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use sha2::Digest;
use weir_filters::PeerCert;

use super::config::{CertPair, Sans};

/// Certificate material that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// No certificate in the PEM.
    #[error("no PEM certificate found")]
    NoCertificate,
    /// Bad PEM.
    #[error("invalid PEM: {0}")]
    Pem(String),
    /// The key is unusable.
    #[error("invalid private key: {0}")]
    Key(String),
    /// The key does not belong to the certificate.
    #[error("the private key does not match the certificate")]
    KeyMismatch,
    /// A CA certificate rustls rejects.
    #[error("invalid CA certificate: {0}")]
    Ca(String),
}

/// All certificates of a PEM bundle.
pub fn certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let v = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Pem(e.to_string()))?;
    if v.is_empty() {
        return Err(CertError::NoCertificate);
    }
    Ok(v)
}

/// CRLs of a PEM bundle.
pub fn crls(pem: &[u8]) -> Result<Vec<CertificateRevocationListDer<'static>>, CertError> {
    CertificateRevocationListDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Pem(e.to_string()))
}

/// A root store from a PEM bundle of CAs.
pub fn root_store(pem: &[u8]) -> Result<rustls::RootCertStore, CertError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(pem)? {
        roots.add(c).map_err(|e| CertError::Ca(e.to_string()))?;
    }
    Ok(roots)
}

/// The rustls signing key and chain of a pair, checked to belong together.
pub fn certified_key(p: &CertPair) -> Result<rustls::sign::CertifiedKey, CertError> {
    let chain = certs(&p.chain)?;
    let key = PrivateKeyDer::from_pem_slice(&p.key).map_err(|e| CertError::Key(e.to_string()))?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| CertError::Key(e.to_string()))?;
    let ck = rustls::sign::CertifiedKey::new(chain, signing);
    match ck.keys_match() {
        Ok(()) => Ok(ck),
        // Keys whose public half rustls cannot extract are accepted as is.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(ck),
        Err(_) => Err(CertError::KeyMismatch),
    }
}

/// SANs of a DER certificate (empty when it does not parse).
pub fn sans(der: &[u8]) -> Sans {
    let mut out = Sans::default();
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return out;
    };
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        use x509_parser::extensions::GeneralName as G;
        for n in &ext.value.general_names {
            match n {
                G::DNSName(s) => out.dns.push((*s).to_string()),
                G::URI(s) => out.uri.push((*s).to_string()),
                G::RFC822Name(s) => out.email.push((*s).to_string()),
                G::IPAddress(b) => match b.len() {
                    4 => out.ip.push(
                        std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*b).unwrap_or_default())
                            .to_string(),
                    ),
                    16 => out.ip.push(
                        std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*b).unwrap_or_default())
                            .to_string(),
                    ),
                    _ => {}
                },
                _ => {}
            }
        }
    }
    out
}

/// PEM text of a DER certificate.
pub fn to_pem(der: &[u8]) -> String {
    use std::fmt::Write;
    let b64 = base64_encode(der);
    let mut s = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        let _ = writeln!(s, "{}", String::from_utf8_lossy(chunk));
    }
    s.push_str("-----END CERTIFICATE-----\n");
    s
}

fn base64_encode(b: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(b.len().div_ceil(3) * 4);
    for c in b.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if c.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if c.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    use std::fmt::Write;
    b.iter()
        .fold(String::with_capacity(b.len() * 2), |mut s, x| {
            let _ = write!(s, "{x:02x}");
            s
        })
}

/// Facts of a peer certificate (DER).
pub fn peer_cert(der: &[u8]) -> PeerCert {
    let s = sans(der);
    let (subject, serial) = match x509_parser::parse_x509_certificate(der) {
        Ok((_, c)) => (c.subject().to_string(), hex(c.raw_serial())),
        Err(_) => (String::new(), String::new()),
    };
    PeerCert {
        uri_sans: s.uri,
        dns_sans: s.dns,
        subject,
        serial,
        sha256: hex(&sha2::Sha256::digest(der)),
        pem: to_pem(der),
    }
}

/// A certificate as admin `/certs` shows it (Envoy's `CertificateDetails`).
pub fn details_json(der: &[u8], path: &str) -> serde_json::Value {
    let Ok((_, c)) = x509_parser::parse_x509_certificate(der) else {
        return serde_json::json!({ "path": path });
    };
    let s = sans(der);
    let mut alt = Vec::new();
    alt.extend(s.dns.iter().map(|d| serde_json::json!({ "dns": d })));
    alt.extend(s.uri.iter().map(|u| serde_json::json!({ "uri": u })));
    alt.extend(s.ip.iter().map(|i| serde_json::json!({ "ip_address": i })));
    let not_after = c.validity().not_after.timestamp();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let rfc3339 = |t: x509_parser::time::ASN1Time| {
        let d = t.to_datetime();
        format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            d.year(),
            d.month() as u8,
            d.day(),
            d.hour(),
            d.minute(),
            d.second()
        )
    };
    serde_json::json!({
        "path": path,
        "serial_number": hex(c.raw_serial()),
        "subject_alt_names": alt,
        "days_until_expiration": ((not_after - now).max(0) / 86400).to_string(),
        "valid_from": rfc3339(c.validity().not_before),
        "expiration_time": rfc3339(c.validity().not_after),
    })
}

/// Shared handle for the key type rustls resolvers hand out.
pub type Key = Arc<rustls::sign::CertifiedKey>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_known_vectors() {
        assert_eq!(base64_encode(b""), "");
        assert_eq!(base64_encode(b"f"), "Zg==");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn facts_of_a_generated_cert() {
        let mut p = rcgen::CertificateParams::new(vec!["a.test".into()]).expect("params");
        p.subject_alt_names.push(rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from("spiffe://td/ns/a/sa/b").expect("uri"),
        ));
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "a.test");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = p.self_signed(&key).expect("cert");
        let pc = peer_cert(cert.der());
        assert_eq!(pc.dns_sans, vec!["a.test"]);
        assert_eq!(pc.uri_sans, vec!["spiffe://td/ns/a/sa/b"]);
        assert_eq!(pc.subject, "CN=a.test");
        assert_eq!(pc.sha256.len(), 64);
        assert_eq!(
            certs(pc.pem.as_bytes()).expect("pem round trip")[0],
            *cert.der()
        );
        let pair = CertPair {
            chain: cert.pem().into_bytes(),
            key: key.serialize_pem().into_bytes(),
        };
        certified_key(&pair).expect("matching key");
        let other = rcgen::KeyPair::generate().expect("key");
        let bad = CertPair {
            key: other.serialize_pem().into_bytes(),
            ..pair
        };
        assert!(matches!(certified_key(&bad), Err(CertError::KeyMismatch)));
    }
}
