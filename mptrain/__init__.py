"""mptrain: train neural networks in mixed precision, with diagnostics of what FP16 does to them.

Importing it does nothing else: the CLI (mptrain.cli.main) registers configs and sets its environment at start."""

__version__ = "0.1.0"
