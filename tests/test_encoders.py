"""Frozen encoders: masks of elf-method §2, normalisation, scratch training, self-contained save/load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import T5Config, T5EncoderModel

import elf.encoders as encoders
from elf.encoders import (
    FrozenEncoder,
    conditional_attention_mask,
    gaussian_encoder,
    load_encoder,
    load_pretrained_encoder,
    save_encoder,
)
from elf.errors import ElfError
from elf.scratch_encoder import span_corrupt, train_scratch_encoder
from elf.vocab import NUM_SENTINELS

VOCAB = 64
TOKENIZER_HASH = "a" * 64


def grammar_rows(count: int, seed: int) -> list[list[int]]:
    """Rows of a tiny repetitive grammar (det noun verb det noun .), each ending in EOS (id 1)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        row: list[int] = []
        while len(row) < 20:
            row += [3, int(rng.integers(10, 20)), int(rng.integers(20, 30)), 4, int(rng.integers(10, 20)), 5]
        rows.append(row[:20] + [1])
    return rows


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
    """A tiny T5 encoder saved with save_pretrained: the local stand-in for `t5-small`."""
    torch.manual_seed(0)
    config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    path = tmp_path_factory.mktemp("t5-tiny")
    T5EncoderModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pretrained(pretrained_dir) -> FrozenEncoder:
    return load_pretrained_encoder(str(pretrained_dir), vocab_size=VOCAB)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from two threads, and on a busy 2-core machine they lose up to 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def scratch():
    """One short training run shared by the tests."""
    rows = grammar_rows(160, seed=0)
    encoder, losses = train_scratch_encoder(
        rows, vocab_size=40, d_model=32, num_layers=2, num_heads=4, d_ff=64, steps=80, batch_size=16,
        max_length=32, lr=3e-3, seed=0,
    )
    return encoder, losses, rows


