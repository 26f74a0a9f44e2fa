"""ELF against MDLM and an autoregressive model at equal training compute: `elf compare` (`make compare`).

For each dataset of `compare.datasets` (params.yaml) this
1. prepares and tokenizes the data with the comparison's changes (e.g. owt rows of 128 tokens) into
   `compare/data/<ds>/`, with the pipeline's tokenizer and encoder (`dvc repro encoder` makes them);
2. counts the training FLOPs of one step of each family on that data (torch's FlopCounterMode over the first
   steps of a throwaway run: forward, backward, and ELF's extra no-grad self-conditioning passes) and gives
   every family ELF's budget: ELF trains `steps` steps, MDLM and AR as many of their own as fit in the same FLOPs;
3. trains each family with the train stage's own code (`elf.train.train`: checkpoints, resume, MLflow runs
   `elf-compare_<ds>_<family>`) into `compare/models/<ds>/<family>/`; a killed comparison resumes;
4. samples each model at several step counts (ELF `elf_steps`, MDLM `mdlm_steps` capped at the positions it
   generates, AR one pass per token) and scores the samples alike: lm — oracle perplexity over *all* samples
   (`ppl_floored`: each event the demo grammar forbids costs the same fixed floor, elf/metrics.py), the share
   the grammar can produce, unigram entropy and distinct-2, next to held-out text of the same length; seq2seq —
   BLEU and ROUGE-L against the references. Figures are mean ± SE over `seeds`.

Writes `compare/results.json`, `compare/table.md` and `compare/compare.png`. An ordering claim between two
models counts only where both have matched entropy: within 10% of the held-out text's (elf-method §9).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from elf import metrics
from elf.config import Config, DatasetConfig, EvaluateConfig, TrainSettings
from elf.errors import ElfError
from elf.files import atomic_file, read_json, write_json_atomic, write_text_atomic
from elf.sample import HEADLINE_SAMPLERS, SamplerConfig

ENTROPY_MATCH = 0.10
"""An lm sampler has matched entropy when its mean unigram entropy is within this share of the held-out text's."""

FLOP_COUNT_STEPS = 4
"""Steps whose FLOPs are counted per family (ELF's self-conditioning rows are random: a mean over steps)."""


@dataclasses.dataclass(frozen=True)
class ComparePaths:
    root: Path  # compare/
    tokenizer: Path  # data/tokenizer
    encoder: Path  # data/encoder

    def raw(self, dataset: str) -> Path:
        return self.root / "data" / dataset / "raw"

    def tokens(self, dataset: str) -> Path:
        return self.root / "data" / dataset / "tokens"

    def model(self, dataset: str, family: str) -> Path:
        return self.root / "models" / dataset / family

    def metrics(self, dataset: str, family: str) -> Path:
        return self.root / "metrics" / dataset / family


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------


def prepare_data(name: str, dataset: DatasetConfig, config: Config, paths: ComparePaths) -> None:
    """Raw text and token shards of the comparison's version of a dataset; skipped when already made from the
    same settings, seed and tokenizer (a record beside them says which)."""
    from elf.data.prepare import prepare_dataset
    from elf.data.tokenizer import tokenizer_hash
    from elf.data.tokens import tokenize_dataset

    record = {"dataset": dataset.model_dump(mode="json"), "seed": config.seed,
              "tokenize": config.tokenize.model_dump(mode="json"), "tokenizer": tokenizer_hash(paths.tokenizer)}
    stamp = paths.root / "data" / name / "made_from.json"
    if stamp.is_file() and read_json(stamp, "comparison data record") == record:
        return
    prepare_dataset(name, dataset, config.seed, paths.raw(name))
    tokenize_dataset(name, dataset, config.tokenize, paths.raw(name), paths.tokenizer, paths.tokens(name))
    write_json_atomic(stamp, record)


# ---------------------------------------------------------------------------------------------------------
# Equal training compute
# ---------------------------------------------------------------------------------------------------------


def train_paths(name: str, family: str, paths: ComparePaths):
    from elf.train import TrainPaths

    return TrainPaths(tokens=paths.tokens(name) / "train", embeddings=None, encoder=paths.encoder,
                      tokenizer=paths.tokenizer, out=paths.model(name, family), metrics=paths.metrics(name, family))


