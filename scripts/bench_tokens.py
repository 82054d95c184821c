"""dataset=tokens at scale: start-up time and resident memory against the token file's size.

Writes a small and a large uint16 train.bin (default 10 MB and 1 GB) into a temporary directory, then for each
one, in a fresh process: builds the datasets and the training loader exactly as a run does, times the first
batch (start-up), reads `--batches` more batches of random windows, and reports the peak resident memory
(ru_maxrss), split at the end into the process's own memory (RssAnon) and mapped file pages (RssFile,
page cache the kernel can drop at any time). The files are deleted afterwards. A file read window by window costs
neither start-up time nor memory in proportion to its size: the large/small ratios should be ~1.

    python scripts/bench_tokens.py                      # 10 MB vs 1 GB
    python scripts/bench_tokens.py --sizes 10M,4G --batches 500
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

import numpy as np

CHILD = r"""
import json, resource, sys, time
def status(key):  # kB in /proc/self/status: RssAnon (this process's own memory), RssFile (mapped file pages)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":")) / 1024
t0 = time.perf_counter()
from mptrain.library.data.loading import make_loader
from mptrain.library.data.tokens import tokens
imported = time.perf_counter()
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
d = tokens(sys.argv[1], seq_len=256, vocab_size=50304)
loader = make_loader(d.train, 64, train=True, seed=0, num_workers=0)
it = iter(loader)
next(it)
first = time.perf_counter()
for _ in range(int(sys.argv[2])):
    next(it)
done = time.perf_counter()
print(json.dumps({"startup_s": first - imported, "import_s": imported - t0,
                  "batches_per_s": int(sys.argv[2]) / (done - first), "rss_after_import_mb": rss0 / 1024,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "anon_mb": status("RssAnon"), "file_mb": status("RssFile"),
                  "windows": len(d.train)}))
"""


def parse_size(text: str) -> int:
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1].upper(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def write_tokens(path: Path, nbytes: int) -> None:
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        left = nbytes // 2
        while left:
            n = min(left, 2**24)
            rng.integers(0, 50304, n, dtype=np.uint16).tofile(f)
            left -= n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10M,1G", help="file sizes in bytes, comma-separated (K, M, G)")
    ap.add_argument("--batches", type=int, default=200, help="batches of 64 x 256 tokens read after the first")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mptrain_bench_tokens_"))
    rows = []
    try:
        for size in args.sizes.split(","):
            d = root / size
            d.mkdir()
            write_tokens(d / "train.bin", parse_size(size))
            out = subprocess.run([sys.executable, "-c", CHILD, str(d), str(args.batches)], capture_output=True,
                                 text=True, check=True)
            rows.append({"size": size, **json.loads(out.stdout.strip().splitlines()[-1])})
            (d / "train.bin").unlink()  # free the disk before the next size
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{'file':>6} {'windows':>10} {'start-up s':>11} {'batches/s':>10} {'RSS after import MB':>20} "
          f"{'peak RSS MB':>12} {'RssAnon MB':>11} {'RssFile MB':>11}")
    for r in rows:
        print(
            f"{r['size']:>6} {r['windows']:>10} {r['startup_s']:>11.3f} {r['batches_per_s']:>10.0f} "
            f"{r['rss_after_import_mb']:>20.0f} {r['peak_rss_mb']:>12.0f} {r['anon_mb']:>11.0f} {r['file_mb']:>11.0f}"
        )
    small, large = rows[0], rows[-1]
    print(
        f"\n{large['size']} vs {small['size']}: start-up x{large['startup_s'] / small['startup_s']:.2f}, "
        f"peak RSS x{large['peak_rss_mb'] / small['peak_rss_mb']:.3f} "
        f"(+{large['peak_rss_mb'] - small['peak_rss_mb']:.0f} MB) for "
        f"x{parse_size(large['size']) / parse_size(small['size']):.0f} the tokens"
    )


if __name__ == "__main__":
    t = time.perf_counter()
    main()
    print(f"(bench took {time.perf_counter() - t:.0f} s)")
