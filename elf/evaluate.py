"""The evaluate stage: `samples/<dataset>.jsonl` → `metrics/<dataset>/eval.json`, plots, MLflow, registry.

Metrics follow elf-method §9 (see elf/metrics.py for each protocol):
- lm: Gen PPL under a judge LM (`evaluate.judge`: `trained`, the small model of the `judge` stage, elf/judge.py;
  or a hub name or path, gpt2-large in the paper), the oracle perplexity under the demo grammar when
  `data/raw/<ds>/grammar.json` exists (each sample scored as a stream of documents when `tokenize.packing` is
  `paragraphs`), and unigram entropy (of the judge's token ids, or of our tokenizer's without a judge).
- seq2seq: BLEU (lowercased, effective order — the paper's setting — and standard cased) and ROUGE-1/2/L.
- every task: the coverage and diversity figures of elf/selection.py (non-empty share, entropy, distinct-2).
Each figure is computed per evaluation seed and reported as mean ± standard error over seeds, and the same
figures are computed for reference text of the same count and length (lm: validation rows; seq2seq: the
references).

The primary metric of a dataset (its first sampler's Gen PPL / oracle PPL, BLEU or ROUGE-L) decides whether the
model becomes the registry's `champion` (elf/tracking.py), but only when the sampler's samples pass the checks
of elf/selection.py against the reference; an lm with neither judge nor grammar has no metric to rank by.
"""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

from elf import metrics
from elf.config import DatasetConfig, EvaluateConfig
from elf.data.demo import Grammar
from elf.data.embed import read_token_rows
from elf.errors import ElfError
from elf.files import atomic_file, write_csv_atomic, write_json_atomic
from elf.hashing import file_sha256
from elf.judge import TRAINED, judge_record
from elf.sample import ids_to_texts
from elf.selection import eligibility

GRAMMAR_FILE = "grammar.json"


def read_samples(path: Path, dataset: str) -> list[dict[str, Any]]:
    """Rows of a samples file; an empty or foreign file is an error naming it."""
    if not path.is_file():
        raise ElfError(f"{path}: samples file not found (run `elf sample {dataset}` first)")
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ElfError(f"{path}:{number}: invalid JSON ({error.msg})") from None
            if row.get("dataset") != dataset:
                raise ElfError(f"{path}:{number}: sample of dataset '{row.get('dataset')}', not '{dataset}'")
            rows.append(row)
    if not rows:
        raise ElfError(f"{path}: no samples")
    return rows


