"""The figures the reference checks compare against: values and gradients of the authors' own code,
run on the seeded inputs of tests/test_losses_modern.py, tests/test_losses_text.py,
tests/test_losses_tokens.py and tests/test_teacher_cache.py, written to tests/fixtures/reference/*.npz.

kdsweep keeps none of the authors' code. This script imports it from local snapshots of their
repositories, one folder per repository under --ref, named <owner>+<name> and holding the repository
at the commit below (a git checkout, or an exported tree with the commit in <folder>/.commit; another
commit is refused), runs it unmodified and keeps only numbers. docs/losses.md has the commands. The inputs are built by the tests'
own functions (imported from tests/), so both sides use the same seeds; each case records a
fingerprint of its inputs, which the tests check.

  python benchmarks/reference_figures.py --ref /tmp/refs [--out tests/fixtures/reference]

References (figure file: repository @ commit, file: function):
- dist.npz: hunto/image_classification_sota @ d9662f7df68fe46b973c4580b7c9b896cedcd301 (the commit
  hunto/DIST_KD pins), lib/models/losses/dist_kd.py: DIST (forward, with cosine_similarity,
  pearson_correlation, inter_class_relation, intra_class_relation).
- logit_standardization.npz: sunshangquan/logit-standardization-KD @ f6e5aa5172bad618e801163c3385322eea673754,
  mdistiller/distillers/KD.py: kd_loss (and normalize); mdistiller/distillers/DKD.py: dkd_loss (and
  normalize, _get_gt_mask, _get_other_mask, cat_mask).
- distilbert.npz: huggingface/transformers-research-projects @ fccd0cdab03c1407bb7def05e1b48528fc817078,
  distillation/distiller.py: Distiller.step (its KD term lines 411-417, its cosine term lines 434-447),
  the loss modules as Distiller.__init__ builds them (lines 111-116).
- tinybert.npz: huawei-noah/Pretrained-Language-Model @ 0598f02d7fc4eaa7b4cbc1e9d7ab18bc875c24f9,
  TinyBERT/task_distill.py: main(), its loss (line 903) and its intermediate-layer loop (lines 941-964);
  TinyBERT/transformer/modeling.py: TinyBertForSequenceClassification.forward (fit_dense, lines 1137-1141).
- textbrewer.npz: airaria/TextBrewer @ 2c105fa664bbc10669cd2888bd846d2c9b8afca8, src/textbrewer/losses.py:
  att_mse_loss, hid_mse_loss, cos_loss (with src/textbrewer/compatibility.py: mask_dtype).
- fkd.npz: szq0214/FKD @ afd5294b43c8b8c437c4d314c01661b24569aa0e, FKD/utils_FKD.py: Recover_soft_label
  (label_type 'marginal_smoothing_k5').
- trl.npz: huggingface/trl @ f2cd57710ae345ea6428ae95363267fcf38a3dc8, trl/experimental/gkd/gkd_trainer.py:
  GKDTrainer.generalized_jsd_loss (compiled from its own lines; run on float32 and float64 tensors).
- distillm.npz: jongwooko/distillm @ d47e77ff9d27721783b32213be38c1204230cc0a, distillm/losses.py: forward_kl,
  reverse_kl, js_distance, tv_distance, skewed_forward_kl, skewed_reverse_kl (float32: they cast to it).
- torchtune.npz: pytorch/torchtune @ bd2a0fc7c31430972728494fa01aaeeb0ebf1ba1, torchtune/modules/loss/kd_losses.py:
  ForwardKLLoss, ReverseKLLoss (float32: they cast to it).

How the code is reached, unmodified:
- Files are loaded as modules by path. Package __init__ files that pull in whole frameworks
  (mdistiller, textbrewer, TinyBERT's transformer) are not run: a bare package object points at the
  snapshot's folder, so `from ._base import ...` inside a file still loads the snapshot's module.
  Empty stand-ins replace, only while a file loads, DistilBERT's sibling modules (utils,
  lm_seqs_dataset, grouped_batch_sampler: data loading and logging, which step() does not use) and
  imports this machine lacks (boto3, requests, psutil, tensorboardX).
- DistilBERT's Distiller.step runs as is on an object made without __init__ (which wants a dataset,
  an optimizer and GPUs): the attributes step() reads are set here, the loss modules by running
  __init__'s lines 111-116 from the snapshot. The student and teacher are stand-ins returning the
  test's logits and hidden states, and `optimize` is replaced by one that keeps the loss for autograd
  (it would call backward() and step an optimizer).
- TinyBERT's loop lives inside main(): its lines are read from the snapshot (the first and last
  are checked to be the expected ones), dedented and run on the test's tensors (args.pred_distill
  false: the intermediate-layer stage); which teacher layers it pairs is read back from its
  new_teacher_atts and new_teacher_reps, run on tensors that carry their index. The student's
  projection is TinyBertForSequenceClassification.forward itself, with a stand-in `bert` returning
  the test's hidden states; its fit_dense gets the test's weights.
The wrappers that feed the tests' inputs in and read results out are this file's; the arithmetic is
the snapshot's. The tests' conventions stay theirs (e.g. TinyBERT with padding: the reference run on
each example's real tokens, test_losses_text.py's docstring).

What each file holds, per case (`<case>|<entry>`): `inputs` (the fingerprint), the values and the
gradients w.r.t. the student's tensors. Image losses: value64/value32 (the code run in float64 and
float32), grad64 (float64, stored as float32; over 2,048 entries only the `kept` ones), grad_max (the
whole float64 gradient's largest magnitude), grad_e32 (how far the float32 gradient is from it,
relative), grad32 when kept whole. Text losses and FKD run in float32, as the tests do. `meta`: a JSON
string with repository, commit, files and functions, how the code was reached, torch version, date.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import importlib
import importlib.util
import json
import logging
import platform
import subprocess
import sys
import textwrap
import types
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests import test_losses_modern as modern  # noqa: E402  (the tests' inputs and case names)
from tests import test_losses_text as text  # noqa: E402
from tests import test_losses_tokens as tokens  # noqa: E402
from tests import test_teacher_cache as cache_tests  # noqa: E402
from tests.test_losses_reference import rel_err  # noqa: E402

SOURCES = {
    "dist": ("hunto/image_classification_sota", "d9662f7df68fe46b973c4580b7c9b896cedcd301",
             {"lib/models/losses/dist_kd.py": ["DIST.forward", "cosine_similarity", "pearson_correlation",
                                                "inter_class_relation", "intra_class_relation"]}),
    "logit_standardization": ("sunshangquan/logit-standardization-KD", "f6e5aa5172bad618e801163c3385322eea673754",
                              {"mdistiller/distillers/KD.py": ["kd_loss", "normalize"],
                               "mdistiller/distillers/DKD.py": ["dkd_loss", "normalize", "_get_gt_mask", "_get_other_mask", "cat_mask"]}),
    "distilbert": ("huggingface/transformers-research-projects", "fccd0cdab03c1407bb7def05e1b48528fc817078",
                   {"distillation/distiller.py": ["Distiller.step (KD: lines 411-417, cosine: lines 434-447)",
                                                  "Distiller.__init__ (lines 111-116)"]}),
    "tinybert": ("huawei-noah/Pretrained-Language-Model", "0598f02d7fc4eaa7b4cbc1e9d7ab18bc875c24f9",
                 {"TinyBERT/task_distill.py": ["main (line 903, lines 941-964)"],
                  "TinyBERT/transformer/modeling.py": ["TinyBertForSequenceClassification.forward"]}),
    "textbrewer": ("airaria/TextBrewer", "2c105fa664bbc10669cd2888bd846d2c9b8afca8",
                   {"src/textbrewer/losses.py": ["att_mse_loss", "hid_mse_loss", "cos_loss"],
                    "src/textbrewer/compatibility.py": ["mask_dtype"]}),
    "fkd": ("szq0214/FKD", "afd5294b43c8b8c437c4d314c01661b24569aa0e",
            {"FKD/utils_FKD.py": ["Recover_soft_label (label_type 'marginal_smoothing_k5')"]}),
    "trl": ("huggingface/trl", "f2cd57710ae345ea6428ae95363267fcf38a3dc8",
            {"trl/experimental/gkd/gkd_trainer.py": ["GKDTrainer.generalized_jsd_loss"]}),
    "distillm": ("jongwooko/distillm", "d47e77ff9d27721783b32213be38c1204230cc0a",
                 {"distillm/losses.py": ["forward_kl", "reverse_kl", "js_distance", "tv_distance", "skewed_forward_kl",
                                         "skewed_reverse_kl"]}),
    "torchtune": ("pytorch/torchtune", "bd2a0fc7c31430972728494fa01aaeeb0ebf1ba1",
                  {"torchtune/modules/loss/kd_losses.py": ["ForwardKLLoss.forward", "ReverseKLLoss.forward"]}),
}


# --- reaching the snapshots ----------------------------------------------------------------------


def snapshot(ref: Path, name: str) -> Path:
    repo, commit, files = SOURCES[name]
    root = ref / repo.replace("/", "+")
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise SystemExit(f"{root}: no {missing[0]}; check out {repo} at {commit} there (docs/losses.md)")
    found = snapshot_commit(root)
    if found is not None and found != commit:
        raise SystemExit(f"{root} is at {found}, not {commit}: check out {commit}")
    return root


def snapshot_commit(root: Path) -> str | None:
    """The commit of a git checkout at `root`, or of an exported tree (its commit in `root/.commit`); None if unknown."""
    if (root / ".commit").is_file():
        return (root / ".commit").read_text().strip()
    try:
        top, head = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True, text=True,
                                   check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError, ValueError):
        return None
    return head if Path(top).resolve() == root.resolve() else None  # not a folder inside some other repository


@contextlib.contextmanager
def stand_ins(always: dict[str, dict] | None = None, if_missing: dict[str, dict] | None = None):
    """Empty modules (name -> attributes) in place of imports a snapshot file makes, only while it loads:
    `always` whatever this machine has, `if_missing` where it cannot import them."""
    wanted = dict(always or {})
    for name, attrs in (if_missing or {}).items():
        try:
            importlib.import_module(name)
        except ImportError:
            wanted[name] = attrs
    added = []
    for name, attrs in wanted.items():
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            sub = ".".join(parts[:i])
            if sub not in sys.modules or sub == name:
                added.append((sub, sys.modules.get(sub)))
                sys.modules[sub] = types.ModuleType(sub)
        for k, v in attrs.items():
            setattr(sys.modules[name], k, v)
    try:
        yield
    finally:
        for sub, before in reversed(added):
            if before is None:
                sys.modules.pop(sub, None)
            else:
                sys.modules[sub] = before


def load_file(path: Path, module_name: str):
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def bare_package(name: str, folder: Path) -> None:
    """A package object for `folder` whose __init__ is not run: its files import each other as usual."""
    package = types.ModuleType(name)
    package.__path__ = [str(folder)]
    sys.modules[name] = package


def authors_lines(path: Path, first: int, last: int, starts: str, ends: str) -> types.CodeType:
    """Lines first..last (1-based) of a snapshot file, dedented and compiled under the file's name;
    the first must start with `starts` and the last end with `ends` (the expected code, not other lines)."""
    lines = path.read_text().splitlines()[first - 1 : last]
    if not (lines[0].strip().startswith(starts) and lines[-1].strip().endswith(ends)):
        raise SystemExit(f"{path}:{first}-{last} is not the expected code ({lines[0].strip()!r} ... {lines[-1].strip()!r})")
    return compile(textwrap.dedent("\n".join(lines)) + "\n", str(path), "exec")


# --- what gets stored ----------------------------------------------------------------------------


class Figures:
    def __init__(self, name: str, root: Path, how: str, fingerprint=None) -> None:
        self.name, self.root, self.how = name, root, how
        self.fingerprint = fingerprint or modern.fingerprint
        self.entries: dict[str, np.ndarray] = {}

    def add(self, case: str, inputs: tuple, **entries) -> None:
        assert not any(k.startswith(case + "|") for k in self.entries), case
        self.entries[f"{case}|inputs"] = self.fingerprint(*inputs).numpy()
        for k, v in entries.items():
            v = v.detach() if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=torch.float64 if isinstance(v, float) else None)
            if v.is_floating_point():  # gradients: float32 (plenty for a 1e-5 check); scalars: float64
                v = v.double() if v.dim() == 0 else v.float()
            self.entries[f"{case}|{k}"] = v.numpy()

    def save(self, out: Path) -> Path:
        repo, commit, files = SOURCES[self.name]
        meta = {
            "repository": repo, "commit": commit, "snapshot_commit": snapshot_commit(self.root),
            "files": {f: {"functions": fns, "sha256": hashlib.sha256((self.root / f).read_bytes()).hexdigest()}
                      for f, fns in files.items()},
            "how": self.how, "made_by": "benchmarks/reference_figures.py", "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "date": datetime.date.today().isoformat(),
            "cases": len({k.split("|")[0] for k in self.entries}),
        }
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{self.name}.npz"
        np.savez_compressed(path, meta=np.array(json.dumps(meta, indent=1)), **self.entries)
        return path


def grads(out: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, inputs))


# --- the image losses: DIST, logit standardization ----------------------------------------------------


def image_case(figs: Figures, case: str, reference, s: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
    """`reference(student, teacher)` in float64 and in float32; the gradients w.r.t. the student."""
    values, gs = {}, {}
    for dt in (torch.float64, torch.float32):
        x = s.to(dt).requires_grad_(True)
        out = reference(x, t.to(dt))
        values[dt], (gs[dt],) = out.detach(), grads(out, [x])
    g64, g32 = gs[torch.float64], gs[torch.float32]
    idx = modern.kept(*s.shape, y)
    entries = {"value64": values[torch.float64], "value32": values[torch.float32], "grad_max": g64.abs().max(),
               "grad_e32": rel_err(g32, g64), "grad64": g64 if idx is None else g64.flatten()[idx]}
    if idx is None:
        entries["grad32"] = g32
    figs.add(case, (s, t, y), **entries)


def dist_figures(ref: Path) -> Figures:
    root = snapshot(ref, "dist")
    dist_kd = load_file(root / "lib/models/losses/dist_kd.py", "_ref_dist_kd")
    figs = Figures("dist", root, "lib/models/losses/dist_kd.py loaded as a module by path; DIST(beta, gamma, tau)(z_s, z_t) called")
    key = modern.case_key
    for seed, n, c, temp in modern.CASES:
        s, t, y = modern.case_inputs(seed, n, c)
        for beta, gamma in modern.BETA_GAMMA:
            image_case(figs, key("dist", seed=seed, n=n, c=c, T=temp, beta=beta, gamma=gamma),
                       dist_kd.DIST(beta, gamma, temp), s, t, y)
    for case in modern.DIST_EXTREMES:
        image_case(figs, key("dist", case=case), dist_kd.DIST(1.0, 1.0, 1.0), *modern.dist_extreme(case))
    return figs


def logit_standardization_figures(ref: Path) -> Figures:
    root = snapshot(ref, "logit_standardization")
    bare_package("mdistiller", root / "mdistiller")
    bare_package("mdistiller.distillers", root / "mdistiller/distillers")
    kd = importlib.import_module("mdistiller.distillers.KD")
    dkd = importlib.import_module("mdistiller.distillers.DKD")
    figs = Figures("logit_standardization", root, "mdistiller.distillers.KD and .DKD imported from the snapshot's folder "
                   "(mdistiller/__init__.py and distillers/__init__.py not run); kd_loss and dkd_loss called")
    key = modern.case_key
    for seed, n, c, temp in modern.CASES:
        s, t, y = modern.case_inputs(seed, n, c, scale=8.0)
        for stand in (True, False):
            image_case(figs, key("kd", stand=stand, seed=seed, n=n, c=c, T=temp),
                       lambda x, tt, temp=temp, stand=stand: kd.kd_loss(x, tt, temp, stand), s, t, y)
        s, t, y = modern.case_inputs(seed, n, c, margin=2.0)
        image_case(figs, key("dkd", stand=True, seed=seed, n=n, c=c, T=temp),
                   lambda x, tt, y=y, temp=temp: dkd.dkd_loss(x, tt, y, 9.0, 72.0, temp, True), s, t, y)
    for case in modern.KD_EXTREMES:
        image_case(figs, key("kd", stand=True, case=case), lambda x, tt: kd.kd_loss(x, tt, 2.0, True), *modern.kd_extreme(case))
    return figs


# --- the transformer losses: DistilBERT, TinyBERT, TextBrewer ----------------------------------------


class DistilBERT:
    """Distiller.step of the snapshot on the tests' tensors: one call per loss term."""

    def __init__(self, root: Path) -> None:
        path = root / "distillation/distiller.py"
        siblings = {"utils": {"logger": logging.getLogger("distiller")}, "lm_seqs_dataset": {"LmSeqsDataset": object},
                    "grouped_batch_sampler": {"GroupedBatchSampler": object, "create_lengths_groups": None}}
        with stand_ins(always=siblings, if_missing={"psutil": {}, "tensorboardX": {"SummaryWriter": object},
                                                       "transformers": {"get_linear_schedule_with_warmup": None}}):
            self.module = load_file(path, "_ref_distiller")
        self.init_lines = authors_lines(path, 111, 116, 'self.ce_loss_fct = nn.KLDivLoss(reduction="batchmean")',
                                        'self.cosine_loss_fct = nn.CosineEmbeddingLoss(reduction="mean")')

    def step(self, temperature: float, alpha_ce: float, alpha_cos: float, s_logits, t_logits, s_hidden, t_hidden, attention_mask):
        """The loss Distiller.step computes (alpha_ce * KD + alpha_cos * cosine; MLM, CLM, MSE off)."""
        d = object.__new__(self.module.Distiller)
        d.params = SimpleNamespace(restrict_ce_to_mask=False)
        d.mlm, d.temperature = True, temperature  # mlm: the attention mask is passed to the models, as for DistilBERT
        d.alpha_ce, d.alpha_mlm, d.alpha_clm, d.alpha_mse, d.alpha_cos = alpha_ce, 0.0, 0.0, 0.0, alpha_cos
        d.total_loss_epoch, d.n_sequences_epoch = 0, 0
        exec(self.init_lines, {"nn": nn}, {"self": d})  # __init__'s loss modules
        d.student = lambda input_ids, attention_mask: {"logits": s_logits, "hidden_states": s_hidden}
        d.teacher = lambda input_ids, attention_mask: {"logits": t_logits, "hidden_states": t_hidden}
        kept_loss = []
        d.optimize = kept_loss.append
        d.step(input_ids=torch.zeros(attention_mask.shape, dtype=torch.long), attention_mask=attention_mask, lm_labels=None)
        return kept_loss[0]

    def kd(self, temperature: float, s_logits, t_logits):
        """Sentence logits (N, C): the mask that selects token positions is all ones over the N rows."""
        n = s_logits.shape[0]
        return self.step(temperature, 1.0, 0.0, s_logits, t_logits, None, None, torch.ones(n, dtype=torch.bool))

    def cos(self, s_hidden, t_hidden, mask):
        n, length = mask.shape
        no_logits = torch.zeros(n, length, 1)  # one class: its KD term is 0 and alpha_ce is 0
        return self.step(1.0, 0.0, 1.0, no_logits, no_logits, s_hidden, t_hidden, mask.bool())


