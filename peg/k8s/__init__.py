"""Kubernetes objects of a run (pure functions of `RunConfig`) and the cluster backend."""

from peg.k8s.names import resource_name
from peg.k8s.render import RenderError, check_renderable, cluster_stages, job_phase, render_config_map, render_run, render_stage
from peg.k8s.schema import run_config_schema

__all__ = [
    "RenderError",
    "check_renderable",
    "cluster_stages",
    "job_phase",
    "render_config_map",
    "render_run",
    "render_stage",
    "resource_name",
    "run_config_schema",
]
