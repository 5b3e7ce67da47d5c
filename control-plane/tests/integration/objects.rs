//! The object store: the S3 endpoint driven by a raw SigV4-signing client (happy paths and
//! every refusal), the `weir.objects.v1` gRPC API and the `weir-cp objects` CLI (a 20 MiB
//! streamed round trip), multipart uploads and their ETag, boto3
//! (`tests/python/s3_boto3.py`; skipped without boto3 unless `WEIR_REQUIRE_BOTO3=1`), and
//! durability across `kill -9` of the binary.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use md5::{Digest as _, Md5};
use sha2::Sha256;
use weir_control_plane::objects::hex;
use weir_control_plane::objects::s3::sigv4;
use weir_control_plane::proto::objects as pb;
use weir_control_plane::proto::objects::objects_client::ObjectsClient;
use weir_control_plane::settings::{AccessKeySettings, S3Settings, Scope, Settings};

use crate::harness::*;

pub(crate) const AK: &str = "AKIAWEIRTEST";
pub(crate) const SK: &str = "weir/test/secret/key";
const RO_AK: &str = "AKIAWEIRREADONLY";
const RO_SK: &str = "read-only-secret";
const MIB: usize = 1024 * 1024;

struct S3Server {
    s3: SocketAddr,
    xds: SocketAddr,
    cp: Arc<weir_control_plane::ControlPlane>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), weir_control_plane::Error>>>,
    _dir: std::path::PathBuf,
}

impl S3Server {
    async fn start() -> S3Server {
        S3Server::start_with(Settings::default()).await
    }

    /// Start with `base` settings (e.g. `auth.tls`) plus the test's access keys.
    async fn start_with(base: Settings) -> S3Server {
        let dir = temp_dir("objects");
        let cp = weir_control_plane::ControlPlane::open(Some(&dir)).expect("open");
        let xds = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let s3 = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let (xds_addr, s3_addr) = (xds.local_addr().unwrap(), s3.local_addr().unwrap());
        let settings = Settings {
            s3: S3Settings {
                region: "us-east-1".into(),
                access_keys: vec![
                    AccessKeySettings {
                        access_key_id: AK.into(),
                        secret_access_key: SK.into(),
                        scopes: vec![Scope::ObjectsRead, Scope::ObjectsWrite],
                    },
                    AccessKeySettings {
                        access_key_id: RO_AK.into(),
                        secret_access_key: RO_SK.into(),
                        scopes: vec![Scope::ObjectsRead],
                    },
                ],
            },
            ..base
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(weir_control_plane::run(
            cp.clone(),
            xds,
            weir_control_plane::RunOptions {
                settings,
                s3: Some(s3),
                ..Default::default()
            },
            async {
                let _ = stopped.await;
            },
        ));
        S3Server {
            s3: s3_addr,
            xds: xds_addr,
            cp,
            stop: Some(stop),
            task: Some(task),
            _dir: dir,
        }
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .expect("server stops")
                .expect("task")
                .expect("result");
        }
    }
}

pub(crate) struct Resp {
    pub(crate) status: u16,
    pub(crate) headers: http::HeaderMap,
    pub(crate) body: Vec<u8>,
}

impl Resp {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    fn code(&self) -> String {
        let t = self.text();
        t.split_once("<Code>")
            .and_then(|(_, r)| r.split_once("</Code>"))
            .map(|(c, _)| c.to_string())
            .unwrap_or_default()
    }
    fn header(&self, n: &str) -> String {
        self.headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    }
}

fn amz_now() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let iso = weir_control_plane::objects::iso8601(ms); // YYYY-MM-DDTHH:MM:SS.mmmZ
    format!(
        "{}{}{}T{}{}{}Z",
        &iso[0..4],
        &iso[5..7],
        &iso[8..10],
        &iso[11..13],
        &iso[14..16],
        &iso[17..19]
    )
}

/// How a test request is signed.
#[derive(Clone, Copy)]
pub(crate) enum Sign<'a> {
    None,
    Key(&'a str, &'a str),
    KeyAt(&'a str, &'a str, &'a str),
    Chunked(&'a str, &'a str),
}

/// Send one request (path already percent-encoded, query in canonical order or not).
pub(crate) async fn send(
    addr: SocketAddr,
    method: &str,
    path_query: &str,
    extra: &[(&str, &str)],
    body: Vec<u8>,
    sign: Sign<'_>,
) -> Resp {
    let host = addr.to_string();
    let (path, query) = path_query.split_once('?').unwrap_or((path_query, ""));
    let mut headers: Vec<(String, String)> = vec![("host".into(), host.clone())];
    for (k, v) in extra {
        headers.push((k.to_ascii_lowercase(), v.to_string()));
    }
    let mut wire_body = body.clone();
    let (ak, sk, date) = match sign {
        Sign::None => ("", "", String::new()),
        Sign::Key(a, s) | Sign::Chunked(a, s) => (a, s, amz_now()),
        Sign::KeyAt(a, s, d) => (a, s, d.to_string()),
    };
    if !ak.is_empty() {
        let chunked = matches!(sign, Sign::Chunked(..));
        let payload = if chunked {
            sigv4::STREAMING_PAYLOAD.to_string()
        } else {
            hex(&Sha256::digest(&body))
        };
        headers.push(("x-amz-date".into(), date.clone()));
        headers.push(("x-amz-content-sha256".into(), payload.clone()));
        if chunked {
            headers.push(("content-encoding".into(), "aws-chunked".into()));
            headers.push((
                "x-amz-decoded-content-length".into(),
                body.len().to_string(),
            ));
        }
        let cred = sigv4::Credential {
            access_key: ak.into(),
            date: date[..8].into(),
            region: "us-east-1".into(),
            service: "s3".into(),
        };
        let mut signed: Vec<String> = headers.iter().map(|(k, _)| k.clone()).collect();
        signed.sort();
        let q = sigv4::parse_query(query);
        let creq = sigv4::canonical_request(method, path, &q, &headers, &signed, &payload)
            .expect("canonical");
        let sts = sigv4::string_to_sign(&date, &cred.scope(), &creq);
        let key = sigv4::signing_key(sk, &cred);
        let sig = sigv4::sign(&key, &sts);
        headers.push((
            "authorization".into(),
            format!(
                "AWS4-HMAC-SHA256 Credential={ak}/{}, SignedHeaders={}, Signature={sig}",
                cred.scope(),
                signed.join(";")
            ),
        ));
        if chunked {
            // Chunks of 64 KiB, each signed over the previous signature.
            let mut prev = sig;
            wire_body = Vec::new();
            let mut pieces: Vec<&[u8]> = body.chunks(64 * 1024).collect();
            pieces.push(&[]);
            for p in pieces {
                let csts = format!(
                    "AWS4-HMAC-SHA256-PAYLOAD\n{date}\n{}\n{prev}\n{}\n{}",
                    cred.scope(),
                    sigv4::EMPTY_SHA256,
                    hex(&Sha256::digest(p))
                );
                prev = sigv4::sign(&key, &csts);
                wire_body.extend_from_slice(
                    format!("{:x};chunk-signature={prev}\r\n", p.len()).as_bytes(),
                );
                wire_body.extend_from_slice(p);
                wire_body.extend_from_slice(b"\r\n");
            }
        }
    }
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut req = http::Request::builder().method(method).uri(path_query);
    for (k, v) in &headers {
        req = req.header(k, v);
    }
    let resp = sender
        .send_request(req.body(Full::new(Bytes::from(wire_body))).unwrap())
        .await
        .expect("response");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes()
        .to_vec();
    Resp {
        status,
        headers,
        body,
    }
}

fn rw() -> Sign<'static> {
    Sign::Key(AK, SK)
}

