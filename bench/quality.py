"""Sample quality of the demo models after `dvc repro` (run from the repository root).

    python bench/quality.py [--samples 64] [--seeds 0 1]

Prints JSON with:
- owt: oracle perplexity (per word, under the demo grammar; over the texts the grammar can produce, with the
  share of such texts) and entropy for 8 / 16 / 32 / 64 steps, ODE and SDE (γ as in elf-method §7, w = 3),
  next to held-out demo text of the same length (validation rows) and an untrained model of the same shape;
  Gen PPL under the trained judge and distinct-2 when `evaluate.judge` is `trained`;
- wmt14 BLEU and xsum ROUGE at 64 ODE steps (ω = 2, w = 1) from `metrics/<ds>/eval.json`;
- sampling throughput: samples/s and network evaluations/s.
Goals for the demo: at 32 steps oracle perplexity within 1.5× of the held-out text, entropy within 10%;
BLEU and ROUGE-L ≥ 50.
"""

import argparse
import json
from pathlib import Path

import torch

from elf import metrics
from elf.config import load_config
from elf.data.shards import read_manifest
from elf.data.tokenizer import load_tokenizer
from elf.evaluate import Scorer, reference_texts
from elf.generation import load_trained
from elf.model import ELF
from elf.sample import SamplerConfig, as_trained, generate, ids_to_texts

SETTINGS = [("ode", 8, 0.0), ("sde", 8, 2.0), ("ode", 16, 0.0), ("sde", 16, 2.0), ("ode", 32, 0.0),
            ("sde", 32, 1.5), ("ode", 64, 0.0), ("sde", 64, 1.0)]


def score_model(model, encoder, tokenizer, scorer, length, samples, seeds, kind, steps, gamma, objective) -> dict:
    """`objective`: the trained model's (its noise scale is the sampler's)."""
    cfg = as_trained(SamplerConfig(kind=kind, steps=steps, gamma=gamma, guidance=3.0), objective)
    per_seed, seconds, count = [], 0.0, 0
    for seed in seeds:
        out = generate(model, encoder.dim, length, samples, cfg, seed, "cpu", num_samples=samples, progress=False)
        per_seed.append(scorer.score(ids_to_texts(out.ids, tokenizer)))
        seconds, count = seconds + out.seconds, count + samples
    summary = {}
    for key in ("oracle_ppl_finite_only", "oracle_finite_fraction", "gen_ppl", "entropy", "distinct_2"):
        values = [s[key] for s in per_seed if s.get(key) is not None]
        summary[key] = round(metrics.mean_se(values)[0], 3) if values else None
    summary["samples_per_s"] = round(count / seconds, 2)
    summary["nfe_per_s"] = round(count * cfg.network_evaluations() / seconds, 1)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    config = load_config()
    dataset = config.datasets["owt"]
    trained = load_trained(Path("models/owt/model"), "owt", torch.device("cpu"))
    model, encoder, tokenizer = trained.network, trained.encoder, trained.tokenizer
    packing = read_manifest(Path("data/tokens/owt/train"))["packing"]
    scorer = Scorer(dataset, config.evaluate, Path("data/raw/owt"), load_tokenizer("data/tokenizer"), "cpu", packing,
                    Path("data/judge/owt"))
    torch.manual_seed(0)
    untrained = ELF(model.cfg).eval()
    held_out = scorer.score(reference_texts(Path("data/tokens/owt/validation"), tokenizer, args.samples))
    report = {"owt": {"held_out_text": {k: held_out.get(k) for k in ("oracle_ppl", "gen_ppl", "entropy",
                                                                    "distinct_2")}, "trained": {},
                      "untrained_sde_32": score_model(untrained, encoder, tokenizer, scorer, dataset.max_length,
                                                      args.samples, args.seeds, "sde", 32, 1.5,
                                                      trained.info["objective"])}}
    for kind, steps, gamma in SETTINGS:
        report["owt"]["trained"][f"{kind}-{steps}"] = score_model(
            model, encoder, tokenizer, scorer, dataset.max_length, args.samples, args.seeds, kind, steps, gamma,
            trained.info["objective"])
    for name, keys in (("wmt14", ("bleu", "bleu_cased")), ("xsum", ("rouge1", "rouge2", "rougeL"))):
        path = Path(f"metrics/{name}/eval.json")
        if path.is_file():
            samplers = json.loads(path.read_text())["samplers"]
            report[name] = {s: {k: figures.get(k) for k in (*keys, "nfe")}
                            for s, figures in samplers.items()}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
