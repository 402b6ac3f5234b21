"""Evaluate an exported model with lm-evaluation-harness, offline, on local data files.

    python -m loopmoe.eval --model hf/demo --tasks loopmoe_tiny_mc
    python -m loopmoe.eval --model hf/demo --tasks loopmoe_paper --data-dir /data/evals --limit 100
    python -m loopmoe.eval --model hf/demo --tasks piqa,hellaswag --data-dir /data/evals --exit-after 1
    python -m loopmoe.eval --write-tasks /tmp/loopmoe_tasks --data-dir /data/evals   # for plain lm_eval

``--model`` is a folder written by ``python -m loopmoe.export.hf``. Tasks: the ``loopmoe_*`` configs
in loopmoe/eval_tasks (the paper's nine benchmarks, group ``loopmoe_paper``, and the shipped
``loopmoe_tiny_mc``); the short names mmlu, hellaswag, piqa, winogrande, triviaqa, race, bbeh, gsm8k,
math mean the ``loopmoe_`` versions; any other name is passed to lm-eval as is (it then needs its own
data). The hub is never contacted (HF_DATASETS_OFFLINE=1, HF_HUB_OFFLINE=1; ``--online`` lifts that).
Each task reads ``DATA_DIR/<benchmark>/<split>.jsonl`` (or .json / .parquet); missing files are listed
with what they must contain and how to produce them, and nothing runs. docs/export.md has the details.
"""
from __future__ import annotations

if __name__ == "__main__":  # a quiet start, before megatron-core or DeepSpeed is imported (loopmoe/quiet.py)
    from loopmoe.quiet import quiet_start

    quiet_start()

import argparse
import glob
import json
import os
import re
import shutil
import sys
import tempfile

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "eval_tasks")
PAPER = ["mmlu", "hellaswag", "piqa", "winogrande", "triviaqa", "race", "bbeh", "gsm8k", "math"]
EXTENSIONS = (".jsonl", ".json", ".parquet")
_FILE_RE = re.compile(r"@FILE:([\w./-]+)@")

# What each data file holds and where it comes from (printed when it is missing).
SOURCES = {
    "mmlu/test": ('cais/mmlu "all", split test', "question, subject, choices (4), answer (0-3)"),
    "mmlu/dev": ('cais/mmlu "all", split dev', "same fields (few-shot examples)"),
    "hellaswag/validation": ("Rowan/hellaswag, split validation", "activity_label, ctx_a, ctx_b, endings, label"),
    "piqa/validation": ("baber/piqa, split validation", "goal, sol1, sol2, label"),
    "winogrande/validation": ('allenai/winogrande "winogrande_xl", split validation',
                              "sentence, option1, option2, answer ('1'/'2')"),
    "triviaqa/validation": ('mandarjoshi/trivia_qa "rc.nocontext", split validation', "question, answer.aliases"),
    "race/test": ('EleutherAI/race "high", split test', "article, problems"),
    "bbeh/test": ("BBEH (github.com/google-deepmind/bbeh: the 'examples' of every benchmark_tasks/*/task.json, "
                  "with a 'task' field), or its hub copy", "input, target, task"),
    "gsm8k/test": ('openai/gsm8k "main", split test', "question, answer"),
    "gsm8k/train": ('openai/gsm8k "main", split train', "question, answer (few-shot examples)"),
    "math/test": ('EleutherAI/hendrycks_math, split test of all 7 subjects concatenated (or '
                  'HuggingFaceH4/MATH-500 test)', "problem, solution, level, type"),
}


def task_names() -> list[str]:
    return sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(TASKS_DIR, "*.yaml")))


def resolve_tasks(spec: str) -> list[str]:
    out = []
    for name in (t.strip() for t in spec.split(",") if t.strip()):
        out.append(f"loopmoe_{name}" if name in PAPER else name)
    return out


def _template(name: str) -> str | None:
    path = os.path.join(TASKS_DIR, f"{name}.yaml")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read()


