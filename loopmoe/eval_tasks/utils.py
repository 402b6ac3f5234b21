"""Document processing and scoring for the loopmoe_* lm-eval tasks (imported by lm-eval from the
written task folder). The processing reproduces lm-eval's own tasks of the same benchmark, so scores
compare with the upstream task names (hellaswag, winogrande, race, hendrycks_math, ...)."""
from __future__ import annotations

import ast
import re


# HellaSwag (as lm_eval/tasks/hellaswag/utils.py)
def _hs_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_docs(dataset):
    def one(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {"query": _hs_clean(doc["activity_label"] + ": " + ctx),
                "choices": [_hs_clean(e) for e in doc["endings"]], "gold": int(doc["label"])}

    return dataset.map(one)


# WinoGrande, partial scoring (as lm_eval/tasks/winogrande): the options fill the blank in the context,
# the shared rest of the sentence is the continuation.
def winogrande_text(doc):
    return {"1": 0, "2": 1}[str(doc["answer"])]


def winogrande_target(doc):
    i = doc["sentence"].index("_") + 1
    return doc["sentence"][i:].strip()


def winogrande_choice(doc):
    i = doc["sentence"].index("_")
    return [doc["sentence"][:i] + o for o in (doc["option1"], doc["option2"])]


# RACE, EleutherAI/race format: one document per article, its last problem is scored, the earlier
# problems of the article (with their answers) are context (as lm_eval/tasks/race).
def _problems(doc):
    p = doc["problems"]
    return ast.literal_eval(p) if isinstance(p, str) else p


def _option(problem):
    return problem["options"]["ABCD".index(problem["answer"])]


def race_text(doc):
    text = "Article: " + doc["article"] + "\n\n"
    for problem in _problems(doc)[:-1]:
        if problem["question"][-6:] == "  _  .":
            text += problem["question"][:-5] + _option(problem) + "\n"
        else:
            text += "Question: " + problem["question"] + "\n" + "Answer: " + _option(problem) + "\n"
    return text + _problems(doc)[-1]["question"]


def race_choice(doc):
    return [_problems(doc)[-1]["options"][i] for i in range(4)]


def race_target(doc):
    return "ABCD".index(_problems(doc)[-1]["answer"])


# MATH (Hendrycks), as lm_eval/tasks/hendrycks_math: the reference is the last \boxed{} of the solution
# (or the "answer" field of MATH-500 style files); the prediction is the text between the first and last
# "$" of the generation (or all of it); both normalised by lm-eval's strip_string.
def math_docs(dataset):
    from lm_eval.tasks.hendrycks_math.utils import last_boxed_only_string, remove_boxed

    def one(doc):
        ans = doc.get("answer") or remove_boxed(last_boxed_only_string(doc["solution"]))
        return {"problem": doc["problem"], "solution": doc["solution"], "answer": ans}

    return dataset.map(one)


def math_results(doc, results):
    from lm_eval.tasks.hendrycks_math.utils import is_equiv

    out = results[0]
    dollars = [i for i, c in enumerate(out) if c == "$"]
    answer = out if len(dollars) <= 1 else out[dollars[0] + 1: dollars[-1]]
    return {"exact_match": int(is_equiv(answer, doc["answer"]))}


# BBEH (BIG-Bench Extra Hard): generation with the benchmark's answer-format instruction; the answer
# follows the last "The answer is:"-style prefix and is compared after the normalisation of the official
# evaluator (github.com/google-deepmind/bbeh, bbeh/evaluate.py): case, trailing period, LaTeX wrappers,
# "(a)" vs "a", numbers compared as numbers, list spacing.
BBEH_SUFFIX = (
    "\nThink step by step, and when you provide the final answer, please use the prefix \"The answer is:\" "
    "without any modification, and provide the answer directly, with no formatting, no bolding, and no "
    "markup. For instance: \"The answer is: 42\" or \"The answer is: yes\". If the question is multiple "
    "choice with a single correct answer, the final answer must only be the letter corresponding to the "
    "correct answer. For example, \"The answer is: (a)\"\n")


def bbeh_text(doc):
    return doc["input"] + BBEH_SUFFIX


def _unwrap_latex(s: str) -> str:
    if len(s) > 1 and s[0] == "$" and s[-1] == "$":
        s = s[1:-1]
    for wrap in ("boxed{", "texttt{", "text{"):
        if wrap in s and s.endswith("}"):
            s = s[:-1].split(wrap, 1)[1]
    return s


def bbeh_extract(sample: str) -> str:
    answer = sample
    for prefix in ("The answer is:", "The final answer is ", "The final answer is: ", "The answer is "):
        if prefix in answer:
            answer = answer.split(prefix)[-1].strip()
    if answer.endswith("."):
        answer = answer[:-1]
    return _unwrap_latex(answer)


def _norm(s: str) -> str:
    s = s.strip().lower().replace("**", "").strip()
    s = s.strip("\"'` ")
    return re.sub(r"\s*,\s*", ", ", s)


def bbeh_match(prediction: str, reference: str) -> bool:
    p, r = _norm(prediction), _norm(reference)
    if p == r:
        return True
    if len(p) == 3 and p[0] == "(" and p[-1] == ")" and p[1] == r:
        return True
    if len(r) == 3 and r[0] == "(" and r[-1] == ")" and r[1] == p:
        return True
    try:
        return float(p) == float(r)
    except ValueError:
        pass
    return p.replace("[", "").replace("]", "") == r.replace("[", "").replace("]", "")


def bbeh_results(doc, results):
    return {"exact_match": int(bbeh_match(bbeh_extract(results[0]), str(doc["target"])))}
