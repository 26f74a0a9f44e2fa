"""Model registry (real MLflow SQLite store): `candidate` follows every evaluation, `champion` only improvements."""

import json
import os

import mlflow
import pytest

from elf.mlflow_model import log_pyfunc_model
from elf.tracking import mlflow_run, register_candidate


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def logged_run(store, built):
    """A run with the tiny owt model logged as the train stage logs it (a pyfunc logged model)."""
    def log(name: str) -> str:
        with mlflow_run("elf-test", name) as run:
            log_pyfunc_model(built / "models/owt/model", "lm")
        return run.info.run_id
    return log


def aliases(name: str) -> dict[str, int]:
    client = mlflow.MlflowClient()
    model = client.get_registered_model(name)
    return {alias: int(version) for alias, version in model.aliases.items()}


def test_champion_moves_only_on_improvement(store, logged_run):
    decisions = []
    for i, ppl in enumerate([20.0, 25.0, 20.0, 15.0, None]):
        run_id = logged_run(f"run{i}")
        decisions.append(register_candidate("elf-owt", run_id, "model", "oracle_ppl", ppl, higher_is_better=False))
        assert aliases("elf-owt")["candidate"] == i + 1
    assert [d["champion_moved"] for d in decisions] == [True, False, False, True, False]
    assert decisions[0]["reason"] == "no champion yet"
    assert "does not beat champion v1" in decisions[2]["reason"]  # a tie keeps the champion
    assert aliases("elf-owt")["champion"] == 4
    client = mlflow.MlflowClient()
    version = client.get_model_version("elf-owt", "4")
    assert version.tags["oracle_ppl"] == "15.0" and "beats champion v1" in version.tags["champion_decision"]
    assert int(client.get_model_version_by_alias("elf-owt", "champion").version) == 4


def test_higher_is_better_metric(store, logged_run):
    first = register_candidate("elf-wmt14", logged_run("a"), "model", "bleu", 30.0, higher_is_better=True)
    second = register_candidate("elf-wmt14", logged_run("b"), "model", "bleu", 31.5, higher_is_better=True)
    assert first["champion_moved"] and second["champion_moved"]
    assert aliases("elf-wmt14") == {"candidate": 2, "champion": 2}
    client = mlflow.MlflowClient()
    run = client.get_run(client.get_model_version("elf-wmt14", "2").run_id)
    assert "bleu 31.5 beats champion v1" in run.data.tags["registry_decision"]


def test_the_champion_loads_with_mlflow_pyfunc_and_generates_text(store, logged_run):
    import pandas as pd

    register_candidate("elf-owt", logged_run("run0"), "model", "oracle_ppl", 9.0, higher_is_better=False)
    model = mlflow.pyfunc.load_model("models:/elf-owt@champion")
    texts = model.predict(pd.DataFrame({"source": ["", "", ""]}), params={"steps": 2, "seed": 1})
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert list(model.predict(pd.DataFrame({"source": ["", "", ""]}), params={"steps": 2, "seed": 1})) == list(texts)


def test_resuming_against_a_store_without_the_run_records_in_a_new_run(store, capsys):
    """A checkpoint's run id from another store (a fresh clone, a `dvc exp run --temp` workspace) must not crash."""
    with mlflow_run("elf-test", "train-owt", params={"lr": 0.002}, run_id="0" * 32) as run:
        pass
    assert run.info.run_id != "0" * 32 and "is not in" in capsys.readouterr().err
    assert mlflow.MlflowClient().get_run(run.info.run_id).data.params == {"lr": "0.002"}


def test_a_seq2seq_logged_model_predicts_one_text_per_source(store, built, tmp_path):
    import pandas as pd

    from tests.test_pretrained import seq2seq_model

    model_dir = seq2seq_model(built, tmp_path / "wmt14")
    with mlflow_run("elf-test", "train-wmt14") as run:
        log_pyfunc_model(model_dir, "seq2seq")
    register_candidate("elf-wmt14", run.info.run_id, "model", "bleu", 1.0, higher_is_better=True)
    model = mlflow.pyfunc.load_model("models:/elf-wmt14@champion")
    texts = model.predict(pd.DataFrame({"source": ["the cat sat", "a dog"]}), params={"steps": 2})
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_credentials_in_a_tracking_uri_are_used_but_never_printed(monkeypatch, tmp_path):
    """A server behind Basic auth is reachable with `user:password@` in MLFLOW_TRACKING_URI, and neither an error
    nor the flow's link artifact shows the password."""
    import base64
    import http.server
    import socket
    import threading

    from elf.errors import ElfError
    from elf.tracking import check_reachable, http_get, redact
    from flows.mlflow_links import mlflow_run_link

    expected = "Basic " + base64.b64encode(b"alice:s3cret").decode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(200 if self.headers.get("Authorization") == expected else 401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = f"http://alice:s3cret@127.0.0.1:{server.server_port}"
        assert redact(uri) == f"http://127.0.0.1:{server.server_port}"
        check_reachable(uri)
        assert http_get(f"{uri}/health", 5).status == 200  # 200 only because the credentials went into the header
    finally:
        server.shutdown()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"http://alice:s3cret@127.0.0.1:{probe.getsockname()[1]}"
    with pytest.raises(ElfError) as error:
        check_reachable(dead, timeout=1)
    assert "s3cret" not in str(error.value) and "alice" not in str(error.value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    (tmp_path / "models/owt").mkdir(parents=True)
    (tmp_path / "models/owt/mlflow_run_id").write_text("0" * 32)
    link = mlflow_run_link(tmp_path, "owt")
    assert "s3cret" not in json.dumps(link) and link["tracking_uri"] == redact(dead)


CONCURRENT_RUN = """
import sys
from elf.tracking import mlflow_run
with mlflow_run("elf-owt", "train-owt", params={"worker": sys.argv[1]}):
    pass
"""


def test_processes_starting_on_a_fresh_sqlite_store_at_once_all_succeed(tmp_path):
    """The first users of a fresh SQLite store create its tables; at once, unlocked, most of them failed."""
    import subprocess
    import sys

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns.db'}"}
    workers = [subprocess.Popen([sys.executable, "-c", CONCURRENT_RUN, str(i)], cwd=tmp_path, env=env,
                                stderr=subprocess.PIPE, text=True) for i in range(3)]
    results = [(w.wait(timeout=300), w.stderr.read()) for w in workers]
    assert all(code == 0 for code, _ in results), [err[-1500:] for code, err in results if code]
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("elf-owt")
    assert len(client.search_runs([experiment.experiment_id])) == 3


def test_a_model_that_is_not_ranked_never_becomes_champion(store, logged_run):
    first = register_candidate("elf-owt", logged_run("collapsed"), "model", "gen_ppl", 2.0, higher_is_better=False,
                               not_ranked="not ranked: distinct_2 0.02 < 0.5 × reference 0.35")
    assert not first["champion_moved"] and first["reason"].startswith("not ranked")  # not even as the first
    second = register_candidate("elf-owt", logged_run("real"), "model", "gen_ppl", 9.0, higher_is_better=False)
    third = register_candidate("elf-owt", logged_run("collapsed-again"), "model", "gen_ppl", 1.5,
                               higher_is_better=False, not_ranked="not ranked: entropy 0.1 < 0.5 × reference 2.7")
    assert second["champion_moved"] and not third["champion_moved"]
    assert aliases("elf-owt") == {"candidate": 3, "champion": 2}
    no_metric = register_candidate("elf-owt", logged_run("no-judge"), "model", None, None, higher_is_better=False)
    assert not no_metric["champion_moved"] and "no quality metric" in no_metric["reason"]
