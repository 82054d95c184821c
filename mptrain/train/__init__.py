"""The training recipe (set-up, the loop, the step, callbacks).

`mptrain.train` is also the Python API's entry point, `mptrain.train(overrides, model=..., ...)`: Python makes a
package's subpackage its attribute of that name once imported, so this package itself is what a call reaches;
it hands the call to mptrain.api.train (docs/python.md)."""

import sys
import types


class _TrainPackage(types.ModuleType):
    def __call__(self, overrides=None, *, model=None, datasets=None, task=None, callbacks=None) -> dict:
        from mptrain.api import train

        return train(overrides, model=model, datasets=datasets, task=task, callbacks=callbacks)


sys.modules[__name__].__class__ = _TrainPackage
