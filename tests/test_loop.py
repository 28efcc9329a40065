"""The trial loop: exact resume, divergence, and what only the KD term can cause."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from trainables.data import load_dataset
from trainables.data.normalize import normalizer
from trainables.checkpoint import load_state
from trainables.loop import LocalReporter, Reporter, train_student
from trainables.registry import ConfigError
from trainables.models.teacher import load_teacher
from tests.conftest import trial_dict


def trial(**kw):
    base = {"dataset": {"name": "digits", "val_fraction": 0.2}, "student": "cnn_tiny", "epochs": 4,
            "batch_size": 64, "loss": {"alpha": 0.0}, "profile": False, "device": "cpu"}
    base.update(kw)
    return trial_dict(**base)


class StopAfter(LocalReporter):
    def __init__(self, checkpoint_dir, epochs):
        super().__init__(checkpoint_dir, log_epochs=False)
        self.left = epochs

    def report(self, metrics, state):
        super().report(metrics, state)
        self.left -= 1
        if self.left == 0:
            raise KeyboardInterrupt("simulated kill")


def test_resume_from_mid_run_checkpoint_gives_identical_weights(tmp_path, digits_teacher):
    cfg = trial(teacher_path=str(digits_teacher), loss={"alpha": 0.7, "temperature": 3.0},
                schedule={"name": "cosine", "warmup_epochs": 1})
    straight = train_student(cfg, LocalReporter(None, log_epochs=False))
    with pytest.raises(KeyboardInterrupt):
        train_student(cfg, StopAfter(str(tmp_path), 2))
    assert load_state(tmp_path / "state.pt")["epoch"] == 2
    resumed = train_student(cfg, LocalReporter(str(tmp_path), log_epochs=False))
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    assert resumed.metrics["val_acc"] == straight.metrics["val_acc"]


def test_divergent_run_reports_itself_instead_of_crashing():
    result = train_student(trial(optimizer={"name": "sgd", "lr": 1e8, "momentum": 0.9}, epochs=3))
    assert result.metrics["status"] == "diverged"
    assert result.metrics["epoch"] < 3 or result.history[-1]["status"] == "diverged"


def test_kd_term_pulls_student_towards_teacher(digits_teacher):
    """Same student, same seeds: only the KD term can pull the softened outputs (T=4) to the teacher's."""
    s = load_dataset("digits", val_fraction=0.2)
    teacher, _ = load_teacher(digits_teacher)
    norm = normalizer(s.mean, s.std, "cpu")
    with torch.no_grad():
        t_val = teacher(norm(s.val_x))
    kl = {}
    for alpha in (0.0, 0.9):
        vals = []
        for seed in (0, 1):
            r = train_student(trial(student="mlp_32", epochs=6, seed=seed, teacher_path=str(digits_teacher),
                                    loss={"alpha": alpha, "temperature": 4.0}), LocalReporter(None, log_epochs=False))
            with torch.no_grad():
                vals.append(F.kl_div(F.log_softmax(r.model(norm(s.val_x)) / 4, 1), F.log_softmax(t_val / 4, 1),
                                     reduction="batchmean", log_target=True).item())
        kl[alpha] = sum(vals) / len(vals)
    assert kl[0.9] < 0.5 * kl[0.0], kl


def test_kd_without_teacher_is_a_config_error():
    with pytest.raises(ConfigError, match="`teacher_path` is required"):
        train_student(trial(loss={"alpha": 0.5}))


def test_corrupt_checkpoint_is_a_config_error(tmp_path):
    (tmp_path / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="corrupt"):
        train_student(trial(), LocalReporter(str(tmp_path), log_epochs=False))


def test_feature_losses_train(digits_teacher):
    for name in ("at", "hint", "dkd"):
        r = train_student(trial(epochs=1, teacher_path=str(digits_teacher), loss={"name": name, "alpha": 0.5}),
                          LocalReporter(None, log_epochs=False))
        assert r.metrics["status"] == "finished" and 0 <= r.metrics["val_acc"] <= 1


