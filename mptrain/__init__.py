"""mptrain: train neural networks in mixed precision, with diagnostics of what FP16 does to them."""

import os

# PyTorch's CPU allocator backs buffers of 2 MB and more with transparent huge pages only when this is set,
# and reads it once, at its first allocation: so it is set here, before anything imports torch. On the
# development VM it made CPU training steps faster and run-to-run speed far steadier (page faults per step
# fell ~10x; docs/benchmarks.md). THP_MEM_ALLOC_ENABLE=0 in the environment opts out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
