"""Artifact store: one interface over a local directory and S3-compatible object storage.

    store = open_store(config.store)
    store.put_file("myrun/mine/shard-00003.jsonl", path, producer="mine", config_hash=h)
    store.get_file("myrun/mine/shard-00003.jsonl", dest)   # verified against the manifest
"""

from __future__ import annotations

from peg.config import StoreConfig
from peg.store.base import ArtifactStore, IntegrityError, Manifest, StoreError, artifact_key
from peg.store.local import LocalStore


def open_store(config: StoreConfig) -> ArtifactStore:
    """A LocalStore for a directory path, an S3Store for `s3://bucket/prefix` (checked at open)."""
    uri = config.uri
    if uri.startswith("s3://"):
        from peg.store.s3 import S3Store  # the minio client is only imported when S3 is used

        return S3Store(config)
    if "://" in uri:
        raise StoreError(f"store.uri {uri!r}: unsupported scheme (use a local directory or s3://bucket/prefix)")
    return LocalStore(uri)


__all__ = ["ArtifactStore", "IntegrityError", "LocalStore", "Manifest", "StoreError", "artifact_key", "open_store"]
