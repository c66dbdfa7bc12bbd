"""Test-session setup that must happen before mmdat is imported."""
import os

import torch

# Without a GPU the Triton kernels (attn_impl='fused') run in Triton's CPU interpreter, which is
# chosen when a kernel is defined, i.e. when mmdat is imported.
if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')