def distilbert_figures(ref: Path) -> Figures:
    root = snapshot(ref, "distilbert")
    ref_code = DistilBERT(root)
    figs = Figures("distilbert", root, "distillation/distiller.py loaded by path (its sibling modules utils, lm_seqs_dataset, "
                   "grouped_batch_sampler stood in for); Distiller.step run on an object built without __init__, the loss modules "
                   "by __init__'s lines 111-116 read from the file, models stood in for, optimize() replaced by keeping the loss; "
                   "KD from a call with alpha_ce 1, alpha_cos 0, the cosine from one with alpha_ce 0, alpha_cos 1")
    for case, (s, t) in text.cos_cases().items():
        h = s.hidden[-1].clone().requires_grad_(True)
        out = ref_code.cos(s.hidden[:-1] + (h,), t.hidden, s.mask)
        figs.add(text.case_key("cos", case=case), (h, t.hidden[-1], s.mask), value=out, grad=grads(out, [h])[0])
    for seed, scale, temp in text.KD_CASES:
        s_logits, t_logits, _ = text.logits_pair(seed, scale=scale)
        x = s_logits.clone().requires_grad_(True)
        out = ref_code.kd(temp, x, t_logits)
        figs.add(text.case_key("kd", seed=seed, scale=scale, T=temp), (s_logits, t_logits), value=out, grad=grads(out, [x])[0])
    return figs


