"""Tests for elf.data.sources: Hub readers against local stand-ins in the real schemas, file readers, writer.

The Hub is never contacted: every Hub-path test reads a local directory laid out like the real repository
(Parquet shards plus a README whose YAML front matter declares the configs, or the viewer's
``refs/convert/parquet`` layout for XSum).
"""

import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from elf.config import load_config
from elf.data.sources import hub_num_rows, iter_file_rows, iter_hub_rows, write_rows_parquet
from elf.errors import ElfError
from tests.conftest import REPO

HUB_DEFAULTS = {name: d.hub for name, d in load_config(REPO / "params.yaml").datasets.items()}
WMT_FIELDS = HUB_DEFAULTS["wmt14"].fields
XSUM_FIELDS = HUB_DEFAULTS["xsum"].fields
OWT_FIELDS = HUB_DEFAULTS["owt"].fields
OWT_ROWS = 25


# ---------------------------------------------------------------------------------------------------------
# Local stand-ins for the Hub repositories
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def offline_datasets(tmp_path_factory):
    """Keep `datasets` offline and its Arrow cache inside the test's temporary directory."""
    import datasets
    import huggingface_hub.constants

    datasets.disable_progress_bars()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf-cache"))
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


def _write(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def _pairs(prefix: str, n: int) -> pa.Table:
    translation = pa.array(
        [{"de": f"{prefix} de {i}", "en": f"{prefix} en {i}"} for i in range(n)],
        type=pa.struct([("de", pa.string()), ("en", pa.string())]),
    )
    return pa.table({"translation": translation})


WMT_README = """---
dataset_info:
- config_name: cs-en
  features:
  - name: translation
    dtype:
      translation:
        languages:
        - cs
        - en
- config_name: de-en
  features:
  - name: translation
    dtype:
      translation:
        languages:
        - de
        - en
configs:
- config_name: cs-en
  data_files:
  - split: train
    path: cs-en/train-*
- config_name: de-en
  data_files:
  - split: train
    path: de-en/train-*
  - split: validation
    path: de-en/validation-*
  - split: test
    path: de-en/test-*
---

# WMT14 (local stand-in)
"""


@pytest.fixture(scope="module")
def wmt_repo(tmp_path_factory) -> Path:
    """Like ``wmt/wmt14`` on main: one folder per language pair, sharded train, README configs."""
    root = tmp_path_factory.mktemp("wmt14")
    (root / "README.md").write_text(WMT_README, encoding="utf-8")
    train = _pairs("train", 10)
    _write(train.slice(0, 6), root / "de-en" / "train-00000-of-00002.parquet")
    _write(train.slice(6), root / "de-en" / "train-00001-of-00002.parquet")
    _write(_pairs("validation", 3), root / "de-en" / "validation-00000-of-00001.parquet")
    _write(_pairs("test", 4), root / "de-en" / "test-00000-of-00001.parquet")
    cs = pa.array([{"cs": "ahoj", "en": "hello"}], type=pa.struct([("cs", pa.string()), ("en", pa.string())]))
    _write(pa.table({"translation": cs}), root / "cs-en" / "train-00000-of-00001.parquet")
    return root


@pytest.fixture(scope="module")
def xsum_repo(tmp_path_factory) -> Path:
    """Like ``EdinburghNLP/xsum`` at ``refs/convert/parquet``: ``default/<split>/0000.parquet``, no card."""
    root = tmp_path_factory.mktemp("xsum")
    for split, n in {"train": 5, "validation": 2, "test": 3}.items():
        table = pa.table(
            {
                "document": [f"{split} document {i}" for i in range(n)],
                "summary": [f"{split} summary {i}" for i in range(n)],
                "id": [str(30_000_000 + i) for i in range(n)],
            }
        )
        _write(table, root / "default" / split / "0000.parquet")
    return root


OWT_README = """---
license: cc0-1.0
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
---
"""


@pytest.fixture(scope="module")
def owt_repo(tmp_path_factory) -> Path:
    """Like OpenWebText's Parquet conversion: ``data/train-*-of-*.parquet`` shards, one ``train`` split."""
    root = tmp_path_factory.mktemp("owt")
    (root / "README.md").write_text(OWT_README, encoding="utf-8")
    docs = [f"document {i}\n\nbody of {i}" for i in range(OWT_ROWS)]
    for shard, (lo, hi) in enumerate([(0, 10), (10, 20), (20, OWT_ROWS)]):
        _write(pa.table({"text": docs[lo:hi]}), root / "data" / f"train-{shard:05d}-of-00003.parquet")
    return root


@pytest.fixture(scope="module")
def bad_repo(tmp_path_factory) -> Path:
    """A text column with a null at row 2, and an integer column."""
    root = tmp_path_factory.mktemp("bad")
    table = pa.table({"text": ["a", "b", None, "d"], "n": pa.array([1, 2, 3, 4], type=pa.int64())})
    _write(table, root / "data" / "train-00000-of-00001.parquet")
    return root


# ---------------------------------------------------------------------------------------------------------
# Hub path
# ---------------------------------------------------------------------------------------------------------


def test_params_hub_defaults_map_our_columns():
    assert set(HUB_DEFAULTS["wmt14"].fields) == {"source", "target"}
    assert set(HUB_DEFAULTS["xsum"].fields) == {"source", "target"}
    assert set(HUB_DEFAULTS["owt"].fields) == {"text"}
    assert HUB_DEFAULTS["owt"].validation_holdout > 0


def test_wmt14_maps_translation_struct(wmt_repo):
    rows = list(iter_hub_rows(str(wmt_repo), "de-en", None, "train", WMT_FIELDS))
    assert len(rows) == 10
    assert rows[0] == {"source": "train de 0", "target": "train en 0"}
    assert rows[9] == {"source": "train de 9", "target": "train en 9"}
    test = list(iter_hub_rows(str(wmt_repo), "de-en", None, "test", WMT_FIELDS))
    assert [r["source"] for r in test] == [f"test de {i}" for i in range(4)]
    assert hub_num_rows(str(wmt_repo), "de-en", None, "validation") == 3


def test_wmt14_skip_limit_across_shards(wmt_repo):
    rows = list(iter_hub_rows(str(wmt_repo), "de-en", None, "train", WMT_FIELDS, limit=4, skip=4))
    assert [r["target"] for r in rows] == [f"train en {i}" for i in range(4, 8)]


def test_xsum_parquet_export_layout(xsum_repo):
    rows = list(iter_hub_rows(str(xsum_repo), "default", None, "validation", XSUM_FIELDS))
    assert rows == [
        {"source": "validation document 0", "target": "validation summary 0"},
        {"source": "validation document 1", "target": "validation summary 1"},
    ]
    assert hub_num_rows(str(xsum_repo), "default", None, "train") == 5


def test_owt_held_out_tail(owt_repo):
    n = hub_num_rows(str(owt_repo), None, None, "train")
    assert n == OWT_ROWS
    held_out = 4
    train = list(iter_hub_rows(str(owt_repo), None, None, "train", OWT_FIELDS, limit=n - held_out))
    val = list(iter_hub_rows(str(owt_repo), None, None, "train", OWT_FIELDS, skip=n - held_out))
    assert len(train) == n - held_out and len(val) == held_out
    assert val[0]["text"] == f"document {n - held_out}\n\nbody of {n - held_out}"
    assert {r["text"] for r in train}.isdisjoint(r["text"] for r in val)
    # limit past the end is clipped, skip == end gives nothing
    assert len(list(iter_hub_rows(str(owt_repo), None, None, "train", OWT_FIELDS, limit=99, skip=20))) == 5
    assert list(iter_hub_rows(str(owt_repo), None, None, "train", OWT_FIELDS, skip=n)) == []


def test_owt_selects_by_index_not_by_iteration(owt_repo, monkeypatch):
    import datasets

    calls = []
    original = datasets.Dataset.select

    def spy(self, indices, *args, **kwargs):
        calls.append(indices)
        return original(self, indices, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "select", spy)
    rows = list(iter_hub_rows(str(owt_repo), None, None, "train", OWT_FIELDS, limit=3, skip=21))
    assert len(rows) == 3
    assert calls == [range(21, 24)]


def test_owt_streaming_matches_in_memory(owt_repo):
    kwargs = {"limit": 6, "skip": 8}
    streamed = list(iter_hub_rows(str(owt_repo), None, None, "train", OWT_FIELDS, streaming=True, **kwargs))
    loaded = list(iter_hub_rows(str(owt_repo), None, None, "train", OWT_FIELDS, **kwargs))
    assert streamed == loaded and len(loaded) == 6


def test_hub_missing_nested_field_names_path_and_keys(wmt_repo):
    fields = {"source": "translation.fr", "target": "translation.en"}
    with pytest.raises(
        ElfError, match=r"row 0: missing field 'translation.fr' \(keys at translation: de, en\)"
    ):
        list(iter_hub_rows(str(wmt_repo), "de-en", None, "train", fields))


def test_hub_missing_column_lists_columns(xsum_repo):
    with pytest.raises(ElfError) as err:
        list(
            iter_hub_rows(str(xsum_repo), "default", None, "test", {"source": "article", "target": "summary"})
        )
    message = str(err.value)
    assert "'article'" in message and "document, summary, id" in message and "'test'" in message


def test_hub_non_string_names_row_and_field(bad_repo):
    with pytest.raises(ElfError, match=r"row 2: field 'text' is null, expected a string"):
        list(iter_hub_rows(str(bad_repo), None, None, "train", {"text": "text"}, skip=1))
    with pytest.raises(ElfError, match=r"row 0: field 'n' is int, expected a string"):
        list(iter_hub_rows(str(bad_repo), None, None, "train", {"text": "n"}))


def test_hub_bad_split_config_and_range(wmt_repo, owt_repo):
    with pytest.raises(ElfError, match=r"cannot load dataset .* split 'dev'"):
        list(iter_hub_rows(str(wmt_repo), "de-en", None, "dev", WMT_FIELDS))
    with pytest.raises(ElfError, match=r"config 'fr-en'"):
        list(iter_hub_rows(str(wmt_repo), "fr-en", None, "train", WMT_FIELDS))
    with pytest.raises(ElfError, match=r"skip: 26 is beyond the end .*\(25 rows\)"):
        list(iter_hub_rows(str(owt_repo), None, None, "train", OWT_FIELDS, skip=26))
    with pytest.raises(ElfError, match=r"^skip:"):
        list(iter_hub_rows(str(owt_repo), None, None, "train", OWT_FIELDS, skip=-1))
    with pytest.raises(ElfError, match=r"^limit:"):
        list(iter_hub_rows(str(owt_repo), None, None, "train", OWT_FIELDS, limit=-1))
    with pytest.raises(ElfError, match=r"^fields\.text:"):
        list(iter_hub_rows(str(owt_repo), None, None, "train", {"text": "a..b"}))


def test_hub_unreachable_offline_fails_fast():
    start = time.monotonic()
    with pytest.raises(ElfError) as err:
        list(iter_hub_rows("elf-tests/no-such-dataset", "de-en", "main", "train", WMT_FIELDS))
    assert time.monotonic() - start < 30
    message = str(err.value)
    assert "'elf-tests/no-such-dataset'" in message and "'de-en'" in message and "'main'" in message
    assert "\n" not in message
    with pytest.raises(ElfError, match="elf-tests/no-such-dataset"):
        hub_num_rows("elf-tests/no-such-dataset", None, None, "train")


# ---------------------------------------------------------------------------------------------------------
# Local files
# ---------------------------------------------------------------------------------------------------------


def test_jsonl_happy_path(tmp_path):
    path = tmp_path / "pairs.jsonl"
    lines = [
        json.dumps({"src": {"de": "Hallo"}, "tgt": "Hello", "extra": 1}),
        "",
        json.dumps({"src": {"de": "Welt ä"}, "tgt": "World"}, ensure_ascii=False),
    ]
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\n\n")
    rows = list(iter_file_rows(path, {"source": "src.de", "target": "tgt"}))
    assert rows == [{"source": "Hallo", "target": "Hello"}, {"source": "Welt ä", "target": "World"}]
    json_ext = tmp_path / "docs.json"
    json_ext.write_text('{"text": "a"}\n', encoding="utf-8")
    assert list(iter_file_rows(str(json_ext), {"text": "text"})) == [{"text": "a"}]


def test_txt_happy_path(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes("first line\r\n\nsecond\u2028still second\n   \nlast".encode())
    rows = list(iter_file_rows(path, {"text": "text"}))
    assert rows == [
        {"text": "first line"},
        {"text": "second\u2028still second"},
        {"text": "   "},
        {"text": "last"},
    ]


def test_parquet_happy_path_across_batches(tmp_path):
    path = tmp_path / "pairs.parquet"
    n = 2_500
    translation = pa.array(
        [{"de": f"de {i}", "en": f"en {i}"} for i in range(n)],
        type=pa.struct([("de", pa.string()), ("en", pa.string())]),
    )
    pq.write_table(pa.table({"translation": translation, "id": list(range(n))}), path, row_group_size=700)
    rows = list(iter_file_rows(path, WMT_FIELDS))
    assert len(rows) == n
    assert rows[1_234] == {"source": "de 1234", "target": "en 1234"}


def test_format_override_and_unknown_extension(tmp_path):
    path = tmp_path / "data.records"
    path.write_text('{"text": "x"}\n', encoding="utf-8")
    with pytest.raises(ElfError, match=r"data\.records: cannot tell the format .*'\.records'"):
        list(iter_file_rows(path, {"text": "text"}))
    assert list(iter_file_rows(path, {"text": "text"}, fmt="jsonl")) == [{"text": "x"}]
    with pytest.raises(ElfError, match=r"data\.records: unknown format 'csv'"):
        list(iter_file_rows(path, {"text": "text"}, fmt="csv"))


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ElfError, match=r"nope\.jsonl: file not found"):
        list(iter_file_rows(tmp_path / "nope.jsonl", {"text": "text"}))
    folder = tmp_path / "folder.parquet"
    folder.mkdir()
    with pytest.raises(ElfError, match=r"folder\.parquet: not a regular file"):
        list(iter_file_rows(folder, {"text": "text"}))


@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_invalid_utf8_names_file_and_line(tmp_path, suffix):
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ElfError, match=rf"bad\{suffix}:2: invalid UTF-8 \(byte 0xe9 at column 14\)"):
        list(iter_file_rows(path, {"text": "text"}))


