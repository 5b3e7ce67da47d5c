//! ListObjectsV2 and ListObjects (v1): one backend listing, two XML shapes.
//!
//! V1 pages with `marker` / `NextMarker` (the last key or common prefix returned) where V2
//! uses an opaque continuation token. A v1 marker that is one of the common prefixes of the
//! listing (what `NextMarker` names when a page ended on one) resumes after every key under
//! that prefix, so a rolled-up prefix is never returned twice.

use http::{Response, StatusCode};

use super::{Body, S3Error, q, xml, xml_escape};
use crate::objects::s3::sigv4;
use crate::objects::{ListRequest, ListResult, MAX_LIST_KEYS, ObjectBackend, iso8601};

/// Which listing API a request used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Version {
    V1,
    V2,
}

/// Sorts after every key under a common prefix (keys are UTF-8; the backends resume the same
/// way for their own continuation tokens).
const PAST_PREFIX: char = '\u{10FFFF}';

/// The backend request for a v1 `marker`: strictly after it, and past the whole prefix when
/// the marker is a common prefix of this listing (`prefix` + text + `delimiter`).
pub(super) fn v1_start_after(prefix: &str, delimiter: Option<&str>, marker: &str) -> String {
    if let Some(d) = delimiter.filter(|d| !d.is_empty())
        && let Some(rest) = marker.strip_prefix(prefix)
        && let Some(i) = rest.find(d)
        && i + d.len() == rest.len()
    {
        return format!("{marker}{PAST_PREFIX}");
    }
    marker.to_string()
}

/// v1's `NextMarker`: the last key or common prefix of a truncated page, whichever sorts last.
pub(super) fn next_marker(res: &ListResult) -> Option<String> {
    if !res.truncated {
        return None;
    }
    let key = res.objects.last().map(|o| o.key.as_str());
    let cp = res.common_prefixes.last().map(String::as_str);
    key.max(cp).map(str::to_string)
}

