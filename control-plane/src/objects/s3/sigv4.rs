//! AWS Signature Version 4 verification for the S3 endpoint: the `Authorization` header
//! form, presigned query strings (`X-Amz-Signature`), and the chunk signatures of
//! `STREAMING-AWS4-HMAC-SHA256-PAYLOAD` (aws-chunked) bodies, decoded by [`ChunkDecoder`].
//!
//! Canonical request (S3 flavour): method, the URI path with each byte outside RFC 3986's
//! unreserved set percent-encoded (not double-encoded; `/` kept), the sorted,
//! percent-encoded query, the signed headers (`name:trimmed value`, inner whitespace runs
//! collapsed), the signed-header list, and the payload hash (`x-amz-content-sha256`, or
//! `UNSIGNED-PAYLOAD` for presigned URLs).

use bytes::{Buf as _, Bytes, BytesMut};
use hmac::{Hmac, Mac as _};
use sha2::{Digest as _, Sha256};

use crate::objects::hex;

type HmacSha256 = Hmac<Sha256>;

/// The algorithm name.
pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// `x-amz-content-sha256` of an unsigned body.
pub const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";
/// `x-amz-content-sha256` of an aws-chunked body with chunk signatures.
pub const STREAMING_PAYLOAD: &str = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD";
/// `x-amz-content-sha256` of an aws-chunked body without chunk signatures, with trailers.
pub const STREAMING_UNSIGNED_TRAILER: &str = "STREAMING-UNSIGNED-PAYLOAD-TRAILER";
/// Largest clock skew accepted (15 minutes, as S3).
pub const MAX_SKEW_SECS: i64 = 15 * 60;
/// SHA-256 of the empty string.
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// Why a request's signature was refused (each maps to an S3 error code).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No credentials at all.
    #[error("the request carries no credentials")]
    Missing,
    /// Malformed `Authorization` or presigned parameters.
    #[error("{0}")]
    Malformed(String),
    /// Unknown access key.
    #[error("the access key id does not exist")]
    UnknownKey,
    /// The signature does not match.
    #[error("the request signature does not match the signature computed with the secret key")]
    Mismatch,
    /// `x-amz-date` too far from now.
    #[error("the difference between the request time and the server's time is too large")]
    Skewed,
    /// A presigned URL past its expiry.
    #[error("the presigned request has expired")]
    Expired,
}

/// The `Credential=` scope: `AKID/date/region/service/aws4_request`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    /// The access key id.
    pub access_key: String,
    /// `YYYYMMDD`.
    pub date: String,
    /// Region.
    pub region: String,
    /// Service (`s3`).
    pub service: String,
}

impl Credential {
    fn parse(s: &str) -> Result<Self, AuthError> {
        let mut it = s.split('/');
        let (Some(ak), Some(d), Some(r), Some(sv), Some("aws4_request"), None) = (
            it.next(),
            it.next(),
            it.next(),
            it.next(),
            it.next(),
            it.next(),
        ) else {
            return Err(AuthError::Malformed(format!("malformed credential {s:?}")));
        };
        Ok(Credential {
            access_key: ak.into(),
            date: d.into(),
            region: r.into(),
            service: sv.into(),
        })
    }

    /// `date/region/service/aws4_request`.
    pub fn scope(&self) -> String {
        format!(
            "{}/{}/{}/aws4_request",
            self.date, self.region, self.service
        )
    }
}

/// The parsed signature parameters of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureParams {
    /// Credential scope.
    pub credential: Credential,
    /// Lower-case signed header names, in the order given.
    pub signed_headers: Vec<String>,
    /// The hex signature.
    pub signature: String,
    /// `x-amz-date` (`YYYYMMDDTHHMMSSZ`).
    pub amz_date: String,
    /// Presigned: `X-Amz-Expires`.
    pub expires: Option<u64>,
}

