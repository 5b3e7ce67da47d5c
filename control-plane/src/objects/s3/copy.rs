//! CopyObject and UploadPartCopy: `PUT` with `x-amz-copy-source`. The source is read from the
//! backend as a stream and written as a new object (or part) through the same put path, so
//! nothing is buffered whole and the new object gets its own MD5 ETag, as S3 gives a copy
//! of a single-part object.
//!
//! Supported: `x-amz-copy-source` (`bucket/key`, URL-encoded, optional leading `/`,
//! `?versionId=null` only: weir-cp does not version), `x-amz-metadata-directive`
//! (`COPY`, the default, keeps the source's content type and metadata; `REPLACE` takes the
//! request's), `x-amz-copy-source-if-match` / `-if-none-match` (412 when they do not hold),
//! and for UploadPartCopy `x-amz-copy-source-range: bytes=a-b`. Copying an object onto
//! itself without `REPLACE` is refused with `InvalidRequest`, as S3 does.

use http::{HeaderMap, Response, StatusCode};

use super::{Body, S3Error, header, put_options, xml, xml_escape};
use crate::objects::s3::sigv4;
use crate::objects::{ByteRange, ObjectBackend, ObjectInfo, PutOptions, iso8601};

/// The parsed `x-amz-copy-source`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct CopySource {
    pub bucket: String,
    pub key: String,
}

fn invalid(code: &'static str, message: impl Into<String>) -> S3Error {
    S3Error::new(StatusCode::BAD_REQUEST, code, message)
}

/// Parse `x-amz-copy-source`: `[/]bucket/key[?versionId=null]`, percent-encoded.
pub(super) fn parse_source(v: &str) -> Result<CopySource, S3Error> {
    let (path, query) = v.split_once('?').unwrap_or((v, ""));
    for (k, val) in sigv4::parse_query(query) {
        if k == "versionId" && val != "null" {
            return Err(invalid(
                "InvalidArgument",
                "weir-cp does not version objects; only versionId=null can be copied",
            ));
        }
    }
    let decoded = String::from_utf8(sigv4::percent_decode(path.trim_start_matches('/')))
        .map_err(|_| invalid("InvalidArgument", "x-amz-copy-source is not UTF-8"))?;
    match decoded.split_once('/') {
        Some((b, k)) if !b.is_empty() && !k.is_empty() => Ok(CopySource {
            bucket: b.to_string(),
            key: k.to_string(),
        }),
        _ => Err(invalid(
            "InvalidArgument",
            "x-amz-copy-source must be bucket/key",
        )),
    }
}

/// `x-amz-copy-source-if-match` / `-if-none-match` against the source (412 when either fails).
fn source_preconditions(h: &HeaderMap, info: &ObjectInfo) -> Result<(), S3Error> {
    let matches = |v: &str| {
        v.split(',')
            .map(|t| t.trim().trim_matches('"'))
            .any(|t| t == "*" || t == info.etag)
    };
    let failed = header(h, "x-amz-copy-source-if-match").is_some_and(|v| !matches(v))
        || header(h, "x-amz-copy-source-if-none-match").is_some_and(matches);
    if failed {
        return Err(S3Error::new(
            StatusCode::PRECONDITION_FAILED,
            "PreconditionFailed",
            "At least one of the pre-conditions you specified did not hold",
        ));
    }
    Ok(())
}

fn result(tag: &str, info_etag: &str, modified_ms: u64) -> Response<Body> {
    xml(
        StatusCode::OK,
        format!(
            "<{tag} xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><LastModified>{}</LastModified><ETag>&quot;{}&quot;</ETag></{tag}>",
            iso8601(modified_ms),
            xml_escape(info_etag)
        ),
    )
}

