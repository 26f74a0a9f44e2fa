"""The training loader: seeded order, every row once per epoch across ranks, exact resume, cache ≡ online,
and the checks that refuse a cache made from other tokens or another encoder."""

from __future__ import annotations

import collections
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from elf.data.embed import embed_dataset
from elf.data.layout import layout_lm, layout_seq2seq, stack_lm, stack_seq2seq
from elf.data.loader import TrainLoader, batch_tokens, encoder_content_hash
from elf.data.shards import MANIFEST
from elf.encoders import gaussian_encoder, load_encoder
from elf.errors import ElfError
from elf.files import write_json_atomic
from tests.test_embed import lm_rows, make_gaussian_encoder_dir, make_t5_encoder_dir, seq2seq_rows, write_tokens

L, MAX_INPUT = 20, 8
KEYS = ("input_ids", "valid_mask", "source_mask", "loss_mask", "cond_dropped")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """lm and seq2seq token splits (several shards, uneven row groups), a tiny T5, and the caches it makes."""
    root = tmp_path_factory.mktemp("data")
    write_tokens(root / "tokens/lm/train", lm_rows(130, L, seed=1), L, shard_rows=40, group_rows=12)
    write_tokens(root / "tokens/s2s/train", seq2seq_rows(90, L, MAX_INPUT, seed=2), L, MAX_INPUT,
                 shard_rows=40, group_rows=12)
    encoder_dir = make_t5_encoder_dir(root / "t5")
    for task in ("lm", "s2s"):
        embed_dataset(root / "tokens" / task, encoder_dir, root / "emb" / task, cache=True, batch_size=16,
                      progress=False)
    return root, encoder_dir, load_encoder(encoder_dir)


def loader(data, task="lm", cached=True, **kwargs) -> TrainLoader:
    root, encoder_dir, encoder = data
    settings = {"batch_size": 7, "seed": 0, "shuffle_window": 3, "condition_dropout": 0.5, **kwargs}
    return TrainLoader(root / "tokens" / task / "train", root / "emb" / task / "train" if cached else None, encoder,
                       encoder_hash=encoder_content_hash(encoder_dir), **settings)


def take(source: TrainLoader, count: int) -> list[dict[str, torch.Tensor]]:
    return [next(source) for _ in range(count)]


def rows_of(batches: list[dict[str, torch.Tensor]]) -> list[tuple[int, ...]]:
    return [tuple(r.tolist()) for b in batches for r in b["input_ids"]]


def assert_same_batches(first, second, x_tol: float | None = None) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        for key in KEYS:
            assert torch.equal(a[key], b[key]), key
        if x_tol is None:
            assert torch.equal(a["x"], b["x"])
        else:
            torch.testing.assert_close(a["x"], b["x"], rtol=x_tol, atol=x_tol)


def all_rows(data, task: str) -> list[tuple[int, ...]]:
    """Every row of a split as a laid-out id tuple (what the loader yields as `input_ids`)."""
    source = loader(data, task, batch_size=1, shuffle_window=1000)
    return rows_of(take(source, source.epoch_rows(0)))


def test_batch_layout_equals_the_row_layout_of_elf_method_section_2():
    rows = [[5, 6, 1], [1], list(range(2, 21)) + [1]]
    ids, valid = stack_lm(rows, L)
    for i, row in enumerate(rows):
        expected_ids, expected_valid = layout_lm(row, L)
        assert ids[i].tolist() == expected_ids.tolist() and valid[i].tolist() == expected_valid.tolist()
    assert ids[0].tolist() == [5, 6, 1] + [0] * (L - 3)  # right-padded with pad
    sources, targets = [[3, 4, 2], [7, 2], [9] * 8], [[8, 1], [5] * 25 + [1], [6, 1]]  # sources have no EOS
    ids, source_mask, valid = stack_seq2seq(sources, targets, L)
    assert valid.sum(1).tolist() == [5, L, 10]  # source + target; the EOS padding is not valid
    for i, (source, target) in enumerate(zip(sources, targets, strict=True)):
        expected = layout_seq2seq(source, target, L)
        assert ids[i].tolist() == expected[0].tolist() and source_mask[i].tolist() == expected[1].tolist()
        assert valid[i].tolist() == expected[2].tolist()
    assert ids[0].tolist() == [3, 4, 2, 8, 1] + [1] * (L - 5)  # no separator, EOS padding
    assert ids[1].tolist() == [7, 2] + [5] * (L - 2)  # a too-long target is cut at L
    with pytest.raises(ValueError, match="more than max_length"):
        stack_lm([[2] * (L + 1)], L)
    with pytest.raises(ValueError, match="no target room"):
        stack_seq2seq([[2] * L], [[1]], L)


