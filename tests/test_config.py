"""params.yaml is validated at load: every bad key, type or value is one line naming the key."""

import copy
import shutil

import pytest
import yaml

from elf.config import apply_preset, config_from_dict, load_config
from elf.errors import ElfError
from tests.conftest import REPO, run_elf


@pytest.fixture
def params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_default_params_load(params):
    config = config_from_dict(params)
    assert set(config.datasets) == {"owt", "wmt14", "xsum"}
    assert config.datasets["owt"].source == "demo"
    assert config.datasets["wmt14"].columns == ("source", "target")


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda p: p["datasets"]["owt"].update(max_lenght=5), "datasets.owt.max_lenght: unknown key"),
        (lambda p: p.update(sede=1), "sede: unknown key"),
        (lambda p: p["datasets"]["owt"].update(max_length=-5), "datasets.owt.max_length: Input should be greater"),
        (lambda p: p["datasets"]["owt"].update(max_length="128"), "datasets.owt.max_length: Input should be a valid"),
        (lambda p: p["datasets"]["owt"].update(source="ftp"), "datasets.owt.source: Input should be 'demo'"),
        (lambda p: p["tokenizer"].update(vocab_size=50), "tokenizer: vocab_size must exceed the 3 special"),
        (lambda p: p["datasets"]["owt"]["demo"].update(train_size=0), "datasets.owt.demo.train_size"),
        (lambda p: p["datasets"]["wmt14"].update(max_input_length=64), "datasets.wmt14: max_input_length must be in"),
        (lambda p: p["datasets"]["wmt14"].pop("max_input_length"), "max_input_length is required"),
        (lambda p: p["datasets"]["owt"].update(source="files"), "datasets.owt: source is 'files' but there is no"),
        (lambda p: p["datasets"]["xsum"]["hub"].update(fields={"text": "document"}), "hub.fields must map exactly"),
        (lambda p: p["tokenize"].pop("shard_rows"), "tokenize.shard_rows: required key is missing"),
        (lambda p: p["tokenize"].update(workers=-1), "tokenize.workers"),
        (lambda p: p["tokenizer"].update(algorithm="wordpiece"), "tokenizer.algorithm: Input should be 'bpe'"),
        (lambda p: p["datasets"]["xsum"]["demo"].update(max_sentences=2), "datasets.xsum.demo: max_sentences must"),
        (lambda p: p["datasets"]["owt"]["demo"].update(words_per_class=0), "datasets.owt.demo.words_per_class"),
        (lambda p: p["datasets"].update({"Bad-Name": p["datasets"]["owt"]}), "dataset name 'Bad-Name'"),
    ],
)
def test_bad_params_fail_with_one_line_naming_the_key(params, edit, expected):
    bad = copy.deepcopy(params)
    edit(bad)
    with pytest.raises(ElfError) as error:
        config_from_dict(bad)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("params.yaml: ")
    assert expected in message


def test_unknown_dataset_names_the_known_ones(params):
    with pytest.raises(ElfError, match="unknown dataset 'c4' \\(params.yaml defines: owt, wmt14, xsum\\)"):
        config_from_dict(params).dataset("c4")


def test_cli_reports_bad_params_in_one_line_and_exits_2(tmp_path, params):
    params["datasets"]["owt"]["max_length"] = 0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = run_elf("tokenize", "owt", cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "params.yaml: datasets.owt.max_length" in result.stderr


def test_paper_preset_switches_everything_and_keeps_comments(tmp_path):
    path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", path)
    config = apply_preset("paper", path)
    assert {d.source for d in config.datasets.values()} == {"hub"}
    assert (config.datasets["owt"].max_length, config.datasets["wmt14"].max_length) == (1024, 128)
    assert (config.datasets["wmt14"].max_input_length, config.datasets["xsum"].max_input_length) == (64, 1024)
    assert config.datasets["xsum"].max_length == 1088
    assert config.tokenizer.kind == "pretrained" and config.tokenizer.pretrained == "t5-small"
    assert "# Every setting a stage reads" in path.read_text()
    assert load_config(path) == config
    back = apply_preset("demo", path)
    assert back == load_config(REPO / "params.yaml")


def test_unknown_preset_leaves_params_untouched(tmp_path):
    path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", path)
    before = path.read_text()
    result = run_elf("config", "apply", "papr", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "unknown preset 'papr' (available: demo, paper)" in result.stderr
    assert path.read_text() == before and sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
