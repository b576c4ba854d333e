"""The one Kubernetes client set-up of peg: the cluster backend (`peg submit`, `peg pipeline run
--backend k8s`) and the operator both connect here.

Credentials are tried in this order, and the first that exists is used:

1. the kubeconfig file named by `KUBECONFIG`, when it is set (an explicit choice wins);
2. the pod's service account (in-cluster config), when peg runs in a pod;
3. the default kubeconfig, `~/.kube/config`.

A kubeconfig that exists but is not valid YAML is an error naming the file and line; it is not
skipped for the next source.
"""

from __future__ import annotations

import os
from typing import Any

import yaml

from peg.errors import PegError


class ClusterError(PegError, RuntimeError):
    """The Kubernetes API refused a request, or is unreachable."""


def connect() -> None:
    """Configure the `kubernetes` client's default credentials (order in the module docstring).

    ClusterError when no source is usable, or when a kubeconfig is not valid YAML.
    """
    from kubernetes import config

    explicit = os.environ.get("KUBECONFIG")  # read now: the client reads it once, at its import
    sources = [(explicit, lambda: config.load_kube_config(config_file=explicit))] if explicit else []
    sources += [
        ("the pod's service account", config.load_incluster_config),
        ("~/.kube/config", lambda: config.load_kube_config(config_file=os.path.expanduser("~/.kube/config"))),
    ]
    tried = []
    for where, load in sources:
        try:
            load()
            return
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            raise ClusterError(f"kubeconfig {where}{f':{mark.line + 1}' if mark else ''}: invalid YAML "
                               f"({getattr(e, 'problem', None) or e})") from None
        except (config.ConfigException, FileNotFoundError, TypeError) as e:
            tried.append(f"{where}: {e}")
    raise ClusterError(f"no Kubernetes access: {'; '.join(tried)}")


def kubernetes_apis() -> tuple[Any, Any]:
    """(CustomObjectsApi, CoreV1Api) on the credentials `connect` finds."""
    from kubernetes import client

    connect()
    return client.CustomObjectsApi(), client.CoreV1Api()
