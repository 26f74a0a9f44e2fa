"""The tokenizer and tokenize stages: round trips, packing invariants, truncation, bad input, atomicity."""

import json
import math
import random
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from elf.config import DatasetConfig, TokenizeConfig
from elf.data.shards import verify_shards
from elf.data.tokenizer import build_tokenizer, load_tokenizer
from elf.data.tokens import RowPacker, pack_documents, paragraphs_of, tokenize_dataset, truncate_pair
from elf.errors import ElfError
from elf.vocab import EOS_ID
from tests.conftest import BIN, REPO, run_elf

WORDS = "the a old red dog cat sees runs house ball in on quickly big small man woman eats".split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    rng = random.Random(0)
    texts = [sentence(rng, rng.randint(3, 12)) for _ in range(500)]
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    build_tokenizer("train", "t5-small", 300, iter(texts), out)
    return out


LM = DatasetConfig(task="lm", source="demo", max_length=16,
                   demo={"generator": "lm", "train_size": 1, "validation_size": 1})
S2S = DatasetConfig(task="seq2seq", source="demo", max_length=24, max_input_length=10,
                    demo={"generator": "translation", "train_size": 1, "validation_size": 1})
SETTINGS = TokenizeConfig(shard_rows=7, batch_size=5)


def write_raw(path, **columns):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


def read_rows(split_dir, column):
    manifest = verify_shards(split_dir)
    rows = []
    for shard in manifest["shards"]:
        rows += pq.read_table(split_dir / shard["file"])[column].to_pylist()
    return manifest, rows


@pytest.mark.parametrize("algorithm", ["bpe", "unigram"])
def test_trained_tokenizer_follows_t5_conventions_and_round_trips(algorithm, tmp_path):
    rng = random.Random(0)
    texts = [sentence(rng, rng.randint(3, 12)) for _ in range(500)]
    build_tokenizer("train", "", 300, iter(texts), tmp_path / "tok", algorithm=algorithm)
    tok = load_tokenizer(tmp_path / "tok")
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    text = "The old  dog sees a red ball."
    ids = tok(text)["input_ids"]
    assert ids[-1] == EOS_ID and ids.count(EOS_ID) == 1
    assert tok.decode(ids, skip_special_tokens=True) == "The old dog sees a red ball."
    vocab = tok.get_vocab()
    assert len(tok) <= 300 and vocab["<extra_id_0>"] == len(tok) - 1  # sentinels last, as in t5-small
    assert all(tok.decode(tok(t)["input_ids"], skip_special_tokens=True) == t for t in texts)


def test_bpe_tokenizer_keeps_the_words_of_a_small_corpus_whole(tokenizer_dir):
    """Why the demo trains BPE: Unigram splits even frequent words of a small corpus into fragments."""
    tok = load_tokenizer(tokenizer_dir)
    pieces = tok.convert_ids_to_tokens(tok("The old dog sees a red ball.", add_special_tokens=False)["input_ids"])
    assert pieces == ["▁The", "▁old", "▁dog", "▁sees", "▁a", "▁red", "▁ball", "."]


@pytest.mark.parametrize("algorithm", ["bpe", "unigram"])
def test_tokenizer_training_is_reproducible_across_processes(algorithm, tmp_path):
    script = (
        "import random, sys; from tests.test_tokens import sentence; from elf.data.tokenizer import build_tokenizer; "
        "texts = [sentence(random.Random(i), 8) for i in range(300)]; "
        f"print(build_tokenizer('train', '', 300, iter(texts), sys.argv[1], algorithm='{algorithm}'))"
    )
    digests = [subprocess.run([sys.executable, "-c", script, str(tmp_path / name)], cwd=REPO, check=True,
                              capture_output=True, text=True).stdout.strip() for name in ("a", "b")]
    assert digests[0] == digests[1] and len(digests[0]) == 64