def test_invalid_json_and_non_object(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(ElfError, match=r"bad\.jsonl:3: invalid JSON \(Expecting value at column 10\)"):
        list(iter_file_rows(path, {"text": "text"}))
    path.write_text('{"text": "a"}\n["text"]\n', encoding="utf-8")
    with pytest.raises(ElfError, match=r"bad\.jsonl:2: expected a JSON object, got list"):
        list(iter_file_rows(path, {"text": "text"}))


def test_jsonl_missing_and_non_string_fields(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"src": {"de": "a"}, "tgt": "b"}\n{"src": {"fr": "c"}, "tgt": "d"}\n', encoding="utf-8")
    fields = {"source": "src.de", "target": "tgt"}
    with pytest.raises(ElfError, match=r"pairs\.jsonl:2: missing field 'src\.de' \(keys at src: fr\)"):
        list(iter_file_rows(path, fields))
    path.write_text('{"src": "flat", "tgt": "b"}\n', encoding="utf-8")
    with pytest.raises(
        ElfError, match=r"pairs\.jsonl:1: missing field 'src\.de' \(src is str, not a mapping\)"
    ):
        list(iter_file_rows(path, fields))
    path.write_text('{"src": {"de": "a"}, "tgt": null}\n', encoding="utf-8")
    with pytest.raises(ElfError, match=r"pairs\.jsonl:1: field 'tgt' is null, expected a string"):
        list(iter_file_rows(path, fields))
    path.write_text('{"src": {"de": 7}, "tgt": "b"}\n', encoding="utf-8")
    with pytest.raises(ElfError, match=r"pairs\.jsonl:1: field 'src\.de' is int, expected a string"):
        list(iter_file_rows(path, fields))


def test_txt_rejects_conditional_columns(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("a\n", encoding="utf-8")
    with pytest.raises(ElfError, match=r"corpus\.txt: a \.txt file holds a single 'text' column"):
        list(iter_file_rows(path, {"source": "a", "target": "b"}))


def test_parquet_missing_column_and_non_string(tmp_path):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"body": ["a", "b"], "n": [1, 2]}), path)
    with pytest.raises(
        ElfError, match=r"docs\.parquet: missing field 'text' for column 'text' \(columns: body, n\)"
    ):
        list(iter_file_rows(path, {"text": "text"}))
    pq.write_table(pa.table({"text": ["a", None]}), path)
    with pytest.raises(ElfError, match=r"docs\.parquet: row 1: field 'text' is null, expected a string"):
        list(iter_file_rows(path, {"text": "text"}))


