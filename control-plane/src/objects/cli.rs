//! `weir-cp objects …`: the object store's CLI, a gRPC client of `weir.objects.v1` on the
//! server's gRPC (xDS) address (`--server`, default `127.0.0.1:18000`).
//!
//! - `mb BUCKET`, `rb BUCKET`: create / delete a bucket.
//! - `ls`: buckets; `ls BUCKET[/PREFIX]`: objects and common prefixes (`/` delimiter), one
//!   line each (`SIZE<TAB>ETAG<TAB>KEY` or `PRE<TAB>PREFIX`), following every page.
//! - `put FILE BUCKET/KEY`: streams the file in 1 MiB chunks (`-` for standard input) and
//!   checks the returned ETag against the MD5 computed while sending.
//! - `get BUCKET/KEY [FILE]`: streams to FILE (written to a temp file, then renamed) or to
//!   standard output.
//! - `rm BUCKET/KEY`.

use anyhow::{Context as _, bail};
use md5::{Digest as _, Md5};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::auth::client::AuthChannel;

use super::hex;
use crate::proto::objects as pb;
use crate::proto::objects::objects_client::ObjectsClient;

/// Default `--server`: weir-cp's default gRPC (xDS) address.
pub const DEFAULT_SERVER: &str = "127.0.0.1:18000";

/// Chunk size of `put`.
const PUT_CHUNK: usize = 1024 * 1024;

/// `weir-cp objects` arguments.
#[derive(Debug, clap::Args)]
pub struct ObjectsArgs {
    /// The weir-cp gRPC address (`serve --xds-address`).
    #[arg(long, global = true, default_value = DEFAULT_SERVER)]
    pub server: String,
    /// Credentials and TLS (`--token` / `WEIR_CP_TOKEN`, `--ca-file`, `--cert-file`,
    /// `--key-file`).
    #[command(flatten)]
    pub auth: crate::auth::client::ClientAuthArgs,
    #[command(subcommand)]
    pub command: ObjectsCommand,
}

/// `weir-cp objects` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum ObjectsCommand {
    /// Make a bucket.
    Mb {
        /// The bucket.
        bucket: String,
    },
    /// Remove an empty bucket.
    Rb {
        /// The bucket.
        bucket: String,
    },
    /// List buckets, or the objects of BUCKET[/PREFIX].
    Ls {
        /// BUCKET or BUCKET/PREFIX.
        target: Option<String>,
    },
    /// Upload FILE (`-`: standard input) as BUCKET/KEY.
    Put {
        /// The file.
        file: String,
        /// BUCKET/KEY.
        target: String,
        /// Content-Type.
        #[arg(long = "content-type")]
        content_type: Option<String>,
    },
    /// Download BUCKET/KEY to FILE (standard output without it).
    Get {
        /// BUCKET/KEY.
        source: String,
        /// The file.
        file: Option<String>,
    },
    /// Delete BUCKET/KEY.
    Rm {
        /// BUCKET/KEY.
        target: String,
    },
}

fn split(target: &str) -> anyhow::Result<(String, String)> {
    match target.split_once('/') {
        Some((b, k)) if !b.is_empty() && !k.is_empty() => Ok((b.into(), k.into())),
        _ => bail!("expected BUCKET/KEY, got {target:?}"),
    }
}

async fn client(args: &ObjectsArgs) -> anyhow::Result<ObjectsClient<AuthChannel>> {
    let ch = args.auth.grpc_channel(&args.server).await?;
    Ok(ObjectsClient::new(ch)
        .max_decoding_message_size(crate::MAX_ENCODING_MESSAGE_SIZE)
        .max_encoding_message_size(crate::MAX_DECODING_MESSAGE_SIZE))
}

