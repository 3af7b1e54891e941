"""Files: one atomic writer for everything the project writes (checkpoints, reports, the cache's manifest and
shards), on a local disk or on any file system pyarrow reaches (s3://, gs://, hdfs://).

A reader sees the old file or the new one, never half of one: the bytes go to a unique temporary name beside
the target, which is then renamed over it.
"""

from __future__ import annotations

import io
import json
import os
import urllib.parse
import uuid
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.fs as pafs

from curriculum.errors import CacheError


def resolve_fs(root: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it, for a local folder or any URI pyarrow understands."""
    if "://" in root:
        try:
            return pafs.FileSystem.from_uri(root)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
            raise CacheError(f"cache root {root!r}: pyarrow cannot open this URI ({e})") from None
    return pafs.LocalFileSystem(), os.path.abspath(root)


def join_uri(root: str, *parts: str) -> str:
    """`root` (a local path, or a URI whose query such as ``?endpoint_override=host:port&scheme=http`` stays at the
    end) with `parts` appended to its path."""
    parts = tuple(p.strip("/") for p in parts if p and p.strip("/"))
    if "://" not in root:
        return os.path.join(root, *parts)
    u = urllib.parse.urlsplit(root)
    path = "/".join([u.path.rstrip("/"), *parts]) if parts else u.path
    return urllib.parse.urlunsplit((u.scheme, u.netloc, path, u.query, u.fragment))


def redact_uri(uri: str) -> str:
    """`uri` for messages: credentials given in it (``s3://key:secret@bucket/...``) replaced by ``***``."""
    if "://" not in uri:
        return uri
    u = urllib.parse.urlsplit(uri)
    if "@" not in u.netloc:
        return uri
    return urllib.parse.urlunsplit((u.scheme, "***@" + u.netloc.rsplit("@", 1)[1], u.path, u.query, u.fragment))


def check_root(root: str, what: str = "cache root") -> None:
    """That `root` can be reached and listed (or does not exist yet, to be created): one clear error before any
    actor starts, instead of one per actor."""
    fs, path = resolve_fs(root)
    try:
        info = fs.get_file_info(path)
    except (OSError, pa.ArrowException) as e:
        raise CacheError(f"{what} {redact_uri(root)!r} cannot be reached: {e}. Check the endpoint (AWS_ENDPOINT_URL or "
                         "?endpoint_override=host:port&scheme=http in the URI), the credentials and the bucket") from None
    if info.type == pafs.FileType.File:
        raise CacheError(f"{what} {redact_uri(root)!r} is a file; give a folder (or a bucket prefix)")


# What pyarrow's object-store file systems read from the environment: the AWS SDK's variables (endpoint,
# credentials, region, profile, CA bundle) and Google Cloud's credentials file.
STORAGE_ENV_PREFIXES = ("AWS_",)
STORAGE_ENV_NAMES = ("GOOGLE_APPLICATION_CREDENTIALS",)


def storage_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The object-store variables of this process's environment (`os.environ` by default). A Ray actor or worker
    sees the environment its node was started with, not the driver's: every actor and worker this project starts
    gets these (`storage_runtime_env`), so ``AWS_ENDPOINT_URL=... curriculum run`` reaches the cache from all of
    them."""
    env = os.environ if environ is None else environ
    return {k: v for k, v in env.items() if k.startswith(STORAGE_ENV_PREFIXES) or k in STORAGE_ENV_NAMES}


def storage_runtime_env(env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """A Ray ``runtime_env`` passing on `env` (default: `storage_env()`); None when there is nothing to pass."""
    env = storage_env() if env is None else dict(env)
    return {"env_vars": dict(env)} if env else None


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def path_name(name: str) -> str:
    """A model name as a folder or file name: ``torchvision:fcos_resnet50_fpn`` -> ``torchvision-fcos_resnet50_fpn``
    (a colon is not allowed on every file system, and means a scheme or drive in URIs and on Windows)."""
    return name.replace(":", "-").replace("/", "-")


def atomic_write(path: str | os.PathLike, data: bytes, fs: pafs.FileSystem | None = None) -> None:
    """Write `data` to `path` atomically: on `fs`, or on the local disk (parent folders created)."""
    path = str(path)
    if fs is None:
        fs = pafs.LocalFileSystem()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        path = os.path.abspath(path)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    except BaseException:
        try:
            fs.delete_file(tmp)
        except (OSError, pa.ArrowException):  # never written, or already moved
            pass
        raise


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` of `obj`, atomically."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, buf.getvalue())


def atomic_write_json(obj: Any, path: str | os.PathLike, indent: int | None = 2, default: Any = str) -> None:
    """`obj` as JSON, atomically (`default` turns what JSON does not know into something it does)."""
    atomic_write(path, json.dumps(obj, indent=indent, default=default).encode())


__all__ = ["atomic_save", "atomic_write", "atomic_write_json", "exists", "read_bytes", "resolve_fs"]
