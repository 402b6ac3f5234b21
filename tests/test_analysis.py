"""Routing-divergence metrics, JSD / entropy, the exit-enabled forward, and smoke runs of the analysis
commands (routing, early_exit, compare --quick) on a tiny checkpoint trained in a fixture."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from loopmoe.analysis import early_exit as ee
from loopmoe.analysis import routing_metrics as rm
from loopmoe.analysis.logit_lens import LN2, entropy, jsd
from tests.conftest import ROOT, make_token_data

# ---------------------------------------------------------------------------------------------------
# routing metrics on hand-made routings


def test_identical_routing_has_zero_divergence():
    s = torch.tensor([[0, 1], [2, 5], [7, 3]])
    st = rm.divergence_stats(s, s.flip(1), n_experts=8)  # same sets, other order
    assert st["divergence"] == 0.0 and st["identical"] == 1.0 and st["disjoint"] == 0.0 and st["partial"] == 0.0
    assert st["jaccard"] == 1.0 and st["mean_overlap"] == 2.0 and st["overlap_2"] == 1.0
    assert rm.unique_experts_per_token([s, s]) == 2.0


def test_disjoint_and_partial_routing_known_values():
    s1 = torch.tensor([[0, 1], [0, 1], [0, 1], [0, 1]])
    s2 = torch.tensor([[2, 3], [4, 5], [1, 6], [0, 1]])  # disjoint, disjoint, partial, identical
    st = rm.divergence_stats(s1, s2, n_experts=8)
    assert st["disjoint"] == 0.5 and st["partial"] == 0.25 and st["identical"] == 0.25
    assert st["mean_overlap"] == pytest.approx(0.75)
    assert st["jaccard"] == pytest.approx((0 + 0 + 1 / 3 + 1) / 4)
    assert st["divergence"] == pytest.approx((2 - 0.75) / (2 - 0.5))
    all_disjoint = rm.divergence_stats(s1[:2], s2[:2], 8)
    assert all_disjoint["divergence"] == pytest.approx(4 / 3)  # (k - 0) / (k - k^2/E): above 1, anti-correlated
    assert rm.unique_counts([s1, s2]).tolist() == [4, 4, 3, 2]


def test_chance_pmfs_exact():
    assert rm.chance_overlap_pmf(2, 8) == pytest.approx([15 / 28, 12 / 28, 1 / 28])
    for k, E in ((2, 8), (3, 10), (8, 64)):
        pmf = rm.chance_overlap_pmf(k, E)
        assert sum(pmf) == pytest.approx(1.0)
        assert sum(x * p for x, p in enumerate(pmf)) == pytest.approx(k * k / E)
        for R in (2, 3):
            u = rm.chance_unique_pmf(k, E, R)
            assert sum(u) == pytest.approx(1.0)
            assert sum(x * p for x, p in enumerate(u)) == pytest.approx(rm.chance_unique_experts(k, E, R))


def _random_sets(T, E, k, g):
    return torch.rand(T, E, generator=g).topk(k, dim=1).indices


def test_random_routing_matches_chance():
    g = torch.Generator().manual_seed(0)
    T, E, k = 40000, 8, 2
    s1, s2, s3 = (_random_sets(T, E, k, g) for _ in range(3))
    st = rm.divergence_stats(s1, s2, E)
    assert st["divergence"] == pytest.approx(1.0, abs=0.02)
    for x in range(k + 1):
        assert st[f"overlap_{x}"] == pytest.approx(st[f"chance_{x}"], abs=0.01)
    assert rm.permutation_overlap(s1, s2) == pytest.approx(k * k / E, abs=0.02)
    u = rm.unique_counts([s1, s2, s3])
    assert u.float().mean().item() == pytest.approx(rm.chance_unique_experts(k, E, 3), abs=0.02)
    hist = torch.bincount(u, minlength=7).float() / T
    assert hist.tolist() == pytest.approx(rm.chance_unique_pmf(k, E, 3), abs=0.01)


def test_permutation_chance_sees_load_imbalance():
    """A router that always picks experts {0, 1} for everyone: overlap 2 = k, also under a random pairing,
    so the load-aware divergence is undefined (nan) while the uniform one is 0."""
    s = torch.tensor([[0, 1]] * 100)
    assert rm.permutation_overlap(s, s) == 2.0
    assert math.isnan(rm.normalised_divergence(2.0, 2, 8, chance=2.0))


# ---------------------------------------------------------------------------------------------------
# entropy, JSD and the exit decision on hand-made distributions


def test_entropy_and_jsd_hand_made():
    V = 16
    assert entropy(torch.zeros(V)).item() == pytest.approx(math.log(V))
    peaked = torch.full((V,), -1e4)
    peaked[3] = 0.0
    assert entropy(peaked).item() == pytest.approx(0.0, abs=1e-6)
    p = torch.log(torch.tensor([1.0, 1e-30]))  # P = [1, 0]
    q = torch.log(torch.tensor([0.5, 0.5]))
    # M = [.75, .25]: KL(P||M) = ln(4/3), KL(Q||M) = (ln(2/3) + ln 2) / 2
    expected = 0.5 * (math.log(4 / 3) + 0.5 * (math.log(2 / 3) + math.log(2)))
    assert jsd(p, q, normalised=False).item() == pytest.approx(expected, abs=1e-6)
    assert jsd(q, p).item() == pytest.approx(expected / LN2, abs=1e-6)  # symmetric, in bits
    assert jsd(q, q).item() == pytest.approx(0.0, abs=1e-7)
    a = torch.tensor([0.0, -1e4, -1e4, -1e4])
    b = torch.tensor([-1e4, 0.0, -1e4, -1e4])
    assert jsd(a, b).item() == pytest.approx(1.0, abs=1e-6)  # disjoint supports: the maximum, ln 2 nats


def test_exit_decision_hand_made():
    V = 8
    low = torch.full((V,), -20.0)
    low[0] = 0.0  # entropy ~ 0
    flat = torch.zeros(V)  # entropy ln 8 = 2.08
    mid = torch.tensor([2.0, 2.0, -20, -20, -20, -20, -20, -20])  # entropy ln 2 = 0.69
    logits = torch.stack([low, flat, mid, low])
    assert ee.exit_decision(logits, 0.1).tolist() == [True, False, False, True]
    assert ee.exit_decision(logits, 1.0).tolist() == [True, False, True, True]
    assert ee.exit_decision(logits, -1.0).tolist() == [False] * 4
    # sequence mode, 2 rows of 2 tokens: row means (0 + 2.08) / 2 = 1.04 and (0.69 + 0) / 2 = 0.35
    assert ee.exit_decision(logits, 0.5, "sequence", 2).tolist() == [False, False, True, True]
    assert ee.exit_decision(logits, 1.1, "sequence", 2).tolist() == [True, True, True, True]


# ---------------------------------------------------------------------------------------------------
# the exit-enabled forward against the model


def tiny_cfg(**kw):
    from loopmoe.config import ModelConfig

    base = dict(vocab_size=64, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, n_prelude=1, n_loop=2, n_coda=1,
                loop_iters=2, max_seq_len=32, n_experts=8, expert_hidden=16, top_k=2, adaln_rank=8,
                linear_backend="torch")
    base.update(kw)
    return ModelConfig(**base)


def tiny_model(**kw):
    from loopmoe.model import LoopMoEModel

    torch.manual_seed(0)
    m = LoopMoEModel(tiny_cfg(**kw)).eval()
    with torch.no_grad():  # IterAdaLN starts at zero (iterations identical): give it something to do
        for name, p in m.named_parameters():
            if ".adaln.mod" in name:
                p.normal_(0.0, 0.2)
    return m


CASES = [dict(), dict(adaln="iter"), dict(adaln="token"), dict(adaln="none", loop_iters=3),
         dict(ffn="dense", dense_hidden=48), dict(input_reinjection=True), dict(n_coda=2, loop_iters=3)]


@pytest.mark.parametrize("kw", CASES, ids=[",".join(f"{k}={v}" for k, v in c.items()) or "default" for c in CASES])
def test_exit_runner_matches_model(kw):
    m = tiny_model(**kw)
    R = m.cfg.loop_iters
    tok = torch.randint(0, 64, (3, 20), generator=torch.Generator().manual_seed(1))
    runner = ee.ExitRunner(m, seq_len=20)
    with torch.no_grad():
        full = m(tok).logits
        exits = m(tok, exit_logits=True).exit_logits
        first = m(tok, exit_after=1).logits
    none = runner.run(tok, None)
    assert torch.allclose(none.logits, full, atol=1e-5) and (none.exit_at == R - 1).all()
    allx = runner.run(tok, math.inf)
    assert torch.allclose(allx.logits, first, atol=1e-5) and (allx.exit_at == 0).all()
    col = runner.run(tok, collect=True)
    assert len(col.readouts) == R and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(col.readouts, exits))
    # a mixed exit: the gathered execution computes the same function as whole blocks + masking
    ent = entropy(exits[0])
    thr = ent.median().item()
    mixed = runner.run(tok, thr)
    ref = runner.run(tok, thr, gather=False)
    assert 0 < (mixed.exit_at == 0).float().mean() < 1
    assert torch.equal(mixed.exit_at, ref.exit_at)
    assert torch.allclose(mixed.logits, ref.logits, atol=1e-5)
    assert torch.allclose(mixed.logits[mixed.exit_at == 0], first[mixed.exit_at == 0], atol=1e-5)
    # FLOPs counted while running = the analytic count for these exit fractions (one batch)
    frac = (torch.bincount(mixed.exit_at.flatten(), minlength=R).float() / tok.numel()).tolist()
    ana = ee.flops_for_fractions(runner.plan, runner.costs, frac, "token")
    assert mixed.flops / tok.numel() == pytest.approx(ana["executed"], rel=1e-9)
    # sequence mode is exact: exited rows are exit_after=1, the others the full model
    rows_ent = ent.mean(1)
    seq = runner.run(tok, rows_ent.median().item(), mode="sequence")
    for r in range(3):
        want = first[r] if seq.exit_at[r, 0] == 0 else (full[r] if seq.exit_at[r, 0] == R - 1 else None)
        if want is not None:
            assert torch.allclose(seq.logits[r], want, atol=1e-5)


def test_costs_add_up_to_the_flop_convention():
    from loopmoe import flops
    from loopmoe.config import load_config

    for cfg in (tiny_cfg(), tiny_cfg(adaln="iter"), tiny_cfg(n_loop=0, n_prelude=4, n_coda=0, loop_iters=1),
                load_config(os.path.join(ROOT, "configs", "loopmoe_3b.yaml")).model):
        c = ee.step_costs(cfg, 128)
        assert c.total == flops.forward_flops_per_token(cfg, 128)
        plan = ee.make_plan(cfg, 128)
        assert plan.exec_fraction[-1] == pytest.approx(1.0)
        assert ee.flops_for_fractions(plan, c, [0.0] * (plan.n - 1) + [1.0])["ideal_saved"] == pytest.approx(0.0)


def test_vanilla_exit_layer_matches_loop_flop_fraction():
    """The non-looped twin exits at the layer whose FLOP fraction is closest to the loop boundary's; its
    read-out there is norm + head of that layer's output."""
    loop = tiny_cfg()
    fr = ee.loop_fractions(loop, 20)
    van = tiny_model(n_prelude=4, n_loop=0, n_coda=0, loop_iters=1, n_heads=6, n_kv_heads=3, expert_hidden=24)
    plan = ee.make_plan(van.cfg, 20, fr)
    assert plan.n == 2 and not plan.looped
    cut = len(plan.segments[0])
    fracs = [ee.make_plan(van.cfg, 20, [f]).exec_fraction[0] for f in (0.3, 0.55, 0.8)]
    assert abs(plan.exec_fraction[0] - fr[0]) <= min(abs(f - fr[0]) for f in fracs) + 1e-12
    tok = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(2))
    res = ee.ExitRunner(van, plan).run(tok, math.inf)
    with torch.no_grad():
        h = van.embed(tok)
        for blk in list(van.prelude)[:cut]:
            h = blk(h, (van.rope_cos, van.rope_sin))[0]
        want = van.head(van.norm(h))
    assert torch.allclose(res.logits, want, atol=1e-5)


