"""Transformer distillation losses: DistilBERT's hidden-state cosine and TinyBERT's hidden-state and
attention MSE, on the TextFeatures of Hugging Face models (trainables.models.hf).

Both keep the house convention (trainables.losses): with alpha mixing

    loss = (1 - alpha) * CE + alpha * w(epoch) * distill,   distill = logit_weight * KD + the feature terms,

so the feature terms scale with alpha too and a sweep's alpha=0 control is exactly CE with no teacher
(`LossConfig.distills` reads alpha alone). KD is `kd_kl` (T^2 KL, batch mean), as `kd` computes it.
Every feature term is restricted to real tokens (the attention mask): padding is an artefact of
batching, and a padded position's hidden state or attention row would otherwise count. `parts`
holds, besides "kd" (the whole distill term) and "ce", each unweighted term ("logits", "cos",
"hidden", "attention"). Sizes come from the models' configs (build_loss), never from a forward pass.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from trainables.losses import LOSSES, DistillLoss, kd_kl
from trainables.models.hf import TextFeatures
from trainables.registry import ConfigError

#: TinyBERT's fit_dense init: normal(0, initializer_range) with BERT's initializer_range, zero bias.
PROJECTION_STD = 0.02


class TextShape(NamedTuple):
    """A transformer's sizes, read from its config."""

    layers: int
    hidden: int
    heads: int


def text_shape(model: nn.Module) -> TextShape:
    c = model.config
    return TextShape(int(c.num_hidden_layers), int(c.hidden_size), int(c.num_attention_heads))


def text_shapes(name: str, student: nn.Module | None, teacher: nn.Module | None) -> dict[str, TextShape]:
    """build_loss's probe for a transformer loss: the sizes of the models it has (a no-KD control
    has no teacher), read from their configs."""
    out = {}
    for key, model in (("s_shapes", student), ("t_shapes", teacher)):
        if model is None:
            continue
        if getattr(model, "config", None) is None or not hasattr(model, "want_attentions"):  # not a transformer adaptor (models/hf.py)
            raise ConfigError(f"`loss.name={name}` distils transformers' hidden states, but got a {type(model).__name__}: "
                              "use hf models (text data) for the student and the teacher")
        if model.feature_layers:
            raise ConfigError(f"`loss.student_layers`/`loss.teacher_layers` tap layers, but loss.name={name} reads the "
                              "transformers' own hidden states: remove them")
        out[key] = text_shape(model)
    return out


def _wide(x: Tensor) -> Tensor:
    """float32 at least (autocast gives half precision; a float64 input stays float64)."""
    return x if x.dtype == torch.float64 else x.float()


def _text_features(feats, name: str) -> TextFeatures:
    if not isinstance(feats, TextFeatures):
        raise ConfigError(f"`loss.name={name}` needs the TextFeatures of hf models (text data), but got {type(feats).__name__}: "
                          "use hf models and no loss.student_layers")
    return feats


def masked_hidden_mse(s: Tensor, t: Tensor, mask: Tensor) -> Tensor:
    """MSE over the real tokens' (token, dim) elements: sum / (tokens * dim)."""
    m = mask.to(s.dtype).unsqueeze(-1)
    return ((s - t).pow(2) * m).sum() / (m.sum() * s.shape[-1])


def masked_attention_mse(s: Tensor, t: Tensor, mask: Tensor) -> Tensor:
    """MSE over the attention entries whose query and key are both real tokens: sum over those
    entries / (heads * sum_b len_b^2), TextBrewer's masked att_mse_loss."""
    m = mask.to(s.dtype)
    pair = m[:, None, :, None] * m[:, None, None, :]  # (N, 1, L, L)
    return ((s - t).pow(2) * pair).sum() / (pair.sum() * s.shape[1])


class TextLoss(DistillLoss):
    """Shared by the transformer losses: the teacher's features online, the logit KD term, the sizes."""

    needs_teacher_features = True
    features = "transformer"

    def __init__(self, alpha: float | None = None, temperature: float = 4.0, logit_weight: float = 1.0,
                 s_shapes: TextShape | None = None, t_shapes: TextShape | None = None, **weights) -> None:
        super().__init__(alpha, temperature, **weights)
        self.logit_weight = _nonnegative("loss.logit_weight", logit_weight)
        self.s_shape = TextShape(*s_shapes) if s_shapes is not None else None
        self.t_shape = TextShape(*t_shapes) if t_shapes is not None else None
        self.terms: dict[str, Tensor] = {}

    @property
    def uses_attentions(self) -> bool:
        """Whether the models must return attention maps (build_loss switches them to eager attention)."""
        return False

    @classmethod
    def probe(cls, name, student, teacher, input_shape):
        return text_shapes(name, student, teacher)

    def prepare(self, student: nn.Module | None, teacher: nn.Module | None) -> None:
        if self.uses_attentions:
            for model in (student, teacher):
                if model is not None:
                    model.want_attentions()

    def logit_term(self, s_logits: Tensor, t_logits: Tensor) -> Tensor:
        kd = kd_kl(s_logits, t_logits, self.temperature) if self.logit_weight else s_logits.new_zeros(())
        self.terms["logits"] = kd.detach()
        return self.logit_weight * kd

    def forward(self, s_logits: Tensor, t_logits: Tensor | None, y: Tensor, s_feats=None, t_feats=None):
        self.terms = {}
        total, parts = super().forward(s_logits, t_logits, y, s_feats, t_feats)
        return total, {**parts, **self.terms}


