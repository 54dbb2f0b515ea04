import os

import torch

# The interpreter must be on before any kernel is defined; on a GPU run the real compiler.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
