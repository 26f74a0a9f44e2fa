"""`elf compare` end to end on a tiny project: three families, equal training FLOPs, one table, one plot."""

import json

import pytest
import yaml
from conftest import REPO, inside, mlflow_store_in

from elf.cli import main
from elf.compare import equal_compute_steps, ordering


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """owt and wmt14 at tiny sizes, the pipeline's data stages run, and a compare section over both."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["threads"] = 1
    params["datasets"] = {"owt": params["datasets"]["owt"], "wmt14": params["datasets"]["wmt14"]}
    for dataset in params["datasets"].values():
        dataset["demo"].update(train_size=120, validation_size=10)
    params["datasets"]["wmt14"]["demo"]["test_size"] = 10
    params["tokenizer"]["vocab_size"] = 300
    params["embed"]["cache"] = {"owt": False, "wmt14": False}
    params["train"]["defaults"].update(steps=2, batch_size=4, checkpoint_every=2, log_every=1,
                                       validation={"every": 2, "rows": 8},
                                       model={"depth": 1, "hidden": 32, "heads": 2, "bottleneck": 16})
    params["train"]["datasets"] = {"owt": {}, "wmt14": {}}
    params["sample"]["samplers"] = {k: v for k, v in params["sample"]["samplers"].items() if k in params["datasets"]}
    params["compare"] = {"datasets": {"owt": {"max_length": 40}, "wmt14": {}},
                         "train": {"owt": {"steps": 3}, "wmt14": {"steps": 2}},
                         "elf_steps": [2, 4], "mdlm_steps": [4, 64], "num_samples": 3, "batch_size": 3, "seeds": [0, 1]}
    root = tmp_path_factory.mktemp("compare")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with inside(root), mlflow_store_in(root):
        for args in (["prepare", "owt"], ["prepare", "wmt14"], ["tokenizer"], ["tokenize", "owt"],
                     ["tokenize", "wmt14"], ["encoder"]):
            assert main(args) == 0, args
        assert main(["compare"]) == 0
    return root


def test_compare_trains_every_family_to_elf_flops_and_writes_table_and_plot(project):
    results = json.loads((project / "compare" / "results.json").read_text())
    owt, wmt14 = results["datasets"]["owt"], results["datasets"]["wmt14"]
    assert owt["max_length"] == 40 and set(owt["training"]) == {"elf", "mdlm", "ar"}
    budget = owt["training"]["elf"]["flops"]
    for family, record in owt["training"].items():  # within half a step of ELF's FLOPs
        assert abs(record["flops"] - budget) <= 0.5 * record["flops_per_step"], family
        assert (project / "compare" / "models" / "owt" / family / "model" / "config.json").is_file()
    assert owt["training"]["elf"]["steps"] == 3 and owt["training"]["elf"]["flops_per_step"] > max(
        owt["training"]["mdlm"]["flops_per_step"], owt["training"]["ar"]["flops_per_step"])  # ELF's no-grad passes
    samplers = {(r["family"], r["sampler"]): r for r in owt["rows"]}
    assert set(samplers) == {("elf", "sde-2"), ("elf", "sde-4"), ("mdlm", "mdlm-4"), ("mdlm", "mdlm-64"),
                             ("ar", "ar")}
    for row in owt["rows"]:
        assert row["oracle_ppl_floored"] > 1 and 0 <= row["oracle_finite_fraction"] <= 1 and row["nfe"] >= 1
        assert row["oracle_ppl_floored_se"] is not None and row["matched_entropy"] in (True, False)
    assert samplers[("elf", "sde-4")]["nfe"] == 5 and samplers[("ar", "ar")]["nfe"] <= 40
    assert owt["reference"]["oracle_finite_fraction"] == 1.0
    assert {(r["family"], r["sampler"]) for r in wmt14["rows"]} == {
        ("elf", "ode-2"), ("elf", "ode-4"), ("mdlm", "mdlm-4"), ("mdlm", "mdlm-64"), ("ar", "ar-greedy")}
    assert all(r["bleu"] is not None for r in wmt14["rows"])
    table = (project / "compare" / "table.md").read_text()
    assert "| mdlm | mdlm-64 |" in table and "| ar | ar-greedy |" in table and "Ordering" in table
    assert (project / "compare" / "compare.png").stat().st_size > 0
    import mlflow

    with mlflow_store_in(project):
        run = mlflow.search_runs(experiment_names=["elf-compare"], output_format="list")[0]
    assert run.data.metrics["owt/mdlm/mdlm-64/oracle_ppl_floored"] == pytest.approx(
        samplers[("mdlm", "mdlm-64")]["oracle_ppl_floored"])
    assert all(record["minutes"] is not None for record in owt["training"].values())


def test_compare_again_resumes_instead_of_retraining(project):
    before = (project / "compare" / "models" / "owt" / "mdlm" / "model" / "model.safetensors").read_bytes()
    with inside(project), mlflow_store_in(project):
        assert main(["compare"]) == 0
    after = (project / "compare" / "models" / "owt" / "mdlm" / "model" / "model.safetensors").read_bytes()
    assert before == after


def test_equal_compute_steps_and_ordering_rules():
    assert equal_compute_steps(100, {"elf": 3.0, "mdlm": 2.0, "ar": 4.0}) == {"elf": 100, "mdlm": 150, "ar": 75}
    rows = [{"family": "elf", "sampler": "sde-32", "steps": 32, "oracle_ppl_floored": 9.0, "matched_entropy": True},
            {"family": "elf", "sampler": "sde-64", "steps": 64, "oracle_ppl_floored": 5.0, "matched_entropy": True},
            {"family": "mdlm", "sampler": "mdlm-128", "steps": 128, "oracle_ppl_floored": 12.0,
             "matched_entropy": True}]
    verdict = ordering(rows)
    assert verdict["holds"] is True and verdict["elf"] == "sde-32" and verdict["ratio"] == pytest.approx(12 / 9)
    rows.insert(0, {"family": "elf", "sampler": "sde-8", "steps": 8, "oracle_ppl_floored": 3.0,
                    "matched_entropy": False})  # repetitive: the lowest perplexity, but no evidence
    assert ordering(rows)["elf"] == "sde-32"
    rows[-1]["matched_entropy"] = False  # a low-entropy MDLM is no evidence either way
    assert ordering(rows)["holds"] is None
