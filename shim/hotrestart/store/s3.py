"""An S3 bucket (AWS S3, Ceph RGW, MinIO, GCS's S3 interface), as the object store backend uses it.

The client is obstore (Rust's `object_store`): requests run outside the GIL on its own
threads, it signs and retries with backoff, and it reads the standard AWS environment
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION, AWS_ENDPOINT_URL,
web identity and container credentials, the instance metadata service). Its one gap, the
shared config and credentials files (AWS_CONFIG_FILE, AWS_SHARED_CREDENTIALS_FILE,
AWS_PROFILE, as the installer mounts them from a Secret), is filled here with configparser.

Every failure is an OSError with the bucket's URL and the server's first line:
FileNotFoundError for a missing object (or bucket), FileExistsError for a conditional write
that lost, PermissionError for refused credentials.
"""

from __future__ import annotations

import configparser
import dataclasses
import datetime
import errno
import functools
import os
import re
import stat
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

TIMEOUT_ENV = "HOTRESTART_S3_TIMEOUT"  # seconds one request may take, its retries included
DEFAULT_TIMEOUT = 30.0

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_PREFIX = re.compile(r"[A-Za-z0-9._/-]{0,512}")

T = TypeVar("T")


@dataclasses.dataclass(frozen=True, slots=True)
class Location:
    bucket: str
    prefix: str  # no leading or trailing slash; may be empty

    @classmethod
    def parse(cls, url: str) -> Location:
        """`s3://bucket/prefix` (the prefix optional)."""
        if not url.startswith("s3://"):
            raise ValueError(f"{url!r} is not an s3:// URL")
        bucket, _, prefix = url[len("s3://") :].partition("/")
        prefix = prefix.strip("/")
        if not _BUCKET.fullmatch(bucket):
            raise ValueError(f"{url!r}: {bucket!r} is not a bucket name")
        if not _PREFIX.fullmatch(prefix) or any(p in ("", ".", "..") for p in prefix.split("/") if prefix):
            raise ValueError(f"{url!r}: the prefix may hold letters, digits and ._-/ only, no empty or dot parts")
        return cls(bucket, prefix)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


@dataclasses.dataclass(frozen=True, slots=True)
class Meta:
    key: str  # below the location's prefix
    size: int
    mtime: float  # the server's clock


def _profile() -> str:
    return os.environ.get("AWS_PROFILE") or os.environ.get("AWS_DEFAULT_PROFILE") or "default"


_CONFIG_KEYS = (
    ("aws_access_key_id", "access_key_id"),
    ("aws_secret_access_key", "secret_access_key"),
    ("aws_session_token", "session_token"),
    ("region", "region"),
    ("endpoint_url", "endpoint"),
)


def _ini(path: str, *, strict: bool = False) -> configparser.ConfigParser:
    """An AWS-style INI file (at most 1 MiB). Unreadable, it is no file, as to the AWS tools;
    `strict` (a file the runtime's options name) raises OSError instead."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise OSError(errno.EINVAL, f"{path}: not a regular file")
            parser.read_string(f.read(1 << 20).decode("utf-8"), source=path)
    except (OSError, configparser.Error, UnicodeDecodeError) as exc:
        if strict:
            raise OSError(errno.EINVAL, f"S3 config file {path}: {exc}") from None
    return parser


def shared_config(config_file: str = "") -> dict[str, str]:
    """What the AWS shared credentials and config files give the profile in use, for the
    settings the environment does not set itself; or, with `config_file` (the runtime's
    S3ConfigFile), everything that file sets, before the environment."""
    profile = _profile()
    found: dict[str, str] = {}
    if config_file:
        conf = _ini(config_file, strict=True)
        section = profile if conf.has_section(profile) else f"profile {profile}"
        for name, as_ in _CONFIG_KEYS:
            if conf.has_option(section, name):
                found[as_] = conf.get(section, name).strip()
        return found
    home = os.path.expanduser("~")
    creds = _ini(os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or os.path.join(home, ".aws", "credentials"))
    conf = _ini(os.environ.get("AWS_CONFIG_FILE") or os.path.join(home, ".aws", "config"))
    conf_section = profile if profile == "default" else f"profile {profile}"
    if not os.environ.get("AWS_ACCESS_KEY_ID"):
        for source, section in ((creds, profile), (conf, conf_section)):
            if source.has_option(section, "aws_access_key_id"):
                for name in ("aws_access_key_id", "aws_secret_access_key", "aws_session_token"):
                    if source.has_option(section, name):
                        found[name.removeprefix("aws_")] = source.get(section, name).strip()
                break
    if not (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")) and conf.has_option(
        conf_section, "region"
    ):
        found["region"] = conf.get(conf_section, "region").strip()
    if not (os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT")) and conf.has_option(
        conf_section, "endpoint_url"
    ):
        found["endpoint"] = conf.get(conf_section, "endpoint_url").strip()
    return found


def timeout() -> float:
    try:
        value = float(os.environ.get(TIMEOUT_ENV, "") or DEFAULT_TIMEOUT)
    except ValueError:
        return DEFAULT_TIMEOUT
    return min(max(value, 1.0), 600.0)


def _first_line(exc: BaseException) -> str:
    """The server's answer in a few words: its error code and HTTP status when it sent
    them (obstore's message carries the whole XML body), else the first line."""
    text = str(exc)
    code = re.search(r"<Code>([A-Za-z]{1,64})</Code>", text)
    status = re.search(r"status code: (\d{3}[A-Za-z ]{0,40})", text)
    if code:
        return f"{code.group(1)}" + (f" (HTTP {status.group(1).strip()})" if status else "")
    lines = text.strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:300]


