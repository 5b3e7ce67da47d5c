//! JWT and JWKS parsing and signature verification (ring), after Envoy's `jwt_verify_lib`:
//! the same checks in the same order and the same status strings (they are the bodies of the
//! filter's 401/403 replies).
//!
//! Supported algorithms: RS256/RS384/RS512 and PS256/PS384/PS512 (RSA keys of 2048 to 8192
//! bits, ring's range), ES256 (P-256), ES384 (P-384), EdDSA (Ed25519). `none` and HMAC are
//! refused (`Jwt header [alg] is not supported`). JWKS keys: `kty` RSA (`n`, `e`), EC (`crv`,
//! `x`, `y`), OKP (`crv` Ed25519, `x`); other keys (`oct`, unknown curves) are skipped, and a
//! JWKS without any usable key is invalid.

use base64::Engine;
use base64::engine::general_purpose::GeneralPurpose;
use base64::engine::{DecodePaddingMode, GeneralPurposeConfig};
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde_json::Value;

/// Base64url, padding optional (Envoy's `WebSafeBase64Unescape`).
pub(crate) const B64URL: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why a JWT was not accepted (Envoy's `jwt_verify::Status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Status {
    /// No token in the request.
    #[error("Jwt is missing")]
    JwtMissed,
    /// `nbf` in the future (beyond the skew).
    #[error("Jwt not yet valid")]
    JwtNotYetValid,
    /// `exp` in the past (beyond the skew).
    #[error("Jwt is expired")]
    JwtExpired,
    /// Not three dot-separated sections.
    #[error("Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections")]
    JwtBadFormat,
    /// Header is not base64url.
    #[error("Jwt header is an invalid Base64url encoded")]
    JwtHeaderParseErrorBadBase64,
    /// Header is not a JSON object.
    #[error("Jwt header is an invalid JSON")]
    JwtHeaderParseErrorBadJson,
    /// No `alg` string.
    #[error("Jwt header [alg] field is required and must be a string")]
    JwtHeaderBadAlg,
    /// `alg` not supported (`none`, HMAC, unknown).
    #[error("Jwt header [alg] is not supported")]
    JwtHeaderNotImplementedAlg,
    /// `kid` not a string.
    #[error("Jwt header [kid] field is not a string")]
    JwtHeaderBadKid,
    /// Payload is not base64url.
    #[error("Jwt payload is an invalid Base64url encoded")]
    JwtPayloadParseErrorBadBase64,
    /// Payload is not a JSON object.
    #[error("Jwt payload is an invalid JSON")]
    JwtPayloadParseErrorBadJson,
    /// `iss` not a string.
    #[error("Jwt payload [iss] field is not a string")]
    JwtPayloadParseErrorIssNotString,
    /// `aud` neither a string nor a list of strings.
    #[error("Jwt payload [aud] field is not a string or string list")]
    JwtPayloadParseErrorAudNotString,
    /// `exp` not a non-negative integer.
    #[error("Jwt payload [exp] field is not an integer")]
    JwtPayloadParseErrorExpNotInteger,
    /// `nbf` not a non-negative integer.
    #[error("Jwt payload [nbf] field is not an integer")]
    JwtPayloadParseErrorNbfNotInteger,
    /// Signature is not base64url.
    #[error("Jwt signature is an invalid Base64url encoded")]
    JwtSignatureParseErrorBadBase64,
    /// A key matched by kid/alg, but no signature check passed.
    #[error("Jwt verification fails")]
    JwtVerificationFail,
    /// The issuer is not the provider's.
    #[error("Jwt issuer is not configured")]
    JwtUnknownIssuer,
    /// No allowed audience.
    #[error("Audiences in Jwt are not allowed")]
    JwtAudienceNotAllowed,
    /// No key with the token's kid and alg.
    #[error("Jwks doesn't have key to match kid or alg from Jwt")]
    JwksKidAlgMismatch,
    /// The remote JWKS could not be fetched.
    #[error("Jwks remote fetch is failed")]
    JwksFetchFail,
}

