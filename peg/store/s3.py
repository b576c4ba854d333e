"""S3Store: artifacts in an S3-compatible bucket (AWS, MinIO, SeaweedFS) through the minio client.

Objects live at `<prefix>/<key>`, manifests at `<prefix>/<key>.manifest.json`. Uploads stream from
disk (`fput_object`: multipart for files larger than a part; S3 shows a multipart upload as an
object only once it is completed), and the manifest is put only after the object upload
succeeded. Transient failures (connection reset, timeouts, 5xx, SlowDown) are retried with
exponential backoff; authentication errors, a missing bucket and an unreachable endpoint (when
the store is opened) fail at once with a StoreError naming the endpoint and bucket.

Timeouts: opening probes the bucket with `connect_timeout` for connecting AND reading and no
retry, so an endpoint that accepts connections but never answers fails at open within seconds.
Small requests (manifests, stats, listings, control objects) wait `request_timeout` for data;
only object transfers wait `read_timeout`.

Control objects (the run lease) use S3 conditional writes: `If-None-Match: *` to create and
`If-Match: <ETag>` to replace or remove (AWS S3, MinIO and SeaweedFS honour both).
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, TypeVar

import certifi
import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, S3Error, ServerError

from peg.config import StoreConfig
from peg.progress import progress_bar
from peg.store.base import (
    MANIFEST_SUFFIX,
    ArtifactStore,
    IntegrityError,
    Manifest,
    StoreError,
    VerifyingReader,
    check_key,
    check_prefix,
    new_manifest,
    under_prefix,
)
from peg.store.files import CHUNK_SIZE, copy_stream_atomically, file_sha256

log = logging.getLogger(__name__)
_file_log = logging.getLogger()  # the root logger: the log file, never the console (peg.console)

T = TypeVar("T")

MAX_BACKOFF_SECONDS = 30.0
AUTH_ERRORS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "AuthorizationHeaderMalformed"}
TRANSIENT_CODES = {
    "SlowDown",
    "SlowDownRead",
    "SlowDownWrite",
    "InternalError",
    "ServiceUnavailable",
    "RequestTimeout",
    "XMinioServerNotInitialized",
}
PROGRESS_MIN_BYTES = 256 << 20  # uploads and downloads at least this large show a progress bar
_MISSING = object()


class _MinioProgress:
    """The progress object minio's uploads report to (`set_meta`, `update`), feeding a progress bar."""

    def __init__(self, advance: Callable[[int], None]):
        self._advance = advance

    def set_meta(self, object_name: str, total_length: int) -> None:
        pass

    def update(self, size: int) -> None:
        self._advance(size)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix")."""
    rest = uri.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise StoreError(f"store.uri {uri!r}: no bucket (expected s3://bucket/prefix)")
    prefix = prefix.strip("/")
    if prefix:
        check_prefix(prefix)
    return bucket, prefix


def load_credentials(config: StoreConfig) -> tuple[str, str]:
    """(access key, secret key) from the environment, else from `credentials_file`.

    `credentials_file` is either a directory (a mounted Kubernetes Secret: one file per key, named
    like the environment variables) or an env-style file of `NAME=value` lines (`export NAME=value`
    and quoted values work too) with those names.
    """
    names = (config.access_key_env, config.secret_key_env)
    values = [os.environ.get(name, "") for name in names]
    path = Path(config.credentials_file) if config.credentials_file else None
    if path is not None and not path.exists():  # named but absent: a mistake even if the environment has keys
        raise StoreError(f"store.credentials_file {path}: no such file or directory")
    if all(values):
        return values[0], values[1]
    if path is not None:
        if path.is_dir():
            found = {name: _read_secret(path / name).strip() for name in names if (path / name).is_file()}
        else:
            found = {}
            for line in _read_secret(path).splitlines():
                name, sep, value = line.strip().removeprefix("export ").partition("=")
                if sep and not name.startswith("#"):
                    found[name.strip()] = value.strip().strip("'\"")
        missing = [name for name in names if not found.get(name)]
        if missing:
            raise StoreError(f"store.credentials_file {path}: no value for {', '.join(missing)}")
        return found[names[0]], found[names[1]]
    unset = [name for name, value in zip(names, values) if not value]
    raise StoreError(
        f"no S3 credentials: environment variable(s) {', '.join(unset)} not set and no store.credentials_file"
    )


