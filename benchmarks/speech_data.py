"""Prepare the offline speech demo: the ten spoken digits, synthesized with Debian's espeak-ng
(`apt-get install espeak-ng`; GPL-3.0-or-later, its voices included) over its English accents, voice
variants, speeds and pitches. Nothing is downloaded.

  python benchmarks/speech_data.py [--out DIR] [--per-voice 4] [--workers 2]

Writes, under --out (default ~/.cache/kdsweep/speech-demo/digits; never inside this repository),
torchvision's ImageFolder layout of 16-bit PCM .wav files at espeak-ng's 22,050 Hz:
  train/<word>/<voice>-<i>-s<speed>-p<pitch>.wav
  val/<word>/...    clips of an accent train never hears (its 12 voice variants)
  test/<word>/...   clips of another accent neither train nor val hears (new speakers, as users would be)
Use it as `dataset.root` (dataset.name: audio); kdsweep decodes it once to the sweep's rate.
Voices are an accent (en-gb, en-us, ...) with a variant (m1..m7, f1..f5, ...); each voice says each
word `--per-voice` times at random speeds (130 to 210 words a minute) and pitches (25 to 75),
seeded, so the folder is the same on every machine with the same espeak-ng. Prints the counts per
split and the espeak-ng version.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ACCENTS = ("en-gb", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5")
#: accents held out: val hears one, test another, train neither (each with all its voice variants),
#: so the search ranks students on speakers they never heard, as the test split then measures them
VAL_ACCENT, TEST_ACCENT = "en-gb-x-gbcwmd", "en-029"


def split_of(accent: str) -> str:
    return {VAL_ACCENT: "val", TEST_ACCENT: "test"}.get(accent, "train")


def speak(job: tuple[Path, str, str, int, int]) -> None:
    path, voice, word, speed, pitch = job
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(path), word], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path.home() / ".cache" / "kdsweep" / "speech-demo" / "digits"))
    ap.add_argument("--per-voice", type=int, default=4, help="clips of each word per voice (random speed and pitch each)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if shutil.which("espeak-ng") is None:
        raise SystemExit("speech_data.py: espeak-ng is not installed: apt-get install espeak-ng")
    out = Path(args.out).expanduser()
    if Path(__file__).resolve().parents[1] in out.resolve().parents:
        raise SystemExit(f"speech_data.py: --out {out} is inside the repository: data sets are never committed; pick a folder outside it")
    rng = random.Random(args.seed)
    jobs = []
    for accent in ACCENTS:
        for variant in VARIANTS:
            split = split_of(accent)
            for word in WORDS:
                for i in range(args.per_voice):
                    speed, pitch = rng.randint(130, 210), rng.randint(25, 75)
                    jobs.append((out / split / word / f"{accent}+{variant}-{i}-s{speed}-p{pitch}.wav", f"{accent}+{variant}", word, speed, pitch))
    with ThreadPoolExecutor(args.workers) as pool:
        list(pool.map(speak, jobs))
    version = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True).stdout.strip()
    for split in ("train", "val", "test"):
        n = sum(1 for j in jobs if j[0].parts[-3] == split)
        voices = len({j[1] for j in jobs if j[0].parts[-3] == split})
        print(f"{split}: {n} clips, {voices} voices, {len(WORDS)} words -> {out / split}")
    print(version)


if __name__ == "__main__":
    main()