def batch(rng: torch.Generator, rows: int = 3, length: int = 12, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(3, vocab, (rows, length), generator=rng)


def conditional_inputs(length: int = 12, source: int = 5, valid: int = 10):
    source_mask = torch.zeros(2, length, dtype=torch.bool)
    source_mask[:, :source] = True
    valid_mask = torch.zeros(2, length, dtype=torch.bool)
    valid_mask[:, :valid] = True
    return source_mask, valid_mask


# --- the §2 masks -------------------------------------------------------------------------------------------


def test_conditional_mask_shape_and_rows():
    source_mask, valid_mask = conditional_inputs(length=6, source=2, valid=4)
    mask = conditional_attention_mask(source_mask, valid_mask, torch.tensor([False, True]))
    kept, dropped = mask[0].int().tolist(), mask[1].int().tolist()
    assert kept[0] == [1, 1, 0, 0, 0, 0]  # source → source only
    assert kept[2] == [1, 1, 1, 1, 0, 0]  # target → every valid token
    assert dropped[2] == [0, 0, 1, 1, 0, 0]  # condition dropped: target → target only
    assert kept[5] == [1, 1, 1, 1, 0, 0]  # EOS padding query → every valid token; padding is never a key
    assert dropped[5] == [0, 0, 1, 1, 0, 0]
    assert not mask[:, :, 4:].any()
    assert mask.any(dim=-1).all()


@pytest.mark.parametrize("drop", [False, True])
def test_target_embeddings_do_not_depend_on_the_padding_length(pretrained, drop):
    """The same [source ; target] pair laid out at two max_lengths: only the EOS padding differs (authors' code:
    padding is never an attention key), so source and target embeddings must agree."""
    from elf.data.layout import stack_seq2seq

    source, target = [5, 9, 13, 4], [21, 8, 30, 1]
    drop_condition = torch.tensor([drop])
    short, long = (pretrained.encode_conditional(*stack_seq2seq([source], [target], length), drop_condition)
                   for length in (12, 24))
    torch.testing.assert_close(short[:, :8], long[:, :8], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(short[:, 8:], long[:, 8:12], atol=1e-5, rtol=1e-5)  # padding embeddings too


@pytest.mark.parametrize("drop", [False, True])
def test_changing_a_target_token_never_changes_source_embeddings(pretrained, drop):
    rng = torch.Generator().manual_seed(1)
    ids = batch(rng, rows=2)
    source_mask, valid_mask = conditional_inputs()
    changed = ids.clone()
    changed[:, 7] = (changed[:, 7] + 1) % VOCAB
    drop_condition = torch.tensor([drop, drop])
    a = pretrained.encode_conditional(ids, source_mask, valid_mask, drop_condition)
    b = pretrained.encode_conditional(changed, source_mask, valid_mask, drop_condition)
    assert torch.equal(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:10], b[:, 5:10])


def test_dropped_condition_hides_the_source_from_the_target(pretrained):
    rng = torch.Generator().manual_seed(2)
    ids = batch(rng, rows=2)
    source_mask, valid_mask = conditional_inputs()
    changed = ids.clone()
    changed[:, 1] = (changed[:, 1] + 1) % VOCAB
    drop = torch.tensor([True, False])
    a = pretrained.encode_conditional(ids, source_mask, valid_mask, drop)
    b = pretrained.encode_conditional(changed, source_mask, valid_mask, drop)
    assert torch.allclose(a[0, 5:10], b[0, 5:10], atol=1e-6)  # dropped: target independent of the source
    assert not torch.allclose(a[1, 5:10], b[1, 5:10], atol=1e-3)  # kept: target contextualised on it


def test_source_and_dropped_target_equal_encoding_them_alone(pretrained):
    """T5 uses only relative positions, so the masked row must reproduce each side encoded by itself."""
    rng = torch.Generator().manual_seed(3)
    ids = batch(rng, rows=2)
    source_mask, valid_mask = conditional_inputs()
    out = pretrained.encode_conditional(ids, source_mask, valid_mask, torch.tensor([True, True]))
    source_alone = pretrained.encode(ids[:, :5], torch.ones(2, 5, dtype=torch.bool))
    target_alone = pretrained.encode(ids[:, 5:10], torch.ones(2, 5, dtype=torch.bool))
    torch.testing.assert_close(out[:, :5], source_alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 5:10], target_alone, atol=1e-5, rtol=1e-5)


def test_padding_never_changes_valid_outputs(pretrained):
    rng = torch.Generator().manual_seed(4)
    ids = batch(rng, rows=2, length=10)
    padded = torch.cat([ids, torch.zeros(2, 6, dtype=torch.long)], dim=1)
    other_pads = torch.cat([ids, batch(rng, rows=2, length=6)], dim=1)  # garbage ids behind the mask
    valid = torch.zeros(2, 16, dtype=torch.bool)
    valid[:, :10] = True
    plain = pretrained.encode_lm(ids, torch.ones(2, 10, dtype=torch.bool))
    for row in (padded, other_pads):
        torch.testing.assert_close(pretrained.encode_lm(row, valid)[:, :10], plain, atol=1e-5, rtol=1e-5)
        source_mask, _ = conditional_inputs(length=16, source=5)
        drop = torch.tensor([False, True])
        short_source, short_valid = conditional_inputs(length=10, source=5, valid=10)
        long_out = pretrained.encode_conditional(row, source_mask, valid, drop)
        short_out = pretrained.encode_conditional(ids, short_source, short_valid, drop)
        torch.testing.assert_close(long_out[:, :10], short_out, atol=1e-5, rtol=1e-5)
        assert torch.isfinite(long_out).all()


def test_all_padding_rows_stay_finite(pretrained):
    ids = torch.zeros(2, 6, dtype=torch.long)
    nothing = torch.zeros(2, 6, dtype=torch.bool)
    assert torch.isfinite(pretrained.encode_lm(ids, nothing)).all()
    drop = torch.tensor([False, True])
    assert torch.isfinite(pretrained.encode_conditional(ids, nothing, nothing, drop)).all()