def step_flops(name: str, dataset: DatasetConfig, settings: TrainSettings, seed: int, paths: ComparePaths) -> float:
    """Training FLOPs of one optimisation step (mean over the first `FLOP_COUNT_STEPS`), counted by torch on a
    throwaway run of these settings: every matmul and attention of the forward and backward passes, ELF's no-grad
    passes included. Nothing is written."""
    from torch.utils.flop_counter import FlopCounterMode

    from elf.distributed import init_distributed
    from elf.train import Trainer

    quiet = settings.model_copy(update={"validation": settings.validation.model_copy(update={"every": 0})})
    trainer = Trainer(name, dataset, quiet, seed, train_paths(name, settings.family, paths), init_distributed())
    counter = FlopCounterMode(display=False)
    with counter:
        for _ in range(FLOP_COUNT_STEPS):
            trainer.train_step()
    return counter.get_total_flops() / FLOP_COUNT_STEPS


def equal_compute_steps(elf_steps: int, flops: dict[str, float]) -> dict[str, int]:
    """Steps per family so that each trains with ELF's FLOPs: round(elf_steps · flops_elf / flops_family)."""
    budget = elf_steps * flops["elf"]
    return {family: max(1, round(budget / per_step)) for family, per_step in flops.items()}


# ---------------------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------------------


def samplers_for(family: str, name: str, dataset: DatasetConfig, config: Config) -> dict[str, SamplerConfig]:
    """The samplers a family is scored with on a dataset.

    ELF: `compare.elf_steps`, each with the settings of the dataset's own ELF sampler of that kind and step
    count in sample.samplers when there is one (the tuned γ), else the paper's headline sampler for the task.
    MDLM: `compare.mdlm_steps`, capped at the positions it generates (more steps than positions change nothing).
    AR: ancestral sampling for lm, greedy for seq2seq.
    """
    compare = config.compare
    if family == "elf":
        headline = HEADLINE_SAMPLERS[dataset.task]
        tuned = {c.steps: c for c in _configured_samplers(name, config)
                 if c.family == "elf" and c.kind == headline.kind and c.cfg_scale == headline.cfg_scale}
        return {f"{headline.kind}-{s}": tuned.get(s, dataclasses.replace(headline, steps=s)) for s in compare.elf_steps}
    if family == "mdlm":
        generated = dataset.max_length - (dataset.max_input_length or 0)
        steps = sorted({min(s, generated) for s in compare.mdlm_steps})
        return {f"mdlm-{s}": SamplerConfig(kind="mdlm", steps=s) for s in steps}
    kind = "ar" if dataset.task == "lm" else "ar_greedy"
    return {kind.replace("_", "-"): SamplerConfig(kind=kind)}


def _configured_samplers(name: str, config: Config) -> list[SamplerConfig]:
    try:
        return list(config.sample.sampler_configs(name).values())
    except KeyError:
        return []


# ---------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------


def _scorer(name: str, dataset: DatasetConfig, config: Config, paths: ComparePaths, tokenizer):
    from elf.data.shards import read_manifest
    from elf.data.tokens import FORMAT as TOKENS_FORMAT
    from elf.evaluate import Scorer

    packing = read_manifest(paths.tokens(name) / "train", TOKENS_FORMAT)["packing"]
    judge_free = EvaluateConfig(judge=None)  # the oracle (lm) or the references (seq2seq) score the samples
    return Scorer(dataset, judge_free, paths.raw(name), tokenizer, "cpu", packing)


LM_FIGURES = ("oracle_ppl_floored", "oracle_finite_fraction", "oracle_ppl_finite_only", "entropy", "distinct_2")
SEQ2SEQ_FIGURES = ("bleu", "rougeL", "entropy", "distinct_2")