/// A JWKS that could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwksError {
    /// Not JSON, or no `keys` array.
    #[error("Jwks is an invalid JSON: {0}")]
    BadJson(String),
    /// No usable key.
    #[error("Jwks doesn't have any valid public key")]
    NoValidKeys,
}

/// Signature algorithms weir verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    /// RSASSA-PKCS1-v1_5 SHA-256.
    Rs256,
    /// RSASSA-PKCS1-v1_5 SHA-384.
    Rs384,
    /// RSASSA-PKCS1-v1_5 SHA-512.
    Rs512,
    /// RSASSA-PSS SHA-256.
    Ps256,
    /// RSASSA-PSS SHA-384.
    Ps384,
    /// RSASSA-PSS SHA-512.
    Ps512,
    /// ECDSA P-256 SHA-256.
    Es256,
    /// ECDSA P-384 SHA-384.
    Es384,
    /// Ed25519.
    EdDsa,
}

impl Alg {
    fn parse(s: &str) -> Option<Alg> {
        Some(match s {
            "RS256" => Alg::Rs256,
            "RS384" => Alg::Rs384,
            "RS512" => Alg::Rs512,
            "PS256" => Alg::Ps256,
            "PS384" => Alg::Ps384,
            "PS512" => Alg::Ps512,
            "ES256" => Alg::Es256,
            "ES384" => Alg::Es384,
            "EdDSA" => Alg::EdDsa,
            _ => return None,
        })
    }

    /// The JOSE name.
    pub fn name(self) -> &'static str {
        match self {
            Alg::Rs256 => "RS256",
            Alg::Rs384 => "RS384",
            Alg::Rs512 => "RS512",
            Alg::Ps256 => "PS256",
            Alg::Ps384 => "PS384",
            Alg::Ps512 => "PS512",
            Alg::Es256 => "ES256",
            Alg::Es384 => "ES384",
            Alg::EdDsa => "EdDSA",
        }
    }
}

/// A parsed (not yet verified) JWT.
#[derive(Debug, Clone)]
pub struct Jwt {
    /// `alg`.
    pub alg: Alg,
    /// `kid`, if any.
    pub kid: Option<String>,
    /// `iss` (empty when absent).
    pub iss: String,
    /// `aud` (a string becomes a one-element list).
    pub audiences: Vec<String>,
    /// `exp` (0 when absent).
    pub exp: u64,
    /// `nbf` (0 when absent).
    pub nbf: u64,
    /// The payload object.
    pub payload: serde_json::Map<String, Value>,
    /// The base64url payload section as sent (for `forward_payload_header`).
    pub payload_b64: String,
    /// `header.payload`, the signed bytes.
    signed: String,
    signature: Vec<u8>,
}

fn opt_u64(v: Option<&Value>, err: Status) -> Result<u64, Status> {
    match v {
        None => Ok(0),
        Some(Value::Number(n)) => n
            .as_u64()
            .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
            .ok_or(err),
        Some(_) => Err(err),
    }
}

