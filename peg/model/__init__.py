"""The encoder: a transformers model with pooling and normalisation."""

from peg.model.encoder import Encoder, resolve_model_path

__all__ = ["Encoder", "resolve_model_path"]
