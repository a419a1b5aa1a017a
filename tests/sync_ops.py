"""A CPU stand-in for CUDA's sync debugging: record the aten ops that make the host wait for the GPU when they run
on CUDA (a value read back, a data-dependent output size). What it cannot see on CPU: a device-to-host copy
(`.cpu()`, `.tolist()`), which is the same op as any CPU copy here."""
from torch.utils._python_dispatch import TorchDispatchMode

SYNCING_OPS = {"aten::_local_scalar_dense",  # .item(), bool(t), float(t), `if t:`
               "aten::is_nonzero", "aten::equal", "aten::nonzero", "aten::bincount", "aten::masked_select",
               "aten::unique_consecutive", "aten::_unique2", "aten::unique_dim", "aten::repeat_interleave"}


class SyncOps(TorchDispatchMode):
    """`with SyncOps() as ops:` ... -> ops.found: the syncing ops run inside, in order (none while `paused`)."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if not self.paused and name in SYNCING_OPS:
            self.found.append(name)
        return func(*args, **(kwargs or {}))