impl Jwt {
    /// Parse a compact JWS (`header.payload.signature`).
    pub fn parse(token: &str) -> Result<Jwt, Status> {
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Status::JwtBadFormat);
        };
        let header = B64URL
            .decode(h)
            .map_err(|_| Status::JwtHeaderParseErrorBadBase64)?;
        let header: Value =
            serde_json::from_slice(&header).map_err(|_| Status::JwtHeaderParseErrorBadJson)?;
        let Value::Object(header) = header else {
            return Err(Status::JwtHeaderParseErrorBadJson);
        };
        let alg = match header.get("alg") {
            Some(Value::String(a)) => Alg::parse(a).ok_or(Status::JwtHeaderNotImplementedAlg)?,
            _ => return Err(Status::JwtHeaderBadAlg),
        };
        let kid = match header.get("kid") {
            None => None,
            Some(Value::String(k)) => Some(k.clone()),
            Some(_) => return Err(Status::JwtHeaderBadKid),
        };
        let payload = B64URL
            .decode(p)
            .map_err(|_| Status::JwtPayloadParseErrorBadBase64)?;
        let payload: Value =
            serde_json::from_slice(&payload).map_err(|_| Status::JwtPayloadParseErrorBadJson)?;
        let Value::Object(payload) = payload else {
            return Err(Status::JwtPayloadParseErrorBadJson);
        };
        let iss = match payload.get("iss") {
            None => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(Status::JwtPayloadParseErrorIssNotString),
        };
        let audiences = match payload.get("aud") {
            None => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or(Status::JwtPayloadParseErrorAudNotString)?,
            Some(_) => return Err(Status::JwtPayloadParseErrorAudNotString),
        };
        let exp = opt_u64(
            payload.get("exp"),
            Status::JwtPayloadParseErrorExpNotInteger,
        )?;
        let nbf = opt_u64(
            payload.get("nbf"),
            Status::JwtPayloadParseErrorNbfNotInteger,
        )?;
        let signature = B64URL
            .decode(s)
            .map_err(|_| Status::JwtSignatureParseErrorBadBase64)?;
        Ok(Jwt {
            alg,
            kid,
            iss,
            audiences,
            exp,
            nbf,
            payload,
            payload_b64: p.to_string(),
            signed: format!("{h}.{p}"),
            signature,
        })
    }

    /// Envoy's `verifyTimeConstraint`: `nbf` and `exp` with `skew` seconds of tolerance.
    pub fn check_time(&self, now: u64, skew: u64) -> Result<(), Status> {
        if now.saturating_add(skew) < self.nbf {
            return Err(Status::JwtNotYetValid);
        }
        if self.exp != 0 && now > self.exp.saturating_add(skew) {
            return Err(Status::JwtExpired);
        }
        Ok(())
    }

    /// Verify the signature with the first key of `jwks` whose `kid` and `alg` fit
    /// (jwt_verify_lib's `verifyJwt`).
    pub fn verify(&self, jwks: &Jwks) -> Result<(), Status> {
        let mut kid_alg_matched = false;
        for k in &jwks.keys {
            if let (Some(jk), Some(kk)) = (&self.kid, &k.kid)
                && jk != kk
            {
                continue;
            }
            if let Some(a) = &k.alg
                && a != self.alg.name()
            {
                continue;
            }
            kid_alg_matched = true;
            if k.key
                .verify(self.alg, self.signed.as_bytes(), &self.signature)
            {
                return Ok(());
            }
        }
        Err(if kid_alg_matched {
            Status::JwtVerificationFail
        } else {
            Status::JwksKidAlgMismatch
        })
    }
}

/// Public key material of a JWK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyMaterial {
    /// RSA modulus and exponent (big-endian).
    Rsa {
        /// `n`.
        n: Vec<u8>,
        /// `e`.
        e: Vec<u8>,
    },
    /// P-256, uncompressed point.
    P256(Vec<u8>),
    /// P-384, uncompressed point.
    P384(Vec<u8>),
    /// Ed25519 public key.
    Ed25519(Vec<u8>),
}

impl KeyMaterial {
    /// Whether `sig` over `msg` verifies with this key for `alg` (false for a key of another
    /// type than the algorithm's).
    fn verify(&self, alg: Alg, msg: &[u8], sig: &[u8]) -> bool {
        match (self, alg) {
            (KeyMaterial::Rsa { n, e }, _) => {
                let params = match alg {
                    Alg::Rs256 => &signature::RSA_PKCS1_2048_8192_SHA256,
                    Alg::Rs384 => &signature::RSA_PKCS1_2048_8192_SHA384,
                    Alg::Rs512 => &signature::RSA_PKCS1_2048_8192_SHA512,
                    Alg::Ps256 => &signature::RSA_PSS_2048_8192_SHA256,
                    Alg::Ps384 => &signature::RSA_PSS_2048_8192_SHA384,
                    Alg::Ps512 => &signature::RSA_PSS_2048_8192_SHA512,
                    _ => return false,
                };
                RsaPublicKeyComponents { n, e }
                    .verify(params, msg, sig)
                    .is_ok()
            }
            (KeyMaterial::P256(pt), Alg::Es256) => {
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, pt)
                    .verify(msg, sig)
                    .is_ok()
            }
            (KeyMaterial::P384(pt), Alg::Es384) => {
                UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, pt)
                    .verify(msg, sig)
                    .is_ok()
            }
            (KeyMaterial::Ed25519(k), Alg::EdDsa) => UnparsedPublicKey::new(&signature::ED25519, k)
                .verify(msg, sig)
                .is_ok(),
            _ => false,
        }
    }
}

