"""moescale command line: `moescale train ...`, `moescale presets`, `moescale study SPEC`, `moescale results DIR`,
`moescale report DIR`, `moescale analyze RUN...`, `moescale diagnose [RUN]`, `moescale config`, `moescale bench
implicit-bias`.

Bad input, and files moescale wrote that no longer read back, exit with code 2 and a one-line message naming the
field or file; nothing in an existing run directory is overwritten unless --resume or --force says so. An
unexpected error is one line too, exit 1; --debug (anywhere on the line) shows its traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path

from moescale.config import DATASET_MODES, moe_names
from moescale.presets import DEFAULT_PRESET


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train an agent: JAX-native environments in one compiled program, Atari and "
                       "gym:<id> environments on host threads with a device learner")
    p.add_argument("--preset", help=f"preset name (see `moescale presets`; default {DEFAULT_PRESET})")
    p.add_argument("--env", help="environment, e.g. Breakout-MinAtar, CartPole-v1 (compiled trainer); Pong, a game "
                   "list (atari20, atari100k, atari57) or gym:<id> (host trainer)")
    p.add_argument("--moe", choices=moe_names(), help="penultimate layer")
    p.add_argument("--experts", type=int, help="number of experts (MoE) or width multiplier (dense)")
    p.add_argument("--seeds", type=int, help="seeds trained together in one program")
    p.add_argument("--steps", type=int, help="agent steps per seed, trained in whole iterations (below the "
                   "preset's iteration_steps, one iteration of --steps)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set agent.learning_rate=1e-4 --set network.k=2 "
                        "(`moescale config --preset P` lists every field with its description)")
    p.add_argument("--out", type=Path, help="run directory")
    p.add_argument("--log", action="append", metavar="NAME",
                   help="log every iteration's metrics live: tensorboard (RUN_DIR/tensorboard) or wandb (offline "
                        "unless WANDB_MODE says otherwise); repeat or comma-separate for both (the log extra)")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its last checkpoint, with its stored config (--steps "
                        "may raise its budget)")
    p.add_argument("--force", action="store_true", help="replace whatever --out holds")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-collapse-check", action="store_true",
                   help="skip the check at start that an MoE layer is not collapsed (moescale diagnose; seconds)")
    p.add_argument("--no-autotune", action="store_true",
                   help="seed_layout auto: take the untimed default (unroll on CPU, vmap on accelerators) instead of "
                        "timing the candidate layouts on this machine (seconds, cached per machine)")
    p.add_argument("--record-dataset", action="store_true",
                   help="also write every transition to RUN_DIR/dataset (offline-RL format, moescale.data)")
    p.add_argument("--dataset", type=Path, metavar="PATH",
                   help="train offline from a recorded dataset (e.g. RUN_DIR/dataset); --steps then counts "
                        "training steps")
    p.add_argument("--subset", metavar="FRACTION", help="part of the dataset to train on: 10%% or 0.1 (default all)")
    p.add_argument("--subset-mode", choices=DATASET_MODES,
                   help="which part: the first, the last or a uniform sample of the transitions (default first)")


def parse_fraction(text: str) -> float:
    """"10%" -> 0.1, "0.25" -> 0.25; ValueError naming --subset otherwise."""
    body = text.strip()
    try:
        value = float(body[:-1]) / 100 if body.endswith("%") else float(body)
    except ValueError:
        raise ValueError(f"--subset={text!r}: must be a percentage like 10% or a fraction like 0.1") from None
    if not 0 < value <= 1:
        raise ValueError(f"--subset={text!r}: must be in (0%, 100%]")
    return value


def _build_config(args: argparse.Namespace):
    from moescale.presets import config_from_options

    return config_from_options(args.preset, args.env or None, args.moe, args.experts, args.seeds, args.steps,
                               args.dataset, None if args.subset is None else parse_fraction(args.subset),
                               args.subset_mode, args.set,
                               None if getattr(args, "log", None) is None else ",".join(args.log))


def whole_iterations_note(config) -> str | None:
    """A one-line note when `config.steps` is not a whole number of iterations (the run trains more)."""
    trained = config.iterations * config.iteration_steps
    if trained == config.steps:
        return None
    return (f"note: steps={config.steps} is not a multiple of iteration_steps={config.iteration_steps}; the run "
            f"trains whole iterations: {trained} steps per seed")


RESUME_CONFLICTS = ("preset", "env", "moe", "experts", "seeds", "set", "out", "force", "dataset", "subset",
                    "subset_mode", "log")


def _resume(args: argparse.Namespace) -> dict:
    """`moescale train --resume RUN_DIR [--steps N]`: the run goes on with its stored config, its budget raised to
    N agent steps per seed when --steps is given. Returns its summary."""
    from moescale.train.run import raise_budget, train

    given = [f"--{name.replace('_', '-')}" for name in RESUME_CONFLICTS
             if getattr(args, name) not in (None, False, [])]
    if given:
        raise ValueError(f"--resume: the run goes on with its stored config; {', '.join(given)} cannot change it "
                         "(only --steps, to raise its budget)")
    if args.steps is not None:
        _say_whole_iterations(raise_budget(args.resume, args.steps))
    return train(None, args.resume, resume=True, progress=not args.no_progress,
                 record_dataset=args.record_dataset)


def _new_run(args: argparse.Namespace) -> dict:
    """`moescale train --out RUN_DIR ...`: a new run of the config the flags give. Returns its summary."""
    from moescale.presets import OFFLINE_PRESETS
    from moescale.train.run import train

    if args.out is None:
        raise ValueError("--out: required (or --resume RUN_DIR)")
    config = _build_config(args)
    if config.preset in OFFLINE_PRESETS and config.dataset is None:
        raise ValueError(f"--dataset: preset {config.preset} trains offline; give --dataset PATH (a recorded "
                         "dataset, e.g. RUN_DIR/dataset from --record-dataset)")
    _check_env(config)
    _say_whole_iterations(config)
    if not args.no_collapse_check:
        from moescale.analysis.diagnose import collapse_warning

        warning = collapse_warning(config)
        if warning:
            print(f"moescale train: {warning}", file=sys.stderr)
    return train(config, args.out, force=args.force, progress=not args.no_progress,
                 record_dataset=args.record_dataset, autotune=not args.no_autotune)


def _check_env(config) -> None:
    """An unknown environment, or a network it cannot take, fails before any work."""
    from moescale.envs import ENV_NAMES, make_env
    from moescale.envs.host import check_host_env_name, check_host_network

    if config.env in ENV_NAMES:
        make_env(config.env, config.sticky_prob, config.max_episode_steps)
    else:
        check_host_env_name(config.env)
        check_host_network(config.env, config.network, config.sticky_prob)


def _say_whole_iterations(config) -> None:
    note = whole_iterations_note(config)
    if note:
        print(f"moescale train: {note}", file=sys.stderr)


def cmd_train(args: argparse.Namespace) -> int:
    from moescale.train.run import RunError

    try:
        summary = _resume(args) if args.resume is not None else _new_run(args)
    except RunError as e:
        print(f"moescale train: {e}", file=sys.stderr)
        return 2
    print_summary(summary)
    return 0


def print_summary(summary: dict) -> None:
    """The main fields of a run's summary, as JSON on stdout."""
    keys = ("env", "moe", "experts", "seeds", "agent_steps", "mean_final_eval_return", "agent_steps_per_second",
            "compile_seconds", "wall_seconds")
    if summary["offline"] is not None:
        keys += ("offline",)
    print(json.dumps({k: summary[k] for k in keys}, indent=2))


