"""Bad input, bad settings and a hostile machine: one line naming the key, file or path, the exit code that
tells the flows whether a retry can help (elf/errors.py), and no partial output (reliability sweep).

One small project (owt only, every stage run once) is built per session; each case copies it, breaks one
thing, runs one `elf` command in this process and checks the result. The OS-error cases use what these
machines allow a root user: a small tmpfs (ENOSPC), a read-only bind mount (EROFS) and a file-size limit
(EFBIG); a case is skipped, with the reason, only where the mount is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import resource
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from elf.cli import main
from elf.config import config_from_dict
from elf.errors import EXIT_BAD_INPUT, EXIT_NEEDS_FIX, ElfError
from elf.model import build_model
from elf.sample import SamplerConfig, generate
from tests.conftest import REPO, inside, mlflow_store_in


@pytest.fixture
def project(built, tmp_path) -> Path:
    copy = tmp_path / "project"
    shutil.copytree(built, copy)
    with inside(copy), mlflow_store_in(copy):
        yield copy


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` with its content hash (mount points hide what is beneath them)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# -- a hostile machine --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def mounted(directory: Path, *mount_args: str):
    directory.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", *mount_args, str(directory)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"mount {' '.join(mount_args)} refused here: {result.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=True)


@contextlib.contextmanager
def full_disk(directory: Path):
    """`directory` on a tmpfs that holds its files and is otherwise full: any new write fails with ENOSPC."""
    kept = directory.parent / f"{directory.name}.kept"
    shutil.copytree(directory, kept) if directory.is_dir() else kept.mkdir()
    size = sum(p.stat().st_size for p in kept.rglob("*") if p.is_file()) + 2**20
    with mounted(directory, "-t", "tmpfs", "-o", f"size={size}", "tmpfs"):
        shutil.copytree(kept, directory, dirs_exist_ok=True)
        with open(directory / "filler", "wb", buffering=0) as handle, contextlib.suppress(OSError):
            while True:
                handle.write(b"\0" * 4096)
                handle.flush()
        yield
    shutil.rmtree(kept)


def read_only(directory: Path):
    """`directory` bound onto itself read-only: writes fail with EROFS."""
    directory.mkdir(parents=True, exist_ok=True)
    return mounted(directory, "--bind", "-o", "ro", str(directory))


@contextlib.contextmanager
def file_size_limit(limit_bytes: int):
    """`ulimit -f` for this process: a write past it fails with EFBIG (the CLI ignores SIGXFSZ)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


# -- the table ----------------------------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    args: list[str]
    expected: str  # part of the one error line
    code: int = EXIT_BAD_INPUT
    setup: Callable[[Path], None] = lambda project: None
    around: Callable[[Path], contextlib.AbstractContextManager] = lambda project: contextlib.nullcontext()


