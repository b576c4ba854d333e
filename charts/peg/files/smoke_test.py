"""`helm test` for the peg chart: peg's own S3 store opens with the mounted Secret's keys and can
write, read back and delete an object, and the launcher's service account may create every job
kind peg submits. Exit 0 when all checks pass, else 1 with one line per failed check.
Environment (set by the test pod): PEG_STORE (a StoreConfig as JSON, under a probe prefix; empty:
skip), PEG_NAMESPACE and PEG_CHECK_RESOURCES ("group/resource,..."; empty: skip the RBAC check).
"""

from __future__ import annotations

import os
import sys


def check_store(env: dict[str, str]) -> list[str]:
    """Open the store as a stage pod would, then put, get and delete one small artifact."""
    if not env.get("PEG_STORE"):
        print("store: no S3 store configured, skipped")
        return []
    from peg.config import StoreConfig
    from peg.store import StoreError, open_store

    config = StoreConfig.model_validate_json(env["PEG_STORE"])
    payload = b"peg helm test\n"
    try:
        store = open_store(config)
        store.put_bytes("probe", payload, producer="helm-test")
        read = store.get_bytes("probe")
        store.delete("")
    except StoreError as e:
        return [f"store: {e}"]
    if read != payload:
        return [f"store: {config.uri}: read back {len(read)} bytes, wrote {len(payload)}"]
    print(f"store: {store.describe()}: write, read and delete ok")
    return []


def check_rbac(env: dict[str, str]) -> list[str]:
    """SelfSubjectAccessReview: may this pod's service account create each resource?"""
    resources = [r for r in env.get("PEG_CHECK_RESOURCES", "").split(",") if r]
    if not resources:
        return []
    from kubernetes import client, config

    config.load_incluster_config()
    api = client.AuthorizationV1Api()
    failures = []
    for item in resources:
        group, resource = item.split("/")
        review = client.V1SelfSubjectAccessReview(
            spec=client.V1SelfSubjectAccessReviewSpec(
                resource_attributes=client.V1ResourceAttributes(
                    namespace=env["PEG_NAMESPACE"], verb="create", group=group, resource=resource
                )
            )
        )
        allowed = api.create_self_subject_access_review(review).status.allowed
        print(f"rbac: create {item}: {'allowed' if allowed else 'DENIED'}")
        if not allowed:
            failures.append(f"rbac: the launcher may not create {item} in {env['PEG_NAMESPACE']}")
    return failures


def main() -> int:
    env = dict(os.environ)
    failures = check_store(env) + check_rbac(env)
    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
