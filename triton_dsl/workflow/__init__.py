"""Train, quantize, freeze, evaluate, report and benchmark: the workflow behind the CLI."""
from .pipeline import build, evaluate_checkpoint, freeze_checkpoint, load_float_weights, ptq, train_model
from .textgen import generate

__all__ = ["build", "train_model", "ptq", "freeze_checkpoint", "evaluate_checkpoint",
           "load_float_weights", "generate"]
