"""Sample text from a training checkpoint, with a KV cache and optional exit at a loop boundary.

    python -m loopmoe.generate --checkpoint runs/demo/checkpoints --prompt "The Python standard library"
    python -m loopmoe.generate --checkpoint ... --prompt ... --greedy --exit-after 1   # run 1 of R iterations
    python -m loopmoe.generate --checkpoint ... --prompt ... --exit-threshold 2.5 --kv-policy copy
        # per token: stop at the first loop boundary whose read-out entropy is <= 2.5 nats
        # (policy and the skipped iterations' KV entries: loopmoe/exit_decoding.py)
"""
from __future__ import annotations

if __name__ == "__main__":  # a quiet start, before megatron-core or DeepSpeed is imported (loopmoe/quiet.py)
    from loopmoe.quiet import quiet_start

    quiet_start()

import argparse
import sys
import time

import torch

from loopmoe.model.attention import KVCache


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None
                ) -> torch.Tensor:
    """logits [b, V] -> next token ids [b]. temperature 0 = greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # [b, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             eos_id: int | None = None, use_cache: bool = True, exit_after: int | None = None,
             seed: int | None = None, exit_threshold: float | None = None, kv_policy: str = "propagate",
             exits: list | None = None) -> torch.Tensor:
    """prompt_ids [b, s] -> [b, s + n]. With ``exit_after`` = k every token runs only k loop iterations
    (the cache then holds k entries per loop layer, consistently for all positions).

    ``exit_threshold`` (batch size 1, with the cache): each generated token stops at the first loop
    boundary whose exit read-out has entropy <= the threshold (nats); ``kv_policy`` ("copy" or
    "propagate") fills the skipped iterations' KV entries; the prompt runs the full model. See
    loopmoe/exit_decoding.py. ``exits``: a list that receives the loop iterations each generated token ran."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    if exit_threshold is not None:
        return _generate_exit(model, prompt_ids, max_new_tokens, temperature, top_k, eos_id, exit_threshold,
                              kv_policy, exits, gen)
    cache = KVCache() if use_cache else None
    ids = prompt_ids
    step_input = ids
    max_len = model.cfg.max_seq_len
    for _ in range(max_new_tokens):
        if ids.shape[1] >= max_len:
            break
        logits = model(step_input if use_cache else ids, cache=cache, exit_after=exit_after).logits[:, -1]  # [b, V]
        nxt = sample_next(logits, temperature, top_k, gen)  # [b]
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        step_input = nxt[:, None]
        if exits is not None:
            exits.append(exit_after or model.n_iters)
        if eos_id is not None and bool((nxt == eos_id).all()):
            break
    return ids


def _generate_exit(model, prompt_ids, max_new_tokens, temperature, top_k, eos_id, threshold, kv_policy, exits,
                   gen) -> torch.Tensor:
    from loopmoe.exit_decoding import ExitDecoder

    if prompt_ids.shape[0] != 1:
        raise ValueError("exit_threshold (per-token exit) decodes one sequence at a time (batch size 1)")
    dec = ExitDecoder(model, threshold, kv_policy)
    ids = prompt_ids
    logits, k = None, model.n_iters  # the prompt's last position runs the full model
    for _ in range(max_new_tokens):
        if ids.shape[1] >= model.cfg.max_seq_len:
            break
        logits, k = (dec.prefill(ids), model.n_iters) if logits is None else dec.step(ids[:, -1:])  # [1, V]
        nxt = sample_next(logits, temperature, top_k, gen)  # [1]
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        if exits is not None:
            exits.append(k)
        if eos_id is not None and int(nxt) == eos_id:
            break
    return ids


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a run's checkpoint directory (uses 'latest') or a step_* dir")
    ap.add_argument("--tag", help="step directory name inside --checkpoint (default: latest)")
    ap.add_argument("--prompt", default="", help="text to continue (default: empty; the context starts with EOS, "
                    "as a new document does in the training data)")
    ap.add_argument("--tokenizer", help="sentencepiece .model or tokenizer.json (default: data.tokenizer_model of the checkpoint's config)")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default: %(default)s)")
    ap.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: %(default)s)")
    ap.add_argument("--top-k", type=int, default=40, help="sample among the k most likely; 0 = all (default: %(default)s)")
    ap.add_argument("--greedy", action="store_true", help="argmax decoding (same as --temperature 0)")
    ap.add_argument("--exit-after", type=int, help="run only this many loop iterations (early exit at a loop boundary)")
    ap.add_argument("--exit-threshold", type=float, help="per-token exit: stop a token at the first loop boundary "
                    "whose read-out entropy (nats) is <= this (batch 1, with the cache; loopmoe/exit_decoding.py)")
    ap.add_argument("--kv-policy", default="propagate", choices=["copy", "propagate"],
                    help="with --exit-threshold, the skipped iterations' KV entries: copy the last executed "
                    "iteration's K/V, or propagate (K/V projections from the exited state) (default: %(default)s)")
    ap.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step (for checking)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    args = ap.parse_args(argv)

    from loopmoe.data.tokenizer import TextTokenizer
    from loopmoe.train.checkpoint import load_trained_model

    model, cfg = load_trained_model(args.checkpoint, args.tag)
    tok_path = args.tokenizer or cfg.data.tokenizer_model
    if not tok_path:
        print("error: the checkpoint's config names no tokenizer; pass --tokenizer PATH.model", file=sys.stderr)
        return 2
    sp = TextTokenizer(tok_path)  # sentencepiece .model or tokenizer.json
    # Training data has no BOS: documents are separated by EOS, so a new text starts after an EOS.
    ids = [sp.eos_id] + sp.encode(args.prompt)
    if args.exit_threshold is not None and (args.no_cache or args.exit_after):
        print("error: --exit-threshold decodes with the cache and decides the exit per token "
              "(not with --no-cache or --exit-after)", file=sys.stderr)
        return 2
    exits: list[int] = []
    t0 = time.perf_counter()
    out = generate(model, torch.tensor([ids]), args.max_new_tokens, 0.0 if args.greedy else args.temperature,
                   args.top_k, eos_id=sp.eos_id, use_cache=not args.no_cache, exit_after=args.exit_after,
                   seed=args.seed, exit_threshold=args.exit_threshold, kv_policy=args.kv_policy, exits=exits)
    dt = time.perf_counter() - t0
    new = out[0, len(ids):].tolist()
    print(f"--- prompt: {args.prompt!r}")
    print(args.prompt + sp.decode(new))
    print(f"--- {len(new)} tokens in {dt:.2f} s ({len(new) / max(dt, 1e-9):.1f} tokens/s)"
          + (f", exit after loop iteration {args.exit_after}" if args.exit_after else "")
          + (f", mean loop iterations {sum(exits) / max(len(exits), 1):.2f} of {model.n_iters} "
             f"(threshold {args.exit_threshold} nats, kv policy {args.kv_policy})"
             if args.exit_threshold is not None else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
