"""CAMMSR and its SASRec baseline (one model, switches in `ModelConfig`)."""

from cammsr.model.cammsr import CAMMSR, ModelConfig

__all__ = ["CAMMSR", "ModelConfig"]