def edit_params(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def setup(project: Path) -> None:
        params = yaml.safe_load((project / "params.yaml").read_text())
        change(params)
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return setup


def write(relative: str, content: bytes | str) -> Callable[[Path], None]:
    def setup(project: Path) -> None:
        path = project / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return setup


def remove(relative: str) -> Callable[[Path], None]:
    def setup(project: Path) -> None:
        path = project / relative
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return setup


def both(*setups: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(project: Path) -> None:
        for step in setups:
            step(project)
    return setup


def files_source(path: str) -> Callable[[dict], None]:
    def change(params: dict) -> None:
        params["datasets"]["owt"].update(source="files", files={"splits": {"train": path}, "fields": {"text": "t"}})
    return change


def truncate(relative: str) -> Callable[[Path], None]:
    def setup(project: Path) -> None:
        path = project / relative
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return setup


def flip_last_byte(relative: str) -> Callable[[Path], None]:
    def setup(project: Path) -> None:
        data = bytearray((project / relative).read_bytes())
        data[-1] ^= 0xFF
        (project / relative).write_bytes(bytes(data))
    return setup


def edit_json(relative: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def setup(project: Path) -> None:
        path = project / relative
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))
    return setup


def sampler(**changes) -> Callable[[dict], None]:
    return lambda p: p["sample"]["samplers"]["owt"][0].update(changes)


def train_setting(**changes) -> Callable[[dict], None]:
    return lambda p: p["train"]["defaults"].update(changes)


CHECKPOINT = "models/owt/checkpoints/step-000002"

CASES = [
    # params.yaml: every stage validates it at load
    Case("params-guidance-nan", ["sample", "owt"], "samplers.owt[0]: sampler.guidance: must be a finite number",
         setup=edit_params(sampler(guidance=math.nan))),
    Case("params-guidance-negative", ["sample", "owt"], "sampler.guidance: must be > 0",
         setup=edit_params(sampler(guidance=-1.0))),
    Case("params-lr-inf", ["train", "owt"], "train.defaults.lr: Input should be a finite number",
         setup=edit_params(train_setting(lr=math.inf))),
    Case("params-unknown-key", ["train", "owt"], "train.defaults.lrr: unknown key",
         setup=edit_params(train_setting(lrr=0.1))),
    Case("params-heads-do-not-divide-hidden", ["train", "owt"], "model: hidden=30 is not divisible by heads=4",
         setup=edit_params(train_setting(model={"hidden": 30, "heads": 4}))),
    Case("params-duplicate-key", ["train", "owt"], "duplicate key",
         setup=lambda project: (project / "params.yaml").write_text(
             (project / "params.yaml").read_text() + "seed: 7\n")),
    Case("params-not-yaml", ["prepare", "owt"], "params.yaml", setup=write("params.yaml", "seed: [1,\n")),
    # input files
    Case("input-file-missing", ["prepare", "owt"], "data/input/owt/train.jsonl: file not found",
         setup=edit_params(files_source("data/input/owt/train.jsonl"))),
    Case("input-file-outside-data-input", ["prepare", "owt"],
         "datasets.owt.files.splits.train: corpus/train.jsonl is not under data/input/owt/",
         setup=both(edit_params(files_source("corpus/train.jsonl")), write("corpus/train.jsonl", '{"t": "a b"}\n'))),
    Case("input-file-bad-json", ["prepare", "owt"], "data/input/owt/train.jsonl:2: invalid JSON",
         setup=both(edit_params(files_source("data/input/owt/train.jsonl")),
                    write("data/input/owt/train.jsonl", '{"t": "a b"}\n{"t": \n'))),
    Case("input-train-split-all-blank", ["prepare", "owt"], "the train split of owt has no row with text",
         setup=both(edit_params(files_source("data/input/owt/train.jsonl")),
                    write("data/input/owt/train.jsonl", '{"t": " "}\n{"t": ""}\n'))),
    Case("input-raw-parquet-corrupt", ["tokenize", "owt"], "data/raw/owt/train.parquet: not a readable Parquet",
         setup=truncate("data/raw/owt/train.parquet")),
    Case("input-tokenizer-corrupt", ["tokenize", "owt"], "data/tokenizer: not a loadable tokenizer directory",
         setup=write("data/tokenizer/tokenizer.json", "{not json")),
    Case("input-tokens-old-format", ["embed", "owt"], "is not 'elf-tokens/2'",
         setup=edit_json("data/tokens/owt/train/manifest.json", lambda m: m.update(format="elf-tokens/1"))),
    Case("input-token-shard-missing", ["embed", "owt"], "shard listed in the manifest is missing",
         setup=remove("data/tokens/owt/train/part-00000.parquet")),
    # A tokenizer directory that asks to run its own code: refused (trust_remote_code=False), nothing runs.
    Case("input-tokenizer-wants-remote-code", ["tokenize", "owt"], "data/tokenizer: not a loadable tokenizer",
         setup=both(edit_json("data/tokenizer/tokenizer_config.json", lambda c: c.update(
             tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]})),
             write("data/tokenizer/evil.py", "import pathlib\npathlib.Path('REMOTE_CODE_RAN').touch()\n"))),
    Case("input-encoder-record-missing", ["embed", "owt"], "data/encoder/encoder.json",
         setup=remove("data/encoder/encoder.json")),
    # model and checkpoint directories
    Case("model-dir-missing", ["sample", "owt"], "models/owt/model: model directory not found",
         setup=remove("models/owt/model")),
    Case("model-config-not-json", ["sample", "owt"], "models/owt/model/config.json: not a valid ELF model config",
         setup=write("models/owt/model/config.json", "{")),
    Case("model-config-bad-shape", ["sample", "owt"], "models/owt/model/config.json: not a valid ELF model config",
         setup=edit_json("models/owt/model/config.json", lambda c: c["model"].update(heads=3))),
    Case("model-weights-truncated", ["sample", "owt"], "config.json: asks for 0.4 MiB of weights but",
         setup=truncate("models/owt/model/model.safetensors")),
    Case("model-weights-bit-flipped", ["sample", "owt"], "model.safetensors: sha256 does not match",
         setup=flip_last_byte("models/owt/model/model.safetensors")),
    Case("model-config-asks-for-160-gb", ["sample", "owt"], "asks for",
         setup=edit_json("models/owt/model/config.json", lambda c: c["model"].update(hidden=200_000, heads=2))),
    Case("model-weights-of-another-shape", ["sample", "owt"], "model.safetensors: cannot load weights",
         setup=edit_json("models/owt/model/config.json", lambda c: c["model"].update(bottleneck=8))),
    Case("model-without-its-encoder", ["sample", "owt"], "models/owt/model: no tokenizer/ or encoder/",
         setup=remove("models/owt/model/encoder")),
    Case("model-of-another-dataset", ["sample", "owt"], "trained on dataset 'xsum', not 'owt'",
         setup=edit_json("models/owt/model/config.json", lambda c: c.update(dataset="xsum"))),
    Case("checkpoint-file-corrupt", ["train", "owt"], "corrupt checkpoint file",
         setup=both(edit_params(train_setting(steps=4)), truncate(f"{CHECKPOINT}/ema.safetensors"))),
    Case("checkpoint-index-not-json", ["train", "owt"], "checkpoint index is not valid JSON",
         setup=both(edit_params(train_setting(steps=4)), write(f"{CHECKPOINT}/checkpoint.json", "{"))),
    # command-line flags
    Case("flag-stop-after-negative", ["train", "owt", "--stop-after", "-1"],
         "--stop-after: must be a whole number >= 1 (got '-1')"),
    Case("flag-stop-after-zero", ["train", "owt", "--stop-after", "0"], "must be a whole number >= 1 (got '0')"),
    Case("flag-unknown-dataset", ["train", "nope"], "unknown dataset 'nope' (params.yaml defines: owt)"),
    Case("flag-sampler-kind", ["sample", "--model", "models/owt/model", "--kind", "euler"],
         "argument --kind: invalid choice: 'euler'"),
    Case("flag-sampler-steps-zero", ["sample", "--model", "models/owt/model", "--steps", "0"],
         "--steps: must be a whole number >= 1"),
    Case("flag-guidance-inf", ["sample", "--model", "models/owt/model", "--guidance", "inf"],
         "sampler.guidance: must be a finite number"),
    Case("flag-source-for-lm", ["sample", "--model", "models/owt/model", "--source", "hallo"],
         "the owt model is unconditional: a source does not apply"),
    Case("flag-model-dir-missing", ["sample", "--model", "nowhere"], "nowhere: model directory not found"),
    Case("flag-params-missing", ["--params", "other.yaml", "train", "owt"], "other.yaml"),
    Case("flag-unknown-preset", ["config", "apply", "tiny"], "unknown preset 'tiny'"),
    # the machine refuses the work
    Case("os-enospc-tokenize", ["tokenize", "owt"], "data/tokens/owt: No space left on device (free some space",
         EXIT_NEEDS_FIX, around=lambda p: full_disk(p / "data/tokens")),
    Case("os-enospc-tokenizer", ["tokenizer"], "data/tokenizer: No space left on device", EXIT_NEEDS_FIX,
         around=lambda p: full_disk(p / "data")),
    Case("os-enospc-train-checkpoint", ["train", "owt"], "models/owt/checkpoints/step-000002: No space left",
         EXIT_NEEDS_FIX, setup=remove("models/owt"), around=lambda p: full_disk(p / "models/owt")),
    Case("os-enospc-samples", ["sample", "owt"], "samples/owt.jsonl: No space left on device", EXIT_NEEDS_FIX,
         around=lambda p: full_disk(p / "samples")),
    Case("os-erofs-prepare", ["prepare", "owt"], "data/raw/owt: Read-only file system", EXIT_NEEDS_FIX,
         around=lambda p: read_only(p / "data/raw")),
    Case("os-erofs-evaluate", ["evaluate", "owt"], "metrics/owt/eval.json: Read-only file system", EXIT_NEEDS_FIX,
         around=lambda p: read_only(p / "metrics/owt")),
    Case("os-efbig-embed", ["embed", "owt"], "data/embeddings/owt/train/part-00000.parquet: File too large",
         EXIT_NEEDS_FIX, setup=remove("data/embeddings/owt"), around=lambda p: file_size_limit(8_000)),
    # A limit above the MLflow store's size, below a checkpoint of this wider model's.
    Case("os-efbig-train", ["train", "owt"], "models/owt/checkpoints/step-000002: File too large", EXIT_NEEDS_FIX,
         setup=both(remove("models/owt"), edit_params(train_setting(model={"depth": 1, "hidden": 96, "heads": 2}))),
         around=lambda p: file_size_limit((p / "mlruns.db").stat().st_size + 2**20)),
    Case("os-file-where-directory-is-made", ["sample", "owt"], "samples", EXIT_NEEDS_FIX,
         setup=both(remove("samples"), write("samples", "a file"))),
    Case("os-directory-where-file-is-written", ["evaluate", "owt"], "metrics/owt/eval.json: Is a directory",
         EXIT_NEEDS_FIX, setup=both(remove("metrics/owt/eval.json"), write("metrics/owt/eval.json/x", ""))),
]