/// Parse `Authorization: AWS4-HMAC-SHA256 Credential=…, SignedHeaders=…, Signature=…`.
pub fn parse_authorization(v: &str, amz_date: &str) -> Result<SignatureParams, AuthError> {
    let rest = v
        .strip_prefix(ALGORITHM)
        .ok_or_else(|| AuthError::Malformed("unsupported authorization type".into()))?;
    let (mut cred, mut sh, mut sig) = (None, None, None);
    for part in rest.split(',') {
        let part = part.trim();
        if let Some(c) = part.strip_prefix("Credential=") {
            cred = Some(c);
        } else if let Some(h) = part.strip_prefix("SignedHeaders=") {
            sh = Some(h);
        } else if let Some(s) = part.strip_prefix("Signature=") {
            sig = Some(s);
        }
    }
    let (Some(cred), Some(sh), Some(sig)) = (cred, sh, sig) else {
        return Err(AuthError::Malformed(
            "the Authorization header needs Credential, SignedHeaders and Signature".into(),
        ));
    };
    Ok(SignatureParams {
        credential: Credential::parse(cred)?,
        signed_headers: sh.split(';').map(str::to_ascii_lowercase).collect(),
        signature: sig.to_string(),
        amz_date: amz_date.to_string(),
        expires: None,
    })
}

/// Parse presigned query parameters (decoded pairs).
pub fn parse_presigned(query: &[(String, String)]) -> Result<SignatureParams, AuthError> {
    let get = |n: &str| {
        query
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.as_str())
            .ok_or_else(|| AuthError::Malformed(format!("presigned URL without {n}")))
    };
    if get("X-Amz-Algorithm")? != ALGORITHM {
        return Err(AuthError::Malformed("unsupported X-Amz-Algorithm".into()));
    }
    let expires: u64 = get("X-Amz-Expires")?
        .parse()
        .map_err(|_| AuthError::Malformed("bad X-Amz-Expires".into()))?;
    Ok(SignatureParams {
        credential: Credential::parse(get("X-Amz-Credential")?)?,
        signed_headers: get("X-Amz-SignedHeaders")?
            .split(';')
            .map(str::to_ascii_lowercase)
            .collect(),
        signature: get("X-Amz-Signature")?.to_string(),
        amz_date: get("X-Amz-Date")?.to_string(),
        expires: Some(expires),
    })
}

/// Percent-encode everything outside RFC 3986's unreserved set (and `/` when `keep_slash`).
pub fn uri_encode(s: &[u8], keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'_' | b'.' | b'~')
            || (keep_slash && b == b'/')
        {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Percent-decode (`+` stays `+`, as S3 treats paths).
pub fn percent_decode(s: &str) -> Vec<u8> {
    percent_encoding::percent_decode_str(s).collect()
}

/// Decode a query string into pairs (`+` means space in queries).
pub fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let d = |s: &str| {
                String::from_utf8_lossy(&percent_decode(&s.replace('+', " "))).into_owned()
            };
            (d(k), d(v))
        })
        .collect()
}

/// The canonical query string of decoded `pairs` (minus `X-Amz-Signature`).
pub fn canonical_query(pairs: &[(String, String)]) -> String {
    let mut enc: Vec<(String, String)> = pairs
        .iter()
        .filter(|(k, _)| k != "X-Amz-Signature")
        .map(|(k, v)| {
            (
                uri_encode(k.as_bytes(), false),
                uri_encode(v.as_bytes(), false),
            )
        })
        .collect();
    enc.sort();
    enc.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// Build the canonical request. `headers` are `(lower-case name, value)` pairs; values of a
/// repeated header are joined with `,`.
pub fn canonical_request(
    method: &str,
    raw_path: &str,
    query: &[(String, String)],
    headers: &[(String, String)],
    signed: &[String],
    payload_hash: &str,
) -> Result<String, AuthError> {
    let mut ch = String::new();
    for name in signed {
        let vals: Vec<String> = headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        if vals.is_empty() {
            return Err(AuthError::Malformed(format!(
                "signed header {name:?} is not in the request"
            )));
        }
        ch.push_str(&format!("{name}:{}\n", vals.join(",")));
    }
    let path = uri_encode(&percent_decode(raw_path), true);
    Ok(format!(
        "{method}\n{path}\n{}\n{ch}\n{}\n{payload_hash}",
        canonical_query(query),
        signed.join(";")
    ))
}

/// The string to sign for a canonical request.
pub fn string_to_sign(amz_date: &str, scope: &str, canonical_request: &str) -> String {
    format!(
        "{ALGORITHM}\n{amz_date}\n{scope}\n{}",
        hex(&Sha256::digest(canonical_request.as_bytes()))
    )
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length.
    let mut m = HmacSha256::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    m.update(data);
    m.finalize().into_bytes().into()
}

/// The signing key for `secret` and a credential scope.
pub fn signing_key(secret: &str, c: &Credential) -> [u8; 32] {
    let k = hmac(format!("AWS4{secret}").as_bytes(), c.date.as_bytes());
    let k = hmac(&k, c.region.as_bytes());
    let k = hmac(&k, c.service.as_bytes());
    hmac(&k, b"aws4_request")
}

/// Hex HMAC-SHA256 of `sts` under `key`.
pub fn sign(key: &[u8; 32], sts: &str) -> String {
    hex(&hmac(key, sts.as_bytes()))
}

/// Constant-time comparison of two hex signatures.
pub fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| {
            acc | (x.to_ascii_lowercase() ^ y.to_ascii_lowercase())
        }) == 0
}

