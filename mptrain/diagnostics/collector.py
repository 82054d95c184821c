"""Diagnostics during training: sampled gradient statistics, update underflow, activation-gradient
histograms, and overflow provenance. Writes diagnostics.jsonl and TensorBoard.

Cost model: on steps that are not sampled nothing happens here (no hooks are registered, nothing is
read from the device). On a sampled step the statistics take a few kernels and one host copy.

Under FSDP2 (`ranks` given) every rank runs the diagnostics and rank 0 writes: each sharded gradient and weight
is all-gathered for the statistics, the shadow gathers each module's weights for its measurement, and each
rank's per-module figures of its own micro-batch are merged into the global batch's with one gather per sampled
step (largest ranges, summed histograms, the worst shadow error). All ranks meet these collectives in the same
order.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from mptrain.diagnostics.ranges import ModuleRanges
from mptrain.diagnostics.shadow import FIELDS as SHADOW_FIELDS
from mptrain.diagnostics.shadow import Figures, Shadow, check_formats, whole
from mptrain.diagnostics.stats import (
    BIN_LABELS,
    EXPONENTS,
    N_BINS,
    bin_index,
    count_bins,
    fold_counts,
    fractions,
    merge_overall,
    range_stats,
    update_ratio_hist,
    update_underflow,
)
from mptrain.diagnostics.trace import trace_overflow
from mptrain.errors import ConfigError
from mptrain.precision import fp8
from mptrain.precision.formats import FP8
from mptrain.precision.plan import planned_modules
from mptrain.run.layout import DIAGNOSTICS, json_safe

log = logging.getLogger("mptrain")


class Diagnostics:
    """Owned by the loop; one per run."""

    def __init__(self, cfg: DictConfig, model: nn.Module, precision, run_dir: Path, tb=None, ranks=None):
        """`ranks` (FSDP2): every rank runs these diagnostics; `ranks.gather(obj)` returns every rank's obj (a
        collective), `ranks.world_size` and `ranks.writes` (rank 0) say how many there are and who writes."""
        self.ranks = ranks
        self.writes = ranks is None or ranks.writes
        # a rank's loss is the mean over its own micro-batch, so its output gradients are world_size times the
        # global batch's: scaled back, the figures are those of one process on the global batch
        self.grad_share = 1.0 / ranks.world_size if ranks is not None else 1.0
        model = getattr(model, "_orig_mod", model)  # hooks go on the plain modules under torch.compile
        model = getattr(model, "module", model)  # and under DDP (a trace must not trigger its all-reduce)
        self.cfg, self.model, self.precision, self.tb = cfg, model, precision, tb
        self._read_precision()
        layers = self.check_layers(cfg, model, precision.registry)
        modules = dict(model.named_modules())
        self.layers = {n: modules[n] for n in layers}
        # 16-bit weights (nomaster, bf16_pure): an update that rounded away is an exact zero in the applied update
        weights = sorted({str(t.dtype).removeprefix("torch.") for t in precision.optimizer_params()})
        # what each candidate format does to each layer (names checked at start)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        registry = precision.registry
        self.shadow = Shadow(registry.default_candidates(device) if cfg.shadow is None else list(cfg.shadow), registry,
                             gather=ranks is not None)
        if self.shadow and self.writes:  # opt-in, and dear: say why the sampled steps are slow
            log.info("diagnostics.shadow=[%s]: each sampled step (the first %d, then every %d) runs every module "
                     "with parameters again once in fp32 and once per format: those steps take several times a "
                     "plain step's time (docs/benchmarks.md \"Shadow measurement\")", ", ".join(self.shadow.names),
                     cfg.first_steps, cfg.every)
        self.path = Path(run_dir) / DIAGNOSTICS
        self._file = open(self.path, "a") if self.writes else None
        if self._file is not None and self.path.stat().st_size == 0:
            self._write({"event": "meta", "bins": BIN_LABELS, "exponents": EXPONENTS,
                         "fp16_view": "hypothetical" if self.hypothetical else "actual",
                         "note": ("statistics show what fp16 would do to these values at the current loss scale"
                                  if self.hypothetical else "statistics of the fp16 values this run computes"),
                         "activation_layers": list(self.layers), "precision": precision.mode,
                         "weights": weights, "shadow_formats": self.shadow.names, "shadow_fields": SHADOW_FIELDS,
                         # each module's planned format, by the names precision_plan.json and the rows use
                         "plan": precision.plan.formats() if getattr(precision, "plan", None) is not None else {},
                         # the shadow formats each module can compute in (the registry's rule, for the advisor)
                         "fits": {n: [f for f in self.shadow.names
                                      if registry.fits(f, m, precision.dim_multiple, device) is None]
                                  for n, m in planned_modules(model)}})
        self._handles: list = []
        self._act: dict[str, list[torch.Tensor]] = {}
        self._row: dict | None = None
        self._before: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (name, param, its value before the update)
        self.consecutive_skips = 0
        self.traced = False
        self.trace: dict | None = None
        # sums over the sampled steps, for summary.json; plain numbers, so a checkpoint carries them (a resumed
        # run's summary covers every attempt): the recipe shares this dict with the train state
        self.totals: dict[str, float] = {}
        # every module's largest |input|, |output|, |weight|, |output grad|, and the shadow figures
        self.ranges = ModuleRanges(model, self.shadow, grad_share=self.grad_share)
        self.fp8 = fp8.Fp8Stats(
            model
        )  # precision=fp8: per converted layer amax, scale and e4m3/e5m2 range (else empty)

    @property
    def samples(self) -> int:
        """Sampled steps so far (of the whole run, once the totals are the train state's)."""
        return int(self.totals.get("samples", 0))

    @staticmethod
    def check_layers(cfg: DictConfig, model: nn.Module, registry=None) -> list[str]:
        """The modules whose output gradients are histogrammed; an unknown name (of a layer, or of a shadow format
        in `registry`, default the built-ins) is a one-line error (checked before the run directory changes)."""
        check_formats(list(cfg.shadow or []), *([registry] if registry is not None else []))
        model = getattr(model, "_orig_mod", model)
        model = getattr(model, "module", model)
        layers = (
            list(cfg.activation_layers) if cfg.activation_layers is not None else [n for n, _ in model.named_children()]
        )
        modules = dict(model.named_modules())
        missing = [n for n in layers if n not in modules]
        if missing:
            raise ConfigError(f"diagnostics.activation_layers: no module named {', '.join(missing)}; "
                              f"top-level modules are {', '.join(n for n, _ in model.named_children())}")
        return layers

    # ---- sampling -------------------------------------------------------------------------------
    def sampled(self, step: int) -> bool:
        """Is optimizer step `step` (1-based) sampled? The first few, then every `every`."""
        return step <= self.cfg.first_steps or step % self.cfg.every == 0

    def begin_step(self, step: int):
        """Before the forward of step `step`: on sampled steps hook the chosen layers' output gradients.
        Returns what the precision step calls after unscaling (overflow events are recorded on any step)."""
        self._step = step
        self._row = None
        if self.sampled(step):
            self._row = {"event": "sample", "step": step}
            if self.fp8:
                self.fp8.begin()
            self._act = {name: [] for name in self.layers}
            self.ranges.begin()
            for name, module in self.layers.items():
                self._handles.append(module.register_forward_hook(self._make_hook(name)))
        return self.inspect

    def _make_hook(self, name: str):
        def forward_hook(module, args, output):
            if isinstance(output, dict):  # a Hugging Face ModelOutput: its first tensor (hidden states, logits)
                output = next((v for v in output.values() if isinstance(v, torch.Tensor)), None)
            elif isinstance(output, (tuple, list)) and output:
                output = output[0]
            if isinstance(output, torch.Tensor) and output.requires_grad:
                # counts stay on the device: one bincount per layer per micro-batch, read at the end
                output.register_hook(lambda g: self._act[name].append(_device_hist(g * self.grad_share)))
        return forward_hook

    def _read_precision(self) -> None:
        """What the diagnostics take from the run's precision: the names of what the optimizer updates (FP32
        masters in master mode, in model order: named by identity, so that a step over a subset, one part of a
        GAN, is named right) and whether fp16 values are actual; read again after a switch of precision."""
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.name_of = {id(t): n for n, t in zip(names, self.precision.optimizer_params())}
        self.hypothetical = self.precision.compute_dtype != torch.float16
        self._precision_seen = (self.precision.mode, self.precision.compute_dtype, len(self.precision.history))

    def inspect(self, params: list[torch.Tensor], overflow: bool, scale: float) -> None:
        """Called by the precision step after unscaling, before clipping and the update (once per part)."""
        p = self.precision
        if (p.mode, p.compute_dtype, len(p.history)) != self._precision_seen:  # a switch (precision.schedule)
            was = self.hypothetical
            self._read_precision()
            if was != self.hypothetical:  # the rows from here on are of the other fp16 view: said in the file
                self._write({"event": "fp16_view", "step": self._step,
                             "fp16_view": "hypothetical" if self.hypothetical else "actual"})
        if self._row is None and not overflow:
            return  # not sampled: nothing to do
        pairs = [(self.name_of.get(id(p), f"param{i}"), p) for i, p in enumerate(params) if p.grad is not None]
        full = [whole(p.grad) for _, p in pairs]  # FSDP2: the reduced gradient's shards, gathered on every rank
        if self._row is not None and pairs:
            stats = range_stats(full, [n for n, _ in pairs], scale=scale)
            self._row["loss_scale"] = scale
            grads = self._row.setdefault("grads", {"params": {}})
            grads["params"].update(stats.per_tensor())
            grads["overall"] = merge_overall(grads.get("overall"), stats.overall)
            if not overflow:
                self._before += [(n, p, whole(p.detach()).clone()) for n, p in pairs]
        if overflow:
            bad = [n for (n, _), g in zip(pairs, full) if not bool(torch.isfinite(g).all())]
            self._write({"event": "overflow", "step": self._step, "loss_scale": scale, "nonfinite_params": bad})

    def record(self, key: str, value: dict) -> None:
        """Add a figure to the sampled step's row (e.g. bf16_pure's rounding statistics); several parts'
        figures are kept side by side under their order."""
        if self._row is not None:
            self._row[key] = value if key not in self._row else [*_as_list(self._row[key]), value]

    def end_step(self, step: int, applied: bool) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.consecutive_skips = 0 if applied else self.consecutive_skips + 1
        if self._row is None:
            return
        row = self._row
        row["modules"] = self.ranges.end(row.get("loss_scale", 1.0))
        if self.shadow:
            row["shadow"] = self.shadow.end()
        hists = {name: torch.stack(h).sum(0).cpu() for name, h in self._act.items() if h}
        if self.ranks is not None:  # every rank's figures of its micro-batch: those of the global batch
            row["modules"], shadow, hists = merge_ranks(self.ranks.gather((row["modules"], row.get("shadow"), hists)))
            if self.shadow:
                row["shadow"] = shadow
        fp8_layers = self.fp8.end() if self.fp8 else {}
        if fp8_layers:
            row[FP8.name] = fp8_layers
        if self._before and applied:
            names = [n for n, _, _ in self._before]
            before, after = [b for _, _, b in self._before], [whole(p.detach()) for _, p, _ in self._before]
            per, overall = update_underflow(before, after)
            row["update_underflow"] = {"overall": overall, "params": dict(zip(names, per))}
            row["update_ratio_hist"] = update_ratio_hist(before, after)
        row["applied"] = applied
        row["activations"] = {name: _hist_fractions(h) for name, h in hists.items()}
        self._write(row)
        self._to_tensorboard(row)
        self._accumulate(row)
        self._row, self._before, self._act = None, [], {}

    def should_trace(self) -> bool:
        return not self.traced and self.cfg.trace_after is not None and self.consecutive_skips >= self.cfg.trace_after

    def run_trace(self, step: int, run_batch, backward, reason: str) -> dict:
        self.traced = True
        result = trace_overflow(self.model, run_batch, backward)
        result.update(step=step, reason=reason)
        self.trace = result
        self._write({"event": "trace", **result})
        fwd, bwd = result["forward"], result["backward"]
        log.warning("overflow trace (%s): forward: %s; backward: %s", reason,
                    f"{fwd['module']} ({fwd['type']}) {fwd['where']}" if fwd else "no overflow",
                    f"{bwd['module']} ({bwd['type']}) {bwd['where']}" if bwd else "no overflow")
        return result

    # ---- outputs ----------------------------------------------------------------------------------
    def _write(self, row: dict) -> None:
        if self._file is None:
            return  # another rank than 0: it measured its share, rank 0 writes
        self._file.write(json.dumps(json_safe(row)) + "\n")
        self._file.flush()

    def _to_tensorboard(self, row: dict) -> None:
        if self.tb is None or "grads" not in row:
            return
        step, overall = row["step"], row["grads"]["overall"]
        for key in ("zero", "underflow", "subnormal", "overflow"):
            self.tb.add_scalar(f"diag/grad_{key}", overall[key], step)
        if math.isfinite(overall["headroom"]):
            self.tb.add_scalar("diag/headroom_log2", overall["headroom"], step)
        if "update_underflow" in row:
            self.tb.add_scalar("diag/update_underflow", row["update_underflow"]["overall"], step)
        _tb_exponent_histogram(self.tb, "diag/grad_log2_exponent", overall["hist"], step)
        for name, act in row["activations"].items():
            _tb_exponent_histogram(self.tb, f"diag/activation_grad_log2/{name}", act["hist"], step)

    def _accumulate(self, row: dict) -> None:
        if "grads" not in row:
            return
        self.totals["samples"] = self.samples + 1
        overall = row["grads"]["overall"]
        for key in ("zero", "underflow", "subnormal", "overflow"):
            self.totals[key] = self.totals.get(key, 0.0) + overall[key]
        self.totals["headroom_min"] = min(self.totals.get("headroom_min", math.inf), overall["headroom"])
        if isinstance(row.get("bf16_update"), dict):
            self.totals["bf16_lost"] = self.totals.get("bf16_lost", 0.0) + row["bf16_update"]["lost_nearest"]
            self.totals["bf16_samples"] = self.totals.get("bf16_samples", 0) + 1
        if "update_underflow" in row:
            self.totals["update_underflow"] = (
                self.totals.get("update_underflow", 0.0) + row["update_underflow"]["overall"]
            )
            self.totals["update_samples"] = self.totals.get("update_samples", 0) + 1

    def summary(self) -> dict:
        """Overall figures for summary.json: means over sampled steps (headroom: the minimum)."""
        out: dict = {"diag/fp16_view": "hypothetical" if self.hypothetical else "actual", "diag/samples": self.samples}
        if self.samples:
            for key in ("zero", "underflow", "subnormal", "overflow"):
                out[f"diag/grad_{key}"] = self.totals[key] / self.samples
            out["diag/headroom_min_log2"] = self.totals["headroom_min"]
        if self.totals.get("bf16_samples"):  # bf16_pure: updates round-to-nearest would have lost
            out["diag/bf16_lost_nearest"] = self.totals["bf16_lost"] / self.totals["bf16_samples"]
        if self.totals.get("update_samples"):
            out["diag/update_underflow"] = self.totals["update_underflow"] / self.totals["update_samples"]
        out.update(self.fp8.summary())
        if self.trace is not None:
            out["overflow_trace"] = {k: self.trace[k] for k in ("step", "reason", "forward", "backward")}
        return out

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.ranges.remove()
        if self._file is not None:
            self._file.close()


def merge_ranks(gathered: list[tuple[dict, dict | None, dict]]) -> tuple[dict, dict, dict]:
    """Every rank's (module ranges, shadow figures, activation-gradient histograms) of its own micro-batch, as
    one process would measure the global batch: the largest range (None, a non-finite value, wins), the worst
    shadow figure (the planner's rule across ranks), the summed bin counts with the largest peak."""
    ranges: dict[str, dict] = {}
    shadow: dict[str, dict] = {}
    hists: dict[str, torch.Tensor] = {}
    for rank_ranges, rank_shadow, rank_hists in gathered:
        for m, row in rank_ranges.items():
            out = ranges.setdefault(m, {})
            for field, v in row.items():
                w = out.get(field, v)
                out[field] = None if v is None or w is None else max(v, w)
        for m, per in (rank_shadow or {}).items():
            for f, figures in per.items():
                seen = shadow.setdefault(m, {}).get(f)
                mine = Figures.from_row(figures)
                shadow[m][f] = (mine if seen is None else Figures.from_row(seen).worst(mine)).as_row()
        for name, h in rank_hists.items():
            if name in hists:
                h = torch.cat([hists[name][:-1] + h[:-1], torch.maximum(hists[name][-1:], h[-1:])])
            hists[name] = h
    return ranges, shadow, hists


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _device_hist(g: torch.Tensor) -> torch.Tensor:
    """Raw bin counts (N_BINS + 1, see stats.bin_index) plus the max finite |g|, on the device."""
    a = g.detach().reshape(-1).float().abs()
    counts = count_bins(bin_index(a), torch.zeros(N_BINS + 1, dtype=torch.int64, device=a.device)).float()
    peak = torch.where(torch.isfinite(a), a, torch.zeros((), device=a.device)).amax().reshape(1)
    return torch.cat([counts, peak])


def _hist_fractions(h: torch.Tensor) -> dict:
    hist, over = fold_counts(h[: N_BINS + 1])
    hist_l = [int(c) for c in hist.tolist()]
    out = {"hist": hist_l, "count": sum(hist_l)}
    out.update(fractions(hist_l, over.item(), h[N_BINS + 1].item()))
    return out


def _tb_exponent_histogram(tb, tag: str, hist: list[int], step: int) -> None:
    """A TensorBoard histogram over log2 exponents (zero/inf/nan bins left out)."""
    counts = hist[1 : len(EXPONENTS) + 1]
    total = sum(counts)
    if total == 0:
        return
    limits = [float(e + 1) for e in EXPONENTS]
    mids = [e + 0.5 for e in EXPONENTS]
    s = sum(c * m for c, m in zip(counts, mids))
    ss = sum(c * m * m for c, m in zip(counts, mids))
    nonzero = [e for e, c in zip(EXPONENTS, counts) if c]
    tb.add_histogram_raw(tag, min=float(nonzero[0]), max=float(nonzero[-1] + 1), num=total, sum=s, sum_squares=ss,
                         bucket_limits=limits, bucket_counts=counts, global_step=step)