def expand(names: list[str]) -> list[str]:
    """Group configs of ours -> their member tasks (for the file check)."""
    out = []
    for name in names:
        text = _template(name)
        if text is not None and re.search(r"^group:", text, re.M):
            out += expand(re.findall(r"^\s+-\s+(loopmoe_\w+)\s*$", text, re.M))
        else:
            out.append(name)
    return out


def find_file(data_dir: str, stem: str) -> str | None:
    for ext in EXTENSIONS:
        path = os.path.join(data_dir, stem + ext)
        if os.path.isfile(path):
            return os.path.abspath(path)
    return None


def missing_files(names: list[str], data_dir: str | None) -> list[tuple[str, str]]:
    """[(task, file stem)] of data files that are not under data_dir."""
    missing = []
    for name in expand(names):
        text = _template(name)
        for stem in _FILE_RE.findall(text or ""):
            if data_dir is None or find_file(data_dir, stem) is None:
                missing.append((name, stem))
    return missing


def explain_missing(missing: list[tuple[str, str]], data_dir: str | None) -> str:
    where = os.path.abspath(data_dir) if data_dir else "DATA_DIR"
    lines = [f"missing evaluation data under {where}:" if data_dir else
             "no --data-dir given; these tasks read local files (pass --data-dir DATA_DIR):"]
    for task, stem in missing:
        src, fields = SOURCES.get(stem, ("?", "?"))
        lines.append(f"  {task}: {where}/{stem}.jsonl (or .json / .parquet) - {src}; fields: {fields}")
    lines += ["Make them on a machine with hub access, e.g.:",
              "  from datasets import load_dataset",
              "  load_dataset('openai/gsm8k', 'main', split='test').to_json('DATA_DIR/gsm8k/test.jsonl')",
              "(docs/export.md, 'Evaluation data', lists every file.)"]
    return "\n".join(lines)


def write_tasks(out_dir: str, data_dir: str | None, names: list[str] | None = None) -> str:
    """Resolved task configs (+ utils.py) in out_dir for ``lm_eval --include_path out_dir``. Tasks whose
    data files are missing are left out (they are reported by ``missing_files``)."""
    os.makedirs(out_dir, exist_ok=True)
    shutil.copyfile(os.path.join(TASKS_DIR, "utils.py"), os.path.join(out_dir, "utils.py"))
    wanted = set(expand(names)) if names else None
    for name in task_names():
        text = _template(name)
        is_group = re.search(r"^group:", text, re.M) is not None
        if wanted is not None and name not in wanted and not is_group:
            continue
        stems = _FILE_RE.findall(text)
        files = {s: find_file(data_dir, s) if data_dir else None for s in stems}
        if any(v is None for v in files.values()) or (is_group and missing_files([name], data_dir)):
            continue
        kinds = {"parquet" if f.endswith(".parquet") else "json" for f in files.values()}
        if len(kinds) > 1:
            raise ValueError(f"{name}: mix of parquet and json files {sorted(files.values())}; use one format per task")
        text = _FILE_RE.sub(lambda m: files[m.group(1)], text)
        text = text.replace('"@FORMAT@"', kinds.pop() if kinds else "json").replace("@TASKS@", TASKS_DIR)
        with open(os.path.join(out_dir, f"{name}.yaml"), "w") as f:
            f.write(text)
    return out_dir


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m loopmoe.eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="exported Hugging Face folder (python -m loopmoe.export.hf)")
    ap.add_argument("--tasks", default="loopmoe_tiny_mc",
                    help="comma-separated task names (default: %(default)s); loopmoe_paper = all nine")
    ap.add_argument("--data-dir", help="folder with <benchmark>/<split>.jsonl|.json|.parquet files")
    ap.add_argument("--limit", type=float, help="documents per task (an int) or a fraction (< 1)")
    ap.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's own)")
    ap.add_argument("--batch-size", default="8", help="lm-eval batch size or 'auto' (default: %(default)s)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:0 ... (default: cuda if available, else cpu)")
    ap.add_argument("--dtype", default="auto", help="model dtype for loading (default: as saved)")
    ap.add_argument("--exit-after", type=int, help="early exit: run this many loop iterations for every token")
    ap.add_argument("--exit-entropy-threshold", type=float, help="early exit when the read-out entropy (nats) is below this")
    ap.add_argument("--gen-kwargs", help="generation overrides for generate_until tasks, e.g. max_gen_toks=256")
    ap.add_argument("--output", help="write the results JSON here")
    ap.add_argument("--seed", type=int, default=1234, help="lm-eval seeds (default: %(default)s)")
    ap.add_argument("--online", action="store_true", help="allow the Hugging Face hub (default: offline)")
    ap.add_argument("--write-tasks", metavar="DIR", help="only write the resolved task configs to DIR and exit")
    ap.add_argument("--list", action="store_true", help="list the task configs and their data files, then exit")
    return ap


