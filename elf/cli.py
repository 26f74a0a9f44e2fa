"""The `elf` command: one subcommand per pipeline stage, plus `elf config`.

Each stage is a thin command over the library; `dvc.yaml` calls exactly these commands, so a stage runs
the same by hand, under `dvc repro` or inside a Prefect flow. Paths follow the layout in README.md,
relative to the working directory (the repository root). Bad input exits with status 2 and one line
on stderr.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from elf.errors import EXIT_BAD_INPUT, ElfError, describe_os_error, os_error_exit_code
from elf.families import SAMPLER_FAMILY

RAW_DIR = Path("data/raw")
TOKENIZER_DIR = Path("data/tokenizer")
TOKENS_DIR = Path("data/tokens")
ENCODER_DIR = Path("data/encoder")
EMBEDDINGS_DIR = Path("data/embeddings")
JUDGE_DIR = Path("data/judge")
MODELS_DIR = Path("models")
METRICS_DIR = Path("metrics")
SAMPLES_DIR = Path("samples")


def _prepare(args, config) -> None:
    from elf.data.prepare import prepare_dataset

    dataset = config.dataset(args.dataset)
    counts = prepare_dataset(args.dataset, dataset, config.seed, RAW_DIR / args.dataset)
    print(f"prepare {args.dataset}: " + ", ".join(f"{s} {n} rows" for s, n in counts.items()))


def _tokenizer(args, config) -> None:
    from elf.data.tokenizer import build_tokenizer, training_texts

    settings = config.tokenizer
    texts = None
    if settings.kind == "train":
        raw_files = {}
        for name, dataset in config.datasets.items():
            path = RAW_DIR / name / "train.parquet"
            if not path.exists():
                raise ElfError(f"{path}: file not found (run `elf prepare {name}` first)")
            raw_files[name] = (path, dataset.columns)
        texts = training_texts(raw_files, settings.max_texts_per_dataset)
    digest = build_tokenizer(settings.kind, settings.pretrained, settings.vocab_size, texts, TOKENIZER_DIR,
                             algorithm=settings.algorithm)
    print(f"tokenizer: {TOKENIZER_DIR} (sha256 {digest[:12]})")


def _tokenize(args, config) -> None:
    from elf.data.tokens import tokenize_dataset

    dataset = config.dataset(args.dataset)
    manifests = tokenize_dataset(args.dataset, dataset, config.tokenize, RAW_DIR / args.dataset,
                                 TOKENIZER_DIR, TOKENS_DIR / args.dataset)
    for split, m in manifests.items():
        print(f"tokenize {args.dataset}/{split}: {m['rows']} rows, {m['tokens']} tokens, "
              f"{m['skipped_empty']} empty rows skipped, {len(m['shards'])} shard(s)")


def _encoder(args, config) -> None:
    import itertools

    from elf import encoders
    from elf.data.shards import iter_column
    from elf.data.tokenizer import load_tokenizer, tokenizer_hash

    settings = config.encoder
    vocab_size = len(load_tokenizer(TOKENIZER_DIR))
    tok_hash = tokenizer_hash(TOKENIZER_DIR)
    if settings.kind == "pretrained":
        encoder = encoders.load_pretrained_encoder(settings.pretrained, vocab_size=vocab_size)
    elif settings.kind == "gaussian":
        encoder = encoders.gaussian_encoder(vocab_size, settings.gaussian_dim, config.seed)
    else:
        from elf.scratch_encoder import train_scratch_encoder
        from elf.tracking import mlflow_run

        scratch = settings.scratch
        rows = []
        for name, dataset in config.datasets.items():
            for column in ("input_ids",) if dataset.task == "lm" else ("source_ids", "target_ids"):
                column_rows = iter_column(TOKENS_DIR / name / "train", column)
                rows += itertools.islice(column_rows, scratch.max_rows_per_dataset)
        with mlflow_run("elf-encoder", "scratch-encoder", params={"encoder": settings.model_dump()}) as run:
            import mlflow

            encoder, losses = train_scratch_encoder(
                rows, vocab_size, scratch.d_model, scratch.num_layers, scratch.num_heads, scratch.d_ff,
                scratch.steps, scratch.batch_size, scratch.max_length, scratch.lr, config.seed,
                log_fn=lambda step, loss: mlflow.log_metric("span_corruption_loss", loss, step=step),
            )
            encoder.info["mlflow_run_id"] = run.info.run_id
        print(f"encoder: span-corruption loss {losses[0]:.3f} → {losses[-1]:.3f} over {len(losses)} steps")
    encoders.save_encoder(encoder, ENCODER_DIR, tok_hash)
    print(f"encoder: {settings.kind}, dim {encoder.dim} → {ENCODER_DIR}")


def _embed(args, config) -> None:
    from elf.data.embed import embed_dataset

    config.dataset(args.dataset)
    manifests = embed_dataset(TOKENS_DIR / args.dataset, ENCODER_DIR, EMBEDDINGS_DIR / args.dataset,
                              cache=config.embed.cache[args.dataset], batch_size=config.embed.batch_size)
    for split, m in manifests.items():
        state = f"{m['rows']} rows, {m['tokens']} tokens, {m['bytes'] / 2**20:.1f} MiB" if m.get("cached") else \
            "not cached (training encodes online)"
        print(f"embed {args.dataset}/{split}: {state}")


def _judge(args, config) -> None:
    from elf.judge import TRAINED, train_judge

    dataset = config.dataset(args.dataset)
    record = train_judge(args.dataset, dataset.task, dataset.max_length, TOKENS_DIR / args.dataset, TOKENIZER_DIR,
                         JUDGE_DIR / args.dataset, config.evaluate.trained_judge, config.seed,
                         wanted=config.evaluate.judge == TRAINED)
    if record["trained"]:
        print(f"judge {args.dataset}: {record['parameters']:,} parameters on {record['train_rows']} rows, perplexity "
              f"{record['train_ppl']:.3g} (train), {record['validation_ppl'] or float('nan'):.3g} (validation) "
              f"→ {JUDGE_DIR / args.dataset}")
    else:
        print(f"judge {args.dataset}: none trained ({record['reason']})")


def _train(args, config) -> int | None:
    from elf.distributed import LAUNCHED_ENV, launch_torchrun, resolve_nproc
    from elf.files import read_json
    from elf.train import TrainPaths, train

    dataset = config.dataset(args.dataset)
    nproc = resolve_nproc(config.train.for_dataset(args.dataset).nproc_per_node)
    if nproc > 1 and LAUNCHED_ENV not in os.environ:  # train.*.nproc_per_node: one worker per GPU
        print(f"train {args.dataset}: launching torchrun --standalone --nproc-per-node {nproc}", flush=True)
        return launch_torchrun(nproc, args.argv)
    embeddings = EMBEDDINGS_DIR / args.dataset / "train"
    cached = read_json(embeddings / "manifest.json", "embeddings manifest").get("cached", False)
    paths = TrainPaths(tokens=TOKENS_DIR / args.dataset / "train", embeddings=embeddings if cached else None,
                       encoder=ENCODER_DIR, tokenizer=TOKENIZER_DIR, out=MODELS_DIR / args.dataset,
                       metrics=METRICS_DIR / args.dataset)
    train(args.dataset, dataset, config.train.for_dataset(args.dataset), config.seed, paths,
          stop_after=args.stop_after)


def _compare(args, config) -> None:
    from elf.compare import ComparePaths, run_compare

    root = Path("compare")
    run_compare(config, ComparePaths(root=root, tokenizer=TOKENIZER_DIR, encoder=ENCODER_DIR, judges=JUDGE_DIR))
    print(f"compare: {root / 'table.md'}, {root / 'compare.png'}, {root / 'results.json'}")


def _sample(args, config) -> None:
    from elf.generation import sample_dataset

    if args.dataset is None:
        raise ElfError("elf sample: give a dataset (the stage) or --model DIR (print a few samples)")
    flags = [f"--{name.replace('_', '-')}" for name in SAMPLE_FLAGS if getattr(args, name) not in (None, False)]
    if flags:
        raise ElfError(f"elf sample {args.dataset}: {', '.join(flags)} apply with --model DIR only (the stage samples "
                       f"with sample.samplers.{args.dataset} in params.yaml)")
    dataset = config.dataset(args.dataset)
    count, speeds = sample_dataset(args.dataset, dataset, config.sample, MODELS_DIR / args.dataset / "model",
                                   TOKENS_DIR / args.dataset, RAW_DIR / args.dataset,
                                   SAMPLES_DIR / f"{args.dataset}.jsonl")
    run_id_file = MODELS_DIR / args.dataset / "mlflow_run_id"
    if run_id_file.is_file():  # the speed goes to the training's MLflow run, not into the DVC-tracked samples
        import mlflow

        from elf.tracking import mlflow_run

        with mlflow_run(f"elf-{args.dataset}", "", run_id=run_id_file.read_text().strip()):
            mlflow.log_metrics({f"sample/{sampler}/samples_per_s": round(v, 3) for sampler, v in speeds.items()})
    print(f"sample {args.dataset}: {count} rows → {SAMPLES_DIR / f'{args.dataset}.jsonl'}")


def _sample_from_model(args) -> None:
    """`elf sample --model DIR`: a few samples of a model directory, from anywhere (no project needed)."""
    import json

    from elf.pretrained import ELFPipeline

    if args.dataset is not None:
        raise ElfError(f"elf sample: give a dataset (the stage) or --model DIR, not both (got {args.dataset!r})")
    pipeline = ELFPipeline.load(args.model, _gpu_or_cpu())
    sampler = {k: getattr(args, k) for k in ("kind", "steps", "gamma", "guidance", "cfg_scale")}
    try:
        texts = pipeline.generate(args.num, source=args.source, seed=args.seed, **sampler)
    except ElfError as error:
        raise ElfError(f"{args.model}: {error}") from None
    settings = pipeline.sampler(**sampler).to_dict()
    for i, text in enumerate(texts):
        print(json.dumps({"index": i, "text": text, "source": args.source, "sampler": settings}, ensure_ascii=False)
              if args.json else f"[{i}] {text}")


def _evaluate(args, config) -> None:
    from elf.data.shards import read_manifest
    from elf.data.tokenizer import load_tokenizer
    from elf.data.tokens import FORMAT as TOKENS_FORMAT
    from elf.evaluate import evaluate_dataset, log_report

    dataset = config.dataset(args.dataset)
    metrics_dir = METRICS_DIR / args.dataset
    samples = SAMPLES_DIR / f"{args.dataset}.jsonl"
    # How the model's rows were packed (the oracle scores a sample as they were): what the data says, not
    # what params.yaml says now.
    packing = read_manifest(TOKENS_DIR / args.dataset / "train", TOKENS_FORMAT)["packing"]
    report = evaluate_dataset(args.dataset, dataset, config.evaluate, samples, RAW_DIR / args.dataset,
                              load_tokenizer(TOKENIZER_DIR), metrics_dir, packing=packing,
                              tokens_dir=TOKENS_DIR / args.dataset, judge_dir=JUDGE_DIR / args.dataset)
    run_id_file = MODELS_DIR / args.dataset / "mlflow_run_id"
    if run_id_file.is_file():
        from elf.tracking import mlflow_run, register_candidate

        run_id = run_id_file.read_text().strip()
        from elf.files import read_json

        model_dir = MODELS_DIR / args.dataset / "model"
        with mlflow_run(f"elf-{args.dataset}", "", run_id=run_id) as run:
            if run.info.run_id != run_id:  # the store lacks the training's run (a warning said so): log the
                from elf.mlflow_model import log_pyfunc_model  # model here, so that the version has its copy

                run_id = run.info.run_id
                log_pyfunc_model(model_dir, dataset.task)
            log_report(report, run_id, samples, metrics_dir / "eval_quality.png",
                       step=read_json(model_dir / "config.json", "model config")["step"])
        if config.evaluate.register_model:
            primary = report["primary"]
            selection, metric = report["selection"], primary["metric"]
            if metric == "gen_ppl":  # comparable under the same judge only: a champion judged otherwise has none
                import re

                metric = "gen_ppl/" + re.sub(r"[^\w\-. ]", "_", report["judge"]["id"])  # an MLflow tag name
            decision = register_candidate(f"elf-{args.dataset}", run_id, "model", metric,
                                          primary["value"], primary["higher_is_better"],
                                          not_ranked=None if selection["eligible"] else selection["reason"])
            print(f"registry: {decision['model']} v{decision['version']} is candidate; {decision['reason']}"
                  f"{' → champion' if decision['champion_moved'] else ''}")
    primary = report["primary"]
    print(f"evaluate {args.dataset}: {primary['metric']} = {primary['value']} ({primary['sampler']}); "
          f"{report['selection']['reason']}")


def _config(args, config_path: str) -> None:
    import yaml

    from elf.config import apply_preset, available_presets, load_config

    if args.action == "apply":
        apply_preset(args.preset, config_path)
        print(f"{config_path}: applied preset '{args.preset}'; run `dvc repro` to rebuild what changed")
    elif args.action == "presets":
        print("\n".join(available_presets()))
    else:
        config = load_config(config_path)
        if args.action == "show":
            print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")
        else:
            print(f"{config_path}: ok")


def _quiet_off_a_terminal() -> None:
    """No progress bars in logs: ours check elf.runtime.on_terminal; MLflow's artifact transfers are told here."""
    from elf.runtime import on_terminal

    if not on_terminal():
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _check_dvc_lock() -> None:
    """Every stage: advise if dvc.lock was broken by a kill, else keep it as the last good copy (elf/lockfile.py).
    The launcher of torchrun workers has done it; they do not repeat it."""
    from elf.distributed import LAUNCHED_ENV
    from elf.lockfile import warn_if_broken

    if LAUNCHED_ENV in os.environ:
        return
    warning = warn_if_broken(Path.cwd())
    if warning:
        print(warning, file=sys.stderr)


def _lock(args) -> int:
    from elf.lockfile import lock_problem, repair, save_good_copy

    project = Path.cwd()
    if args.action == "check":
        problem = lock_problem(project)
        if problem:
            print(f"{project / 'dvc.lock'}: {problem}; `elf lock repair` restores the last good copy", file=sys.stderr)
            return 1
        print(f"{project / 'dvc.lock'}: ok")
    elif args.action == "repair":
        notice = repair(project)
        print(notice or f"{project / 'dvc.lock'}: ok, nothing to repair")
    else:
        print(f"{project / 'dvc.lock'}: {'saved as the good copy' if save_good_copy(project) else 'not saved'}")
    return 0


def _fail(message: str, code: int) -> int:
    """Print the one-line error, leave the code for a torchrun launcher, and return it."""
    from elf.distributed import record_worker_exit

    print(f"error: {message}", file=sys.stderr)
    record_worker_exit(code)
    return code


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1 (got {text!r})")
    return int(text)


def _gpu_or_cpu():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in one line (and exit code 2, bad input), like every other error of `elf`."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")


STAGE_HELP = {  # name: (one line for `elf --help`, what `elf <stage> --help` adds: settings read, outputs)
    "prepare": ("raw text of a dataset → data/raw/<dataset>/<split>.parquet",
                "Reads datasets.<dataset> (source: demo | hub | files) and seed. A split without one row that has "
                "text in every column is an error."),
    "tokenizer": ("train or copy the tokenizer → data/tokenizer/",
                  "Reads tokenizer (kind train: on the raw training text of every dataset; kind pretrained: "
                  "copies e.g. t5-small)."),
    "tokenize": ("raw text → token shards in data/tokens/<dataset>/<split>/",
                 "Reads tokenize (packing, batch_size, workers, shard_rows) and datasets.<dataset> (lengths)."),
    "encoder": ("build the frozen encoder → data/encoder/",
                "Reads encoder (kind pretrained | scratch | gaussian) and seed."),
    "embed": ("cache per-token embeddings → data/embeddings/<dataset>/<split>/",
              "Reads embed.cache.<dataset> and embed.batch_size. Finished shards survive a kill."),
    "train": ("train (or resume) the model of a dataset → models/<dataset>/",
              "Reads train.defaults with train.datasets.<dataset> over them (family: elf, or the baselines mdlm "
              "and ar), and seed. Resumes from the newest "
              "checkpoint; with train.*.nproc_per_node > 1 (or auto) it launches torchrun. Writes the "
              "standalone model directory models/<dataset>/model/, metrics/<dataset>/train.json, "
              "train_history.csv and validation_history.csv (the held-out loss every train.*.validation.every "
              "steps)."),
    "sample": ("sample with every configured sampler → samples/<dataset>.jsonl; or print a few samples of a model "
               "(--model DIR)",
               "The stage (a dataset given) reads sample.samplers.<dataset>, sample.seeds, num_samples and "
               "batch_size. With --model DIR it needs no project: the flags below choose the sampler, "
               "defaulting to the paper's for the model's task (lm: SDE 32 steps, γ 1.5, w 3; seq2seq: ODE 64 "
               "steps, w 1, ω 2)."),
    "judge": ("train the Gen PPL judge of an lm dataset → data/judge/<dataset>/ (when evaluate.judge is trained)",
              "A small GPT-2 trained on the dataset's training rows with the project's tokenizer; its own "
              "perplexity on the validation rows goes to judge.json. Reads evaluate.judge, "
              "evaluate.trained_judge and seed."),
    "evaluate": ("score samples → metrics/<dataset>/eval.json, MLflow, registry",
                 "Reads evaluate (judge, primary_metric, register_model): metrics as mean ± SE over the seeds, "
                 "the primary one also in headline.json, one row per sampler in samplers.csv."),
    "compare": ("train ELF, MDLM and AR to equal training FLOPs and score them alike → compare/",
                "Reads compare (datasets and their changes, ELF's training, sampler steps, samples, seeds), and the "
                "pipeline's data/tokenizer and data/encoder (`dvc repro encoder`). Writes compare/table.md, "
                "compare/compare.png, compare/results.json; models and data under compare/. Resumes after a kill."),
    "lock": ("check or repair dvc.lock after a kill during DVC's write",
             "check: exit 1 if dvc.lock is empty, unparseable or cut short; repair: restore the last good copy "
             "(.dvc/tmp); save: keep the current dvc.lock as the good copy."),
    "config": ("check, show or switch the configuration (presets)", "Presets live in elf/presets/."),
}
DATASET_HELP = "a dataset named in params.yaml (e.g. owt, wmt14, xsum)"
SAMPLE_FLAGS = ("kind", "steps", "gamma", "guidance", "cfg_scale", "source", "json")  # for `sample --model` only


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="elf", description="ELF (Embedded Language Flows) pipeline stages. Exit codes: 0 ok, "
                     "2 bad input, 3 the machine refuses the work (disk full, read-only), 75 a passing OS error.")
    parser.add_argument("--params", default="params.yaml", help="the parameter file (default: params.yaml)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="<stage>")

    def add(name: str, run, dataset: bool | None = True) -> argparse.ArgumentParser:
        summary, details = STAGE_HELP[name]
        stage = commands.add_parser(name, help=summary, description=f"{summary}. {details}")
        if dataset is not None:
            stage.add_argument("dataset", help=DATASET_HELP, **({} if dataset else {"nargs": "?"}))
        stage.set_defaults(run=run)
        return stage

    add("prepare", _prepare)
    add("tokenizer", _tokenizer, dataset=None)
    add("tokenize", _tokenize)
    add("encoder", _encoder, dataset=None)
    add("embed", _embed)
    stage = add("train", _train)
    stage.add_argument("--stop-after", type=_positive_int, default=None, metavar="N",
                       help="stop after N more steps (checkpointed; the next run resumes)")
    stage = add("sample", _sample, dataset=False)
    stage.add_argument("--model", metavar="DIR", help="a trained model directory (e.g. models/owt/model, or a copy "
                       "anywhere): print samples")
    stage.add_argument("--steps", type=_positive_int, help="denoising steps (lm 32, seq2seq 64)")
    stage.add_argument("--kind", choices=list(SAMPLER_FAMILY),
                       help="sampler (ELF: lm sde, seq2seq ode; mdlm; ar or ar_greedy)")
    stage.add_argument("--gamma", type=float, help="SDE re-injection strength γ (1.5)")
    stage.add_argument("--guidance", type=float, help="SC-CFG scale w (lm 3, seq2seq 1)")
    stage.add_argument("--cfg-scale", type=float, help="input-CFG scale ω of a conditional model (2)")
    stage.add_argument("--source", help="the source text of a conditional (seq2seq) model")
    stage.add_argument("-n", "--num", type=_positive_int, default=4, help="number of samples (default 4)")
    stage.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    stage.add_argument("--json", action="store_true", help="one JSON object per sample")
    add("compare", _compare, dataset=None)
    add("judge", _judge)
    add("evaluate", _evaluate)
    stage = add("lock", None, dataset=None)
    stage.add_argument("action", choices=["check", "repair", "save"])
    stage = add("config", None, dataset=None)
    actions = stage.add_subparsers(dest="action", required=True)
    actions.add_parser("check", help="validate params.yaml", description="Validate params.yaml: exit 2 and one "
                       "line naming the key on an error.")
    actions.add_parser("show", help="print the validated configuration with defaults filled in")
    actions.add_parser("presets", help="list the presets")
    apply = actions.add_parser("apply", help="overlay a preset onto params.yaml (e.g. `paper`, `demo`)")
    apply.add_argument("preset", help="a preset name (`elf config presets` lists them)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (elf/errors.py: 2 bad input, 3 fix the machine, 75 retry)."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    # Past the file-size limit a write then fails with EFBIG (reported below) instead of SIGXFSZ killing us.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        if args.command == "config":
            _config(args, args.params)
        elif args.command == "lock":
            return _lock(args)
        elif args.command == "sample" and args.model is not None:
            from elf.runtime import configure_device

            configure_device(_gpu_or_cpu())
            _sample_from_model(args)
        else:
            from elf.config import load_config
            from elf.runtime import configure_device, set_threads

            config = load_config(args.params)
            _quiet_off_a_terminal()
            _check_dvc_lock()
            set_threads(config.threads)
            configure_device(_gpu_or_cpu())
            code = args.run(args, config)
            if code:
                return code
    except ElfError as error:
        return _fail(str(error), error.exit_code)
    except Exception as error:
        from elf.files import os_errno

        number = os_errno(error)
        if number is None:
            raise  # a bug: the traceback is what its report needs
        return _fail(describe_os_error(number, getattr(error, "filename", None)), os_error_exit_code(number))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