def _read_secret(path: Path) -> str:
    """A credentials file's text; StoreError naming the file (never its content) if it cannot be read."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise StoreError(f"store.credentials_file {path}: cannot read: {e.strerror}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise StoreError(f"store.credentials_file {path}:{line}: invalid UTF-8") from None


def is_transient(error: BaseException) -> bool:
    """Errors worth retrying: the same request may succeed a little later."""
    if isinstance(error, S3Error):
        return error.code in TRANSIENT_CODES or error.response.status >= 500
    if isinstance(error, ServerError):
        return error.status_code >= 500
    if isinstance(error, InvalidResponseError):
        return getattr(error, "_code", 0) >= 500  # non-XML 5xx, e.g. from a proxy
    return isinstance(error, (urllib3.exceptions.ProtocolError, urllib3.exceptions.TimeoutError, ConnectionError))


def is_unreachable(error: BaseException) -> bool:
    """No TCP connection to the endpoint could be made (refused, no route, connect timeout)."""
    return isinstance(error, (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError))


class S3Store(ArtifactStore):
    """Artifacts in the bucket and under the prefix of `config.uri`; see the module docstring.

    Opening checks the bucket with one request (fails fast). A store pickles as its config, so it
    can be handed to Ray workers; each unpickled copy builds its own client and checks again.
    """

    def __init__(self, config: StoreConfig):
        self.config = config
        self.bucket, self.prefix = parse_s3_uri(config.uri)
        if not config.endpoint:
            raise StoreError(f"store.endpoint is required for {config.uri} (e.g. s3.amazonaws.com or minio:9000)")
        if "://" in config.endpoint:
            raise StoreError(f"store.endpoint {config.endpoint!r}: give host:port only; store.secure selects TLS")
        scheme = "https" if config.secure else "http"
        self._where = f"S3 store {scheme}://{config.endpoint} bucket {self.bucket!r}"
        self._credential_hint = f"${config.access_key_env}/${config.secret_key_env}" + (
            f" or {config.credentials_file}" if config.credentials_file else ""
        )
        self.max_attempts = config.max_attempts
        self.backoff_seconds = config.backoff_seconds
        self.part_size = config.part_size_mib << 20
        access_key, secret_key = load_credentials(config)

        def client(read_timeout: float) -> Minio:
            http = urllib3.PoolManager(
                timeout=urllib3.Timeout(connect=config.connect_timeout, read=read_timeout),
                retries=False,  # retries are ours (see _call): classified, bounded, with backoff
                maxsize=10,
                cert_reqs="CERT_REQUIRED",
                ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
            )
            return Minio(config.endpoint, access_key=access_key, secret_key=secret_key, secure=config.secure,
                         region=config.region, http_client=http)

        try:
            self._probe = client(config.connect_timeout)
            self._client = client(config.request_timeout)  # small requests
            self._transfer = client(config.read_timeout)  # object bodies
        except ValueError as e:  # e.g. a port that is not a number
            raise StoreError(f"store.endpoint {config.endpoint!r}: {e}") from None
        self.check_bucket()

    def __reduce__(self):
        return (S3Store, (self.config,))

    def describe(self) -> str:
        return self._where + (f" prefix {self.prefix!r}" if self.prefix else "")

    def check_bucket(self) -> None:
        """One listing request, no retry: fails within `connect_timeout` (x2 with the region lookup)
        on bad credentials, a missing bucket, no endpoint, or an endpoint that never answers."""

        def probe() -> None:
            try:
                next(iter(self._probe.list_objects(self.bucket, prefix=self._name_prefix(""))), None)
            except urllib3.exceptions.ReadTimeoutError:
                raise StoreError(
                    f"{self.describe()}: open failed: the endpoint accepted the connection but sent no answer to "
                    f"a bucket listing within {self.config.connect_timeout:g} s (store.connect_timeout); is it an "
                    "S3 server, and is it up?"
                ) from None

        self._call("open", probe, retry_unreachable=False)

    # --- names -------------------------------------------------------------------------------

    def _name(self, key: str) -> str:
        key = check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _name_prefix(self, prefix: str) -> str:
        """Object-name prefix for a key prefix (string prefix; callers filter by path)."""
        return "/".join(p for p in (self.prefix, prefix) if p)

    def _key_of(self, name: str) -> str:
        return name[len(self.prefix) + 1 :] if self.prefix else name

    # --- error handling ----------------------------------------------------------------------

    def _explain(self, error: BaseException) -> str:
        if isinstance(error, S3Error):
            if error.code in AUTH_ERRORS:
                return f"authentication failed ({error.code}: {error.message}); check the credentials in {self._credential_hint}"
            if error.code == "AccessDenied":
                return f"access denied: the credentials in {self._credential_hint} are not allowed to do this"
            if error.code == "NoSuchBucket":
                return "the bucket does not exist (create it first; peg does not create buckets)"
            return f"{error.code}: {error.message}"
        if is_unreachable(error):
            return f"cannot reach the endpoint ({getattr(error, 'reason', None) or error})"
        if isinstance(error, urllib3.exceptions.ProtocolError):
            return f"connection lost ({error})"
        return f"{type(error).__name__}: {error}"

    def _call(self, what: str, fn: Callable[[], T], missing: object = _MISSING, retry_unreachable: bool = True) -> T:
        """Run one S3 operation, retrying transient errors with exponential backoff.

        Returns `missing` for NoSuchKey when given; raises StoreError naming endpoint, bucket and
        `what` for everything else.
        """
        delay = self.backoff_seconds
        attempt = 1
        while True:
            try:
                return fn()
            except StoreError:
                raise
            except Exception as e:
                if missing is not _MISSING and isinstance(e, S3Error) and e.code == "NoSuchKey":
                    return missing  # type: ignore[return-value]
                if not is_transient(e) or (is_unreachable(e) and not retry_unreachable):
                    raise StoreError(f"{self.describe()}: {what} failed: {self._explain(e)}") from e
                if attempt >= self.max_attempts:
                    raise StoreError(
                        f"{self.describe()}: {what} failed after {attempt} attempts: {self._explain(e)}"
                    ) from e
                # the console hears of an operation's first retry; later ones go to the log file only
                (log.warning if attempt == 1 else _file_log.info)(
                    "%s: %s: %s; retrying in %.1f s (attempt %d of %d)", self.describe(), what, self._explain(e), delay,
                    attempt + 1, self.max_attempts)
                time.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_SECONDS)
                attempt += 1

    # --- the interface -----------------------------------------------------------------------

    def put_file(self, key: str, local_path: str | Path, producer: str, config_hash: str = "") -> Manifest:
        name = self._name(key)
        source = Path(local_path)
        try:
            size, sha256 = file_sha256(source)
        except OSError as e:
            raise StoreError(f"{self.describe()}: cannot read {source} to put {key!r}: {e.strerror}") from None
        # The old manifest goes first, so while the object is replaced the key reads as absent.
        self._call(f"put {key!r}", lambda: self._client.remove_object(self.bucket, name + MANIFEST_SUFFIX))

        def upload() -> str:
            with progress_bar(size, f"upload {key}", enabled=size >= PROGRESS_MIN_BYTES, unit="B") as advance:
                return self._transfer.fput_object(
                    self.bucket, name, str(source), part_size=self.part_size, progress=_MinioProgress(advance)
                ).etag

        etag = self._call(f"put {key!r}", upload)
        manifest = new_manifest(key, size, sha256, producer, config_hash, etag=(etag or "").strip('"') or None)
        data = manifest.to_json()
        self._call(
            f"put the manifest of {key!r}",
            lambda: self._client.put_object(
                self.bucket, name + MANIFEST_SUFFIX, io.BytesIO(data), len(data), content_type="application/json"
            ),
        )
        return manifest

    def _manifest_bytes(self, key: str) -> bytes | None:
        name = self._name(key) + MANIFEST_SUFFIX

        def fetch() -> bytes:
            response = self._client.get_object(self.bucket, name)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        return self._call(f"read the manifest of {key!r}", fetch, missing=None)

    def manifest(self, key: str) -> Manifest | None:
        data = self._manifest_bytes(key)
        return None if data is None else Manifest.from_json(data, f"{self.describe()}: {key}{MANIFEST_SUFFIX}")

    def verify(self, key: str) -> Manifest:
        """Size and ETag against the manifest (one HEAD); a manifest without an ETag: a full read."""
        found = self.require_manifest(key)
        if found.etag is None:
            return super().verify(key)
        stat = self._call(f"stat {key!r}", lambda: self._client.stat_object(self.bucket, self._name(key)), missing=None)
        if stat is None:
            raise IntegrityError(key, f"{self.describe()}: artifact {key!r} has a manifest but no object")
        if stat.size != found.size or (stat.etag or "").strip('"') != found.etag:
            raise IntegrityError(
                key,
                f"{self.describe()}: {key}: the object was replaced after it was stored (size {stat.size}, ETag "
                f"{stat.etag}; manifest: size {found.size}, ETag {found.etag})",
            )
        return found

    def exists(self, key: str) -> bool:
        data = self._manifest_bytes(key)
        if data is None:
            return False
        try:
            found = Manifest.from_json(data, key)
        except StoreError:
            return False
        stat = self._call(f"stat {key!r}", lambda: self._client.stat_object(self.bucket, self._name(key)), missing=None)
        return stat is not None and stat.size == found.size

    def _names_under(self, prefix: str) -> list[tuple[str, str]]:
        """(object name, key it belongs to) for every object under the key prefix."""
        prefix = check_prefix(prefix)
        objects = self._call(
            f"list {prefix or '(all)'!r}",
            lambda: [
                o.object_name
                for o in self._client.list_objects(self.bucket, prefix=self._name_prefix(prefix), recursive=True)
            ],
        )
        out = []
        for name in objects:
            key = self._key_of(name).removesuffix(MANIFEST_SUFFIX)
            if under_prefix(key, prefix):
                out.append((name, key))
        return out

    def list(self, prefix: str = "") -> list[str]:
        names = self._names_under(prefix)
        objects = {key for name, key in names if not name.endswith(MANIFEST_SUFFIX)}
        manifests = {key for name, key in names if name.endswith(MANIFEST_SUFFIX)}
        return sorted(objects & manifests)

    def delete(self, prefix: str) -> None:
        names = self._names_under(prefix)
        # Manifests first: an interrupted delete leaves objects without manifests (absent), never
        # a manifest whose object is gone.
        for batch in (
            [n for n, _ in names if n.endswith(MANIFEST_SUFFIX)],
            [n for n, _ in names if not n.endswith(MANIFEST_SUFFIX)],
        ):
            if batch:
                errors = self._call(
                    f"delete {prefix or '(all)'!r}",
                    lambda batch=batch: list(self._client.remove_objects(self.bucket, [DeleteObject(n) for n in batch])),
                )
                if errors:
                    raise StoreError(f"{self.describe()}: delete {prefix!r} failed for: {errors[0]}")

    def abort_interrupted_uploads(self, prefix: str, started_before: datetime) -> list[str]:
        """See `ArtifactStore`. The listing is paged by (key, upload id) markers; minio's client
        has no public call for it, so this uses its `_list_multipart_uploads` and
        `_abort_multipart_upload` (the S3 API calls ListMultipartUploads, AbortMultipartUpload)."""
        names = self._name_prefix(check_prefix(prefix) if prefix else "")
        names = names + "/" if prefix or self.prefix else names  # `a/b`: below `a/b/`, never `a/bc`
        stale, key_marker, upload_marker = [], None, None
        while True:
            def list_page(k=key_marker, u=upload_marker):
                return self._client._list_multipart_uploads(self.bucket, prefix=names, key_marker=k, upload_id_marker=u,
                                                            max_uploads=1000)

            page = self._call(f"list interrupted uploads under {prefix!r}", list_page)
            stale += [u for u in page.uploads if u.initiated_time is not None and u.initiated_time < started_before]
            if not page.is_truncated or not page.uploads:
                break
            key_marker, upload_marker = page.uploads[-1].object_name, page.uploads[-1].upload_id
        for upload in stale:
            self._call(f"abort the interrupted upload of {self._key_of(upload.object_name)!r}",
                       lambda u=upload: self._client._abort_multipart_upload(self.bucket, u.object_name, u.upload_id))
        return [self._key_of(u.object_name) for u in stale]

    def local_path(self, key: str) -> None:
        return None

    @contextmanager
    def open_binary(self, key: str) -> Iterator[BinaryIO]:
        found = self.require_manifest(key)
        name = self._name(key)
        response = self._call(f"get {key!r}", lambda: self._transfer.get_object(self.bucket, name), missing=None)
        if response is None:
            raise StoreError(f"{self.describe()}: artifact {key!r} has a manifest but no object")
        try:
            with io.BufferedReader(VerifyingReader(response, found, f"{self.describe()}: {key}"), CHUNK_SIZE) as reader:
                yield reader
        finally:
            response.close()
            response.release_conn()

    def get_file(self, key: str, local_path: str | Path) -> Path:
        """Download to `local_path` atomically, verifying sha256; a dropped download is retried."""
        found = self.require_manifest(key)
        name = self._name(key)
        target = Path(local_path)

        def download() -> None:
            response = self._transfer.get_object(self.bucket, name)
            enabled = found.size >= PROGRESS_MIN_BYTES
            try:
                with progress_bar(found.size, f"download {key}", enabled=enabled, unit="B") as advance:
                    verifying = VerifyingReader(response, found, f"{self.describe()}: {key}", advance)
                    copy_stream_atomically(io.BufferedReader(verifying, CHUNK_SIZE), target)
            finally:
                response.close()
                response.release_conn()

        self._call(f"get {key!r}", download)
        return target

    # --- control objects (the run lease): S3 conditional writes ------------------------------------

    def _conditional(self, method: str, key: str, headers: dict[str, str], data: bytes = b"") -> str | None:
        """One conditional request: the new ETag (or "" for DELETE), None when the precondition failed
        (412 PreconditionFailed, 409 ConditionalRequestConflict, or 404 for If-Match on a missing object)."""
        name = self._name(key)
        if method == "PUT":
            headers = {**headers, "Content-Length": str(len(data)), "Content-Type": "application/json"}

        def request() -> str | None:
            try:
                response = self._client._execute(
                    method, self.bucket, name, body=data if method == "PUT" else None, headers=headers
                )
            except S3Error as e:
                if e.code in ("PreconditionFailed", "NoSuchKey") or e.response.status in (409, 412):
                    return None
                raise
            return response.headers.get("ETag", "")

        return self._call(f"{method.lower()} {key!r}", request)

    def create_object(self, key: str, data: bytes) -> str | None:
        return self._conditional("PUT", key, {"If-None-Match": "*"}, data)

    def read_object(self, key: str) -> tuple[bytes, str] | None:
        name = self._name(key)

        def fetch() -> tuple[bytes, str]:
            response = self._client.get_object(self.bucket, name)
            try:
                return response.read(), response.headers.get("ETag", "")
            finally:
                response.close()
                response.release_conn()

        return self._call(f"read {key!r}", fetch, missing=None)

    def replace_object(self, key: str, data: bytes, token: str) -> str | None:
        return self._conditional("PUT", key, {"If-Match": token}, data)

    def remove_object(self, key: str, token: str) -> bool:
        return self._conditional("DELETE", key, {"If-Match": token}) is not None
