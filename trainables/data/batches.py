"""Batches and augmentation without a DataLoader: every random choice of an epoch (its order, each
example's crop and flip) is a pure function of (seed, epoch) and the example, so the same view can
be re-created anywhere (teacher caching, exact resume) whatever the batch size; batches mix
labelled and unlabelled examples at a fixed layout, text batches group similar lengths."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from trainables.data import DataSplits
from trainables.registry import ConfigError

if TYPE_CHECKING:
    from trainables.config import TrialConfig

def _mix(seed: int, epoch: int, stream: int) -> int:
    return ((seed * 1_000_003 + epoch) * 1_000_033 + stream) % (2**63 - 1)


def epoch_permutation(n: int, seed: int, epoch: int, device: torch.device | str = "cpu") -> Tensor:
    """The order of the train split for one epoch (generated on CPU so every device agrees)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(_mix(seed, epoch, -1))).to(device)


def epoch_views(n: int, seed: int, epoch: int, aug, hw: tuple[int, int]) -> Tensor:
    """Per-example (dy, dx, flip[, y0, x0, h, w]) for one epoch, int64 on CPU: row i is the whole
    randomness of example i's view, whatever the batch size, the batch it lands in or the worker
    that trains it (so a searched batch size still reads the teacher cache). `aug` is an
    AugmentConfig; the crop box columns exist with `resized_crop`, sampled as torchvision's
    RandomResizedCrop does (10 tries at a scale and log-ratio, else the whole image), from the same
    generator after the shifts and flips."""
    g = torch.Generator().manual_seed(_mix(seed, epoch, -3))
    shifts = torch.randint(0, 2 * aug.crop_pad + 1, (n, 2), generator=g)
    flips = torch.randint(0, 2, (n, 1), generator=g) if aug.flip else torch.zeros(n, 1, dtype=torch.long)
    cols = [shifts, flips]
    if aug.resized_crop is not None:
        cols.append(_crop_boxes(g, n, hw, aug.resized_crop.scale, aug.resized_crop.ratio))
    return torch.cat(cols, dim=1)


def _crop_boxes(g: torch.Generator, n: int, hw: tuple[int, int], scale, ratio, tries: int = 10) -> Tensor:
    h, w = hw
    area = torch.empty(n, tries).uniform_(scale[0], scale[1], generator=g) * (h * w)
    r = torch.empty(n, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g).exp()
    cw, ch = (area * r).sqrt().round().long(), (area / r).sqrt().round().long()
    ok = (cw > 0) & (ch > 0) & (cw <= w) & (ch <= h)
    first = ok.long().argmax(1, keepdim=True)
    found = ok.any(1)
    cw = torch.where(found, cw.gather(1, first).squeeze(1), torch.full((n,), w))
    ch = torch.where(found, ch.gather(1, first).squeeze(1), torch.full((n,), h))
    u = torch.rand(n, 2, generator=g)
    y0, x0 = (u[:, 0] * (h - ch + 1)).long(), (u[:, 1] * (w - cw + 1)).long()
    return torch.stack([y0, x0, ch, cw], dim=1)


