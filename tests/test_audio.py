"""Spoken words, the third task: clips decoded once (wave folders and arrays), the log-mel front
end against torch.stft and a float64 filterbank, the audio robustness suite, bad inputs, and one
sweep end to end (ONNX taking raw waveforms, a registered model that serves them)."""
from __future__ import annotations

import json
import math
import re
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator.cli import main
from tests.conftest import count_rows, sqlite_rows

RATE = 8000
TONES = (300.0, 700.0, 1300.0, 2200.0)  # one class each


def write_wav(path: Path, x: np.ndarray, rate: int = RATE, width: int = 2, channels: int = 1) -> Path:
    """`x` in [-1, 1] (samples,) or (samples, channels) as PCM with the standard wave module."""
    x = np.clip(x.reshape(len(x), -1) if x.ndim > 1 else np.repeat(x[:, None], channels, 1), -1, 1)
    if width == 1:
        raw = (x * 127 + 128).astype(np.uint8).tobytes()
    elif width == 3:
        v = (x * (2**23 - 1)).astype(np.int32)
        raw = np.stack([v & 0xFF, (v >> 8) & 0xFF, (v >> 16) & 0xFF], -1).astype(np.uint8).tobytes()
    else:
        raw = (x * (2 ** (8 * width - 1) - 1)).astype(f"<i{width}").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(x.shape[1])
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(raw)
    return path


def tone(f0: float, seconds: float, rng: np.random.Generator, rate: int = RATE) -> np.ndarray:
    """A tone of random onset, length, level and phase in faint noise: its class is its pitch."""
    n = int(seconds * rate)
    t = np.arange(n) / rate
    on, length = rng.integers(0, n // 4), rng.integers(n // 2, 3 * n // 4)
    env = ((t * rate >= on) & (t * rate < on + length)).astype(np.float64)
    return env * rng.uniform(0.2, 0.7) * np.sin(2 * np.pi * f0 * rng.uniform(0.98, 1.02) * t + rng.uniform(0, 2 * np.pi)) \
        + 0.01 * rng.standard_normal(n)


def write_clips(root: Path, per_class: int = 40, seconds: float = 0.25, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for c, f0 in enumerate(TONES):
        for i in range(per_class):
            write_wav(root / f"tone{c}" / f"{i:03d}.wav", tone(f0, seconds, rng))
    return root


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    return write_clips(tmp_path_factory.mktemp("clips") / "words")


# ---------------------------------------------------------------------------------------------
# The front end


def test_logmel_power_is_torch_stft_and_its_filterbank_is_the_htk_triangles():
    from trainables.models.audio import LogMel, mel_filterbank

    x = torch.randn(3, 2000, generator=torch.Generator().manual_seed(0)) * 0.3
    lm = LogMel(RATE, n_fft=200, hop=80, n_mels=24)
    ref = torch.stft(x.double(), 200, 80, window=torch.hann_window(200, dtype=torch.float64), center=True, pad_mode="constant",
                     return_complex=True).abs() ** 2
    got = lm.power(x)
    assert got.shape == ref.shape == (3, 101, lm.frames(2000))
    assert ((got.double() - ref).abs().max() / ref.abs().max()) < 1e-5

    # The filterbank, derived again in float64 one bin at a time from the HTK mel formula.
    fb = mel_filterbank(RATE, 200, 24, f_min=20.0)
    mel = lambda f: 2595.0 * math.log10(1.0 + f / 700.0)  # noqa: E731
    hz = lambda m: 700.0 * (10 ** (m / 2595.0) - 1.0)  # noqa: E731
    edges = [hz(mel(20.0) + i * (mel(RATE / 2) - mel(20.0)) / 25) for i in range(26)]
    for k in (0, 3, 17, 60, 100):
        f = k * RATE / 200
        for m in (0, 5, 23):
            lo, mid, hi = edges[m], edges[m + 1], edges[m + 2]
            want = max(0.0, min((f - lo) / (mid - lo), (hi - f) / (hi - mid)))
            assert abs(float(fb[k, m]) - want) < 1e-12, (k, m)

    # A clip's loudness moves nothing the network sees (its log-mel mean is removed).
    feats = lm(x)
    assert feats.shape == (3, 1, 24, 26)
    assert torch.allclose(lm(x * 0.25), feats, atol=1e-3)


def test_an_audio_model_takes_waveforms_and_exports_to_onnx_as_it_is(tmp_path):
    import onnxruntime

    from trainables.models import create_model

    model = create_model("audio.cnn_tiny", 4, (2000,), sample_rate=RATE).eval()
    x = torch.randn(5, 2000, generator=torch.Generator().manual_seed(1)) * 0.2
    with torch.no_grad():
        expected = model(x)
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (x[:2],), str(path), input_names=["waveforms"], output_names=["logits"],
                      dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}}, dynamo=True, external_data=False, verbose=False)
    got = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"waveforms": x.numpy()})[0]
    assert np.abs(got - expected.numpy()).max() < 1e-4

    # The body sees the mel bands as channels over time, or (mel_as: image) a one-channel spectrogram.
    assert model.spectrogram(x).shape == (5, 40, 1, 26) and model.body.stages[0][0].in_channels == 40
    image = create_model("audio.cnn_tiny", 4, (2000,), sample_rate=RATE, mel_as="image")
    assert image.spectrogram(x).shape == (5, 1, 40, 26) and image(x).shape == (5, 4)
    from trainables.registry import ConfigError

    with pytest.raises(ConfigError, match="`arch_kwargs.mel_as` must be 'channels' or 'image'"):
        create_model("audio.cnn_tiny", 4, (2000,), mel_as="stft")


