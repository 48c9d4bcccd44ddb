"""A small S3 client over httpx, signed with AWS Signature Version 4.

Only what the fleet cache needs: HEAD and ranged GET of an object, the multipart upload
calls (create, upload part, list parts, complete, abort), plus put/delete of small objects and
bucket creation (for tests and setup). Path-style addressing (``endpoint/bucket/key``), which
AWS S3, MinIO, Ceph RGW and SeaweedFS all accept. Payloads are signed with their SHA-256 (no
``UNSIGNED-PAYLOAD``), so every S3 implementation checks the bytes it stores.

Errors: ``S3Error`` carries the HTTP status and S3's error code; ``transient`` is true for
throttling, 5xx and network faults, which a caller may retry.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import hmac
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

import httpx

__all__ = ["ObjectInfo", "Part", "S3Client", "S3Error"]

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


class S3Error(Exception):
    def __init__(self, message: str, *, status: int = 0, code: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code

    @property
    def transient(self) -> bool:
        return self.status == 0 or self.status >= 500 or self.status in (408, 429)


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    etag: str
    metadata: dict[str, str]


@dataclass(frozen=True)
class Part:
    number: int
    etag: str
    size: int


def _uri_encode(text: str, *, keep_slash: bool = False) -> str:
    return quote(text, safe="-_.~/" if keep_slash else "-_.~")


def _find(element: ET.Element, name: str) -> str:
    found = element.find(_NS + name)
    if found is None:
        found = element.find(name)
    return (found.text or "") if found is not None else ""


def _findall(element: ET.Element, name: str) -> list[ET.Element]:
    return element.findall(_NS + name) or element.findall(name)


class S3Client:
    def __init__(
        self,
        endpoint: str,
        bucket: str,
        *,
        access_key: str,
        secret_key: str,
        region: str = "us-east-1",
        timeout: float = 60.0,
    ) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.bucket = bucket
        self.region = region
        self._access_key = access_key
        self._secret_key = secret_key
        self._host = urlsplit(self.endpoint).netloc
        self._base_path = urlsplit(self.endpoint).path.rstrip("/")
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=10.0))

    async def aclose(self) -> None:
        await self._http.aclose()

    # --- signing -----------------------------------------------------------------------------

    def _signed_headers(
        self,
        method: str,
        path: str,
        query: Mapping[str, str],
        payload_sha256: str,
        extra: Mapping[str, str],
        now: datetime.datetime | None = None,
    ) -> dict[str, str]:
        now = now or datetime.datetime.now(datetime.UTC)
        amz_date = now.strftime("%Y%m%dT%H%M%SZ")
        day = amz_date[:8]
        headers = {
            "host": self._host,
            "x-amz-content-sha256": payload_sha256,
            "x-amz-date": amz_date,
            **{k.lower(): v.strip() for k, v in extra.items()},
        }
        names = sorted(headers)
        canonical_query = "&".join(
            f"{_uri_encode(k)}={_uri_encode(v)}" for k, v in sorted(query.items())
        )
        canonical = "\n".join(
            [
                method,
                _uri_encode(path, keep_slash=True),
                canonical_query,
                "".join(f"{name}:{headers[name]}\n" for name in names),
                ";".join(names),
                payload_sha256,
            ]
        )
        scope = f"{day}/{self.region}/s3/aws4_request"
        to_sign = "\n".join(
            ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
        )
        key = f"AWS4{self._secret_key}".encode()
        for part in (day, self.region, "s3", "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        headers["authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={self._access_key}/{scope}, "
            f"SignedHeaders={';'.join(names)}, Signature={signature}"
        )
        del headers["host"]  # httpx sends the same value
        return headers

    def _path(self, key: str | None) -> str:
        return f"{self._base_path}/{self.bucket}" + (f"/{key}" if key is not None else "")

    def _request(
        self,
        method: str,
        key: str | None,
        *,
        query: Mapping[str, str] | None = None,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        body_sha256: str | None = None,
    ) -> httpx.Request:
        query = dict(query or {})
        path = self._path(key)
        if body_sha256 is None:
            body_sha256 = hashlib.sha256(body).hexdigest() if body else EMPTY_SHA256
        signed = self._signed_headers(method, path, query, body_sha256, headers or {})
        url = self.endpoint[: len(self.endpoint) - len(self._base_path)] + _uri_encode(
            path, keep_slash=True
        )
        if query:
            url += "?" + "&".join(
                f"{_uri_encode(k)}={_uri_encode(v)}" if v else _uri_encode(k)
                for k, v in sorted(query.items())
            )
        return self._http.build_request(method, url, content=body or None, headers=signed)

    async def _send(self, request: httpx.Request, *, stream: bool = False) -> httpx.Response:
        try:
            response = await self._http.send(request, stream=stream)
        except httpx.HTTPError as exc:
            raise S3Error(f"S3 request failed: {exc!r}") from exc
        if response.status_code >= 300:
            text = (await response.aread()).decode(errors="replace")
            await response.aclose()
            code = ""
            message = text[:300] or response.reason_phrase
            if text.startswith("<"):
                try:
                    root = ET.fromstring(text)  # noqa: S314
                    code, message = _find(root, "Code"), _find(root, "Message") or message
                except ET.ParseError:
                    pass
            raise S3Error(
                f"S3 {request.method} {request.url.path} failed: {response.status_code} "
                f"{code} {message}".strip(),
                status=response.status_code,
                code=code,
            )
        return response

    async def _xml(self, request: httpx.Request) -> ET.Element:
        response = await self._send(request)
        try:
            return ET.fromstring(response.content)  # noqa: S314
        except ET.ParseError as exc:
            raise S3Error(
                f"S3 answered with unreadable XML: {exc}", status=response.status_code
            ) from exc

    # --- objects -------------------------------------------------------------------------------

    async def create_bucket(self) -> None:
        try:
            await self._send(self._request("PUT", None))
        except S3Error as exc:
            if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    async def head(self, key: str) -> ObjectInfo | None:
        try:
            response = await self._send(self._request("HEAD", key))
        except S3Error as exc:
            if exc.status == 404:
                return None
            raise
        meta = {
            k[len("x-amz-meta-") :]: v
            for k, v in response.headers.items()
            if k.lower().startswith("x-amz-meta-")
        }
        return ObjectInfo(
            size=int(response.headers.get("content-length", "0")),
            etag=response.headers.get("etag", "").strip('"'),
            metadata=meta,
        )

    async def get(self, key: str, start: int = 0, end: int | None = None) -> httpx.Response:
        """A streaming response for bytes ``start``..``end`` (inclusive; None = to the end).
        The caller reads it (``aiter_bytes``) and closes it."""
        headers = {"range": f"bytes={start}-{'' if end is None else end}"} if start or end else {}
        return await self._send(self._request("GET", key, headers=headers), stream=True)

    async def get_bytes(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        response = await self.get(key, start, end)
        try:
            return await response.aread()
        finally:
            await response.aclose()

    async def put(self, key: str, data: bytes, metadata: Mapping[str, str] | None = None) -> str:
        headers = {f"x-amz-meta-{k}": v for k, v in (metadata or {}).items()}
        response = await self._send(self._request("PUT", key, body=data, headers=headers))
        return str(response.headers.get("etag", "")).strip('"')

    async def delete(self, key: str) -> None:
        await self._send(self._request("DELETE", key))

    # --- multipart upload ------------------------------------------------------------------------

    async def create_multipart(self, key: str, metadata: Mapping[str, str] | None = None) -> str:
        headers = {f"x-amz-meta-{k}": v for k, v in (metadata or {}).items()}
        root = await self._xml(self._request("POST", key, query={"uploads": ""}, headers=headers))
        upload_id = _find(root, "UploadId")
        if not upload_id:
            raise S3Error("S3 created a multipart upload without an UploadId.")
        return upload_id

    async def upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> str:
        # Hashing a part (16 MiB by default) takes tens of milliseconds: not in the event loop.
        digest = await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())
        query = {"partNumber": str(number), "uploadId": upload_id}
        response = await self._send(
            self._request("PUT", key, query=query, body=data, body_sha256=digest)
        )
        return str(response.headers.get("etag", "")).strip('"')

    async def list_parts(self, key: str, upload_id: str) -> list[Part]:
        parts: list[Part] = []
        marker = ""
        while True:
            query = {"uploadId": upload_id}
            if marker:
                query["part-number-marker"] = marker
            root = await self._xml(self._request("GET", key, query=query))
            for element in _findall(root, "Part"):
                parts.append(
                    Part(
                        number=int(_find(element, "PartNumber")),
                        etag=_find(element, "ETag").strip('"'),
                        size=int(_find(element, "Size") or 0),
                    )
                )
            if _find(root, "IsTruncated").lower() != "true":
                return sorted(parts, key=lambda p: p.number)
            marker = _find(root, "NextPartNumberMarker")
            if not marker:
                return sorted(parts, key=lambda p: p.number)

    async def complete_multipart(self, key: str, upload_id: str, parts: list[Part]) -> str:
        body = (
            "<CompleteMultipartUpload>"
            + "".join(
                f'<Part><PartNumber>{p.number}</PartNumber><ETag>"{p.etag}"</ETag></Part>'
                for p in sorted(parts, key=lambda p: p.number)
            )
            + "</CompleteMultipartUpload>"
        )
        root = await self._xml(
            self._request("POST", key, query={"uploadId": upload_id}, body=body.encode())
        )
        if root.tag.endswith("Error"):  # S3 may answer 200 with an error document
            raise S3Error(
                f"S3 could not complete the upload: {_find(root, 'Code')} {_find(root, 'Message')}",
                status=200,
                code=_find(root, "Code"),
            )
        return _find(root, "ETag").strip('"')

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        try:
            await self._send(self._request("DELETE", key, query={"uploadId": upload_id}))
        except S3Error as exc:
            if exc.status != 404:
                raise


async def iterate(response: httpx.Response, chunk: int = 1 << 20) -> AsyncIterator[bytes]:
    """The body of a streaming response, closed at the end."""
    try:
        async for data in response.aiter_bytes(chunk):
            yield data
    finally:
        await response.aclose()
