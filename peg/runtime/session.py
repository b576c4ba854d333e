"""Ray session: embedded locally, or the cluster named by RAY_ADDRESS (a KubeRay RayJob sets it)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import ray

_scope = {"open": False, "started": False}


@contextmanager
def ray_scope() -> Iterator[None]:
    """Share one Ray session among the `ray_session` calls inside, started by the first that runs
    and stopped when the scope ends; if none runs (every input cached or small enough to encode
    in this process), Ray never starts."""
    if ray.is_initialized() or _scope["open"]:
        yield
        return
    _scope.update(open=True, started=False)
    try:
        yield
    finally:
        started = _scope["started"]
        _scope.update(open=False, started=False)
        if started and ray.is_initialized():
            ray.shutdown()


@contextmanager
def ray_session(num_cpus: int | None = None) -> Iterator[None]:
    """Use the running Ray session if there is one; else connect or start one, and stop it after
    (or, inside `ray_scope`, when the scope ends).

    With RAY_ADDRESS set, connects to that cluster (`num_cpus` is ignored: the cluster has its own
    resources); otherwise starts an embedded Ray on this machine without the dashboard.
    """
    if ray.is_initialized():
        yield
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    if _scope["open"]:
        _scope["started"] = True
        yield
        return
    try:
        yield
    finally:
        ray.shutdown()