def test_eager_and_sdpa_attention_read_the_3d_mask_alike(pretrained_dir):
    """The additive 4-D mask is right for both kernels (a boolean one is silently wrong under eager)."""
    rng = torch.Generator().manual_seed(5)
    ids = batch(rng, rows=2)
    source_mask, valid_mask = conditional_inputs()
    mask = conditional_attention_mask(source_mask, valid_mask, torch.tensor([False, True]))
    outs = []
    for implementation in ("sdpa", "eager"):
        backbone = T5EncoderModel.from_pretrained(pretrained_dir, attn_implementation=implementation)
        encoder = FrozenEncoder("pretrained", backbone=backbone, vocab_size=VOCAB,
                                normalisation={"kind": "scalar", "scale": 0.2})
        outs.append(encoder.encode(ids, mask))
    torch.testing.assert_close(outs[0][:, :10], outs[1][:, :10], atol=1e-5, rtol=1e-5)


# --- the encoder object -------------------------------------------------------------------------------------


def test_encoder_is_frozen_and_stays_in_eval_mode(pretrained):
    pretrained.train()
    assert not pretrained.training and not pretrained.backbone.training
    assert not any(p.requires_grad for p in pretrained.parameters())
    ids = batch(torch.Generator().manual_seed(6))
    assert torch.equal(pretrained.encode(ids), pretrained.encode(ids))  # no dropout


def test_pretrained_normalisation_is_the_scalar_0_2(pretrained):
    ids = batch(torch.Generator().manual_seed(7))
    hidden = pretrained.backbone(input_ids=ids).last_hidden_state
    assert pretrained.normalisation == {"kind": "scalar", "scale": 0.2}
    torch.testing.assert_close(pretrained.encode(ids), hidden / 0.2)


def test_token_ids_outside_the_vocabulary_are_rejected(pretrained):
    with pytest.raises(ElfError, match="input_ids"):
        pretrained.encode(torch.tensor([[3, VOCAB]]))


def test_gaussian_table_is_seeded_and_ignores_the_mask():
    a, b = gaussian_encoder(50, 16, seed=3), gaussian_encoder(50, 16, seed=3)
    assert torch.equal(a.table, b.table) and not torch.equal(a.table, gaussian_encoder(50, 16, seed=4).table)
    ids = torch.tensor([[5, 6, 7, 0]])
    out = a.encode(ids, torch.tensor([[True, True, True, False]]))
    assert out.dtype == torch.float32 and out.shape == (1, 4, 16)
    assert torch.equal(out, a.table[ids]) and a.normalisation == {"kind": "none"}


def test_hub_failures_name_the_model(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ElfError, match="elf-test/no-such-t5"):
        load_pretrained_encoder("elf-test/no-such-t5")
    with pytest.raises(ElfError, match="tokenizer has 65"):
        load_pretrained_encoder(str(_tiny_pretrained(tmp_path)), vocab_size=VOCAB + 1)


def _tiny_pretrained(tmp_path):
    config = T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4)
    T5EncoderModel(config).save_pretrained(tmp_path / "t5")
    return tmp_path / "t5"


# --- scratch training ---------------------------------------------------------------------------------------


def test_span_corruption_hides_spans_behind_sentinels_above_the_vocabulary():
    rng = np.random.default_rng(0)
    tokens = list(range(2, 40))  # 38 real ids below the sentinels
    sentinels = [40 + NUM_SENTINELS - 1 - k for k in range(NUM_SENTINELS)]
    inputs, targets = span_corrupt(tokens, 0.15, 3.0, sentinels, rng)
    assert inputs[-1] == targets[-1] == 1
    rebuilt, spans = [], {}
    current = None
    for token in targets[:-1]:
        if token in sentinels:
            current = spans.setdefault(token, [])
        else:
            current.append(token)
    for token in inputs[:-1]:
        rebuilt.extend(spans[token] if token in sentinels else [token])
    assert rebuilt == tokens
    assert sum(len(s) for s in spans.values()) == 6  # round(15% of 38)


