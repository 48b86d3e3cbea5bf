"""The decoder: a mapping network from an embedding to an LM prefix, and the LM that reads it."""

from capdec.model.capdec import IGNORE_INDEX, CapDecModel, ModelConfig, build_model, model_from_config
from capdec.model.mapper import MLPMapper, RetrievalFusion, TransformerMapper

__all__ = ["IGNORE_INDEX", "CapDecModel", "MLPMapper", "RetrievalFusion", "ModelConfig", "TransformerMapper", "build_model",
           "model_from_config"]
