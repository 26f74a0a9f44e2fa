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
    judges: Path  # data/judge: the pipeline's trained judges, for Gen PPL where there is no demo grammar

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
    """Training FLOPs of one optimisation step (mean over the first `FLOP_COUNT_STEPS`), counted by torch's
    FlopCounterMode on a throwaway run of these settings: the matmuls and attention of the forward and backward
    passes, ELF's no-grad self-conditioning passes included; the optimiser's matmuls too (none for AdamW; Muon's
    Newton–Schulz iterations). Batches are read outside the count, so the frozen encoder's work (the data) is not
    counted. Nothing is written."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    from elf.distributed import init_distributed
    from elf.train import Trainer

    quiet = settings.model_copy(update={"validation": settings.validation.model_copy(update={"every": 0})})
    trainer = Trainer(name, dataset, quiet, seed, train_paths(name, settings.family, paths), init_distributed())
    aten = torch.ops.aten  # torch counts the GPU attention kernels; the CPU one gets the same formula here
    counter = FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *_, **__: sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda grad, q, k, v, *_, **__: sdpa_backward_flop_count(grad, q, k, v)})
    for step in range(FLOP_COUNT_STEPS):
        batch = next(trainer.loader)
        with counter:
            trainer.train_step_fn(batch, step)
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
    MDLM: `compare.mdlm_steps` (more steps than positions still change the result: fewer tokens are unmasked
    together). AR: ancestral sampling for lm, greedy for seq2seq.
    """
    compare = config.compare
    if family == "elf":
        headline = HEADLINE_SAMPLERS[dataset.task]
        tuned = {c.steps: c for c in _configured_samplers(name, config)
                 if c.family == "elf" and c.kind == headline.kind and c.cfg_scale == headline.cfg_scale}
        return {f"{headline.kind}-{s}": tuned.get(s, dataclasses.replace(headline, steps=s)) for s in compare.elf_steps}
    if family == "mdlm":
        return {f"mdlm-{s}": SamplerConfig(kind="mdlm", steps=s) for s in compare.mdlm_steps}
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
    from elf.evaluate import GRAMMAR_FILE, Scorer

    packing = read_manifest(paths.tokens(name) / "train", TOKENS_FORMAT)["packing"]
    if dataset.task == "seq2seq" or (paths.raw(name) / GRAMMAR_FILE).is_file():
        # the references or the exact oracle score the samples: no judge model in between
        return Scorer(dataset, EvaluateConfig(judge=None), paths.raw(name), tokenizer, str(_device()), packing)
    # your own text: Gen PPL under the pipeline's judge (evaluate.judge; `trained`: the judge stage's model)
    return Scorer(dataset, config.evaluate, paths.raw(name), tokenizer, str(_device()), packing, paths.judges / name)


def _device() -> torch.device:
    """Where sampling and scoring run: where training ran (a GPU when there is one)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


LM_FIGURES = ("oracle_ppl_floored", "oracle_finite_fraction", "oracle_ppl_finite_only", "gen_ppl", "entropy",
              "distinct_2", "nonempty_fraction")
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
    pipeline = ELFPipeline.load(paths.model(name, family) / "model", _device())
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
            summary = train(f"compare_{name}_{family}", dataset, run, config.seed, train_paths(name, family, paths))
            training[family] = _training_record(paths, name, family, run, flops[family], summary)
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
            figures.update({f"{name}/{family}/train_{k}": float(record[k]) for k in ("steps", "flops", "minutes")
                            if record[k] is not None})
        for row in part["rows"]:
            figures.update({f"{name}/{row['family']}/{row['sampler']}/{k}": float(v) for k, v in row.items()
                            if isinstance(v, int | float) and not isinstance(v, bool) and not k.startswith("train")})
    with mlflow_run("elf-compare", "compare"):
        mlflow.log_metrics(figures)
        for artifact in ("table.md", "compare.png", "results.json"):
            mlflow.log_artifact(str(root / artifact))


def _training_record(paths: ComparePaths, name: str, family: str, settings: TrainSettings,
                     flops_per_step: float, summary: dict[str, Any]) -> dict[str, Any]:
    """Steps, FLOPs, parameters and wall time of a family's training; the time is the trainer's own count over
    every segment (`train_seconds` of the last checkpoint), so a resumed training reports all of it."""
    from elf import checkpoint as ckpt
    from elf.model import load_model, num_parameters

    out = paths.model(name, family)
    last = ckpt.list_checkpoints(out / "checkpoints")[-1]
    seconds = ckpt.read_trainer_state(last).get("train_seconds")
    network, _ = load_model(out / "model")
    return {"steps": settings.steps, "flops_per_step": flops_per_step, "flops": flops_per_step * settings.steps,
            "parameters": num_parameters(network), "minutes": None if seconds is None else round(seconds / 60, 2),
            "val_loss": summary.get("val_loss")}


def _matched(row: dict[str, Any], reference: dict[str, Any]) -> bool | None:
    if row.get("entropy") is None or not reference.get("entropy"):
        return None
    return abs(row["entropy"] - reference["entropy"]) <= ENTROPY_MATCH * reference["entropy"]


def quality_key(rows: list[dict[str, Any]]) -> str:
    """The lm perplexity the rows are ranked by: the demo oracle's over all samples, else Gen PPL (own text)."""
    return "oracle_ppl_floored" if any(r.get("oracle_ppl_floored") is not None for r in rows) else "gen_ppl"


