"""mptrain-prepare-text FILE --tokenizer SPEC --out DIR: tokenise a text file once into nanoGPT-style
train.bin / val.bin (uint16 where the vocabulary fits, else uint32) plus meta.json and the tokenizer, for
`dataset=tokens dataset.path=DIR`. The file is read in chunks of whole lines, never whole into memory (the
tokenizer is fitted in one pass, the tokens written in a second). Everything is written into a staging folder
inside DIR and moved in at the end, so a failure leaves DIR as it was, and DIR ends with exactly one tokenizer
file (a stale tokenizer.json beside a new vocab.json would be loaded first and decode garbage)."""

from __future__ import annotations

import argparse
import codecs
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from mptrain.errors import ConfigError, MptrainError
from mptrain.library.data.tokenize import TOKENIZER_FILE, VOCAB_FILE, build_tokenizer
from mptrain.library.data.tokens import META
from mptrain.run.layout import CHECKPOINTS, CONFIG, METRICS, SUMMARY

CHUNK_BYTES = 16 * 2**20
RUN_FILES = (CONFIG, CHECKPOINTS, METRICS, SUMMARY)  # any one marks a run directory


def line_chunks(path: Path, start: int = 0, stop: int | None = None) -> Iterator[str]:
    """The text of bytes [start, stop) (stop moved to the next line end) in chunks of whole lines."""
    with open(path, encoding="utf-8", newline="") as f:
        f.seek(start)
        pos = start
        while stop is None or pos < stop:
            lines = f.readlines(CHUNK_BYTES)
            if not lines:
                return
            if stop is not None:  # cut at the first line that ends past `stop`
                kept = []
                for line in lines:
                    kept.append(line)
                    pos += len(line.encode("utf-8"))
                    if pos >= stop:
                        break
                lines = kept
            yield "".join(lines)


def split_offset(path: Path, val_fraction: float) -> int:
    """The byte offset of the first line of the validation part (the last val_fraction of the file)."""
    size = path.stat().st_size
    target = int(size * (1 - val_fraction))
    with open(path, "rb") as f:
        f.seek(target)
        if target > 0:
            f.readline()  # to the start of the next line
        return f.tell()


def first_bad_byte(path: Path) -> tuple[str, int]:
    """(why, the file offset) of the first byte that is not UTF-8: read again in binary on the error path,
    since a text reader's UnicodeDecodeError counts from its own buffer."""
    decoder, pos = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(CHUNK_BYTES)
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                return e.reason, pos - pending + e.start
            if not chunk:
                return "undecodable", pos
            pos += len(chunk)


def check_out(out: Path) -> None:
    """--out is a new directory, an empty one, or one this tool wrote: never a file, a run directory (its
    tokenizer decodes the run's samples) or a directory whose tokenizer file came from elsewhere."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory for train.bin, val.bin and meta.json")
    if not out.is_dir():
        return
    if any((out / name).exists() for name in RUN_FILES):
        raise ConfigError(f"--out {out} is an mptrain run directory: its {VOCAB_FILE}/{TOKENIZER_FILE} decodes the "
                          "run's samples and would be replaced; give a directory of its own, e.g. --out data/")
    if not (out / META).is_file() and any((out / name).exists() for name in (VOCAB_FILE, TOKENIZER_FILE)):
        raise ConfigError(f"--out {out} holds a tokenizer that mptrain-prepare-text did not write (no {META}); "
                          "it would be replaced: give a new or empty directory")


def prepare(path: Path, spec: str, out: Path, val_fraction: float = 0.1, max_vocab: int = 10000) -> dict:
    """Write out/train.bin, out/val.bin, out/meta.json and the tokenizer file (removing the other kind's, left
    by an earlier preparation). Returns the meta."""
    if not path.is_file():
        raise MptrainError(f"{path} is not a file")
    if max_vocab < 2:  # dataset.max_vocab's rule: else every token is <unk> and the loss is trivially 0
        raise ConfigError(f"--max-vocab={max_vocab} is invalid: must be >= 2 (<unk> and at least one word)")
    check_out(out)
    made = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"--out {out}: cannot make the directory ({e.strerror or e}); give a writable directory"
        ) from None
    stage = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out))
    try:
        meta, tokenizer_file = _write(path, spec, stage, val_fraction, max_vocab)
    except BaseException as e:  # DIR as it was (gone, if this call made it)
        shutil.rmtree(out if made else stage, ignore_errors=True)
        if isinstance(e, UnicodeDecodeError):  # dataset=text's wording
            reason, at = first_bad_byte(path)
            raise ConfigError(f"{path} is not UTF-8 text ({reason} at byte {at})") from None
        raise
    for stale in {VOCAB_FILE, TOKENIZER_FILE} - {tokenizer_file}:
        (out / stale).unlink(missing_ok=True)
    for name in ("train.bin", "val.bin", tokenizer_file, META):  # meta.json last: it describes the rest
        os.replace(stage / name, out / name)
    stage.rmdir()
    return meta


def _write(path: Path, spec: str, out: Path, val_fraction: float, max_vocab: int) -> tuple[dict, str]:
    if not any(chunk.strip() for chunk in line_chunks(path)):  # dataset=text's rule (stops at the first text)
        raise ConfigError(f"{path} holds no text (empty or only whitespace); give a text file")
    tok = build_tokenizer(spec, lambda: line_chunks(path), max_vocab)
    dtype = "uint16" if tok.vocab_size <= 2**16 else "uint32"
    split = split_offset(path, val_fraction)
    counts = {}
    for name, (a, b) in {"train": (0, split), "val": (split, None)}.items():
        n = 0
        with open(out / f"{name}.bin", "wb") as f:
            for chunk in line_chunks(path, a, b):
                ids = tok.encode(chunk).astype(dtype)
                ids.tofile(f)
                n += len(ids)
        counts[f"{name}_tokens"] = n
    if not all(counts.values()):  # the split falls at a line end: a text of one or few lines leaves a part empty
        raise ConfigError(f"{path} gives {counts['train_tokens']} training and {counts['val_tokens']} validation "
                          f"tokens at --val-fraction={val_fraction}: both parts need tokens, and the split falls at "
                          "a line end; give a text of more lines (or another --val-fraction)")
    saved = tok.save(out)
    meta = {"vocab_size": tok.vocab_size, "dtype": dtype, "tokenizer": tok.to_dict()["level"], "source": str(path),
            "val_fraction": val_fraction, **counts}
    (out / META).write_text(json.dumps(meta, indent=1))
    return meta, saved.name


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mptrain-prepare-text", description=__doc__.split("\n\n")[0])
    ap.add_argument("file", type=Path, help="a UTF-8 text file")
    ap.add_argument("--tokenizer", default="byte", help="byte | char | word | bpe:<vocab size> | <tokenizers .json>")
    ap.add_argument("--out", type=Path, required=True, help="the directory for train.bin, val.bin, meta.json")
    ap.add_argument("--val-fraction", type=float, default=0.1, help="the last fraction of the file (default 0.1)")
    ap.add_argument("--max-vocab", type=int, default=10000, help="word tokenizer: vocabulary size")
    args = ap.parse_args(argv)
    if not 0 < args.val_fraction < 1:
        ap.error("--val-fraction must be in (0, 1)")
    try:
        meta = prepare(args.file, args.tokenizer, args.out, args.val_fraction, args.max_vocab)
    except MptrainError as e:
        print(f"mptrain-prepare-text: error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"{args.out}: {meta['train_tokens']} train + {meta['val_tokens']} val tokens ({meta['dtype']}, "
          f"vocabulary {meta['vocab_size']}, {meta['tokenizer']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