def _mean_se(per_seed: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in keys:
        values = [s[key] for s in per_seed if s.get(key) is not None]
        mean, se = metrics.mean_se(values) if values else (None, None)
        out[key], out[f"{key}_se"] = mean, se
    return out


def score_family(name: str, family: str, dataset: DatasetConfig, config: Config, paths: ComparePaths, scorer,
                 inputs: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per sampler: the figures of `LM_FIGURES` / `SEQ2SEQ_FIGURES` as mean ± SE over the seeds, the
    network evaluations per sample and the sampling speed."""
    from elf.pretrained import ELFPipeline
    from elf.sample import conditional_texts, ids_to_texts

    compare = config.compare
    pipeline = ELFPipeline.load(paths.model(name, family) / "model", torch.device("cpu"))
    rows = []
    for sampler_name, cfg in samplers_for(family, name, dataset, config).items():
        per_seed, nfe, seconds = [], 0, 0.0
        for seed in compare.seeds:
            if dataset.task == "lm":
                out, _ = pipeline.sample_ids(cfg, seed, compare.batch_size, num_samples=compare.num_samples)
                per_seed.append(scorer.score(ids_to_texts(out.ids, pipeline.tokenizer)))
            else:
                out, mask = pipeline.sample_ids(cfg, seed, compare.batch_size, sources=inputs["sources"])
                texts = conditional_texts(out.ids, pipeline.tokenizer, mask, dataset.max_length,
                                          dataset.max_input_length)
                per_seed.append(scorer.score(texts, inputs["references"]))
            nfe, seconds = max(nfe, out.nfe), seconds + out.seconds
        figures = _mean_se(per_seed, LM_FIGURES if dataset.task == "lm" else SEQ2SEQ_FIGURES)
        rows.append({"dataset": name, "family": family, "sampler": sampler_name,
                     "steps": None if family == "ar" else cfg.steps, "nfe": nfe, **figures,
                     "samples_per_s": round(len(compare.seeds) * inputs["count"] / max(seconds, 1e-9), 3)})
        print(f"compare {name}/{family}/{sampler_name}: " + ", ".join(
            f"{k} {v:.4g}" for k, v in figures.items() if v is not None and not k.endswith("_se")), flush=True)
    return rows


def task_inputs(name: str, dataset: DatasetConfig, config: Config, paths: ComparePaths, tokenizer,
                scorer) -> dict[str, Any]:
    """What every family is scored against: lm — held-out rows of the same length as samples (their figures
    are the reference row); seq2seq — the first test sources and their references."""
    from elf.evaluate import reference_texts
    from elf.generation import conditional_inputs

    n = config.compare.num_samples
    if dataset.task == "lm":
        texts = reference_texts(paths.tokens(name) / "validation", tokenizer, n)
        return {"count": n, "reference": {"dataset": name, "family": "held-out text", "sampler": "",
                                          **_mean_se([scorer.score(texts)], LM_FIGURES)}}
    split = "test" if (paths.tokens(name) / "test").is_dir() else "validation"
    sources, _, _, references = conditional_inputs(paths.tokens(name) / split, paths.raw(name) / f"{split}.parquet", n)
    return {"count": len(sources), "sources": sources, "references": references,
            "reference": {"dataset": name, "family": "references", "sampler": "",
                          **_mean_se([scorer.diversity(references)], ("entropy", "distinct_2"))}}


# ---------------------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------------------


def run_compare(config: Config, paths: ComparePaths) -> dict[str, Any]:
    """Every step of the module docstring for every dataset of `compare.datasets`; returns the results written
    to compare/results.json."""
    from elf.data.tokenizer import load_tokenizer
    from elf.train import train

    if config.compare is None:
        raise ElfError("params.yaml: no compare section (see README, \"ELF vs MDLM vs AR\")")
    for needed in (paths.tokenizer, paths.encoder):
        if not needed.is_dir():
            raise ElfError(f"{needed}: not found (run `dvc repro encoder` first: the comparison uses the "
                           "pipeline's tokenizer and encoder)")
    tokenizer = load_tokenizer(paths.tokenizer)
    results: dict[str, Any] = {"datasets": {}, "machine": _machine()}
    for name in config.compare.datasets:
        dataset = config.compare_dataset(name)
        prepare_data(name, dataset, config, paths)
        elf_settings = config.compare_train(name)
        settings = {family: elf_settings.model_copy(update={"family": family}) for family in config.compare.families}
        flops = {family: step_flops(name, dataset, s, config.seed, paths) for family, s in settings.items()}
        reference_flops = flops.get("elf") or next(iter(flops.values()))
        steps = equal_compute_steps(elf_settings.steps, {"elf": reference_flops, **flops})
        training = {}
        for family in config.compare.families:
            run = settings[family].model_copy(update={"steps": steps[family]})
            began = time.perf_counter()
            summary = train(f"compare_{name}_{family}", dataset, run, config.seed, train_paths(name, family, paths))
            record = _training_record(paths, name, family, run, flops[family], time.perf_counter() - began, summary)
            training[family] = record
        scorer = _scorer(name, dataset, config, paths, tokenizer)
        inputs = task_inputs(name, dataset, config, paths, tokenizer, scorer)
        rows = [row for family in config.compare.families
                for row in score_family(name, family, dataset, config, paths, scorer, inputs)]
        for row in rows:
            row.update({"train_steps": training[row["family"]]["steps"],
                        "train_flops": training[row["family"]]["flops"],
                        "train_minutes": training[row["family"]]["minutes"]})
            if dataset.task == "lm":
                row["matched_entropy"] = _matched(row, inputs["reference"])
        results["datasets"][name] = {"task": dataset.task, "max_length": dataset.max_length,
                                     "training": training, "reference": inputs["reference"], "rows": rows,
                                     "ordering": ordering(rows) if dataset.task == "lm" else None}
    write_json_atomic(paths.root / "results.json", results)
    write_text_atomic(paths.root / "table.md", table(results))
    plot(results, paths.root / "compare.png")
    log_results(results, paths.root)
    return results


def log_results(results: dict[str, Any], root: Path) -> None:
    """One MLflow run `compare` (experiment elf-compare): every figure as `<ds>/<family>/<sampler>/<figure>`,
    the training budgets, and the table, plot and results as artifacts."""
    import mlflow

    from elf.tracking import mlflow_run

    figures: dict[str, float] = {}
    for name, part in results["datasets"].items():
        for family, record in part["training"].items():
            figures.update({f"{name}/{family}/train_{k}": float(record[k]) for k in ("steps", "flops", "minutes")})
        for row in part["rows"]:
            figures.update({f"{name}/{row['family']}/{row['sampler']}/{k}": float(v) for k, v in row.items()
                            if isinstance(v, int | float) and not isinstance(v, bool) and not k.startswith("train")})
    with mlflow_run("elf-compare", "compare"):
        mlflow.log_metrics(figures)
        for artifact in ("table.md", "compare.png", "results.json"):
            mlflow.log_artifact(str(root / artifact))


def _training_record(paths: ComparePaths, name: str, family: str, settings: TrainSettings, flops_per_step: float,
                     seconds: float, summary: dict[str, Any]) -> dict[str, Any]:
    """Steps, FLOPs and wall time of a family's training. A run that was already trained (or resumed) keeps the
    wall time recorded when its steps were trained (compare/models/<ds>/<family>/timing.json)."""
    from elf.model import num_parameters
    from elf.pretrained import ELFPipeline

    timing_path = paths.model(name, family) / "timing.json"
    timing = read_json(timing_path, "timing record") if timing_path.is_file() else {"seconds": 0.0, "steps": 0}
    trained_now = settings.steps - timing["steps"]
    if trained_now > 0:  # steps run in this call (after a resume: the rest); kept for later calls
        timing = {"seconds": timing["seconds"] + seconds, "steps": settings.steps}
        write_json_atomic(timing_path, timing)
    network = ELFPipeline.load(paths.model(name, family) / "model").network
    return {"steps": settings.steps, "flops_per_step": flops_per_step, "flops": flops_per_step * settings.steps,
            "parameters": num_parameters(network), "minutes": round(timing["seconds"] / 60, 2),
            "val_loss": summary.get("val_loss")}


def _matched(row: dict[str, Any], reference: dict[str, Any]) -> bool | None:
    if row.get("entropy") is None or not reference.get("entropy"):
        return None
    return abs(row["entropy"] - reference["entropy"]) <= ENTROPY_MATCH * reference["entropy"]


def ordering(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The paper's claim on this data: ELF at ≤ 32 steps against MDLM at its most steps, by oracle perplexity
    over all samples, counted only when both have matched entropy. `holds` is None when that is not the case."""
    elf = [r for r in rows if r["family"] == "elf" and r["steps"] <= 32]
    mdlm = [r for r in rows if r["family"] == "mdlm"]
    if not elf or not mdlm:
        return {"holds": None, "reason": "needs ELF at ≤ 32 steps and MDLM"}
    best_elf = min(elf, key=lambda r: r["oracle_ppl_floored"])
    most = max(mdlm, key=lambda r: r["steps"])
    verdict = {"elf": best_elf["sampler"], "elf_ppl": best_elf["oracle_ppl_floored"], "mdlm": most["sampler"],
               "mdlm_ppl": most["oracle_ppl_floored"], "ratio": most["oracle_ppl_floored"] /
               best_elf["oracle_ppl_floored"]}
    if not (best_elf.get("matched_entropy") and most.get("matched_entropy")):
        return {**verdict, "holds": None, "reason": "entropy not matched (within 10% of held-out text) for both"}
    return {**verdict, "holds": best_elf["oracle_ppl_floored"] < most["oracle_ppl_floored"], "reason": ""}


def _machine() -> dict[str, Any]:
    import os
    import platform

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "device": "cuda" if torch.cuda.is_available() else "cpu"}


# ---------------------------------------------------------------------------------------------------------
# Table and plot
# ---------------------------------------------------------------------------------------------------------


def _pm(row: dict[str, Any], key: str, scale: float = 1.0, digits: int = 1) -> str:
    value, se = row.get(key), row.get(f"{key}_se")
    if value is None:
        return "–"
    return f"{value * scale:.{digits}f}" + (f" ± {se * scale:.{digits}f}" if se is not None else "")


def table(results: dict[str, Any]) -> str:
    """The comparison as Markdown: one table per dataset, the reference text first."""
    lines = ["# ELF vs MDLM vs AR at equal training FLOPs", ""]
    for name, part in results["datasets"].items():
        lines.append(f"## {name} ({part['task']}, rows of {part['max_length']} tokens)")
        lines.append("")
        lines.append("| family | train steps | train TFLOP | train min | params |")
        lines.append("|---|---|---|---|---|")
        for family, t in part["training"].items():
            lines.append(f"| {family} | {t['steps']:,} | {t['flops'] / 1e12:,.3g} | {t['minutes']:.1f} | "
                         f"{t['parameters']:,} |")
        lines.append("")
        if part["task"] == "lm":
            lines.append("| model | sampler | NFE | oracle PPL (all samples) | parses % | entropy | distinct-2 | "
                         "matched entropy |")
            lines.append("|---|---|---|---|---|---|---|---|")
            for row in [part["reference"], *part["rows"]]:
                matched = {True: "yes", False: "no", None: ""}[row.get("matched_entropy")]
                parses = _pm(row, "oracle_finite_fraction", 100, 0)
                lines.append(f"| {row['family']} | {row['sampler']} | {row.get('nfe', '')} | "
                             f"{_pm(row, 'oracle_ppl_floored', digits=2)} | {parses} | {_pm(row, 'entropy', digits=2)}"
                             f" | {_pm(row, 'distinct_2', digits=2)} | {matched} |")
            verdict = part["ordering"]
            if verdict.get("holds") is None:
                lines += ["", f"Ordering (ELF ≤ 32 steps vs MDLM at most steps): undecided — {verdict['reason']}."]
            else:
                lines += ["", f"Ordering: ELF {verdict['elf']} {verdict['elf_ppl']:.2f} vs MDLM {verdict['mdlm']} "
                              f"{verdict['mdlm_ppl']:.2f} oracle PPL ({verdict['ratio']:.2f}×): the paper's ordering "
                              f"{'holds' if verdict['holds'] else 'does not hold'} at matched entropy."]
        else:
            lines.append("| model | sampler | NFE | BLEU | ROUGE-L | entropy | distinct-2 |")
            lines.append("|---|---|---|---|---|---|---|")
            for row in [part["reference"], *part["rows"]]:
                lines.append(f"| {row['family']} | {row['sampler']} | {row.get('nfe', '')} | {_pm(row, 'bleu')} | "
                             f"{_pm(row, 'rougeL')} | {_pm(row, 'entropy', digits=2)} | "
                             f"{_pm(row, 'distinct_2', digits=2)} |")
        lines.append("")
    machine = results["machine"]
    lines.append(f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['torch_threads']} torch threads, "
                 f"torch {machine['torch']} on {machine['device']}. Mean ± SE over sampling seeds.")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    """Quality against network evaluations per sample, one panel per figure, a line per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for name, part in results["datasets"].items():
        keys = (("oracle_ppl_floored", "oracle PPL, all samples (lower is better)"),
                ("oracle_finite_fraction", "share that parses")) if part["task"] == "lm" else (("bleu", "BLEU"),)
        panels += [(name, part, key, label) for key, label in keys]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (name, part, key, label) in zip(axes[0], panels, strict=True):
        for family in dict.fromkeys(r["family"] for r in part["rows"]):
            rows = sorted((r for r in part["rows"] if r["family"] == family and r.get(key) is not None),
                          key=lambda r: r["nfe"])
            ax.errorbar([r["nfe"] for r in rows], [r[key] for r in rows],
                        yerr=[r.get(f"{key}_se") or 0.0 for r in rows], marker="o", capsize=3, label=family)
        if part["reference"].get(key) is not None:
            ax.axhline(part["reference"][key], color="gray", linestyle="--", label=part["reference"]["family"])
        ax.set_xscale("log", base=2)
        if key == "oracle_ppl_floored":
            ax.set_yscale("log")
        ax.set_xlabel("network evaluations per sample")
        ax.set_title(f"{name}: {label}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
