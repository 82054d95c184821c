"""Issue 37: the token files' order is a permutation streamed index by index (constant memory), visits every
window once per epoch, is fixed by (seed, epoch), and resumes mid-epoch exactly."""

from __future__ import annotations

import numpy as np
import pytest

from mptrain.library.data.loading import EpochSampler, make_loader
from mptrain.library.data.permutation import FeistelPermutation
from mptrain.library.data.tokens import tokens

from .conftest import read_jsonl, train
from .test_tokens import GPT, write_bin


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 17, 64, 1000, 4097])
def test_the_permutation_visits_each_index_exactly_once(n):
    for seed, epoch in [(0, 0), (1, 0), (0, 3)]:
        perm = FeistelPermutation(n, seed, epoch)
        order = list(perm.stream(0, n))  # in chunks of 4096 (4097: across one)
        assert sorted(order) == list(range(n))
        assert [perm[i] for i in range(0, n, max(1, n // 50))] == order[:: max(1, n // 50)]  # one position alone
        assert list(perm.stream(1, 2 * n, 3)) == [order[k % n] for k in range(1, 2 * n, 3)]


def test_the_permutation_is_fixed_by_seed_and_epoch_and_looks_shuffled():
    n = 10_000
    order = list(FeistelPermutation(n, 7, 2).stream(0, n))
    assert order == list(FeistelPermutation(n, 7, 2).stream(0, n))
    assert order != list(FeistelPermutation(n, 7, 3).stream(0, n))
    assert order != list(FeistelPermutation(n, 8, 2).stream(0, n))
    # no trace of the identity: rank correlation with the position ~0, as few fixed points as a random permutation
    assert abs(np.corrcoef(np.arange(n), order)[0, 1]) < 0.05
    assert sum(i == j for i, j in enumerate(order)) < 10
    # the first tenth of the epoch draws from the whole range, not from one block of it
    assert np.histogram(order[: n // 10], bins=10, range=(0, n))[0].min() > 50


def test_any_position_of_a_huge_epoch_costs_no_memory():
    n = 10**12  # a list of this many indices could never be built
    perm = FeistelPermutation(n, 0, 0)
    assert all(0 <= perm[i] < n for i in (0, 1, n // 2, n - 1))
    sampler = EpochSampler(n, seed=0, lazy=True)
    sampler.set_epoch(5, start=n - 3)
    assert len(list(sampler)) == 3


@pytest.mark.parametrize(("size", "world", "pad"), [(37, 1, True), (37, 4, True), (37, 4, False), (40, 3, True),
                                                        (10_001, 3, True)])
def test_streamed_ranks_cover_the_epoch_and_start_skips_exactly_the_seen_indices(size, world, pad):
    per_rank = {r: EpochSampler(size, seed=3, rank=r, world_size=world, pad=pad, lazy=True) for r in range(world)}
    for s in per_rank.values():
        s.set_epoch(2)
    full = {r: list(s) for r, s in per_rank.items()}
    seen = [i for r in full for i in full[r]]
    assert set(seen) == set(range(size))  # every window, and each once unless padded to equal ranks
    assert len(seen) == (-(-size // world) * world if pad else size)
    for r, s in per_rank.items():
        assert len(full[r]) == len(EpochSampler(size, seed=3, rank=r, world_size=world, pad=pad))
        for start in (1, 5, size // world - 2):
            s.set_epoch(2, start=start)  # what a resume does: skip the indices already trained on
            assert list(s) == full[r][start:] and len(s) == len(full[r]) - start


def test_unshuffled_streamed_order_is_the_listed_one():
    for world, pad in [(1, False), (3, True), (3, False)]:
        streamed, listed = (EpochSampler(11, 0, shuffle=False, rank=1 % world, world_size=world, pad=pad)
                            for _ in range(2))
        assert list(streamed) == listed._indices()


def test_token_loaders_stream_their_order_and_see_each_window_once_per_epoch(tmp_path):
    write_bin(tmp_path / "train.bin", 20_000, np.uint16, 100)
    d = tokens(str(tmp_path), seq_len=16, vocab_size=100, windows="contiguous")
    loader = make_loader(d.train, 8, train=True, seed=1)
    assert loader.sampler.lazy
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        starts = [d.train.start(i) for i in loader.sampler]
        assert sorted(starts) == [i * 16 for i in range(len(d.train))]
    batch = next(iter(loader))[0]  # the loader reads the windows the sampler names
    assert batch[:, 0].tolist() == [d.train[i][0][0].item() for i in list(loader.sampler)[:8]]


def token_run_overrides(tmp_path) -> list[str]:
    data = tmp_path / "data"
    data.mkdir()
    write_bin(data / "train.bin", 6_000, np.uint16, 64)
    write_bin(data / "val.bin", 1_000, np.uint16, 64, seed=1)
    return [*[o for o in GPT if not o.startswith("checkpoint.")], "dataset=tokens", f"dataset.path={data}",
            "dataset.seq_len=16", "dataset.vocab_size=64", "trainer.max_steps=10", "checkpoint.every_steps=5",
            "trainer.log_every=1"]


@pytest.mark.slow
def test_a_token_run_resumed_mid_epoch_is_bitwise_the_uninterrupted_one(tmp_path, caplog):
    from .test_checkpoint import assert_same_tensors, final_state

    base = token_run_overrides(tmp_path)
    _, ref = train(tmp_path / "ref", base)  # 6000 tokens / 16 = 374 windows: 46 steps an epoch, so step 5 is mid-epoch
    with caplog.at_level("WARNING"):
        summary, cut = train(tmp_path / "cut", [*base, f"resume={ref / 'checkpoints' / 'step_5.pt'}"])
    assert summary["steps"] == 10
    assert_same_tensors(final_state(ref), final_state(cut))
    assert read_jsonl(ref / "metrics.jsonl")[5:] == read_jsonl(cut / "metrics.jsonl")
    assert not any("data order" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_a_mid_epoch_checkpoint_from_before_the_streamed_order_is_warned(tmp_path, caplog):
    """A checkpoint without `data_order` was written when token files were ordered by torch.randperm: skipping
    its positions in the streamed order skips other windows, which the resume says in one warning."""
    import torch

    base = token_run_overrides(tmp_path)
    _, ref = train(tmp_path / "ref", [*base, "trainer.max_steps=5"])
    ckpt = torch.load(ref / "checkpoints" / "step_5.pt", weights_only=False)
    assert ckpt.pop("data_order") == "feistel"
    torch.save(ckpt, tmp_path / "old.pt")
    with caplog.at_level("WARNING"):
        summary, _ = train(tmp_path / "cut", [*base, f"resume={tmp_path / 'old.pt'}"])
    assert summary["steps"] == 10
    said = [r.getMessage() for r in caplog.records if "data order" in r.getMessage()]
    assert said == [f"resume: {tmp_path / 'old.pt'} was written under the randperm data order, this mptrain orders "
                    "this dataset by feistel: the rest of epoch 0 sees other windows than the run would have (some "
                    "twice, some not); resume from a checkpoint at an epoch's end to continue exactly"]
