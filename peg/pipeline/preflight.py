"""Checks that run before any stage starts: what would otherwise fail minutes into a stage.

`check_before_run` names the config file, line and key (or the model) in one line: the encoder
must be loadable (a folder with `config.json`, a packaged or cached hub id, or a reachable hub),
its max lengths must fit its position embeddings, and every enabled LLM stage's model must exist.
`check_pipeline_training` refuses a pipeline whose train stage would get examples without negatives.
"""

from __future__ import annotations

import json
from pathlib import Path

from peg.config import ConfigError, RunConfig, key_location
from peg.llm.loading import check_model_source
from peg.model import check_model, resolve_model_path

# Models whose position ids start after the padding index: max_position_embeddings - 2 usable positions.
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer", "mpnet", "data2vec-text"}


def model_positions(name_or_path: str) -> int | None:
    """How many tokens the model can read (from its `config.json`), None when it is not local."""
    config_file = Path(resolve_model_path(name_or_path)) / "config.json"
    if not config_file.is_file():
        return None
    settings = json.loads(config_file.read_text())
    positions = settings.get("max_position_embeddings")
    if not isinstance(positions, int):
        return None
    return positions - 2 if settings.get("model_type") in _OFFSET_POSITIONS else positions


def check_before_run(config: RunConfig, config_path: Path) -> None:
    """Raise a bad-input PegError (ModelError, ConfigError, LLMError) before any work starts."""
    check_model(config.model.name_or_path)
    positions = model_positions(config.model.name_or_path)
    lengths = {"model.query_max_length": config.model.query_max_length,
               "model.passage_max_length": config.model.passage_max_length}
    if config.pretrain.enabled:
        lengths["pretrain.max_length"] = config.pretrain.max_length
    for key, length in lengths.items():
        if positions is not None and length > positions:
            raise ConfigError(f"{key_location(config_path, key)}: {key} ({length}) exceeds the {positions} positions "
                              f"of model {config.model.name_or_path}")
    for stage, llm in (("judge", config.judge.llm), ("synth", config.synth.llm)):
        if getattr(config, stage).enabled:
            check_model_source(llm)
    if config.score.enabled and config.score.teacher != "cross_encoder":
        check_model_source(config.score.llm)


def check_pipeline_training(config: RunConfig, config_path: Path) -> None:
    """ConfigError when the pipeline's train stage would read synth's pairs, which carry no
    negatives, beside the mined ones (`data.train_queries: human` with `synth.enabled`, see
    `peg.pipeline.stages.training_inputs`) while `batch.hard_negatives` asks for some: the trainer
    would stop on them only after every LLM stage had run. (`peg train` alone reads only
    `data.train_files`, so the config itself is not refused.)"""
    if config.synth.enabled and config.data.train_queries == "human" and config.batch.hard_negatives > 0:
        raise ConfigError(
            f"{key_location(config_path, 'data.train_queries')}: data.train_queries human with synth.enabled trains on "
            f"synth's pairs as written, without negatives, but batch.hard_negatives is {config.batch.hard_negatives}: "
            "set data.train_queries both (mining gives the synthetic queries negatives too) or batch.hard_negatives 0"
        )
