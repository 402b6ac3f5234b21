"""Evaluation through lm-evaluation-harness (python -m loopmoe.eval), offline: the accuracy lm-eval reports on
the shipped multiple-choice task (and on a local-file PIQA) equals the accuracy computed here, independently,
from the TRAINING model's log-likelihoods (sum of continuation token log-probs, argmax over the choices) with
sentencepiece tokenisation; early exit reaches the model through the wrapper; missing data files are named."""
from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from tests.conftest import ROOT, make_token_data  # noqa: E402

V = 512
PIQA = [  # handmade rows in the PIQA format, to exercise --data-dir
    {"goal": "To dry wet hands,", "sol1": "rub them with a towel.", "sol2": "rub them with a wet sponge.", "label": 0},
    {"goal": "How do you open a jar?", "sol1": "Twist the lid.", "sol2": "Paint the lid.", "label": 0},
    {"goal": "To keep bread fresh,", "sol1": "leave it in the rain.", "sol2": "store it in a bag.", "label": 1},
    {"goal": "How can you see in a dark room?", "sol1": "Close your eyes.", "sol2": "Turn on a lamp.", "label": 1},
]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny LoopMoE (random weights, IterAdaLN moved off zero, logits spread out) and its export."""
    from loopmoe.config import load_config
    from loopmoe.export.hf import export
    from loopmoe.model import LoopMoEModel

    d = tmp_path_factory.mktemp("eval")
    make_token_data(d, 300, V, preprocess=False)
    cfg = load_config(f"{ROOT}/configs/tiny_loopmoe.yaml",
                      ["model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=16",
                       "model.expert_hidden=32", "model.adaln_rank=8", f"model.vocab_size={V}", "model.init_std=0.2",
                       f"data.tokenizer_model={d / 'tok.model'}"])
    cfg.model.linear_backend = "torch"
    torch.manual_seed(0)
    model = LoopMoEModel(cfg.model).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adaln.mod" in name:
                p.normal_(0, 0.1)
    out = str(d / "hf")
    export(model, cfg, out)  # the tokenizer comes from data.tokenizer_model
    data_dir = d / "evals"
    (data_dir / "piqa").mkdir(parents=True)
    with open(data_dir / "piqa" / "validation.jsonl", "w") as f:
        for row in PIQA:
            f.write(json.dumps(row) + "\n")
    return {"model": model, "out": out, "tok": str(d / "tok.model"), "data_dir": str(data_dir), "dir": d}


def independent_accuracy(model, tok_path, docs, exit_after=None) -> tuple[float, float]:
    """(acc, acc_norm) from the training model: context + " " + choice tokenised whole, the continuation is
    what follows the context's tokens (lm-eval's rule), scored by the sum of its token log-probs."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=tok_path)
    acc = acc_norm = 0
    for context, choices, gold in docs:
        lls = []
        for choice in choices:
            whole, ctx = sp.encode(context + " " + choice), sp.encode(context)
            cont = whole[len(ctx):]
            with torch.no_grad():
                logp = model(torch.tensor([whole[:-1]]), exit_after=exit_after).logits[0].float().log_softmax(-1)
            lls.append(logp[-len(cont):].gather(1, torch.tensor(cont)[:, None]).sum().item())
        acc += int(max(range(len(lls)), key=lambda i: lls[i]) == gold)
        acc_norm += int(max(range(len(lls)), key=lambda i: lls[i] / len(choices[i])) == gold)
    return acc / len(docs), acc_norm / len(docs)


def tiny_docs():
    from loopmoe.eval import TASKS_DIR

    with open(os.path.join(TASKS_DIR, "data", "tiny_mc.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 20
    return [(f"Question: {r['question']}\nAnswer:", r["choices"], r["answer"]) for r in rows]


def piqa_docs():
    return [(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], r["label"]) for r in PIQA]


def run_eval(args, monkeypatch) -> dict:
    from loopmoe.eval import main

    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)  # main() sets them; monkeypatch restores the environment
    out = args[args.index("--output") + 1]
    assert main(args) == 0
    assert os.environ["HF_DATASETS_OFFLINE"] == "1" and os.environ["HF_HUB_OFFLINE"] == "1"
    with open(out) as f:
        return json.load(f)["results"]


def test_lm_eval_accuracy_equals_independent_log_likelihoods(exported, monkeypatch):
    out_json = str(exported["dir"] / "results.json")
    res = run_eval(["--model", exported["out"], "--tasks", "loopmoe_tiny_mc,piqa", "--data-dir", exported["data_dir"],
                    "--batch-size", "4", "--device", "cpu", "--output", out_json], monkeypatch)
    acc, acc_norm = independent_accuracy(exported["model"], exported["tok"], tiny_docs())
    assert res["loopmoe_tiny_mc"]["acc,none"] == pytest.approx(acc, abs=1e-9)
    assert res["loopmoe_tiny_mc"]["acc_norm,none"] == pytest.approx(acc_norm, abs=1e-9)
    acc, acc_norm = independent_accuracy(exported["model"], exported["tok"], piqa_docs())
    assert res["loopmoe_piqa"]["acc,none"] == pytest.approx(acc, abs=1e-9)
    assert res["loopmoe_piqa"]["acc_norm,none"] == pytest.approx(acc_norm, abs=1e-9)