def cmd_config(args: argparse.Namespace) -> int:
    from moescale.config_docs import annotated_yaml

    print(annotated_yaml(_build_config(args)))
    return 0


def _config_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="print the resolved config a preset and overrides give, as YAML with each "
                       "field's description (what --set takes)")
    p.add_argument("--preset", help=f"preset name (default {DEFAULT_PRESET})")
    p.add_argument("--env", help="environment (default: the preset's)")
    p.add_argument("--moe", choices=moe_names(), help="penultimate layer")
    p.add_argument("--experts", type=int, help="number of experts (MoE) or width multiplier (dense)")
    p.add_argument("--seeds", type=int, help="seeds trained together")
    p.add_argument("--steps", type=int, help="agent steps per seed")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set agent.learning_rate=1e-4")
    p.set_defaults(dataset=None, subset=None, subset_mode=None)


def cmd_presets(_: argparse.Namespace) -> int:
    from moescale.networks import describe_network
    from moescale.presets import PRESETS

    width = max(len(n) for n in PRESETS)
    for name, (line, make) in PRESETS.items():
        print(f"{name:<{width}}  {line}; network: {describe_network(make().network)}")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from moescale.study.runner import estimate, format_estimate, format_plan, plan, prepare_study_dir, run_study
    from moescale.study.spec import load_spec
    from moescale.train.rundir import check_out_dir

    spec = load_spec(args.spec)
    if args.dry_run:
        check_out_dir("--out", args.out)  # a run checks it in prepare_study_dir (write=True)
        if (args.out / "study.json").exists():
            prepare_study_dir(spec, args.out, write=False)  # only checks that the directory holds this spec
        rows = plan(spec, args.out if (args.out / "study.json").exists() else None)
        print(format_plan(rows), flush=True)
        print(format_estimate(rows, estimate(spec, rows, progress=not args.no_progress)))
        return 0
    statuses = run_study(spec, args.out, progress=not args.no_progress, retry_failed=args.retry_failed,
                         executor=args.executor, address=args.address, cpus_per_run=args.cpus_per_run,
                         gpus_per_run=args.gpus_per_run)
    failed = [name for name, status in statuses.items() if status == "failed"]
    print(f"{len(statuses) - len(failed)} of {len(statuses)} run groups done; results in "
          f"{args.out / 'results.parquet'}")
    for name in failed:
        error = json.loads((args.out / "runs" / name / "error.json").read_text())["error"]
        print(f"failed: {name}: {error}", file=sys.stderr)
    return 1 if failed else 0