class Bucket:
    """The objects below one location, with blocking calls safe from any thread."""

    def __init__(self, location: Location, config_file: str = "") -> None:
        # Imported here: a node whose store is a directory never loads the client.
        from obstore.store import S3Store

        self.location = location
        settings: dict[str, Any] = shared_config(config_file)
        endpoint = settings.get("endpoint") or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT", "")
        limit = timeout()
        self._store = S3Store(
            location.bucket,
            prefix=location.prefix or None,
            client_options={
                "allow_http": endpoint.startswith("http://"),
                "timeout": datetime.timedelta(seconds=limit),
                "connect_timeout": datetime.timedelta(seconds=min(5.0, limit)),
            },
            retry_config={
                "max_retries": 5,
                "retry_timeout": datetime.timedelta(seconds=limit),
                "backoff": {
                    "init_backoff": datetime.timedelta(milliseconds=100),
                    "max_backoff": datetime.timedelta(seconds=5),
                    "base": 2.0,
                },
            },
            **settings,
        )

    def _call(self, what: str, key: str, fn: Callable[[], T]) -> T:
        import obstore.exceptions as ox

        try:
            return fn()
        except (ox.NotFoundError, FileNotFoundError) as exc:
            raise FileNotFoundError(errno.ENOENT, f"{what} {self.location.url}/{key}: {_first_line(exc)}") from None
        except (ox.AlreadyExistsError, ox.PreconditionError) as exc:
            raise FileExistsError(errno.EEXIST, f"{what} {self.location.url}/{key}: {_first_line(exc)}") from None
        except (ox.PermissionDeniedError, ox.UnauthenticatedError) as exc:
            raise PermissionError(errno.EACCES, f"{what} {self.location.url}/{key}: {_first_line(exc)}") from None
        except (ox.BaseError, OSError, RuntimeError) as exc:
            raise OSError(errno.EIO, f"{what} {self.location.url}/{key}: {_first_line(exc)}") from None

    def get(self, key: str, limit: int) -> bytes:
        """The object's bytes; OSError (EFBIG) when it holds more than `limit`."""
        import obstore

        def read() -> bytes:
            result = obstore.get(self._store, key)
            size = int(result.meta["size"])
            if size > limit:
                raise _TooLarge(size)
            return bytes(result.bytes())

        try:
            return self._call("GET", key, read)
        except _TooLarge as exc:
            raise OSError(errno.EFBIG, f"{self.location.url}/{key}: {exc.size} bytes, more than {limit}") from None

    def get_exact(self, key: str, size: int) -> bytes | None:
        """The object's bytes when it holds exactly `size` of them, else None (never more read)."""
        import obstore

        def read() -> bytes | None:
            result = obstore.get(self._store, key)
            if int(result.meta["size"]) != size:
                return None
            return bytes(result.bytes())

        return self._call("GET", key, read)

    def put(self, key: str, data: bytes) -> None:
        import obstore

        self._call("PUT", key, lambda: obstore.put(self._store, key, data, use_multipart=False))

    def create(self, key: str, data: bytes) -> bool:
        """Write `key` only if nothing is there (If-None-Match: *); False when something else was.

        A PUT whose answer was lost may still have landed: a timeout, or the client's retry
        refused (412) because its first attempt had. Both are settled by reading the object
        back, so `data` must be unique to the caller (a token or a checkpoint id in it):
        whoever finds its own bytes there won. When the read-back cannot tell either (the
        store out of reach, or the PUT still in flight), the first error is raised, and the
        caller removes what may have landed where it can."""
        import obstore

        unclear: OSError | None = None
        try:
            self._call("PUT", key, lambda: obstore.put(self._store, key, data, mode="create", use_multipart=False))
            return True
        except FileExistsError:
            pass
        except PermissionError:
            raise
        except OSError as exc:
            unclear = exc
        try:
            return self.get(key, len(data)) == data
        except FileNotFoundError:
            if unclear is not None:
                raise unclear from None
            return False  # someone else's, removed since
        except OSError as exc:
            if exc.errno == errno.EFBIG:
                return False  # larger than ours: someone else's
            raise (unclear or exc) from None

    def head(self, key: str) -> Meta | None:
        import obstore

        try:
            meta = self._call("HEAD", key, lambda: obstore.head(self._store, key))
        except FileNotFoundError:
            return None
        return _meta(meta)

    def delete(self, keys: list[str]) -> None:
        """Remove `keys` (absent ones are no error), in batches."""
        import obstore

        def remove(batch: list[str]) -> None:
            obstore.delete(self._store, batch)

        for i in range(0, len(keys), 500):
            batch = keys[i : i + 500]
            self._call("DELETE", batch[0], functools.partial(remove, batch))

    def listing(self, prefix: str) -> Iterator[Meta]:
        """Every object whose key starts with `prefix`."""
        import obstore

        stream = self._call("LIST", prefix, lambda: iter(obstore.list(self._store, prefix, chunk_size=1000)))
        while True:
            batch = self._call("LIST", prefix, lambda: next(stream, None))
            if batch is None:
                return
            for meta in batch:
                yield _meta(meta)


class _TooLarge(Exception):
    def __init__(self, size: int) -> None:
        self.size = size


def _meta(meta: Any) -> Meta:
    modified = meta["last_modified"]
    return Meta(str(meta["path"]), int(meta["size"]), modified.timestamp() if modified else 0.0)
