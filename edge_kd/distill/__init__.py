"""Distillation: the Distiller model, the loss-term registry and teacher adapters."""
from edge_kd.distill import losses
from edge_kd.distill.distiller import Distiller, hinton
from edge_kd.distill.teacher import adapt_teacher, load_teacher, logits_model

__all__ = ["Distiller", "hinton", "losses", "adapt_teacher", "load_teacher", "logits_model"]
