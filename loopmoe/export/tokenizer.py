"""The exported tokenizer: a ``PreTrainedTokenizerFast`` built from the sentencepiece model and checked
to encode exactly like it (``_TOKENIZER_PROBES``), and the special ids it defines."""
from __future__ import annotations

_TOKENIZER_PROBES = [
    "", " ", "  ", "    ", "\n", "\t", "Hello world", " leading space", "  two leading", "trailing  ",
    "a  b   c    d", "def f(x):\n    return x  + 12345\n", "if x:\n\tpass\n        y = 2\n", "0.5e-10 1,234,567",
    "ünïcödé 日本語 한국어 🚀 \u200b", "x=[1,2,3];y={'a': None}", "The Python standard library's `os.path`.",
    "Question: What is 2 + 2?\nAnswer: 4", "   \n   \n", "▁literal metaspace▁▁", "<<>> </ >",
]


def spm_special_ids(spm_path: str) -> dict[str, int | None]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=spm_path)
    get = lambda i: i if i >= 0 else None  # noqa: E731
    return {"unk": get(sp.unk_id()), "bos": get(sp.bos_id()), "eos": get(sp.eos_id()), "pad": get(sp.pad_id())}


def json_tokenizer(text_tok, model_max_length: int = 4096):
    """A ``PreTrainedTokenizerFast`` over a tokenizer.json, its eos (the training EOD), bos, pad, unk named."""
    from transformers import PreTrainedTokenizerFast

    tok = text_tok.hf._tok
    name = lambda i: tok.id_to_token(i) if i is not None else None  # noqa: E731
    return PreTrainedTokenizerFast(tokenizer_file=text_tok.path, eos_token=name(text_tok.eos_id),
                                   bos_token=name(text_tok.bos_id), pad_token=name(text_tok.pad_id),
                                   unk_token=name(text_tok.unk_id), model_max_length=model_max_length)


def build_tokenizer(spm_path: str, model_max_length: int = 4096):
    """A ``PreTrainedTokenizerFast`` (tokenizers BPE) encoding exactly like the sentencepiece BPE model.

    sentencepiece (our train_tokenizer.py settings): optional precompiled normaliser, a dummy "▁" prefix,
    spaces -> "▁", words split before a "▁" that follows a non-space (runs of spaces stay one word with
    the next word when ``allow_whitespace_only_pieces``), BPE by piece score, bytes for unknown
    characters. Checked against sentencepiece on probe strings; raises if any differs."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    proto = pb.ModelProto()
    with open(spm_path, "rb") as f:
        proto.ParseFromString(f.read())
    ts, ns = proto.trainer_spec, proto.normalizer_spec
    if ts.model_type != pb.TrainerSpec.BPE:
        raise ValueError(f"{spm_path}: only sentencepiece BPE models are converted (this one is "
                         f"{pb.TrainerSpec.ModelType.Name(ts.model_type)})")
    if ts.treat_whitespace_as_suffix or not ts.split_by_whitespace:
        raise ValueError(f"{spm_path}: treat_whitespace_as_suffix / split_by_whitespace=false are not supported")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    normal = {p.piece: p.score for p in proto.pieces if p.type in (pb.ModelProto.SentencePiece.NORMAL,
                                                                   pb.ModelProto.SentencePiece.USER_DEFINED)}
    merges = []
    for piece, score in normal.items():  # every split of a piece into two pieces is a merge, ranked by score
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in normal and right in normal:
                merges.append((score, vocab[piece], vocab[left], vocab[right], left, right))
    merges.sort(key=lambda m: (-m[0], m[1], m[2], m[3]))
    unk = proto.pieces[ts.unk_id].piece
    tok = Tokenizer(BPE(vocab=vocab, merges=[(m[4], m[5]) for m in merges], unk_token=unk, fuse_unk=True,
                        byte_fallback=ts.byte_fallback))
    norms = []
    if ns.precompiled_charsmap:
        norms.append(normalizers.Precompiled(ns.precompiled_charsmap))
    if ns.remove_extra_whitespaces:
        norms += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if ns.add_dummy_prefix:
        norms.append(normalizers.Prepend("▁"))
    norms.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(norms)
    word = "▁*[^▁]+|▁+" if ts.allow_whitespace_only_pieces else "▁[^▁]*|[^▁]+"
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(word), behavior="isolated")
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if ns.add_dummy_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)

    ids = spm_special_ids(spm_path)
    piece = lambda i: proto.pieces[i].piece if i is not None else None  # noqa: E731
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=piece(ids["unk"]), bos_token=piece(ids["bos"]),
        eos_token=piece(ids["eos"]), pad_token=piece(ids["pad"]), padding_side="left",
        model_max_length=model_max_length, clean_up_tokenization_spaces=False)
    sp = spm.SentencePieceProcessor(model_file=spm_path)
    for s in _TOKENIZER_PROBES:
        a, b = sp.encode(s), hf_tok.encode(s, add_special_tokens=False)
        if a != b:
            raise RuntimeError(f"tokenizer conversion of {spm_path} differs from sentencepiece on {s!r}: "
                               f"{a} vs {b}; report this (the export is not written with a wrong tokenizer)")
    return hf_tok
