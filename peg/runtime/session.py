"""Ray session: embedded locally, or the cluster named by RAY_ADDRESS (a KubeRay RayJob sets it)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import ray


@contextmanager
def ray_session(num_cpus: int | None = None) -> Iterator[None]:
    """Use the running Ray session if there is one; else connect or start one, and stop it after.

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
    try:
        yield
    finally:
        ray.shutdown()
