"""Classification metrics on logits: accuracy, macro recall/F1, top-5, NLL, ECE, agreement with and
KL to the teacher. Pure tensor functions, computed on the device where the logits are (the tasks
call them; trainables.eval.metrics declares what they report)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def confusion(pred: Tensor, y: Tensor, num_classes: int) -> Tensor:
    """(true, predicted) counts, int64."""
    return torch.bincount(y * num_classes + pred, minlength=num_classes**2).view(num_classes, num_classes)


def per_class(logits: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Precision, recall, F1 and support per class (a class never predicted has precision 0)."""
    c = logits.shape[1]
    cm = confusion(logits.argmax(1), y, c).double()
    tp = cm.diag()
    support, predicted = cm.sum(1), cm.sum(0)
    precision = torch.where(predicted > 0, tp / predicted.clamp_min(1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp_min(1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-12), torch.zeros_like(tp))
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def expected_calibration_error(logits: Tensor, y: Tensor, n_bins: int = 15) -> float:
    """ECE with equal-width confidence bins (Guo et al., 2017): sum_b |B|/n * |acc(B) - conf(B)|."""
    probs = F.softmax(logits.float(), 1)
    conf, pred = probs.max(1)
    correct = (pred == y).double()
    bins = torch.clamp((conf * n_bins).long(), max=n_bins - 1)  # bin b holds conf in (b/n, (b+1)/n]
    bins = torch.where(conf * n_bins == bins.double(), bins - 1, bins).clamp_min(0)
    acc = torch.bincount(bins, weights=correct, minlength=n_bins)
    cnf = torch.bincount(bins, weights=conf.double(), minlength=n_bins)
    return float(((acc - cnf).abs()).sum() / len(y))


def classification_metrics(logits: Tensor, y: Tensor, teacher_logits: Tensor | None = None, prefix: str = "val_") -> dict[str, float]:
    """The per-trial numbers: acc, macro recall/F1, top-5 (more than 5 classes), NLL, ECE (15 bins),
    and with a teacher: argmax agreement and mean KL(teacher || student)."""
    logits = logits.float()
    pc = per_class(logits, y)
    present = pc["support"] > 0  # macro averages over the classes that occur
    out = {
        "acc": (logits.argmax(1) == y).double().mean().item(),
        "macro_recall": pc["recall"][present].mean().item(),
        "macro_f1": pc["f1"][present].mean().item(),
        "nll": F.cross_entropy(logits, y).item(),
        "ece": expected_calibration_error(logits, y),
    }
    if logits.shape[1] > 5:
        out["top5_acc"] = (logits.topk(5, 1).indices == y[:, None]).any(1).double().mean().item()
    if teacher_logits is not None:
        t = teacher_logits.float()
        out["agreement"] = (logits.argmax(1) == t.argmax(1)).double().mean().item()
        out["kl_teacher"] = F.kl_div(F.log_softmax(logits, 1), F.log_softmax(t, 1), reduction="batchmean", log_target=True).item()
    return {prefix + k: v for k, v in out.items()}
