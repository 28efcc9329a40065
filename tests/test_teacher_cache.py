"""The sweep's teacher cache returns the teacher's own logits for the same views, whatever the
batch size; epochs are built lazily, once, by the first trial that needs them; top-k targets keep
the largest logits and the remaining mass; a trial that reads the cache trains as one that runs the
teacher online."""
import math
import threading
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from trainables.config import AugmentConfig, TrialConfig
from trainables.data import load_dataset
from trainables.data.batches import augment, epoch_batches
from trainables.data.placement import place
from trainables.data.normalize import normalizer
from trainables.loop import LocalReporter, train_student
from trainables.models.teacher import load_teacher
from trainables.teacher_cache import Builder, TeacherCache, build_teacher_cache, bytes_per_view, dense, sparse
from tests.conftest import trial_dict


def cfg(teacher, **kw):
    base = {"dataset": {"name": "digits", "val_fraction": 0.2, "augment": {"crop_pad": 1, "flip": True}}, "student": "cnn_tiny",
            "epochs": 2, "batch_size": 64, "teacher_path": str(teacher), "loss": {"alpha": 0.9}, "profile": False, "robust_samples": 0}
    base.update(kw)
    return TrialConfig.model_validate(trial_dict(**base))


def builder(c, teacher, card):
    s, on_device = place(load_dataset("digits", val_fraction=0.2), c.dataset, "cpu")
    return Builder(c, teacher, card, s, on_device, "cpu")


def epoch_cache(root, teacher_dir):
    """A sweep's cache (val built, epochs still to build), its trial config and teacher card, and the
    teacher's real epoch builder."""
    c = cfg(teacher_dir)
    teacher, card = load_teacher(teacher_dir)
    path, _ = build_teacher_cache(c, teacher, card, root)
    return c, card, path, builder(c, teacher, card).train


def test_cache_holds_the_teachers_logits_for_each_view_whatever_the_batch_size(tmp_path, digits_teacher):
    c = cfg(digits_teacher)
    teacher, card = load_teacher(digits_teacher)
    path, forwards = build_teacher_cache(c, teacher, card, tmp_path)
    s = load_dataset("digits", val_fraction=0.2)
    assert forwards == len(s.val_y)  # random views: epochs are built by the trials
    assert build_teacher_cache(c, teacher, card, tmp_path) == (path, 0)  # created once
    norm = normalizer(s.mean, s.std, "cpu")
    aug = AugmentConfig(crop_pad=1, flip=True)
    for batch_size in (64, 32):  # another (searched) batch size reads the same cache
        cache = TeacherCache.open(path, cfg(digits_teacher, batch_size=batch_size), card)
        build = builder(c, teacher, card)
        cache.builder = build
        for b, idx, view in epoch_batches(len(s.train_y), batch_size, c.seed, 1, aug, (8, 8)):
            with torch.no_grad():
                expected = teacher(norm(augment(s.train_x[idx], view, aug)))
            assert torch.allclose(cache.batch(1, idx, "cpu"), expected, rtol=1e-3, atol=2e-3)  # fp16 rounding
        assert build.forwards == (len(s.train_y) if batch_size == 64 else 0)  # epoch 1 built once, by the first reader
    assert sorted(p.name for p in path.glob("epoch_*.pt")) == ["epoch_1.pt"]
    assert TeacherCache.open(path, cfg(digits_teacher, seed=1), card) is None  # other views: go online


