"""Object stores: `file:///path` (a local directory, the embedded default) and
`s3://bucket/prefix` (boto3; AWS S3, MinIO, R2, moto).

Keys are relative, slash-separated and validated: no `..`, no absolute paths,
no backslashes or control characters. Nothing is ever written outside the root.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

_KEY_PART = re.compile(r"^[A-Za-z0-9._=+@-]+$")


class StoreError(Exception):
    pass


class AlreadyExists(StoreError):
    """A write-once put found the key already there."""


class NotFound(StoreError, FileNotFoundError):
    pass


def validate_key(key: str) -> str:
    if not isinstance(key, str) or not key or len(key) > 1024:
        raise ValueError(f"invalid storage key {key!r}")
    if key.startswith("/") or "\\" in key:
        raise ValueError(f"invalid storage key {key!r}: must be relative with '/' separators")
    for part in key.split("/"):
        if part in ("", ".", "..") or not _KEY_PART.match(part):
            raise ValueError(f"invalid storage key {key!r}: bad component {part!r}")
    return key


class Store:
    """Minimal object-store interface; keys are validated by every method."""

    url: str

    def put_bytes(self, key: str, data: bytes, *, if_none_match: bool = False) -> None:
        raise NotImplementedError

    def put_file(self, key: str, path: str, *, if_none_match: bool = False) -> None:
        raise NotImplementedError

    def get_bytes(self, key: str) -> bytes:
        raise NotImplementedError

    def get_file(self, key: str, path: str) -> None:
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def list(self, prefix: str) -> list[str]:
        """Keys under `prefix` (a folder, no trailing slash needed), sorted."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def uri(self, key: str) -> str:
        raise NotImplementedError

    def presign(self, key: str, expires: int = 3600) -> str:
        raise StoreError(f"presigned URLs need an S3 store; {self.url.split('://')[0]}:// stores have none "
                         "(read the files directly, or use --store s3://bucket/prefix)")


def multipart_threshold() -> int:
    return int(os.environ.get("PREFIXQ_S3_MULTIPART_BYTES", str(64 << 20)))


def multipart_part() -> int:
    return max(5 << 20, int(os.environ.get("PREFIXQ_S3_PART_BYTES", str(16 << 20))))


def sse_args() -> dict:
    """S3 server-side encryption from PREFIXQ_S3_SSE (AES256 | aws:kms) and
    PREFIXQ_S3_SSE_KMS_KEY_ID, passed on every put and multipart create."""
    mode = os.environ.get("PREFIXQ_S3_SSE", "").strip()
    if not mode:
        return {}
    if mode not in ("AES256", "aws:kms", "aws:kms:dsse"):
        raise ValueError(f"PREFIXQ_S3_SSE must be AES256, aws:kms or aws:kms:dsse, got {mode!r}")
    out = {"ServerSideEncryption": mode}
    kms = os.environ.get("PREFIXQ_S3_SSE_KMS_KEY_ID", "").strip()
    if kms:
        if not mode.startswith("aws:kms"):
            raise ValueError("PREFIXQ_S3_SSE_KMS_KEY_ID needs PREFIXQ_S3_SSE=aws:kms")
        out["SSEKMSKeyId"] = kms
    return out


class LocalStore(Store):
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = "file://" + str(self.root)

    def _path(self, key: str) -> Path:
        validate_key(key)
        p = (self.root / key).resolve()
        if self.root != p and self.root not in p.parents:
            raise ValueError(f"storage key {key!r} escapes the store root")
        return p

    def _write(self, key: str, writer, if_none_match: bool) -> None:
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                writer(f)
            if if_none_match:
                try:
                    os.link(tmp, p)  # atomic create-if-absent
                except FileExistsError:
                    raise AlreadyExists(key) from None
                os.unlink(tmp)
            else:
                os.replace(tmp, p)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def put_bytes(self, key, data, *, if_none_match=False):
        self._write(key, lambda f: f.write(data), if_none_match)

    def put_file(self, key, path, *, if_none_match=False):
        def w(f):
            with open(path, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 20)
        self._write(key, w, if_none_match)

    def get_bytes(self, key):
        p = self._path(key)
        if not p.is_file():
            raise NotFound(key)
        return p.read_bytes()

    def get_file(self, key, path):
        p = self._path(key)
        if not p.is_file():
            raise NotFound(key)
        shutil.copyfile(p, path)

    def exists(self, key):
        return self._path(key).is_file()

    def list(self, prefix):
        base = self._path(prefix.rstrip("/"))
        if not base.is_dir():
            return []
        out = []
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith(".tmp-"):
                    continue
                out.append(str(Path(dirpath, name).relative_to(self.root)).replace(os.sep, "/"))
        return sorted(out)

    def delete(self, key):
        p = self._path(key)
        if p.is_file():
            p.unlink()

    def uri(self, key):
        return str(self._path(key))