def cmd_results(args: argparse.Namespace) -> int:
    from moescale.study.results import format_results

    print(format_results(args.study))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from moescale.study.report import report_study

    path = report_study(args.study, reps=args.reps)
    print(f"report written to {path}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from moescale.analysis.analyze import AnalysisError, analyze_run, expert_subset_eval, plot_metrics, short_labels
    from moescale.train.rundir import check_out_dir

    if len(args.runs) > 1 and args.out is None:
        raise ValueError("--out: required with several runs (the directory of the comparison figure)")
    if args.out is not None:
        check_out_dir("--out", args.out)
    for name, value in (("--batch", args.batch), ("--episodes", args.episodes)):
        if value is not None and value < 1:
            raise ValueError(f"{name}={value}: must be a positive int")
    try:
        runs = {}
        for run in args.runs:
            runs[run] = analyze_run(run, batch=args.batch, progress=not args.no_progress)
            print(f"{run}: {len(runs[run])} rows -> {run / 'analysis.parquet'}, {run / 'analysis.png'}")
            if args.expert_subset:
                found = expert_subset_eval(run, episodes=args.episodes, batch=args.batch,
                                           renormalize=args.renormalize, progress=not args.no_progress)
                print(_format_subsets(found))
                print(f"{run}: -> {run / 'expert_subset.json'}, {run / 'expert_subset.png'}")
    except AnalysisError as e:
        raise ValueError(str(e)) from None
    if len(args.runs) > 1:
        args.out.mkdir(parents=True, exist_ok=True)
        named = dict(zip(short_labels(list(runs)), runs.values(), strict=True))
        path = plot_metrics(named, args.out / "analysis_compare.png")
        print(f"comparison -> {path}")
    return 0


def _format_subsets(found: dict) -> str:
    lines = [f"{'k':>3} {'mode':>6} {'eval return':>12} {'agreement':>9} {'FLOPs saved':>11} {'ms (batch)':>10}"]
    for r in found["results"]:
        ms = f"{r['ms_batch']:.3f}" if "ms_batch" in r else "-"
        lines.append(f"{r['k']:>3} {r['mode']:>6} {r['mean_eval_return']:>12.2f} {r['mean_agreement']:>9.3f} "
                     f"{r['flops_saved']:>11.1%} {ms:>10}")
    return "\n".join(lines)


def cmd_bench(args: argparse.Namespace) -> int:
    from moescale.analysis.implicit_bias import run_implicit_bias
    from moescale.train.rundir import check_out_dir

    check_out_dir("--out", args.out)
    run_implicit_bias(args.out, quick=args.quick, seed=args.seed, progress=not args.no_progress)
    print(f"implicit-bias results -> {args.out / 'implicit_bias.md'}")
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    from moescale.analysis.analyze import AnalysisError
    from moescale.analysis.diagnose import diagnose_config, diagnose_run, format_diagnosis, write_diagnosis
    from moescale.train.rundir import check_out_dir

    given = [f"--{name}" for name in ("preset", "env", "moe", "experts", "seeds", "set")
             if getattr(args, name) not in (None, [])]
    if args.states < 2:
        raise ValueError(f"--states={args.states}: must be an int >= 2 (sensitivities are variances over states)")
    out = args.out if args.out is not None else (args.run if args.run is not None else Path.cwd())
    check_out_dir("--out", out)
    if args.run is not None:
        if given:
            raise ValueError(f"RUN_DIR: the run's own config is diagnosed; {', '.join(given)} cannot change it")
        try:
            found = diagnose_run(args.run, args.states)
        except AnalysisError as e:
            raise ValueError(str(e)) from None
    else:
        config = _build_config(args)
        _check_env(config)
        found = diagnose_config(config, args.states)
    print(format_diagnosis(found))
    print(f"\n-> {write_diagnosis(found, out)}")
    return 0


def _diagnose_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diagnose", help="is the penultimate layer collapsed? routing entropies, token spread, state "
                       "sensitivity of features and Q-values, next to the dense layer on the same encoder")
    p.add_argument("run", type=Path, nargs="?", metavar="RUN_DIR",
                   help="a run directory: every seed's newest parameters on states of its own policy; without it, "
                        "a new network (the train flags) at initialisation on states of the random policy")
    p.add_argument("--preset", help=f"preset name (default {DEFAULT_PRESET})")
    p.add_argument("--env", help="environment (default: the preset's)")
    p.add_argument("--moe", choices=moe_names(), help="penultimate layer")
    p.add_argument("--experts", type=int, help="number of experts (MoE) or width multiplier (dense)")
    p.add_argument("--seeds", type=int, help="seeds to initialise, as train would (default 1)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set network.residual=true")
    p.add_argument("--states", type=int, default=64, help="states per seed (default 64)")
    p.add_argument("--out", type=Path, help="where diagnose.json goes (default: RUN_DIR, or the current directory)")
    p.set_defaults(steps=None, dataset=None, subset=None, subset_mode=None)


