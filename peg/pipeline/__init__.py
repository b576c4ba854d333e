"""The pipeline: stages declared once, run locally or on a cluster through a backend."""

from peg.pipeline.runner import (
    LocalBackend,
    StageFailed,
    pipeline_status,
    run_pipeline,
    run_stage_entrypoint,
    stage_hashes,
)
from peg.pipeline.runner import result_lines as pipeline_results
from peg.pipeline.stages import STAGES, Stage, StageContext, enabled_stages

__all__ = [
    "STAGES",
    "LocalBackend",
    "Stage",
    "StageContext",
    "StageFailed",
    "enabled_stages",
    "pipeline_results",
    "pipeline_status",
    "run_pipeline",
    "run_stage_entrypoint",
    "stage_hashes",
]