def test_unknown_tokenizer_algorithm_or_no_text_is_one_line_error(tmp_path):
    with pytest.raises(ElfError, match="tokenizer.algorithm: unknown 'wordpiece'"):
        build_tokenizer("train", "", 300, iter(["a b"]), tmp_path / "t", algorithm="wordpiece")
    with pytest.raises(ElfError, match="no training text"):
        build_tokenizer("train", "", 300, iter([]), tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_pretrained_tokenizer_loads_by_local_path(tokenizer_dir, tmp_path):
    digest = build_tokenizer("pretrained", str(tokenizer_dir), 0, None, tmp_path / "copy")
    copied, original = load_tokenizer(tmp_path / "copy"), load_tokenizer(tokenizer_dir)
    assert copied("a dog")["input_ids"] == original("a dog")["input_ids"]
    assert len(digest) == 64


def test_unreachable_pretrained_tokenizer_is_one_line_error(tmp_path):
    with pytest.raises(ElfError, match="cannot load tokenizer 'no-such-org/no-such-tokenizer'"):
        build_tokenizer("pretrained", "no-such-org/no-such-tokenizer", 0, None, tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_pack_documents_invariants():
    docs = [list(range(3, 3 + n)) for n in (0, 1, 14, 15, 16, 40)]
    rows, split_docs = pack_documents(docs, max_length=16)
    assert all(len(r) <= 16 and r[-1] == EOS_ID and r.count(EOS_ID) == 1 for r in rows)
    assert split_docs == 2  # the 16- and 40-token documents do not fit one row of 15 + EOS
    assert [t for r in rows for t in r[:-1]] == [t for d in docs for t in d]


def test_truncate_pair_source_has_no_eos_and_uses_max_input_length():
    """The authors' conditional rows: [source ≤ max_input_length ; target + EOS], no EOS after the source."""
    source, target, truncated = truncate_pair(list(range(3, 30)), list(range(3, 30)), 24, 10)
    assert source == list(range(3, 13)) and EOS_ID not in source  # all 10 positions are source tokens
    assert len(source) + len(target) == 24 and target[-1] == EOS_ID and target[:-1] == list(range(3, 16))
    assert truncated
    assert truncate_pair(list(range(3, 13)), [7], 24, 10) == (list(range(3, 13)), [7, EOS_ID], False)
    assert truncate_pair([5, 6], [7], 24, 10) == ([5, 6], [7, EOS_ID], False)
    assert truncate_pair([5] * 23, [7, 8], 24, 23) == ([5] * 23, [EOS_ID], True)  # the target keeps its EOS
    with pytest.raises(ElfError, match="no tokens"):
        truncate_pair([], [7], 24, 10)


def test_lm_shards_lose_and_duplicate_nothing(tokenizer_dir, tmp_path):
    rng = random.Random(1)
    docs = [" ".join(sentence(rng, rng.randint(2, 9)) for _ in range(rng.randint(1, 5))) for _ in range(60)]
    docs[3], docs[10] = "", "   \n "
    write_raw(tmp_path / "raw/train.parquet", text=docs)
    write_raw(tmp_path / "raw/validation.parquet", text=docs[:5])
    manifests = tokenize_dataset("owt", LM, SETTINGS, tmp_path / "raw", tokenizer_dir, tmp_path / "tokens")
    manifest, rows = read_rows(tmp_path / "tokens/train", "input_ids")
    assert manifest == manifests["train"] and len(manifest["shards"]) > 1
    assert manifest["skipped_empty"] == 2 and manifest["documents"] == 60
    assert manifest["rows"] == len(rows) and manifest["tokens"] == sum(map(len, rows))
    assert all(len(r) <= 16 and r[-1] == EOS_ID and r.count(EOS_ID) == 1 for r in rows)
    tok = load_tokenizer(tokenizer_dir)
    expected = [t for d in docs if d.strip() for t in tok(d, add_special_tokens=False)["input_ids"]]
    assert [t for r in rows for t in r[:-1]] == expected
    first_shard = tmp_path / "tokens/train" / manifest["shards"][0]["file"]
    assert pq.read_schema(first_shard).field(0).type == pa.list_(pa.int32())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw", "tokens"]


def owt_like_documents(rng: random.Random, n: int) -> list[str]:
    """Documents shaped like OpenWebText in T5 tokens: lengths log-normal around a median of ≈ 500 with a
    tail past 1024, made of paragraphs of ≈ 50 tokens (one per line, blank lines between them)."""
    docs = []
    for _ in range(n):
        target = rng.lognormvariate(math.log(500), 0.9)
        paragraphs, size = [], 0
        while size < target:
            sentences, length = [], rng.lognormvariate(math.log(50), 0.8)
            while sum(len(x.split()) + 1 for x in sentences) < length:
                sentences.append(sentence(rng, rng.randint(3, 14)))
            paragraphs.append(" ".join(sentences))
            size += sum(len(x.split()) + 1 for x in sentences)
        docs.append("\n\n".join(paragraphs))
    return docs


def fill_of(rows, max_length):
    return sum(len(r) / max_length for r in rows) / len(rows)


@pytest.mark.parametrize("packing", ["paragraphs", "documents"])
def test_row_fill_on_owt_like_documents(tokenizer_dir, tmp_path, packing):
    """Paragraph packing fills rows of 1024 ≥ 85% (the paper's ≈ 85–100%); one document per row cannot."""
    docs = owt_like_documents(random.Random(5), 150)
    tok = load_tokenizer(tokenizer_dir)
    lengths = sorted(len(ids) for ids in tok(docs, add_special_tokens=False)["input_ids"])
    assert 400 < lengths[len(lengths) // 2] < 600 and sum(n > 1024 for n in lengths) >= 10
    write_raw(tmp_path / "raw/train.parquet", text=docs)
    owt = DatasetConfig(task="lm", source="demo", max_length=1024,
                        demo={"generator": "lm", "train_size": 1, "validation_size": 1})
    settings = TokenizeConfig(shard_rows=40, batch_size=16, packing=packing)
    tokenize_dataset("owt", owt, settings, tmp_path / "raw", tokenizer_dir, tmp_path / "tokens")
    manifest, rows = read_rows(tmp_path / "tokens/train", "input_ids")
    fill = fill_of(rows, 1024)
    print(f"{packing}: mean row fill {fill:.4f} over {len(rows)} rows")
    assert manifest["packing"] == packing and manifest["mean_row_fill"] == pytest.approx(fill, rel=1e-12)
    assert all(len(r) <= 1024 and r[-1] == EOS_ID and r.count(EOS_ID) == 1 for r in rows)
    if packing == "paragraphs":
        assert fill >= 0.85 and min(map(len, rows[:-1])) > 0.5 * 1024
        assert manifest["paragraphs"] == sum(len(paragraphs_of(d)) for d in docs)
    else:
        assert fill < 0.75 and manifest["paragraphs"] is None


def test_paragraph_packing_exact_layout(tokenizer_dir, tmp_path):
    """Rows of L = 6 (body 5): paragraphs concatenated across documents with no separator, one EOS per row,
    a row closed when the next paragraph does not fit, an over-long paragraph split, blank lines dropped."""
    tok = load_tokenizer(tokenizer_dir)
    docs = ["the dog\n\n   \nsees a cat", "  \n ", "old red house ball in on big small", "man\nwoman eats\n"]
    ids = {w: tok.convert_tokens_to_ids("▁" + w) for d in docs for w in d.split()}
    assert all(tok(w, add_special_tokens=False)["input_ids"] == [i] for w, i in ids.items())  # one token a word
    write_raw(tmp_path / "raw/train.parquet", text=docs)
    lm = DatasetConfig(task="lm", source="demo", max_length=6,
                       demo={"generator": "lm", "train_size": 1, "validation_size": 1})
    tokenize_dataset("owt", lm, SETTINGS, tmp_path / "raw", tokenizer_dir, tmp_path / "tokens")
    manifest, rows = read_rows(tmp_path / "tokens/train", "input_ids")
    expected = ["the dog sees a cat", "old red house ball in", "on big small man", "woman eats"]
    assert rows == [[ids[w] for w in row.split()] + [EOS_ID] for row in expected]
    assert [t for r in rows for t in r[:-1]] == [ids[w] for d in docs for w in d.split()]
    assert (manifest["paragraphs"], manifest["split_documents"], manifest["skipped_empty"]) == (5, 1, 1)
    assert manifest["mean_row_fill"] == pytest.approx((6 + 6 + 5 + 3) / (4 * 6))


def test_paragraph_packing_does_not_depend_on_batches_or_workers(tokenizer_dir, tmp_path):
    """The open row is carried across tokenizer batches and worker results, so only the corpus decides rows."""
    rng = random.Random(6)
    docs = ["\n".join(sentence(rng, rng.randint(2, 8)) for _ in range(rng.randint(1, 5))) for _ in range(80)]
    docs[7] = "the " * 40  # a paragraph longer than a row
    write_raw(tmp_path / "raw/train.parquet", text=docs)
    tok = load_tokenizer(tokenizer_dir)
    paragraphs = [tok(p, add_special_tokens=False)["input_ids"] for d in docs for p in paragraphs_of(d)]
    results = []
    for batch_size, workers in [(1, 0), (7, 2), (1000, 0)]:
        settings = TokenizeConfig(shard_rows=7, batch_size=batch_size, workers=workers)
        out = tmp_path / f"tokens-{batch_size}-{workers}"
        tokenize_dataset("owt", LM, settings, tmp_path / "raw", tokenizer_dir, out)
        manifest, rows = read_rows(out / "train", "input_ids")
        assert all(len(r) <= 16 and r[-1] == EOS_ID and r.count(EOS_ID) == 1 for r in rows)
        assert [t for r in rows for t in r[:-1]] == [t for p in paragraphs for t in p]
        results.append((rows, {k: v for k, v in manifest.items() if k not in ("shards",)}))
    assert results[0] == results[1] == results[2]
    assert results[0][1]["split_documents"] == 1 and results[0][1]["rows"] < len(paragraphs)


def test_row_packer_streams_across_add_calls():
    rng = random.Random(7)
    paragraphs = [list(range(3, 3 + rng.choice([0, 1, 3, 9, 15, 16, 31, 45]))) for _ in range(300)]
    whole = RowPacker(16)
    expected = whole.add(paragraphs) + whole.flush()
    pieces, packer, start = [], RowPacker(16), 0
    while start < len(paragraphs):
        step = rng.randint(0, 10)
        pieces += packer.add(paragraphs[start : start + step])
        start += step
    assert pieces + packer.flush() == expected and packer.split == whole.split
    assert all(len(r) <= 16 and r[-1] == EOS_ID and r.count(EOS_ID) == 1 for r in expected)
    assert [t for r in expected for t in r[:-1]] == [t for p in paragraphs for t in p]


def test_documents_packing_keeps_one_document_per_row(tokenizer_dir, tmp_path):
    rng = random.Random(8)
    docs = ["\n\n".join(sentence(rng, rng.randint(2, 9)) for _ in range(rng.randint(1, 4))) for _ in range(40)]
    docs[5] = " \n "
    write_raw(tmp_path / "raw/train.parquet", text=docs)
    settings = TokenizeConfig(shard_rows=7, batch_size=5, packing="documents")
    tokenize_dataset("owt", LM, settings, tmp_path / "raw", tokenizer_dir, tmp_path / "tokens")
    manifest, rows = read_rows(tmp_path / "tokens/train", "input_ids")
    tok = load_tokenizer(tokenizer_dir)
    expected, split_docs = pack_documents(
        [tok(d, add_special_tokens=False)["input_ids"] for d in docs if d.strip()], 16)
    assert rows == expected and manifest["split_documents"] == split_docs > 0
    assert manifest["packing"] == "documents" and manifest["paragraphs"] is None
    assert manifest["mean_row_fill"] == pytest.approx(fill_of(rows, 16))


def test_seq2seq_rows_truncated_as_specified(tokenizer_dir, tmp_path):
    rng = random.Random(2)
    sources = [" ".join(sentence(rng, 6) for _ in range(rng.randint(1, 4))) for _ in range(30)]
    targets = [sentence(rng, rng.randint(2, 20)) for _ in range(30)]
    targets[4] = " "
    write_raw(tmp_path / "raw/train.parquet", source=sources, target=targets)
    tokenize_dataset("wmt14", S2S, SETTINGS, tmp_path / "raw", tokenizer_dir, tmp_path / "tokens")
    manifest, src = read_rows(tmp_path / "tokens/train", "source_ids")
    _, tgt = read_rows(tmp_path / "tokens/train", "target_ids")
    assert manifest["skipped_empty"] == 1 and manifest["rows"] == 29 and manifest["truncated"] > 0
    tok = load_tokenizer(tokenizer_dir)
    kept = [(s, t) for s, t in zip(sources, targets, strict=True) if t.strip()]
    for (s_text, t_text), s_ids, t_ids in zip(kept, src, tgt, strict=True):
        s_all = tok(s_text, add_special_tokens=False)["input_ids"]
        assert s_ids == s_all[:10] and EOS_ID not in s_ids  # no EOS between source and target
        assert len(s_ids) + len(t_ids) <= 24 and t_ids[-1] == EOS_ID
        assert t_ids[:-1] == tok(t_text, add_special_tokens=False)["input_ids"][: len(t_ids) - 1]
    assert any(len(s) == 10 for s in src)
    assert manifest["packing"] is None and manifest["mean_row_fill"] is None and manifest["format"] == "elf-tokens/2"


def test_source_without_tokens_is_one_line_error(tokenizer_dir, tmp_path, monkeypatch):
    """Blank sources are skipped, but a tokenizer could still map some text to no ids: name the row."""
    from elf.data import tokens

    encode = tokens._encode
    monkeypatch.setattr(tokens, "_encode", lambda tok, texts: [[] if t == "zz" else ids for t, ids in
                                                              zip(texts, encode(tok, texts), strict=True)])
    write_raw(tmp_path / "raw/train.parquet", source=["a dog", " ", "zz"], target=["the cat", "a", "a"])
    with pytest.raises(ElfError, match=r"train.parquet: row 2, column 'source': no tokens after tokenization"):
        tokenize_dataset("wmt14", S2S, SETTINGS, tmp_path / "raw", tokenizer_dir, tmp_path / "tokens")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


@pytest.mark.parametrize(
    "make_raw, expected",
    [
        (lambda p: write_raw(p, body=["a dog"]), "train.parquet: missing column 'text' (found: body)"),
        (lambda p: write_raw(p, text=pa.array([b"a dog", b"\xff\xfe bad"], pa.binary())),
         "train.parquet: row 1, column 'text': invalid UTF-8"),
        (lambda p: write_raw(p, text=[1, 2]), "train.parquet: column 'text' must hold text"),
        (lambda p: p.write_bytes(b"PAR1 this is not parquet"), "train.parquet: not a readable Parquet file"),
    ],
)
def test_bad_raw_input_is_one_line_error_without_partial_output(tokenizer_dir, tmp_path, make_raw, expected):
    raw = tmp_path / "raw/train.parquet"
    raw.parent.mkdir(parents=True)
    make_raw(raw)
    with pytest.raises(ElfError) as error:
        tokenize_dataset("owt", LM, SETTINGS, tmp_path / "raw", tokenizer_dir, tmp_path / "tokens")
    assert expected in str(error.value) and "\n" not in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_truncated_parquet_is_rejected(tokenizer_dir, tmp_path):
    raw = tmp_path / "raw/train.parquet"
    write_raw(raw, text=[sentence(random.Random(i), 9) for i in range(2000)])
    raw.write_bytes(raw.read_bytes()[: raw.stat().st_size // 2])
    with pytest.raises(ElfError, match="train.parquet: not a readable Parquet file"):
        tokenize_dataset("owt", LM, SETTINGS, tmp_path / "raw", tokenizer_dir, tmp_path / "tokens")


def test_failure_keeps_previous_output_intact(tokenizer_dir, tmp_path):
    write_raw(tmp_path / "raw/train.parquet", text=["A dog runs."] * 10)
    tokenize_dataset("owt", LM, SETTINGS, tmp_path / "raw", tokenizer_dir, tmp_path / "tokens")
    before = (tmp_path / "tokens/train/manifest.json").read_text()
    write_raw(tmp_path / "raw/train.parquet", other=["x"])
    with pytest.raises(ElfError):
        tokenize_dataset("owt", LM, SETTINGS, tmp_path / "raw", tokenizer_dir, tmp_path / "tokens")
    assert (tmp_path / "tokens/train/manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw", "tokens"]


def _project(tmp_path, tokenizer_dir, docs):
    """A working directory laid out like the repository, with a tokenizer and one raw split."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["tokenize"].update(shard_rows=5000, batch_size=500)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    write_raw(tmp_path / "data/raw/owt/train.parquet", text=docs)
    build_tokenizer("pretrained", str(tokenizer_dir), 0, None, tmp_path / "data/tokenizer")


def test_cli_unknown_dataset_and_missing_raw(tmp_path, tokenizer_dir):
    _project(tmp_path, tokenizer_dir, ["A dog."])
    result = run_elf("tokenize", "c4", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "unknown dataset 'c4'" in result.stderr
    result = run_elf("tokenize", "xsum", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "data/raw/xsum/train.parquet: file not found" in result.stderr


def test_killed_stage_reruns_cleanly(tmp_path, tokenizer_dir):
    rng = random.Random(3)
    _project(tmp_path, tokenizer_dir, [sentence(rng, 10) for _ in range(200_000)])
    process = subprocess.Popen([str(BIN / "elf"), "tokenize", "owt"], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list((tmp_path / "data/tokens").glob(".owt.tmp-*/train/part-*")) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "data/tokens/owt").exists()  # nothing half-written in the real output
    run_elf("tokenize", "owt", cwd=tmp_path)
    manifest = verify_shards(tmp_path / "data/tokens/owt/train")
    assert manifest["documents"] == 200_000 and manifest["paragraphs"] == 200_000
    assert manifest["rows"] <= 100_000  # packed across documents: two 11-token sentences a row of 32
    assert [p.name for p in (tmp_path / "data/tokens").iterdir()] == ["owt"]
    assert json.loads((tmp_path / "data/tokens/owt/train/manifest.json").read_text())["tokenizer_hash"]
