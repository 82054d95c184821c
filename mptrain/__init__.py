"""mptrain: train neural networks in mixed precision, with diagnostics of what FP16 does to them.

Importing it does nothing else: the CLI (mptrain.cli.main) registers configs and sets its environment at start,
and the Python API (`mptrain.train`, `evaluate`, `sample`, `Callback`; docs/python.md) is imported on first use."""

__version__ = "0.1.0"

# name -> the module that defines it, imported when first asked for (PEP 562): `import mptrain` stays cheap.
# `train` is the mptrain.train package itself, which is callable (mptrain/train/__init__.py): Python would put
# the package under that name anyway once anything imports it.
_LAZY = {"evaluate": "mptrain.api", "sample": "mptrain.api", "Callback": "mptrain.train.callbacks.base"}
__all__ = ["__version__", "train", *_LAZY]


def __getattr__(name: str):
    import importlib

    if name == "train":
        return importlib.import_module("mptrain.train")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mptrain' has no attribute {name!r}")
