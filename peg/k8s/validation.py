"""What the Kubernetes API server refuses, checked before anything is rendered or submitted.

Pure string checks with the API server's own rules (k8s.io/apimachinery validation and the
container-image reference grammar): resource quantities, label keys and values, DNS-1123
subdomain names (Secrets, service accounts, priority classes) and image references. Each returns
None for a valid value, else the reason, for a message that names the config key.
"""

from __future__ import annotations

import re

_QUANTITY = re.compile(r"^[+]?(\d+(\.\d*)?|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?\d+)?$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DOMAIN = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?/)?"
_PATH = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
_IMAGE = re.compile(rf"^{_DOMAIN}{_PATH}(?::[\w][\w.-]{{0,127}})?(?:@sha256:[0-9a-f]{{64}})?$")


def quantity_problem(value: str) -> str | None:
    """A resource quantity ('4', '500m', '16Gi', '1e3')."""
    return None if _QUANTITY.match(value) else f"{value!r} is not a Kubernetes quantity (e.g. '4', '500m', '16Gi')"


def subdomain_problem(value: str) -> str | None:
    """An object name that must be a DNS-1123 subdomain (Secret, ServiceAccount, PriorityClass)."""
    if len(value) <= 253 and _SUBDOMAIN.match(value):
        return None
    return f"{value!r} is not a DNS-1123 subdomain (lower-case a-z, 0-9, '-', '.'; at most 253 characters)"


def label_key_problem(key: str) -> str | None:
    """A label (or node-selector, toleration) key: an optional DNS-1123 subdomain prefix and '/', then a name."""
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or subdomain_problem(prefix)):
        return f"{key!r}: the prefix before '/' must be a DNS-1123 subdomain"
    if len(name) > 63 or not _LABEL_NAME.match(name):
        return f"{key!r}: a label name has at most 63 characters a-z, A-Z, 0-9, '-', '_', '.', alphanumeric at both ends"
    return None


def label_value_problem(value: str) -> str | None:
    """A label value: empty, or at most 63 characters like a label name."""
    if value == "" or (len(value) <= 63 and _LABEL_NAME.match(value)):
        return None
    return f"{value!r}: a label value has at most 63 characters a-z, A-Z, 0-9, '-', '_', '.', alphanumeric at both ends"


def image_problem(reference: str) -> str | None:
    """A container image reference ([registry[:port]/]path[:tag][@sha256:digest], path lower-case)."""
    if _IMAGE.match(reference):
        return None
    return f"{reference!r} is not an image reference ([registry/]name[:tag][@sha256:digest], the name lower-case)"


# What an inline secret looks like. Each pattern is a credential's own published shape (or a URI's
# user:password@ / a signed URL's query), so ordinary values (paths, hub ids, image digests, hex
# hashes) never match. The reason names the kind of secret, never the value.
_SECRETS = (
    (re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/\s@:]+:[^/\s@]*@"), "a URI with user:password@"),
    (re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])"), "an AWS access key id"),
    (re.compile(r"(?i)aws_secret_access_key\s*[=:]"), "an AWS secret access key"),
    (re.compile(r"(?i)[?&](?:x-amz-signature|x-amz-credential|sig|signature|token|access_token|api_key|apikey|password)="),
     "a signed or token-carrying URL"),
    (re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{22,})"), "a GitHub token"),
    (re.compile(r"\bhf_[A-Za-z0-9]{30,}"), "a Hugging Face token"),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{20,}"), "an API key (sk-...)"),
    (re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"), "a Slack token"),
    (re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"), "a JSON Web Token"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/-]{16,}"), "a bearer token"),
)
_SECRET_NAME = re.compile(r"(?i)(^|_)(secret|passw(or)?d|token|api_?key|access_?key|private_?key|credentials?)(_|$)")


def inline_secret_problem(value: str) -> str | None:
    """A string that carries a credential (an AWS key, a token, user:password@ in a URI, a private
    key): the kind of secret found, for a message that names the key and never the value."""
    for pattern, kind in _SECRETS:
        if pattern.search(value):
            return f"holds {kind}"
    return None


def is_secret_name(name: str) -> bool:
    """An environment variable named like a secret: a `_`-separated part is one (`HF_TOKEN`,
    `DB_PASSWORD`, `API_KEY`; not `TOKENIZERS_PARALLELISM`)."""
    return bool(_SECRET_NAME.search(name))
