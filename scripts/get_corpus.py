"""Fetch the demo corpus: the English reStructuredText sources of the Python 3.11 documentation.

Why this corpus: it is real English prose written by people (~11 MB, PSF licence), it comes offline from
Debian's package registry (package ``python3.11-doc``), and it needs no hub at run time.
Each section of each page becomes one JSON line ``{"text": ..., "source": "library/os.rst#3"}``.

Idempotent: does nothing when the output exists. Written to a temporary name, then renamed.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile

PACKAGE = "python3.11-doc"
SOURCES = "usr/share/doc/python3.11/html/_sources"
# An RST section title is a text line followed by an underline of one repeated punctuation character.
_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+<>])\1{2,}\s*$")


def _run(cmd: list[str], cwd: str) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=cwd, check=True)


def download_deb(cache: str) -> str:
    debs = glob.glob(os.path.join(cache, f"{PACKAGE}_*.deb"))
    if debs:
        return debs[0]
    os.makedirs(cache, exist_ok=True)
    try:
        _run(["apt-get", "download", "-q", PACKAGE], cwd=cache)
    except (subprocess.CalledProcessError, FileNotFoundError):
        _run(["apt-get", "update", "-q"], cwd=cache)
        _run(["apt-get", "download", "-q", PACKAGE], cwd=cache)
    debs = glob.glob(os.path.join(cache, f"{PACKAGE}_*.deb"))
    if not debs:
        sys.exit(f"error: apt-get download {PACKAGE} produced no .deb in {cache}")
    return debs[0]


def split_sections(text: str) -> list[str]:
    """Split one page into sections at RST titles; tiny fragments are merged into the previous one."""
    lines = text.splitlines()
    starts = [0]
    for i in range(1, len(lines)):
        if _UNDERLINE.match(lines[i]) and lines[i - 1].strip() and not _UNDERLINE.match(lines[i - 1]):
            # A title may also carry an overline of the same character: start the section there.
            over = i - 2 if i >= 2 and lines[i - 2].strip() == lines[i].strip() else i - 1
            starts.append(over)
    starts.append(len(lines))
    sections: list[str] = []
    for a, b in zip(starts, starts[1:]):
        chunk = "\n".join(lines[a:b]).strip()
        if not chunk:
            continue
        if sections and len(chunk) < 200:
            sections[-1] += "\n\n" + chunk
        else:
            sections.append(chunk)
    return sections


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/corpus/python_docs.jsonl", help="output jsonl (default: %(default)s)")
    ap.add_argument("--cache", default="data/cache", help="where the .deb is kept (default: %(default)s)")
    args = ap.parse_args()
    if os.path.exists(args.out):
        print(f"corpus: {args.out} exists ({os.path.getsize(args.out) / 1e6:.1f} MB), nothing to do")
        return
    deb = os.path.abspath(download_deb(args.cache))
    with tempfile.TemporaryDirectory() as tmp:
        _run(["dpkg-deb", "-x", deb, tmp], cwd=tmp)
        files = sorted(glob.glob(os.path.join(tmp, SOURCES, "**", "*.rst.txt"), recursive=True))
        if not files:
            sys.exit(f"error: no *.rst.txt under {SOURCES} in {deb}")
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        part = args.out + ".tmp"
        n_docs = n_bytes = 0
        with open(part, "w", encoding="utf-8") as f:
            for path in files:
                rel = os.path.relpath(path, os.path.join(tmp, SOURCES))[: -len(".txt")]
                with open(path, encoding="utf-8") as src:
                    for i, sec in enumerate(split_sections(src.read())):
                        f.write(json.dumps({"text": sec, "source": f"{rel}#{i}"}, ensure_ascii=False) + "\n")
                        n_docs += 1
                        n_bytes += len(sec.encode())
        os.replace(part, args.out)
    print(f"corpus: wrote {args.out}: {n_docs} documents, {n_bytes / 1e6:.1f} MB of text from {len(files)} pages")


if __name__ == "__main__":
    main()