def test_early_exit_reaches_lm_eval(exported, monkeypatch):
    out_json = str(exported["dir"] / "results_exit1.json")
    res = run_eval(["--model", exported["out"], "--tasks", "loopmoe_tiny_mc", "--exit-after", "1", "--batch-size", "4",
                    "--device", "cpu", "--output", out_json], monkeypatch)
    acc, acc_norm = independent_accuracy(exported["model"], exported["tok"], tiny_docs(), exit_after=1)
    assert res["loopmoe_tiny_mc"]["acc,none"] == pytest.approx(acc, abs=1e-9)
    assert res["loopmoe_tiny_mc"]["acc_norm,none"] == pytest.approx(acc_norm, abs=1e-9)
    assert (acc, acc_norm) != independent_accuracy(exported["model"], exported["tok"], tiny_docs())  # not vacuous


def test_missing_data_files_are_named(exported, tmp_path, capsys):
    from loopmoe.eval import PAPER, main

    assert main(["--model", exported["out"], "--tasks", "loopmoe_paper", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    for stem in ("mmlu/test", "mmlu/dev", "hellaswag/validation", "piqa/validation", "winogrande/validation",
                 "triviaqa/validation", "race/test", "bbeh/test", "gsm8k/test", "gsm8k/train", "math/test"):
        assert f"{tmp_path}/{stem}.jsonl" in err, stem
    assert len(PAPER) == 9
    assert main(["--model", exported["out"], "--tasks", "gsm8k"]) == 2  # no --data-dir at all
    err = capsys.readouterr().err
    assert "pass --data-dir" in err and "DATA_DIR/gsm8k/test.jsonl" in err and "DATA_DIR/gsm8k/train.jsonl" in err


def test_written_task_configs_resolve_local_files(exported, tmp_path):
    import yaml

    from loopmoe.eval import main

    assert main(["--write-tasks", str(tmp_path / "tasks"), "--data-dir", exported["data_dir"]]) == 0
    files = sorted(os.listdir(tmp_path / "tasks"))
    assert "loopmoe_piqa.yaml" in files and "loopmoe_tiny_mc.yaml" in files and "utils.py" in files
    assert "loopmoe_mmlu.yaml" not in files and "loopmoe_paper.yaml" not in files  # no data for them
    text = (tmp_path / "tasks" / "loopmoe_piqa.yaml").read_text()
    assert "@" not in text and os.path.join(exported["data_dir"], "piqa", "validation.jsonl") in text
    conf = yaml.safe_load(text)
    assert conf["dataset_path"] == "json"


def test_scoring_helpers():
    import importlib.util

    from loopmoe.eval import TASKS_DIR

    spec = importlib.util.spec_from_file_location("loopmoe_eval_utils", os.path.join(TASKS_DIR, "utils.py"))
    u = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(u)
    assert u.bbeh_results({"target": "(b)"}, ["Let me think. The answer is: (b)."]) == {"exact_match": 1}
    assert u.bbeh_results({"target": "b"}, ["... The answer is: (b)"]) == {"exact_match": 1}
    assert u.bbeh_results({"target": "42"}, ["The answer is: $\\boxed{42}$"]) == {"exact_match": 1}
    assert u.bbeh_results({"target": "yes"}, ["The answer is: No"]) == {"exact_match": 0}
    assert u.bbeh_results({"target": "a, b"}, ["The answer is: A,b"]) == {"exact_match": 1}
    doc = {"answer": "\\frac{1}{2}"}
    assert u.math_results(doc, [" $\\frac12$"]) == {"exact_match": 1}
    assert u.math_results(doc, [" $0.6$"]) == {"exact_match": 0}
    assert u.winogrande_choice({"sentence": "A _ b.", "option1": "x", "option2": "y"}) == ["A x", "A y"]
    assert u.winogrande_target({"sentence": "A _ b."}) == "b."
    probs = [{"answer": "A", "options": ["p", "q", "r", "s"], "question": "Q1?"},
             {"answer": "C", "options": ["t", "u", "v", "w"], "question": "Q2?"}]
    doc = {"article": "Art.", "problems": str(probs)}
    assert u.race_text(doc) == "Article: Art.\n\nQuestion: Q1?\nAnswer: p\nQ2?"
    assert u.race_choice(doc) == ["t", "u", "v", "w"] and u.race_target(doc) == 2