def augment(x: Tensor, params: Tensor, aug) -> Tensor:
    """Random crop with zero padding, random-resized-crop (bilinear, back to the input size) and
    horizontal flip, batched on x's device; x is (B, C, H, W) uint8 (float after a resized crop).
    Decided from the config, never from the params' values: no host sync in the hot loop."""
    if aug.crop_pad == 0 and not aug.flip and aug.resized_crop is None:
        return x
    b, c, h, w = x.shape
    params = params.to(x.device, non_blocking=True)
    if aug.crop_pad:
        p = aug.crop_pad
        padded = torch.nn.functional.pad(x, (p,) * 4)
        rows = (params[:, 0, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (params[:, 1, None] + torch.arange(w, device=x.device))[:, None, None, :]
        bi = torch.arange(b, device=x.device)[:, None, None, None]
        ci = torch.arange(c, device=x.device)[None, :, None, None]
        x = padded[bi, ci, rows, cols]
    if aug.resized_crop is not None:
        from torchvision.ops import roi_align

        y0, x0, ch, cw = params[:, 3:7].float().unbind(1)
        boxes = torch.stack([torch.arange(b, device=x.device, dtype=torch.float32), x0, y0, x0 + cw, y0 + ch], dim=1)
        x = roi_align(x.float(), boxes, output_size=(h, w), spatial_scale=1.0, sampling_ratio=1, aligned=True)
    return torch.where(params[:, 2, None, None, None].bool(), x.flip(3), x) if aug.flip else x


@dataclass(frozen=True)
class BatchLayout:
    """How an epoch's global batches are made: `labeled` labelled examples first, then `unlabeled`
    unlabelled ones (dataset.unlabeled), `steps` batches an epoch. Without unlabelled data it is
    today's plain layout: one permutation of the train split, the last partial batch dropped.
    With them an epoch is one pass's worth of batches over all examples, each kind drawn from its
    own seeded permutations (repeated as needed), so the mix holds at the set ratio."""

    n: int  # labelled train examples
    n_unlabeled: int
    batch_size: int
    unlabeled: int  # per global batch

    @classmethod
    def of(cls, n: int, batch_size: int, n_unlabeled: int = 0, ratio: float | None = None) -> "BatchLayout":
        if not n_unlabeled:
            return cls(n, 0, batch_size, 0)
        share = n_unlabeled / (n + n_unlabeled) if ratio is None else ratio
        if batch_size < 2:
            raise ConfigError(f"`train.batch_size` must be >= 2 with dataset.unlabeled (a labelled and an unlabelled example), but got {batch_size}")
        return cls(n, n_unlabeled, batch_size, min(batch_size - 1, max(1, round(batch_size * share))))

    @property
    def labeled(self) -> int:
        return self.batch_size - self.unlabeled

    @property
    def steps(self) -> int:
        return (self.n + self.n_unlabeled) // self.batch_size if self.n_unlabeled else self.n // self.batch_size

    def check_world(self, world: int) -> None:
        """Every DDP rank gets the same share of each kind, so each rank's CE is a mean over the
        same number of labelled examples and the averaged gradient is the one-process gradient."""
        if self.unlabeled and (self.labeled % world or self.unlabeled % world):
            raise ConfigError(f"`dataset.unlabeled.ratio` splits each batch of {self.batch_size} into {self.labeled} labelled and "
                              f"{self.unlabeled} unlabelled examples, which do not divide over {world} workers: change the ratio or batch size")

    def rows(self, rank: int = 0, world: int = 1) -> slice | Tensor:
        """This rank's positions within a global batch (a slice where contiguous)."""
        if not self.unlabeled or world == 1:
            per = self.batch_size // world
            return slice(rank * per, (rank + 1) * per)
        lr, ur = self.labeled // world, self.unlabeled // world
        return torch.cat([torch.arange(rank * lr, (rank + 1) * lr), self.labeled + torch.arange(rank * ur, (rank + 1) * ur)])


def _stream(n: int, count: int, g: torch.Generator) -> Tensor:
    """`count` indices from successive permutations of range(n)."""
    perms = [torch.randperm(n, generator=g) for _ in range(-(-count // n))]
    return torch.cat(perms)[:count] if perms else torch.zeros(0, dtype=torch.long)


def by_length(order: Tensor, lengths: Tensor, batch_size: int, g: torch.Generator, chunk: int = 50) -> Tensor:
    """The permutation regrouped so each batch holds texts of similar length (a model then computes
    little padding): every run of `chunk` batches' worth of it sorted by length, cut into batches,
    and the batches shuffled. Still a pure function of the permutation and the generator."""
    full = len(order) // batch_size * batch_size
    span = chunk * batch_size
    runs = [order[i : min(i + span, full)] for i in range(0, full, span)]
    grouped = torch.cat([r[lengths[r].argsort(stable=True)] for r in runs]).view(-1, batch_size) if full else order[:0].view(0, batch_size)
    return torch.cat([grouped[torch.randperm(len(grouped), generator=g)].flatten(), order[full:]])


def epoch_batches(
    n: int, batch_size: int, seed: int, epoch: int, aug, hw: tuple[int, int], device: torch.device | str = "cpu",
    rank: int = 0, world_size: int = 1, n_unlabeled: int = 0, ratio: float | None = None, lengths: Tensor | None = None,
):
    """Yield (batch_idx, indices, view params) for one epoch, both on `device`: `n` labelled
    examples, then `n_unlabeled` unlabelled ones (indices n..), mixed as BatchLayout says; each
    example's view is its row of epoch_views. `lengths` (text, CPU): batches of similar lengths
    (by_length).

    With several DDP workers each rank takes its own share of every global batch, so the global
    batch (and hence the math) is the same whatever the world size.
    """
    layout = BatchLayout.of(n, batch_size, n_unlabeled, ratio)
    rows = layout.rows(rank, world_size)
    if not n_unlabeled and lengths is not None:
        g = torch.Generator().manual_seed(_mix(seed, epoch, -4))
        order = by_length(epoch_permutation(n, seed, epoch), lengths, batch_size, g).to(device)
    elif not n_unlabeled:
        order = epoch_permutation(n, seed, epoch, device)
    else:
        g_l, g_u = (torch.Generator().manual_seed(_mix(seed, epoch, k)) for k in (-1, -2))
        steps = layout.steps
        lab = _stream(n, steps * layout.labeled, g_l).view(steps, layout.labeled)
        unl = n + _stream(n_unlabeled, steps * layout.unlabeled, g_u).view(steps, layout.unlabeled)
        order = torch.cat([lab, unl], 1).flatten().to(device)
    on = rows if isinstance(rows, slice) else rows.to(order.device)
    views = None if aug.static else epoch_views(n + n_unlabeled, seed, epoch, aug, hw).to(device)
    still = torch.zeros(batch_size // world_size, 3, dtype=torch.long, device=device)  # fixed views: augment reads nothing
    for b in range(layout.steps):
        idx = order[b * batch_size : (b + 1) * batch_size][on]
        yield b, idx, still if views is None else views[idx]


def train_batches(splits: DataSplits, cfg: "TrialConfig", epoch: int, device: torch.device | str, rank: int = 0, world: int = 1):
    """epoch_batches for a trial's train split: the one call the trial loop and the teacher cache
    share, so the cache holds exactly the views a trial trains on."""
    return epoch_batches(splits.n_labeled, cfg.train.batch_size, cfg.seed, epoch, cfg.dataset.augment_or_default(), splits.input_shape[1:], device,
                         rank, world, splits.n_unlabeled, cfg.dataset.unlabeled_ratio, text_lengths(splits))


def text_lengths(splits: DataSplits) -> Tensor | None:
    """Each train example's token count (CPU), when the inputs are padded token ids: its batches group similar lengths."""
    if splits.pad_id is None:
        return None
    return (splits.train_x != splits.pad_id).sum(1).cpu()


def batch_layout(splits: DataSplits, cfg: "TrialConfig") -> BatchLayout:
    """A trial's BatchLayout over its train split."""
    return BatchLayout.of(splits.n_labeled, cfg.train.batch_size, splits.n_unlabeled, cfg.dataset.unlabeled_ratio)
