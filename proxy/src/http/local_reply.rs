//! Local replies: responses weir generates itself (no route, upstream failure, timeout,
//! malformed request). For gRPC requests they are gRPC errors: HTTP 200 with `grpc-status`
//! and `grpc-message` in a trailers-only response, as Envoy sends them.

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use weir_filters::LocalReply;

use crate::upstream::{BoxError, UpstreamBody};

/// Envoy's HTTP -> gRPC status mapping for local replies.
pub fn grpc_status_for(status: StatusCode) -> u32 {
    match status.as_u16() {
        400 => 13,             // INTERNAL
        401 => 16,             // UNAUTHENTICATED
        403 => 7,              // PERMISSION_DENIED
        404 => 12,             // UNIMPLEMENTED
        429 | 502..=504 => 14, // UNAVAILABLE
        _ => 2,                // UNKNOWN
    }
}

/// Percent-encode a grpc-message (gRPC's spec: encode outside 0x20..=0x7e and `%`).
fn grpc_message(s: &[u8]) -> HeaderValue {
    let mut out = String::with_capacity(s.len());
    for &b in s {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    HeaderValue::from_str(&out).unwrap_or_else(|_| HeaderValue::from_static("error"))
}

/// A full body from bytes.
pub fn full(b: impl Into<Bytes>) -> UpstreamBody {
    Full::new(b.into())
        .map_err(|never| -> BoxError { match never {} })
        .boxed_unsync()
}

/// Render a local reply. `close` adds `connection: close` (HTTP/1 only; ignored by h2).
pub fn render(reply: LocalReply, is_grpc: bool, close: bool) -> Response<UpstreamBody> {
    let mut resp = if is_grpc || reply.grpc_status.is_some() {
        let mut r = Response::new(full(Bytes::new()));
        let h = r.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        h.insert(
            "grpc-status",
            HeaderValue::from(
                reply
                    .grpc_status
                    .unwrap_or_else(|| grpc_status_for(reply.status)),
            ),
        );
        h.insert("grpc-message", grpc_message(reply.body.trim_ascii_end()));
        r
    } else {
        let len = reply.body.len();
        let mut r = Response::new(full(reply.body));
        *r.status_mut() = reply.status;
        if len > 0 {
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        }
        r.headers_mut()
            .insert(CONTENT_LENGTH, HeaderValue::from(len));
        r
    };
    for (k, v) in reply.headers.iter() {
        resp.headers_mut().append(k.clone(), v.clone());
    }
    if close {
        resp.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_mapping() {
        assert_eq!(grpc_status_for(StatusCode::SERVICE_UNAVAILABLE), 14);
        assert_eq!(grpc_status_for(StatusCode::NOT_FOUND), 12);
        assert_eq!(grpc_status_for(StatusCode::GATEWAY_TIMEOUT), 14);
        assert_eq!(grpc_status_for(StatusCode::TOO_MANY_REQUESTS), 14);
        assert_eq!(grpc_status_for(StatusCode::IM_A_TEAPOT), 2);
    }

    #[test]
    fn grpc_reply_is_trailers_only_shape() {
        let r = render(
            LocalReply::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no healthy upstream\n",
                "UH",
            ),
            true,
            false,
        );
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "14");
        assert_eq!(r.headers()["grpc-message"], "no healthy upstream");
        assert_eq!(r.headers()[CONTENT_TYPE], "application/grpc");
    }

    #[test]
    fn http_reply() {
        let r = render(
            LocalReply::new(StatusCode::NOT_FOUND, "", "NR"),
            false,
            true,
        );
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert_eq!(r.headers()[CONTENT_LENGTH], "0");
        assert_eq!(r.headers()[CONNECTION], "close");
        assert!(r.headers().get(CONTENT_TYPE).is_none());
        assert_eq!(grpc_message(b"a%b\n"), "a%25b%0A");
    }
}