/// One usable JWK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jwk {
    /// `kid`.
    pub kid: Option<String>,
    /// `alg`.
    pub alg: Option<String>,
    /// The key.
    pub key: KeyMaterial,
}

/// A parsed JWKS (its usable keys, in order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jwks {
    /// The keys.
    pub keys: Vec<Jwk>,
}

fn b64_field(k: &serde_json::Map<String, Value>, f: &str) -> Option<Vec<u8>> {
    k.get(f)
        .and_then(Value::as_str)
        .and_then(|s| B64URL.decode(s).ok())
        .filter(|v| !v.is_empty())
}

fn parse_jwk(k: &serde_json::Map<String, Value>) -> Option<Jwk> {
    let s = |f: &str| k.get(f).and_then(Value::as_str);
    let key = match s("kty")? {
        "RSA" => KeyMaterial::Rsa {
            n: b64_field(k, "n")?,
            e: b64_field(k, "e")?,
        },
        "EC" => {
            let (x, y) = (b64_field(k, "x")?, b64_field(k, "y")?);
            let len = match s("crv")? {
                "P-256" => 32,
                "P-384" => 48,
                _ => return None,
            };
            if x.len() != len || y.len() != len {
                return None;
            }
            let mut pt = Vec::with_capacity(1 + 2 * len);
            pt.push(4);
            pt.extend_from_slice(&x);
            pt.extend_from_slice(&y);
            if len == 32 {
                KeyMaterial::P256(pt)
            } else {
                KeyMaterial::P384(pt)
            }
        }
        "OKP" if s("crv")? == "Ed25519" => {
            let x = b64_field(k, "x")?;
            (x.len() == 32).then_some(())?;
            KeyMaterial::Ed25519(x)
        }
        _ => return None,
    };
    Some(Jwk {
        kid: s("kid").map(str::to_string),
        alg: s("alg").map(str::to_string),
        key,
    })
}

impl Jwks {
    /// Parse a JWKS JSON document (`{"keys": [...]}`); unusable keys are skipped.
    pub fn parse(text: &[u8]) -> Result<Jwks, JwksError> {
        let v: Value =
            serde_json::from_slice(text).map_err(|e| JwksError::BadJson(e.to_string()))?;
        let Some(keys) = v.get("keys").and_then(Value::as_array) else {
            return Err(JwksError::BadJson("[keys] is not an array".into()));
        };
        let keys: Vec<Jwk> = keys
            .iter()
            .filter_map(|k| k.as_object().and_then(parse_jwk))
            .collect();
        if keys.is_empty() {
            return Err(JwksError::NoValidKeys);
        }
        Ok(Jwks { keys })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair};

    type Signer = Box<dyn Fn(&[u8]) -> Vec<u8> + Send + Sync>;

    /// A signing key for tests, with its JWK.
    pub(crate) struct TestKey {
        pub(crate) alg: &'static str,
        pub(crate) kid: &'static str,
        sign: Signer,
        pub(crate) jwk: Value,
    }

    impl TestKey {
        pub(crate) fn es256(kid: &'static str) -> TestKey {
            let rng = SystemRandom::new();
            let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("gen");
            let kp = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).expect("kp");
            let pt = kp.public_key().as_ref().to_vec();
            let jwk = serde_json::json!({
                "kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256",
                "x": B64URL.encode(&pt[1..33]), "y": B64URL.encode(&pt[33..]),
            });
            TestKey {
                alg: "ES256",
                kid,
                sign: Box::new(move |m| {
                    kp.sign(&SystemRandom::new(), m)
                        .expect("sign")
                        .as_ref()
                        .to_vec()
                }),
                jwk,
            }
        }

