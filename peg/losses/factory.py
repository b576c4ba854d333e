"""Build the configured loss from the run config's `loss` section (duck-typed `LossConfig`)."""

from __future__ import annotations

from typing import Any

from peg.losses.base import EmbeddingLoss
from peg.losses.infonce import InfoNCELoss
from peg.losses.listwise import ListwiseDistillationLoss
from peg.losses.matryoshka import MatryoshkaLoss
from peg.losses.progressive import ProgressiveInfoNCELoss


def build_loss(loss_config: Any, normalize: bool = True) -> EmbeddingLoss:
    """`loss.kind` infonce -> InfoNCE (progressive if `loss.progressive.enabled`); listwise -> listwise;
    wrapped in `MatryoshkaLoss` over `loss.matryoshka_dims` when set (`normalize`: the encoder
    L2-normalises, so each prefix is normalised again)."""
    inner = _base_loss(loss_config)
    if not loss_config.matryoshka_dims:
        return inner
    return MatryoshkaLoss(inner, loss_config.matryoshka_dims, loss_config.matryoshka_weights, normalize)


def _base_loss(loss_config: Any) -> EmbeddingLoss:
    if loss_config.kind == "listwise":
        lw = loss_config.listwise
        return ListwiseDistillationLoss(
            teacher_temperature=lw.teacher_temperature,
            student_temperature=lw.student_temperature,
            nce_weight=lw.nce_weight,
            nce_temperature=lw.nce_temperature,
            false_negative_ratio=lw.false_negative_ratio,
        )
    if loss_config.kind != "infonce":
        raise ValueError(f"loss.kind: unknown loss {loss_config.kind!r}")
    pg = loss_config.progressive
    if not pg.enabled:
        return InfoNCELoss(temperature=loss_config.temperature)
    return ProgressiveInfoNCELoss(
        temperature=loss_config.temperature,
        beta_start=pg.beta_start,
        beta_end=pg.beta_end,
        schedule=pg.schedule,
        stages=pg.stages,
        self_paced=pg.self_paced,
        pace_start=pg.pace_start,
        pace_sharpness=pg.pace_sharpness,
    )
