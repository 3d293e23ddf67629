"""torch.optim without importing torch._dynamo: the compiler stack is ~1.2 s of CPU per process that never compiles.

Some ``torch.optim.Optimizer`` methods (``add_param_group``, ``zero_grad``, ``state_dict``, ``load_state_dict``) are
wrapped in ``torch._disable_dynamo``, whose wrapper imports ``torch._dynamo`` on the method's first call only to
exclude it from ``torch.compile`` (it then caches the excluded function as ``__dynamo_disable`` on the method). This
project never compiles, so while ``torch._dynamo`` is not loaded :func:`skip_dynamo_import` caches the method itself
there: the wrapper then calls it directly. The arithmetic is untouched (``tests/test_start_up.py`` checks that training
does not load ``torch._dynamo``; ``tests/test_training_numbers.py`` that the numbers stay the same).

``Optimizer.step`` is different: torch wraps every optimiser's step in a function that imports ``torch._dynamo`` on
each call. :func:`adam` (what training uses) is a ``torch.optim.Adam`` whose step runs the same single-tensor update
itself, so training loads no compiler stack either (``tests/test_optim.py``: the same numbers and state bit for bit).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_done = False


def skip_dynamo_import() -> bool:
    """Mark torch.optim's dynamo-disabled methods as already disabled (once per process, and only while
    ``torch._dynamo`` is not imported: once it is, nothing is changed). True if they were marked."""
    global _done
    if _done:
        return True
    if "torch._dynamo" in sys.modules:
        return False
    import torch

    inner_code = torch._disable_dynamo(lambda: None).__code__  # the code of the wrapper torch puts around methods
    for cls in (torch.optim.Optimizer,):
        for value in vars(cls).values():
            fn = getattr(value, "__wrapped__", None)
            if fn is not None and getattr(value, "__code__", None) is inner_code:
                fn.__dynamo_disable = fn
    _done = True
    return True


def _adam_update(param: "torch.Tensor", grad: "torch.Tensor", exp_avg: "torch.Tensor", exp_avg_sq: "torch.Tensor",
                 step: float, lr: float, beta1: float, beta2: float, weight_decay: float, eps: float) -> None:
    """``torch.optim.adam._single_tensor_adam``'s update of one parameter (float hyper-parameters; no amsgrad,
    maximize, capturable, differentiable; coupled weight decay): the same operations on the same values, in order."""
    if weight_decay != 0:
        grad = grad.add(param, alpha=weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


def _make_adam():
    import torch

    class Adam(torch.optim.Adam):
        """``torch.optim.Adam`` (its state, state_dict, hooks and hyper-parameters) whose step calls the single-tensor
        update (:func:`_adam_update`) directly: the same numbers bit for bit, without the step wrapper that imports
        ``torch._dynamo`` (~1.2 s of CPU per process) and re-dispatches per call. Settings it does not cover (amsgrad,
        maximize, capturable, differentiable, fused, foreach, decoupled weight decay, tensor hyper-parameters, complex
        or non-float32 parameters, a closure) run ``torch.optim.Adam.step`` itself."""

        def __init__(self, params, lr: float, weight_decay: float = 0.0):
            super().__init__(params, lr=lr, weight_decay=weight_decay)

        @staticmethod
        def _covered(group: dict) -> bool:
            plain = not (group["amsgrad"] or group["maximize"] or group["capturable"] or group["differentiable"]
                         or group["fused"] or group["foreach"] or group.get("decoupled_weight_decay", False))
            floats = all(isinstance(group[k], float) for k in ("lr", "weight_decay", "eps")) and all(
                isinstance(b, float) for b in group["betas"])
            return plain and floats and all(p.dtype == torch.float32 for p in group["params"])

        def step(self, closure=None):  # type: ignore[override]
            if closure is not None or not all(self._covered(g) for g in self.param_groups):
                return super().step(closure)
            with torch.no_grad():
                for group in self.param_groups:
                    params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps = [], [], [], [], [], []
                    self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps)
                    beta1, beta2 = group["betas"]
                    for p, g, m, v, t in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
                        t += 1
                        _adam_update(p, g, m, v, t.item(), group["lr"], beta1, beta2, group["weight_decay"],
                                     group["eps"])
            return None

    return Adam


_adam_class = None


def adam(params, lr: float, weight_decay: float = 0.0):
    """An optimiser equal to ``torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)`` in every number, with a
    leaner step (see :func:`_make_adam`; the class is made on first use, so importing this module loads no torch)."""
    global _adam_class
    if _adam_class is None:
        _adam_class = _make_adam()
    return _adam_class(params, lr=lr, weight_decay=weight_decay)


class GradientStep:
    """One step of plain gradient descent of size 1 with coupled weight decay: ``p -= grad + weight_decay * p`` for
    every parameter the loss reached (torch.optim.SGD(lr=1, weight_decay=...)'s numbers, without its step wrapper).
    After one step from ``w`` the update is minus the full-batch gradient at ``w`` (fedsgd's site update)."""

    def __init__(self, params, weight_decay: float = 0.0):
        self.params = [p for p in params]
        self.weight_decay = float(weight_decay)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        import torch

        with torch.no_grad():
            for p in self.params:
                if p.grad is not None:
                    p.sub_(p.grad.add(p, alpha=self.weight_decay) if self.weight_decay else p.grad)