#[tokio::test]
async fn s3_raw_client_happy_paths_and_errors() {
    let srv = S3Server::start().await;
    let a = srv.s3;
    assert_eq!(send(a, "PUT", "/raw", &[], vec![], rw()).await.status, 200);
    let r = send(a, "PUT", "/raw", &[], vec![], rw()).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (409, "BucketAlreadyOwnedByYou")
    );

    // Put with metadata and a correct Content-MD5; aws-chunked bodies decode.
    let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let md5 = Md5::digest(&body);
    let md5_b64 = base64::engine::general_purpose::STANDARD.encode(md5);
    let r = send(
        a,
        "PUT",
        "/raw/dir/a%20b.bin",
        &[
            ("x-amz-meta-owner", "tests"),
            ("content-type", "text/x-a"),
            ("content-md5", &md5_b64),
        ],
        body.clone(),
        rw(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("etag"), format!("\"{}\"", hex(&md5)));
    let r = send(
        a,
        "PUT",
        "/raw/chunked",
        &[],
        body.clone(),
        Sign::Chunked(AK, SK),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("etag"), format!("\"{}\"", hex(&md5)));
    // A wrong Content-MD5 is BadDigest and stores nothing.
    let wrong = base64::engine::general_purpose::STANDARD.encode([0u8; 16]);
    let r = send(
        a,
        "PUT",
        "/raw/bad",
        &[("content-md5", &wrong)],
        b"x".to_vec(),
        rw(),
    )
    .await;
    assert_eq!((r.status, r.code().as_str()), (400, "BadDigest"));
    assert_eq!(
        send(a, "HEAD", "/raw/bad", &[], vec![], rw()).await.status,
        404
    );

    // Get: whole, ranges, conditionals.
    let r = send(a, "GET", "/raw/dir/a%20b.bin", &[], vec![], rw()).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, body);
    assert_eq!(r.header("x-amz-meta-owner"), "tests");
    assert_eq!(r.header("content-type"), "text/x-a");
    let r = send(
        a,
        "GET",
        "/raw/chunked",
        &[("range", "bytes=100-199")],
        vec![],
        rw(),
    )
    .await;
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &body[100..200]);
    assert_eq!(r.header("content-range"), "bytes 100-199/200000");
    let r = send(
        a,
        "GET",
        "/raw/chunked",
        &[("range", "bytes=199990-")],
        vec![],
        rw(),
    )
    .await;
    assert_eq!((r.status, r.body.as_slice()), (206, &body[199_990..]));
    let r = send(
        a,
        "GET",
        "/raw/chunked",
        &[("range", "bytes=-4")],
        vec![],
        rw(),
    )
    .await;
    assert_eq!((r.status, r.body.as_slice()), (206, &body[199_996..]));
    let r = send(
        a,
        "GET",
        "/raw/chunked",
        &[("range", "bytes=200000-")],
        vec![],
        rw(),
    )
    .await;
    assert_eq!((r.status, r.code().as_str()), (416, "InvalidRange"));
    let etag = format!("\"{}\"", hex(&md5));
    let r = send(
        a,
        "GET",
        "/raw/chunked",
        &[("if-none-match", &etag)],
        vec![],
        rw(),
    )
    .await;
    assert_eq!(r.status, 304);
    let r = send(
        a,
        "GET",
        "/raw/chunked",
        &[("if-match", "\"other\"")],
        vec![],
        rw(),
    )
    .await;
    assert_eq!((r.status, r.code().as_str()), (412, "PreconditionFailed"));
    let r = send(
        a,
        "GET",
        "/raw/chunked",
        &[("if-match", &etag)],
        vec![],
        rw(),
    )
    .await;
    assert_eq!(r.status, 200);
    let r = send(a, "HEAD", "/raw/chunked", &[], vec![], rw()).await;
    assert_eq!(
        (r.status, r.header("content-length")),
        (200, "200000".into())
    );

    // Listing.
    let r = send(
        a,
        "GET",
        "/raw?list-type=2&delimiter=%2F&max-keys=1",
        &[],
        vec![],
        rw(),
    )
    .await;
    let t = r.text();
    assert!(
        t.contains("<KeyCount>1</KeyCount>") && t.contains("<IsTruncated>true</IsTruncated>"),
        "{t}"
    );
    assert!(t.contains("<Key>chunked</Key>"), "{t}");
    let token = t
        .split_once("<NextContinuationToken>")
        .and_then(|(_, r)| r.split_once('<'))
        .map(|(v, _)| v.to_string())
        .expect("token");
    let r = send(
        a,
        "GET",
        &format!("/raw?continuation-token={token}&delimiter=%2F&list-type=2"),
        &[],
        vec![],
        rw(),
    )
    .await;
    let t = r.text();
    assert!(
        t.contains("<CommonPrefixes><Prefix>dir/</Prefix></CommonPrefixes>"),
        "{t}"
    );
    assert!(t.contains("<IsTruncated>false</IsTruncated>"), "{t}");

    // Authentication and authorization refusals; nothing is written.
    let r = send(a, "PUT", "/raw/anon", &[], b"x".to_vec(), Sign::None).await;
    assert_eq!((r.status, r.code().as_str()), (403, "AccessDenied"));
    assert!(
        r.text().contains("<RequestId>") && r.text().contains("<Resource>/raw/anon</Resource>")
    );
    let r = send(
        a,
        "PUT",
        "/raw/anon",
        &[],
        b"x".to_vec(),
        Sign::Key("AKIANOBODY", SK),
    )
    .await;
    assert_eq!((r.status, r.code().as_str()), (403, "InvalidAccessKeyId"));
    let r = send(
        a,
        "PUT",
        "/raw/anon",
        &[],
        b"x".to_vec(),
        Sign::Key(AK, "wrong"),
    )
    .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (403, "SignatureDoesNotMatch")
    );
    let r = send(
        a,
        "PUT",
        "/raw/anon",
        &[],
        b"x".to_vec(),
        Sign::Chunked(AK, "wrong"),
    )
    .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (403, "SignatureDoesNotMatch")
    );
    let r = send(
        a,
        "PUT",
        "/raw/anon",
        &[],
        b"x".to_vec(),
        Sign::KeyAt(AK, SK, "20200101T000000Z"),
    )
    .await;
    assert_eq!((r.status, r.code().as_str()), (403, "RequestTimeTooSkewed"));
    let r = send(
        a,
        "PUT",
        "/raw/anon",
        &[],
        b"x".to_vec(),
        Sign::Key(RO_AK, RO_SK),
    )
    .await;
    assert_eq!((r.status, r.code().as_str()), (403, "AccessDenied"));
    let r = send(
        a,
        "GET",
        "/raw/chunked",
        &[],
        vec![],
        Sign::Key(RO_AK, RO_SK),
    )
    .await;
    assert_eq!(r.status, 200, "the read-only key reads");
    assert_eq!(
        send(a, "HEAD", "/raw/anon", &[], vec![], rw()).await.status,
        404
    );

    // Missing things.
    let r = send(a, "GET", "/nobucket/k", &[], vec![], rw()).await;
    assert_eq!((r.status, r.code().as_str()), (404, "NoSuchBucket"));
    let r = send(a, "GET", "/raw/nokey", &[], vec![], rw()).await;
    assert_eq!((r.status, r.code().as_str()), (404, "NoSuchKey"));
    let r = send(a, "DELETE", "/raw", &[], vec![], rw()).await;
    assert_eq!((r.status, r.code().as_str()), (409, "BucketNotEmpty"));

    // Multipart: 3 parts (5 MiB, 5 MiB, 1 KiB), errors on the way.
    let r = send(
        a,
        "POST",
        "/raw/mp?uploads",
        &[("content-type", "app/x-mp")],
        vec![],
        rw(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let t = r.text();
    let upload = t
        .split_once("<UploadId>")
        .and_then(|(_, r)| r.split_once('<'))
        .map(|(v, _)| v.to_string())
        .expect("upload id");
    let parts: Vec<Vec<u8>> = vec![vec![1u8; 5 * MIB], vec![2u8; 5 * MIB], vec![3u8; 1024]];
    let mut etags = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        let sign = if i == 1 { Sign::Chunked(AK, SK) } else { rw() };
        let r = send(
            a,
            "PUT",
            &format!("/raw/mp?partNumber={}&uploadId={upload}", i + 1),
            &[],
            p.clone(),
            sign,
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        etags.push(r.header("etag"));
    }
    let r = send(
        a,
        "GET",
        &format!("/raw/mp?uploadId={upload}"),
        &[],
        vec![],
        rw(),
    )
    .await;
    assert_eq!(r.text().matches("<Part>").count(), 3, "{}", r.text());
    let complete = |etags: &[String], order: &[usize]| {
        let mut x = String::from("<CompleteMultipartUpload>");
        for &i in order {
            x.push_str(&format!(
                "<Part><PartNumber>{}</PartNumber><ETag>{}</ETag></Part>",
                i + 1,
                etags[i].replace('"', "&quot;")
            ));
        }
        x.push_str("</CompleteMultipartUpload>");
        x.into_bytes()
    };
    let path = format!("/raw/mp?uploadId={upload}");
    let r = send(a, "POST", &path, &[], complete(&etags, &[1, 0, 2]), rw()).await;
    assert_eq!((r.status, r.code().as_str()), (400, "InvalidPartOrder"));
    let r = send(a, "POST", &path, &[], complete(&etags, &[0, 2, 1]), rw()).await;
    assert_eq!(r.code(), "InvalidPartOrder");
    let wrong_etags = vec![etags[1].clone(), etags[1].clone(), etags[2].clone()];
    let r = send(
        a,
        "POST",
        &path,
        &[],
        complete(&wrong_etags, &[0, 1, 2]),
        rw(),
    )
    .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (400, "InvalidPart"),
        "{}",
        r.text()
    );
    let r = send(a, "POST", &path, &[], complete(&etags, &[0, 1, 2]), rw()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let mut cat = Vec::new();
    for p in &parts {
        cat.extend_from_slice(&Md5::digest(p));
    }
    let want = format!("{}-3", hex(&Md5::digest(&cat)));
    assert!(
        r.text()
            .contains(&format!("<ETag>&quot;{want}&quot;</ETag>")),
        "{}",
        r.text()
    );
    let r = send(
        a,
        "GET",
        "/raw/mp",
        &[("range", "bytes=5242879-5242880")],
        vec![],
        rw(),
    )
    .await;
    assert_eq!((r.status, r.body.as_slice()), (206, &[1u8, 2][..]));
    assert_eq!(r.header("etag"), format!("\"{want}\""));
    assert_eq!(r.header("content-type"), "app/x-mp");
    let r = send(a, "POST", &path, &[], complete(&etags, &[0, 1, 2]), rw()).await;
    assert_eq!((r.status, r.code().as_str()), (404, "NoSuchUpload"));
    // Too-small parts, then abort.
    let r = send(a, "POST", "/raw/small?uploads", &[], vec![], rw()).await;
    let up2 = r
        .text()
        .split_once("<UploadId>")
        .and_then(|(_, r)| r.split_once('<'))
        .map(|(v, _)| v.to_string())
        .expect("upload id");
    etags.clear();
    for n in 1..=2 {
        let r = send(
            a,
            "PUT",
            &format!("/raw/small?partNumber={n}&uploadId={up2}"),
            &[],
            b"tiny".to_vec(),
            rw(),
        )
        .await;
        etags.push(r.header("etag"));
    }
    let r = send(
        a,
        "POST",
        &format!("/raw/small?uploadId={up2}"),
        &[],
        complete(&etags, &[0, 1]),
        rw(),
    )
    .await;
    assert_eq!((r.status, r.code().as_str()), (400, "EntityTooSmall"));
    let r = send(
        a,
        "DELETE",
        &format!("/raw/small?uploadId={up2}"),
        &[],
        vec![],
        rw(),
    )
    .await;
    assert_eq!(r.status, 204);
    let r = send(
        a,
        "GET",
        &format!("/raw/small?uploadId={up2}"),
        &[],
        vec![],
        rw(),
    )
    .await;
    assert_eq!((r.status, r.code().as_str()), (404, "NoSuchUpload"));

    // Metrics.
    let m = srv.cp.metrics.render();
    assert!(
        m.contains("weir_cp_objects_objects{bucket=\"raw\"} 3"),
        "{m}"
    );
    assert!(
        m.contains("weir_cp_objects_s3_requests_total{op=\"PutObject\",status=\"403\"} 6"),
        "{m}"
    );
    assert!(
        m.contains(
            "weir_cp_objects_s3_requests_total{op=\"CompleteMultipartUpload\",status=\"200\"} 1"
        ),
        "{m}"
    );

    // Delete everything, then the bucket.
    for k in ["dir/a%20b.bin", "chunked", "mp"] {
        assert_eq!(
            send(a, "DELETE", &format!("/raw/{k}"), &[], vec![], rw())
                .await
                .status,
            204
        );
    }
    assert_eq!(
        send(a, "DELETE", "/raw", &[], vec![], rw()).await.status,
        204
    );
    let r = send(a, "GET", "/", &[], vec![], rw()).await;
    assert!(!r.text().contains("<Name>raw</Name>"), "{}", r.text());
    srv.stop().await;
}

async fn grpc(addr: SocketAddr) -> ObjectsClient<tonic::transport::Channel> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect");
    ObjectsClient::new(ch)
}

