"""Distillation: the Distiller model, the loss-term registry and teacher adapters."""
from edge_kd.distill import losses
from edge_kd.distill.distiller import Distiller, alpha_weights, hinton
from edge_kd.distill.teacher import adapt_teacher, load_teacher, logits_model

__all__ = ["Distiller", "alpha_weights", "hinton", "losses", "adapt_teacher", "load_teacher", "logits_model"]
