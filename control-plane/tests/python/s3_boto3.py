"""boto3 against weir-cp's S3 endpoint. Usage: s3_boto3.py ENDPOINT ACCESS_KEY SECRET.

Prints "OK <n>" after every check passed; any failure raises (non-zero exit)."""
import hashlib
import io
import sys

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError

endpoint, ak, sk = sys.argv[1], sys.argv[2], sys.argv[3]


def client(secret):
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ak,
        aws_secret_access_key=secret,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


s3 = client(sk)
checks = 0


def check(cond, what):
    global checks
    if not cond:
        raise AssertionError(what)
    checks += 1


s3.create_bucket(Bucket="boto")
try:
    s3.create_bucket(Bucket="boto")
    raise AssertionError("second create_bucket succeeded")
except ClientError as e:
    check(e.response["Error"]["Code"] == "BucketAlreadyOwnedByYou", e.response)
check("boto" in [b["Name"] for b in s3.list_buckets()["Buckets"]], "list_buckets")

body = bytes(range(256)) * 40
r = s3.put_object(Bucket="boto", Key="dir/obj.bin", Body=body, ContentType="application/x-test",
                  Metadata={"color": "blue"})
check(r["ETag"].strip('"') == hashlib.md5(body).hexdigest(), "put etag")
g = s3.get_object(Bucket="boto", Key="dir/obj.bin")
check(g["Body"].read() == body, "get body")
check(g["ContentType"] == "application/x-test", "content type")
check(g["Metadata"] == {"color": "blue"}, g["Metadata"])
g = s3.get_object(Bucket="boto", Key="dir/obj.bin", Range="bytes=10-19")
check(g["Body"].read() == body[10:20], "range body")
check(g["ContentRange"] == "bytes 10-19/%d" % len(body), g["ContentRange"])
g = s3.get_object(Bucket="boto", Key="dir/obj.bin", Range="bytes=-5")
check(g["Body"].read() == body[-5:], "suffix range")
h = s3.head_object(Bucket="boto", Key="dir/obj.bin")
check(h["ContentLength"] == len(body), "head length")
try:
    s3.get_object(Bucket="boto", Key="dir/obj.bin", IfMatch='"nope"')
    raise AssertionError("If-Match passed")
except ClientError as e:
    check(e.response["ResponseMetadata"]["HTTPStatusCode"] == 412, e.response)
try:
    s3.get_object(Bucket="boto", Key="missing")
    raise AssertionError("missing key found")
except ClientError as e:
    check(e.response["Error"]["Code"] == "NoSuchKey", e.response)

# Listing with a delimiter and pagination.
for k in ["a/1", "a/2", "b/1", "c", "d", "e & f<g>"]:
    s3.put_object(Bucket="boto", Key=k, Body=k.encode())
r = s3.list_objects_v2(Bucket="boto", Delimiter="/")
check([p["Prefix"] for p in r["CommonPrefixes"]] == ["a/", "b/", "dir/"], r.get("CommonPrefixes"))
check([o["Key"] for o in r["Contents"]] == ["c", "d", "e & f<g>"], r.get("Contents"))
seen = []
pages = 0
for page in s3.get_paginator("list_objects_v2").paginate(Bucket="boto", PaginationConfig={"PageSize": 2}):
    pages += 1
    check(page["KeyCount"] <= 2, page["KeyCount"])
    seen += [o["Key"] for o in page.get("Contents", [])]
check(seen == ["a/1", "a/2", "b/1", "c", "d", "dir/obj.bin", "e & f<g>"], seen)
check(pages == 4, pages)

# ListObjects (v1): markers, NextMarker on a common prefix, the same pages as v2.
r = s3.list_objects(Bucket="boto", Delimiter="/")
check([p["Prefix"] for p in r["CommonPrefixes"]] == ["a/", "b/", "dir/"], r.get("CommonPrefixes"))
check([o["Key"] for o in r["Contents"]] == ["c", "d", "e & f<g>"], r.get("Contents"))
seen, prefixes, pages = [], [], 0
for page in s3.get_paginator("list_objects").paginate(Bucket="boto", Delimiter="/",
                                                      PaginationConfig={"PageSize": 2}):
    pages += 1
    seen += [o["Key"] for o in page.get("Contents", [])]
    prefixes += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
check(prefixes == ["a/", "b/", "dir/"], prefixes)
check(seen == ["c", "d", "e & f<g>"], seen)
check(pages == 3, pages)
r = s3.list_objects(Bucket="boto", Marker="c", MaxKeys=2)
check([o["Key"] for o in r["Contents"]] == ["d", "dir/obj.bin"] and r["IsTruncated"], r)

# CopyObject: metadata kept (COPY) or replaced (REPLACE); conditions on the source.
r = s3.copy_object(Bucket="boto", Key="copy.bin", CopySource={"Bucket": "boto", "Key": "dir/obj.bin"})
check(r["CopyObjectResult"]["ETag"].strip('"') == hashlib.md5(body).hexdigest(), r)
g = s3.get_object(Bucket="boto", Key="copy.bin")
check(g["Body"].read() == body and g["Metadata"] == {"color": "blue"}, "copy keeps metadata")
check(g["ContentType"] == "application/x-test", g["ContentType"])
s3.copy_object(Bucket="boto", Key="copy.bin", CopySource="boto/copy.bin",
               MetadataDirective="REPLACE", Metadata={"color": "red"}, ContentType="text/plain")
h = s3.head_object(Bucket="boto", Key="copy.bin")
check(h["Metadata"] == {"color": "red"} and h["ContentType"] == "text/plain", h)
for kwargs, code in [({"Key": "other.bin", "CopySourceIfMatch": '"nope"'}, 412),
                     ({"Key": "copy.bin"}, 400)]:
    try:
        s3.copy_object(Bucket="boto", CopySource="boto/copy.bin", **kwargs)
        raise AssertionError("copy onto itself / failed condition accepted")
    except ClientError as e:
        check(e.response["ResponseMetadata"]["HTTPStatusCode"] == code, e.response)

# DeleteObjects: deleted, missing keys count as deleted, quiet mode lists nothing.
for k in ["del/1", "del/2", "del/3"]:
    s3.put_object(Bucket="boto", Key=k, Body=b"x")
r = s3.delete_objects(Bucket="boto", Delete={"Objects": [{"Key": "del/1"}, {"Key": "del/2"},
                                                           {"Key": "del/missing"}]})
check(sorted(d["Key"] for d in r["Deleted"]) == ["del/1", "del/2", "del/missing"], r)
check(not r.get("Errors"), r)
r = s3.delete_objects(Bucket="boto", Delete={"Objects": [{"Key": "del/3"}], "Quiet": True})
check(not r.get("Deleted") and not r.get("Errors"), r)
check("Contents" not in s3.list_objects_v2(Bucket="boto", Prefix="del/"), "del/ emptied")

# Multipart via upload_fileobj with a small threshold: 3 parts of 5 MiB, 5 MiB, 1 MiB.
big = hashlib.sha256(b"seed").digest() * (11 * 1024 * 1024 // 32)
cfg = TransferConfig(multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024,
                     max_concurrency=2)
s3.upload_fileobj(io.BytesIO(big), "boto", "big.bin", Config=cfg)
h = s3.head_object(Bucket="boto", Key="big.bin")
check(h["ContentLength"] == len(big), "multipart size")
parts = [big[i:i + 5 * 1024 * 1024] for i in range(0, len(big), 5 * 1024 * 1024)]
want = hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest() + "-%d" % len(parts)
check(h["ETag"].strip('"') == want, (h["ETag"], want))
out = io.BytesIO()
s3.download_fileobj("boto", "big.bin", out)
check(out.getvalue() == big, "multipart download")

# A managed copy over the multipart threshold: UploadPartCopy with source ranges.
s3.copy({"Bucket": "boto", "Key": "big.bin"}, "boto", "big-copy.bin", Config=cfg)
out = io.BytesIO()
s3.download_fileobj("boto", "big-copy.bin", out)
check(out.getvalue() == big, "multipart copy")
h = s3.head_object(Bucket="boto", Key="big-copy.bin")
check(h["ETag"].endswith('-%d"' % len(parts)), h["ETag"])

# Wrong secret: 403 SignatureDoesNotMatch, nothing written.
bad = client(sk + "x")
try:
    bad.put_object(Bucket="boto", Key="evil", Body=b"x")
    raise AssertionError("wrong secret accepted")
except ClientError as e:
    check(e.response["Error"]["Code"] == "SignatureDoesNotMatch", e.response)
    check(e.response["ResponseMetadata"]["HTTPStatusCode"] == 403, e.response)
try:
    s3.head_object(Bucket="boto", Key="evil")
    raise AssertionError("evil was written")
except ClientError as e:
    check(e.response["ResponseMetadata"]["HTTPStatusCode"] == 404, e.response)

# Delete everything, then the bucket.
try:
    s3.delete_bucket(Bucket="boto")
    raise AssertionError("deleted a non-empty bucket")
except ClientError as e:
    check(e.response["Error"]["Code"] == "BucketNotEmpty", e.response)
for o in s3.list_objects_v2(Bucket="boto")["Contents"]:
    s3.delete_object(Bucket="boto", Key=o["Key"])
s3.delete_bucket(Bucket="boto")
check("boto" not in [b["Name"] for b in s3.list_buckets()["Buckets"]], "bucket deleted")
print("OK", checks)