def _nonnegative(field: str, value: float) -> float:
    if not value >= 0:
        raise ConfigError(f"`{field} >= 0` must hold, but got {field}={value}")
    return float(value)


@LOSSES.register
class cosine(TextLoss):
    """DistilBERT's hidden-state alignment (Sanh et al., 2019; huggingface/transformers-research-projects
    distillation/distiller.py @ fccd0cd, `Distiller.step`):

      distill = logit_weight * T^2 KL(p_t || p_s) + cos_weight * mean over real tokens of (1 - cos(h_s, h_t))

    h = the last hidden state; the rows are the reference's (masked_select by the attention mask,
    view(-1, dim), CosineEmbeddingLoss with target 1, reduction mean, so ATen's 1e-12 on the
    squared norms). Same width needed (DistilBERT keeps the teacher's); a narrower student: tinybert.
    DistilBERT's `--alpha_ce 5 --alpha_mlm 2 --alpha_cos 1 --temperature 2`, with the task's CE in
    place of MLM: ce_weight 2, distill_weight 1, logit_weight 5, cos_weight 1, temperature 2.
    """

    def __init__(self, alpha: float | None = None, temperature: float = 4.0, cos_weight: float = 1.0, **kwargs) -> None:
        super().__init__(alpha, temperature, **kwargs)
        self.cos_weight = _nonnegative("loss.cos_weight", cos_weight)
        if self.distill_weight and self.cos_weight and self.s_shape and self.t_shape:
            self._check_width(self.s_shape.hidden, self.t_shape.hidden)

    @staticmethod
    def _check_width(s: int, t: int) -> None:
        if s != t:
            raise ConfigError(f"`loss.name=cosine` compares the last hidden states, which needs one width, but the student has {s} "
                              f"and the teacher {t}: use loss.name=tinybert (a learned projection) or a student of hidden size {t}")

    def distill(self, s_logits, t_logits, y, s_feats, t_feats):
        out = self.logit_term(s_logits, t_logits)
        if not self.cos_weight:
            return out
        s, t = _text_features(s_feats, "cosine"), _text_features(t_feats, "cosine")
        hs, ht = _wide(s.hidden[-1]), _wide(t.hidden[-1].detach())
        dim = hs.size(-1)
        self._check_width(dim, ht.size(-1))
        mask = s.mask.bool().unsqueeze(-1).expand_as(hs)
        hs, ht = torch.masked_select(hs, mask).view(-1, dim), torch.masked_select(ht, mask).view(-1, dim)
        cos = F.cosine_embedding_loss(hs, ht, hs.new_ones(hs.size(0)), reduction="mean")
        self.terms["cos"] = cos.detach()
        return out + self.cos_weight * cos


