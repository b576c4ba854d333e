"""The encoder: a transformers model with pooling and normalisation."""

from peg.model.encoder import Encoder, ModelError, check_model, clip_text, model_config_for, resolve_model_path

__all__ = ["Encoder", "ModelError", "check_model", "clip_text", "model_config_for", "resolve_model_path"]
