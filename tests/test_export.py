"""The Hugging Face export (loopmoe/export): logits equal the training model's, KV-cached generation equals
uncached, padding, early exit (fixed and entropy), stock architectures where exact, the reverse converter
round-trips to identical weights, and the tokenizer encodes exactly like sentencepiece. fp32 on the CPU.

Checkpoints come from real (3-step) training runs of tiny LoopMoE, Vanilla MoE and dense looped models, for
every checkpoint layout in LAYOUTS (single process; TP=2, PP=2, EP=2 under torchrun, marked slow); models built
directly get random IterAdaLN modulation weights (their zero init would make every iteration the same layer
and the looped tests vacuous)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from tests.conftest import CORPUS, ROOT, free_port, make_token_data  # noqa: E402

V = 512  # tokenizer and model vocabulary
COMMON = ["data.seq_len=64", "train.micro_batch=4", "train.eval_iters=1", "train.eval_interval=100",
          "train.log_interval=1", "logging.progress_bar=false", "logging.tensorboard=false", "optim.warmup_steps=1",
          # a large learning rate so that 3 steps move IterAdaLN's zero-init modulation well away from zero
          "optim.lr=0.02", "optim.min_lr=0.002", f"model.vocab_size={V}", "train.steps=3", "checkpoint.interval=100"]
SMALL_ATTN = ["model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=16"]
MODELS = {  # name: (preset, overrides). aux_free_rate is large so the selection bias changes routing.
    "loopmoe": ("configs/tiny_loopmoe.yaml", SMALL_ATTN + [
        "model.n_experts=8", "model.expert_hidden=32", "model.adaln_rank=8", "model.aux_free_bias=true",
        "model.aux_free_rate=0.05"]),
    "vanilla": ("configs/tiny_vanilla.yaml", [  # 6 x 16 = d_model; kv heads and experts divisible by 2
        "model.d_model=96", "model.n_heads=6", "model.n_kv_heads=2", "model.head_dim=16", "model.n_experts=6",
        "model.expert_hidden=48", "model.aux_free_bias=true", "model.aux_free_rate=0.05"]),
    "dense_loop": ("configs/tiny_dense_loop.yaml", SMALL_ATTN + ["model.dense_hidden=96", "model.adaln_rank=8"]),
}
# Checkpoint layouts the exporter reads (load_trained_model returns the full model from any of them):
# name -> (processes, training overrides, models it applies to). Adding a layout is one line. The sharded
# ones launch 2-process trainings (torchrun) and are marked slow (make test-fast leaves them out).
LAYOUTS = {
    "single": (1, [], tuple(MODELS)),
    "tp2": (2, ["parallel.tp=2"], tuple(MODELS)),
    "pp2": (2, ["parallel.pp=2"], tuple(MODELS)),
    "ep2": (2, ["parallel.ep=2"], ("loopmoe", "vanilla")),  # the dense model has no experts to split
}


def cases(models=tuple(MODELS)):
    out = []
    for m in models:
        for lay, (nproc, _, applies) in LAYOUTS.items():
            if m in applies:
                out.append(pytest.param(m, lay, id=f"{m}-{lay}", marks=[pytest.mark.slow] if nproc > 1 else []))
    return out


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    return make_token_data(tmp_path_factory.mktemp("export_data"), 300, V)


class Runs:
    """Checkpoints and exports, made on first use: one layout's models train at once (3-step runs of
    pretrain_loopmoe.py); the single-process LoopMoE checkpoint is exported through the command line."""

    def __init__(self, data, root):
        self.data, self.root, self.ckpts, self.exports = data, root, {}, {}

    def checkpoint(self, model: str, layout: str) -> str:
        if (model, layout) not in self.ckpts:
            self._train(layout)
        return self.ckpts[(model, layout)]

    def _train(self, layout: str) -> None:
        nproc, extra, models = LAYOUTS[layout]
        procs = {}
        for model in models:
            preset, over = MODELS[model]
            run_dir = self.root / f"run_{model}_{layout}"
            launch = ([sys.executable] if nproc == 1 else
                      [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                       "--master-addr", "127.0.0.1", "--master-port", str(free_port())])
            cmd = [*launch, "pretrain_loopmoe.py", "--config", preset, *COMMON, *over, *extra,
                   f"data.prefixes={self.data['prefix']}", f"data.tokenizer_model={self.data['tok']}",
                   f"logging.run_dir={run_dir}"]
            procs[model] = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            self.ckpts[(model, layout)] = str(run_dir / "checkpoints")
        for model, p in procs.items():
            log, _ = p.communicate(timeout=600)
            assert p.returncode == 0, f"training {model} {layout} failed:\n{log[-3000:]}"

    def export(self, model: str, layout: str) -> str:
        from loopmoe.export.hf import export_checkpoint, main

        key = (model, layout)
        if key not in self.exports:
            ckpt, dst = self.checkpoint(model, layout), str(self.root / f"hf_{model}_{layout}")
            if key == ("loopmoe", "single"):  # the command line (in this process: its imports are paid)
                buf = io.StringIO()
                with contextlib.redirect_stdout(buf):
                    assert main(["--checkpoint", ckpt, "--out", dst, "--tokenizer", self.data["tok"],
                                 "--max-shard-size", "100KB"]) == 0
                assert "architecture: loopmoe" in buf.getvalue()
            else:
                export_checkpoint(ckpt, dst, tokenizer=self.data["tok"])
            self.exports[key] = dst
        return self.exports[key]


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory) -> Runs:
    return Runs(data, tmp_path_factory.mktemp("runs"))


def load_hf(path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, **kw).eval()


def load_training(ckpt):
    from loopmoe.train.checkpoint import load_trained_model

    return load_trained_model(ckpt)


def tokens(n=2, s=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, V, (n, s), generator=g)


def maxdiff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


# ---------------------------------------------------------------------------------------------------
# Identity with the training model


@pytest.mark.parametrize("model, layout", cases())
def test_logits_equal_training_model(model, layout, runs):
    m, cfg = load_training(runs.checkpoint(model, layout))
    hf = load_hf(runs.export(model, layout))
    x = tokens()
    R = m.n_iters
    with torch.no_grad():
        assert maxdiff(hf(x).logits, m(x).logits) < 1e-4
        for k in range(1, R + 1):  # the fixed early exit equals the training model's exit_after=k
            assert maxdiff(hf(x, exit_after=k).logits, m(x, exit_after=k).logits) < 1e-4
        ours = m(x, exit_logits=True).exit_logits
        theirs = hf(x, output_exit_logits=True, use_cache=False).exit_logits
        assert len(ours) == len(theirs) == R and all(maxdiff(a, b) < 1e-4 for a, b in zip(ours, theirs))
        if R > 1:  # not vacuous: the second iteration changes the output
            assert maxdiff(m(x).logits, m(x, exit_after=1).logits) > 1e-3
        if cfg.model.ffn == "moe":  # not vacuous: the trained selection bias changes some routing decisions
            assert any(bool(b.ffn.router.bias.ne(0).any()) for b in m.layers)
            with_bias = [r.topk for r in m(x, return_routing=True).routing]
            for b in m.layers:
                b.ffn.router.bias.zero_()
            without = [r.topk for r in m(x, return_routing=True).routing]
            assert any(not torch.equal(a, b) for a, b in zip(with_bias, without))
    assert hf.config.num_hidden_layers == cfg.model.n_executed_layers
    meta = json.load(open(os.path.join(runs.export(model, layout), "loopmoe_export.json")))
    assert meta["arch"] == "loopmoe"  # looped, or a trained selection bias: no stock class is exact
    if model == "vanilla":
        assert "selection bias" in meta["why"]


def test_export_folder_is_self_contained(runs):
    out = runs.export("loopmoe", "single")
    conf = json.load(open(os.path.join(out, "config.json")))
    assert conf["model_type"] == "loopmoe" and conf["architectures"] == ["LoopMoEForCausalLM"]
    assert conf["auto_map"] == {"AutoConfig": "configuration_loopmoe.LoopMoEConfig",
                                "AutoModelForCausalLM": "modeling_loopmoe.LoopMoEForCausalLM"}
    files = set(os.listdir(out))
    assert {"configuration_loopmoe.py", "modeling_loopmoe.py", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "model.safetensors.index.json"} <= files
    assert sum(f.endswith(".safetensors") for f in files) > 1  # sharded (--max-shard-size 100KB)
    gen = json.load(open(os.path.join(out, "generation_config.json")))
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 3)
    # Loads and runs in a process where the loopmoe package cannot be imported.
    script = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'loopmoe' or name.startswith('loopmoe.'):\n"
        "            raise ImportError('loopmoe is blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({out!r}, trust_remote_code=True)\n"
        "y = m.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)\n"
        "assert y.shape == (1, 7) and not any(k.startswith('loopmoe') for k in sys.modules)\n"
        "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=str(os.path.dirname(out)), capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------
# Generation, cache, padding


@pytest.mark.parametrize("model, layout", cases())
def test_generation_with_cache_equals_without(model, layout, runs):
    from loopmoe.generate import generate

    m, _ = load_training(runs.checkpoint(model, layout))
    hf = load_hf(runs.export(model, layout))
    prompt = tokens(1, 6, seed=1)
    a = hf.generate(prompt, max_new_tokens=16, do_sample=False, use_cache=True)
    b = hf.generate(prompt, max_new_tokens=16, do_sample=False, use_cache=False)
    assert torch.equal(a, b) and a.shape == (1, 22)
    assert torch.equal(a, generate(m, prompt, 16))  # the training side's own cached greedy decoding
    if m.n_iters > 1:
        c = hf.generate(prompt, max_new_tokens=16, do_sample=False, exit_after=1)
        assert torch.equal(c, hf.generate(prompt, max_new_tokens=16, do_sample=False, exit_after=1, use_cache=False))
        assert torch.equal(c, generate(m, prompt, 16, exit_after=1))


def test_kv_cache_has_an_entry_per_executed_layer(runs):
    from transformers import DynamicCache

    m, cfg = load_training(runs.checkpoint("loopmoe", "single"))
    hf = load_hf(runs.export("loopmoe", "single"))
    x = tokens(1, 20)
    cache = DynamicCache()
    with torch.no_grad():
        parts = [hf(x[:, :7], cache=cache, use_cache=True).logits]
        for t in range(7, 20):
            parts.append(hf(x[:, t:t + 1], cache=cache, use_cache=True).logits)
        full = m(x).logits
    assert maxdiff(torch.cat(parts, dim=1), full) < 1e-4
    mc = cfg.model
    assert len(cache.layers) == mc.n_prelude + mc.loop_iters * mc.n_loop + mc.n_coda
    assert all(layer.keys.shape[2] == 20 for layer in cache.layers)


@pytest.mark.parametrize("kw", [{}, {"exit_after": 1}, {"exit_entropy_threshold": "median"}],
                         ids=["full", "exit1", "entropy"])
def test_padded_batches_equal_single_sequences(kw, runs):
    hf = load_hf(runs.export("loopmoe", "single"))
    if kw.get("exit_entropy_threshold") == "median":
        kw = {"exit_entropy_threshold": median_exit1_entropy(hf)}
    seqs = [tokens(1, n, seed=n)[0] for n in (7, 12, 3)]
    L = 12
    with torch.no_grad():
        singles = [hf(s[None], **kw).logits[0] for s in seqs]
        for side in ("left", "right"):
            ids, mask = torch.full((3, L), 3), torch.zeros(3, L, dtype=torch.long)
            for i, s in enumerate(seqs):
                sl = slice(L - len(s), L) if side == "left" else slice(0, len(s))
                ids[i, sl], mask[i, sl] = s, 1
            out = hf(ids, attention_mask=mask, **kw).logits
            for i, s in enumerate(seqs):
                got = out[i, L - len(s):] if side == "left" else out[i, :len(s)]
                assert maxdiff(got, singles[i]) < 1e-4, (side, i)
    ids, mask = torch.full((3, L), 3), torch.zeros(3, L, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, L - len(s):], mask[i, L - len(s):] = s, 1
    batch = hf.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, **kw)
    for i, s in enumerate(seqs):
        assert torch.equal(batch[i, L:], hf.generate(s[None], max_new_tokens=6, do_sample=False, **kw)[0, len(s):])


# ---------------------------------------------------------------------------------------------------
# Early exit


def median_exit1_entropy(hf) -> float:
    with torch.no_grad():
        lg = hf(tokens(2, 24, seed=5), output_exit_logits=True, use_cache=False).exit_logits[0]
    lp = lg.float().log_softmax(-1)
    return float((-(lp.exp() * lp).sum(-1)).median())


def test_entropy_exit(runs):
    m, _ = load_training(runs.checkpoint("loopmoe", "single"))
    path = runs.export("loopmoe", "single")
    hf = load_hf(path)
    x = tokens(2, 24, seed=5)
    with torch.no_grad():
        full, exit1 = m(x).logits, m(x, exit_after=1).logits
        zero = hf(x, exit_entropy_threshold=0.0)  # entropy is never below 0: nobody exits
        assert maxdiff(zero.logits, full) < 1e-4 and bool((zero.exit_iterations == 2).all())
        inf = hf(x, exit_entropy_threshold=float("inf"))  # everybody exits after iteration 1
        assert maxdiff(inf.logits, exit1) < 1e-4 and bool((inf.exit_iterations == 1).all())
        t = median_exit1_entropy(hf)
        mixed = hf(x, exit_entropy_threshold=t)
        its = mixed.exit_iterations
        assert bool((its == 1).any()) and bool((its == 2).any()), its
        # position 0 has no past: its read-outs are the training model's exits
        for b in range(2):
            ref = exit1 if its[b, 0] == 1 else full
            assert maxdiff(mixed.logits[b, 0], ref[b, 0]) < 1e-4
        # causal: a prefix gives the same decisions and logits as the whole sequence
        prefix = hf(x[:, :10], exit_entropy_threshold=t)
        assert maxdiff(prefix.logits, mixed.logits[:, :10]) < 1e-4 and torch.equal(prefix.exit_iterations, its[:, :10])
    prompt = tokens(1, 6, seed=3)
    a = hf.generate(prompt, max_new_tokens=8, do_sample=False, exit_entropy_threshold=t)
    b = hf.generate(prompt, max_new_tokens=8, do_sample=False, exit_entropy_threshold=t, use_cache=False)
    assert torch.equal(a, b)
    # the same through the config (config.json fields, e.g. from_pretrained(..., exit_after=1))
    with torch.no_grad():
        assert maxdiff(load_hf(path, exit_after=1)(x).logits, exit1) < 1e-4
        assert maxdiff(load_hf(path, exit_entropy_threshold=float("inf"))(x).logits, exit1) < 1e-4


# ---------------------------------------------------------------------------------------------------
# The reverse converter


@pytest.mark.parametrize("model, layout", cases())
def test_reverse_converter_round_trips(model, layout, runs, tmp_path):
    from loopmoe.export.to_training import main as to_training_main

    m, cfg = load_training(runs.checkpoint(model, layout))
    assert to_training_main(["--hf", runs.export(model, layout), "--out", str(tmp_path / "ckpt")]) == 0
    m2, cfg2 = load_training(str(tmp_path / "ckpt"))
    a, b = m.state_dict(), m2.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert cfg2.model == cfg.model and (tmp_path / "ckpt" / "step_00000003").is_dir()


# ---------------------------------------------------------------------------------------------------
# Stock architectures (no remote code) where they are exact


def build(preset, **over):
    from loopmoe.config import load_config
    from loopmoe.model import LoopMoEModel

    cfg = load_config(f"{ROOT}/configs/{preset}.yaml")
    cfg.model.linear_backend, cfg.model.vocab_size = "torch", V
    for k, v in over.items():
        setattr(cfg.model, k, v)
    torch.manual_seed(0)
    m = LoopMoEModel(cfg.model).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if ".adaln.mod" in name:
                p.normal_(0, 0.05)
    return m, cfg


STOCK = {"llama": ("tiny_dense", {}), "mixtral": ("tiny_vanilla", {"n_shared_experts": 0}),
         "granitemoeshared": ("tiny_vanilla", {"n_heads": 8, "n_kv_heads": 2})}  # 8 x 16 = d_model


@pytest.mark.parametrize("arch", list(STOCK))
def test_stock_architecture_exports(arch, data, tmp_path):
    from transformers import AutoModelForCausalLM

    from loopmoe.export.hf import export
    from loopmoe.export.to_training import to_training
    from loopmoe.train.checkpoint import load_trained_model

    preset, over = STOCK[arch]
    m, cfg = build(preset, **over)
    out = str(tmp_path / "hf")
    summary = export(m, cfg, out, tokenizer=data["tok"])
    assert summary["arch"] == arch
    assert "modeling_loopmoe.py" not in os.listdir(out)
    assert "auto_map" not in json.load(open(os.path.join(out, "config.json")))
    hf = AutoModelForCausalLM.from_pretrained(out).eval()  # no remote code
    assert hf.config.model_type == arch
    x = tokens()
    with torch.no_grad():
        assert maxdiff(hf(x).logits, m(x).logits) < 1e-4
    prompt = tokens(1, 5, seed=2)
    assert torch.equal(hf.generate(prompt, max_new_tokens=10, do_sample=False),
                       hf.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=False))
    to_training(out, str(tmp_path / "ckpt"))
    m2, cfg2 = load_trained_model(str(tmp_path / "ckpt"))
    a, b = m.state_dict(), m2.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_trained_vanilla_without_selection_bias_exports_to_stock(runs, data, tmp_path):
    from transformers import AutoModelForCausalLM

    from loopmoe.export.hf import export

    m, cfg = load_training(runs.checkpoint("vanilla", "single"))
    with torch.no_grad():
        for b in m.layers:
            b.ffn.router.bias.zero_()
    out = str(tmp_path / "hf")
    assert export(m, cfg, out, tokenizer=data["tok"])["arch"] == "granitemoeshared"
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    x = tokens()
    with torch.no_grad():
        assert maxdiff(hf(x).logits, m(x).logits) < 1e-4


def test_remote_code_for_what_no_stock_class_computes(tmp_path):
    from loopmoe.export.hf import choose_arch

    m, cfg = build("tiny_vanilla", router_score="softmax_then_topk")
    assert choose_arch(cfg.model, m.state_dict())[0] == "loopmoe"
    m, cfg = build("tiny_vanilla")  # 6 heads x 32 != d_model 128: GraniteMoeShared of transformers 4.x refuses
    assert choose_arch(cfg.model, m.state_dict())[0] == "loopmoe"
    m, cfg = build("tiny_loopmoe")
    assert choose_arch(cfg.model, m.state_dict())[0] == "loopmoe"
    with pytest.raises(ValueError, match="does not compute this model exactly"):
        choose_arch(cfg.model, m.state_dict(), "llama")


def test_bfloat16_export_loads(data, tmp_path):
    from loopmoe.export.hf import export

    m, cfg = build("tiny_loopmoe")
    out = str(tmp_path / "bf16")
    export(m, cfg, out, tokenizer=data["tok"], dtype="bfloat16")
    hf = load_hf(out)
    assert hf.dtype == torch.bfloat16
    with torch.no_grad():
        y = hf(tokens()).logits
    assert y.dtype == torch.bfloat16 and bool(torch.isfinite(y).all())
    assert maxdiff(y, m(tokens()).logits) < 0.1


# ---------------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_round_trip(data, runs):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from loopmoe.export.hf import _TOKENIZER_PROBES

    sp = spm.SentencePieceProcessor(model_file=data["tok"])
    texts = list(_TOKENIZER_PROBES)
    with open(CORPUS) as f:
        for i, line in enumerate(f):
            if i >= 400:
                break
            doc = json.loads(line)["text"]
            texts += [doc[:2000], *doc.split("\n")[:3]]
    out = runs.export("loopmoe", "single")
    for tok in (AutoTokenizer.from_pretrained(out, trust_remote_code=True), AutoTokenizer.from_pretrained(out)):
        assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
        for s in texts:
            ids = tok(s).input_ids  # the default call adds no BOS/EOS (as in training)
            assert ids == sp.encode(s), s
            assert tok.decode(ids) == sp.decode(ids)
        batch = tok(["a b", "longer text here"], padding=True, return_tensors="pt")
        assert batch.input_ids[0, 0] == 3 and batch.attention_mask[0, 0] == 0  # left padding with <pad>