class HostSyncs(TorchDispatchMode):
    """Counts tensor -> Python scalar reads (bool(t), t.item()): each is a host sync on a GPU."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


class Watched(LocalReporter):
    """What a person watching would see (progress lines) apart from what Tune would get (reports)."""

    def __init__(self):
        super().__init__(None, log_epochs=False)
        self.lines, self.reports = [], []

    def progress(self, line):
        self.lines.append(line)

    def report(self, metrics, state):
        self.reports.append(metrics)


def test_a_long_epoch_shows_progress_lines_that_never_become_results_nor_host_syncs(digits_teacher):
    """A line at most every train.progress_every_s (here: at every batch after the first): batches
    done, examples/s in the task's unit, the epoch's ETA; results stay one per epoch, and the lines
    cost no device sync (the same syncs as with the default 10 s)."""
    import re

    watched = Watched()
    cfg = trial(epochs=2, batch_size=64, progress_every_s=1e-9, robust_samples=0, teacher_path=str(digits_teacher), loss={"alpha": 0.5})
    train_student(cfg, watched)
    steps = 1150 // 64
    assert len(watched.reports) == 2 and not any("batch" in k or "progress" in k for r in watched.reports for k in r)
    assert len(watched.lines) == 2 * (steps - 1), watched.lines[:3]
    pattern = re.compile(rf"^epoch=([12])/2  batch (\d+)/{steps} \((\d+) %\)  (\d+) images/s  epoch ETA (\d+) s$")
    parsed = [pattern.match(line) for line in watched.lines]
    assert all(parsed), watched.lines[:3]
    assert [int(m[2]) for m in parsed[: steps - 1]] == list(range(1, steps)) and all(int(m[4]) > 0 for m in parsed)
    counts = []
    for every in (1e-9, 10.0):
        with HostSyncs() as syncs:
            train_student(trial(epochs=1, progress_every_s=every, robust_samples=0, teacher_path=str(digits_teacher), loss={"alpha": 0.5}),
                          Watched())
        counts.append(syncs.count)
    assert counts[0] == counts[1], counts


@pytest.mark.parametrize("augment", [{"crop_pad": 0, "flip": False}, {"crop_pad": 1, "flip": True}])
def test_host_syncs_do_not_grow_with_the_number_of_batches(augment, digits_teacher):
    """One sync per epoch, as the loop promises: 4x the batches must not add a single sync."""
    counts = []
    for batch_size in (128, 32):
        cfg = trial(epochs=1, batch_size=batch_size, robust_samples=0, teacher_path=str(digits_teacher), loss={"alpha": 0.5},
                    dataset={"name": "digits", "val_fraction": 0.2, "augment": augment})
        with HostSyncs() as syncs:
            train_student(cfg, LocalReporter(None, log_epochs=False))
        counts.append(syncs.count)
    assert counts[0] == counts[1], counts


def test_grad_clip_clips_every_step(monkeypatch):
    calls = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm, **kw: calls.append(max_norm) or real(params, max_norm, **kw))
    train_student(trial(epochs=1, grad_clip=0.5), LocalReporter(None, log_epochs=False))
    assert calls and set(calls) == {0.5} and len(calls) == 1150 // 64  # one per step (1,150 train images after the val split)
    calls.clear()
    train_student(trial(epochs=1), LocalReporter(None, log_epochs=False))
    assert calls == []


def _ranks_decide(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from trainables.loop import epoch_means

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    sums = torch.tensor([float("nan") if rank == 1 else 1.0, 0.5, 0.5])  # only rank 1 blew up
    torch.save(epoch_means(sums, steps=2, world=2), f"{out}.{rank}")
    dist.destroy_process_group()


def test_ddp_ranks_take_the_same_divergence_decision(tmp_path):
    import math

    import torch.multiprocessing as mp

    mp.spawn(_ranks_decide, args=(f"file://{tmp_path / 'init'}", str(tmp_path / "means")), nprocs=2)
    means = [torch.load(tmp_path / f"means.{r}") for r in (0, 1)]
    assert all(not math.isfinite(m[0]) for m in means)  # rank 0 sees rank 1's NaN: both stop
    assert means[0][1:] == means[1][1:] == [0.25, 0.25]


def test_concurrent_checkpoint_writers_never_collide(tmp_path):
    """Two writers of one file (a retried trial beside its ghost, two cache builders) each write a
    private temporary file, so both succeed and a whole file is always in place."""
    import threading

    from trainables.checkpoint import save_state

    errors = []

    def write(i):
        try:
            for j in range(30):
                save_state({"epoch": i * 100 + j, "blob": torch.zeros(20_000)}, tmp_path)
        except Exception as e:  # collected: a collision shows as FileNotFoundError from the rename
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert load_state(tmp_path / "state.pt")["blob"].shape == (20_000,)
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


class CountingReporter(Reporter):
    """Records which epochs carried a checkpoint."""

    def __init__(self) -> None:
        self.saved: list[int] = []

    def restore(self):
        return None

    def report(self, metrics, state) -> None:
        if state is not None:
            self.saved.append(metrics["epoch"])


@pytest.mark.parametrize("every,saved", [(1, [1, 2, 3, 4, 5]), (2, [2, 4, 5]), ("3600s", [5]), ("0s", [1, 2, 3, 4, 5])])
def test_checkpoint_every_epochs_or_seconds_and_always_the_last(every, saved):
    rep = CountingReporter()
    r = train_student(trial_dict(dataset={"name": "digits", "val_fraction": 0.2}, student="mlp_32", loss={"alpha": 0.0}, epochs=5,
                                 batch_size=256, profile=False, robust_samples=0, checkpoint_every=every), rep)
    assert r.metrics["epoch"] == 5 and rep.saved == saved


@pytest.mark.parametrize("bad", [0, "soon", "-5s", 2.5])
def test_bad_checkpoint_period_is_a_config_error(bad):
    from trainables.config import TrialConfig, validate

    with pytest.raises(ConfigError, match="`train.checkpoint_every`"):
        validate(TrialConfig, {"train": {"checkpoint_every": bad}})


def test_a_scheduled_trial_trains_and_logs_each_epochs_temperature_and_weight(digits_teacher):
    """The loop hands the loss the epoch and the epoch count: the schedule moves, and each epoch's
    values are in its metrics (what MLflow logs per epoch)."""
    r = train_student(trial(student="mlp_32", epochs=3, teacher_path=str(digits_teacher), train={"robust_samples": 0},
                            loss={"alpha": 0.9, "temperature": 4.0, "schedule": {"alpha": {"end": 0.5}, "temperature": {"end": 1.0}}}),
                      LocalReporter(None, log_epochs=False))
    assert [round(m["kd_temperature"], 6) for m in r.history] == [4.0, 2.5, 1.0]
    assert [round(m["kd_weight"], 6) for m in r.history] == [0.9, 0.7, 0.5]


@pytest.mark.parametrize("native", [True, False])
def test_the_corruption_suite_alone_runs_bf16_where_the_device_computes_it_natively(monkeypatch, native):
    """35 forwards an image, only counted: bf16 on a CPU with AMX (as on a GPU); val, which the
    sweep selects on, stays fp32 on a CPU."""
    import trainables.eval.inference as inference
    import trainables.loop as loop

    monkeypatch.setattr(inference, "native_bf16", lambda device: native)
    seen: list[torch.dtype | None] = []
    real = loop.predict

    def watched(model, x, *args, **kw):
        hook = model.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
        try:
            return real(model, x, *args, **kw)
        finally:
            hook.remove()

    monkeypatch.setattr(loop, "predict", watched)
    r = train_student(trial(epochs=1, robust_samples=40), LocalReporter(None, log_epochs=False))
    assert "robust_acc" in r.metrics and len(seen) == 1 + 35  # the val pass, then one per corruption and severity
    assert seen[0] == torch.float32
    assert set(seen[1:]) == {torch.bfloat16 if native else torch.float32}