# ---------------------------------------------------------------------------------------------
# Data


def test_a_folder_of_wav_clips_is_decoded_once_resampled_and_mixed_to_mono(tmp_path, clips):
    from trainables.data import load_dataset

    kw = dict(cache=str(tmp_path / "cache"), sample_rate=RATE, clip_seconds=0.25)
    first = load_dataset("audio", str(clips), **kw)
    again = load_dataset("audio", str(clips), **kw)
    assert first.decode_s > 0 and again.decode_s == 0.0
    assert first.input_shape == (2000,) and first.train_x.dtype == torch.float32 and first.mean == () and first.tokenizer is None
    assert first.classes == ("tone0", "tone1", "tone2", "tone3")
    assert len(first.train_y) + len(first.val_y) + len(first.test_y) == 160 and len(first.test_y) == 16  # carved, stratified
    assert torch.equal(first.train_x, again.train_x)

    # Other widths, rates and stereo: a 22.05 kHz stereo 24-bit tone of 1 kHz comes out at 8 kHz,
    # one channel, its peak still at 1 kHz; 8- and 32-bit PCM read to the same level.
    odd = tmp_path / "odd"
    t = np.arange(int(0.25 * 22050)) / 22050
    wave_1k = 0.5 * np.sin(2 * np.pi * 1000 * t)
    write_wav(odd / "a" / "stereo24.wav", np.stack([wave_1k, wave_1k], 1), rate=22050, width=3)
    write_wav(odd / "b" / "u8.wav", 0.5 * np.sin(2 * np.pi * 500 * np.arange(2000) / RATE), width=1)
    write_wav(odd / "b" / "i32.wav", 0.5 * np.sin(2 * np.pi * 500 * np.arange(2000) / RATE), width=4)
    (odd / "a" / "notes.txt").write_text("not audio")
    from trainables.data.audio import decode_clips

    raw = decode_clips(odd, tmp_path / "cache", RATE, 0.25, 0.0, 0.0, 0)
    assert raw.train_x.shape == (3, 2000) and raw.skipped == ["a/notes.txt (not a PCM .wav: file does not start with RIFF id)"]
    x = raw.train_x[raw.train_y == 0][0].numpy()
    spectrum = np.abs(np.fft.rfft(x[:1900]))
    assert abs(np.argmax(spectrum) * RATE / 1900 - 1000) < 10 and abs(np.abs(x).max() - 0.5) < 0.02
    for level in raw.train_x[raw.train_y == 1]:
        assert abs(float(level.abs().max()) - 0.5) < 0.02


def test_arrays_of_waveforms_are_read_and_resampled(tmp_path):
    from trainables.data import load_dataset
    from trainables.registry import ConfigError

    rng = np.random.default_rng(0)
    x = (rng.uniform(-0.5, 0.5, (40, 4000)) * 32767).astype(np.int16)  # int16 PCM at 16 kHz
    np.savez(tmp_path / "clips.npz", train_x=x, train_y=np.arange(40) % 2, sample_rate=np.array(16000))
    s = load_dataset("audio", str(tmp_path / "clips.npz"), cache=str(tmp_path / "c"), sample_rate=RATE, clip_seconds=0.25)
    assert s.input_shape == (2000,) and s.train_x.dtype == torch.float32 and float(s.train_x.abs().max()) <= 1.0
    np.savez(tmp_path / "loud.npz", train_x=np.full((4, 2000), 2.0, np.float32), train_y=np.arange(4) % 2)
    with pytest.raises(ConfigError, match=r"train_x has samples beyond \[-1, 1\]"):
        load_dataset("audio", str(tmp_path / "loud.npz"), cache=str(tmp_path / "c"), sample_rate=RATE, clip_seconds=0.25)
    np.savez(tmp_path / "images.npz", train_x=np.zeros((4, 1, 8, 8), np.uint8), train_y=np.arange(4) % 2)
    with pytest.raises(ConfigError, match=r"train_x must be waveforms \(N, samples\)"):
        load_dataset("audio", str(tmp_path / "images.npz"), cache=str(tmp_path / "c"), sample_rate=RATE, clip_seconds=0.25)