class S3Store(Store):
    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 region: str | None = None, access_key: str | None = None, secret_key: str | None = None,
                 session_token: str | None = None, client=None):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            validate_key(self.prefix)
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.endpoint_url = endpoint_url or os.environ.get("PREFIXQ_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL") or None
        if client is None:
            cfg = Config(
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                retries={"mode": os.environ.get("PREFIXQ_S3_RETRY_MODE", "standard"),
                         "max_attempts": int(os.environ.get("PREFIXQ_S3_MAX_ATTEMPTS", "5"))},
                connect_timeout=float(os.environ.get("PREFIXQ_S3_CONNECT_TIMEOUT", "10")),
                read_timeout=float(os.environ.get("PREFIXQ_S3_READ_TIMEOUT", "60")),
            )
            client = boto3.client(
                "s3",
                endpoint_url=self.endpoint_url,
                region_name=region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
                aws_access_key_id=access_key,
                aws_secret_access_key=secret_key,
                aws_session_token=session_token,
                config=cfg,
            )
        self.client = client
        self.sse = sse_args()

    def _k(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _put(self, key, body, if_none_match):
        from botocore.exceptions import ClientError
        kw = {"Bucket": self.bucket, "Key": self._k(key), "Body": body, **self.sse}
        if if_none_match:
            kw["IfNoneMatch"] = "*"
        try:
            self.client.put_object(**kw)
        except ClientError as e:
            self._raise_exists(e, key, if_none_match)
            raise

    @staticmethod
    def _raise_exists(e, key: str, if_none_match: bool) -> None:
        code = e.response.get("Error", {}).get("Code", "")
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if if_none_match and (code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)):
            raise AlreadyExists(key) from None

    def put_bytes(self, key, data, *, if_none_match=False):
        self._put(key, data, if_none_match)

    def put_file(self, key, path, *, if_none_match=False):
        if os.path.getsize(path) > multipart_threshold():
            return self._put_multipart(key, path, if_none_match)
        with open(path, "rb") as f:
            self._put(key, f, if_none_match)

    def _put_multipart(self, key: str, path: str, if_none_match: bool) -> None:
        """Large objects (final results of big jobs): multipart, with SSE on create and
        If-None-Match on complete, so the write-once guarantee holds at any size."""
        from botocore.exceptions import ClientError
        k = self._k(key)
        up = self.client.create_multipart_upload(Bucket=self.bucket, Key=k, **self.sse)["UploadId"]
        try:
            parts = []
            with open(path, "rb") as f:
                n = 1
                while chunk := f.read(multipart_part()):
                    etag = self.client.upload_part(Bucket=self.bucket, Key=k, UploadId=up, PartNumber=n,
                                                   Body=chunk)["ETag"]
                    parts.append({"ETag": etag, "PartNumber": n})
                    n += 1
            kw = {"IfNoneMatch": "*"} if if_none_match else {}
            try:
                self.client.complete_multipart_upload(Bucket=self.bucket, Key=k, UploadId=up,
                                                      MultipartUpload={"Parts": parts}, **kw)
            except ClientError as e:
                self._raise_exists(e, key, if_none_match)
                raise
        except BaseException:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=k, UploadId=up)
            except Exception:  # noqa: BLE001 - the lifecycle rule cleans up what this misses
                pass
            raise

    def presign(self, key: str, expires: int = 3600) -> str:
        return self.client.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": self._k(key)},
                                                  ExpiresIn=int(expires))

    def get_bytes(self, key):
        from botocore.exceptions import ClientError
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._k(key))["Body"].read()
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise NotFound(key) from None
            raise

    def get_file(self, key, path):
        from botocore.exceptions import ClientError
        try:
            self.client.download_file(self.bucket, self._k(key), path)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise NotFound(key) from None
            raise

    def exists(self, key):
        from botocore.exceptions import ClientError
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._k(key))
            return True
        except ClientError as e:
            if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return False
            raise

    def list(self, prefix):
        full = self._k(prefix.rstrip("/")) + "/"
        strip = len(self.prefix) + 1 if self.prefix else 0
        out = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            for obj in page.get("Contents", []):
                out.append(obj["Key"][strip:])
        return sorted(out)

    def delete(self, key):
        self.client.delete_object(Bucket=self.bucket, Key=self._k(key))

    def uri(self, key):
        return f"s3://{self.bucket}/{self._k(key)}"


def default_store_url() -> str:
    """PREFIXQ_STORE_URL (what infra/ sets), else PREFIXQ_STORE, else ./.prefixq/store."""
    return (os.environ.get("PREFIXQ_STORE_URL") or os.environ.get("PREFIXQ_STORE")
            or "file://" + str(Path.cwd() / ".prefixq" / "store"))


def open_store(url: str | None = None) -> Store:
    url = url or default_store_url()
    u = urlparse(url)
    if "@" in u.netloc:
        # never echo the URL: it would put the credentials in the error, logs and job records
        raise ValueError(f"store URL for {u.scheme}:// must not carry credentials; use AWS_ACCESS_KEY_ID / "
                         "AWS_SECRET_ACCESS_KEY or another boto3 credential source")
    if u.scheme == "file":
        path = (u.netloc + u.path) if u.netloc else u.path
        return LocalStore(path)
    if u.scheme == "s3":
        if not u.netloc:
            raise ValueError(f"store URL {url!r} has no bucket")
        return S3Store(u.netloc, u.path.strip("/"))
    if u.scheme == "" and url:
        return LocalStore(url)
    raise ValueError(f"unsupported store URL {url!r} (use file:///path or s3://bucket/prefix)")