// Multi-threaded: the CLI runs as a blocking child process while this runtime serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_and_cli_stream_a_large_object() {
    let srv = S3Server::start().await;
    let server = srv.xds.to_string();
    let dir = temp_dir("objects-cli");
    let src = dir.join("big.bin");
    let data: Vec<u8> = (0..20 * MIB as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    std::fs::write(&src, &data).unwrap();
    let want = hex(&Md5::digest(&data));
    let run = |args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cli(&args)
    };
    let s = |v: &str| v.to_string();
    let (ok, out, err) = run(vec![
        s("objects"),
        s("mb"),
        s("cli"),
        s("--server"),
        server.clone(),
    ]);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = run(vec![
        s("objects"),
        s("put"),
        src.display().to_string(),
        s("cli/data/big.bin"),
        s("--server"),
        server.clone(),
    ]);
    assert!(ok, "{out}{err}");
    assert!(out.contains(&want), "{out}");
    let (ok, out, _) = run(vec![
        s("objects"),
        s("ls"),
        s("cli"),
        s("--server"),
        server.clone(),
    ]);
    assert!(ok && out.contains("PRE\tdata/"), "{out}");
    let (ok, out, _) = run(vec![
        s("objects"),
        s("ls"),
        s("cli/data/"),
        s("--server"),
        server.clone(),
    ]);
    assert!(
        ok && out.contains(&format!("{}\t{want}\tdata/big.bin", data.len())),
        "{out}"
    );
    let (ok, out, _) = run(vec![s("objects"), s("ls"), s("--server"), server.clone()]);
    assert!(ok && out.lines().any(|l| l == "cli"), "{out}");
    let dst = dir.join("back.bin");
    let (ok, out, err) = run(vec![
        s("objects"),
        s("get"),
        s("cli/data/big.bin"),
        dst.display().to_string(),
        s("--server"),
        server.clone(),
    ]);
    assert!(ok, "{out}{err}");
    assert!(std::fs::read(&dst).unwrap() == data, "round trip differs");

    // The gRPC API directly: a range, head, list, errors.
    let mut c = grpc(srv.xds).await;
    let mut st = c
        .get_object(pb::GetObjectRequest {
            bucket: "cli".into(),
            key: "data/big.bin".into(),
            offset: Some(10 * MIB as u64),
            length: Some(MIB as u64 + 3),
            if_match: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    let mut first = true;
    while let Some(m) = st.message().await.unwrap() {
        match m.part {
            Some(pb::get_object_response::Part::Info(i)) => {
                assert!(first);
                assert_eq!(i.etag, want);
            }
            Some(pb::get_object_response::Part::Chunk(b)) => {
                assert!(b.len() <= weir_control_plane::objects::grpc::GRPC_CHUNK);
                got.extend(b);
            }
            None => panic!("empty message"),
        }
        first = false;
    }
    assert!(got == data[10 * MIB..11 * MIB + 3], "range differs");
    let e = c
        .get_object(pb::GetObjectRequest {
            bucket: "cli".into(),
            key: "data/big.bin".into(),
            offset: Some(data.len() as u64),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::OutOfRange);
    let e = c
        .head_object(pb::HeadObjectRequest {
            bucket: "cli".into(),
            key: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let e = c
        .delete_bucket(pb::DeleteBucketRequest {
            bucket: "cli".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    // A put whose first message is not a header is refused.
    let e = c
        .put_object(futures::stream::iter(vec![pb::PutObjectRequest {
            part: Some(pb::put_object_request::Part::Chunk(vec![1])),
        }]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    // A bad content_md5 fails with DATA_LOSS and stores nothing.
    let e = c
        .put_object(futures::stream::iter(vec![
            pb::PutObjectRequest {
                part: Some(pb::put_object_request::Part::Header(pb::PutObjectHeader {
                    bucket: "cli".into(),
                    key: "md5".into(),
                    content_md5: vec![0; 16],
                    ..Default::default()
                })),
            },
            pb::PutObjectRequest {
                part: Some(pb::put_object_request::Part::Chunk(vec![1, 2])),
            },
        ]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::DataLoss);
    let l = c
        .list_objects(pb::ListObjectsRequest {
            bucket: "cli".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(l.objects.len(), 1);
    let (ok, _, _) = run(vec![
        s("objects"),
        s("rm"),
        s("cli/data/big.bin"),
        s("--server"),
        server.clone(),
    ]);
    assert!(ok);
    let m = srv.cp.metrics.render();
    assert!(m.contains("weir_cp_objects_bytes{bucket=\"cli\"} 0"), "{m}");
    assert!(
        m.contains(
            "weir_cp_objects_grpc_requests_total{method=\"PutObject\",code=\"DATA_LOSS\"} 1"
        ),
        "{m}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    srv.stop().await;
}

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Run tests/python/s3_boto3.py against `endpoint` (trusting `ca_bundle` for HTTPS).
async fn run_boto3(endpoint: String, ca_bundle: Option<std::path::PathBuf>) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/s3_boto3.py");
    let out = tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(python());
        cmd.args([script, &endpoint, AK, SK])
            .env_remove("AWS_PROFILE")
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null");
        match ca_bundle {
            Some(ca) => cmd.env("AWS_CA_BUNDLE", ca),
            None => cmd.env_remove("AWS_CA_BUNDLE"),
        };
        cmd.output().expect("run python")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "boto3 script failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.starts_with("OK "), "{stdout}");
}

/// Whether boto3 can be imported; skipping loudly unless WEIR_REQUIRE_BOTO3=1.
fn have_boto3(test: &str) -> bool {
    have_client(&python(), &["-c", "import boto3"], test)
}

#[tokio::test]
async fn boto3_against_the_s3_endpoint() {
    if !have_boto3("boto3_against_the_s3_endpoint") {
        return;
    }
    let srv = S3Server::start().await;
    run_boto3(format!("http://{}", srv.s3), None).await;
    srv.stop().await;
}

/// With `auth.tls` the S3 endpoint is HTTPS like the API: boto3 works through it trusting
/// the CA, and a plain-text request gets no answer.
#[tokio::test]
async fn s3_endpoint_serves_https_with_auth_tls() {
    let p = crate::auth::pki("s3-tls");
    let settings = Settings::parse(&crate::auth::tls_settings(&p), "test").expect("settings");
    let srv = S3Server::start_with(settings).await;
    // Plain text: the TLS server reads garbage and closes; no HTTP answer comes back.
    let mut plain = tokio::net::TcpStream::connect(srv.s3)
        .await
        .expect("connect");
    tokio::io::AsyncWriteExt::write_all(&mut plain, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    let mut got = Vec::new();
    let _ = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_to_end(&mut plain, &mut got),
    )
    .await
    .expect("the server closes");
    assert!(
        !got.starts_with(b"HTTP/"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    if have_boto3("s3_endpoint_serves_https_with_auth_tls") {
        run_boto3(
            format!("https://localhost:{}", srv.s3.port()),
            Some(p.ca.clone()),
        )
        .await;
    }
    srv.stop().await;
}

#[tokio::test]
async fn acknowledged_puts_survive_kill_9() {
    let dir = temp_dir("objects-kill");
    let data_dir = dir.display().to_string();
    let mut acked = Vec::new();
    {
        let b = spawn_binary(&["--data-dir", &data_dir]).await;
        let mut c = grpc(b.xds).await;
        c.create_bucket(pb::CreateBucketRequest {
            bucket: "dur".into(),
        })
        .await
        .unwrap();
        for i in 0..20u32 {
            let body = vec![i as u8; 100_000 + i as usize];
            let r = c
                .put_object(futures::stream::iter(vec![
                    pb::PutObjectRequest {
                        part: Some(pb::put_object_request::Part::Header(pb::PutObjectHeader {
                            bucket: "dur".into(),
                            key: format!("k{i}"),
                            ..Default::default()
                        })),
                    },
                    pb::PutObjectRequest {
                        part: Some(pb::put_object_request::Part::Chunk(body.clone())),
                    },
                ]))
                .await
                .expect("put")
                .into_inner();
            acked.push((format!("k{i}"), r.etag));
        }
        let pid = b.child.0.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-9", &pid])
                .status()
                .unwrap()
                .success()
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut b = b;
        while b.child.0.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "not killed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let b = spawn_binary(&["--data-dir", &data_dir]).await;
    let mut c = grpc(b.xds).await;
    for (k, etag) in &acked {
        let h = c
            .head_object(pb::HeadObjectRequest {
                bucket: "dur".into(),
                key: k.clone(),
            })
            .await
            .expect("acknowledged object survives")
            .into_inner();
        assert_eq!(&h.etag, etag);
        let mut st = c
            .get_object(pb::GetObjectRequest {
                bucket: "dur".into(),
                key: k.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut md5 = Md5::new();
        while let Some(m) = st.message().await.unwrap() {
            if let Some(pb::get_object_response::Part::Chunk(b)) = m.part {
                md5.update(&b);
            }
        }
        assert_eq!(&hex(&md5.finalize()), etag);
    }
    drop(b);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Run `program args` with `env` and the AWS environment cleared; its stdout, or a panic with
/// both outputs.
async fn run_client(program: &str, args: Vec<String>, env: Vec<(String, String)>) -> String {
    let program = program.to_string();
    let shown = format!("{program} {}", args.join(" "));
    let out = tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(&program);
        cmd.args(&args);
        for v in [
            "AWS_PROFILE",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_CA_BUNDLE",
        ] {
            cmd.env_remove(v);
        }
        cmd.envs(env).output().expect("run the client")
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{shown} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Whether `program args` runs (e.g. `--version`); a loud skip unless WEIR_REQUIRE_BOTO3=1
/// (scripts/test.sh installs boto3, the AWS CLI and rclone together and sets it).
fn have_client(program: &str, args: &[&str], test: &str) -> bool {
    let have = Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        assert!(
            std::env::var("WEIR_REQUIRE_BOTO3").as_deref() != Ok("1"),
            "WEIR_REQUIRE_BOTO3=1 but `{program} {}` fails (pip install boto3 awscli; apt-get install rclone)",
            args.join(" ")
        );
        eprintln!(
            "\n*** SKIPPED {test}: `{program} {}` fails ***\n",
            args.join(" ")
        );
    }
    have
}

/// A local tree for the sync clients: two small files and one over the AWS CLI's 8 MiB
/// multipart threshold.
fn client_tree(tag: &str) -> (std::path::PathBuf, Vec<u8>) {
    let dir = temp_dir(tag);
    std::fs::create_dir_all(dir.join("sub")).expect("mkdir");
    std::fs::write(dir.join("a.txt"), b"alpha\n").expect("write");
    std::fs::write(dir.join("sub/b.txt"), b"beta\n").expect("write");
    let big: Vec<u8> = (0..9 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(dir.join("big.bin"), &big).expect("write");
    (dir, big)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_cli_against_the_s3_endpoint() {
    if !have_client("aws", &["--version"], "aws_cli_against_the_s3_endpoint") {
        return;
    }
    let srv = S3Server::start().await;
    let (dir, big) = client_tree("awscli");
    let config = dir.join("aws-config");
    std::fs::write(
        &config,
        "[default]\nregion = us-east-1\ns3 =\n  addressing_style = path\n",
    )
    .expect("config");
    let env = vec![
        ("AWS_ACCESS_KEY_ID".to_string(), AK.to_string()),
        ("AWS_SECRET_ACCESS_KEY".to_string(), SK.to_string()),
        ("AWS_CONFIG_FILE".to_string(), config.display().to_string()),
        (
            "AWS_SHARED_CREDENTIALS_FILE".to_string(),
            "/dev/null".to_string(),
        ),
    ];
    let endpoint = format!("http://{}", srv.s3);
    let aws = |args: &[&str]| {
        let mut v: Vec<String> = vec!["--endpoint-url".into(), endpoint.clone()];
        v.extend(args.iter().map(|s| s.to_string()));
        run_client("aws", v, env.clone())
    };
    let d = dir.display().to_string();
    aws(&["s3", "mb", "s3://cli"]).await;
    // sync: PutObject for the small files, a multipart upload for big.bin.
    let sync = [
        "s3",
        "sync",
        &d,
        "s3://cli/data/",
        "--exclude",
        "aws-config",
    ];
    aws(&sync).await;
    let ls = aws(&["s3", "ls", "s3://cli/data/", "--recursive"]).await;
    for k in ["data/a.txt", "data/sub/b.txt", "data/big.bin"] {
        assert!(ls.contains(k), "{ls}");
    }
    // A second sync finds nothing to do (sizes and times compare through ListObjectsV2).
    let again = aws(&sync).await;
    assert!(!again.contains("upload:"), "{again}");
    // Bucket-to-bucket copy: a multipart copy (UploadPartCopy) of big.bin, CopyObject of a.txt.
    aws(&["s3", "cp", "s3://cli/data/big.bin", "s3://cli/copy/big.bin"]).await;
    aws(&["s3", "cp", "s3://cli/data/a.txt", "s3://cli/copy/a.txt"]).await;
    let out = dir.join("big.out");
    aws(&[
        "s3",
        "cp",
        "s3://cli/copy/big.bin",
        &out.display().to_string(),
    ])
    .await;
    assert!(
        std::fs::read(&out).expect("downloaded") == big,
        "copied bytes differ"
    );
    // ListObjects (v1) with a delimiter.
    let v1 = aws(&[
        "s3api",
        "list-objects",
        "--bucket",
        "cli",
        "--delimiter",
        "/",
    ])
    .await;
    let v1: serde_json::Value = serde_json::from_str(&v1).expect("json");
    let prefixes: Vec<&str> = v1["CommonPrefixes"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["Prefix"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(prefixes, ["copy/", "data/"], "{v1}");
    // DeleteObjects, then rm --recursive for the rest, then the bucket.
    let del = aws(&[
        "s3api",
        "delete-objects",
        "--bucket",
        "cli",
        "--delete",
        "Objects=[{Key=copy/a.txt},{Key=copy/big.bin}]",
    ])
    .await;
    assert!(del.contains("copy/big.bin"), "{del}");
    aws(&["s3", "rm", "s3://cli", "--recursive"]).await;
    aws(&["s3", "rb", "s3://cli"]).await;
    let buckets = aws(&["s3", "ls"]).await;
    assert!(!buckets.contains("cli"), "{buckets}");
    // The operations the CLI used, as weir-cp counted them.
    let m = srv.cp.metrics.render();
    for op in [
        "UploadPart",
        "CompleteMultipartUpload",
        "UploadPartCopy",
        "CopyObject",
        "ListObjects",
        "ListObjectsV2",
        "DeleteObjects",
    ] {
        assert!(
            m.contains(&format!(
                "weir_cp_objects_s3_requests_total{{op=\"{op}\",status=\"200\"}}"
            )),
            "{op} not counted:\n{m}"
        );
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rclone_against_the_s3_endpoint() {
    if !have_client("rclone", &["--version"], "rclone_against_the_s3_endpoint") {
        return;
    }
    let srv = S3Server::start().await;
    let (dir, _big) = client_tree("rclone");
    // Provider "Other" lists with ListObjects v1; one key per page exercises its markers.
    let env: Vec<(String, String)> = [
        ("RCLONE_CONFIG", "/dev/null"),
        ("RCLONE_CONFIG_W_TYPE", "s3"),
        ("RCLONE_CONFIG_W_PROVIDER", "Other"),
        ("RCLONE_CONFIG_W_ACCESS_KEY_ID", AK),
        ("RCLONE_CONFIG_W_SECRET_ACCESS_KEY", SK),
        ("RCLONE_CONFIG_W_REGION", "us-east-1"),
        ("RCLONE_CONFIG_W_FORCE_PATH_STYLE", "true"),
        ("RCLONE_S3_LIST_CHUNK", "1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .chain([(
        "RCLONE_CONFIG_W_ENDPOINT".to_string(),
        format!("http://{}", srv.s3),
    )])
    .collect();
    let rclone = |args: &[&str]| {
        run_client(
            "rclone",
            args.iter().map(|s| s.to_string()).collect(),
            env.clone(),
        )
    };
    let d = dir.display().to_string();
    rclone(&["mkdir", "w:rcl"]).await;
    rclone(&["copy", &d, "w:rcl/data"]).await;
    let mut listed: Vec<String> = rclone(&["lsf", "-R", "--files-only", "w:rcl"])
        .await
        .lines()
        .map(str::to_string)
        .collect();
    listed.sort();
    assert_eq!(listed, ["data/a.txt", "data/big.bin", "data/sub/b.txt"]);
    // check compares sizes and MD5s (our ETags) with the local files.
    rclone(&["check", &d, "w:rcl/data"]).await;
    // Server-side copy (CopyObject), then read it back.
    rclone(&["copyto", "w:rcl/data/a.txt", "w:rcl/copied.txt"]).await;
    assert_eq!(rclone(&["cat", "w:rcl/copied.txt"]).await, "alpha\n");
    rclone(&["purge", "w:rcl"]).await;
    let left = rclone(&["lsf", "w:"]).await;
    assert!(!left.contains("rcl"), "{left}");
    // rclone listed with ListObjects v1, one key per page (markers), and copied server-side.
    let m = srv.cp.metrics.render();
    let count = |op: &str| -> u64 {
        let k = format!("weir_cp_objects_s3_requests_total{{op=\"{op}\",status=\"200\"}} ");
        m.lines()
            .find_map(|l| l.strip_prefix(&k))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    assert!(count("ListObjects") > 3, "{m}");
    assert_eq!(count("CopyObject"), 1, "{m}");
    srv.stop().await;
}

/// Over its request rate (`limits:`), an S3 client gets 503 `SlowDown` with `retry-after`
/// (what AWS SDKs back off on), before its signature is even checked.
#[tokio::test]
async fn s3_clients_over_their_request_rate_slow_down() {
    let settings = Settings {
        limits: weir_control_plane::ratelimit::LimitSettings {
            requests_per_second: 0.01,
            burst: Some(2),
        },
        ..Default::default()
    };
    let srv = S3Server::start_with(settings).await;
    let a = srv.s3;
    assert_eq!(send(a, "GET", "/", &[], vec![], rw()).await.status, 200);
    assert_eq!(send(a, "GET", "/", &[], vec![], rw()).await.status, 200);
    let r = send(a, "GET", "/", &[], vec![], rw()).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (503, "SlowDown"),
        "{}",
        r.text()
    );
    assert!(r.header("retry-after").parse::<u64>().unwrap_or(0) >= 1);
    let m = srv.cp.metrics.render();
    assert!(
        m.contains("weir_cp_rate_limited_total{api=\"s3\"} 1"),
        "{m}"
    );
    srv.stop().await;
}
