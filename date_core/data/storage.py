"""Local paths and ``s3://`` URIs behind one pyarrow filesystem, built in exactly one place.

Endpoint, keys and region come only from the standard AWS environment variables, never from
code, arguments or logs:

- keys: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` (or the AWS
  config files / instance metadata), read by the AWS SDK itself;
- region: ``AWS_REGION``, else ``AWS_DEFAULT_REGION``;
- endpoint: ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL`` (the AWS SDKs' precedence).

Why explicit: botocore (so s3fs / boto3) honours ``AWS_ENDPOINT_URL[_S3]`` by itself, but
pyarrow's ``S3FileSystem`` does not (apache/arrow#49643: it still goes to AWS), and Ray Data
builds a pyarrow filesystem from a bare ``s3://`` path. So every reader and writer here, and
every Ray Data call in :mod:`date_core.runtime.dataio`, gets its filesystem from
:func:`resolve_filesystem`.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import posixpath
import tempfile
from functools import lru_cache
from pathlib import Path

import pyarrow.fs as pafs

S3_SCHEME = "s3://"


def is_s3(uri: str | os.PathLike) -> bool:
    """True for ``s3://bucket/key`` URIs."""
    return str(uri).startswith(S3_SCHEME)


def endpoint_from_env() -> str | None:
    """The S3 endpoint URL from the environment (``AWS_ENDPOINT_URL_S3`` wins), or None for AWS."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def region_from_env() -> str | None:
    """The AWS region from the environment, or None (the SDK's default chain)."""
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


@lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, region: str | None) -> pafs.S3FileSystem:
    kwargs: dict = {}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        if not host:  # "host:port" without a scheme
            scheme, host = "https", endpoint
        kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme)
    if region:
        kwargs["region"] = region
    # Keys are deliberately not passed: the SDK reads them from the environment or config
    # files, and a filesystem pickled to Ray workers then carries no secret.
    return pafs.S3FileSystem(**kwargs)


def resolve_filesystem(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """``uri`` (local path, ``file://`` or ``s3://bucket/key``) -> (pyarrow filesystem, path in it).

    Local paths come back absolute. The S3 filesystem is cached per (endpoint, region), so
    repeated calls are cheap and a changed environment (a test's endpoint) gets a new one.
    """
    text = str(uri)
    if is_s3(text):
        path = text[len(S3_SCHEME):].rstrip("/")
        if not path:
            raise ValueError(f"{text!r} names no bucket")
        return _s3_filesystem(endpoint_from_env(), region_from_env()), path
    if text.startswith("file://"):
        text = text[len("file://"):]
    return pafs.LocalFileSystem(), str(Path(text).expanduser().resolve())


def join(root: str | os.PathLike, *parts: str) -> str:
    """Join path parts onto a local path or an ``s3://`` URI."""
    text = str(root)
    if is_s3(text):
        return posixpath.join(text.rstrip("/"), *parts)
    return str(Path(text, *parts))


def exists(uri: str | os.PathLike) -> bool:
    """True when a file or directory exists at ``uri``."""
    fs, path = resolve_filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(uri: str | os.PathLike) -> None:
    """Create a directory (and parents); a no-op on S3, where prefixes need no creation."""
    if not is_s3(uri):
        fs, path = resolve_filesystem(uri)
        fs.create_dir(path, recursive=True)


def read_bytes(uri: str | os.PathLike) -> bytes:
    """The whole content of one file (raises ``FileNotFoundError`` / ``OSError``)."""
    fs, path = resolve_filesystem(uri)
    with fs.open_input_stream(path) as fh:
        return fh.read()


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to one file, creating parent directories for local paths."""
    fs, path = resolve_filesystem(uri)
    if not is_s3(uri):
        fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as fh:
        fh.write(data)


def list_files(uri: str | os.PathLike, suffix: str = "") -> list[str]:
    """Paths (in the filesystem of ``uri``) of the files under ``uri`` ending with ``suffix``, sorted."""
    fs, path = resolve_filesystem(uri)
    info = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted(i.path for i in info if i.type == pafs.FileType.File and i.path.endswith(suffix)
                  and not posixpath.basename(i.path).startswith(("_", ".")))


def upload_dir(local_dir: str | os.PathLike, uri: str) -> None:
    """Copy a local directory tree to ``uri`` (local or S3)."""
    fs, path = resolve_filesystem(uri)
    if not is_s3(uri):
        fs.create_dir(path, recursive=True)
    pafs.copy_files(str(Path(local_dir).resolve()), path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)


@contextlib.contextmanager
def local_dir(uri: str | os.PathLike):
    """``with local_dir(uri) as path``: :func:`localize_dir`, with a temporary copy of an S3
    folder removed on exit (model folders are 100 MB and more; they must not pile up in /tmp)."""
    path = localize_dir(uri)
    try:
        yield path
    finally:
        if is_s3(uri):
            shutil.rmtree(path, ignore_errors=True)


def localize_dir(uri: str | os.PathLike) -> str:
    """A local directory with the content of ``uri``: the path itself when local, else a
    fresh temporary copy (used to load a tokenizer saved next to an S3 dataset)."""
    if not is_s3(uri):
        return str(resolve_filesystem(uri)[1])
    fs, path = resolve_filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"no directory at {uri}")
    local = tempfile.mkdtemp(prefix="date-s3-")
    pafs.copy_files(path, local, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local