# ---------------------------------------------------------------------------------------------
# The robustness suite


def test_the_audio_corruptions_are_seeded_and_do_what_they_say():
    from trainables.eval.sounds import SOUNDS, corrupt_clips

    x = torch.sin(torch.arange(4000) * 0.05).repeat(3, 1) * 0.5
    for name in SOUNDS.names():
        assert torch.equal(corrupt_clips(x, name, 3, 7), corrupt_clips(x, name, 3, 7))
    for severity, snr_db in zip((1, 3, 5), (30.0, 10.0, 0.0)):
        noise = corrupt_clips(x, "noise", severity, 0) - x
        measured = 10 * math.log10(float(x.pow(2).mean() / noise.pow(2).mean()))
        assert abs(measured - snr_db) < 0.5, (severity, measured)
    loud = corrupt_clips(x, "gain", 5, 0)  # +24 dB: clipped
    assert float(loud.abs().max()) == 1.0 and float((loud.abs() == 1.0).float().mean()) > 0.5
    moved = corrupt_clips(x, "shift", 5, 0)  # 30 % of 4000 samples, one side or the other
    for row, orig in zip(moved, x):
        assert torch.equal(row[1200:], orig[:-1200]) or torch.equal(row[:-1200], orig[1200:])


# ---------------------------------------------------------------------------------------------
# Bad inputs: one line, exit 2, before Ray


