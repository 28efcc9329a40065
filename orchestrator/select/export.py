"""`kdsweep export NAME`: the champion (or one trial's student) taken out alone, with its
preprocessing built in (raw 0..255 images or waveforms in, logits out; a text student takes token
ids, its tokenizer beside it) and a dynamic batch dimension (driver side). How is the task's
(`Task.serving`: SERVING below). ONNX and TorchScript files are checked against PyTorch on test
examples before they are kept; the file and the check's max abs logit difference are logged to the
student's MLflow run."""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch

from orchestrator.track.store import SweepTracker, Tag
from trainables.api import STUDENT_CARD, StudentCard, Task, build_card, load_student, load_tokenizer, task_for, write_card
from trainables.registry import ConfigError

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript", "safetensors")
#: What the exported file must agree with PyTorch to: max abs logit difference, relative to the
#: largest |logit| when that exceeds 1 (float32 keeps ~7 digits, whatever the logits' scale).
TOLERANCE = 1e-4


def student_run(tracker: SweepTracker, parent_id: str, trial: str | None) -> str:
    if trial is not None:
        runs = tracker.trial_runs(parent_id, trial)
        if not runs:
            raise ConfigError(f"`--trial` {trial!r} is not a trial of this sweep: see `kdsweep best NAME` for trial ids")
        return runs[0].info.run_id
    champion = tracker.tags(parent_id).get(Tag.CHAMPION)
    if champion is None:
        raise ConfigError("`NAME` has no champion yet: run `kdsweep best NAME` first, or pass --trial ID")
    return champion


def export(saved, tracker: SweepTracker, parent_id: str, fmt: str, out: str | None, trial: str | None) -> Path:
    if fmt not in FORMATS:
        raise ConfigError(f"`--format` must be one of {list(FORMATS)}, but got {fmt!r}")
    run_id = student_run(tracker, parent_id, trial)
    splits = saved.config.task.splits(saved.config.dataset)
    with tempfile.TemporaryDirectory() as d:  # the run's student folder: weights and card
        model, card = load_student(tracker.download(run_id, "student", d), shown_as=f"runs:/{run_id}/student/{STUDENT_CARD}")
    out_dir = Path(out) if out else saved.directory / "export"
    out_dir.mkdir(parents=True, exist_ok=True)
    task = task_for(saved.config.dataset.name)
    return SERVING[task.serving](model, card, splits, task, saved.config.dataset, tracker, run_id, fmt, out_dir)


def export_tensors(model, logged: StudentCard, splits, task: Task, dataset, tracker: SweepTracker, run_id: str, fmt: str, out_dir: Path) -> Path:
    """A student that takes its split's tensors as they are (raw pixels, waveforms: `model` has
    the normalization built in), with a dynamic batch axis."""
    example = splits.test_x[:256].float()
    with torch.no_grad():
        expected = model(example)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = out_dir / "student.safetensors"
        save_file({k: v.contiguous() for k, v in model.model.state_dict().items()}, str(path))
        # mean/std: the logged card's, which load_student built into `model`
        described = task.input_description(tuple(logged.input_shape), logged.arch_kwargs)
        card = build_card(StudentCard, {**logged.model_dump(), "input": described + ("; normalize with mean/std x 255" if logged.mean else "")})
        write_card(card, out_dir / "student.json")
        for f in (path, out_dir / "student.json"):
            tracker.log_files(run_id, f, "export")
        log.info("exported %s (weights and card; preprocessing in the card) to %s", run_id, path)
        return path
    if fmt == "onnx":
        path = out_dir / "student.onnx"
        batch = torch.export.Dim("batch", min=1)
        torch.onnx.export(model, (example[:2],), str(path), input_names=[task.input_name], output_names=["logits"],
                          dynamic_shapes={"x": {0: batch}}, dynamo=True, external_data=False, verbose=False)
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {task.input_name: example.numpy()})[0])
    else:
        path = out_dir / "student.torchscript.pt"
        torch.jit.save(torch.jit.trace(model, example[:2]), str(path))
        got = torch.jit.load(str(path))(example).detach()
    diff = (got - expected).abs().max().item()
    bound = TOLERANCE * max(1.0, expected.abs().max().item())
    log.info("exported %s to %s: max abs logit difference vs PyTorch on %d test %s = %.3g (bound %.3g)", run_id, path, len(example),
             task.unit, diff, bound)
    if not diff <= bound:
        raise ConfigError(f"`--format {fmt}` export disagrees with PyTorch by {diff:.3g} (> {bound:.3g}) on test {task.unit}: try --format torchscript")
    tracker.log_metrics(run_id, {f"export_{fmt}_max_abs_diff": diff}, step=0)
    tracker.log_files(run_id, path, "export")
    return path


