"""mptrain: train neural networks in mixed precision, with diagnostics of what FP16 does to them."""

__version__ = "0.1.0"
