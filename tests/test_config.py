"""params.yaml is validated at load: every bad key, type or value is one line naming the key."""

import copy
import shutil

import pytest
import yaml

from elf.config import PRESETS_DIR, apply_preset, config_from_dict, load_config
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


def _unset_keys(one, other, where="") -> list[str]:
    """Keys one preset sets that the other does not. Two non-empty mappings are compared key by key;
    anything else (a value, a list, `{}`) sets the whole path."""
    if not (isinstance(one, dict) and one and isinstance(other, dict) and other):
        return []
    missing = [f"{where}{key}" for key in set(one) ^ set(other)]
    for key in set(one) & set(other):
        missing += _unset_keys(one[key], other[key], f"{where}{key}.")
    return missing


def test_presets_set_the_same_keys():
    demo, paper = (yaml.safe_load((PRESETS_DIR / f"{name}.yaml").read_text()) for name in ("demo", "paper"))
    assert _unset_keys(demo, paper) == []
    assert _unset_keys({"a": {"b": 1, "c": {}}}, {"a": {"b": 2, "c": {"d": 1}, "e": 3}}) == ["a.e"]


def test_apply_paper_then_demo_gives_back_params_byte_for_byte(tmp_path):
    path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", path)
    apply_preset("paper", path)
    assert "# Every setting a stage reads" in path.read_text()
    assert load_config(path).datasets["owt"].source == "hub"
    apply_preset("demo", path)
    assert path.read_bytes() == (REPO / "params.yaml").read_bytes()


# The paper's values, written from elf-method.md (§2 representation, §5 ELF-B, §7 samplers, §8 recipe, §9
# evaluation) — deliberately not read from the preset file, so a wrong preset fails here.
PAPER_LENGTHS = {"owt": (1024, None), "wmt14": (128, 64), "xsum": (1088, 1024)}
PAPER_STEPS = {"owt": (95_000, 9_500), "wmt14": (880_700, 5_000), "xsum": (39_900, 5_000)}  # 5 / 100 / 100 epochs
PAPER_DECODE_NOISE = {"owt": 5.0, "wmt14": 1.0, "xsum": 1.0}
PAPER_SAMPLERS = {
    "owt": {("sde", 32, 1.5, 3.0, 1.0), ("sde", 8, 2.0, 3.0, 1.0), ("sde", 16, 2.0, 3.0, 1.0),
            ("sde", 64, 1.0, 3.0, 1.0), ("ode", 64, None, 3.0, 1.0)},
    "wmt14": {("ode", 64, None, 1.0, 2.0)},
    "xsum": {("ode", 64, None, 1.0, 2.0)},
}


def test_paper_preset_resolves_to_the_paper_configuration(tmp_path):
    import torch

    from elf.model import build_model, num_parameters

    path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", path)
    config = apply_preset("paper", path)
    assert config == load_config(path)
    assert (config.tokenizer.kind, config.tokenizer.pretrained) == ("pretrained", "t5-small")
    assert (config.encoder.kind, config.encoder.pretrained) == ("pretrained", "t5-small")
    assert config.tokenize.packing == "paragraphs"
    assert config.embed.cache["owt"] is False  # OWT does not fit in an embedding cache: encoded online
    assert (config.evaluate.judge, config.evaluate.judge_dtype) == ("gpt2-large", "float32")
    assert (config.sample.num_samples, len(config.sample.seeds)) == (1000, 6)
    for name, dataset in config.datasets.items():
        assert dataset.source == "hub"
        assert (dataset.max_length, dataset.max_input_length) == PAPER_LENGTHS[name]
        train = config.train.for_dataset(name)
        assert (train.preset, train.model.overrides()) == ("ELF-B", {})
        assert (train.optimizer, train.batch_size, train.learning_rate) == ("muon", 512, 0.002)
        assert (train.steps, train.warmup_steps) == PAPER_STEPS[name]
        assert (train.ema_decay, train.grad_clip, train.micro_batch_size) == (0.9999, 1.0, None)
        objective = train.objective
        assert objective.decode_noise_scale == PAPER_DECODE_NOISE[name]
        assert (objective.time_mean, objective.time_std, objective.noise_scale, objective.min_denom) == (
            -1.5, 0.8, 2.0, 0.05)
        assert (objective.decode_prob, objective.decode_keep_mean, objective.decode_keep_std) == (0.2, 0.8, 0.8)
        assert (objective.self_cond_prob, objective.guidance_low, objective.guidance_high) == (0.5, 1.5, 6.0)
        assert objective.condition_dropout == 0.1
        samplers = {(s.kind, s.steps, s.gamma if s.kind == "sde" else None, s.guidance, s.cfg_scale)
                    for s in config.sample.sampler_configs(name).values()}
        assert samplers == PAPER_SAMPLERS[name]
        for sampler in config.sample.sampler_configs(name).values():
            # noise scale and x̂ → v floor: the model's own (the objective's 2 and 0.05 above)
            assert (sampler.grid, sampler.noise_scale, sampler.min_denom) == ("logit_normal", None, None)
        with torch.device("meta"):  # shapes only: no 400 MB allocation
            model = build_model(train.preset, 512, 32_100, **train.model.overrides())
        assert (model.cfg.depth, model.cfg.hidden, model.cfg.heads, model.cfg.bottleneck) == (12, 768, 12, 128)
        assert round(num_parameters(model) / 1e6, 1) == 104.6


