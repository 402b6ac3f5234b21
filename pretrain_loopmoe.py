"""Pretrain a LoopMoE (or its Vanilla MoE / dense twins).

    python pretrain_loopmoe.py --config configs/tiny_loopmoe.yaml data.prefixes=data/demo_text_document
    torchrun --nproc-per-node 2 pretrain_loopmoe.py --config ... train.steps=100
    srun python pretrain_loopmoe.py --config ...      mpirun -n 2 python pretrain_loopmoe.py --config ...
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from loopmoe.config import ConfigError, load_config, save_config
from loopmoe.config_help import describe_fields


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="overrides are section.key=value; every section, field and default:\n\n" + describe_fields())
    ap.add_argument("--config", help="a YAML preset (configs/*.yaml); defaults apply to what it leaves out")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config (YAML, with each field's meaning) and exit")
    ap.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. train.steps=100 model.loop_iters=3")
    args, unknown = ap.parse_known_args(argv)
    if unknown:  # argparse alone says only "unrecognized arguments": name the form it expected
        flag = next((u for u in unknown if u.startswith("--") and "." in u.split("=", 1)[0]), None)
        hint = ""
        if flag is not None:
            key, _, value = flag[2:].partition("=")
            hint = f"; overrides are section.key=value, e.g. {key}={value or 'VALUE'} (no dashes)"
        ap.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    return args


def launcher_rank() -> int:
    """The launcher's rank before any process group exists (torchrun, mpirun, srun; 0 alone)."""
    env = os.environ
    return int(env.get("RANK") or env.get("OMPI_COMM_WORLD_RANK") or env.get("PMI_RANK") or env.get("SLURM_PROCID") or 0)


def say_once(line: str) -> None:
    """An error every rank finds alike (config, layout, inputs): printed by rank 0 only, not once per rank.
    Under torchrun every rank also leaves it in its error file, so torchrun's failure summary names it
    (its "Root Cause" is whichever rank ended first, usually not rank 0)."""
    if launcher_rank() == 0:
        print(line, file=sys.stderr, flush=True)
    tell_torchrun(line)


