"""The embed stage: values equal a direct encode, shards align with the token shards, resume after a kill,
stale files go, `cache=False`, and every bad input is a one-line error that leaves the output untouched."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import T5Config, T5EncoderModel

from elf.data.embed import embed_dataset, row_vectors, token_rows
from elf.data.layout import layout_lm, layout_seq2seq, row_checksum
from elf.data.shards import MANIFEST, ShardWriter
from elf.data.tokens import FORMAT as TOKENS_FORMAT
from elf.encoders import gaussian_encoder, load_encoder, load_pretrained_encoder, save_encoder
from elf.errors import ElfError
from elf.files import write_json_atomic
from elf.hashing import file_sha256
from elf.vocab import EOS_ID
from tests.conftest import REPO

VOCAB = 50
TOKENIZER_HASH = "7" * 64
TOKEN_TYPE = pa.list_(pa.int32())

# ---------------------------------------------------------------------------------------------------------
# Helpers shared with test_loader.py: synthetic token shards and small encoders
# ---------------------------------------------------------------------------------------------------------


def lm_rows(count: int, length: int, seed: int) -> list[list[int]]:
    """Rows of 2..L tokens ending in EOS; a few are full length, as packed long documents are."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        n = length if rng.random() < 0.3 else int(rng.integers(2, length + 1))
        rows.append([int(t) for t in rng.integers(2, VOCAB, n - 1)] + [EOS_ID])
    return rows


