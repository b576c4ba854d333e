"""The pipeline: stages declared once, run locally or on a cluster through a backend."""

from peg.pipeline.context import StageContext
from peg.pipeline.runner import (
    LocalBackend,
    StageFailed,
    current_lease,
    pipeline_status,
    run_pipeline,
    run_stage_entrypoint,
    stage_hashes,
)
from peg.pipeline.results import result_lines as pipeline_results
from peg.pipeline.stages import STAGES, Stage, enabled_stages

__all__ = [
    "STAGES",
    "LocalBackend",
    "Stage",
    "StageContext",
    "StageFailed",
    "current_lease",
    "enabled_stages",
    "pipeline_results",
    "pipeline_status",
    "run_pipeline",
    "run_stage_entrypoint",
    "stage_hashes",
]