class TinyBERT:
    """TinyBERT's intermediate-layer loss as task_distill.py's loop computes it, fit_dense by the model's forward."""

    def __init__(self, root: Path) -> None:
        base = root / "TinyBERT"
        self.loss_line = authors_lines(base / "task_distill.py", 903, 903, "loss_mse = MSELoss()", "loss_mse = MSELoss()")
        self.loop = authors_lines(base / "task_distill.py", 941, 964, "if not args.pred_distill:", "loss = rep_loss + att_loss")
        bare_package("transformer", base / "transformer")
        with stand_ins(if_missing={"boto3": {}, "requests": {}, "botocore.exceptions": {"ClientError": Exception}}):
            self.modeling = importlib.import_module("transformer.modeling")

    def project(self, hidden: list[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor) -> tuple[list[torch.Tensor], nn.Linear]:
        """TinyBertForSequenceClassification.forward(is_student=True) on `hidden` (a stand-in `bert`
        returns them), its fit_dense set to `weight` and `bias`: the projected states and that fit_dense."""
        hs, ht = weight.shape[1], weight.shape[0]
        config = self.modeling.BertConfig(40, hidden_size=hs, num_hidden_layers=1, num_attention_heads=1, intermediate_size=hs)
        model = self.modeling.TinyBertForSequenceClassification(config, num_labels=2, fit_size=ht)
        with torch.no_grad():
            model.fit_dense.weight.copy_(weight)
            model.fit_dense.bias.copy_(bias)

        class Encoder(nn.Module):
            def forward(self, input_ids, token_type_ids, attention_mask, output_all_encoded_layers, output_att):
                assert output_all_encoded_layers and output_att
                return hidden, [], torch.zeros(hidden[0].shape[0], hs)

        model.bert = Encoder()
        _, _, reps = model(torch.zeros(hidden[0].shape[:-1], dtype=torch.long), is_student=True)
        return reps, model.fit_dense

    def run(self, student_atts, teacher_atts, student_reps, teacher_reps) -> dict:
        scope = {"torch": torch, "MSELoss": nn.MSELoss, "args": SimpleNamespace(pred_distill=False), "device": "cpu",
                 "student_atts": student_atts, "teacher_atts": teacher_atts, "student_reps": student_reps,
                 "teacher_reps": teacher_reps, "att_loss": 0.0, "rep_loss": 0.0}
        exec(self.loss_line, scope)
        exec(self.loop, scope)
        return scope


def tinybert_figures(ref: Path) -> Figures:
    root = snapshot(ref, "tinybert")
    tb = TinyBERT(root)
    figs = Figures("tinybert", root, "TinyBERT/task_distill.py lines 903 and 941-964 read from the file, dedented and run on the "
                   "tensors (args.pred_distill False, device cpu); the student's hidden states projected by "
                   "TinyBertForSequenceClassification.forward(is_student=True) from transformer/modeling.py (package "
                   "__init__ not run, boto3/requests stood in for where missing), its `bert` a stand-in returning them")
    for t_layers, s_layers in text.LAYER_CASES:  # which teacher entries the loop pairs: tensors tagged by their index
        atts = [torch.full((1,), float(i)) for i in range(t_layers)]
        reps = [torch.full((1,), float(i)) for i in range(t_layers + 1)]
        scope = tb.run([torch.zeros(1)] * s_layers, atts, [torch.zeros(1)] * (s_layers + 1), reps)
        figs.add(text.case_key("maps", t=t_layers, s=s_layers), (),
                 attentions=torch.tensor([int(a.item()) for a in scope["new_teacher_atts"]]),
                 hidden=torch.tensor([int(r.item()) for r in scope["new_teacher_reps"]]))
    for case, (s, t, w, b, padded) in text.tinybert_cases().items():
        hidden = [h.clone().requires_grad_(True) for h in s.hidden]
        atts = [a.clone().requires_grad_(True) for a in s.attentions]
        if padded:  # the reference on each example's real tokens (test_losses_text.py's convention)
            m = s.mask
            s_h, s_a = [text.real_rows(h, m) for h in hidden], [text.real_blocks(a, m) for a in atts]
            t_h, t_a = [text.real_rows(h, m) for h in t.hidden], [text.real_blocks(a, m) for a in t.attentions]
        else:
            s_h, s_a, t_h, t_a = hidden, atts, list(t.hidden), list(t.attentions)
        reps, fit_dense = tb.project(s_h, w, b)
        scope = tb.run(s_a, t_a, reps, t_h)
        g = grads(scope["loss"], [*hidden, *atts, fit_dense.weight, fit_dense.bias])
        entries = {"att_loss": scope["att_loss"], "rep_loss": scope["rep_loss"], "loss": scope["loss"]}
        entries.update({f"grad:hidden.{i}": x for i, x in enumerate(g[: len(hidden)])})
        entries.update({f"grad:attention.{i}": x for i, x in enumerate(g[len(hidden): len(hidden) + len(atts)])})
        entries.update({"grad:weight": g[-2], "grad:bias": g[-1]})
        figs.add(text.case_key("loop", case=case), (*s.hidden, *s.attentions, *t.hidden, *t.attentions, w, b), **entries)
    return figs


def textbrewer_figures(ref: Path) -> Figures:
    root = snapshot(ref, "textbrewer")
    bare_package("textbrewer", root / "src/textbrewer")
    losses = importlib.import_module("textbrewer.losses")
    figs = Figures("textbrewer", root, "textbrewer.losses imported from src/textbrewer (textbrewer/__init__.py not run; "
                   "compatibility.py imported by losses.py as usual); att_mse_loss, hid_mse_loss, cos_loss called")
    for case, (s, t) in text.cos_cases().items():
        h = s.hidden[-1].clone().requires_grad_(True)
        out = losses.cos_loss(h, t.hidden[-1], s.mask)
        figs.add(text.case_key("cos", case=case), (h, t.hidden[-1], s.mask), value=out, grad=grads(out, [h])[0])
    for case, (a_s, a_t, mask) in text.attention_cases().items():
        a = a_s.clone().requires_grad_(True)
        out = losses.att_mse_loss(a, a_t, mask)
        figs.add(text.case_key("att", case=case), (a_s, a_t, mask), value=out, grad=grads(out, [a])[0])
        if case == "full":
            out = losses.att_mse_loss(a, a_t)
            figs.add(text.case_key("att", case="full, no mask"), (a_s, a_t), value=out, grad=grads(out, [a])[0])
    for case, (h_s, h_t, mask) in text.hidden_cases().items():
        h = h_s.clone().requires_grad_(True)
        out = losses.hid_mse_loss(h, h_t, mask)
        figs.add(text.case_key("hid", case=case), (h_s, h_t, mask), value=out, grad=grads(out, [h])[0])
    return figs


# --- FKD ---------------------------------------------------------------------------------------------


def fkd_figures(ref: Path) -> Figures:
    root = snapshot(ref, "fkd")
    utils = load_file(root / "FKD/utils_FKD.py", "_ref_utils_fkd")
    figs = Figures("fkd", root, "FKD/utils_FKD.py loaded as a module by path; Recover_soft_label(label, 'marginal_smoothing_k5', n) called")
    z, label = cache_tests.fkd_inputs()
    figs.add(cache_tests.FKD_CASE, (z, label), soft_label=utils.Recover_soft_label(label, "marginal_smoothing_k5", z.shape[1]))
    return figs


# --- token-level divergences (causal LMs) -----------------------------------------------------------


def authors_function(path: Path, qualname: str, namespace: dict) -> types.FunctionType:
    """One function of a snapshot file, compiled from its own lines (the file's other imports, e.g. a
    whole trainer's, are not run): `Class.method` or `function`; decorators such as @staticmethod dropped."""
    import ast

    source = path.read_text()
    scope = ast.parse(source)
    for part in qualname.split("."):
        scope = next(node for node in scope.body if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name == part)
    lines = source.splitlines()[scope.lineno - 1 : scope.end_lineno]  # from `def`: the decorators sit above it
    exec(compile(textwrap.dedent("\n".join(lines)) + "\n", str(path), "exec"), namespace)
    return namespace[scope.name]


def token_case(figs: Figures, case: str, entry: str, run, float64: bool = False) -> None:
    """`run(student logits, teacher logits, labels, T)` -> the loss; its value and gradient w.r.t. the
    student's logits (the kept entries where the vocabulary is large) under `case|entry|`: value32 and
    grad32 run in float32, and with `float64` value64 and grad64 from the same code on float64 tensors."""
    s, t, y, temp = tokens.token_cases()[case]
    if f"{case}|inputs" not in figs.entries:
        figs.entries[f"{case}|inputs"] = tokens.fingerprint(s, t, y).numpy()
    at = tokens.kept(tuple(s.shape), t)
    if at is not None:
        figs.entries[f"{case}|{entry}|kept"] = at.numpy()
    for bits, dtype in ((32, torch.float32), (64, torch.float64))[: 2 if float64 else 1]:
        x = s.to(dtype).requires_grad_(True)
        out = run(x, t.to(dtype), y, temp)
        grad = torch.autograd.grad(out, x)[0] if out.requires_grad else torch.zeros_like(x)  # torchtune's 0 for no token
        figs.entries[f"{case}|{entry}|value{bits}"] = out.detach().double().numpy()
        figs.entries[f"{case}|{entry}|grad{bits}"] = (grad.reshape(-1)[at] if at is not None else grad.reshape(-1)).to(dtype).numpy()


def trl_figures(ref: Path) -> Figures:
    root = snapshot(ref, "trl")
    jsd = authors_function(root / "trl/experimental/gkd/gkd_trainer.py", "GKDTrainer.generalized_jsd_loss",
                           {"torch": torch, "F": torch.nn.functional})
    figs = Figures("trl", root, "GKDTrainer.generalized_jsd_loss compiled from its own lines of gkd_trainer.py (the module's "
                   "imports, i.e. the trainer's, not run); called with the raw logits, labels (-100 not counted), beta, "
                   "temperature, reduction 'batchmean', on float32 and on float64 tensors")
    for case in tokens.TRL_CASES:
        for beta in tokens.TRL_BETAS:
            token_case(figs, case, f"generalized_jsd_loss(beta={beta})",
                       lambda s, t, y, temp, beta=beta: jsd(s, t, labels=y, beta=beta, temperature=temp), float64=True)
    return figs


def distillm_figures(ref: Path) -> Figures:
    root = snapshot(ref, "distillm")
    losses = load_file(root / "distillm/losses.py", "_ref_distillm_losses")
    figs = Figures("distillm", root, "distillm/losses.py loaded as a module by path; each function called with the logits "
                   "divided by T (it has no temperature) and no_model_batch={'label': labels}; float32 only (its softmaxes cast to it)")
    for case in tokens.DISTILLM_CASES:
        for entry in tokens.DISTILLM:
            name, _, lam = entry.partition("(lam=")
            kw = {"lam": float(lam.rstrip(")"))} if lam else {}
            fn = getattr(losses, name)
            token_case(figs, case, entry, lambda s, t, y, temp, fn=fn, kw=kw: fn(s / temp, t / temp, {"label": y}, **kw))
    return figs


def torchtune_figures(ref: Path) -> Figures:
    root = snapshot(ref, "torchtune")
    losses = load_file(root / "torchtune/modules/loss/kd_losses.py", "_ref_torchtune_kd_losses")
    figs = Figures("torchtune", root, "torchtune/modules/loss/kd_losses.py loaded as a module by path; ForwardKLLoss() and "
                   "ReverseKLLoss() called on (N*L, V) logits divided by T (no temperature there) and the labels; float32 only "
                   "(its softmaxes cast to it)")
    for case in tokens.TORCHTUNE_CASES:
        for entry in tokens.TORCHTUNE:
            loss = getattr(losses, entry)()
            token_case(figs, case, entry,
                       lambda s, t, y, temp, loss=loss: loss((s / temp).reshape(-1, s.shape[-1]), (t / temp).reshape(-1, t.shape[-1]), y))
    return figs


MAKERS = {"dist": dist_figures, "logit_standardization": logit_standardization_figures, "distilbert": distilbert_figures,
          "tinybert": tinybert_figures, "textbrewer": textbrewer_figures, "fkd": fkd_figures,
          "trl": trl_figures, "distillm": distillm_figures, "torchtune": torchtune_figures}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", type=Path, required=True, help="folder of snapshots: <owner>+<name>/ at the commits above")
    ap.add_argument("--out", type=Path, default=REPO / "tests/fixtures/reference")
    ap.add_argument("--only", nargs="*", choices=sorted(MAKERS), help="these figure files only")
    args = ap.parse_args()
    torch.set_num_threads(1)  # one summation order for the float32 runs
    warnings.filterwarnings("ignore", message="size_average")  # dkd_loss's legacy reduction argument
    for name in args.only or MAKERS:
        path = MAKERS[name](args.ref).save(args.out)
        print(f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}: {path.stat().st_size / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
