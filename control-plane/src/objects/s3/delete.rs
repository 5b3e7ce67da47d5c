//! DeleteObjects (`POST /bucket?delete`): up to 1000 keys in one XML request, each deleted
//! alone; the answer lists what was deleted (unless `<Quiet>true</Quiet>`) and every key
//! that failed with its S3 error code. A missing key counts as deleted, as with DeleteObject.
//! A `Content-MD5` header, when sent, must match the body.

use http::{HeaderMap, Response, StatusCode};
use md5::{Digest as _, Md5};

use super::{Body, S3Error, content_md5, xml, xml_escape, xml_tag as tag, xml_unescape};
use crate::objects::ObjectBackend;

/// Most keys in one request (S3's limit).
pub(super) const MAX_KEYS: usize = 1000;

/// A parsed `<Delete>` document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct DeleteRequest {
    pub quiet: bool,
    pub keys: Vec<String>,
}

fn malformed(m: impl Into<String>) -> S3Error {
    S3Error::new(StatusCode::BAD_REQUEST, "MalformedXML", m)
}

/// Parse a DeleteObjects body.
pub(super) fn parse_delete_xml(xml: &str) -> Result<DeleteRequest, S3Error> {
    let quiet = tag(xml, "Quiet").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    let mut keys = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find("<Object>") {
        let body = &rest[i + "<Object>".len()..];
        let end = body
            .find("</Object>")
            .ok_or_else(|| malformed("unterminated <Object>"))?;
        let obj = &body[..end];
        if let Some(v) = tag(obj, "VersionId")
            && v.trim() != "null"
        {
            return Err(S3Error::new(
                StatusCode::BAD_REQUEST,
                "InvalidArgument",
                "weir-cp does not version objects",
            ));
        }
        let key = tag(obj, "Key").ok_or_else(|| malformed("an <Object> without a <Key>"))?;
        keys.push(xml_unescape(key));
        if keys.len() > MAX_KEYS {
            return Err(malformed(format!("more than {MAX_KEYS} keys")));
        }
        rest = &body[end + "</Object>".len()..];
    }
    if keys.is_empty() {
        return Err(malformed("no <Object> to delete"));
    }
    Ok(DeleteRequest { quiet, keys })
}

/// Run a DeleteObjects request whose body is `body`.
pub(super) async fn delete_objects(
    b: &dyn ObjectBackend,
    h: &HeaderMap,
    bucket: &str,
    body: &[u8],
) -> Result<Response<Body>, S3Error> {
    if let Some(want) = content_md5(h)?
        && Md5::digest(body).as_slice() != want
    {
        return Err(S3Error::new(
            StatusCode::BAD_REQUEST,
            "BadDigest",
            "the Content-MD5 you specified did not match what was received",
        ));
    }
    let text = std::str::from_utf8(body).map_err(|_| malformed("the body is not UTF-8"))?;
    let req = parse_delete_xml(text)?;
    // A missing bucket is an error for the whole request, as S3 answers it.
    b.head_bucket(bucket).await?;
    let mut doc = String::from("<DeleteResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">");
    let (mut deleted, mut failed) = (0usize, 0usize);
    for key in &req.keys {
        match b.delete_object(bucket, key).await {
            Ok(_) => {
                deleted += 1;
                if !req.quiet {
                    doc.push_str(&format!(
                        "<Deleted><Key>{}</Key></Deleted>",
                        xml_escape(key)
                    ));
                }
            }
            Err(e) => {
                failed += 1;
                let e = S3Error::from(e);
                doc.push_str(&format!(
                    "<Error><Key>{}</Key><Code>{}</Code><Message>{}</Message></Error>",
                    xml_escape(key),
                    e.code,
                    xml_escape(&e.message)
                ));
            }
        }
    }
    doc.push_str("</DeleteResult>");
    tracing::debug!(bucket, deleted, failed, "S3 DeleteObjects");
    Ok(xml(StatusCode::OK, doc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delete_documents() {
        let r = parse_delete_xml(
            r#"<Delete xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Quiet>true</Quiet>
              <Object><Key>a&amp;b</Key></Object><Object><Key>dir/c</Key><VersionId>null</VersionId></Object></Delete>"#,
        )
        .unwrap();
        assert_eq!(
            r,
            DeleteRequest {
                quiet: true,
                keys: vec!["a&b".into(), "dir/c".into()]
            }
        );
        let r = parse_delete_xml("<Delete><Object><Key>k</Key></Object></Delete>").unwrap();
        assert!(!r.quiet);
        let code = |x: &str| parse_delete_xml(x).err().map(|e| e.code);
        assert_eq!(code("<Delete></Delete>"), Some("MalformedXML"));
        assert_eq!(code("<Delete><Object><Key>k</Key>"), Some("MalformedXML"));
        assert_eq!(
            code("<Delete><Object></Object></Delete>"),
            Some("MalformedXML")
        );
        assert_eq!(
            code("<Delete><Object><Key>k</Key><VersionId>7</VersionId></Object></Delete>"),
            Some("InvalidArgument")
        );
        let many = format!(
            "<Delete>{}</Delete>",
            "<Object><Key>k</Key></Object>".repeat(MAX_KEYS + 1)
        );
        assert_eq!(code(&many), Some("MalformedXML"));
        let max = format!(
            "<Delete>{}</Delete>",
            "<Object><Key>k</Key></Object>".repeat(MAX_KEYS)
        );
        assert_eq!(parse_delete_xml(&max).unwrap().keys.len(), MAX_KEYS);
    }
}
