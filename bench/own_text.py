"""The pipeline on real English text that ships with Python: what a user sees on their own `files` dataset.

    python -m bench.own_text [--steps 2000] [--max-length 64] [--out /tmp/elf-own-text]     # repo root

Python's reference documentation (`pydoc_data.topics`: 79 topics, ≈ 65,000 words of prose and code) becomes a
`source: files` lm dataset, one paragraph per line, every tenth paragraph held out as the validation split.
A project with that one dataset (otherwise the demo configuration of params.yaml: BPE tokenizer trained on the
text, Gaussian encoder table, the demo model size, the trained judge) runs every stage in `--out` with the
`elf` commands, as the tests' projects do. Nothing here knows the text: no grammar, so Gen PPL under the
trained judge is the quality metric, and selection compares with held-out rows of the same length.

Prints JSON: the validation loss (start → end, ± SE), the judge's own validation perplexity, and per sampler
Gen PPL, entropy, distinct-2 and non-empty share next to the same figures on reference text, plus whether
the model would be ranked.
"""

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import yaml


def write_text_dataset(folder: Path) -> dict[str, int]:
    """train.txt / validation.txt of Python's topic documentation, one paragraph per line."""
    import pydoc_data.topics

    paragraphs = []
    for text in pydoc_data.topics.topics.values():
        for paragraph in text.split("\n\n"):
            line = " ".join(paragraph.split())
            if len(line.split()) >= 8:
                paragraphs.append(line)
    folder.mkdir(parents=True, exist_ok=True)
    validation = paragraphs[::10]
    train = [p for i, p in enumerate(paragraphs) if i % 10]
    (folder / "train.txt").write_text("\n".join(train) + "\n", encoding="utf-8")
    (folder / "validation.txt").write_text("\n".join(validation) + "\n", encoding="utf-8")
    return {"train_paragraphs": len(train), "validation_paragraphs": len(validation)}


def project_params(steps: int, max_length: int) -> dict:
    params = yaml.safe_load(Path("params.yaml").read_text(encoding="utf-8"))
    params["datasets"] = {"pydocs": {
        "task": "lm", "source": "files", "max_length": max_length,
        "files": {"splits": {"train": "data/input/pydocs/train.txt",
                             "validation": "data/input/pydocs/validation.txt"},
                  "format": "txt", "fields": {"text": "text"}}}}
    params["embed"]["cache"] = {"pydocs": True}
    params["train"]["defaults"]["steps"] = steps
    params["train"]["datasets"] = {"pydocs": {"objective": {"decode_noise_scale": 5.0}}}
    params.pop("compare", None)  # it names the demo datasets
    params["sample"]["samplers"] = {"pydocs": params["sample"]["samplers"]["owt"][:3]}
    params["evaluate"].update(judge="trained", primary_metric={}, register_model=False)
    return params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("/tmp/elf-own-text"))
    args = parser.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    sizes = write_text_dataset(args.out / "data/input/pydocs")
    (args.out / "params.yaml").write_text(yaml.safe_dump(project_params(args.steps, args.max_length), sort_keys=False))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{args.out / 'mlruns.db'}"
    from elf.cli import main as elf

    os.chdir(args.out)
    seconds = {}
    for stage in (["prepare", "pydocs"], ["tokenizer"], ["tokenize", "pydocs"], ["encoder"], ["embed", "pydocs"],
                  ["judge", "pydocs"], ["train", "pydocs"], ["sample", "pydocs"], ["evaluate", "pydocs"]):
        started = time.perf_counter()
        if elf(stage) != 0:
            raise SystemExit(f"elf {' '.join(stage)} failed")
        seconds[stage[0]] = round(time.perf_counter() - started, 1)
    evaluation = json.loads(Path("metrics/pydocs/eval.json").read_text())
    validation = Path("metrics/pydocs/validation_history.csv").read_text().splitlines()
    first, last = (dict(zip(validation[0].split(","), row.split(","), strict=True)) for row in (validation[1],
                                                                                               validation[-1]))
    keys = ("gen_ppl", "gen_ppl_se", "entropy", "distinct_2", "nonempty_fraction")
    report = {
        "data": sizes, "seconds": seconds,
        "validation_loss": {"first": first, "last": last},
        "judge": evaluation.get("judge"),
        "reference": {k: evaluation["reference"].get(k) for k in ("texts", *keys, "gen_ppl_shuffled")},
        "samplers": {name: {k: s.get(k) for k in ("nfe", *keys)} for name, s in evaluation["samplers"].items()},
        "selection": evaluation["selection"]["reason"],
        "example_samples": [json.loads(line)["text"] for line in
                            Path("samples/pydocs.jsonl").read_text().splitlines()[:3]],
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
