"""precision.schedule: the precision a run switches to at given steps, in the running process.

Each entry is `{at: STEP | FRACTION, preset: NAME}` and/or `{at: ..., layers: {glob: format}}`. A switch at step N
happens between steps N and N+1, and must equal stopping at N and resuming with the precision the entry names:
so the precision config it switches to is the one that resume would compose (the preset's own file over the
schema, with every other precision.* setting the run was given), and its state is carried by the resume's rules
(engine.Precision.switch). Nothing here reads a model: the switches are resolved and checked at set-up, before
the run directory changes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mptrain.config import PRECISION_ALIASES, PrecisionConfig, config_dir
from mptrain.errors import ConfigError
from mptrain.precision.formats import BF16

# the keys a preset's file sets (conf/precision/<name>.yaml); a switch of preset resets them to that file's values
# or the schema's defaults: everything else the run was given (precision.fp8.*, precision.auto.*) stays
PRESET_KEYS = ("mode", "dtype", "loss_scale.kind", "alias")


@dataclass(frozen=True)
class Switch:
    step: int  # the switch happens after this step, before the next
    cfg: DictConfig  # the precision config from then on (no schedule of its own)
    what: str  # the entry as given, for records: "preset=bf16", "layers={...}"
    entry: dict | None = None  # the schedule's entry (None: the scaler's on_min=bf16), to re-chain after a switch
    index: int | None = None  # its place in precision.schedule (records name it: a resume knows which were made)


# the scaler's switch (loss_scale.on_min=bf16): a switch into the bf16 preset, made when the loss scale cannot back
# off any further, recorded as a schedule's switch is
ON_MIN = "loss_scale.on_min=bf16"


def on_min_switch(current: DictConfig, step: int) -> Switch:
    """The switch loss_scale.on_min=bf16 makes after `step`: into precision=bf16, the run's other settings kept."""
    return Switch(step, target(current, {"preset": BF16.name}), ON_MIN)


def rechain(current: DictConfig, switches: list[Switch]) -> list[Switch]:
    """`switches` made from `current` (after a switch the schedule did not plan: on_min=bf16's): each entry over the
    precision in force before it."""
    out = []
    for sw in switches:
        current = target(current, sw.entry)
        out.append(Switch(sw.step, current, sw.what, sw.entry, sw.index))
    return out


def preset_file(name: str) -> dict:
    """conf/precision/<name>.yaml's keys, over those of the preset it builds on (an alias: `defaults: [dynamic]`)."""
    own = OmegaConf.to_container(OmegaConf.load(Path(config_dir()) / "precision" / f"{name}.yaml"))
    out: dict = {}
    for base in own.pop("defaults", []):
        if isinstance(base, str) and base not in ("precision_schema", "_self_"):
            out.update(preset_file(base))
    return {**out, **own}


def target(current: DictConfig, entry: dict) -> DictConfig:
    """The precision config an entry switches `current` to: a preset's file over the schema, keeping the run's
    other settings (a resume's composition); `layers` replace the plan's rules (null: the preset's own plan)."""
    out = OmegaConf.to_container(current)
    out.pop("schedule", None)
    if entry.get("preset") is not None:
        schema = OmegaConf.to_container(OmegaConf.structured(PrecisionConfig(mode=mode_of(entry["preset"]))))
        for key in PRESET_KEYS:
            head, _, tail = key.partition(".")
            if tail:
                out[head][tail] = schema[head][tail]
            else:
                out[key] = schema[key]
        file = preset_file(entry["preset"])
        for key, value in file.items():
            out[key] = {**out[key], **value} if isinstance(value, dict) else value
        out["layers"] = None
    if "layers" in entry:
        out["layers"] = dict(entry["layers"]) if entry["layers"] is not None else None
    cfg = OmegaConf.structured(PrecisionConfig(mode=out["mode"]))
    cfg = OmegaConf.merge(cfg, out)
    OmegaConf.to_object(cfg)  # the schema's checks
    return cfg


def mode_of(name: str) -> str:
    """A preset's mode by its name or alias."""
    return PRECISION_ALIASES.get(name, name)


def resolve(cfg: DictConfig, total_steps: int) -> list[Switch]:
    """The run's switches in step order, each with the config it switches to; a one-line ConfigError for a step
    outside the run or two entries at one step."""
    switches, current = [], cfg
    entries = []
    for i, entry in enumerate(cfg.get("schedule") or []):
        entry = OmegaConf.to_container(entry) if isinstance(entry, DictConfig) else dict(entry)
        at = entry["at"]
        step = int(at * total_steps) if isinstance(at, float) else int(at)
        if not 1 <= step < total_steps:
            raise ConfigError(f"precision.schedule[{i}].at={at} switches after step {step}, outside the run's "
                              f"{total_steps} steps (a switch falls between two steps): choose a step in 1.."
                              f"{total_steps - 1} or a fraction in (0, 1) that lands there")
        entries.append((step, i, entry))
    entries.sort(key=lambda e: e[0])
    for (step, i, entry), after in zip(entries, entries[1:] + [None]):
        if after is not None and after[0] == step:
            raise ConfigError(f"precision.schedule[{i}] and [{after[1]}] both switch after step {step}; give one entry "
                              "with both preset and layers")
        current = target(current, entry)
        what = ", ".join(f"{k}={entry[k]}" for k in ("preset", "layers") if k in entry)
        switches.append(Switch(step, current, what, entry, i))
    return switches


def retime(switches: list[Switch], history: list[dict], step: int) -> tuple[list[Switch], list[Switch]]:
    """A resume after `step`: the run's switches at the steps a checkpoint's `history` says they were made (a
    fraction of trainer.max_steps moves when max_steps changes at resume; a switch made stays made, once), and
    those due before the resume but not made (returned second: they are made at the resume, after `step`)."""
    records = [h for h in history if h.get("event") == "switch" and h.get("what") != ON_MIN]
    if any(h.get("index") is None for h in records):  # an older checkpoint: its switches by their own steps
        return switches, []
    made = {h["index"]: h["step"] for h in records}
    out, late = [], []
    for sw in switches:
        if sw.index in made:
            sw = replace(sw, step=made[sw.index])
        elif sw.step < step:
            late.append(sw)
            sw = replace(sw, step=step)
        out.append(sw)
    return sorted(out, key=lambda s: s.step), late
