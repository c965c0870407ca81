"""S3 smoke test against the test bed's radosgw: object-store.sh check.

Environment: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_REGION.
Arguments: BUCKET PREFIX. Prints one line per check: PASS/FAIL/INFO.
"""

import hashlib
import os
import sys
import time

import boto3
import botocore.config
import botocore.exceptions

bucket, prefix = sys.argv[1], sys.argv[2].strip("/")
s3 = boto3.client(
    "s3",
    endpoint_url=os.environ["AWS_ENDPOINT_URL"],
    region_name=os.environ.get("AWS_REGION", "us-east-1"),
    config=botocore.config.Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
)
MiB = 1 << 20
failed = 0


def report(ok, what):
    global failed
    if ok is None:
        print(f"INFO {what}", flush=True)
        return
    if not ok:
        failed += 1
    print(f"{'PASS' if ok else 'FAIL'} {what}", flush=True)


def status_of(fn, **kw):
    """HTTP status of a call: 200 or the error's status."""
    try:
        fn(**kw)
        return 200
    except botocore.exceptions.ClientError as e:
        return e.response["ResponseMetadata"]["HTTPStatusCode"], e.response["Error"].get("Code")


def key(name):
    return f"{prefix}/check/{name}"


# 1. 64 MiB single PUT and GET, three rounds
blob = os.urandom(64 * MiB)
digest = hashlib.sha256(blob).hexdigest()
for round_ in range(1, 4):
    t = time.monotonic()
    s3.put_object(Bucket=bucket, Key=key("big"), Body=blob)
    dt = time.monotonic() - t
    t = time.monotonic()
    got = s3.get_object(Bucket=bucket, Key=key("big"))["Body"].read()
    dg = time.monotonic() - t
    report(
        hashlib.sha256(got).hexdigest() == digest,
        f"round {round_}: PUT 64 MiB (single request) {dt:.2f}s = {64 / dt:.0f} MiB/s; "
        f"GET {dg:.2f}s = {64 / dg:.0f} MiB/s, content identical",
    )
rng = s3.get_object(Bucket=bucket, Key=key("big"), Range="bytes=1048576-1048591")["Body"].read()
report(rng == blob[MiB : MiB + 16], "ranged GET")

# 2. conditional writes
k = key("cond")
s3.delete_object(Bucket=bucket, Key=k)
st = status_of(s3.put_object, Bucket=bucket, Key=k, Body=b"first", IfNoneMatch="*")
report(st == 200, f"PUT If-None-Match:* on a missing key -> {st}")
st = status_of(s3.put_object, Bucket=bucket, Key=k, Body=b"second", IfNoneMatch="*")
report(st[0] == 412 if isinstance(st, tuple) else False, f"PUT If-None-Match:* on an existing key -> {st}")
body = s3.get_object(Bucket=bucket, Key=k)["Body"].read()
report(body == b"first", f"existing object kept after the refused PUT: {body!r}")
etag = s3.head_object(Bucket=bucket, Key=k)["ETag"]
st = status_of(s3.put_object, Bucket=bucket, Key=k, Body=b"third", IfMatch='"0123456789abcdef0123456789abcdef"')
report(None, f"PUT If-Match:<wrong etag> -> {st}")
st = status_of(s3.put_object, Bucket=bucket, Key=k, Body=b"third", IfMatch=etag)
report(None, f"PUT If-Match:<current etag, quoted as S3 sends it: {etag}> -> {st}")
st = status_of(s3.put_object, Bucket=bucket, Key=k, Body=b"fourth", IfMatch=etag.strip('"'))
report(None, f"PUT If-Match:<current etag, unquoted> -> {st}")
body = s3.get_object(Bucket=bucket, Key=k)["Body"].read()
report(None, f"object after the If-Match PUTs: {body!r}")
etag = s3.head_object(Bucket=bucket, Key=k)["ETag"]
st = status_of(s3.put_object, Bucket=bucket, Key=k, Body=b"fifth", IfNoneMatch=etag)
report(None, f"PUT If-None-Match:<current etag, quoted> -> {st}")
st = status_of(s3.get_object, Bucket=bucket, Key=k, IfNoneMatch=s3.head_object(Bucket=bucket, Key=k)["ETag"])
report(None, f"GET If-None-Match:<current etag> -> {st}")
st = status_of(s3.get_object, Bucket=bucket, Key=k, IfMatch=s3.head_object(Bucket=bucket, Key=k)["ETag"])
report(None, f"GET If-Match:<current etag> -> {st}")

# 3. multipart upload
k = key("multi")
s3.delete_object(Bucket=bucket, Key=k)
parts_data = [os.urandom(8 * MiB), os.urandom(8 * MiB), os.urandom(1 * MiB)]
t = time.monotonic()
up = s3.create_multipart_upload(Bucket=bucket, Key=k)
parts = []
for n, data in enumerate(parts_data, 1):
    r = s3.upload_part(Bucket=bucket, Key=k, UploadId=up["UploadId"], PartNumber=n, Body=data)
    parts.append({"PartNumber": n, "ETag": r["ETag"]})
s3.complete_multipart_upload(Bucket=bucket, Key=k, UploadId=up["UploadId"], MultipartUpload={"Parts": parts})
dt = time.monotonic() - t
got = s3.get_object(Bucket=bucket, Key=k)["Body"].read()
report(
    got == b"".join(parts_data),
    f"multipart upload 3 parts (8+8+1 MiB) in {dt:.2f}s, read back identical, "
    f"etag {s3.head_object(Bucket=bucket, Key=k)['ETag']}",
)
# conditional completion (S3 added If-None-Match on CompleteMultipartUpload in 2024)
up = s3.create_multipart_upload(Bucket=bucket, Key=k)
r = s3.upload_part(Bucket=bucket, Key=k, UploadId=up["UploadId"], PartNumber=1, Body=b"x" * MiB)
st = status_of(
    s3.complete_multipart_upload,
    Bucket=bucket,
    Key=k,
    UploadId=up["UploadId"],
    MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": r["ETag"]}]},
    IfNoneMatch="*",
)
size = s3.head_object(Bucket=bucket, Key=k)["ContentLength"]
report(None, f"CompleteMultipartUpload If-None-Match:* on an existing key -> {st}; object size now {size}")
try:
    s3.abort_multipart_upload(Bucket=bucket, Key=k, UploadId=up["UploadId"])
except botocore.exceptions.ClientError:
    pass
# upload_fileobj (boto3's managed transfer: multipart, concurrent parts) of 64 MiB
import io  # noqa: E402

t = time.monotonic()
s3.upload_fileobj(io.BytesIO(blob), bucket, key("managed"))
dt = time.monotonic() - t
report(True, f"boto3 upload_fileobj 64 MiB (8 MiB parts, 10 threads): {dt:.2f}s = {64 / dt:.0f} MiB/s")

# 4. listing, delete
names = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=key(""))["Contents"]]
report(len(names) == 4, f"ListObjectsV2 under {key('')}: {names}")
s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": n} for n in names]})
left = s3.list_objects_v2(Bucket=bucket, Prefix=key("")).get("KeyCount")
report(left == 0, f"DeleteObjects: {left} left")
print(f"{failed} failed")
sys.exit(1 if failed else 0)
