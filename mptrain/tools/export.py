"""`mptrain-export RUN_DIR [--format safetensors|torchscript|onnx|pt2] [--checkpoint NAME] [--ema] [overrides]`.

Writes RUN_DIR/export/: `model.safetensors` (the weights, in float32, loadable without mptrain:
`safetensors.torch.load_file`), `model_config.yaml` (the resolved model config with what the data filled in,
the task and the example input), and for the program formats `model.ts` (torch.jit.trace), `model.onnx`
(torch.onnx, dynamo exporter) or `model.pt2` (torch.export). Every export is checked: its outputs on a batch
of the validation set (a GAN: on noise) against the checkpoint's model, bitwise for the weights and within
float32 tolerance for a program. The model is exported in float32 (master weights where the run kept them;
with `--ema` the checkpoint's fp32 average, trainer.ema); a program takes inputs of the example's shape.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch
import yaml
from omegaconf import OmegaConf
from torch import nn

from mptrain.errors import ConfigError, MptrainError
from mptrain.parallel import distributed
from mptrain.precision import Precision
from mptrain.run.layout import EXPORT, umask_mode
from mptrain.tools.trained import (
    checkpoint_path,
    load_checkpoint,
    load_weights,
    quiet,
    require_ema,
    restore_plan,
    run_config,
    tool_main,
)
from mptrain.train.recipe import build, build_model

FORMATS = ("safetensors", "torchscript", "onnx", "pt2")
PROGRAM_FILE = {"torchscript": "model.ts", "onnx": "model.onnx", "pt2": "model.pt2"}
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "model_config.yaml"
# every file an export may write (onnx keeps large weights in model.onnx.data): a new export replaces them all
EXPORT_FILES = (WEIGHTS_FILE, CONFIG_FILE, *PROGRAM_FILE.values(), "model.onnx.data")
RTOL, ATOL = 1e-4, 1e-5  # a program's float32 outputs against the module's (kernels may differ in order)
EXAMPLE_BATCH = 8


class ExportError(MptrainError):
    """The export could not be written, or its outputs differ from the checkpoint's model."""

    exit_code = 1


def require(module: str, extra: str = "export"):
    try:
        return __import__(module)
    except ImportError:
        raise ConfigError(f"this export needs {module}: pip install mptrain[{extra}]") from None


def example_input(c, task_name: str) -> torch.Tensor:
    """What the model's forward takes: the inputs of the first validation batch (up to 8), or a GAN's noise."""
    model = c.base_model
    if task_name == "gan":
        return torch.randn(EXAMPLE_BATCH, model.latent_dim, generator=torch.Generator().manual_seed(0)).to(c.device)
    if c.val_loader is None:
        raise ConfigError("the dataset has no validation set to take an example batch from")
    batch = next(iter(c.val_loader))
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(x, torch.Tensor):
        raise ConfigError(f"the model takes a {type(x).__name__} batch; export handles models that take one tensor")
    return c.to_device(x[:EXAMPLE_BATCH])


def weights_dtype(model: nn.Module) -> str | list[str]:
    """The floating dtype(s) the weights are saved in: float32 unless a precision override said otherwise."""
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in model.state_dict().values() if v.is_floating_point()})
    return dtypes[0] if len(dtypes) == 1 else dtypes


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def check_close(name: str, got: torch.Tensor, want: torch.Tensor, exact: bool = False) -> float:
    if tuple(got.shape) != tuple(want.shape):
        raise ExportError(f"{name}: output shape {tuple(got.shape)} differs from the model's {tuple(want.shape)}")
    diff = max_diff(got, want)
    ok = torch.equal(got, want) if exact else torch.allclose(got.float(), want.float(), rtol=RTOL, atol=ATOL)
    if not ok:
        raise ExportError(f"{name}: outputs differ from the checkpoint's model by up to {diff:.3g} "
                          f"({'bitwise' if exact else f'rtol {RTOL}, atol {ATOL}'} check); the export is not faithful")
    return diff