def tell_torchrun(line: str) -> None:
    """The error file torchrun (torch 2.13 elastic ErrorHandler) reads back for its summary: the JSON
    layout of ErrorHandler.record_exception, our line as the message and as the "traceback" it shows."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w") as f:
            json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}, f)
    except OSError:
        pass  # the summary then says <N/A>; the line was printed


def main(argv: list[str] | None = None) -> int:
    from loopmoe.train.callbacks.signals import EXIT_INTERRUPTED, Interrupted, catch_early_signals

    catch_early_signals()  # a Slurm USR1/TERM during start-up must not kill the job before it can checkpoint
    try:
        return run(parse_args(argv))
    except Interrupted:  # Ctrl-C before the first step: nothing trained, nothing to save, no traceback
        say_once("interrupted during start-up (before the first step): nothing to save; rerun the same "
                 "command to start again")
        return EXIT_INTERRUPTED


def run(args: argparse.Namespace) -> int:
    from loopmoe.quiet import quiet_start

    quiet_start(report=not args.print_config, device_line=True)  # before megatron-core and DeepSpeed are imported
    from loopmoe.parallel.layout import validate_layout, world_size_from_env

    try:
        cfg = load_config(args.config, args.overrides)  # every field checked before any heavy work
        layout = validate_layout(cfg, world_size_from_env())  # TP x PP x DP, heads, experts, stages
        from loopmoe.train.callbacks.wandb_sink import check_wandb

        check_wandb(cfg)  # W&B asked for but not installed: say so now, not after the model is built
    except ConfigError as e:
        say_once(f"config error: {e}")
        return 2
    if args.print_config:
        from loopmoe.config_help import commented_yaml

        print(commented_yaml(cfg), end="")  # YAML with each field's meaning as a comment
        return 0
    from loopmoe.train import setup
    from loopmoe.train.preflight import PreflightError, preflight

    # The launcher's rank (process groups come later): the preflight's warnings go to the run's log format.
    setup.setup_logging(launcher_rank())
    try:  # data, tokenizer, DeepSpeed config: before process groups, model or engine exist
        preflight(cfg, layout, resume=False)  # the checkpoint: in train(), its digests split across the ranks
    except (PreflightError, ConfigError) as e:
        say_once(f"input error: {e}")
        return 2
    from loopmoe.parallel.distributed import shutdown

    rc = train(cfg, layout)
    shutdown()  # after train() returned: its model, engine and groups' users are gone, the groups go now
    return rc


def check_before_writing(cfg, resume_tag: str | None) -> None:
    """What the preflight does not check, before the run directory is touched: the data's tokenizer
    record against data.tokenizer_model, and a resume's config against the checkpoint's."""
    from loopmoe.tokenizer_fingerprint import check_prefix
    from loopmoe.train import setup
    from loopmoe.train.resume_check import check_resume_config

    unrecorded = [p for i, p in enumerate(cfg.data.prefixes)
                  if not check_prefix(p, cfg.data.tokenizer_model, where=f"data.prefixes[{i}]")]
    if unrecorded and launcher_rank() == 0:
        setup.log.warning("no tokenizer record (PREFIX.tokenizer.json) beside %s: data made before records existed; "
                          "its tokenizer cannot be checked (re-run data_tools/preprocess.py to add one)",
                          ", ".join(unrecorded))
    ckpt_dir = cfg.checkpoint.dir or os.path.join(cfg.logging.run_dir, "checkpoints")
    check_resume_config(cfg, ckpt_dir, resume_tag, cfg.checkpoint.allow_schedule_change)


def train(cfg, layout) -> int:
    """Process groups, model, engine, data; the loop. Returns the exit code."""
    from loopmoe.parallel.distributed import init_distributed
    from loopmoe.parallel.parallelize import parallelize
    from loopmoe.parallel.pipeline import PipelineEvalModel
    from loopmoe.train import setup
    from loopmoe.train.callbacks.checkpointing import CheckpointEvery
    from loopmoe.train.callbacks.metrics import MetricsLogger, default_peak_tflops
    from loopmoe.train.callbacks.signals import EXIT_INTERRUPTED, StopOnSignal
    from loopmoe.train.callbacks.validation import Validate
    from loopmoe.train.checkpoint import CheckpointError, Checkpointer
    from loopmoe.train.engine import build_engine
    from loopmoe.train.loop import Trainer, TrainingDiverged, TrainState
    from loopmoe.tokenizer_fingerprint import TokenizerMismatch
    from loopmoe.train.preflight import PreflightError, check_resume

    p = cfg.parallel
    denv = init_distributed(p.tp, p.pp, p.backend, p.timeout_minutes, ep=p.ep)
    assert denv.world_size == layout.world, f"launcher world {denv.world_size} != {layout.world} from the environment"
    setup.setup_logging(denv.rank)
    setup.log.info("distributed: %s launcher, rank %d of %d, TP=%d PP=%d EP=%d DP=%d", denv.launcher, denv.rank,
                   denv.world_size, p.tp, p.pp, p.ep, layout.dp)
    try:  # collective: each rank digests its share of the checkpoint's files; every rank gets the same answer
        resume_tag = check_resume(cfg)
        check_before_writing(cfg, resume_tag)  # before config.yaml is (re)written
    except (PreflightError, ConfigError, TokenizerMismatch) as e:  # ResumeConfigError is a ConfigError
        say_once(f"input error: {e}")
        return 2
    if denv.is_main:  # per-rank memory estimate of this layout; a warning when it exceeds the device
        from loopmoe.memory import log_estimate
        log_estimate(cfg, layout, setup.log)
    setup.seed_everything(cfg.train.seed)
    run_dir = cfg.logging.run_dir
    cfg.checkpoint.dir = cfg.checkpoint.dir or os.path.join(run_dir, "checkpoints")
    if denv.is_main:
        save_config(cfg, os.path.join(run_dir, "config.yaml"))
        setup.log.info("run directory %s (resolved config in config.yaml)", run_dir)

    module = parallelize(setup.build_model(cfg, layout), cfg, layout)  # the model, or this rank's PP stage
    engine, _, _ = build_engine(module, cfg, layout)
    ckpt = Checkpointer(cfg.checkpoint.dir, cfg.checkpoint.keep_last)
    state = TrainState()
    if resume_tag is not None and (client := ckpt.load(engine, resume_tag, verify=False)) is not None:
        state.step, state.consumed_samples = client["step"], client["consumed_samples"]
    from megatron.core import parallel_state as ps

    train_batches, valid_batches = setup.build_data(cfg, ps.get_data_parallel_rank(), layout.dp, state.consumed_samples)
    peak = default_peak_tflops(cfg.train.precision, cfg.logging.peak_tflops)  # stated, by GPU name or measured
    from loopmoe.train.callbacks.wandb_sink import wandb_sinks

    signals = StopOnSignal()
    callbacks = [signals, Validate(valid_batches),
                 MetricsLogger(run_dir, setup.train_flops_per_token(cfg), peak, cfg.logging.tensorboard,
                               cfg.logging.progress_bar, sinks=wandb_sinks(cfg, denv.is_main)),
                 CheckpointEvery(ckpt)]
    stage = module if layout.pp > 1 else None
    model = PipelineEvalModel(stage) if stage is not None else module  # what validation calls
    try:
        state = Trainer(cfg, engine, model, train_batches, callbacks, state, layout=layout, stage=stage).train()
    except TrainingDiverged as e:
        setup.log.error("%s", e)
        return 3
    except CheckpointError as e:  # a save could not be written (disk full...); the previous one is intact
        setup.log.error("%s", e)
        return 4
    if state.step < cfg.train.steps:  # a signal or train.exit_interval stopped it; the step is saved
        setup.log.info("stopped at step %d; rerun the same command to resume (checkpoints in %s)",
                       state.step, cfg.checkpoint.dir)
        return EXIT_INTERRUPTED if signals.received == "SIGINT" else 0  # a script that ran it stops too
    setup.log.info("done at step %d; checkpoints in %s", state.step, cfg.checkpoint.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