/// Seconds since the epoch of `YYYYMMDDTHHMMSSZ`.
pub fn parse_amz_date(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (n(0..4)?, n(4..6)?, n(6..8)?);
    let (h, mi, se) = (n(9..11)?, n(11..13)?, n(13..15)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    Some(crate::objects::days_from_civil(y, mo as u32, d as u32) * 86_400 + h * 3600 + mi * 60 + se)
}

/// Chunk-signature state of a `STREAMING-AWS4-HMAC-SHA256-PAYLOAD` body.
#[derive(Debug, Clone)]
pub struct ChunkSigner {
    /// The signing key.
    pub key: [u8; 32],
    /// `x-amz-date`.
    pub amz_date: String,
    /// The credential scope.
    pub scope: String,
    /// The previous signature (the seed: the request's signature).
    pub prev: String,
}

impl ChunkSigner {
    /// The expected signature of a chunk with this SHA-256.
    fn expected(&self, chunk_sha: &str) -> String {
        let sts = format!(
            "AWS4-HMAC-SHA256-PAYLOAD\n{}\n{}\n{}\n{EMPTY_SHA256}\n{chunk_sha}",
            self.amz_date, self.scope, self.prev
        );
        sign(&self.key, &sts)
    }
}

/// Incremental aws-chunked decoder: `hex-size[;chunk-signature=sig]\r\n data \r\n …
/// 0[;chunk-signature=sig]\r\n [trailers] \r\n`. Feed bytes with [`ChunkDecoder::push`],
/// take data with [`ChunkDecoder::next_data`]; data of a chunk is released as it arrives (so
/// memory stays bounded by one network read), and its signature is checked when the chunk
/// ends: a bad signature fails the body, so the store discards what it wrote.
#[derive(Debug)]
pub struct ChunkDecoder {
    buf: BytesMut,
    state: State,
    signer: Option<ChunkSigner>,
    hasher: Sha256,
    decoded: u64,
    last_was_final: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Header,
    Data { left: u64, sig: Option<String> },
    DataEnd,
    Trailers,
    Done,
}

/// Longest chunk header line accepted.
const MAX_HEADER_LINE: usize = 4096;

impl ChunkDecoder {
    /// A decoder; with `signer`, chunk signatures are required and verified.
    pub fn new(signer: Option<ChunkSigner>) -> Self {
        ChunkDecoder {
            buf: BytesMut::new(),
            state: State::Header,
            signer,
            hasher: Sha256::new(),
            decoded: 0,
            last_was_final: false,
        }
    }

    /// Append received bytes.
    pub fn push(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }

    /// Whether the final chunk (and trailers) were read.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Decoded bytes so far.
    pub fn decoded(&self) -> u64 {
        self.decoded
    }

    fn line(&mut self) -> Result<Option<String>, String> {
        match self.buf.windows(2).position(|w| w == b"\r\n") {
            Some(i) => {
                let l = self.buf.split_to(i);
                self.buf.advance(2);
                String::from_utf8(l.to_vec())
                    .map(Some)
                    .map_err(|_| "a chunk header is not UTF-8".into())
            }
            None if self.buf.len() > MAX_HEADER_LINE => Err("a chunk header is too long".into()),
            None => Ok(None),
        }
    }

    /// Check the signature of the chunk just read (when signed).
    fn finish_chunk(&mut self, sig: Option<&str>) -> Result<(), String> {
        let sha = hex(&std::mem::replace(&mut self.hasher, Sha256::new()).finalize());
        if let Some(signer) = &mut self.signer {
            let got = sig.unwrap_or_default();
            if !same(&signer.expected(&sha), got) {
                return Err("a chunk signature does not match".into());
            }
            signer.prev = got.to_string();
        }
        Ok(())
    }

    /// The next piece of decoded data; `Ok(None)` when more input is needed (or when done).
    pub fn next_data(&mut self) -> Result<Option<Bytes>, String> {
        loop {
            match self.state.clone() {
                State::Header => {
                    let Some(line) = self.line()? else {
                        return Ok(None);
                    };
                    let (size, ext) = line.split_once(';').unwrap_or((&line, ""));
                    let size = u64::from_str_radix(size.trim(), 16)
                        .map_err(|_| format!("bad chunk size {size:?}"))?;
                    let sig = ext
                        .split(';')
                        .find_map(|e| e.trim().strip_prefix("chunk-signature="))
                        .map(str::to_string);
                    if self.signer.is_some() && sig.is_none() {
                        return Err("a chunk has no chunk-signature".into());
                    }
                    if size == 0 {
                        self.finish_chunk(sig.as_deref())?;
                        self.last_was_final = true;
                        self.state = if self.signer.is_some() {
                            State::DataEnd
                        } else {
                            State::Trailers
                        };
                    } else {
                        self.state = State::Data { left: size, sig };
                    }
                }
                State::Data { left, sig } => {
                    if left == 0 {
                        self.finish_chunk(sig.as_deref())?;
                        self.state = State::DataEnd;
                        continue;
                    }
                    if self.buf.is_empty() {
                        return Ok(None);
                    }
                    let n = (left as usize).min(self.buf.len());
                    let data = self.buf.split_to(n).freeze();
                    self.hasher.update(&data);
                    self.decoded += n as u64;
                    self.state = State::Data {
                        left: left - n as u64,
                        sig,
                    };
                    return Ok(Some(data));
                }
                State::DataEnd => {
                    // After a signed final chunk S3 clients send "\r\n" (or trailers).
                    if self.buf.len() < 2 {
                        return Ok(None);
                    }
                    if &self.buf[..2] != b"\r\n" {
                        return Err("a chunk does not end with CRLF".into());
                    }
                    self.buf.advance(2);
                    self.state = if self.last_was_final {
                        State::Done
                    } else {
                        State::Header
                    };
                }
                State::Trailers => {
                    let Some(line) = self.line()? else {
                        return Ok(None);
                    };
                    if line.is_empty() {
                        self.state = State::Done;
                    }
                }
                State::Done => return Ok(None),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";

    fn cred() -> Credential {
        Credential {
            access_key: "AKIAIOSFODNN7EXAMPLE".into(),
            date: "20130524".into(),
            region: "us-east-1".into(),
            service: "s3".into(),
        }
    }

    /// AWS's documented "GET Object" example (Signature Version 4, header auth).
    #[test]
    fn aws_get_object_example() {
        let auth = "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request,SignedHeaders=host;range;x-amz-content-sha256;x-amz-date,Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41";
        let p = parse_authorization(auth, "20130524T000000Z").unwrap();
        assert_eq!(p.credential, cred());
        let headers: Vec<(String, String)> = [
            ("host", "examplebucket.s3.amazonaws.com"),
            ("range", "bytes=0-9"),
            ("x-amz-content-sha256", EMPTY_SHA256),
            ("x-amz-date", "20130524T000000Z"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        let creq = canonical_request(
            "GET",
            "/test.txt",
            &[],
            &headers,
            &p.signed_headers,
            EMPTY_SHA256,
        )
        .unwrap();
        assert_eq!(
            creq,
            "GET\n/test.txt\n\nhost:examplebucket.s3.amazonaws.com\nrange:bytes=0-9\nx-amz-content-sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\nx-amz-date:20130524T000000Z\n\nhost;range;x-amz-content-sha256;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let sts = string_to_sign(&p.amz_date, &p.credential.scope(), &creq);
        assert_eq!(
            sts,
            "AWS4-HMAC-SHA256\n20130524T000000Z\n20130524/us-east-1/s3/aws4_request\n7344ae5b7ee6c3e7e6b0fe0640412a37625d1fbfff95c48bbb2dc43964946972"
        );
        let key = signing_key(SECRET, &p.credential);
        assert_eq!(sign(&key, &sts), p.signature);
        assert!(same(&sign(&key, &sts), &p.signature.to_uppercase()));
        let wrong = signing_key("not-the-secret", &p.credential);
        assert!(!same(&sign(&wrong, &sts), &p.signature));
    }

    /// AWS's documented presigned URL example (GET /test.txt, expires 86400).
    #[test]
    fn aws_presigned_example() {
        let q = parse_query(
            "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host&X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404",
        );
        let p = parse_presigned(&q).unwrap();
        assert_eq!(p.expires, Some(86400));
        let headers = vec![(
            "host".to_string(),
            "examplebucket.s3.amazonaws.com".to_string(),
        )];
        let creq = canonical_request(
            "GET",
            "/test.txt",
            &q,
            &headers,
            &p.signed_headers,
            UNSIGNED_PAYLOAD,
        )
        .unwrap();
        let sts = string_to_sign(&p.amz_date, &p.credential.scope(), &creq);
        assert_eq!(sign(&signing_key(SECRET, &p.credential), &sts), p.signature);
    }

    /// AWS's documented streaming (aws-chunked) PUT example: 65 KiB of 'a' in a 64 KiB and
    /// a 1 KiB chunk, seed signature from the request.
    #[test]
    fn aws_chunked_example() {
        let c = cred();
        let key = signing_key(SECRET, &c);
        let seed = "4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9";
        let signer = ChunkSigner {
            key,
            amz_date: "20130524T000000Z".into(),
            scope: c.scope(),
            prev: seed.into(),
        };
        let sigs = [
            "ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648",
            "0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497",
            "b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9",
        ];
        let mut body = Vec::new();
        for (len, sig) in [(65536usize, sigs[0]), (1024, sigs[1]), (0, sigs[2])] {
            body.extend_from_slice(format!("{len:x};chunk-signature={sig}\r\n").as_bytes());
            body.extend(std::iter::repeat_n(b'a', len));
            body.extend_from_slice(b"\r\n");
        }
        // Fed in awkward pieces: the decoder must reassemble headers across reads.
        let decode = |body: &[u8], signer: Option<ChunkSigner>| -> Result<Vec<u8>, String> {
            let mut d = ChunkDecoder::new(signer);
            let mut out = Vec::new();
            for piece in body.chunks(7) {
                d.push(piece);
                while let Some(b) = d.next_data()? {
                    out.extend_from_slice(&b);
                }
            }
            if !d.is_done() {
                return Err("not done".into());
            }
            Ok(out)
        };
        let out = decode(&body, Some(signer.clone())).unwrap();
        assert_eq!(out.len(), 66560);
        assert!(out.iter().all(|b| *b == b'a'));
        // A flipped data byte breaks the chunk signature.
        let mut bad = body.clone();
        let i = bad.len() / 2;
        bad[i] = b'b';
        assert!(
            decode(&bad, Some(signer.clone()))
                .unwrap_err()
                .contains("signature")
        );
        // Missing signatures are refused when signing is required.
        assert!(decode(b"1\r\na\r\n0\r\n\r\n", Some(signer)).is_err());
        // Unsigned with a trailer.
        let out = decode(
            b"5\r\nhello\r\n6\r\n world\r\n0\r\nx-amz-checksum-crc32:AAAAAA==\r\n\r\n",
            None,
        )
        .unwrap();
        assert_eq!(out, b"hello world");
        assert!(decode(b"zz\r\n", None).is_err());
        assert!(decode(b"5\r\nhello", None).is_err());
    }

    #[test]
    fn encoding_and_dates() {
        assert_eq!(uri_encode(b"a b/c~d", true), "a%20b/c~d");
        assert_eq!(uri_encode(b"a/b", false), "a%2Fb");
        assert_eq!(
            canonical_query(&parse_query("uploads&b=2&a=x+y")),
            "a=x%20y&b=2&uploads="
        );
        assert_eq!(parse_amz_date("20130524T000000Z"), Some(1_369_353_600));
        assert_eq!(parse_amz_date("2013-05-24"), None);
        assert!(parse_authorization("AWS4-HMAC-SHA256 Credential=x", "d").is_err());
        assert!(parse_authorization("Bearer t", "d").is_err());
    }
}
