"""Build the text corpus of the demo model (scripts/train_demo_model.py) from Debian packages.

    python3 scripts/build_demo_corpus.py [--out corpus/demo] [--sample tests/data/demo_heldout.txt]

Every source is an openly licensed text that a Debian package ships; `apt-get download` fetches the
package (run `apt-get update` once first), `dpkg-deb -x` unpacks it, and the text is taken out of it
as plain paragraphs:

| source | package | licence |
|---|---|---|
| World English Bible (modern English prose) | sword-text-web | public domain |
| Python 3 documentation (tutorial, how-tos, reference) | python3.11-doc | PSF License Agreement v2 |
| The Jargon File 4.4.7 (hacker lexicon) | jargon-text | public domain |
| LibreOffice help, Hindi translation (Devanagari paragraphs only) | libreoffice-help-hi | MPL-2.0 |

The paragraphs of each source are packed into pieces of up to ~2,000 characters (never across a page or
a book); piece k goes to the held-out split when k % 50 == 7, to the training split otherwise, so the
split is the same on every run for the same package versions. Written under --out: train.jsonl and
heldout.jsonl (one piece a line: {"source", "text"}), and manifest.json (each source's package, version,
the .deb's sha256, licence, pieces and bytes per split). --sample writes the first held-out pieces of
every source, in turn, up to --sample-bytes, as plain text (pieces separated by a blank line): the small
held-out file that the tests read.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import html
import json
import os
import re
import struct
import subprocess
import unicodedata
import zlib
from html.parser import HTMLParser

PIECE_CHARS = 2000
HELDOUT_EVERY, HELDOUT_AT = 50, 7


def _clean(text: str) -> str:
    text = unicodedata.normalize("NFC", html.unescape(text)).replace("\u00a0", " ").replace("\u00b6", "")
    return re.sub(r"\s+", " ", text).strip()


# ----------------------------------------------------------------------------------------- extractors
def bible_web(root: str) -> list[list[str]]:
    """The SWORD zText module: zlib blocks (one a book) of OSIS markup; paragraphs end at <div eID .. x-p>.
    Footnotes, titles and Strong's-number markup are dropped, the words kept."""
    mod = glob.glob(os.path.join(root, "usr/share/sword/modules/texts/ztext/*/"))[0]
    books = []
    for testament in ("ot", "nt"):
        index = open(os.path.join(mod, f"{testament}.bzs"), "rb").read()
        blob = open(os.path.join(mod, f"{testament}.bzz"), "rb").read()
        for i in range(len(index) // 12):
            offset, size, _ = struct.unpack("<III", index[12 * i:12 * i + 12])
            osis = zlib.decompress(blob[offset:offset + size]).decode("utf-8")
            osis = re.sub(r"<note\b.*?</note>|<title\b.*?</title>", " ", osis, flags=re.S)
            paras = [_clean(re.sub(r"<[^>]+>", "", p)) for p in re.split(r'<div eID="[^"]*" type="x-p"/>', osis)]
            paras = [p for p in paras if len(p) > 1]
            if paras:
                books.append(paras)
    return books


class _Paragraphs(HTMLParser):
    """Text of <p> and <h1>-<h3> elements, outside code, navigation, headers, footers and sidebars."""

    SKIP = {"script", "style", "pre", "nav", "header", "aside", "footer"}
    SKIP_DIVS = {"footer", "related", "sphinxsidebar", "highlight"}
    KEEP = {"p", "h1", "h2", "h3"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.paras, self.buf = [], []
        self.skip = self.keep = self.divs = 0
        self.skip_divs: list[int] = []  # the div depth at which each skipped div opened

    def handle_starttag(self, tag, attrs):
        if tag == "div":
            self.divs += 1
            if set((dict(attrs).get("class") or "").split()) & self.SKIP_DIVS:
                self.skip_divs.append(self.divs)
        elif tag in self.SKIP:
            self.skip += 1
        elif tag in self.KEEP:
            if self.keep:  # an unclosed <p>: close it
                self._flush()
            self.keep = 1

    def handle_endtag(self, tag):
        if tag == "div":
            if self.skip_divs and self.skip_divs[-1] == self.divs:
                self.skip_divs.pop()
            self.divs = max(0, self.divs - 1)
        elif tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag in self.KEEP and self.keep:
            self._flush()

    def handle_data(self, data):
        if self.keep and not self.skip and not self.skip_divs:
            self.buf.append(data)

    def _flush(self):
        text = _clean("".join(self.buf))
        if text:
            self.paras.append(text)
        self.buf, self.keep = [], 0


def html_paragraphs(path: str) -> list[str]:
    parser = _Paragraphs()
    with open(path, encoding="utf-8", errors="replace") as f:
        parser.feed(f.read())
    return parser.paras


def python_docs(root: str) -> list[list[str]]:
    """The prose parts of the Python docs (no C API, no changelogs): one document a page."""
    base = glob.glob(os.path.join(root, "usr/share/doc/python3.*/html"))[0]
    pages = []
    for sub in ("tutorial", "howto", "faq", "reference", "library", "glossary.html", "using", "extending"):
        path = os.path.join(base, sub)
        files = sorted(glob.glob(os.path.join(path, "**/*.html"), recursive=True)) if os.path.isdir(path) else [path]
        for file in files:
            paras = [p for p in html_paragraphs(file) if len(p) >= 20 and not p.startswith(("Source code:", "©"))]
            if paras:
                pages.append(paras)
    return pages


def jargon_file(root: str) -> list[list[str]]:
    """The Jargon File's plain-text edition, its entries from the lexicon on; tables and rules dropped."""
    with gzip.open(os.path.join(root, "usr/share/doc/jargon-text/jargon.txt.gz"), "rt", encoding="utf-8") as f:
        text = f.read()
    entries, current = [], []
    for block in re.split(r"\n\s*\n", text):
        if re.search(r"[\u2500-\u257f]|_{5,}|-{5,}", block):
            continue
        para = _clean(block)
        head = re.match(r":([^:]+):\s*(.*)$", para)
        if head:  # ":term: pronunciation, n." starts a new entry
            if current:
                entries.append(current)
            current = [f"{head.group(1)}: {head.group(2)}".strip()]
        elif para:
            current.append(re.sub(r"\{([^{}]+)\}", r"\1", para))
    if current:
        entries.append(current)
    return entries


def _devanagari_share(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    return sum("\u0900" <= c <= "\u097f" for c in letters) / max(1, len(letters))


def libreoffice_hindi(root: str) -> list[list[str]]:
    """The Hindi LibreOffice help: paragraphs mostly in Devanagari (the untranslated ones are English)."""
    pages = []
    for file in sorted(glob.glob(os.path.join(root, "usr/share/libreoffice/help/hi/**/*.html"), recursive=True)):
        paras = [p for p in html_paragraphs(file) if len(p) >= 20 and _devanagari_share(p) >= 0.6]
        if paras:
            pages.append(paras)
    return pages


SOURCES = [
    # name, Debian package, licence, extractor
    ("world-english-bible", "sword-text-web", "public domain", bible_web),
    ("python-docs", "python3.11-doc", "PSF License Agreement v2", python_docs),
    ("jargon-file", "jargon-text", "public domain", jargon_file),
    ("libreoffice-help-hi", "libreoffice-help-hi", "MPL-2.0", libreoffice_hindi),
]


# ------------------------------------------------------------------------------------------ pipeline
def fetch(package: str, debs: str) -> tuple[str, str, str]:
    """Download the package's .deb into debs (unless there) and unpack it; (root, version, sha256)."""
    os.makedirs(debs, exist_ok=True)
    found = glob.glob(os.path.join(debs, f"{package}_*.deb"))
    if not found:
        subprocess.run(["apt-get", "download", package], cwd=debs, check=True)
        found = glob.glob(os.path.join(debs, f"{package}_*.deb"))
    deb = sorted(found)[-1]
    root = os.path.join(debs, "unpacked", package)
    if not os.path.isdir(root):
        os.makedirs(os.path.dirname(root), exist_ok=True)
        subprocess.run(["dpkg-deb", "-x", deb, root + ".tmp"], check=True)
        os.replace(root + ".tmp", root)
    version = subprocess.run(["dpkg-deb", "-f", deb, "Version"], check=True, capture_output=True, text=True).stdout
    return root, version.strip(), hashlib.sha256(open(deb, "rb").read()).hexdigest()


def pieces(documents: list[list[str]]) -> list[str]:
    """Paragraphs packed into pieces of up to PIECE_CHARS (a longer paragraph is a piece alone), one
    document at a time; paragraphs separated by a newline."""
    out = []
    for doc in documents:
        buf = []
        for para in doc:
            if buf and sum(len(p) + 1 for p in buf) + len(para) > PIECE_CHARS:
                out.append("\n".join(buf))
                buf = []
            buf.append(para)
        if buf:
            out.append("\n".join(buf))
    return out


def build(out: str, debs: str) -> dict:
    os.makedirs(out, exist_ok=True)
    manifest = {"piece_chars": PIECE_CHARS, "heldout": f"piece k with k % {HELDOUT_EVERY} == {HELDOUT_AT}",
                "sources": []}
    with open(os.path.join(out, "train.jsonl"), "w") as train, open(os.path.join(out, "heldout.jsonl"), "w") as held:
        for name, package, licence, extract in SOURCES:
            root, version, sha = fetch(package, debs)
            split = {"train": [0, 0], "heldout": [0, 0]}
            for k, text in enumerate(pieces(extract(root))):
                which = "heldout" if k % HELDOUT_EVERY == HELDOUT_AT else "train"
                (held if which == "heldout" else train).write(json.dumps({"source": name, "text": text},
                                                                         ensure_ascii=False) + "\n")
                split[which][0] += 1
                split[which][1] += len(text.encode("utf-8"))
            entry = {"name": name, "package": package, "version": version, "deb_sha256": sha, "licence": licence}
            for s, (n, size) in split.items():
                entry[f"{s}_pieces"], entry[f"{s}_bytes"] = n, size
            manifest["sources"].append(entry)
            print(f"{name}: {entry['train_pieces']} + {entry['heldout_pieces']} pieces, "
                  f"{entry['train_bytes'] / 1e6:.2f} + {entry['heldout_bytes'] / 1e6:.2f} MB", flush=True)
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    return manifest


def write_sample(heldout: str, path: str, max_bytes: int) -> int:
    """Held-out pieces, one of each source in turn, up to max_bytes of UTF-8: the tests' held-out text."""
    by_source: dict[str, list[str]] = {}
    with open(heldout) as f:
        for line in f:
            row = json.loads(line)
            by_source.setdefault(row["source"], []).append(row["text"])
    chosen, size, k = [], 0, 0
    while any(k < len(v) for v in by_source.values()):
        for texts in by_source.values():
            if k < len(texts):
                n = len(texts[k].encode("utf-8")) + 2
                if size + n > max_bytes:
                    break
                chosen.append(texts[k])
                size += n
        else:
            k += 1
            continue
        break
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n\n".join(chosen) + "\n")
    return size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="corpus/demo", help="where train.jsonl, heldout.jsonl, manifest.json go")
    p.add_argument("--debs", default=None,
                   help="where the .deb files are downloaded and unpacked (default: debs/ beside OUT, so that OUT "
                        "holds only the corpus)")
    p.add_argument("--sample", default=None, help="also write a small held-out text file here")
    p.add_argument("--sample-bytes", type=int, default=32_000)
    args = p.parse_args()
    build(args.out, args.debs or os.path.join(os.path.dirname(os.path.abspath(args.out)), "debs"))
    if args.sample:
        n = write_sample(os.path.join(args.out, "heldout.jsonl"), args.sample, args.sample_bytes)
        print(f"held-out sample: {n} bytes -> {args.sample}")


if __name__ == "__main__":
    main()
