"""The one Kubernetes client set-up (`peg.k8s.client.connect`): its credential order, and its errors."""

from __future__ import annotations

import pytest
from kubernetes import config

from peg.k8s.client import ClusterError, connect


@pytest.fixture
def sources(monkeypatch, tmp_path):
    """Replaces the client's loaders; `available` names the sources that exist; returns the tries made."""
    tried: list[str] = []
    available: set[str] = set()
    monkeypatch.setenv("HOME", str(tmp_path))

    def kube(config_file=None):
        tried.append(config_file)
        if config_file not in available:
            raise config.ConfigException(f"{config_file}: no such kubeconfig")

    def incluster():
        tried.append("in-cluster")
        if "in-cluster" not in available:
            raise config.ConfigException("not in a pod")

    monkeypatch.setattr(config, "load_kube_config", kube)
    monkeypatch.setattr(config, "load_incluster_config", incluster)
    return tried, available, str(tmp_path / ".kube" / "config")


def test_an_explicit_kubeconfig_wins_over_the_service_account(sources, monkeypatch):
    tried, available, _ = sources
    monkeypatch.setenv("KUBECONFIG", "/k/config")
    available |= {"/k/config", "in-cluster"}
    connect()
    assert tried == ["/k/config"]


def test_in_a_pod_the_service_account_comes_before_the_default_kubeconfig(sources, monkeypatch):
    tried, available, default = sources
    monkeypatch.delenv("KUBECONFIG", raising=False)
    available |= {"in-cluster", default}
    connect()
    assert tried == ["in-cluster"]


def test_outside_a_pod_the_default_kubeconfig_is_used(sources, monkeypatch):
    tried, available, default = sources
    monkeypatch.delenv("KUBECONFIG", raising=False)
    available.add(default)
    connect()
    assert tried == ["in-cluster", default]


def test_no_source_names_each_one_tried(sources, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", "/k/config")
    with pytest.raises(ClusterError, match=r"no Kubernetes access: /k/config: .*; the pod's service account: not in a pod; ~/.kube/config"):
        connect()


def test_a_kubeconfig_that_is_not_yaml_is_an_error_not_skipped(monkeypatch, tmp_path):
    (tmp_path / "kubeconfig").write_text("clusters: [unclosed\n")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
    monkeypatch.setattr(config, "load_incluster_config", lambda: pytest.fail("the service account was tried"))
    with pytest.raises(ClusterError, match=r"/kubeconfig:2: invalid YAML"):
        connect()