def test_forcing_own_routing_changes_nothing():
    from loopmoe.analysis.routing import collect, forced_test

    m = tiny_model()
    tok = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    bt = {"tokens": tok[:, :-1], "labels": tok[:, 1:], "loss_mask": torch.ones(2, 15)}
    data, per_batch = collect(m, [bt])
    with torch.no_grad():
        own = m(bt["tokens"], labels=bt["labels"], force_routing=per_batch[0]["topk"]).lm_loss.item()
    assert own == per_batch[0]["loss"]
    f = forced_test(m, [bt], per_batch)
    assert [r["name"] for r in f["rows"]][0].startswith("reuse iter 1")
    assert set(data["sets"]) == {1, 2} and data["sets"][1][0].shape == (30, 2)


# ---------------------------------------------------------------------------------------------------
# smoke runs of the commands on a checkpoint trained in a fixture

SMALL = ["model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=16", "model.n_experts=8",
         "model.expert_hidden=32", "model.top_k=2", "model.adaln_rank=8", "data.seq_len=64", "train.micro_batch=4",
         "optim.warmup_steps=1"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """600 documents of the demo corpus, a 512-piece tokenizer, and a tiny LoopMoE trained 25 steps in this
    process, saved in the checkpoint layout load_trained_model reads (step dir + latest)."""
    from loopmoe.config import load_config, save_config
    from loopmoe.data import build_datasets, load_tokenizer
    from loopmoe.data.sampler import collate
    from loopmoe.analysis.data import ensure_process_group
    from loopmoe.model import LoopMoEModel

    d = tmp_path_factory.mktemp("analysis")
    data = make_token_data(d, 600, 512)
    prefix, tok = data["prefix"], data["tok"]
    cfg = load_config(os.path.join(ROOT, "configs", "tiny_loopmoe.yaml"),
                      SMALL + [f"data.prefixes={prefix}", f"data.tokenizer_model={tok}", "model.vocab_size=512",
                               "model.linear_backend=torch", f"data.cache_dir={d / 'cache'}"])
    ensure_process_group()
    train_ds = build_datasets(cfg.data, load_tokenizer(tok), 100, 1, 1)[0]
    torch.manual_seed(0)
    model = LoopMoEModel(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(25):
        b = collate([train_ds[i] for i in range(4 * step, 4 * step + 4)])
        model(b["tokens"], labels=b["labels"], loss_mask=b["loss_mask"]).loss.backward()
        opt.step()
        opt.zero_grad()
    step_dir = d / "run" / "checkpoints" / "step_00000025"
    step_dir.mkdir(parents=True)
    save_config(cfg, str(step_dir / "config.yaml"))
    torch.save({"module": model.state_dict()}, step_dir / "mp_rank_00_model_states.pt")
    (d / "run" / "checkpoints" / "latest").write_text("step_00000025")
    return {"ckpt": str(d / "run" / "checkpoints"), "prefix": prefix, "tok": tok, "dir": d}


def test_routing_command(tiny_run, tmp_path, capsys):
    from loopmoe.analysis import routing

    out = tmp_path / "routing"
    assert routing.main(["--checkpoint", tiny_run["ckpt"], "--data", tiny_run["prefix"], "--tokenizer",
                         tiny_run["tok"], "--batches", "2", "--out", str(out)]) == 0
    rep = json.load(open(out / "routing.json"))
    assert [l["layer"] for l in rep["layers"]] == [1, 2]
    assert rep["tokens"] == 2 * 4 * 64
    p = rep["layers"][0]["pairs"][0]
    assert sum(p[f"overlap_{x}"] for x in range(3)) == pytest.approx(1.0)
    assert p["identical"] + p["partial"] + p["disjoint"] == pytest.approx(1.0)
    assert rep["forced"]["rows"][0]["name"].startswith("reuse iter 1")
    assert (out / "routing.png").stat().st_size > 0 and (out / "routing_forced.png").stat().st_size > 0
    assert "Causal test" in capsys.readouterr().out


def test_early_exit_command(tiny_run, tmp_path):
    out = tmp_path / "ee"
    assert ee.main(["--checkpoint", tiny_run["ckpt"], "--batches", "1", "--repeats", "1", "--mode", "both",
                    "--thresholds", "1,3,5", "--out", str(out), "--name", "t"]) == 0  # data from the checkpoint
    res = json.load(open(out / "t_early_exit.json"))
    assert res["plan"]["boundaries"] == ["iter 1", "iter 2"]
    for sw in res["sweeps"]:
        assert [r["threshold"] for r in sw["rows"]] == [None, 1.0, 3.0, 5.0, "inf"]
        assert sw["rows"][0]["exit_frac"] == [0.0, 1.0] and sw["rows"][-1]["exit_frac"] == [1.0, 0.0]
        assert all(r["tokens_per_s"] > 0 and r["ppl"] > 1 for r in sw["rows"])
    lens = res["logit_lens"]["boundaries"]
    assert lens[-1]["jsd"] == pytest.approx(0.0, abs=1e-6) and lens[-1]["converged"] == 1.0
    assert (out / "t_early_exit.png").exists() and (out / "t_logit_lens.png").exists()


def test_compare_quick(tiny_run, tmp_path):
    """The orchestration end to end: train (2 steps, through pretrain_loopmoe.py), evaluate, analyse, report."""
    from loopmoe.experiments import compare

    out, runs = tmp_path / "out", tmp_path / "runs"
    rc = compare.main(["--quick", "--models", "loopmoe,adaln_small", "--data", tiny_run["prefix"], "--tokenizer", tiny_run["tok"],
                       "--runs", str(runs), "--out", str(out), *[f"--set={s}" for s in SMALL]])
    assert rc == 0
    md = (out / "toy_comparison.md").read_text()
    assert "## Matching" in md and "## Held-out loss" in md and "## Routing divergence" in md
    assert "## Early exit" in md and "REDUCED run" in md
    assert "## IterAdaLN, examined" in md and "`model.adaln_init=small`" in md and "| `adaln_small` | 0 | 1 |" in md
    for png in ("loss_curves.png", "loopmoe_routing.png", "loopmoe_early_exit.png", "loopmoe_logit_lens.png"):
        assert (out / png).stat().st_size > 0, png
    res = json.load(open(out / "toy_comparison.json"))
    assert res["runs"][0]["heldout"]["loss"] > 0 and "loss_exit1" in res["runs"][0]["heldout"]


def test_ppl_at_saved_interpolates_in_loss_and_refuses_to_extrapolate():
    from loopmoe.experiments.sparse_layers import ppl_at_saved

    rows = [{"net_saved": 0.0, "loss": 2.0}, {"net_saved": 0.4, "loss": 3.0}, {"net_saved": 0.2, "loss": 2.2}]
    assert ppl_at_saved(rows, 0.1) == pytest.approx(math.exp(2.1))
    assert ppl_at_saved(rows, 0.3) == pytest.approx(math.exp(2.6))
    assert math.isnan(ppl_at_saved(rows, 0.5)) and math.isnan(ppl_at_saved(rows, -0.1))


@pytest.mark.slow
def test_compare_sparse_layers_suite_quick(tiny_run, tmp_path):
    """The Sparse-Layers suite in one command: its four models train (2 steps), and the page has the loss
    table, the looping penalties, the exit table and the routing classes of Looped-MoE."""
    from loopmoe.experiments import compare

    out, runs = tmp_path / "out", tmp_path / "runs"
    small = ["model.d_model=64", "model.head_dim=16", "model.expert_hidden=32", "data.seq_len=64",
             "train.micro_batch=4", "optim.warmup_steps=1"]
    rc = compare.main(["--suite", "sparse_layers", "--quick", "--data", tiny_run["prefix"], "--tokenizer",
                       tiny_run["tok"], "--runs", str(runs), "--out", str(out), *[f"--set={s}" for s in small]])
    assert rc == 0
    md = (out / "sparse_layers.md").read_text()
    for name in ("Base (16 dense layers)", "MoE (16 layers, top-2 of 8)", "Looped (8 dense x 2)",
                 "Looped-MoE (8 MoE x 2)", "Looped - Base", "Looped-MoE - MoE", "30% saved", "disjoint"):
        assert name in md, name
    res = json.load(open(out / "sparse_layers.json"))
    assert set(res["exits"]) == {"sl_base", "sl_moe", "sl_looped", "sl_looped_moe"}
    assert len(res["routing"]["sl_looped_moe"]["layers"]) == 8  # one row per loop layer
    cfgs = {r: json.load(open(runs / "sparse_layers_s2" / f"{r}_seed1" / "compare_run.json"))["cmd"] for r in res["exits"]}
    assert "model.n_loop=8" in cfgs["sl_looped_moe"] and "model.adaln=none" in cfgs["sl_looped_moe"]