/// Run `weir-cp objects …`.
pub async fn run(args: ObjectsArgs) -> anyhow::Result<()> {
    let mut c = client(&args).await?;
    match args.command {
        ObjectsCommand::Mb { bucket } => {
            c.create_bucket(pb::CreateBucketRequest {
                bucket: bucket.clone(),
            })
            .await?;
            println!("make_bucket: {bucket}");
        }
        ObjectsCommand::Rb { bucket } => {
            c.delete_bucket(pb::DeleteBucketRequest {
                bucket: bucket.clone(),
            })
            .await?;
            println!("remove_bucket: {bucket}");
        }
        ObjectsCommand::Ls { target: None } => {
            for b in c
                .list_buckets(pb::ListBucketsRequest {})
                .await?
                .into_inner()
                .buckets
            {
                println!("{}", b.name);
            }
        }
        ObjectsCommand::Ls {
            target: Some(target),
        } => {
            let (bucket, prefix) = target.split_once('/').unwrap_or((&target, ""));
            let mut token = String::new();
            // Bounded: every page makes progress, and a bucket holds finitely many keys.
            loop {
                let page = c
                    .list_objects(pb::ListObjectsRequest {
                        bucket: bucket.into(),
                        prefix: prefix.into(),
                        delimiter: "/".into(),
                        max_keys: 1000,
                        continuation_token: token.clone(),
                        start_after: String::new(),
                    })
                    .await?
                    .into_inner();
                for p in &page.common_prefixes {
                    println!("PRE\t{p}");
                }
                for o in &page.objects {
                    println!("{}\t{}\t{}", o.size, o.etag, o.key);
                }
                if !page.truncated || page.next_continuation_token.is_empty() {
                    break;
                }
                token = page.next_continuation_token;
            }
        }
        ObjectsCommand::Put {
            file,
            target,
            content_type,
        } => {
            let (bucket, key) = split(&target)?;
            let mut reader: Box<dyn tokio::io::AsyncRead + Unpin + Send> = if file == "-" {
                Box::new(tokio::io::stdin())
            } else {
                Box::new(
                    tokio::fs::File::open(&file)
                        .await
                        .with_context(|| format!("opening {file}"))?,
                )
            };
            let (tx, rx) = tokio::sync::mpsc::channel::<pb::PutObjectRequest>(4);
            let header = pb::PutObjectRequest {
                part: Some(pb::put_object_request::Part::Header(pb::PutObjectHeader {
                    bucket,
                    key: key.clone(),
                    content_type: content_type.unwrap_or_default(),
                    metadata: Default::default(),
                    content_md5: Vec::new(),
                })),
            };
            let reading = tokio::spawn(async move {
                let mut md5 = Md5::new();
                if tx.send(header).await.is_err() {
                    return Ok::<_, std::io::Error>(None);
                }
                loop {
                    let mut buf = vec![0u8; PUT_CHUNK];
                    let mut n = 0;
                    while n < PUT_CHUNK {
                        let r = reader.read(&mut buf[n..]).await?;
                        if r == 0 {
                            break;
                        }
                        n += r;
                    }
                    if n == 0 {
                        break;
                    }
                    buf.truncate(n);
                    md5.update(&buf);
                    let msg = pb::PutObjectRequest {
                        part: Some(pb::put_object_request::Part::Chunk(buf)),
                    };
                    if tx.send(msg).await.is_err() {
                        return Ok(None);
                    }
                }
                Ok(Some(hex(&md5.finalize())))
            });
            let info = c
                .put_object(tokio_stream_from(rx))
                .await
                .map(|r| r.into_inner());
            let local = reading.await.context("reading the file")?;
            let local = local.with_context(|| format!("reading {file}"))?;
            let info = info?;
            if let Some(m) = local
                && m != info.etag
            {
                bail!(
                    "the stored ETag {} differs from the file's MD5 {m}",
                    info.etag
                );
            }
            println!(
                "upload: {file} to {target} ({} bytes, etag {})",
                info.size, info.etag
            );
        }
        ObjectsCommand::Get { source, file } => {
            let (bucket, key) = split(&source)?;
            let mut stream = c
                .get_object(pb::GetObjectRequest {
                    bucket,
                    key,
                    ..Default::default()
                })
                .await?
                .into_inner();
            let info = match stream.message().await? {
                Some(pb::GetObjectResponse {
                    part: Some(pb::get_object_response::Part::Info(i)),
                }) => i,
                _ => bail!("the server did not send the object's info first"),
            };
            let (mut out, tmp): (Box<dyn tokio::io::AsyncWrite + Unpin + Send>, _) = match &file {
                Some(f) => {
                    let tmp = format!("{f}.weir-cp-part");
                    (
                        Box::new(
                            tokio::fs::File::create(&tmp)
                                .await
                                .with_context(|| format!("creating {tmp}"))?,
                        ),
                        Some(tmp),
                    )
                }
                None => (Box::new(tokio::io::stdout()), None),
            };
            let mut md5 = Md5::new();
            let mut size = 0u64;
            while let Some(m) = stream.message().await? {
                if let Some(pb::get_object_response::Part::Chunk(c)) = m.part {
                    md5.update(&c);
                    size += c.len() as u64;
                    out.write_all(&c).await?;
                }
            }
            out.flush().await?;
            drop(out);
            if size != info.size {
                bail!("received {size} bytes of {}", info.size);
            }
            if !info.etag.contains('-') && hex(&md5.finalize()) != info.etag {
                bail!("the received bytes do not match the ETag {}", info.etag);
            }
            if let (Some(tmp), Some(f)) = (tmp, &file) {
                tokio::fs::rename(&tmp, f).await?;
                eprintln!("download: {source} to {f} ({size} bytes)");
            }
        }
        ObjectsCommand::Rm { target } => {
            let (bucket, key) = split(&target)?;
            c.delete_object(pb::DeleteObjectRequest { bucket, key })
                .await?;
            println!("delete: {target}");
        }
    }
    Ok(())
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<pb::PutObjectRequest>,
) -> impl futures::Stream<Item = pb::PutObjectRequest> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
