"""Per-token entropy exit in KV-cached decoding (loopmoe/exit_decoding.py)."""
import math

import pytest
import torch
import torch.nn.functional as F

from loopmoe.config import load_config
from loopmoe.exit_decoding import ExitDecoder, flops_saved, teacher_forced
from loopmoe.generate import generate
from loopmoe.model import LoopMoEModel, core
from loopmoe.model.attention import KVCache
from tests.conftest import ROOT

torch.set_num_threads(1)
V = 256


def tiny(**over):
    cfg = load_config(f"{ROOT}/configs/tiny_loopmoe.yaml").model
    cfg.linear_backend = "torch"
    cfg.vocab_size = V
    cfg.d_model, cfg.expert_hidden = 64, 48
    cfg.loop_iters = 3
    for k, v in over.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    model = LoopMoEModel(cfg).eval()
    with torch.no_grad():  # move IterAdaLN off its zero init so iterations really differ; sharpen the head
        for name, p in model.named_parameters():
            if ".adaln.mod" in name:
                p.normal_(0, 0.05)
        model.head.weight.mul_(40.0)  # entropies spread over [0, ln V], so a threshold splits the tokens
    return model


def mid_threshold(model, tokens):
    """The median entropy of the first boundary's read-out: about half the tokens exit there."""
    with torch.no_grad():
        ent = core.entropy(model(tokens, exit_logits=True).exit_logits[0])
    return float(ent.median())


def decode_tf(model, tokens, threshold, policy, prompt=0):
    """Teacher-forced: logits [s - prompt, V] and iterations run for every position after the prompt."""
    dec = ExitDecoder(model, threshold, policy)
    out, ks = [], []
    if prompt:
        dec.prefill(tokens[:, :prompt])
    for t in range(prompt, tokens.shape[1]):
        lg, k = dec.step(tokens[:, t:t + 1])
        out.append(lg)
        ks.append(k)
    return torch.cat(out), ks


@pytest.mark.parametrize("policy", ["copy", "propagate"])
def test_threshold_zero_is_the_full_model(policy):
    model = tiny()
    tokens = torch.randint(0, V, (1, 14))
    lg, ks = decode_tf(model, tokens, 0.0, policy, prompt=4)
    with torch.no_grad():
        full = model(tokens).logits[0, 4:]
    assert ks == [model.n_iters] * 10
    torch.testing.assert_close(lg, full, atol=1e-5, rtol=1e-5)
    prompt = tokens[:, :5]
    assert torch.equal(generate(model, prompt, 12, exit_threshold=0.0, kv_policy=policy), generate(model, prompt, 12))


@pytest.mark.parametrize("policy", ["copy", "propagate"])
def test_threshold_inf_is_exit_after_one(policy):
    model = tiny(input_reinjection=True)
    tokens = torch.randint(0, V, (1, 12))
    dec = ExitDecoder(model, math.inf, policy)
    cache = KVCache()
    with torch.no_grad():
        for t in range(12):
            lg, k = dec.step(tokens[:, t:t + 1])
            ref = model(tokens[:, t:t + 1], cache=cache, exit_after=1).logits[:, -1]
            assert k == 1
            torch.testing.assert_close(lg, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lg, model(tokens, exit_after=1).logits[:, -1], atol=1e-5, rtol=1e-5)
    exits = []
    a = generate(model, tokens[:, :3], 10, exit_threshold=math.inf, kv_policy=policy, exits=exits)
    assert exits == [model.n_iters] + [1] * 9  # the first new token comes from the (full) prefill
    # the reference, by hand: the full-depth prefill (so the prompt's coda K/V come from the full state,
    # unlike generate(exit_after=1), whose prefill stops early too), then exit_after=1 steps on the cache
    ref_cache, ids = KVCache(), tokens[:, :3]
    with torch.no_grad():
        nxt = model(ids, cache=ref_cache).logits[:, -1].argmax(-1)
        for _ in range(10):
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            if ids.shape[1] == 13:
                break
            nxt = model(nxt[:, None], cache=ref_cache, exit_after=1).logits[:, -1].argmax(-1)
    assert torch.equal(a, ids)


# ---------------------------------------------------------------------------------------------------
# An independent reference: no cache, the whole prefix recomputed for every position, with the policy
# applied to the earlier positions' exits (frozen states; their K/V at skipped iterations copied from
# their last executed iteration, or projected from the frozen state).


def _attn_kv(blk, a_in, cos, sin):
    a = blk.attn
    q, k, v = core.split_qkv(a.qkv(a_in), a.n_kv_local, a.q_per_kv, a.head_dim)  # [1, s, heads, hd]
    q = core.rotate(q, cos[:, None], sin[:, None]).transpose(1, 2)
    k = core.rotate(k, cos[:, None], sin[:, None]).transpose(1, 2)
    return q, k, v.transpose(1, 2)  # [1, heads, s, hd]


def _attend(blk, q, k, v):
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # [1, H, s, hd]
    return blk.attn.proj(y.transpose(1, 2).flatten(2))


