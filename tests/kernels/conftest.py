"""Kernel tests run Triton's interpreter on CPU tensors.

Triton picks interpreter or compiler when it is first imported, so ``TRITON_INTERPRET=1`` is set here, before any
kernel module imports ``triton``. If something imported triton earlier in compiled mode (``torch.compile`` /
``torch._dynamo`` do), the interpreter tests skip with that reason; run
``TRITON_INTERPRET=1 python -m pytest tests/kernels`` then. The ahead-of-time compile test runs in a subprocess
with ``TRITON_INTERPRET`` unset, so both work in one session.
"""

import os
import sys

if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"