def test_scratch_training_reduces_the_loss(scratch):
    encoder, losses, _ = scratch
    assert len(losses) == 80
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 1.0
    assert encoder.kind == "scratch" and encoder.num_sentinels == NUM_SENTINELS
    assert encoder.backbone.config.vocab_size == 40 + NUM_SENTINELS
    every_real_id = torch.arange(40).view(2, 20)
    assert torch.isfinite(encoder.encode(every_real_id)).all()
    with pytest.raises(ElfError, match="input_ids"):
        encoder.encode(torch.tensor([[40]]))  # sentinels are not valid input


def test_scratch_normalisation_is_per_channel_on_the_training_data(scratch):
    encoder, _, rows = scratch
    ids = torch.tensor(rows)
    x = encoder.encode_lm(ids, torch.ones_like(ids, dtype=torch.bool)).reshape(-1, encoder.dim)
    assert encoder.normalisation["kind"] == "per_channel"
    assert x.mean(0).abs().max() < 1e-3
    assert (x.std(0) - 1).abs().max() < 1e-2


def test_scratch_training_logs_and_is_seeded():
    rows = grammar_rows(20, seed=1)
    logged = []
    args = dict(vocab_size=40, d_model=16, num_layers=1, num_heads=2, d_ff=32, steps=5, batch_size=4,
                max_length=16, lr=1e-3, seed=7)
    state = torch.random.get_rng_state()
    a, losses_a = train_scratch_encoder(rows, log_fn=lambda s, v: logged.append(s), log_every=2, **args)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG is untouched
    b, losses_b = train_scratch_encoder(rows, **args)
    assert logged == [2, 4, 5] and losses_a == losses_b
    assert torch.equal(a.encode(torch.tensor(rows[:2])), b.encode(torch.tensor(rows[:2])))


def test_scratch_rejects_ids_outside_the_vocabulary():
    with pytest.raises(ElfError, match=r"rows\[1\]"):
        train_scratch_encoder([[3, 4, 1], [3, 40, 1]], vocab_size=40, d_model=16, num_layers=1, num_heads=2,
                              d_ff=32, steps=1, batch_size=2, max_length=8, lr=1e-3, seed=0)


# --- save / load --------------------------------------------------------------------------------------------


@pytest.fixture(params=["pretrained", "scratch", "gaussian"])
def any_encoder(request, pretrained, scratch):
    return {"pretrained": pretrained, "scratch": scratch[0], "gaussian": gaussian_encoder(40, 8, seed=0)}[
        request.param
    ]


def test_round_trip_gives_exactly_the_same_outputs(any_encoder, tmp_path):
    out = save_encoder(any_encoder, tmp_path / "encoder", TOKENIZER_HASH)
    loaded = load_encoder(out, expected_tokenizer_hash=TOKENIZER_HASH, expected_vocab_size=40)
    for attribute in ("kind", "dim", "vocab_size", "num_sentinels", "normalisation"):
        assert getattr(loaded, attribute) == getattr(any_encoder, attribute)
    rng = torch.Generator().manual_seed(8)
    ids = batch(rng, rows=2, vocab=40)
    source_mask, valid_mask = conditional_inputs()
    drop = torch.tensor([False, True])
    assert torch.equal(loaded.encode_lm(ids, valid_mask), any_encoder.encode_lm(ids, valid_mask))
    assert torch.equal(loaded.encode_conditional(ids, source_mask, valid_mask, drop),
                       any_encoder.encode_conditional(ids, source_mask, valid_mask, drop))
    record = json.loads((out / "encoder.json").read_text())
    assert record["tokenizer_hash"] == TOKENIZER_HASH and len(record["content_hash"]) == 64
    if any_encoder.kind != "gaussian":  # a plain save_pretrained directory
        T5EncoderModel.from_pretrained(out)


