"""CAMMSR and its SASRec baseline (one model, switches in `ModelConfig`)."""

from cammsr.model.cammsr import CAMMSR, ModelConfig, ModelOutput

__all__ = ["CAMMSR", "ModelConfig", "ModelOutput"]