def write_program(fmt: str, model: nn.Module, x: torch.Tensor, path: Path) -> torch.Tensor:
    """Write the program of `fmt` to `path`, load it back and return its output on `x`."""
    if fmt == "torchscript":
        traced = torch.jit.trace(model, (x,), check_trace=False)
        torch.jit.save(traced, str(path))
        return torch.jit.load(str(path), map_location=x.device)(x)
    if fmt == "pt2":
        program = torch.export.export(model, (x,))
        torch.export.save(program, str(path))
        return torch.export.load(str(path)).module()(x)
    require("onnx")
    ort = require("onnxruntime")
    require("onnxscript")
    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: x.cpu().numpy()})[0]).to(x.device)


def export(run_dir: Path, fmt: str = "safetensors", checkpoint: str | None = None,
           overrides: list[str] | None = None, out_dir: Path | None = None, ema: bool = False) -> dict:
    """Write and check the export; returns what model_config.yaml records (plus the check's figures)."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt} is not one of {', '.join(FORMATS)}")
    require("safetensors")
    import safetensors.torch  # noqa: F401  (the torch helpers are a submodule)

    run_dir, overrides = Path(run_dir), list(overrides or [])
    if fmt == "onnx":  # every module the format needs, before anything is written
        for module in ("onnx", "onnxruntime", "onnxscript"):
            require(module)
    out = Path(out_dir) if out_dir is not None else run_dir / EXPORT
    check_out(out)
    if not any(o.lstrip("+").startswith("precision=") for o in overrides):
        overrides = ["precision=fp32", *overrides]  # the exported model is float32 (masters where the run kept them)
    cfg = run_config(run_dir, overrides)
    path = checkpoint_path(run_dir, checkpoint)
    ckpt = load_checkpoint(path)
    if ema:
        require_ema(ckpt, path)
    start = time.perf_counter()
    c = build(cfg, training=False)
    try:
        model = c.base_model
        restore_plan(c.precision, ckpt)
        load_weights(model, ckpt, path, ema=ema)
        model.eval()
        x = example_input(c, c.task.name)
        with torch.no_grad():
            want = model(x)
        made = not out.exists()
        try:
            out.mkdir(parents=True, exist_ok=True)
            stage = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
        except OSError as e:
            raise ConfigError(
                f"--out {out}: cannot write there ({e.strerror or e}); give a writable directory"
            ) from None
        try:
            record = _write(fmt, model, x, want, stage, cfg, c, ckpt, path, run_dir, ema)
            record["wall_s"] = round(time.perf_counter() - start, 3)
            (stage / CONFIG_FILE).write_text(yaml.safe_dump(record, sort_keys=False))
            commit(stage, out)
        except BaseException:  # the export is all or nothing: out as it was (gone, if this call made it)
            shutil.rmtree(out if made else stage, ignore_errors=True)
            raise
        record["out_dir"] = str(out)
        return record
    finally:
        distributed.teardown(c.dist)


def check_out(out: Path) -> None:
    """--out is a directory, or a path where one can be made: one line otherwise, before anything is read."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory (the export writes {WEIGHTS_FILE}, {CONFIG_FILE} "
                          "and the program into it)")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ConfigError(f"--out {out}: {parent} is a file; give a directory")


def commit(stage: Path, out: Path) -> None:
    """Move a finished export in: an earlier export's files go (a model.onnx of another checkpoint must not stay
    beside the new weights), each file gets an ordinary new file's mode (safetensors writes 0600), and
    model_config.yaml, which describes the rest, comes last."""
    for name in EXPORT_FILES:
        if not (stage / name).exists():
            (out / name).unlink(missing_ok=True)
    mode = umask_mode()
    names = sorted((p.name for p in stage.iterdir()), key=lambda n: n == CONFIG_FILE)
    for name in names:
        os.chmod(stage / name, mode)
        os.replace(stage / name, out / name)
    stage.rmdir()