def uniform_layer_map(s_layers: int, t_layers: int) -> list[tuple[int, int]]:
    """TinyBERT's map over hidden-state indices (0 = embeddings): student i <-> teacher i * Lt // Ls.
    With k = Lt / Ls whole (the reference asserts it) that is i * k; otherwise the last layers
    still pair, the rest spread evenly."""
    return [(i, i * t_layers // s_layers) for i in range(s_layers + 1)]


@LOSSES.register
class tinybert(TextLoss):
    """TinyBERT's intermediate-layer distillation (Jiao et al., 2020; huawei-noah/Pretrained-Language-Model
    @ 0598f02, TinyBERT/task_distill.py, transformer/modeling.py) plus the logit KD term:

      distill = logit_weight * T^2 KL(p_t || p_s)
              + hidden_weight * sum over (i, j) in layer_map of MSE(W h_s[i] + b, h_t[j])
              + attention_weight * sum over the mapped layers of MSE(A_s, A_t)

    `layer_map`: [[student, teacher], ...] over hidden-state indices (0 = embeddings, i = layer i's
    output), default TinyBERT's uniform map (uniform_layer_map: 0<->0, i<->i*k). Attention pairs the
    layers the map pairs: hidden pair (i, j), i, j >= 1, pairs student layer i's map with teacher
    layer j's (attentions[i-1] with attentions[j-1]; by default student layer j (0-based) with
    teacher j*k + k - 1, the reference's new_teacher_atts). Each term is summed over its pairs, as
    the reference sums rep_loss and att_loss.

    Projection: one Linear(H_s -> H_t) shared by every pair, init normal(0, 0.02), zero bias
    (TinyBERT's fit_dense, which exists and is applied even when the widths match); it trains with
    the student. MSEs, restricted to real tokens: hidden = sum over real (token, dim) elements /
    (tokens * H_t); attention = over the entries whose query and key are both real tokens, sum /
    (heads * sum_b len_b^2). Without padding both are the reference's MSELoss means. The maps are
    transformers' post-softmax probabilities (TinyBERT's are pre-softmax scores, its <= -1e2 clamp
    zeroing padded keys): probabilities are what HF returns, and in training mode the student's are
    taken after attention dropout. Same head counts needed for the attention term.
    TinyBERT's stage-1 loss (rep + att only): alpha 1, logit_weight 0.
    """

    def __init__(self, alpha: float | None = None, temperature: float = 4.0, hidden_weight: float = 1.0, attention_weight: float = 1.0,
                 layer_map: list[list[int]] | None = None, **kwargs) -> None:
        super().__init__(alpha, temperature, **kwargs)
        self.hidden_weight = _nonnegative("loss.hidden_weight", hidden_weight)
        self.attention_weight = _nonnegative("loss.attention_weight", attention_weight)
        self.hidden_pairs: list[tuple[int, int]] = []
        self.attention_pairs: list[tuple[int, int]] = []
        self.projection: nn.Linear | None = None
        if not self.distill_weight or not (self.hidden_weight or self.attention_weight):
            return  # a no-KD control (no teacher) or logits only: no layers to pair
        if self.s_shape is None or self.t_shape is None:
            raise ConfigError("`loss.name=tinybert` needs the student's and the teacher's sizes: build it with build_loss() "
                              "given both models (set teacher.path)")
        s, t = self.s_shape, self.t_shape
        pairs = self._layer_map(layer_map, s.layers, t.layers)
        self.hidden_pairs = pairs if self.hidden_weight else []
        self.attention_pairs = [(i - 1, j - 1) for i, j in pairs if i > 0 and j > 0] if self.attention_weight else []
        if self.attention_pairs and s.heads != t.heads:
            raise ConfigError(f"`loss.attention_weight` compares attention maps head by head, but the student has {s.heads} heads "
                              f"and the teacher {t.heads}: set loss.attention_weight: 0 or give the student {t.heads} heads")
        if self.hidden_pairs:
            self.projection = nn.Linear(s.hidden, t.hidden)
            nn.init.normal_(self.projection.weight, 0.0, PROJECTION_STD)
            nn.init.zeros_(self.projection.bias)

    @staticmethod
    def _layer_map(layer_map, s_layers: int, t_layers: int) -> list[tuple[int, int]]:
        if layer_map is None:
            if not 0 < s_layers <= t_layers:
                raise ConfigError(f"`loss.layer_map` has no default for a student of {s_layers} layers and a teacher of {t_layers}: "
                                  "give it as [[student, teacher], ...] hidden-state indices")
            return uniform_layer_map(s_layers, t_layers)
        pairs = []
        for pair in layer_map:
            ok = isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
            if not ok or not (0 <= pair[0] <= s_layers and 0 <= pair[1] <= t_layers):
                raise ConfigError(f"`loss.layer_map` must be [[student, teacher], ...] hidden-state indices in 0..{s_layers} and "
                                  f"0..{t_layers} (0 = embeddings), but got {pair!r}: fix that pair")
            pairs.append((pair[0], pair[1]))
        if not pairs:
            raise ConfigError("`loss.layer_map` is empty: give [[student, teacher], ...] pairs or leave it out (TinyBERT's map)")
        return pairs

    @property
    def uses_attentions(self) -> bool:
        return bool(self.attention_pairs)

    def distill(self, s_logits, t_logits, y, s_feats, t_feats):
        out = self.logit_term(s_logits, t_logits)
        if not (self.hidden_pairs or self.attention_pairs):
            return out
        s, t = _text_features(s_feats, "tinybert"), _text_features(t_feats, "tinybert")
        mask = s.mask
        if self.hidden_pairs:
            hidden = sum(masked_hidden_mse(_wide(self.projection(s.hidden[i])), _wide(t.hidden[j].detach()), mask)
                         for i, j in self.hidden_pairs)
            self.terms["hidden"] = hidden.detach()
            out = out + self.hidden_weight * hidden
        if self.attention_pairs:
            if not s.attentions or not t.attentions:
                raise ConfigError("`loss.attention_weight` > 0 needs the models' attention maps: build the loss with build_loss(), "
                                  "which calls want_attentions() on both")
            attention = sum(masked_attention_mse(_wide(s.attentions[i]), _wide(t.attentions[j].detach()), mask)
                            for i, j in self.attention_pairs)
            self.terms["attention"] = attention.detach()
            out = out + self.attention_weight * attention
        return out