def test_an_empty_mapping_means_empty_not_unchanged(params):
    params["train"]["datasets"]["owt"]["model"] = {}
    config = config_from_dict(params)
    assert config.train.for_dataset("owt").model.overrides() == {}
    assert config.train.for_dataset("wmt14").model.overrides() == {"depth": 2, "hidden": 128, "heads": 4,
                                                                   "bottleneck": 64}


@pytest.mark.parametrize("model, expected", [
    ({"hiden": 128}, "train.defaults.model.hiden: unknown key"),
    ({"hidden": 130, "heads": 4}, "hidden=130 is not divisible by heads=4"),
    ({"hidden": 120, "heads": 8}, "head dim 15 (hidden / heads) must be even"),
    ({"depth": 0}, "model.depth: Input should be greater than 0"),
    ({"depth": 2.5}, "model.depth: Input should be a valid integer"),
])
def test_model_shape_is_checked_at_load(tmp_path, params, model, expected):
    params["train"]["defaults"]["model"] = model
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = run_elf("config", "check", cwd=tmp_path, check=False)
    assert result.returncode == 2, result.stdout
    assert result.stderr.strip().count("\n") == 0
    assert expected in result.stderr


def test_unknown_preset_leaves_params_untouched(tmp_path):
    path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", path)
    before = path.read_text()
    result = run_elf("config", "apply", "papr", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "unknown preset 'papr' (available: demo, paper)" in result.stderr
    assert path.read_text() == before and sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_threads_setting_reaches_torch(tmp_path, params):
    """`threads` sets torch's CPU threads in every stage; null reads OMP_NUM_THREADS (1 in the tests)."""
    import subprocess
    import sys

    script = ("import sys, torch\nfrom elf.cli import main\n"
              "import elf.cli\nelf.cli._prepare = lambda args, config: print('threads', torch.get_num_threads())\n"
              "sys.exit(main(['prepare', 'owt']))\n")
    for value, expected in ((None, 1), (2, 2)):
        params["threads"] = value
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert f"threads {expected}" in out.stdout
    params["threads"] = 0
    with pytest.raises(ElfError, match="threads: Input should be greater than 0"):
        config_from_dict(params)


def test_params_are_read_as_yaml_1_2_like_dvc_writes_them(tmp_path):
    """`dvc exp run -S train.defaults.lr=1e-5` writes `1e-05`, a float in YAML 1.2 and a string in PyYAML's 1.1."""
    text = (REPO / "params.yaml").read_text().replace("    lr: 0.002 ", "    lr: 1e-05 ", 1)
    assert "lr: 1e-05" in text
    (tmp_path / "params.yaml").write_text(text)
    assert load_config(tmp_path / "params.yaml").train.for_dataset("owt").learning_rate == 1e-5


def test_the_flows_override_writer_round_trips_floats_it_writes(tmp_path):
    from flows.stages import apply_overrides

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    assert apply_overrides(tmp_path, {"train.defaults.lr": 1e-5, "train.defaults.ema_decay": 0.995}) == [
        "train.defaults.lr=1e-05", "train.defaults.ema_decay=0.995"]
    settings = load_config(tmp_path / "params.yaml").train.for_dataset("owt")
    assert (settings.learning_rate, settings.ema_decay) == (1e-5, 0.995)
    assert "# Every setting a stage reads" in (tmp_path / "params.yaml").read_text()


def test_a_duplicate_key_is_an_error_naming_its_line(tmp_path):
    (tmp_path / "params.yaml").write_text("seed: 1\nthreads: null\nseed: 2\n")
    with pytest.raises(ElfError) as error:
        load_config(tmp_path / "params.yaml")
    message = str(error.value)
    assert "\n" not in message and "params.yaml: invalid YAML at line 3" in message and "duplicate key" in message


def test_errors_name_the_key_and_value_never_the_whole_section(params):
    params["train"]["defaults"]["model"] = {"hidden": 130, "heads": 4}
    params["train"]["defaults"]["notes"] = "x" * 500
    with pytest.raises(ElfError) as error:
        config_from_dict(params)
    assert "notes: unknown key" in str(error.value) and len(str(error.value)) < 200
    del params["train"]["defaults"]["notes"]
    with pytest.raises(ElfError) as error:
        config_from_dict(params)
    message = str(error.value)
    assert "hidden=130 is not divisible by heads=4" in message and "{" not in message and len(message) < 200