def test_batches_have_the_documented_shapes_and_masks(data):
    batch = next(loader(data, "s2s"))
    assert batch["input_ids"].shape == (7, L) and batch["input_ids"].dtype == torch.long
    assert batch["x"].shape == (7, L, 32) and batch["x"].dtype == torch.float32
    assert torch.equal(batch["loss_mask"], ~batch["source_mask"])  # EOS padding included
    assert (batch["valid_mask"] | batch["loss_mask"]).all() and not batch["valid_mask"].all()
    assert batch["cond_dropped"].shape == (7,) and batch["cond_dropped"].dtype == torch.bool
    batch = next(loader(data, "lm"))
    assert not batch["cond_dropped"].any() and not batch["source_mask"].any()
    assert torch.equal(batch["loss_mask"], batch["valid_mask"]) and (batch["x"][~batch["valid_mask"]] == 0).all()
    assert batch_tokens(batch) == {"valid": int(batch["valid_mask"].sum()), "loss": int(batch["valid_mask"].sum())}


def test_same_seed_same_batches_other_seed_other_order(data):
    assert_same_batches(take(loader(data, seed=3), 30), take(loader(data, seed=3), 30))
    assert_same_batches(take(loader(data, seed=3), 30), take(loader(data, seed=3, prefetch=True), 30))
    assert rows_of(take(loader(data, seed=3), 6)) != rows_of(take(loader(data, seed=4), 6))


def test_each_epoch_yields_every_row_exactly_once(data):
    expected = collections.Counter(all_rows(data, "lm"))
    source = loader(data, batch_size=10)
    assert source.epoch_rows(0) == source.epoch_rows(1) == 130
    rows = rows_of(take(source, 26))  # two epochs, batches spanning the epoch boundary
    assert collections.Counter(rows[:130]) == expected and collections.Counter(rows[130:]) == expected
    assert rows[:130] != rows[130:]  # each epoch has its own order


def test_two_ranks_split_an_epoch_into_disjoint_equal_parts(data, tmp_path):
    everything = collections.Counter(all_rows(data, "lm"))
    ranks = [loader(data, batch_size=1, rank=r, world_size=2) for r in range(2)]
    budget = ranks[0].epoch_rows(0)
    assert ranks[1].epoch_rows(0) == budget > 0
    seen = [collections.Counter(rows_of(take(r, budget))) for r in ranks]
    assert seen[0] + seen[1] <= everything  # disjoint, nothing invented


def test_with_even_row_groups_two_ranks_drop_only_the_odd_unit(data, tmp_path):
    _, encoder_dir, encoder = data
    write_tokens(tmp_path / "train", lm_rows(130, L, seed=4), L, shard_rows=40, group_rows=10)  # 13 units of 10
    ranks = [TrainLoader(tmp_path / "train", None, encoder, batch_size=4, seed=1, shuffle_window=2, rank=r,
                         world_size=2) for r in range(2)]
    assert ranks[0].epoch_rows(0) == ranks[1].epoch_rows(0) == 60
    everything = collections.Counter(rows_of(take(TrainLoader(tmp_path / "train", None, encoder, batch_size=130,
                                                              seed=1), 1)))
    seen = [collections.Counter(rows_of(take(r, 15))) for r in ranks]
    assert seen[0].total() == seen[1].total() == 60 and seen[0] + seen[1] <= everything


@pytest.mark.parametrize("task,cached", [("lm", True), ("lm", False), ("s2s", True), ("s2s", False)])
def test_resume_from_a_json_state_continues_with_identical_batches(data, task, cached):
    uninterrupted = take(loader(data, task, cached), 30)  # several windows and epochs
    for stop in (4, 17):
        first = loader(data, task, cached, prefetch=stop == 4)
        take(first, stop)
        state = json.loads(json.dumps(first.state_dict()))
        resumed = loader(data, task, cached, prefetch=True)
        reads = []
        original = resumed._read_unit
        resumed._read_unit = lambda unit, reads=reads, original=original: reads.append(unit) or original(unit)
        resumed.load_state_dict(state)
        batch = next(resumed)
        current = resumed._window_units(state["epoch"], state["window"])[0]
        assert reads[:len(current)] == current  # restarts at the current window, never from the start
        assert len(reads) <= 3 * resumed.shuffle_window  # + the window after it (and its read-ahead)
        assert_same_batches([batch, *take(resumed, 30 - stop - 1)], uninterrupted[stop:])


