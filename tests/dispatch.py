"""`RecordOps`: a torch dispatch mode that records the operations run in the thread it is
entered in, for tests that check where torch work happens (tests/test_stages.py,
tests/test_masks_on_device.py)."""

from __future__ import annotations

import threading

from torch.utils._python_dispatch import TorchDispatchMode


class RecordOps(TorchDispatchMode):
    """Appends ``(thread name, op name)`` to `seen` for each torch operation that does work
    while it is active in its thread. Views and no-op conversions are left out: what
    `torch.from_numpy` and `Tensor.numpy()` dispatch under a mode, and a `to` that returned
    its input (a `to` that copied is work)."""

    VIEWS = {"aten.lift_fresh.default", "aten.detach.default", "aten.resolve_conj.default",
             "aten.resolve_neg.default", "aten.to.dtype_layout"}  # fmt: skip

    def __init__(self, seen: list) -> None:
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        same = name != "aten.to.dtype_layout" or out is args[0]
        if name not in self.VIEWS or not same:
            self.seen.append((threading.current_thread().name, name))
        return out
