"""What the distillation tests share: float64 NumPy references and the one-line-error check of the term registry."""
import numpy as np
import pytest

from edge_kd.distill import losses
from edge_kd.errors import UserError


def np_log_softmax(z):
    """log softmax over the last axis, in float64."""
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_kl(t_logits, s_logits, T):
    """Per-sample KL(softmax(t/T) ‖ softmax(s/T)) in float64."""
    lt, ls = np_log_softmax(np.asarray(t_logits, np.float64) / T), np_log_softmax(np.asarray(s_logits, np.float64) / T)
    return (np.exp(lt) * (lt - ls)).sum(-1)


def np_ce(y, s_logits):
    """Mean cross-entropy of integer labels ``y`` under ``s_logits``."""
    return float(-np_log_softmax(s_logits)[np.arange(len(y)), y].mean())


def assert_one_line_user_error(name, params, words):
    """``losses.get(name, **params)`` raises a one-line UserError holding every one of ``words``."""
    with pytest.raises(UserError) as info:
        losses.get(name, **params)
    msg = str(info.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg
