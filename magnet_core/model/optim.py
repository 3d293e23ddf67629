"""torch.optim without importing torch._dynamo: the compiler stack is ~1.2 s of CPU per process that never compiles.

Some ``torch.optim.Optimizer`` methods (``add_param_group``, ``zero_grad``, ``state_dict``, ``load_state_dict``) are
wrapped in ``torch._disable_dynamo``, whose wrapper imports ``torch._dynamo`` on the method's first call only to
exclude it from ``torch.compile`` (it then caches the excluded function as ``__dynamo_disable`` on the method). This
project never compiles, so while ``torch._dynamo`` is not loaded :func:`skip_dynamo_import` caches the method itself
there: the wrapper then calls it directly. The arithmetic is untouched (``tests/test_start_up.py`` checks that training
does not load ``torch._dynamo``; ``tests/test_training_numbers.py`` that the numbers stay the same).
"""

from __future__ import annotations

import sys

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
