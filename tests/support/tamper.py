"""Damage to one object of a bucket, done through the S3 API as a meddling provider, a
compromised key or a buggy tool would do it.

Through the API, not the server's disk: ``rclone serve s3`` caches directory listings, so a
file changed behind its back is not what the next listing reports. A multipart object
(ETag ``…-N``) is damaged by another multipart upload of the same part sizes, so it keeps
an ETag that is not an MD5 and only reading the bytes back can tell it is wrong.
"""

from __future__ import annotations

from typing import Literal

from testbed.s3.endpoint import S3Endpoint

TamperKind = Literal["delete", "truncate", "corrupt"]
TAMPER_KINDS: tuple[TamperKind, ...] = ("delete", "truncate", "corrupt")


def is_multipart_etag(etag: str) -> bool:
    return "-" in etag.strip('"')


def tamper_object(
    endpoint: S3Endpoint,
    bucket: str,
    key: str,
    kind: TamperKind,
    *,
    part_size: int = 5 * 1024 * 1024,
) -> str:
    """Damage ``key`` and return one line saying how.

    - ``delete``: the object is gone;
    - ``truncate``: the first half of its bytes replaces it;
    - ``corrupt``: one byte in the middle flipped, same size; a multipart object is
      written again in parts of ``part_size`` (its ETag stays ``…-N``).
    """
    client = endpoint.client()
    if kind == "delete":
        client.delete_object(Bucket=bucket, Key=key)
        return f"deleted {key}"
    obj = client.get_object(Bucket=bucket, Key=key)
    data: bytes = obj["Body"].read()
    multipart = is_multipart_etag(obj["ETag"])
    if kind == "truncate":
        client.put_object(Bucket=bucket, Key=key, Body=data[: len(data) // 2])
        return f"truncated {key} to {len(data) // 2} of {len(data)} bytes"
    if not data:
        raise ValueError(f"cannot corrupt empty object {key}")
    at = len(data) // 2
    damaged = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]
    if not multipart:
        client.put_object(Bucket=bucket, Key=key, Body=damaged)
        return f"flipped byte {at} of {key} (single part, same size)"
    upload_id = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    parts = []
    for number, start in enumerate(range(0, len(damaged), part_size), start=1):
        resp = client.upload_part(
            Bucket=bucket,
            Key=key,
            UploadId=upload_id,
            PartNumber=number,
            Body=damaged[start : start + part_size],
        )
        parts.append({"PartNumber": number, "ETag": resp["ETag"]})
    client.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
    )
    return f"flipped byte {at} of {key} ({len(parts)} parts, same size)"
