"""Names derived from a run name and a stage name: Kubernetes objects, and the store key of a
cluster stage's log."""

from __future__ import annotations

import hashlib
import re

from peg.store import artifact_key

DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
RAYJOB_NAME_MAX = 47  # KubeRay derives longer names (cluster, submitter job) from a RayJob's name


def resource_name(run_name: str, stage: str, max_len: int = RAYJOB_NAME_MAX) -> str:
    """`<run>-<stage>` as a DNS-1035 label of at most `max_len` characters.

    Longer names keep a prefix and end in 8 hex characters of the full name's sha256, so two
    long names that share a prefix still differ. Characters outside [a-z0-9-] become '-'.
    """
    if max_len < 10:
        raise ValueError(f"max_len must be at least 10, got {max_len}")
    full = f"{run_name}-{stage}"
    if is_dns_1035(full, max_len):
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:8]
    stem = re.sub(r"[^a-z0-9-]+", "-", full.lower()).strip("-")
    if not stem[:1].isalpha():
        stem = f"p-{stem}"
    return f"{stem[: max_len - len(digest) - 1].rstrip('-')}-{digest}"


def is_dns_1035(name: str, max_len: int = 63) -> bool:
    return len(name) <= max_len and DNS_1035.match(name) is not None


def stage_log_key(run_name: str, stage: str) -> str:
    """Where a cluster stage's main pod log is kept in the store, by the launcher and the operator alike."""
    return artifact_key(run_name, "logs", f"{stage}.log")
