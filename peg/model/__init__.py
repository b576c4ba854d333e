"""The encoder: a transformers model with pooling and normalisation."""

from peg.model.encoder import Encoder, model_config_for, resolve_model_path

__all__ = ["Encoder", "model_config_for", "resolve_model_path"]