def _analysis_parsers(sub: argparse._SubParsersAction) -> None:
    analyze = sub.add_parser("analyze", help="plasticity and routing metrics of runs over training; expert subsets")
    analyze.add_argument("runs", type=Path, nargs="+", metavar="RUN", help="run directories")
    analyze.add_argument("--out", type=Path, help="where the comparison figure of several runs goes")
    analyze.add_argument("--batch", type=int, default=256, help="held-out transitions per seed (default 256)")
    analyze.add_argument("--expert-subset", action="store_true",
                         help="also evaluate a Soft MoE agent keeping k = 1..E experts per input")
    analyze.add_argument("--episodes", type=int, help="evaluation episodes per seed and k (default: the run's)")
    analyze.add_argument("--renormalize", action="store_true",
                         help="renormalize the kept combine weights (default: kept as they are, as Chung et al.)")
    analyze.add_argument("--no-progress", action="store_true", help="no progress bars")
    bench = sub.add_parser("bench", help="built-in experiments: implicit-bias (supervised Soft MoE track)")
    bench.add_argument("name", choices=("implicit-bias",), help="which experiment")
    bench.add_argument("--out", type=Path, required=True, help="output directory")
    bench.add_argument("--quick", action="store_true", help="a few seconds' version (fewer sizes and steps)")
    bench.add_argument("--seed", type=int, default=0, help="seed of data split, init and training")
    bench.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moescale", description="MoE parameter scaling for value-based deep RL")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    sub.add_parser("presets", help="list presets, one line each")
    study = sub.add_parser("study", help="run a grid of runs from a spec (see moescale/study/spec.py)")
    study.add_argument("spec", type=Path, help="study spec, YAML")
    study.add_argument("--out", type=Path, required=True, help="study directory (resumed when it holds this spec)")
    study.add_argument("--dry-run", action="store_true", help="print the plan and an estimated time; run nothing")
    study.add_argument("--retry-failed", action="store_true", help="run failed run groups again")
    study.add_argument("--no-progress", action="store_true", help="no progress bars")
    study.add_argument("--executor", choices=("local", "ray"), default="local",
                       help="local: one run group after another in this process; ray: run groups as Ray tasks")
    study.add_argument("--address", default=None,
                       help="Ray cluster address (e.g. auto or ray://host:10001); default: a local instance")
    study.add_argument("--cpus-per-run", type=float, default=1.0, help="CPUs each Ray task asks for; on CPU its "
                       "runs spread their seeds over as many JAX devices (whole CPUs, at least one)")
    study.add_argument("--gpus-per-run", type=float, default=0.0, help="GPUs each Ray task asks for (0.25 shares)")
    results = sub.add_parser("results", help="print a study's results and rebuild results.parquet")
    results.add_argument("study", type=Path, help="study directory")
    report = sub.add_parser("report", help="write a study's report (markdown, HTML and figures) into STUDY/report")
    report.add_argument("study", type=Path, help="study directory")
    report.add_argument("--reps", type=int, default=2000, help="bootstrap resamples for the confidence intervals")
    _analysis_parsers(sub)
    _diagnose_parser(sub)
    _config_parser(sub)
    debug_help = "show the traceback of an unexpected error (without it: one line)"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    for command in sub.choices.values():  # SUPPRESS: `moescale --debug train` is not undone by train's default
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    args = parser.parse_args(argv)
    one_device_per_core()
    handler = {"train": cmd_train, "presets": cmd_presets, "study": cmd_study, "results": cmd_results,
               "report": cmd_report, "analyze": cmd_analyze, "bench": cmd_bench,
               "diagnose": cmd_diagnose, "config": cmd_config}[args.command]
    return _run_reporting_errors(handler, args)