class Scorer:
    """Per-seed metrics of one dataset's texts, with the judge / grammar / tokenizer loaded once.

    `packing` is how the model's training rows were packed (the tokens manifest): under `paragraphs` it learned
    rows packed across documents with no separator, so a sample is a stream of documents and the oracle scores
    it as one (`Grammar.log_prob_stream`); under `documents` each sample is one document. `judge_dir` holds the
    judge the `judge` stage trained (used when `evaluate.judge` is `trained`).
    """

    def __init__(self, dataset: DatasetConfig, settings: EvaluateConfig, raw_dir: Path, tokenizer, device: str,
                 packing: str, judge_dir: Path | None = None):
        self.task = dataset.task
        self.stream = packing == "paragraphs"
        self.settings = settings
        self.tokenizer = tokenizer
        self.device = device
        grammar_path = raw_dir / GRAMMAR_FILE
        self.grammar = (Grammar.from_dict(json.loads(grammar_path.read_text(encoding="utf-8")))
                        if grammar_path.is_file() else None)
        self.judge, self.judge_info = None, None
        if settings.judge and dataset.task == "lm":
            where = settings.judge
            if settings.judge == TRAINED:
                if judge_dir is None:
                    raise ElfError("evaluate.judge is 'trained' but no judge directory was given")
                record = judge_record(judge_dir)
                self.judge_info = {"judge": TRAINED, "id": f"{TRAINED}-{record['weights_sha256'][:12]}",
                                   "validation_ppl": record["validation_ppl"], "parameters": record["parameters"],
                                   "train_rows": record["train_rows"]}
                where = str(judge_dir)
            else:
                self.judge_info = {"judge": settings.judge, "id": settings.judge}
            self.judge = metrics.load_judge(where, device, settings.judge_dtype)

    def score(self, texts: list[str], references: list[str] | None = None) -> dict[str, float | None]:
        """Quality figures (BLEU/ROUGE; oracle and Gen PPL) and the coverage and diversity figures that
        elf/selection.py checks, of one seed's texts."""
        out: dict[str, float | None] = {}
        if self.task == "seq2seq":
            out.update({**metrics.bleu(texts, references), **metrics.rouge(texts, references)})
        if self.grammar is not None and self.task == "lm":
            oracle = metrics.oracle_ppl(texts, self.grammar, stream=self.stream)
            out.update(oracle_ppl=oracle["ppl"], oracle_ppl_finite_only=oracle["ppl_finite_only"],
                       oracle_ppl_floored=oracle["ppl_floored"], oracle_finite_fraction=oracle["finite_fraction"])
        if self.judge is not None:
            model, judge_tokenizer = self.judge
            judged = metrics.gen_ppl(texts, model, judge_tokenizer, batch_size=self.settings.judge_batch_size,
                                     max_length=getattr(model.config, "n_positions", 1024), device=self.device)
            out["gen_ppl"] = judged["ppl"]
            return {**out, **self.diversity(texts, entropy=judged["entropy"])}
        return {**out, **self.diversity(texts)}

    def diversity(self, texts: list[str], entropy: float | None = None) -> dict[str, float | None]:
        """Coverage and diversity (elf/selection.py): non-empty share, mean unigram entropy (§9: of the judge's
        token ids, which `gen_ppl` reports as `entropy`; without a judge, of ours) and pooled distinct-2 (of
        our ids)."""
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts if t.strip()]
        return {"entropy": metrics.mean_entropy(ids) if entropy is None else entropy,
                "distinct_2": metrics.distinct_n(ids, 2), "nonempty_fraction": len(ids) / max(len(texts), 1)}


def _aggregate(per_seed: list[dict[str, float | None]]) -> dict[str, Any]:
    """Mean and standard error over seeds (`<metric>_se`), per metric; a metric missing (None) for any seed stays
    None. A per-example SE a metric brings along (`<metric>_example_se`) is averaged over the seeds."""
    summary: dict[str, Any] = {}
    for key in per_seed[0]:
        values = [s.get(key) for s in per_seed]
        per_example = key.endswith("_example_se")
        if any(v is None or not math.isfinite(v) for v in values):
            summary[key] = None
            if not per_example:
                summary[f"{key}_se"] = None
            continue
        mean, se = metrics.mean_se(values)
        summary[key] = mean
        if not per_example:
            summary[f"{key}_se"] = se
    return summary


def primary_metric(task: str, configured: str | None, has_grammar: bool, has_judge: bool) -> tuple[str | None, bool]:
    """(metric, higher_is_better) that decides the registry's champion; perplexities are lower-is-better.

    An lm dataset with neither a judge nor the demo grammar has no quality metric (None): entropy alone would
    crown random tokens, so such a model is never ranked (set `evaluate.judge`, e.g. `trained`).
    """
    if configured is None:
        if task == "seq2seq":
            configured = "bleu"
        elif has_judge:
            configured = "gen_ppl"
        elif has_grammar:
            configured = "oracle_ppl_finite_only"
        else:
            return None, False
    return configured, "ppl" not in configured


def reference_texts(tokens_dir: Path, tokenizer, limit: int) -> list[str]:
    """Reference text of the same length as lm samples: the first `limit` rows of the validation split
    (`data/tokens/<ds>/validation`, laid out as the model's training rows), decoded as samples are."""
    rows = read_token_rows(tokens_dir, "lm", limit)
    if not rows:
        raise ElfError(f"{tokens_dir}: no validation rows for the reference figures")
    return ids_to_texts([row[0] for row in rows], tokenizer)


