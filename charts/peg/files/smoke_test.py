"""`helm test` for the peg chart: the store answers with the chart's keys, and the launcher's
service account may create every job kind peg submits. Exit 0 when all checks pass, else 1
with one line per failed check. Configured by environment variables (see the test pod):
PEG_S3_ENDPOINT, PEG_S3_SECURE, PEG_S3_BUCKET, PEG_S3_ACCESS_KEY_ENV, PEG_S3_SECRET_KEY_ENV,
PEG_NAMESPACE and PEG_CHECK_RESOURCES ("group/resource,..."; empty: skip the RBAC check).
"""

from __future__ import annotations

import io
import os
import sys


def check_store(env: dict[str, str]) -> list[str]:
    """Write, read back and delete one object in the bucket with the keys from the Secret."""
    from minio import Minio

    endpoint = env.get("PEG_S3_ENDPOINT", "")
    if not endpoint:
        print("store: no S3 endpoint configured, skipped")
        return []
    bucket = env["PEG_S3_BUCKET"]
    access_name, secret_name = env["PEG_S3_ACCESS_KEY_ENV"], env["PEG_S3_SECRET_KEY_ENV"]
    if not env.get(access_name) or not env.get(secret_name):
        return [f"store: {access_name} / {secret_name} are not set (is the S3 Secret mounted?)"]
    client = Minio(
        endpoint,
        access_key=env[access_name],
        secret_key=env[secret_name],
        secure=env.get("PEG_S3_SECURE", "true").lower() == "true",
    )
    key, payload = ".peg-helm-test", b"peg helm test\n"
    try:
        if not client.bucket_exists(bucket):
            return [f"store: bucket {bucket!r} does not exist at {endpoint}"]
        client.put_object(bucket, key, io.BytesIO(payload), len(payload))
        response = client.get_object(bucket, key)
        try:
            read = response.read()
        finally:
            response.close()
            response.release_conn()
        client.remove_object(bucket, key)
    except Exception as e:  # any S3 or connection error is the finding
        return [f"store: {endpoint} bucket {bucket!r}: {type(e).__name__}: {getattr(e, 'code', '') or e}"]
    if read != payload:
        return [f"store: {endpoint} bucket {bucket!r}: read back {len(read)} bytes, wrote {len(payload)}"]
    print(f"store: {endpoint} bucket {bucket!r}: write, read and delete ok")
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
