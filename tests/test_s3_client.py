"""The SigV4 S3 client: a known-answer signature from AWS's documentation, then every call
the fleet cache makes against a real S3 server (SeaweedFS on loopback)."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import os

import pytest

from plugins.s3_cache.client import EMPTY_SHA256, S3Client, S3Error
from tests.helpers.s3 import ACCESS_KEY, Seaweed

MiB = 1 << 20


def test_signature_matches_the_aws_documented_example() -> None:
    """AWS's SigV4 example "GET Object" (examplebucket, /test.txt, Range bytes=0-9)."""
    client = S3Client(
        "https://examplebucket.s3.amazonaws.com",
        "examplebucket",
        access_key="AKIAIOSFODNN7EXAMPLE",
        secret_key="wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",  # noqa: S106 (AWS's example)
    )
    headers = client._signed_headers(
        "GET",
        "/test.txt",
        {},
        EMPTY_SHA256,
        {"Range": "bytes=0-9"},
        now=datetime.datetime(2013, 5, 24, tzinfo=datetime.UTC),
    )
    assert headers["authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    )
    asyncio.run(client.aclose())


async def test_objects_put_head_and_ranged_get(s3_bucket: S3Client) -> None:
    data = os.urandom(300_000)
    await s3_bucket.put("dir/a b+c.bin", data, {"sha256": hashlib.sha256(data).hexdigest()})
    info = await s3_bucket.head("dir/a b+c.bin")
    assert info is not None
    assert info.size == len(data)
    assert info.metadata["sha256"] == hashlib.sha256(data).hexdigest()
    assert await s3_bucket.get_bytes("dir/a b+c.bin", 1000, 1999) == data[1000:2000]
    assert await s3_bucket.get_bytes("dir/a b+c.bin", 299_990) == data[299_990:]
    assert await s3_bucket.get_bytes("dir/a b+c.bin") == data
    assert await s3_bucket.head("missing") is None
    await s3_bucket.delete("dir/a b+c.bin")
    assert await s3_bucket.head("dir/a b+c.bin") is None


async def test_a_multipart_upload_lists_its_parts_and_completes(s3_bucket: S3Client) -> None:
    parts_data = [os.urandom(5 * MiB), os.urandom(5 * MiB), os.urandom(123_456)]
    upload = await s3_bucket.create_multipart("big.bin")
    etags = {}
    for number in (1, 3):  # out of order, and one missing: what a takeover finds
        etags[number] = await s3_bucket.upload_part(
            "big.bin", upload, number, parts_data[number - 1]
        )
    listed = await s3_bucket.list_parts("big.bin", upload)
    assert [(p.number, p.size) for p in listed] == [(1, 5 * MiB), (3, 123_456)]
    assert [p.etag for p in listed] == [etags[1], etags[3]]
    assert await s3_bucket.head("big.bin") is None  # not visible before completion
    await s3_bucket.upload_part("big.bin", upload, 2, parts_data[1])
    await s3_bucket.complete_multipart(
        "big.bin", upload, await s3_bucket.list_parts("big.bin", upload)
    )
    whole = b"".join(parts_data)
    info = await s3_bucket.head("big.bin")
    assert info is not None
    assert info.size == len(whole)
    assert (
        await s3_bucket.get_bytes("big.bin", 5 * MiB - 10, 5 * MiB + 9)
        == whole[5 * MiB - 10 : 5 * MiB + 10]
    )
    assert (
        hashlib.sha256(await s3_bucket.get_bytes("big.bin")).digest()
        == hashlib.sha256(whole).digest()
    )


async def test_an_aborted_upload_is_gone(s3_bucket: S3Client) -> None:
    upload = await s3_bucket.create_multipart("gone.bin")
    await s3_bucket.upload_part("gone.bin", upload, 1, b"x" * 1000)
    await s3_bucket.abort_multipart("gone.bin", upload)
    with pytest.raises(S3Error) as caught:
        await s3_bucket.list_parts("gone.bin", upload)
    assert caught.value.status == 404
    assert not caught.value.transient
    await s3_bucket.abort_multipart("gone.bin", upload)  # twice is fine


async def test_a_wrong_secret_is_refused_and_not_retried(
    seaweed: Seaweed, s3_bucket: S3Client
) -> None:
    bad = S3Client(seaweed.endpoint, s3_bucket.bucket, access_key=ACCESS_KEY, secret_key="wrong")
    try:
        with pytest.raises(S3Error) as caught:
            await bad.put("x", b"1")
        assert caught.value.status == 403
        assert not caught.value.transient
    finally:
        await bad.aclose()


async def test_an_unreachable_endpoint_is_transient() -> None:
    client = S3Client("http://127.0.0.1:9", "b", access_key="a", secret_key="s")  # noqa: S106
    try:
        with pytest.raises(S3Error) as caught:
            await client.head("x")
        assert caught.value.transient
    finally:
        await client.aclose()
