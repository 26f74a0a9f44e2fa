"""A trained model directory is self-contained: it loads anywhere with `ELFPipeline.from_pretrained`, generates,
round-trips through `save_pretrained`, and `elf sample --model DIR` works outside the project."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from elf.data.tokenizer import tokenizer_hash
from elf.encoders import gaussian_encoder, load_encoder, save_encoder
from elf.errors import ElfError
from elf.files import read_json
from elf.model import build_model
from elf.pretrained import ELFPipeline
from tests.conftest import inside, run_elf


@pytest.fixture
def elsewhere(built, tmp_path):
    """The owt model copied out of its project, into a directory with no params.yaml and no data/."""
    copy = tmp_path / "somewhere" / "owt-model"
    shutil.copytree(built / "models/owt/model", copy)
    return copy


def test_a_copied_model_directory_loads_with_from_pretrained_and_generates(elsewhere, tmp_path):
    with inside(tmp_path):
        pipeline = ELFPipeline.from_pretrained(str(elsewhere))
        texts = pipeline.generate(3, steps=2, seed=1)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert pipeline.generate(3, steps=2, seed=1) == texts  # same seed, same samples
    assert pipeline.sampler().kind == "sde" and pipeline.sampler().steps == 32  # the paper's lm sampler (§7)
    config = json.loads((elsewhere / "config.json").read_text())
    assert config["model_type"] == "elf" and config["architectures"] == ["ELF"] and config["dataset"] == "owt"
    assert {p.name for p in elsewhere.iterdir()} >= {"config.json", "model.safetensors", "tokenizer", "encoder"}


def test_save_pretrained_round_trips_weights_and_writes_a_model_card(elsewhere, tmp_path):
    pipeline = ELFPipeline.from_pretrained(elsewhere)
    again = tmp_path / "again"
    pipeline.save_pretrained(again)
    assert (again / "README.md").read_text().strip()
    reloaded = ELFPipeline.from_pretrained(again)
    first, second = load_file(str(elsewhere / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert reloaded.generate(2, steps=2) == pipeline.generate(2, steps=2)


def test_elf_sample_model_works_outside_the_project(elsewhere, tmp_path):
    result = run_elf("sample", "--model", str(elsewhere), "-n", "2", "--steps", "2", "--json", cwd=tmp_path)
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["index"] for row in rows] == [0, 1] and all(isinstance(row["text"], str) for row in rows)
    assert rows[0]["sampler"]["kind"] == "sde" and rows[0]["sampler"]["steps"] == 2
    assert rows[0]["sampler"]["guidance"] == 3.0  # the lm default, not given on the command line
    assert not (tmp_path / "params.yaml").exists()


def seq2seq_model(built, tmp_path):
    """A seq2seq model directory (an untrained network: the layout, not the quality, is under test)."""
    tokenizer_dir = built / "data/tokenizer"
    digest = tokenizer_hash(tokenizer_dir)
    vocab = load_encoder(built / "data/encoder").vocab_size
    save_encoder(gaussian_encoder(vocab, 8, seed=0), tmp_path / "encoder", digest)
    encoder = load_encoder(tmp_path / "encoder")
    torch.manual_seed(0)
    network = build_model("tiny", 8, vocab, depth=1, hidden=16, heads=2, bottleneck=4)
    info = {"dataset": "wmt14", "task": "seq2seq", "max_length": 16, "max_input_length": 8, "step": 0,
            "tokenizer_hash": digest,
            "encoder_content_hash": read_json(tmp_path / "encoder/encoder.json")["content_hash"]}
    from elf.data.tokenizer import load_tokenizer

    ELFPipeline(network, encoder, load_tokenizer(tokenizer_dir), info, tokenizer_dir,
                tmp_path / "encoder").save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_a_seq2seq_model_translates_each_source_with_the_papers_conditional_sampler(built, tmp_path):
    pipeline = ELFPipeline.from_pretrained(seq2seq_model(built, tmp_path))
    assert (pipeline.sampler().kind, pipeline.sampler().steps, pipeline.sampler().cfg_scale) == ("ode", 64, 2.0)
    texts = pipeline.generate(source=["the cat sat", "a dog"], steps=2)
    assert len(texts) == 2
    with pytest.raises(ElfError, match="needs a source text"):
        pipeline.generate(2, steps=2)
    result = run_elf("sample", "--model", str(tmp_path / "model"), "--steps", "2", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "needs a source text" in result.stderr


def test_an_lm_model_refuses_a_source(elsewhere):
    with pytest.raises(ElfError, match="unconditional: a source does not apply"):
        ELFPipeline.from_pretrained(elsewhere).generate(1, source="hallo", steps=2)