def shuffled_words(texts: list[str], seed: int = 0) -> list[str]:
    """Each text with its whitespace-separated words in a random order (seeded per text): the same words,
    no language; the quality floor of elf/selection.py."""
    out = []
    for i, text in enumerate(texts):
        words = text.split()
        random.Random(seed * 1_000_003 + i).shuffle(words)
        out.append(" ".join(words))
    return out


def evaluate_dataset(name: str, dataset: DatasetConfig, settings: EvaluateConfig, samples_path: Path, raw_dir: Path,
                     tokenizer, metrics_dir: Path, packing: str, tokens_dir: Path, judge_dir: Path | None = None,
                     device: str = "cpu") -> dict[str, Any]:
    """Score every sampler × seed, aggregate, check eligibility, write eval.json and the plots; returns the report.

    `packing`: how the training rows were packed, from the tokens manifest (see `Scorer`); `tokens_dir`:
    data/tokens/<ds> (lm: its validation rows are the reference text); `judge_dir`: data/judge/<ds>.
    """
    rows = read_samples(samples_path, name)
    scorer = Scorer(dataset, settings, raw_dir, tokenizer, device, packing, judge_dir)
    groups: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        groups[row["sampler"]][row["seed"]].append(row)
    report: dict[str, Any] = {"dataset": name, "task": dataset.task, "samplers": {}}
    for sampler, by_seed in groups.items():
        per_seed = []
        for seed_rows in by_seed.values():
            seed_rows.sort(key=lambda r: r["index"])
            texts = [r["text"] for r in seed_rows]
            refs = [r["reference"] for r in seed_rows] if dataset.task == "seq2seq" else None
            per_seed.append(scorer.score(texts, refs))
        first = next(iter(by_seed.values()))[0]
        report["samplers"][sampler] = {
            "settings": first["settings"], "nfe": first["nfe"], "seeds": sorted(by_seed),
            "samples_per_seed": len(next(iter(by_seed.values()))),
            **_aggregate(per_seed),
        }
    first_sampler = next(iter(groups))
    # Reference text of the same count and length as one seed's samples (elf/selection.py).
    first_seed = sorted(next(iter(groups[first_sampler].values())), key=lambda r: r["index"])
    if dataset.task == "lm":
        held_out = reference_texts(tokens_dir / "validation", tokenizer, len(first_seed))
        report["reference"] = {"texts": len(held_out), **scorer.score(held_out)}
        if scorer.judge is not None:  # the quality floor of elf/selection.py
            report["reference"]["gen_ppl_shuffled"] = scorer.score(shuffled_words(held_out))["gen_ppl"]
    else:
        references = [r["reference"] for r in first_seed]
        report["reference"] = {"texts": len(references), **scorer.diversity(references)}
    if scorer.judge_info is not None:
        report["judge"] = scorer.judge_info
    metric, higher = primary_metric(dataset.task, settings.primary_metric.get(name), scorer.grammar is not None,
                                    scorer.judge is not None)
    report["primary"] = {"metric": metric, "sampler": first_sampler, "higher_is_better": higher,
                         "value": report["samplers"][first_sampler].get(metric) if metric else None}
    report["selection"] = eligibility(report["samplers"][first_sampler], report["reference"],
                                      settings.selection_ratio)
    metrics_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(metrics_dir / "eval.json", report)
    write_json_atomic(metrics_dir / "headline.json", headline(report))
    write_csv_atomic(metrics_dir / "samplers.csv", sampler_rows(report))
    plot_report(report, metrics_dir / "eval_quality.png")
    return report


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """The DVC metric of a dataset: its primary metric ± SE on the primary sampler, and whether that sampler's
    samples pass the coverage and diversity checks (`ranked`), so that `dvc exp show` stays readable and a
    collapsed model's good number is never shown alone (the full report is eval.json)."""
    primary = report["primary"]
    if primary["metric"] is None:
        return {"ranked": False}
    scores = report["samplers"][primary["sampler"]]
    return {primary["metric"]: primary["value"], f"{primary['metric']}_se": scores.get(f"{primary['metric']}_se"),
            "ranked": report["selection"]["eligible"]}


