"""`torch.backends.mkldnn.enabled` switched for a block. `torch.backends.mkldnn.flags()` also
re-sets oneDNN's TF32 switch, which warns on every torch build without Intel GPU support."""
import contextlib

import torch


@contextlib.contextmanager
def onednn(enabled: bool):
    old = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = old
