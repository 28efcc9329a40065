"""Prepare the offline language-model demo: the King James Version of the Bible (1611; its copyright
has expired: public domain, as Debian's copyright file for the package says) from Debian's
`bible-kjv-text` (the text, compressed) and `bible-kjv` (the program that reads it; GPL-2.0-or-later),
unpacked with `apt-get download` and `dpkg-deb -x` into a throwaway folder: nothing is installed.

  python benchmarks/lm_data.py [--out DIR] [--vocab 4096]

Writes, under --out (default ~/.cache/kdsweep/lm-demo; never inside this repository):
  kjv/<nn>-<book>.txt   the 66 books, one document each, verse numbers and headings taken out
                        (about 4.3 MB, 31,102 verses, one verse a line)
  tokenizer/            a byte-level BPE tokenizer of --vocab tokens trained on those books
                        (save_pretrained; <|endoftext|> ends a document and pads)
Use them as `dataset.root` and `dataset.tokenizer` (dataset.name: lm_text): search_spaces/lm_kjv.yaml.
`--debs DIR` takes the two .deb files from DIR instead of apt-get (a machine without Debian's archive).
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

PACKAGES = ("bible-kjv-text", "bible-kjv")
HEADING = re.compile(r"^(?P<book>[1-3]?\s?[A-Z][A-Za-z ]+?) (?P<chapter>\d+)$")
VERSE = re.compile(r"^\s+(?P<n>\d+) (?P<text>.*)$")


def unpack(debs: Path | None, work: Path) -> Path:
    """The two packages' files under `work`/root (from --debs, else apt-get download)."""
    if debs is None:
        subprocess.run(["apt-get", "download", *PACKAGES], cwd=work, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        debs = work
    root = work / "root"
    for name in PACKAGES:
        found = sorted(debs.glob(f"{name}_*.deb"))
        if not found:
            raise SystemExit(f"lm_data.py: no {name}_*.deb in {debs}: `apt-get download {' '.join(PACKAGES)}` there")
        subprocess.run(["dpkg-deb", "-x", str(found[-1]), str(root)], check=True)
    return root


def books(dump: str) -> list[tuple[str, list[str]]]:
    """(book, verses) in canonical order from `bible gen1:1-rev22:21`'s output: a `Book N` line
    opens each chapter, a verse starts with its number and may wrap onto unindented lines."""
    out: list[tuple[str, list[str]]] = []
    for line in dump.splitlines():
        if not line.strip():
            continue
        if m := HEADING.match(line):
            if not out or out[-1][0] != m["book"]:
                out.append((m["book"], []))
        elif m := VERSE.match(line):
            out[-1][1].append(m["text"].strip())
        else:
            out[-1][1][-1] += " " + line.strip()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path.home() / ".cache" / "kdsweep" / "lm-demo"))
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--debs", type=Path, help="a folder holding bible-kjv-text_*.deb and bible-kjv_*.deb (default: apt-get download)")
    args = ap.parse_args()
    out = Path(args.out).expanduser()
    if Path(__file__).resolve().parents[1] in out.resolve().parents:
        raise SystemExit(f"lm_data.py: --out {out} is inside the repository: data sets are never committed; pick a folder outside it")
    with tempfile.TemporaryDirectory() as d:
        root = unpack(args.debs, Path(d))
        dump = subprocess.run([str(root / "usr" / "bin" / "bible"), "-p", str(root / "usr" / "lib"), "gen1:1-rev22:21"],
                              check=True, capture_output=True, text=True).stdout
    parsed = books(dump)
    text = out / "kjv"
    if text.exists():
        shutil.rmtree(text)
    text.mkdir(parents=True)
    for i, (book, verses) in enumerate(parsed, 1):
        (text / f"{i:02d}-{book.replace(' ', '_').lower()}.txt").write_text("\n".join(verses) + "\n", encoding="utf-8")
    verses = sum(len(v) for _, v in parsed)
    size = sum(f.stat().st_size for f in text.iterdir())
    print(f"{len(parsed)} books, {verses:,} verses, {size / 1e6:.2f} MB -> {text}")

    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train(sorted(str(f) for f in text.iterdir()), vocab_size=args.vocab, min_frequency=2, special_tokens=["<|endoftext|>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.save_pretrained(str(out / "tokenizer"))
    tokens = sum(len(tok(f.read_text(encoding="utf-8"))["input_ids"]) for f in text.iterdir())
    print(f"byte-level BPE, {len(tok)} tokens: {tokens:,} tokens in the books -> {out / 'tokenizer'}")


if __name__ == "__main__":
    main()