def test_an_epoch_is_built_once_while_other_readers_wait_and_a_failed_build_leaves_nothing(tmp_path, digits_teacher):
    c, card, path, real = epoch_cache(tmp_path, digits_teacher)
    builds = []

    def failing(epoch, beat):
        raise RuntimeError("killed mid-build")

    cache = TeacherCache.open(path, c, card)
    cache.builder = SimpleNamespace(train=failing)
    with pytest.raises(RuntimeError):
        cache.for_epoch(0, "cpu")
    assert not list(path.glob("epoch_0.pt*")) and not list(path.glob(".*epoch_0*"))

    def slow(epoch, beat):
        builds.append(epoch)
        time.sleep(0.5)
        return real(epoch, beat)

    readers = [TeacherCache.open(path, c, card) for _ in range(3)]
    for r in readers:
        r.builder = SimpleNamespace(train=slow)
    got = [None] * 3
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, readers[i].for_epoch(0, "cpu"))) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert builds == [0] and all(torch.equal(g, got[0]) for g in got)


def test_a_hung_builder_is_taken_over_and_a_slow_one_is_waited_for(tmp_path, digits_teacher, monkeypatch):
    """The lock's holder touches it after every chunk of teacher forwards: one that goes quiet for
    STALE_S is taken as hung and a waiting trial builds the epoch itself; one that keeps beating is
    waited for however long it takes, and nothing is built twice."""
    import fcntl

    import trainables.teacher_cache as tc

    monkeypatch.setattr(tc, "STALE_S", 1.0)
    c, card, path, real = epoch_cache(tmp_path, digits_teacher)
    builds = []

    def counted(epoch, beat):
        builds.append(epoch)
        return real(epoch, beat)

    def holder(epoch, beats, release):  # another trial's builder: holds the lock, beats `beats` times, 0.2 s apart
        with open(path / f"epoch_{epoch}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            held.set()
            for _ in range(beats):
                (path / f"epoch_{epoch}.lock").touch()
                time.sleep(0.2)
            if beats:  # a live builder finishes its file before it lets go
                tc._save(real(epoch), path / f"epoch_{epoch}.pt")
            release.wait(30)

    for epoch, beats, built_here in ((1, 0, [1]), (2, 15, [])):  # hung; alive for 3 s > STALE_S
        held, release = threading.Event(), threading.Event()
        other = threading.Thread(target=holder, args=(epoch, beats, release))
        other.start()
        assert held.wait(30)
        cache = TeacherCache.open(path, c, card)
        cache.builder = SimpleNamespace(train=counted)
        builds.clear()
        started = time.monotonic()
        got = cache.for_epoch(epoch, "cpu")
        assert builds == built_here
        assert torch.equal(dense(got, 10), dense(real(epoch), 10))
        if not beats:
            assert time.monotonic() - started < 10  # taken over soon after STALE_S, not when the holder lets go (30 s)
        release.set()
        other.join()


@pytest.mark.parametrize("k", [1, 3, 10])
def test_topk_targets_keep_the_largest_logits_and_the_remaining_mass(k):
    torch.manual_seed(0)
    z = torch.randn(64, 10) * 4
    z[0] = torch.tensor([30.0] + [-30.0] * 9)  # a confident teacher: the rest has almost no mass
    top = z.topk(k, dim=1)
    rest = torch.ones_like(z, dtype=torch.bool).scatter(1, top.indices, False)
    stored = sparse(z, k)
    for t in (0.5, 1.0, 2.0, 4.0, 8.0):  # the temperatures the fill is stored at: the rest's mass exactly (to fp16)
        got = dense(stored, 10, t)
        assert torch.allclose(got.gather(1, top.indices), top.values, atol=2e-2)  # fp16
        p, q = F.softmax(z / t, 1), F.softmax(got / t, 1)
        assert torch.allclose(q.gather(1, top.indices), p.gather(1, top.indices), atol=3e-3)  # the top-k's mass kept
        assert torch.allclose((q * rest).sum(1), (p * rest).sum(1), atol=3e-3)  # and the rest's, spread evenly
        if k < 10:
            assert torch.allclose(q[rest].view(64, 10 - k).std(1), torch.zeros(64), atol=1e-6)
        else:
            assert torch.equal(got, z.half().float())  # k = classes: the dense target exactly
    if k < 10:
        for t in (1.4, 3.0, 6.0, 20.0):  # between them: interpolated, close
            p, q = F.softmax(z / t, 1), F.softmax(dense(stored, 10, t) / t, 1)
            assert torch.allclose((q * rest).sum(1), (p * rest).sum(1), atol=0.05)
        flat = dense(stored, 10, 1.0)  # FKD's fill, the T=1 one, at T=4: far more mass on the rest than it has
        p, q = F.softmax(z / 4, 1), F.softmax(flat / 4, 1)
        assert ((q * rest).sum(1) - (p * rest).sum(1)).max() > 0.05
    assert bytes_per_view(10, k) == 4 * k + 12 and bytes_per_view(1000, 10) * 38 < bytes_per_view(1000, None)


@pytest.mark.parametrize("k", [1, 3, 9])
def test_bucket_targets_make_the_kl_the_one_over_the_top_k_and_the_rest_as_one_class(k):
    """With the student's logits the other classes take the student's own shape: KL over all
    classes equals (values and gradients) the KL between the (k + 1)-way distributions, the top k
    and the rest summed, with the teacher's true rest mass at each stored temperature."""
    from trainables.losses import kd_kl

    torch.manual_seed(k)
    z, n = torch.randn(16, 10) * 3, 10
    z[0] = torch.tensor([30.0] + [-30.0] * 9)
    stored = sparse(z, k)
    top = z.topk(k, 1).indices
    rest = torch.ones_like(z, dtype=torch.bool).scatter(1, top, False)

    def k_plus_1(logits, t):
        p = F.softmax(logits / t, 1)
        return torch.cat([p.gather(1, top), (p * rest).sum(1, keepdim=True)], 1)

    for t in (1.0, 2.0, 4.0, 8.0):
        s = (torch.randn(16, 10) * 2).requires_grad_()
        target = dense(stored, n, t, s)
        ours = kd_kl(s, target, t)
        (g_ours,) = torch.autograd.grad(ours, s)
        p, q = k_plus_1(z, t), k_plus_1(s, t)
        ref = (p * (p.log() - q.log())).sum(1).mean() * t * t
        (g_ref,) = torch.autograd.grad(ref, s)
        assert ours.item() == pytest.approx(ref.item(), rel=2e-3, abs=2e-4)
        assert torch.allclose(g_ours, g_ref, rtol=1e-2, atol=1e-4)
        shape = F.softmax(target / t, 1)[rest].view(16, n - k) / F.softmax(s / t, 1)[rest].view(16, n - k)
        assert torch.allclose(shape, shape[:, :1].expand_as(shape), rtol=1e-3)  # the rest: the student's shape, rescaled
        assert not target.requires_grad
    members = sparse(torch.stack([z, z.flip(1)], 1), k)  # an ensemble's (batch, member, class) rows
    got = dense(members, n, 4.0, s)
    assert got.shape == (16, 2, n) and torch.equal(got[:, 0], dense(stored, n, 4.0, s))
    assert torch.equal(dense(sparse(z, n), n, 4.0, s), z.half().float())  # k = classes: no rest to shape


def test_a_trial_reads_topk_targets_for_its_losss_temperature_and_its_own_logits(tmp_path, digits_teacher):
    from trainables.targets import TeacherTargets

    c = cfg(digits_teacher, teacher_topk=3)
    teacher, card = load_teacher(digits_teacher)
    path, _ = build_teacher_cache(c, teacher, card, tmp_path)
    cache = TeacherCache.open(path, c, card)
    cache.builder = builder(c, teacher, card)
    targets = TeacherTargets("cache", teacher, False, None, cache=cache)
    idx = torch.arange(0, 40, 3)
    x = torch.zeros(len(idx), 1, 8, 8)
    stored = {k: v[idx] for k, v in cache.for_epoch(0, "cpu").items()}
    student = torch.randn(len(idx), 10)
    for t in (1.0, 4.0):
        got, _ = targets.batch(x, x, 0, idx, t)
        assert torch.equal(got, dense(stored, 10, t))
        got, _ = targets.batch(x, x, 0, idx, t, student)  # train.teacher_topk_rest: bucket, the default
        assert torch.equal(got, dense(stored, 10, t, student))
    assert not torch.equal(dense(stored, 10, 1.0), dense(stored, 10, 4.0))
    spread = TeacherCache.open(path, cfg(digits_teacher, teacher_topk=3, loss={"alpha": 0.9}).model_copy(
        update={"train": c.train.model_copy(update={"teacher_topk_rest": "spread"})}), card)
    assert torch.equal(spread.batch(0, idx, "cpu", 4.0, student), dense(stored, 10, 4.0))  # FKD's even spread, whatever the student


def test_a_topk_cache_records_the_share_of_the_teachers_mass_its_classes_keep(tmp_path, digits_teacher):
    """What the plan says of top-k: the mean share of the softened teacher probabilities on val in
    each example's k largest classes, at T = 1, 2, 4, 8 (all of it at k = classes)."""
    from trainables.teacher_cache import read_topk_mass

    teacher, card = load_teacher(digits_teacher)
    s = load_dataset("digits", val_fraction=0.2)
    with torch.no_grad():
        z = teacher(normalizer(s.mean, s.std, "cpu")(s.val_x)).half().float()  # as the cache keeps val: fp16
    for k in (2, 10):
        path, _ = build_teacher_cache(cfg(digits_teacher, teacher_topk=k), teacher, card, tmp_path / str(k))
        mass = read_topk_mass(path)
        assert list(mass) == ["1", "2", "4", "8"]
        for t, share in mass.items():
            expected = F.softmax(z / float(t), -1).sort(-1, descending=True).values[:, :k].sum(-1).mean()
            assert share == pytest.approx(float(expected), abs=1e-5)
        assert mass["1"] >= mass["2"] >= mass["4"] >= mass["8"]
        if k == 10:
            assert all(v == pytest.approx(1.0) for v in mass.values())
    assert read_topk_mass(build_teacher_cache(cfg(digits_teacher), teacher, card, tmp_path / "dense")[0]) is None


def test_a_topk_cache_trains_as_the_dense_one_at_k_equal_classes(tmp_path, digits_teacher):
    runs = {}
    for k in (None, 10, 3):
        c = cfg(digits_teacher, teacher_topk=k)
        teacher, card = load_teacher(digits_teacher)
        path, _ = build_teacher_cache(c, teacher, card, tmp_path / str(k))
        runs[k] = train_student(c.model_copy(update={"teacher_cache": str(path)}), LocalReporter(None, log_epochs=False)).metrics
        assert runs[k]["teacher_targets"] == "cache"
    assert runs[10]["train_kd"] == pytest.approx(runs[None]["train_kd"], rel=1e-5)
    assert runs[10]["val_acc"] == runs[None]["val_acc"]
    assert math.isfinite(runs[3]["train_kd"]) and runs[3]["train_kd"] != runs[None]["train_kd"]


def test_cached_trial_matches_online_trial_and_only_the_first_runs_the_teacher(tmp_path, digits_teacher):
    c = cfg(digits_teacher)
    teacher, card = load_teacher(digits_teacher)
    path, _ = build_teacher_cache(c, teacher, card, tmp_path)
    n = len(load_dataset("digits", val_fraction=0.2).train_y)
    online = train_student(c.model_copy(update={"train": c.train.model_copy(update={"teacher_targets": "online"})}), LocalReporter(None, log_epochs=False))
    first = train_student(c.model_copy(update={"teacher_cache": str(path)}), LocalReporter(None, log_epochs=False))
    second = train_student(c.model_copy(update={"teacher_cache": str(path), "train": c.train.model_copy(update={"batch_size": 32})}),
                           LocalReporter(None, log_epochs=False))
    assert online.metrics["teacher_targets"] == "online" and first.metrics["teacher_targets"] == second.metrics["teacher_targets"] == "cache"
    assert first.metrics["teacher_forward_images"] == 2 * n  # it built both epochs (every example's view)
    assert second.metrics["teacher_forward_images"] == 0  # another batch size, the same views: read
    assert abs(online.metrics["val_acc"] - first.metrics["val_acc"]) <= 0.02
    assert abs(online.metrics["train_kd"] - first.metrics["train_kd"]) <= 0.01 * online.metrics["train_kd"]


FKD_CASE = "fkd:seed=1,n=32,c=100,k=5"


def fkd_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher logits and FKD's stored label for them: (N, 2, 5), row 0 the top-5 classes, row 1 their
    softmax at T=1 (FKD's --temp 1.0)."""
    z = torch.randn(32, 100, generator=torch.Generator().manual_seed(1)) * 3
    p = F.softmax(z, 1)
    order = torch.argsort(p, dim=1, descending=True)[:, :5]
    return z, torch.stack([order.float(), p.gather(1, order)], 1)


def marginal_smoothing(z: torch.Tensor, k: int) -> torch.Tensor:
    """FKD's marginal smoothing (Shen & Xing, ECCV 2022), in float64: the top k classes keep their
    softmax probabilities, the other classes share the rest of the mass evenly."""
    p = F.softmax(z.double(), 1)
    top = p.topk(k, dim=1)
    rest = (1 - top.values.sum(1, keepdim=True)) / (z.shape[1] - k)
    return rest.expand_as(p).scatter(1, top.indices, top.values)


def test_topk_targets_at_t1_are_fkds_marginal_smoothing():
    """Against FKD's Recover_soft_label (szq0214/FKD @ afd5294b43c8b8c437c4d314c01661b24569aa0e,
    FKD/utils_FKD.py, label_type 'marginal_smoothing_k5'): its figures in tests/fixtures/reference/fkd.npz,
    made by benchmarks/reference_figures.py; and against marginal_smoothing."""
    from tests.test_losses_modern import figure

    z, label = fkd_inputs()
    ours = F.softmax(dense(sparse(z, 5), 100), 1)
    fkd = figure("fkd", FKD_CASE, z, label)["soft_label"]
    assert torch.allclose(ours, fkd, atol=1e-3)  # fp16 storage
    mine = marginal_smoothing(z, 5)
    assert torch.allclose(ours.double(), mine, atol=1e-3)
    assert torch.allclose(mine, fkd.double(), atol=1e-6)


def test_a_random_resized_crop_sweep_reads_its_cache(tmp_path, digits_teacher):
    """The key a trial computes equals the one meta.json holds back (a resized crop's scale and ratio
    are tuples in the config, lists in JSON): else every such trial ran its teacher online."""
    from trainables.teacher_cache import create_cache

    c = cfg(digits_teacher, dataset={"name": "digits", "val_fraction": 0.2, "augment": {"resized_crop": {}, "flip": True}})
    teacher, card = load_teacher(digits_teacher)
    path = create_cache(c, card, tmp_path, 10)
    assert TeacherCache.open(path, c, card) is not None
    r = train_student(c.model_copy(update={"teacher_cache": str(path), "train": c.train.model_copy(update={"epochs": 1})}),
                      LocalReporter(None, log_epochs=False))
    assert r.metrics["teacher_targets"] == "cache"


def test_a_diverged_teacher_is_refused_not_cached_as_inf(tmp_path, digits_teacher):
    """Logits past float16's range (a teacher that diverged) would be stored as inf and train on NaN
    targets: building the cache says what happened instead."""
    teacher, card = load_teacher(digits_teacher)
    last = [m for m in teacher.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(1e7)
    with pytest.raises(RuntimeError, match=r"logits pass float16's range \(65504\).*has diverged"):
        build_teacher_cache(cfg(digits_teacher), teacher, card, tmp_path)
    assert not list(tmp_path.rglob("*.pt"))  # nothing cached