def leftovers(root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in root.rglob("*") if ".tmp" in p.name or ".old-" in p.name]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_bad_input_is_one_line_with_the_right_exit_code_and_no_partial_output(project, case, capsys):
    case.setup(project)
    with case.around(project):
        before = snapshot(project)
        try:
            code = main(case.args)
        except SystemExit as exit:  # argparse
            code = exit.code
        captured = capsys.readouterr()
        after = snapshot(project)
        left = leftovers(project)
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert code == case.code, captured.err[-2000:]
    assert len(errors) == 1 and case.expected in errors[0] and len(errors[0]) < 400, captured.err[-2000:]
    assert "Traceback" not in captured.err
    assert not left, left
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    # What a failed stage may add: MLflow's record of the failed run, the training lock's owner note.
    assert [k for k in changed if not k.startswith(("mlruns", "models/.owt.train."))] == [], changed


def test_the_table_covers_every_kind_of_input():
    """The reliability sweep's bar: at least 40 cases, at least 5 of each kind."""
    kinds = [case.id.split("-")[0] for case in CASES]
    assert len(CASES) >= 40 and all(kinds.count(k) >= 5 for k in ("params", "input", "model", "flag", "os")), kinds


def test_a_blank_batch_in_the_middle_of_the_data_is_skipped_not_a_crash(project, capsys):
    """A tokenize batch whose rows are all blank used to reach the tokenizer as an empty list (IndexError)."""
    texts = ["", " ", "", " ", "the cat sat", "the cat sat", "the cat sat"]  # batches of 2: the first two blank
    edit_params(lambda p: (files_source("data/input/owt/train.jsonl")(p), p["tokenize"].update(batch_size=2)))(project)
    write("data/input/owt/train.jsonl", "".join(json.dumps({"t": text}) + "\n" for text in texts))(project)
    assert main(["prepare", "owt"]) == 0
    assert main(["tokenize", "owt"]) == 0, capsys.readouterr().err
    manifest = json.loads((project / "data/tokens/owt/train/manifest.json").read_text())
    assert manifest["skipped_empty"] == 4 and manifest["rows"] >= 1