def audio_yaml(path: Path, clips: Path, name: str = "words", **over) -> Path:
    import yaml

    from orchestrator.plan.config import set_dotted

    cfg = {
        "name": name, "storage": str(path / "runs"),
        "dataset": {"name": "audio", "root": str(clips), "kwargs": {"sample_rate": RATE, "clip_seconds": 0.25}, "val_fraction": 0.2,
                    "test_fraction": 0.2, "cache": str(path / "cache")},
        "teacher": {"arch": "audio.cnn_small", "epochs": 4, "batch_size": 16, "optimizer": {"name": "sgd", "lr": 0.05}},
        "students": ["audio.cnn_tiny"],
        "loss": {"name": "kd", "temperature": 4.0, "alpha": 0.9},
        "train": {"epochs": 3, "batch_size": 16, "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}, "robust_samples": 64},
        "search": {"temperature": {"type": "float", "low": 1.0, "high": 8.0, "log": True}, "alpha": {"type": "float", "low": 0.0, "high": 1.0},
                   "loss.name": {"type": "categorical", "choices": ["kd", "at"]}},
        "budget": {"num_samples": 3, "max_concurrent": 1, "grace_period": 3, "confirm": {"top": 0}},
        "resources": {"cpus_per_trial": 1},
    }
    for k, v in over.items():
        set_dotted(cfg, k, v)
    out = path / f"{name}.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return out


@pytest.mark.parametrize("over, message", [
    ({"students": ["cnn_tiny"]}, "`students` cnn_tiny does not take audio clips (waveforms): use audio.<model>"),
    ({"students": ["audio.hf.bert-L1-H32-A2"]}, "must be audio.<an image model>"),
    ({"dataset.augment": {"crop_pad": 2}}, "`dataset.augment` crops and flips images, which clips do not take"),
    ({"dataset.kwargs": {"sample_rate": 100}}, "`dataset.kwargs.sample_rate` must be a rate in Hz between 1000 and 192000"),
    ({"dataset.root": "/nonexistent/words"}, "`dataset.root` does not exist: nothing at '/nonexistent/words' (it takes a folder of <class>/*.wav clips"),
])
def test_bad_audio_configs_exit_2_before_ray(tmp_path, clips, capsys, over, message):
    cfg = audio_yaml(tmp_path, clips, **over)
    assert main(["run", str(cfg), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlruns").exists()


def test_an_image_model_name_for_audio_is_refused_the_other_way_round(tmp_path, capsys, digits_teacher):
    from tests.conftest import sweep_yaml

    cfg = sweep_yaml(tmp_path, digits_teacher, "img", **{"students": ["audio.cnn_tiny"]})
    assert main(["run", str(cfg), "--dry-run"]) == 2
    assert "`students` audio.cnn_tiny does not take images" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# One sweep, end to end


@pytest.mark.integration
def test_audio_sweep_end_to_end(clips, tmp_path, ray_address, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = audio_yaml(tmp_path, clips, **{"train.progress_every_s": 1e-9, "teacher.progress_every_s": 1e-9})
    assert main(["run", str(cfg), "--address", ray_address]) == 0
    # Progress lines within epochs reach the console, from the teacher's task and from the trials' actors.
    out = capsys.readouterr().out
    assert re.search(r"^teacher epoch=1/4  batch 1/\d+ \(\d+ %\)  \d+ clips/s  epoch ETA \d+ s$", out, re.M), out[:2000]
    assert re.search(r"^progress  trial=\w+  student=audio.cnn_tiny  epoch=1/3  batch 1/\d+ ", out, re.M), out[:2000]
    db = tmp_path / "mlruns" / "mlflow.db"
    teacher_dir = next((tmp_path / "teachers").glob("audio-audio.cnn_small-*"))
    card = json.loads((teacher_dir / "teacher.json").read_text())
    assert card["input_shape"] == [2000] and card["mean"] == [] and card["arch_kwargs"] == {"sample_rate": RATE}
    assert card["val_acc"] > 0.9, card  # the front end hears the pitch
    # A logit loss and a feature loss (attention transfer on the body's stages) both train.
    finished = sqlite_rows(db, "select p.value from params p join runs r on r.run_uuid=p.run_uuid join tags t on t.run_uuid=r.run_uuid "
                               "where p.key='loss' and r.status='FINISHED' and t.key='kdsweep.role' and t.value='trial'")
    assert {"kd", "at"} <= {v for v, in finished}, finished
    # The task's throughput unit and robustness suite, on every finished trial.
    assert count_rows(db, "select count(*) from metrics where key='clips_per_s' and value > 0") >= 2
    assert count_rows(db, "select count(*) from metrics where key='images_per_s'") == 0
    assert count_rows(db, "select count(*) from metrics where key='corr_noise'") >= 2
    assert count_rows(db, "select count(*) from metrics where key='corr_gaussian_noise'") == 0
    assert count_rows(db, "select count(*) from metrics where key='champion_test_acc' and value > 0.5") == 1
    assert main(["report", "words", "--storage", str(tmp_path / "runs")]) == 0
    md = (tmp_path / "runs" / "words" / "report" / "report.md").read_text()
    assert "| noise |" in md and "| gain |" in md and "| gaussian_noise |" not in md

    # The registered champion takes raw waveforms (its front end inside).
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{db}")
    served = mlflow.pyfunc.load_model("models:/kdsweep-words@champion")
    rng = np.random.default_rng(5)
    x = np.stack([tone(f0, 0.25, rng) for f0 in TONES]).astype(np.float32)
    assert np.asarray(served.predict(x)).shape == (4, 4)
    assert "float waveforms in [-1, 1], (N, 2000) at 8000 Hz" in json.dumps(served.metadata.metadata)

    # Out: ONNX of raw waveforms, checked with onnxruntime inside export, and here again.
    import onnxruntime

    from orchestrator.select.selection import load_student
    from orchestrator.track.store import SweepTracker, Tag

    assert main(["export", "words", "--storage", str(tmp_path / "runs"), "--format", "onnx"]) == 0
    session = onnxruntime.InferenceSession(str(tmp_path / "runs" / "words" / "export" / "student.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["waveforms"]
    got = session.run(None, {"waveforms": x})[0]
    tracker = SweepTracker(f"sqlite:///{db}", "words")
    parent = tracker.client.search_runs([tracker.client.get_experiment_by_name("words").experiment_id], f"tags.`{Tag.ROLE}` = 'parent'")[0]
    with torch.no_grad():
        expected = load_student(tracker, parent.data.tags[Tag.CHAMPION])(torch.from_numpy(x)).numpy()
    assert np.abs(got - expected).max() < 1e-4


def test_a_clip_folder_with_an_empty_or_undecodable_class_is_refused_and_bad_files_are_named(tmp_path, capsys):
    """An empty class folder, or one whose files are all not audio (text named .wav, a clip of 0
    samples): one line, exit 2, nothing written. One bad file among good ones is skipped and named
    (as an image folder's are); stereo and other rates are mixed down and resampled (above)."""
    root = write_clips(tmp_path / "w", per_class=6)
    (root / "tone9").mkdir()
    assert main(["run", str(audio_yaml(tmp_path, root)), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "`dataset.root` class folder tone9/ holds no files: add its clips or remove the folder" in err and err.count("\n") == 1, err
    (root / "tone9" / "fake.wav").write_text("not audio")
    write_wav(root / "tone9" / "empty.wav", np.zeros(0))
    assert main(["run", str(audio_yaml(tmp_path, root)), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "`dataset.root` class 'tone9' has no decodable clips in train (2 skipped, e.g. tone9/empty.wav (no samples))" in err, err
    assert err.count("\n") == 1 and not (tmp_path / "runs").exists() and not (tmp_path / "mlruns").exists()

    (root / "tone9" / "empty.wav").unlink()
    (root / "tone9" / "fake.wav").rename(root / "tone0" / "fake.wav")
    (root / "tone9").rmdir()
    assert main(["run", str(audio_yaml(tmp_path, root)), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "1 undecodable file(s) skipped" in out, out