def _write(fmt: str, model: nn.Module, x: torch.Tensor, want: torch.Tensor, out: Path, cfg, c, ckpt: dict,
           path: Path, run_dir: Path, ema: bool) -> dict:
    """The weights (checked by loading them into a freshly built model), the program of `fmt`, and what
    model_config.yaml records, all into `out` (the staging folder)."""
    st = require("safetensors")
    # the weights, checked by loading them into a freshly built model
    weights_file = out / WEIGHTS_FILE
    meta = {"checkpoint": str(path), "step": str(ckpt["train_state"]["step"]), "format": "mptrain",
            "weights": "ema" if ema else "live"}
    st.torch.save_model(model, str(weights_file), metadata=meta)
    # its own Precision: one prepares a single model (a low-precision preset's input casts are hooked once)
    with quiet():  # the same model and plan again: said once, above
        fresh_precision = Precision(cfg.precision, c.device)
        fresh = build_model(cfg, c.task, c.device, fresh_precision, c.model_facts).eval()
        restore_plan(fresh_precision, ckpt)
    missing, unexpected = st.torch.load_model(fresh, str(weights_file), strict=True)
    with torch.no_grad():
        weights_diff = check_close("model.safetensors", fresh(x), want, exact=True)

    record = {
        "model": {**OmegaConf.to_container(cfg.model, resolve=True), **c.model_facts},
        "task": c.task.name,
        "checkpoint": str(path.relative_to(run_dir)),
        "step": ckpt["train_state"]["step"],
        "trained_precision": ckpt["config"].get("precision", {}).get("mode"),
        "ema": ema,
        "dtype": weights_dtype(model),
        "input": {"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")},
        "output": {"shape": list(want.shape)},
        "files": {"weights": weights_file.name},
        "check": {"weights_max_abs_diff": weights_diff},
    }
    if fmt != "safetensors":
        program_file = out / PROGRAM_FILE[fmt]
        try:
            # the exporters' progress prints and deprecation notes are not the user's business
            with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                got = write_program(fmt, model, x, program_file)
        except MptrainError:
            raise
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(f"{type(model).__name__} cannot be exported as {fmt} ({type(e).__name__}: {first}); "
                              "nothing was written; try another --format") from None
        record["files"][fmt] = program_file.name
        record["check"][f"{fmt}_max_abs_diff"] = check_close(program_file.name, got, want)
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mptrain-export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory (outputs/<date>/<time>-<id>)")
    parser.add_argument("overrides", nargs="*", help="config changes, e.g. trainer.device=cpu")
    parser.add_argument("--format", default="safetensors", choices=FORMATS,
                        help="safetensors: the weights only; torchscript | onnx | pt2: a program besides them")
    parser.add_argument("--checkpoint", help="checkpoints/<NAME> (default best.pt, else last.pt)")
    parser.add_argument("--ema", action="store_true",
                        help="export the checkpoint's EMA weights (trainer.ema) instead of the live ones")
    parser.add_argument("--out", type=Path, help="where to write (default RUN_DIR/export)")
    args = parser.parse_intermixed_args(argv)  # options anywhere among the overrides

    def body() -> None:
        r = export(args.run_dir, args.format, args.checkpoint, args.overrides, args.out, args.ema)
        checks = ", ".join(f"{k.removesuffix('_max_abs_diff')} max |diff| {v:.3g}" for k, v in r["check"].items())
        print(
            f"exported {r['checkpoint']} (step {r['step']}{', EMA weights' * r['ema']}) to {r['out_dir']}: "
            f"{', '.join(r['files'].values())}, "
            f"model_config.yaml; checked on a batch of {r['input']['shape']}: {checks}"
        )

    tool_main("mptrain-export", body)


if __name__ == "__main__":
    main()