/// Render a ListObjects (v1) or ListObjectsV2 response.
pub(super) async fn list(
    b: &dyn ObjectBackend,
    bucket: &str,
    query: &[(String, String)],
    version: Version,
) -> Result<Response<Body>, S3Error> {
    let max_keys = match q(query, "max-keys") {
        Some(v) => v.parse::<usize>().map_err(|_| {
            S3Error::new(
                StatusCode::BAD_REQUEST,
                "InvalidArgument",
                "max-keys is not a number",
            )
        })?,
        None => MAX_LIST_KEYS,
    };
    let url = q(query, "encoding-type") == Some("url");
    let enc = |s: &str| {
        if url {
            sigv4::uri_encode(s.as_bytes(), true)
        } else {
            xml_escape(s)
        }
    };
    let prefix = q(query, "prefix").unwrap_or_default().to_string();
    let delimiter = q(query, "delimiter").map(str::to_string);
    let marker = q(query, "marker").unwrap_or_default();
    let req = match version {
        Version::V2 => ListRequest {
            prefix,
            delimiter,
            max_keys,
            start_after: q(query, "start-after").map(str::to_string),
            continuation_token: q(query, "continuation-token").map(str::to_string),
        },
        Version::V1 => ListRequest {
            start_after: (!marker.is_empty())
                .then(|| v1_start_after(&prefix, delimiter.as_deref(), marker)),
            prefix,
            delimiter,
            max_keys,
            continuation_token: None,
        },
    };
    let res = b.list_objects(bucket, req.clone()).await?;
    let mut doc = format!(
        "<ListBucketResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Name>{}</Name><Prefix>{}</Prefix>",
        xml_escape(bucket),
        enc(&req.prefix),
    );
    match version {
        Version::V2 => doc.push_str(&format!(
            "<MaxKeys>{max_keys}</MaxKeys><KeyCount>{}</KeyCount>",
            res.objects.len() + res.common_prefixes.len()
        )),
        Version::V1 => doc.push_str(&format!(
            "<Marker>{}</Marker><MaxKeys>{max_keys}</MaxKeys>",
            enc(marker)
        )),
    }
    doc.push_str(&format!("<IsTruncated>{}</IsTruncated>", res.truncated));
    if let Some(d) = &req.delimiter {
        doc.push_str(&format!("<Delimiter>{}</Delimiter>", enc(d)));
    }
    if url {
        doc.push_str("<EncodingType>url</EncodingType>");
    }
    match version {
        Version::V2 => {
            if let Some(t) = &req.continuation_token {
                doc.push_str(&format!(
                    "<ContinuationToken>{}</ContinuationToken>",
                    xml_escape(t)
                ));
            }
            if let Some(t) = &res.next_token {
                doc.push_str(&format!(
                    "<NextContinuationToken>{}</NextContinuationToken>",
                    xml_escape(t)
                ));
            }
            if let Some(s) = &req.start_after {
                doc.push_str(&format!("<StartAfter>{}</StartAfter>", enc(s)));
            }
        }
        Version::V1 => {
            if let Some(m) = next_marker(&res) {
                doc.push_str(&format!("<NextMarker>{}</NextMarker>", enc(&m)));
            }
        }
    }
    let owner = match version {
        Version::V1 => "<Owner><ID>weir-cp</ID><DisplayName>weir-cp</DisplayName></Owner>",
        Version::V2 => "",
    };
    for o in &res.objects {
        doc.push_str(&format!(
            "<Contents><Key>{}</Key><LastModified>{}</LastModified><ETag>&quot;{}&quot;</ETag><Size>{}</Size>{owner}<StorageClass>STANDARD</StorageClass></Contents>",
            enc(&o.key),
            iso8601(o.modified_ms),
            o.etag,
            o.size
        ));
    }
    for cp in &res.common_prefixes {
        doc.push_str(&format!(
            "<CommonPrefixes><Prefix>{}</Prefix></CommonPrefixes>",
            enc(cp)
        ));
    }
    doc.push_str("</ListBucketResult>");
    Ok(xml(StatusCode::OK, doc))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::ObjectInfo;

    #[test]
    fn v1_markers_skip_a_returned_common_prefix() {
        assert_eq!(v1_start_after("", Some("/"), "a/"), "a/\u{10FFFF}");
        assert_eq!(v1_start_after("p/", Some("/"), "p/d/"), "p/d/\u{10FFFF}");
        // A key, not a prefix of this listing: strictly after it.
        assert_eq!(v1_start_after("", Some("/"), "a/b"), "a/b");
        assert_eq!(v1_start_after("", None, "a/"), "a/");
        assert_eq!(v1_start_after("", Some(""), "a/"), "a/");
        assert_eq!(v1_start_after("x/", Some("/"), "a/"), "a/");
        // Two delimiters after the prefix: not one of this listing's common prefixes.
        assert_eq!(v1_start_after("", Some("/"), "a/b/"), "a/b/");
        // Multi-character delimiters.
        assert_eq!(v1_start_after("", Some("--"), "a--"), "a--\u{10FFFF}");
    }

    #[test]
    fn next_marker_is_the_last_item_returned() {
        let obj = |k: &str| ObjectInfo {
            key: k.into(),
            size: 0,
            etag: String::new(),
            content_type: String::new(),
            metadata: Default::default(),
            modified_ms: 0,
        };
        let mut r = ListResult {
            objects: vec![obj("a"), obj("c")],
            common_prefixes: vec!["b/".into()],
            truncated: true,
            next_token: None,
        };
        assert_eq!(next_marker(&r).as_deref(), Some("c"));
        r.common_prefixes.push("d/".into());
        assert_eq!(next_marker(&r).as_deref(), Some("d/"));
        r.truncated = false;
        assert_eq!(next_marker(&r), None);
    }
}