@pytest.mark.parametrize("task", ["lm", "s2s"])
@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_cached_and_online_paths_give_the_same_tensors(data, task, dropout):
    cached = take(loader(data, task, True, condition_dropout=dropout), 20)
    online = take(loader(data, task, False, condition_dropout=dropout), 20)
    assert_same_batches(cached, online, x_tol=2e-3)  # the cache stores float16
    dropped = torch.cat([b["cond_dropped"] for b in cached])
    if task == "s2s" and dropout:
        assert 0.3 < dropped.float().mean() < 0.7
    else:
        assert not dropped.any()


def test_dropped_rows_get_the_target_embeddings_without_source(data):
    """Same rows, once with the condition and once dropped: only the target positions of x change."""
    kept = next(loader(data, "s2s", condition_dropout=0.0, batch_size=40))
    dropped = next(loader(data, "s2s", condition_dropout=1.0, batch_size=40))
    assert torch.equal(kept["input_ids"], dropped["input_ids"]) and dropped["cond_dropped"].all()
    source = kept["source_mask"]
    assert torch.equal(kept["x"][source], dropped["x"][source])  # x keeps the source: zeroing is the objective's job
    assert not torch.allclose(kept["x"][~source], dropped["x"][~source], atol=1e-2)


def test_loader_state_from_other_settings_is_refused(data):
    state = loader(data, seed=1).state_dict()
    with pytest.raises(ElfError, match="loader state: saved with seed 1, this loader has 0"):
        loader(data, seed=0).load_state_dict(state)


# ---------------------------------------------------------------------------------------------------------
# A cache that does not belong to these tokens or this encoder
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def cache_copy(data, tmp_path):
    root, _, _ = data
    shutil.copytree(root / "tokens/lm/train", tmp_path / "tokens")
    shutil.copytree(root / "emb/lm/train", tmp_path / "emb")
    return tmp_path / "tokens", tmp_path / "emb"


def make(data, tokens: Path, emb: Path, **kwargs) -> TrainLoader:
    _, encoder_dir, encoder = data
    settings = {"encoder": encoder, "encoder_hash": encoder_content_hash(encoder_dir), **kwargs}
    return TrainLoader(tokens, emb, batch_size=8, seed=0, **settings)


def test_wrong_token_crc32_is_an_error_naming_both_files(data, cache_copy):
    tokens, emb = cache_copy
    path = emb / "part-00001.parquet"
    parquet = pq.ParquetFile(path)
    with pq.ParquetWriter(path.with_name("x.parquet"), parquet.schema_arrow) as writer:
        for i in range(parquet.num_row_groups):
            group = parquet.read_row_group(i)
            if i == 1:
                crc = pc.add(group["token_crc32"], pa.scalar(1, pa.uint32()))
                group = group.set_column(0, "token_crc32", crc)
            writer.write_table(group, row_group_size=group.num_rows)
    path.with_name("x.parquet").replace(path)
    source = make(data, tokens, emb, shuffle_window=100)
    with pytest.raises(ElfError, match=r"emb/part-00001.parquet: row group 1, row 0: token_crc32 does not match "
                                       r".*tokens/part-00001.parquet"):
        next(source)


def test_cache_from_other_tokens_is_an_error(data, cache_copy, tmp_path):
    tokens, emb = cache_copy
    write_tokens(tokens, lm_rows(130, L, seed=99), L, shard_rows=40, group_rows=12)
    with pytest.raises(ElfError, match=r"emb/manifest.json: made from other tokens than .*tokens/manifest.json"):
        make(data, tokens, emb)


def test_cache_with_a_shard_of_other_tokens_is_an_error(data, cache_copy):
    tokens, emb = cache_copy
    manifest = json.loads((emb / MANIFEST).read_text())
    manifest["shards"][2]["token_shard_sha256"] = "0" * 64
    write_json_atomic(emb / MANIFEST, manifest)
    with pytest.raises(ElfError, match=r"emb/part-00002.parquet: does not match token shard .*tokens/part-00002"):
        make(data, tokens, emb)


def test_cache_from_another_encoder_is_an_error(data, cache_copy, tmp_path):
    tokens, emb = cache_copy
    with pytest.raises(ElfError, match=r"emb/manifest.json: embeddings have dim 32 but the encoder has 16"):
        make(data, tokens, emb, encoder=gaussian_encoder(50, 16, seed=0), encoder_hash=None)
    other = make_gaussian_encoder_dir(tmp_path / "gauss", dim=32)
    with pytest.raises(ElfError, match=r"emb/manifest.json: made with encoder .* not the given encoder"):
        make(data, tokens, emb, encoder_hash=encoder_content_hash(other))
