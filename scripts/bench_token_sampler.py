"""The token files' epoch order: torch.randperm's list (before issue 37) against the streamed Feistel permutation.

Writes one uint16 train.bin (default 2 GB, 1G tokens) into a temporary directory, then, each in a fresh process
and alternating old/new `--repeats` times (the machine may be shared: the figures are side by side), builds the
training loader exactly as a run does and times
  start-up: iter(loader) + the first batch of epoch 0,
  resume:   the first batch after set_epoch(0, start=half the epoch) (what resume=auto does mid-epoch),
  epoch 1:  the first batch after set_epoch(1),
and reports the peak resident memory (ru_maxrss) and the process's own memory (RssAnon) at the end, against the
same figures right after the dataset was built (before any order exists). The file is deleted afterwards.

    python scripts/bench_token_sampler.py                        # 2 GB, seq_len 256
    python scripts/bench_token_sampler.py --size 4G --seq-len 64
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_tokens import parse_size, write_tokens  # noqa: E402

CHILD = r"""
import json, resource, sys, time
def status(key):  # MB in /proc/self/status
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":")) / 1024
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
from mptrain.library.data.loading import make_loader
from mptrain.library.data.tokens import tokens
d = tokens(sys.argv[1], seq_len=int(sys.argv[2]), vocab_size=50304, windows="contiguous")
loader = make_loader(d.train, 64, train=True, seed=0, num_workers=0)
loader.sampler.lazy = sys.argv[3] == "new"
base_peak, base_anon = peak(), status("RssAnon")
def first_batch(epoch, start=0):
    loader.sampler.set_epoch(epoch, start)
    t = time.perf_counter()
    next(iter(loader))
    return time.perf_counter() - t
out = {"windows": len(d.train), "startup_s": first_batch(0), "resume_s": first_batch(0, len(d.train) // 2),
       "epoch1_s": first_batch(1)}
loader.sampler.set_epoch(2)
it, t = iter(loader.sampler), time.perf_counter()
for _ in range(200_000):  # the order's own cost per index once started (a batch of 64 reads 64)
    next(it)
out["us_per_index"] = (time.perf_counter() - t) / 200_000 * 1e6
print(json.dumps({**out, "base_peak_mb": base_peak, "peak_mb": peak(), "base_anon_mb": base_anon,
                  "anon_mb": status("RssAnon")}))
"""


def measure(directory: Path, seq_len: int, which: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(directory), str(seq_len), which], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="2G", help="train.bin's size in bytes (K, M, G)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per sampler (the median is shown)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mptrain_bench_sampler_"))
    runs: dict[str, list[dict]] = {"old": [], "new": []}
    try:
        write_tokens(root / "train.bin", parse_size(args.size))
        for _ in range(args.repeats):
            for which in runs:
                runs[which].append(measure(root, args.seq_len, which))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    keys = ["startup_s", "resume_s", "epoch1_s", "us_per_index", "base_peak_mb", "peak_mb", "base_anon_mb", "anon_mb"]
    med = {w: {k: sorted(r[k] for r in rs)[len(rs) // 2] for k in keys} for w, rs in runs.items()}
    print(f"{args.size} uint16 train.bin, seq_len {args.seq_len}: {runs['old'][0]['windows']:,} windows; "
          f"median of {args.repeats} fresh processes each")
    print(f"{'sampler':>28} {'start-up s':>11} {'resume s':>9} {'epoch 1 s':>10} {'peak RSS MB':>12} "
          f"{'(before order)':>15} {'RssAnon MB':>11} {'us/index':>9}")
    names = {"old": "randperm list (before)", "new": "Feistel, streamed (after)"}
    for w, m in med.items():
        print(f"{names[w]:>28} {m['startup_s']:>11.3f} {m['resume_s']:>9.3f} {m['epoch1_s']:>10.3f} "
              f"{m['peak_mb']:>12.0f} {m['base_peak_mb']:>15.0f} {m['anon_mb']:>11.0f} {m['us_per_index']:>9.2f}")
    o, n = med["old"], med["new"]
    print(
        f"\nold/new: start-up x{o['startup_s'] / n['startup_s']:.0f}, peak RSS "
        f"+{o['peak_mb'] - o['base_peak_mb']:.0f} MB vs +{n['peak_mb'] - n['base_peak_mb']:.0f} MB over the dataset "
        "alone"
    )


if __name__ == "__main__":
    t = time.perf_counter()
    main()
    print(f"(bench took {time.perf_counter() - t:.0f} s)")
