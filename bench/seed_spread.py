"""Spread of the demo's primary metrics over *training* seeds, beside the sampling-seed SE that eval.json reports.

    python -m bench.seed_spread [--seeds 1 2] [--datasets owt wmt14 xsum]     # after `make demo`, repo root

The ± of eval.json is the standard error over evaluation (sampling) seeds of one trained model. Another training
seed gives another model: this measures how far that moves the figures. Each seed in `--seeds` retrains a
dataset's model from scratch on the data the pipeline built (the seed sets the initial weights, the data order
and the objective's noise), samples with the dataset's primary sampler (the first listed) and the configured
evaluation seeds, and scores as the evaluate stage does. The pipeline's own model (training seed = `seed` of
params.yaml) is read from metrics/<ds>/eval.json and counted as one more training seed. Everything else is
written under a temporary directory; the project is only read.

Prints JSON per dataset: the primary metric of every training seed with its sampling-seed SE, the mean and
standard deviation over training seeds, the mean sampling-seed SE, whether each model was ranked, and on the demo's
lm the share of samples that parse, the oracle perplexity over all samples and the entropy.
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from elf.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="training seeds to add")
    parser.add_argument("--datasets", nargs="+", default=None, help="default: every dataset of params.yaml")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="elf-seed-spread-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlruns.db'}"  # the project's store stays untouched

    from elf.data.shards import read_manifest
    from elf.data.tokenizer import load_tokenizer
    from elf.evaluate import evaluate_dataset
    from elf.files import read_json
    from elf.generation import sample_dataset
    from elf.runtime import set_threads
    from elf.train import TrainPaths, train

    config = load_config()
    threads = set_threads(config.threads)
    tokenizer = load_tokenizer("data/tokenizer")
    report = {"threads": threads, "datasets": {}}
    for name in args.datasets or list(config.datasets):
        dataset = config.dataset(name)
        primary_sampler = config.sample.samplers[name][0]
        sample_settings = config.sample.model_copy(update={"samplers": {name: [primary_sampler]}})
        evaluate_settings = config.evaluate.model_copy(update={"register_model": False})
        rows = []
        pipeline_eval = Path("metrics") / name / "eval.json"
        if pipeline_eval.is_file():
            rows.append(_row(config.seed, read_json(pipeline_eval), "make demo"))
        for seed in args.seeds:
            out = work / f"seed-{seed}"
            embeddings = Path("data/embeddings") / name / "train"
            cached = read_json(embeddings / "manifest.json").get("cached", False)
            paths = TrainPaths(tokens=Path("data/tokens") / name / "train", embeddings=embeddings if cached else None,
                               encoder=Path("data/encoder"), tokenizer=Path("data/tokenizer"),
                               out=out / "models" / name, metrics=out / "metrics" / name)
            started = time.perf_counter()
            train(name, dataset, config.train.for_dataset(name), seed, paths)
            samples = out / "samples" / f"{name}.jsonl"
            sample_dataset(name, dataset, sample_settings, paths.model, Path("data/tokens") / name,
                           Path("data/raw") / name, samples)
            packing = read_manifest(Path("data/tokens") / name / "train")["packing"]
            evaluation = evaluate_dataset(name, dataset, evaluate_settings, samples, Path("data/raw") / name, tokenizer,
                                          out / "metrics" / name, packing, Path("data/tokens") / name,
                                          Path("data/judge") / name)
            rows.append({**_row(seed, evaluation, "this bench"), "seconds": round(time.perf_counter() - started)})
        values = [r["value"] for r in rows if r["value"] is not None]
        ses = [r["sampling_se"] for r in rows if r["sampling_se"] is not None]
        report["datasets"][name] = {
            "metric": rows[0]["metric"] if rows else None, "sampler": primary_sampler["name"], "runs": rows,
            "mean_over_training_seeds": statistics.fmean(values) if values else None,
            "sd_over_training_seeds": statistics.stdev(values) if len(values) > 1 else None,
            "mean_sampling_se": statistics.fmean(ses) if ses else None,
        }
        print(json.dumps({name: report["datasets"][name]}, indent=1), flush=True)
    print(json.dumps(report, indent=1))


def _row(seed: int, evaluation: dict, source: str) -> dict:
    primary = evaluation["primary"]
    scores = evaluation["samplers"][primary["sampler"]]
    metric = primary["metric"]
    return {"training_seed": seed, "source": source, "metric": metric, "value": primary["value"],
            "sampling_se": scores.get(f"{metric}_se") if metric else None,
            "ranked": evaluation.get("selection", {}).get("eligible"),
            **{k: scores[k] for k in ("oracle_finite_fraction", "oracle_ppl_floored", "entropy") if k in scores}}


if __name__ == "__main__":
    main()