        pub(crate) fn es384(kid: &'static str) -> TestKey {
            let rng = SystemRandom::new();
            let alg = &signature::ECDSA_P384_SHA384_FIXED_SIGNING;
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("gen");
            let kp = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).expect("kp");
            let pt = kp.public_key().as_ref().to_vec();
            let jwk = serde_json::json!({
                "kty": "EC", "crv": "P-384", "kid": kid,
                "x": B64URL.encode(&pt[1..49]), "y": B64URL.encode(&pt[49..]),
            });
            TestKey {
                alg: "ES384",
                kid,
                sign: Box::new(move |m| {
                    kp.sign(&SystemRandom::new(), m)
                        .expect("sign")
                        .as_ref()
                        .to_vec()
                }),
                jwk,
            }
        }

        pub(crate) fn ed25519(kid: &'static str) -> TestKey {
            let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).expect("gen");
            let kp = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("kp");
            let jwk = serde_json::json!({
                "kty": "OKP", "crv": "Ed25519", "kid": kid,
                "x": B64URL.encode(kp.public_key().as_ref()),
            });
            TestKey {
                alg: "EdDSA",
                kid,
                sign: Box::new(move |m| kp.sign(m).as_ref().to_vec()),
                jwk,
            }
        }

        pub(crate) fn rsa(kid: &'static str, alg: &'static str) -> TestKey {
            let der = B64_STD.decode(RSA_PKCS8.replace('\n', "")).expect("der");
            let kp = signature::RsaKeyPair::from_pkcs8(&der).expect("rsa");
            let pk = kp.public().clone();
            let comps: RsaPublicKeyComponents<Vec<u8>> = (&pk).into();
            let jwk = serde_json::json!({
                "kty": "RSA", "kid": kid, "alg": alg,
                "n": B64URL.encode(&comps.n), "e": B64URL.encode(&comps.e),
            });
            let enc: &'static dyn signature::RsaEncoding = match alg {
                "RS256" => &signature::RSA_PKCS1_SHA256,
                "RS384" => &signature::RSA_PKCS1_SHA384,
                "RS512" => &signature::RSA_PKCS1_SHA512,
                "PS256" => &signature::RSA_PSS_SHA256,
                _ => panic!("alg {alg}"),
            };
            TestKey {
                alg,
                kid,
                sign: Box::new(move |m| {
                    let mut sig = vec![0; kp.public().modulus_len()];
                    kp.sign(enc, &SystemRandom::new(), m, &mut sig)
                        .expect("sign");
                    sig
                }),
                jwk,
            }
        }

        /// A JWT with this key's alg and kid over `claims`.
        pub(crate) fn token(&self, claims: &Value) -> String {
            self.token_with_header(
                &serde_json::json!({"alg": self.alg, "kid": self.kid, "typ": "JWT"}),
                claims,
            )
        }

        pub(crate) fn token_with_header(&self, header: &Value, claims: &Value) -> String {
            let h = B64URL.encode(header.to_string());
            let p = B64URL.encode(claims.to_string());
            let sig = (self.sign)(format!("{h}.{p}").as_bytes());
            format!("{h}.{p}.{}", B64URL.encode(sig))
        }
    }

    /// A JWKS document of these keys.
    pub(crate) fn jwks(keys: &[&TestKey]) -> String {
        serde_json::json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()})
            .to_string()
    }

    const B64_STD: GeneralPurpose = base64::engine::general_purpose::STANDARD;

    /// A 2048-bit RSA test key (PKCS#8, base64): ring cannot generate RSA keys.
    const RSA_PKCS8: &str = include_str!("testdata/rsa2048.pk8.b64");

    #[test]
    fn every_algorithm_verifies_and_rejects_tampering() {
        let keys = [
            TestKey::es256("a"),
            TestKey::es384("b"),
            TestKey::ed25519("c"),
            TestKey::rsa("d", "RS256"),
            TestKey::rsa("e", "RS384"),
            TestKey::rsa("f", "RS512"),
            TestKey::rsa("g", "PS256"),
        ];
        let set = Jwks::parse(jwks(&keys.iter().collect::<Vec<_>>()).as_bytes()).expect("jwks");
        assert_eq!(set.keys.len(), keys.len());
        for k in &keys {
            let t = k.token(&serde_json::json!({"iss": "i", "sub": "s"}));
            let jwt = Jwt::parse(&t).expect("parse");
            assert_eq!(jwt.alg.name(), k.alg);
            assert_eq!(jwt.verify(&set), Ok(()), "{}", k.alg);
            // Another payload under the same signature fails.
            let mut parts: Vec<&str> = t.split('.').collect();
            let other = B64URL.encode(r#"{"iss":"evil"}"#);
            parts[1] = &other;
            let jwt = Jwt::parse(&parts.join(".")).expect("parse");
            assert_eq!(
                jwt.verify(&set),
                Err(Status::JwtVerificationFail),
                "{}",
                k.alg
            );
        }
    }

    #[test]
    fn kid_and_alg_select_keys() {
        let a = TestKey::es256("a");
        let b = TestKey::es256("b");
        // Only b's key, under kid "a": a kid mismatch.
        let only_b = Jwks::parse(jwks(&[&b]).as_bytes()).expect("jwks");
        let t = a.token(&serde_json::json!({}));
        assert_eq!(
            Jwt::parse(&t).expect("p").verify(&only_b),
            Err(Status::JwksKidAlgMismatch)
        );
        // A token without kid tries every key.
        let t = a.token_with_header(&serde_json::json!({"alg": "ES256"}), &serde_json::json!({}));
        let both = Jwks::parse(jwks(&[&b, &a]).as_bytes()).expect("jwks");
        assert_eq!(Jwt::parse(&t).expect("p").verify(&both), Ok(()));
        assert_eq!(
            Jwt::parse(&t).expect("p").verify(&only_b),
            Err(Status::JwtVerificationFail)
        );
        // alg/key mismatch: an RS256 header over an EC key set (key has alg ES256) fails.
        let t = a.token_with_header(
            &serde_json::json!({"alg": "RS256", "kid": "a"}),
            &serde_json::json!({}),
        );
        assert_eq!(
            Jwt::parse(&t).expect("p").verify(&both),
            Err(Status::JwksKidAlgMismatch)
        );
        // A key without alg but of another type: matched by kid, fails verification.
        let ed = TestKey::ed25519("a");
        let set = Jwks::parse(jwks(&[&ed]).as_bytes()).expect("jwks");
        let t = a.token(&serde_json::json!({}));
        assert_eq!(
            Jwt::parse(&t).expect("p").verify(&set),
            Err(Status::JwtVerificationFail)
        );
    }

    #[test]
    fn malformed_tokens() {
        let enc = |v: &str| B64URL.encode(v);
        let cases: Vec<(String, Status)> = vec![
            ("abc".into(), Status::JwtBadFormat),
            ("a.b".into(), Status::JwtBadFormat),
            ("a.b.c.d".into(), Status::JwtBadFormat),
            ("!!.e30.e30".into(), Status::JwtHeaderParseErrorBadBase64),
            (
                format!("{}.e30.", enc("not json")),
                Status::JwtHeaderParseErrorBadJson,
            ),
            (
                format!("{}.e30.", enc("[1]")),
                Status::JwtHeaderParseErrorBadJson,
            ),
            (format!("{}.e30.", enc("{}")), Status::JwtHeaderBadAlg),
            (
                format!("{}.e30.", enc(r#"{"alg":5}"#)),
                Status::JwtHeaderBadAlg,
            ),
            (
                format!("{}.e30.", enc(r#"{"alg":"none"}"#)),
                Status::JwtHeaderNotImplementedAlg,
            ),
            (
                format!("{}.e30.", enc(r#"{"alg":"HS256"}"#)),
                Status::JwtHeaderNotImplementedAlg,
            ),
            (
                format!("{}.e30.", enc(r#"{"alg":"RS256","kid":1}"#)),
                Status::JwtHeaderBadKid,
            ),
            (
                format!("{}.!!.", enc(r#"{"alg":"RS256"}"#)),
                Status::JwtPayloadParseErrorBadBase64,
            ),
            (
                format!("{}.{}.", enc(r#"{"alg":"RS256"}"#), enc("x")),
                Status::JwtPayloadParseErrorBadJson,
            ),
            (
                format!("{}.{}.", enc(r#"{"alg":"RS256"}"#), enc(r#"{"iss":1}"#)),
                Status::JwtPayloadParseErrorIssNotString,
            ),
            (
                format!("{}.{}.", enc(r#"{"alg":"RS256"}"#), enc(r#"{"aud":[1]}"#)),
                Status::JwtPayloadParseErrorAudNotString,
            ),
            (
                format!("{}.{}.", enc(r#"{"alg":"RS256"}"#), enc(r#"{"exp":"x"}"#)),
                Status::JwtPayloadParseErrorExpNotInteger,
            ),
            (
                format!("{}.{}.", enc(r#"{"alg":"RS256"}"#), enc(r#"{"nbf":-1}"#)),
                Status::JwtPayloadParseErrorNbfNotInteger,
            ),
            (
                format!("{}.{}.!!", enc(r#"{"alg":"RS256"}"#), enc("{}")),
                Status::JwtSignatureParseErrorBadBase64,
            ),
        ];
        for (t, want) in cases {
            assert_eq!(Jwt::parse(&t).err(), Some(want), "{t}");
        }
        // alg none with an empty signature is refused at parse time: never verified.
        let t = format!("{}.{}.", enc(r#"{"alg":"none"}"#), enc(r#"{"iss":"i"}"#));
        assert_eq!(
            Jwt::parse(&t).err(),
            Some(Status::JwtHeaderNotImplementedAlg)
        );
        // Padded sections are accepted.
        let t = format!(
            "{}.{}.",
            base64::engine::general_purpose::URL_SAFE.encode(r#"{"alg":"ES256"}"#),
            base64::engine::general_purpose::URL_SAFE.encode(r#"{"aud":"x"}"#)
        );
        let j = Jwt::parse(&t).expect("padded");
        assert_eq!(j.audiences, vec!["x".to_string()]);
    }

    #[test]
    fn time_constraints_with_skew() {
        let k = TestKey::es256("a");
        let t = Jwt::parse(&k.token(&serde_json::json!({"exp": 1000, "nbf": 500}))).expect("p");
        assert_eq!(t.check_time(700, 60), Ok(()));
        assert_eq!(t.check_time(1060, 60), Ok(()));
        assert_eq!(t.check_time(1061, 60), Err(Status::JwtExpired));
        assert_eq!(t.check_time(440, 60), Ok(()));
        assert_eq!(t.check_time(439, 60), Err(Status::JwtNotYetValid));
        let none = Jwt::parse(&k.token(&serde_json::json!({}))).expect("p");
        assert_eq!(none.check_time(u64::MAX, 60), Ok(()));
        assert_eq!(Status::JwtExpired.to_string(), "Jwt is expired");
    }

    #[test]
    fn jwks_parsing() {
        assert!(matches!(Jwks::parse(b"nope"), Err(JwksError::BadJson(_))));
        assert!(matches!(Jwks::parse(b"{}"), Err(JwksError::BadJson(_))));
        assert_eq!(Jwks::parse(br#"{"keys":[]}"#), Err(JwksError::NoValidKeys));
        // oct keys, unknown curves, bad lengths and missing fields are skipped.
        let doc = serde_json::json!({"keys": [
            {"kty": "oct", "k": "AAAA"},
            {"kty": "EC", "crv": "P-521", "x": "AAAA", "y": "AAAA"},
            {"kty": "EC", "crv": "P-256", "x": "AAAA", "y": "AAAA"},
            {"kty": "RSA", "n": "AQAB"},
            {"kty": "OKP", "crv": "X25519", "x": B64URL.encode([0u8; 32])},
            {"kty": "OKP", "crv": "Ed25519", "x": B64URL.encode([0u8; 32]), "kid": "ok"},
        ]});
        let j = Jwks::parse(doc.to_string().as_bytes()).expect("one usable key");
        assert_eq!(j.keys.len(), 1);
        assert_eq!(j.keys[0].kid.as_deref(), Some("ok"));
    }
}