def cpu_devices_default() -> int | None:
    """The JAX CPU device count moescale sets when none is: one per core this process may use, so that a run's
    seeds spread over the cores (config field `devices`; `seed_layout: auto` times one device against them,
    moescale.train.autotune): XLA:CPU runs one seed's small matmuls on little more than one core. None when
    JAX_NUM_CPU_DEVICES or XLA's host device count is set. Accelerators are not affected; their runs take the
    accelerator's devices."""
    if "JAX_NUM_CPU_DEVICES" in os.environ or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return None
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def one_device_per_core() -> None:
    """Set `cpu_devices_default` for JAX, unless JAX was imported already (its config has read the environment)."""
    count = cpu_devices_default()
    if count is not None and "jax" not in sys.modules:
        os.environ["JAX_NUM_CPU_DEVICES"] = str(count)


def _run_reporting_errors(handler, args: argparse.Namespace) -> int:
    """handler(args), its errors one line on stderr: bad input, damaged files and OS errors (a full disk, a
    path that cannot be written) exit 2, anything else 1; --debug raises instead (the traceback)."""
    from moescale.checks import RunError, one_line

    prefix = f"moescale {args.command}"
    try:
        return handler(args)
    except Exception as err:
        if args.debug:
            raise
        if isinstance(err, ValueError | RunError):
            print(f"{prefix}: {one_line(err)}", file=sys.stderr)
            return 2
        if isinstance(err, OSError):
            print(f"{prefix}: {_os_error(err, args)}", file=sys.stderr)
            return 2
        print(f"{prefix}: unexpected error: {type(err).__name__}: {one_line(err)} (--debug shows the traceback)",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130


def _os_error(err: OSError, args: argparse.Namespace) -> str:
    """An OS error in one line: the file (else the directory being written) and what went wrong, and for a full
    disk how to go on."""
    from moescale.checks import one_line

    written = getattr(args, "resume", None) or getattr(args, "out", None)  # the run or study directory
    target = err.filename or written
    where = f"{target}: " if target else ""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        again = {"train": f"moescale train --resume {written}",
                 "study": "the same command (the study resumes)"}.get(args.command, "the same command")
        return (f"{where}{err.strerror or 'No space left on device'}; free some, then run {again} (a run goes "
                "on from its newest checkpoint, whose files are verified)")
    return f"{where}{err.strerror or one_line(err)}"


if __name__ == "__main__":
    sys.exit(main())
