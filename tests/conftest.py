import os
import sys

import torch

# Without a GPU the Triton kernels run on the CPU through the interpreter; with one they compile
# for real (set TRITON_INTERPRET yourself to override). Must happen before triton is imported.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, os.path.dirname(__file__))