def model_args(args) -> dict:
    ma = {"pretrained": os.path.abspath(args.model), "trust_remote_code": True, "dtype": args.dtype}
    if args.exit_after is not None:
        ma["exit_after"] = args.exit_after
    if args.exit_entropy_threshold is not None:
        ma["exit_entropy_threshold"] = args.exit_entropy_threshold
    meta = os.path.join(args.model, "loopmoe_export.json")
    if os.path.exists(meta):  # empty contexts start after EOS: the document separator the model trained on
        with open(meta) as f:
            eos = json.load(f).get("special_ids", {}).get("eos")
        if eos is not None:
            ma["prefix_token_id"] = eos
    return ma


def run(args) -> dict:
    if not args.online:
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    names = resolve_tasks(args.tasks)
    with tempfile.TemporaryDirectory(prefix="loopmoe_tasks_") as tmp:
        write_tasks(tmp, args.data_dir, names)
        tm = TaskManager(include_path=tmp)
        limit = args.limit
        if limit is not None and limit >= 1:
            limit = int(limit)
        device = args.device
        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        res = lm_eval.simple_evaluate(
            model="hf", model_args=model_args(args), tasks=names, num_fewshot=args.num_fewshot,
            batch_size=args.batch_size, device=device, limit=limit, task_manager=tm, log_samples=False,
            gen_kwargs=args.gen_kwargs,
            random_seed=args.seed, numpy_random_seed=args.seed, torch_random_seed=args.seed,
            fewshot_random_seed=args.seed)
    return res


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        for name in task_names():
            stems = _FILE_RE.findall(_template(name))
            state = ", ".join(f"{s} ({'found' if args.data_dir and find_file(args.data_dir, s) else 'missing'})"
                              for s in stems) or "shipped data / group"
            print(f"{name}: {state}")
        return 0
    if args.write_tasks:
        write_tasks(args.write_tasks, args.data_dir)
        missing = missing_files([n for n in task_names()], args.data_dir)
        print(f"wrote task configs to {args.write_tasks}; use: lm_eval --include_path {args.write_tasks} ...")
        if missing:
            print("left out (no data):\n" + explain_missing(missing, args.data_dir), file=sys.stderr)
        return 0
    if not args.model:
        print("error: --model is required (a folder written by python -m loopmoe.export.hf)", file=sys.stderr)
        return 2
    if not os.path.exists(os.path.join(args.model, "config.json")):
        print(f"error: {args.model} has no config.json; export a checkpoint first: "
              "python -m loopmoe.export.hf --checkpoint DIR --out DIR", file=sys.stderr)
        return 2
    missing = missing_files(resolve_tasks(args.tasks), args.data_dir)
    if missing:
        print(explain_missing(missing, args.data_dir), file=sys.stderr)
        return 2
    res = run(args)
    from lm_eval.utils import make_table

    print(make_table(res))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump({k: res[k] for k in ("results", "versions", "n-shot", "config") if k in res}, f, indent=2,
                      default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