@torch.no_grad()
def reference_decode(model, tokens, threshold, policy):
    """Iterations run and logits for every position, each recomputed from scratch (no KVCache)."""
    cfg, R = model.cfg, model.n_iters
    rope = (model.rope_cos, model.rope_sin)
    exits, logits = [], []
    for t in range(tokens.shape[1]):
        x = tokens[:, :t + 1]
        s = t + 1
        cos, sin = model.rope_cos[:s], model.rope_sin[:s]
        h = model.embed(x)
        for blk in model.prelude:
            h = blk(h, rope)[0]
        x0 = h
        ran = torch.tensor(exits + [R])  # earlier positions: their exits; position t: runs all R here
        last_kv = {}
        states = []  # position t's state after each iteration
        for it in range(R):
            run = (ran > it)[None, :, None]  # [1, s, 1] positions still running at this iteration
            e_k = model.iter_embed(it) if model.iter_embed is not None else None
            if it > 0 and cfg.input_reinjection:
                h = torch.where(run, h + x0, h)
            for j, blk in enumerate(model.loop):
                a_in, mods = blk.attention_input(h, e_k)
                q, k, v = _attn_kv(blk, a_in, cos, sin)
                if policy == "copy" and it > 0:
                    keep = (ran > it)[None, None, :, None]  # [1, 1, s, 1]
                    k, v = torch.where(keep, k, last_kv[j][0]), torch.where(keep, v, last_kv[j][1])
                last_kv[j] = (k, v)
                h = torch.where(run, blk.finish(h, _attend(blk, q, k, v), mods)[0], h)
            states.append(h[:, -1:])
        final_past = h[:, :-1]  # earlier positions: their exit states (frozen once exited)

        def read(h_t):
            hs = torch.cat([final_past, h_t], dim=1)
            for blk in model.coda:
                hs = blk(hs, rope)[0]
            return model.head(model.norm(hs))[0, -1]

        for it in range(R):
            lg = read(states[it])
            if it == R - 1 or float(core.entropy(lg)) <= threshold:
                exits.append(it + 1)
                logits.append(lg)
                break
    return torch.stack(logits), exits


@pytest.mark.parametrize("policy, reinjection", [("copy", False), ("propagate", False), ("copy", True),
                                                 ("propagate", True)])
def test_cached_exit_decode_equals_no_cache_reference(policy, reinjection):
    model = tiny(input_reinjection=reinjection)
    tokens = torch.randint(0, V, (1, 12))
    thr = mid_threshold(model, tokens)
    lg, ks = decode_tf(model, tokens, thr, policy)
    ref_lg, ref_ks = reference_decode(model, tokens, thr, policy)
    assert ks == ref_ks
    assert 1 in ks and any(k > 1 for k in ks), ks  # the case mixes exits and continues
    torch.testing.assert_close(lg, ref_lg, atol=1e-4, rtol=1e-4)


def test_policies_differ_and_exits_change_later_tokens():
    """Sanity that the reference test can fail: the two KV policies give different later logits."""
    model = tiny()
    tokens = torch.randint(0, V, (1, 12))
    thr = mid_threshold(model, tokens)
    a, ka = decode_tf(model, tokens, thr, "copy")
    b, kb = decode_tf(model, tokens, thr, "propagate")
    first = ka.index(1)
    assert not torch.allclose(a[first + 1:], b[first + 1:], atol=1e-4)


def test_teacher_forced_loss_at_threshold_zero_is_the_forward_loss():
    model = tiny()
    tokens = torch.randint(0, V, (2, 10))
    labels = torch.randint(0, V, (2, 10))
    mask = torch.ones(2, 10)
    mask[0, :3] = 0
    with torch.no_grad():
        ref = float(model(tokens, labels=labels, loss_mask=mask).lm_loss)
    for thr in (0.0, None):
        r = teacher_forced(model, tokens, labels, mask, threshold=thr)
        assert r["ce_sum"] / r["n"] == pytest.approx(ref, rel=1e-5)
        assert r["exit_counts"].tolist() == [0, 0, 20]
    r1 = teacher_forced(model, tokens, labels, mask, threshold=math.inf)
    with torch.no_grad():
        ref1 = float(model(tokens, labels=labels, loss_mask=mask, exit_after=1).lm_loss)
    assert r1["ce_sum"] / r1["n"] == pytest.approx(ref1, rel=1e-5) and r1["exit_counts"].tolist() == [20, 0, 0]


def test_flops_saved():
    model = tiny()
    none = flops_saved(model, [0, 0, 1], 64, "copy")
    assert none["saved"] < 0  # read-outs at two boundaries, nobody exits: a net loss
    all1 = flops_saved(model, [1, 0, 0], 64, "copy")
    assert all1["saved"] == pytest.approx(flops_saved(model, [], 64, exit_after=1)["saved"])
    assert flops_saved(model, [], 64, exit_after=3)["saved"] == pytest.approx(0.0)
    prop = flops_saved(model, [0.5, 0.2, 0.3], 64, "propagate")
    assert prop["saved"] < flops_saved(model, [0.5, 0.2, 0.3], 64, "copy")["saved"]
