"""A trained model as an MLflow logged model with a pyfunc flavour, so the registry serves it anywhere.

`mlflow.pyfunc.load_model("models:/elf-<ds>@champion")` then works on any machine with the logged model's
requirements installed (the `elf` package itself travels with the model):
`predict(DataFrame({"source": [...]}), params={...})` returns one text per row (an lm model ignores the
source; send "" rows). params: the sampler (kind, steps, gamma, guidance, cfg_scale) and seed; unset ones
take the paper's setting for the model's task (elf/sample.py HEADLINE_SAMPLERS); a baseline model (MDLM, AR)
defaults to its own sampler.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow


class ELFPyfuncModel(mlflow.pyfunc.PythonModel):
    """The pyfunc flavour: MLflow calls load_context with the logged model directory, then predict."""

    def load_context(self, context) -> None:
        import torch

        from elf.pretrained import ELFPipeline

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.pipeline = ELFPipeline.load(context.artifacts["model"], device)

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[str]:
        params = dict(params or {})
        seed = int(params.pop("seed", 0))
        if self.pipeline.task == "lm":
            return self.pipeline.generate(len(model_input), seed=seed, **params)
        return self.pipeline.generate(source=[str(s) for s in model_input["source"]], seed=seed, **params)


def log_pyfunc_model(model_dir: Path, task: str) -> None:
    """Log `model_dir` (a self-contained model directory) on the active run as the logged model "model"."""
    from importlib.metadata import requires

    import pandas as pd
    from mlflow.models import infer_signature

    from elf.sample import HEADLINE_SAMPLERS, SamplerConfig

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    family = config.get("family", "elf")  # a baseline (elf/families) samples with its own kind by default
    defaults = HEADLINE_SAMPLERS[task] if family == "elf" else SamplerConfig(kind=family, steps=config["max_length"])
    params = {"kind": defaults.kind, "steps": defaults.steps, "gamma": defaults.gamma,
              "guidance": defaults.guidance, "cfg_scale": defaults.cfg_scale, "seed": 0}
    example = pd.DataFrame({"source": ["" if task == "lm" else "a source text"]})
    # This package travels with the model (code_paths); pip installs what it needs (its own dependencies).
    needs = [r for r in requires("elf") or [] if "extra ==" not in r]
    tags = {key: str(config[key]) for key in ("dataset", "step", "tokenizer_hash", "encoder_content_hash",
                                               "weights_sha256") if key in config}
    mlflow.pyfunc.log_model(name="model", python_model=ELFPyfuncModel(), artifacts={"model": str(model_dir)},
                            step=config.get("step", 0), tags=tags,
                            signature=infer_signature(example, ["a generated text"], params=params),
                            code_paths=[str(Path(__file__).parent)], pip_requirements=needs)