def test_parquet_truncated_or_garbage(tmp_path):
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(1_000)]}), good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ElfError, match=r"truncated\.parquet: not a readable Parquet file \(.+\)"):
        list(iter_file_rows(truncated, {"text": "text"}))
    corrupt = tmp_path / "corrupt.parquet"  # intact footer, damaged data pages
    pq.write_table(
        pa.table({"text": [f"row {i} " * 20 for i in range(20_000)]}),
        good,
        row_group_size=5_000,
        compression="snappy",
    )
    damaged = bytearray(good.read_bytes())
    damaged[len(damaged) // 3 : len(damaged) // 3 + 2_000] = bytes(2_000)
    corrupt.write_bytes(bytes(damaged))
    with pytest.raises(ElfError, match=r"corrupt\.parquet: not a readable Parquet file"):
        list(iter_file_rows(corrupt, {"text": "text"}))
    garbage = tmp_path / "garbage.parquet"
    garbage.write_text("text\nnot parquet at all\n", encoding="utf-8")
    with pytest.raises(ElfError, match=r"garbage\.parquet: not a readable Parquet file"):
        list(iter_file_rows(garbage, {"text": "text"}))


# ---------------------------------------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------------------------------------


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def test_write_round_trip_keeps_empty_rows(tmp_path):
    out = tmp_path / "raw" / "wmt14" / "train.parquet"
    rows = [
        {"source": s, "target": t} for s, t in [("a", "x"), ("", "y"), ("  ", "z"), ("b", ""), ("c", "w")]
    ]
    assert write_rows_parquet(iter(rows), out, ["source", "target"], batch_rows=2) == 5
    table = pq.read_table(out)
    assert table.schema == pa.schema([("source", pa.string()), ("target", pa.string())])
    assert table.to_pylist() == rows
    assert pq.ParquetFile(out).num_row_groups == 3
    assert list(iter_file_rows(out, {"source": "source", "target": "target"})) == rows
    assert _leftovers(out.parent) == []


def test_write_zero_rows_gives_empty_file_with_schema(tmp_path):
    out = tmp_path / "empty.parquet"
    assert write_rows_parquet([], out, ["text"]) == 0
    table = pq.read_table(out)
    assert table.num_rows == 0 and table.column_names == ["text"]


def test_write_failure_leaves_no_temp_and_keeps_previous_output(tmp_path):
    out = tmp_path / "train.parquet"
    write_rows_parquet([{"text": "old"}], out, ["text"])

    def rows():
        for i in range(25):
            yield {"text": f"row {i}"}
        raise ElfError("source.jsonl:26: invalid JSON")

    with pytest.raises(ElfError, match="invalid JSON"):
        write_rows_parquet(rows(), out, ["text"], batch_rows=10)
    assert _leftovers(tmp_path) == []
    assert pq.read_table(out).to_pylist() == [{"text": "old"}]

    with pytest.raises(KeyError):
        write_rows_parquet([{"text": "a"}, {"body": "b"}], tmp_path / "other.parquet", ["text"])
    assert _leftovers(tmp_path) == [] and not (tmp_path / "other.parquet").exists()