def check_onnx(path: Path, feeds: dict[str, torch.Tensor], expected: torch.Tensor, what: str, tracker: SweepTracker, run_id: str) -> None:
    """The token model's ONNX file run by onnxruntime on `feeds` against PyTorch's `expected` logits
    (within TOLERANCE), the difference logged to the run; a ConfigError when it disagrees."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {k: v.numpy() for k, v in feeds.items()})[0])
    diff = (got - expected).abs().max().item()
    bound = TOLERANCE * max(1.0, expected.abs().max().item())
    log.info("exported %s to %s: max abs logit difference vs PyTorch on %d %s = %.3g (bound %.3g)", run_id, path, len(expected), what, diff, bound)
    if not diff <= bound:
        raise ConfigError(f"`--format onnx` export disagrees with PyTorch by {diff:.3g} (> {bound:.3g}) on {what}")
    tracker.log_metrics(run_id, {"export_onnx_max_abs_diff": diff}, step=0)


class TokensIn(torch.nn.Module):
    """A Hugging Face student as transformers' own exports take it: input_ids and attention_mask
    (int64, (batch, sequence)) in, logits out."""

    def __init__(self, model) -> None:
        super().__init__()
        self.net = model.net

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids=input_ids, attention_mask=attention_mask).logits


def export_tokens(normalized, card: StudentCard, splits, task: Task, dataset, tracker: SweepTracker, run_id: str, fmt: str, out_dir: Path) -> Path:
    """A text student to ONNX (dynamic batch and sequence axes) with its tokenizer's files beside
    it, checked with onnxruntime against PyTorch on test examples (tokenized with the student's
    tokenizer, its card's); or its safetensors and card."""
    model = normalized.model
    tokenizer = load_tokenizer(card.arch_kwargs["tokenizer"], "student card arch_kwargs.tokenizer")
    splits = task_for(dataset.name).splits(dataset.resolved().model_copy(update={"tokenizer": card.arch_kwargs["tokenizer"]}))
    tokenizer.save_pretrained(str(out_dir))
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = out_dir / "student.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        write_card(build_card(StudentCard, {**card.model_dump(), "arch_kwargs": {**card.arch_kwargs, "tokenizer": "."},
                                  "input": task.input_description(tuple(card.input_shape), card.arch_kwargs)}), out_dir / "student.json")
    elif fmt == "onnx":
        ids = splits.test_x[:256].long()
        mask = (ids != tokenizer.pad_token_id).long()
        wrapped = TokensIn(model).eval()
        with torch.no_grad():
            expected = wrapped(ids, mask)
        path = out_dir / "student.onnx"
        batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("sequence", min=2, max=getattr(model.config, "max_position_embeddings", ids.shape[1]))
        torch.onnx.export(wrapped, (ids[:2], mask[:2]), str(path), input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}, dynamo=True,
                          external_data=False, verbose=False)
        check_onnx(path, {"input_ids": ids, "attention_mask": mask}, expected, "test texts", tracker, run_id)
    else:
        raise ConfigError("`--format torchscript` takes tensors, not strings: export a text student with --format onnx or safetensors")
    for f in [path, *(out_dir / n for n in os.listdir(out_dir) if n.startswith(("tokenizer", "vocab", "special_tokens", "merges")))]:
        tracker.log_files(run_id, f, "export")
    log.info("exported %s to %s (tokenizer files beside it)", run_id, path)
    return path


class NextTokenLogits(torch.nn.Module):
    """A causal-LM student as its decoder's ONNX takes it: input_ids (int64, (batch, sequence)) in,
    next-token logits (batch, sequence, vocabulary) out (right padding needs no mask in a causal model)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.net = model.net

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids=input_ids, use_cache=False).logits


def export_generator(normalized, card: StudentCard, splits, task: Task, dataset, tracker: SweepTracker, run_id: str, fmt: str,
                     out_dir: Path) -> Path:
    """A causal-LM student as a Hugging Face folder (save_pretrained, its tokenizer beside it: it
    loads with AutoModelForCausalLM.from_pretrained and generates without kdsweep); `onnx` adds its
    decoder's logits as student.onnx (dynamic batch and sequence), checked with onnxruntime against
    PyTorch on test examples."""
    model = normalized.model
    tokenizer = load_tokenizer(card.arch_kwargs["tokenizer"], "student card arch_kwargs.tokenizer")
    model.net.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    path = out_dir
    if fmt == "onnx":
        ids = splits.test_x[:64].long()
        wrapped = NextTokenLogits(model).eval()
        with torch.no_grad():
            expected = wrapped(ids)
        path = out_dir / "student.onnx"
        batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("sequence", min=2, max=getattr(model.config, "max_position_embeddings", ids.shape[1]))
        torch.onnx.export(wrapped, (ids[:2],), str(path), input_names=["input_ids"], output_names=["logits"],
                          dynamic_shapes={"input_ids": {0: batch, 1: seq}}, dynamo=True, external_data=False, verbose=False)
        check_onnx(path, {"input_ids": ids}, expected, "test examples", tracker, run_id)
    elif fmt != "safetensors":
        raise ConfigError("`--format torchscript` is not made for causal LMs: export one with --format onnx or safetensors (a save_pretrained folder)")
    for f in sorted(p for p in out_dir.iterdir() if p.is_file()):
        tracker.log_files(run_id, f, "export")
    log.info("exported %s to %s (save_pretrained folder%s, tokenizer beside it)", run_id, out_dir, " and student.onnx" if fmt == "onnx" else "")
    return path


#: Task.serving -> how a student of that kind is exported
SERVING = {"tensors": export_tensors, "tokens": export_tokens, "generate": export_generator}