/// CopyObject: `source` into `bucket/key`.
pub(super) async fn copy_object(
    b: &dyn ObjectBackend,
    h: &HeaderMap,
    source: CopySource,
    bucket: &str,
    key: &str,
) -> Result<Response<Body>, S3Error> {
    let replace = match header(h, "x-amz-metadata-directive") {
        None | Some("COPY") => false,
        Some("REPLACE") => true,
        Some(d) => {
            return Err(invalid(
                "InvalidArgument",
                format!("unknown x-amz-metadata-directive {d:?}"),
            ));
        }
    };
    if !replace && source.bucket == bucket && source.key == key {
        return Err(invalid(
            "InvalidRequest",
            "This copy request is illegal because it is trying to copy an object to itself without changing the object's metadata",
        ));
    }
    let (info, _, stream) = b.get_object(&source.bucket, &source.key, None).await?;
    source_preconditions(h, &info)?;
    let opts = if replace {
        PutOptions {
            content_md5: None,
            ..put_options(h)?
        }
    } else {
        PutOptions {
            content_type: Some(info.content_type.clone()),
            metadata: info.metadata.clone(),
            content_md5: None,
        }
    };
    let new = b.put_object(bucket, key, opts, stream).await?;
    tracing::debug!(
        from = %format!("{}/{}", source.bucket, source.key),
        to = %format!("{bucket}/{key}"),
        bytes = new.size,
        "S3 CopyObject"
    );
    Ok(result("CopyObjectResult", &new.etag, new.modified_ms))
}

/// UploadPartCopy: `source` (or `x-amz-copy-source-range` of it) as part `number`.
pub(super) async fn upload_part_copy(
    b: &dyn ObjectBackend,
    h: &HeaderMap,
    source: CopySource,
    (bucket, key, upload_id, number): (&str, &str, &str, u32),
) -> Result<Response<Body>, S3Error> {
    let range = match header(h, "x-amz-copy-source-range") {
        Some(v) => match ByteRange::parse(v)? {
            Some(r @ ByteRange::From(_, Some(_))) => Some(r),
            _ => {
                return Err(invalid(
                    "InvalidArgument",
                    "x-amz-copy-source-range must be bytes=first-last",
                ));
            }
        },
        None => None,
    };
    let (info, _, stream) = b.get_object(&source.bucket, &source.key, range).await?;
    source_preconditions(h, &info)?;
    let part = b
        .upload_part(bucket, key, upload_id, number, None, stream)
        .await?;
    Ok(result("CopyPartResult", &part.etag, part.modified_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_sources() {
        let ok = |v: &str| parse_source(v).map(|s| (s.bucket, s.key)).ok();
        assert_eq!(ok("b/k"), Some(("b".into(), "k".into())));
        assert_eq!(
            ok("/b/dir/a%20b.txt"),
            Some(("b".into(), "dir/a b.txt".into()))
        );
        assert_eq!(ok("b/k?versionId=null"), Some(("b".into(), "k".into())));
        assert_eq!(ok("b/k?versionId=3"), None);
        assert_eq!(ok("b"), None);
        assert_eq!(ok("b/"), None);
        assert_eq!(ok("/k"), None);
        assert_eq!(ok("b/%FF"), None);
    }

    #[test]
    fn source_conditions() {
        let info = ObjectInfo {
            key: "k".into(),
            size: 1,
            etag: "abc".into(),
            content_type: String::new(),
            metadata: Default::default(),
            modified_ms: 0,
        };
        let h = |n: &str, v: &str| {
            let mut m = HeaderMap::new();
            m.insert(
                http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
            m
        };
        assert!(source_preconditions(&HeaderMap::new(), &info).is_ok());
        assert!(source_preconditions(&h("x-amz-copy-source-if-match", "\"abc\""), &info).is_ok());
        assert!(source_preconditions(&h("x-amz-copy-source-if-match", "\"x\""), &info).is_err());
        assert!(source_preconditions(&h("x-amz-copy-source-if-none-match", "abc"), &info).is_err());
        assert!(source_preconditions(&h("x-amz-copy-source-if-none-match", "x"), &info).is_ok());
    }
}
