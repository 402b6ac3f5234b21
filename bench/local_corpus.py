"""Build a benchmark corpus of real text from what is installed on this machine (no network): JSON lines.

    python bench/local_corpus.py --out /tmp/bench_corpus.jsonl --megabytes 80

It is not the demo corpus (the Python documentation) on purpose: a benchmark should see text its
tokenizer was not tuned on. One document per file, three kinds mixed in a fixed (seeded) order:
* prose: Debian's package documentation under /usr/share/doc (copyright files, changelogs, READMEs,
  gzip'd or not) and the manual pages under /usr/share/man (roff source) - much of it has non-ASCII
  names and symbols;
* code: the Python sources of the installed packages (the venv's site-packages: torch, numpy, ...).
Files that are not UTF-8, empty, or larger than --max-doc-kb are left out; exact duplicates are kept
once. The same machine and packages give the same corpus; the report prints its size and document count.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import random
import sys
import sysconfig


def _read(path: str, max_bytes: int) -> str | None:
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data) if len(data) <= max_bytes else None
        if not data or len(data) > max_bytes or b"\x00" in data:
            return None
        text = data.decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile):
        return None
    return text if text.strip() else None


def _files(root: str, keep) -> list[str]:
    out = []
    for d, _, names in os.walk(root):
        out.extend(os.path.join(d, n) for n in names if keep(n))
    return sorted(out)


def sources() -> dict[str, list[str]]:
    site = sysconfig.get_paths()["purelib"]
    docs = _files("/usr/share/doc", lambda n: n == "copyright" or n.endswith((".gz", ".txt", ".md")) or
                  n.startswith(("README", "NEWS", "changelog")))
    man = _files("/usr/share/man", lambda n: n.endswith(".gz"))
    code = _files(site, lambda n: n.endswith(".py"))
    return {"prose": docs + man, "code": code}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON lines file to write ({'text': ..., 'source': ...})")
    p.add_argument("--megabytes", type=float, default=80, help="stop at about this much JSON (default: 80)")
    p.add_argument("--max-doc-kb", type=int, default=256, help="leave out larger files (default: 256)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    pools = sources()
    for files in pools.values():
        rng.shuffle(files)
    budget = int(args.megabytes * 1e6)
    seen: set[bytes] = set()
    written = docs = 0
    per_kind = {k: 0 for k in pools}
    iters = {k: iter(v) for k, v in pools.items()}
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        while written < budget and iters:
            # the kind with fewer bytes so far goes next: about as much prose as code, in any slice
            for kind in [min(iters, key=per_kind.__getitem__)]:
                path = next(iters[kind], None)
                if path is None:
                    del iters[kind]
                    continue
                text = _read(path, args.max_doc_kb << 10)
                if text is None:
                    continue
                h = hashlib.sha1(text.encode("utf-8")).digest()
                if h in seen:
                    continue
                seen.add(h)
                line = json.dumps({"text": text, "source": kind}, ensure_ascii=False) + "\n"
                f.write(line)
                n = len(line.encode("utf-8"))
                written += n
                per_kind[kind] += n
                docs += 1
    os.replace(tmp, args.out)
    print(f"wrote {args.out}: {docs:,} documents, {written / 1e6:.1f} MB "
          f"({', '.join(f'{k} {v / 1e6:.1f} MB' for k, v in per_kind.items())})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