def seq2seq_rows(count: int, length: int, max_input: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """(source, target) pairs as the tokenize stage writes them: the source without EOS, the target ending in
    EOS, together ≤ L."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(count):
        ls = int(rng.integers(1, max_input + 1))
        lt = int(rng.integers(2, length - ls + 1))
        pairs.append(([int(t) for t in rng.integers(2, VOCAB, ls)],
                      [int(t) for t in rng.integers(2, VOCAB, lt - 1)] + [EOS_ID]))
    return pairs


def write_tokens(split_dir: Path, rows: list, max_length: int, max_input_length: int | None = None,
                 shard_rows: int = 40, group_rows: int = 15, vocab_size: int = VOCAB,
                 tokenizer_hash: str = TOKENIZER_HASH) -> dict:
    """Token shards + manifest in the tokenize stage's format; one write per `group_rows` rows gives row groups
    of uneven size (a write that crosses a shard boundary is split in two)."""
    split_dir.mkdir(parents=True, exist_ok=True)
    task = "lm" if max_input_length is None else "seq2seq"
    names = ["input_ids"] if task == "lm" else ["source_ids", "target_ids"]
    schema = pa.schema([(n, TOKEN_TYPE) for n in names])
    writer = ShardWriter(split_dir, schema, shard_rows, tuple(names))
    for start in range(0, len(rows), group_rows):
        piece = rows[start:start + group_rows]
        columns = [piece] if task == "lm" else [[p[0] for p in piece], [p[1] for p in piece]]
        writer.write(pa.Table.from_arrays([pa.array(c, TOKEN_TYPE) for c in columns], schema=schema))
    shards = writer.close()
    manifest = {"format": TOKENS_FORMAT, "dataset": "ds", "split": split_dir.name, "task": task, "columns": names,
                "max_length": max_length, "max_input_length": max_input_length, "tokenizer_hash": tokenizer_hash,
                "vocab_size": vocab_size, "pad_id": 0, "eos_id": 1, "rows": sum(s["rows"] for s in shards),
                "tokens": sum(s["tokens"] for s in shards), "shards": shards}
    write_json_atomic(split_dir / MANIFEST, manifest)
    return manifest


def make_t5_encoder_dir(path: Path, d_model: int = 32, num_layers: int = 1, seed: int = 0) -> Path:
    """A tiny T5 encoder saved as the encoder stage would save a pretrained one."""
    torch.manual_seed(seed)
    config = T5Config(d_model=d_model, num_layers=num_layers, num_heads=2, d_kv=d_model // 2, d_ff=2 * d_model,
                      vocab_size=VOCAB)
    T5EncoderModel(config).save_pretrained(path / "hf")
    save_encoder(load_pretrained_encoder(str(path / "hf"), vocab_size=VOCAB), path / "encoder", TOKENIZER_HASH)
    return path / "encoder"


def make_gaussian_encoder_dir(path: Path, dim: int = 16, tokenizer_hash: str = TOKENIZER_HASH) -> Path:
    return save_encoder(gaussian_encoder(VOCAB, dim, seed=0), path, tokenizer_hash)


def read_split(split_dir: Path) -> dict[str, list]:
    """Every column of an embeddings split, in shard order; vectors as float16 [n, d] arrays."""
    manifest = json.loads((split_dir / MANIFEST).read_text())
    columns: dict[str, list] = {}
    for shard in manifest["shards"]:
        table = pq.read_table(split_dir / shard["file"])
        for name in table.column_names:
            values = (table[name].to_pylist() if name == "token_crc32"
                      else row_vectors(table[name], manifest["dim"]))
            columns.setdefault(name, []).extend(values)
    return columns


def row_group_sizes(path: Path) -> list[int]:
    metadata = pq.ParquetFile(path).metadata
    return [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]


def snapshot(directory: Path) -> dict[str, tuple[int, int, str]]:
    """(inode, mtime, sha256) of every file below `directory`."""
    return {p.relative_to(directory).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns, file_sha256(p))
            for p in sorted(directory.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------

L, MAX_INPUT = 24, 10


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_tokens(root / "lm/train", lm_rows(100, L, seed=1), L)
    write_tokens(root / "lm/validation", lm_rows(20, L, seed=2), L)
    write_tokens(root / "s2s/train", seq2seq_rows(70, L, MAX_INPUT, seed=3), L, MAX_INPUT)
    return root


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return make_t5_encoder_dir(tmp_path_factory.mktemp("t5"))


@pytest.fixture(scope="module")
def t5(t5_dir):
    return load_encoder(t5_dir)


# ---------------------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------------------


def test_lm_embeddings_equal_a_direct_encode_and_align_with_token_shards(corpus, t5_dir, t5, tmp_path):
    manifests = embed_dataset(corpus / "lm", t5_dir, tmp_path / "emb", cache=True, batch_size=8, progress=False)
    assert set(manifests) == {"train", "validation"}
    manifest = manifests["train"]
    tokens_manifest = json.loads((corpus / "lm/train" / MANIFEST).read_text())
    assert manifest == json.loads((tmp_path / "emb/train" / MANIFEST).read_text())
    assert manifest["format"] == "elf-embeddings/1" and manifest["cached"] is True and manifest["dtype"] == "float16"
    assert manifest["dim"] == 32 and manifest["task"] == "lm" and manifest["rows"] == 100
    assert manifest["encoder_content_hash"] == json.loads((t5_dir / "encoder.json").read_text())["content_hash"]
    assert manifest["tokens_manifest_sha256"] == file_sha256(corpus / "lm/train" / MANIFEST)
    assert [s["file"] for s in manifest["shards"]] == [s["file"] for s in tokens_manifest["shards"]]
    for shard, token_shard in zip(manifest["shards"], tokens_manifest["shards"], strict=True):
        assert shard["token_shard_sha256"] == token_shard["sha256"]
        assert shard["sha256"] == file_sha256(tmp_path / "emb/train" / shard["file"])
        sizes = row_group_sizes(corpus / "lm/train" / token_shard["file"])
        assert len(sizes) > 1 and row_group_sizes(tmp_path / "emb/train" / shard["file"]) == sizes
    rows = [r for s in tokens_manifest["shards"]
            for r in token_rows(pq.read_table(corpus / "lm/train" / s["file"])["input_ids"])]
    columns = read_split(tmp_path / "emb/train")
    assert columns["token_crc32"] == [row_checksum(r) for r in rows]
    ids, valid = (torch.from_numpy(np.stack(parts)) for parts in zip(*(layout_lm(r, L) for r in rows), strict=True))
    expected = t5.encode_lm(ids, valid)
    for i, (row, x) in enumerate(zip(rows, columns["x"], strict=True)):
        assert x.shape == (len(row), 32) and x.dtype == np.float16
        torch.testing.assert_close(torch.from_numpy(x.astype(np.float32)), expected[i, :len(row)], rtol=1e-3, atol=1e-3)


def test_seq2seq_columns_hold_source_and_both_target_variants(corpus, t5_dir, t5, tmp_path):
    embed_dataset(corpus / "s2s", t5_dir, tmp_path / "emb", cache=True, batch_size=16, progress=False)
    columns = read_split(tmp_path / "emb/train")
    tokens_manifest = json.loads((corpus / "s2s/train" / MANIFEST).read_text())
    pairs = []
    for shard in tokens_manifest["shards"]:
        table = pq.read_table(corpus / "s2s/train" / shard["file"])
        pairs += zip(token_rows(table["source_ids"]), token_rows(table["target_ids"]), strict=True)
    assert columns["token_crc32"] == [row_checksum(s, t) for s, t in pairs]
    ids, source_mask, valid = (torch.from_numpy(np.stack(parts))
                               for parts in zip(*(layout_seq2seq(s, t, L) for s, t in pairs), strict=True))
    keep = torch.zeros(len(pairs), dtype=torch.bool)
    with_source = t5.encode_conditional(ids, source_mask, valid, keep)
    without = t5.encode_conditional(ids, source_mask, valid, ~keep)
    differs = 0
    for i, (source, _) in enumerate(pairs):
        n = len(source)
        got = {k: torch.from_numpy(columns[k][i].astype(np.float32))
               for k in ("source", "target_with_source", "target_without_source")}
        assert got["source"].shape == (n, 32) and got["target_with_source"].shape == (L - n, 32)
        torch.testing.assert_close(got["source"], with_source[i, :n], rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(got["source"], without[i, :n], rtol=1e-3, atol=1e-3)  # never sees the target
        torch.testing.assert_close(got["target_with_source"], with_source[i, n:], rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(got["target_without_source"], without[i, n:], rtol=1e-3, atol=1e-3)
        differs += not torch.allclose(got["target_with_source"], got["target_without_source"], atol=1e-2)
    assert differs == len(pairs)  # with a T5 encoder, dropping the condition changes every target


# ---------------------------------------------------------------------------------------------------------
# Resume, stale files, cache=False
# ---------------------------------------------------------------------------------------------------------

KILL_SCRIPT = """
from pathlib import Path
from elf.data.embed import embed_dataset
embed_dataset(Path({tokens!r}), Path({encoder!r}), Path({out!r}), cache=True, batch_size=32, progress=False)
"""


def test_rerun_after_kill_keeps_finished_shards_and_matches_a_clean_run(tmp_path):
    tokens = tmp_path / "tokens"
    write_tokens(tokens / "train", lm_rows(2400, 64, seed=5), 64, shard_rows=300, group_rows=100)
    encoder = make_t5_encoder_dir(tmp_path / "enc", d_model=64, num_layers=2)
    out = tmp_path / "out"
    code = KILL_SCRIPT.format(tokens=str(tokens), encoder=str(encoder), out=str(out))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list((out / "train").glob("part-*.json")) and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL, child.stderr.read().decode()
    assert not (out / "train" / MANIFEST).exists()
    finished = {p.with_suffix(".parquet").name for p in (out / "train").glob("part-*.json")}
    assert 1 <= len(finished) < 8
    before = {k: v for k, v in snapshot(out / "train").items() if k in finished}

    manifests = embed_dataset(tokens, encoder, out, cache=True, batch_size=32, progress=False)
    after = snapshot(out / "train")
    assert {k: after[k] for k in before} == before  # kept: same inode, same mtime, same bytes
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(
        [MANIFEST] + [f"part-{i:05d}.{ext}" for i in range(8) for ext in ("json", "parquet")])

    clean = embed_dataset(tokens, encoder, tmp_path / "clean", cache=True, batch_size=32, progress=False)
    assert manifests == clean
    assert read_split(out / "train")["x"][-1].tobytes() == read_split(tmp_path / "clean/train")["x"][-1].tobytes()


def test_rerun_removes_stale_files_and_redoes_changed_shards(corpus, tmp_path):
    encoder = make_gaussian_encoder_dir(tmp_path / "enc")
    tokens = tmp_path / "tokens"
    shutil.copytree(corpus / "lm", tokens)
    out = tmp_path / "out"
    embed_dataset(tokens, encoder, out, cache=True, batch_size=8, progress=False)
    unchanged = snapshot(out)
    embed_dataset(tokens, encoder, out, cache=True, batch_size=8, progress=False)
    assert {k: v for k, v in snapshot(out).items() if not k.endswith(MANIFEST)} == \
        {k: v for k, v in unchanged.items() if not k.endswith(MANIFEST)}

    (out / "train/part-00042.parquet").write_bytes(b"stale")
    (out / "train/part-00042.json").write_text("{}")
    (out / "train/.part-00000.parquet.tmp-999").write_bytes(b"leftover")
    (out / "test").mkdir()
    (out / "test/part-00000.parquet").write_bytes(b"stale split")
    shutil.rmtree(tokens / "validation")
    write_tokens(tokens / "train", lm_rows(50, L, seed=9), L)  # fewer, different shards
    manifests = embed_dataset(tokens, encoder, out, cache=True, batch_size=8, progress=False)
    assert set(manifests) == {"train"} and not (out / "test").exists() and not (out / "validation").exists()
    shards = [s["file"] for s in manifests["train"]["shards"]]
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(
        [MANIFEST] + shards + [s.replace(".parquet", ".json") for s in shards])
    assert len(read_split(out / "train")["x"]) == 50


def test_cache_false_writes_only_a_manifest(corpus, tmp_path):
    encoder = make_gaussian_encoder_dir(tmp_path / "enc")
    out = tmp_path / "out"
    embed_dataset(corpus / "s2s", encoder, out, cache=True, batch_size=8, progress=False)
    manifests = embed_dataset(corpus / "s2s", encoder, out, cache=False, batch_size=8, progress=False)
    assert [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()] == ["train/manifest.json"]
    manifest = json.loads((out / "train" / MANIFEST).read_text())
    assert manifest == manifests["train"] and manifest["cached"] is False and "shards" not in manifest
    assert manifest["encoder_content_hash"] == json.loads((encoder / "encoder.json").read_text())["content_hash"]
    assert manifest["tokenizer_hash"] == TOKENIZER_HASH and manifest["dim"] == 16


# ---------------------------------------------------------------------------------------------------------
# Bad input: one-line errors naming the file, nothing written
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def good(corpus, tmp_path):
    """A tokens dir, an encoder and an output dir holding a finished run (which bad input must not touch)."""
    tokens = tmp_path / "tokens"
    shutil.copytree(corpus / "lm", tokens)
    encoder = make_gaussian_encoder_dir(tmp_path / "enc")
    out = tmp_path / "out"
    embed_dataset(tokens, encoder, out, cache=True, batch_size=8, progress=False)
    return tokens, encoder, out


def expect_error(tokens, encoder, out, match: str) -> None:
    before = snapshot(out)
    with pytest.raises(ElfError, match=match) as error:
        embed_dataset(tokens, encoder, out, cache=True, batch_size=8, progress=False)
    assert "\n" not in str(error.value)
    assert snapshot(out) == before


def test_missing_encoder_is_an_error(good, tmp_path):
    tokens, _, out = good
    expect_error(tokens, tmp_path / "nowhere", out, "nowhere: encoder directory not found")


def test_corrupt_encoder_is_an_error(good):
    tokens, encoder, out = good
    (encoder / "table.safetensors").write_bytes(b"garbage")
    expect_error(tokens, encoder, out, "table.safetensors: file is corrupt")


def test_encoder_for_another_tokenizer_is_an_error_naming_both_files(good, tmp_path):
    tokens, _, out = good
    other = make_gaussian_encoder_dir(tmp_path / "other", tokenizer_hash="0" * 64)
    expect_error(tokens, other, out, r"other/encoder.json: encoder was built for tokenizer 000000000000…, "
                                     r"but .*tokens/train/manifest.json")


def test_vocabulary_mismatch_is_an_error_naming_both_files(good):
    tokens, encoder, out = good
    manifest = json.loads((tokens / "train" / MANIFEST).read_text())
    write_json_atomic(tokens / "train" / MANIFEST, {**manifest, "vocab_size": VOCAB + 10})
    expect_error(tokens, encoder, out, r"enc/encoder.json: encoder accepts 50 token ids but .*train/manifest.json")


def test_missing_tokens_manifest_is_an_error(good):
    tokens, encoder, out = good
    (tokens / "train" / MANIFEST).unlink()
    expect_error(tokens, encoder, out, "train/manifest.json: manifest not found")


def test_tokens_of_an_older_layout_are_an_error_saying_to_rerun(good):
    """elf-tokens/1 rows (an EOS after every source, one document per lm row) must not be embedded silently."""
    tokens, encoder, out = good
    manifest = json.loads((tokens / "train" / MANIFEST).read_text())
    write_json_atomic(tokens / "train" / MANIFEST, {**manifest, "format": "elf-tokens/1"})
    expect_error(tokens, encoder, out, r"train/manifest.json: format 'elf-tokens/1' is not 'elf-tokens/2' .*rerun")


def test_token_shard_with_wrong_checksum_is_an_error(good):
    tokens, encoder, out = good
    shard = tokens / "validation/part-00000.parquet"
    table = pq.read_table(shard)
    pq.write_table(table.slice(1), shard)
    expect_error(tokens, encoder, out, "validation/part-00000.parquet: checksum does not match")


def test_output_inside_the_inputs_is_refused(good):
    tokens, encoder, _ = good
    before = snapshot(tokens)
    with pytest.raises(ElfError, match="must be apart from the tokens directory"):
        embed_dataset(tokens, encoder, tokens, cache=True, batch_size=8, progress=False)
    with pytest.raises(ElfError, match="must be apart from the encoder directory"):
        embed_dataset(tokens, encoder, encoder / "emb", cache=True, batch_size=8, progress=False)
    assert snapshot(tokens) == before