def ordering(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The paper's claim on this data: ELF at ≤ 32 steps against MDLM at its most steps, by perplexity over all
    samples (`quality_key`), counted only when both have matched entropy. `holds` is None when that is not the
    case."""
    key = quality_key(rows)
    scored = [r for r in rows if r.get(key) is not None]
    elf = [r for r in scored if r["family"] == "elf" and r["steps"] <= 32]
    mdlm = [r for r in scored if r["family"] == "mdlm"]
    if not elf or not mdlm:
        return {"holds": None, "reason": "needs ELF at ≤ 32 steps and MDLM, both scored"}
    # matched entropy first: a repetitive, low-entropy sampler has the lowest perplexity and proves nothing
    elf, mdlm = [r for r in elf if r.get("matched_entropy")], [r for r in mdlm if r.get("matched_entropy")]
    if not elf or not mdlm:
        return {"holds": None, "reason": "no "
                + ("ELF sampler at ≤ 32 steps" if not elf else "MDLM sampler")
                + " has entropy within 10% of held-out text"}
    best_elf = min(elf, key=lambda r: r[key])
    most = max(mdlm, key=lambda r: r["steps"])
    return {"metric": key, "elf": best_elf["sampler"], "elf_ppl": best_elf[key], "mdlm": most["sampler"],
            "mdlm_ppl": most[key], "ratio": most[key] / best_elf[key], "holds": best_elf[key] < most[key],
            "reason": ""}


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
            minutes = "–" if t["minutes"] is None else f"{t['minutes']:.1f}"
            lines.append(f"| {family} | {t['steps']:,} | {t['flops'] / 1e12:,.3g} | {minutes} | "
                         f"{t['parameters']:,} |")
        lines.append("")
        if part["task"] == "lm":
            key = quality_key(part["rows"])
            label = "oracle PPL (all samples) | parses %" if key == "oracle_ppl_floored" else "Gen PPL | non-empty %"
            share = "oracle_finite_fraction" if key == "oracle_ppl_floored" else "nonempty_fraction"
            lines.append(f"| model | sampler | NFE | {label} | entropy | distinct-2 | matched entropy |")
            lines.append("|---|---|---|---|---|---|---|---|")
            for row in [part["reference"], *part["rows"]]:
                matched = {True: "yes", False: "no", None: ""}[row.get("matched_entropy")]
                lines.append(f"| {row['family']} | {row['sampler']} | {row.get('nfe', '')} | "
                             f"{_pm(row, key, digits=2)} | {_pm(row, share, 100, 0)} | {_pm(row, 'entropy', digits=2)}"
                             f" | {_pm(row, 'distinct_2', digits=2)} | {matched} |")
            verdict = part["ordering"]
            if verdict.get("holds") is None:
                lines += ["", f"Ordering (ELF ≤ 32 steps vs MDLM at most steps): undecided — {verdict['reason']}."]
            else:
                lines += ["", f"Ordering: ELF {verdict['elf']} {verdict['elf_ppl']:.2f} vs MDLM {verdict['mdlm']} "
                              f"{verdict['mdlm_ppl']:.2f} ({verdict['metric']}, MDLM/ELF {verdict['ratio']:.2f}×): "
                              f"the paper's ordering {'holds' if verdict['holds'] else 'does not hold'} at matched "
                              "entropy."]
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
    from matplotlib.ticker import ScalarFormatter

    panels = []
    for name, part in results["datasets"].items():
        if part["task"] == "seq2seq":
            keys = (("bleu", "BLEU"),)
        elif quality_key(part["rows"]) == "oracle_ppl_floored":
            keys = (("oracle_ppl_floored", "oracle PPL, all samples (lower is better)"),
                    ("oracle_finite_fraction", "share that parses"))
        else:
            keys = (("gen_ppl", "Gen PPL (lower is better)"), ("entropy", "entropy"))
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
        if key in ("oracle_ppl_floored", "gen_ppl"):
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.set_xlabel("network evaluations per sample")
        ax.set_title(f"{name}: {label}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