# -- settings checked where the library is used directly --------------------------------------------------------


@pytest.fixture
def params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


MORE_PARAMS_CASES = [
    (lambda p: p["sample"]["samplers"]["owt"][0].update(guidance=math.inf), "sampler.guidance: must be a finite"),
    (lambda p: p["sample"]["samplers"]["owt"][0].update(gamma=math.inf), "sampler.gamma: must be a finite number"),
    (lambda p: p["sample"]["samplers"]["owt"][0].update(cfg_scale=math.inf), "sampler.cfg_scale: must be a finite"),
    (lambda p: p["sample"]["samplers"]["owt"][0].update(gamma="1.5"), "sampler.gamma: must be a finite number"),
    (lambda p: p["train"]["defaults"].update(lr=math.nan), "train.defaults.lr: Input should be a finite number"),
    (lambda p: p["train"]["defaults"]["objective"].update(noise_scale=math.inf),
     "objective.noise_scale: Input should be a finite number"),
    (lambda p: p["train"]["defaults"]["objective"].update(time_mean=math.nan),
     "objective.time_mean: Input should be a finite number"),
    (lambda p: p["train"]["defaults"].update(nproc_per_node=0), "nproc_per_node must be >= 1 or 'auto'"),
    (lambda p: p["train"]["defaults"].update(compile="yes"), "train.defaults.compile"),
    (lambda p: p.update(threads=0), "threads: Input should be greater than 0"),
]


@pytest.mark.parametrize("edit, expected", MORE_PARAMS_CASES)
def test_bad_settings_are_one_line_errors_at_load(params, edit, expected):
    edit(params)
    with pytest.raises(ElfError) as error:
        config_from_dict(params)
    message = str(error.value)
    assert "\n" not in message and expected in message and len(message) < 300


def test_a_model_that_produces_non_finite_embeddings_is_an_error_not_silent_pad():
    torch.manual_seed(0)
    model = build_model("tiny", 8, 20, depth=1, hidden=16, heads=2, bottleneck=4).eval()
    with torch.no_grad():
        model.x_head.linear.bias.fill_(math.nan)  # as a diverged run's weights would be
    with pytest.raises(ElfError, match="non-finite embeddings"):
        generate(model, 8, 6, batch=2, cfg=SamplerConfig(kind="ode", steps=2), seed=0, device="cpu",
                 num_samples=2, progress=False)


@pytest.mark.parametrize("stage", ["prepare", "tokenizer", "tokenize", "encoder", "embed", "train", "sample",
                                   "evaluate", "lock", "config"])
def test_every_stage_help_says_what_it_reads_and_writes(stage, capsys):
    from elf.cli import STAGE_HELP

    with pytest.raises(SystemExit) as done:
        main([stage, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert done.value.code == 0 and " ".join(STAGE_HELP[stage][1].split()) in out
    if stage in ("prepare", "tokenize", "embed", "train", "evaluate"):
        assert "a dataset named in params.yaml" in out