def test_saving_again_replaces_the_directory(pretrained, tmp_path):
    save_encoder(gaussian_encoder(40, 8, seed=0), tmp_path / "encoder", TOKENIZER_HASH)
    save_encoder(pretrained, tmp_path / "encoder", TOKENIZER_HASH)
    assert load_encoder(tmp_path / "encoder").kind == "pretrained"
    assert not (tmp_path / "encoder" / "table.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder"]


def test_a_failed_save_leaves_no_half_written_directory(pretrained, tmp_path, monkeypatch):
    def broken_hash(path):
        raise OSError("disk full")

    monkeypatch.setattr(encoders, "file_sha256", broken_hash)
    with pytest.raises(OSError):
        save_encoder(pretrained, tmp_path / "encoder", TOKENIZER_HASH)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    save_encoder(gaussian_encoder(40, 8, seed=0), tmp_path / "encoder", TOKENIZER_HASH)
    monkeypatch.setattr(encoders, "file_sha256", broken_hash)
    with pytest.raises(OSError):
        save_encoder(pretrained, tmp_path / "encoder", TOKENIZER_HASH)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder"]
    assert load_encoder(tmp_path / "encoder").kind == "gaussian"  # the previous encoder is intact


@pytest.fixture
def saved(pretrained, tmp_path):
    return save_encoder(pretrained, tmp_path / "encoder", TOKENIZER_HASH)


def _edit_record(directory, **changes):
    path = directory / "encoder.json"
    record = json.loads(path.read_text())
    record.update(changes)
    path.write_text(json.dumps(record))


def test_missing_directory_names_it(tmp_path):
    with pytest.raises(ElfError, match="nowhere"):
        load_encoder(tmp_path / "nowhere")


def test_missing_or_invalid_encoder_json_names_it(saved):
    (saved / "encoder.json").write_text("{not json")
    with pytest.raises(ElfError, match="encoder.json.*not valid JSON"):
        load_encoder(saved)
    (saved / "encoder.json").unlink()
    with pytest.raises(ElfError, match="encoder.json.*not found"):
        load_encoder(saved)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"kind": "bert"}, "unknown kind"),
        ({"format_version": 99}, "format_version"),
        ({"dim": "32"}, "'dim' must be int"),
        ({"normalisation": {"kind": "scalar", "scale": -1}}, "positive 'scale'"),
        ({"files": {}}, "does not list config.json"),
    ],
)
def test_invalid_encoder_json_names_the_file(saved, changes, message):
    _edit_record(saved, **changes)
    with pytest.raises(ElfError, match=f"encoder.json.*{message}"):
        load_encoder(saved)


def test_missing_weight_file_names_it(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(ElfError, match="model.safetensors.*missing"):
        load_encoder(saved)


def test_corrupt_weight_file_names_it(saved):
    path = saved / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ElfError, match="model.safetensors.*corrupt"):
        load_encoder(saved)


def test_unlisted_files_break_the_content_hash(saved):
    (saved / "stray.bin").write_bytes(b"x")
    with pytest.raises(ElfError, match="stray.bin"):
        load_encoder(saved)


def test_tokenizer_hash_mismatch_names_the_file(saved):
    with pytest.raises(ElfError, match="encoder.json.*tokenizer"):
        load_encoder(saved, expected_tokenizer_hash="b" * 64)


def test_vocabulary_mismatches_name_the_file(saved):
    with pytest.raises(ElfError, match="encoder.json.*tokenizer has 65"):
        load_encoder(saved, expected_vocab_size=VOCAB + 1)
    _edit_record(saved, vocab_size=VOCAB - 1)  # the record no longer matches the weights
    with pytest.raises(ElfError, match="config.json.*vocab_size"):
        load_encoder(saved)


def test_gaussian_table_shape_mismatch_names_the_file(tmp_path):
    out = save_encoder(gaussian_encoder(40, 8, seed=0), tmp_path / "encoder", TOKENIZER_HASH)
    _edit_record(out, dim=9)
    with pytest.raises(ElfError, match="table.safetensors.*shape"):
        load_encoder(out)