def sampler_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per sampler (kind, steps, the primary metric ± SE under the fixed name `primary`, and which
    metric that is): the quality-vs-steps data plot of dvc.yaml, the same columns for every dataset."""
    metric = report["primary"]["metric"] or "entropy"  # no quality metric: the plot shows entropy
    return [{"sampler": name, "kind": scores["settings"]["kind"], "steps": scores["settings"]["steps"],
             "primary": scores.get(metric), "primary_se": scores.get(f"{metric}_se"), "metric": metric}
            for name, scores in report["samplers"].items()]


def plot_report(report: dict[str, Any], path: Path) -> None:
    """lm: quality (PPL) against entropy across samplers, and quality against steps; seq2seq: scores by sampler."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samplers = report["samplers"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    if report["task"] == "lm":
        key = "gen_ppl" if any(s.get("gen_ppl") for s in samplers.values()) else "oracle_ppl_finite_only"
        for name, s in samplers.items():
            if s.get(key) is not None and s.get("entropy") is not None:
                axes[0].scatter(s["entropy"], s[key], label=name)
        ref = report.get("reference", {})
        if ref.get(key) is not None and ref.get("entropy") is not None:
            axes[0].scatter(ref["entropy"], ref[key], marker="*", s=150, c="k", label="held-out text")
        axes[0].set(xlabel="entropy (nats)", ylabel=key, title="quality vs diversity")
        axes[0].legend(fontsize=7)
        by_kind: dict[str, list] = defaultdict(list)
        for s in samplers.values():
            if s.get(key) is not None:
                by_kind[s["settings"]["kind"]].append((s["settings"]["steps"], s[key]))
        for kind, points in by_kind.items():
            points.sort()
            axes[1].plot([p[0] for p in points], [p[1] for p in points], marker="o", label=kind)
        axes[1].set(xscale="log", xlabel="steps", ylabel=key, title="quality vs steps")
        axes[1].legend()
    else:
        names = list(samplers)
        for i, key in enumerate(("bleu", "rougeL")):
            axes[i].bar(names, [samplers[n].get(key) or 0 for n in names])
            axes[i].set(title=key, ylim=(0, 100))
    fig.suptitle(f"ELF evaluation: {report['dataset']}")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def log_report(report: dict[str, Any], run_id: str, samples_path: Path, plot_path: Path, step: int) -> None:
    """Evaluation metrics on the MLflow run of the training segment that made the model, at its training `step`:
    `eval/<sampler>/<metric>` (None values are skipped), `eval/reference/<metric>`, `eval/ranked` (0/1)."""
    import mlflow

    values = {}  # 6 significant digits: what the UI shows stays readable, and more is noise for these figures
    for sampler, figures in report["samplers"].items():
        for key, value in figures.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                values[f"eval/{sampler}/{key}"] = float(f"{value:.6g}")
    for key, value in report.get("reference", {}).items():
        if isinstance(value, (int, float)) and value is not None and math.isfinite(value):
            values[f"eval/reference/{key}"] = float(f"{value:.6g}")
    values["eval/ranked"] = float(report["selection"]["eligible"])
    from elf.tracking import latest_logged_model

    logged = latest_logged_model(mlflow.MlflowClient(), run_id)  # the figures show on the model's page too
    mlflow.log_metrics(values, step=step, model_id=logged.model_id if logged else None)
    mlflow.set_tag("selection", report["selection"]["reason"])
    # The samples as a table, text first, so that MLflow's artifact viewer shows what the model wrote. log_table
    # appends to a file of the same name: one file per distinct samples file, logged once.
    table_file = f"samples-{file_sha256(samples_path)[:12]}.json"
    if table_file not in {a.path for a in mlflow.MlflowClient().list_artifacts(run_id)}:
        rows = [json.loads(line) for line in samples_path.read_text(encoding="utf-8").splitlines() if line.strip()]
        first = ["text", "sampler", "seed", "index", "source", "reference"]
        mlflow.log_table({key: [row.get(key) for row in rows] for key in first if any(key in row for row in rows)},
                         artifact_file=table_file)
    mlflow.log_artifact(str(samples_path), artifact_path="samples")
    mlflow.log_artifact(str(plot_path))
