"""The transformer losses (trainables.losses.text) checked two ways, values and gradients (w.r.t. the
student's hidden states and attention maps, and the projection), extreme cases included (large and
tiny hidden values, T=1 and T=20, heavy padding, near-zero hidden vectors):

(a) against figures their authors' code produced on the same inputs. The code is not kept here:
    benchmarks/reference_figures.py runs it from snapshots of the authors' repositories and writes
    tests/fixtures/reference/{distilbert,tinybert,textbrewer}.npz (each records the repository,
    commit, file and function its figures came from); the inputs are rebuilt here from their seeds
    and a fingerprint in the figures checks that they are the same tensors.
    - DistilBERT: huggingface/transformers-research-projects @ fccd0cdab03c1407bb7def05e1b48528fc817078,
      distillation/distiller.py, Distiller.step (the KD term: lines 411-417; the cosine term: lines 434-447),
      its loss modules as Distiller.__init__ builds them (lines 111-116).
    - TinyBERT: huawei-noah/Pretrained-Language-Model @ 0598f02d7fc4eaa7b4cbc1e9d7ab18bc875c24f9,
      TinyBERT/task_distill.py (the loss, line 903; the intermediate-layer loop, lines 941-964) and
      TinyBERT/transformer/modeling.py (TinyBertForSequenceClassification.forward: fit_dense on every hidden state).
    - TextBrewer: airaria/TextBrewer @ 2c105fa664bbc10669cd2888bd846d2c9b8afca8, src/textbrewer/losses.py
      (att_mse_loss, hid_mse_loss, cos_loss) with compatibility.py (mask_dtype).
(b) against our own float64 derivation of each term (below), which is itself checked against the figures.

Padding. The references' MSEs are plain means over every element (TinyBERT has no mask, and its
-1e2 clamp only zeroes padded *keys* of pre-softmax scores; on transformers' probabilities it is a
no-op, padded keys being exactly 0 already). Ours count real tokens only, so with padding ours equals
the reference applied to the real tokens alone: each example cut to its tokens (hidden: its token
rows; attention: its len x len block), concatenated, then the reference's mean. That weights every
real element equally, as the reference does on an unpadded batch. TextBrewer's masked losses are
that convention already (equal on the padded tensors themselves).

Tolerance: 1e-5 relative, float32 under test, against the references run in float32 and our
derivations in float64.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from tests.test_losses_modern import case_key, figure
from tests.test_losses_reference import RTOL, ref_kd, rel_err, value_and_grad
from trainables.losses import LOSSES, build_loss
from trainables.losses.text import TextShape, masked_attention_mse, masked_hidden_mse, tinybert, uniform_layer_map
from trainables.models import create_model
from trainables.models.hf import HFClassifier, TextFeatures
from trainables.registry import ConfigError

# --- helpers ---------------------------------------------------------------------------------------

N, L, HEADS = 5, 12, 2
FULL = [L] * N
PADDED = [12, 1, 2, 3, 7]  # heavy padding: most rows mostly padding
LENGTHS = {"full": FULL, "padded": PADDED}
UNUSED = (torch.zeros(N, 3), torch.zeros(N, 3), torch.zeros(N, dtype=torch.long))  # logits for losses with logit_weight 0


def features(seed: int, layers: int, width: int, lengths: list[int], scale: float = 1.0, heads: int = HEADS) -> TextFeatures:
    """Random TextFeatures as a transformer gives them: right padding, post-softmax attention rows
    with padded keys exactly 0 (padded query rows still attend to the real keys)."""
    g = torch.Generator().manual_seed(seed)
    n, length = len(lengths), max(lengths)
    mask = (torch.arange(length)[None] < torch.tensor(lengths)[:, None]).long()
    hidden = tuple(torch.randn(n, length, width, generator=g) * scale for _ in range(layers + 1))
    scores = [torch.randn(n, heads, length, length, generator=g) * 3 for _ in range(layers)]
    atts = tuple(s.masked_fill(~mask.bool()[:, None, None, :], float("-inf")).softmax(-1) for s in scores)
    return TextFeatures(hidden, atts, mask)


def leaves(f: TextFeatures) -> TextFeatures:
    """The student's tensors as fresh leaves (gradients are taken w.r.t. them)."""
    return TextFeatures(tuple(h.clone().requires_grad_(True) for h in f.hidden),
                        tuple(a.clone().requires_grad_(True) for a in f.attentions), f.mask)


def real_rows(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, L, H) -> the real tokens' rows of every example, concatenated."""
    return torch.cat([x[b, mask[b].bool()] for b in range(len(x))])


def real_blocks(a: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, heads, L, L) -> every example's real-query x real-key block, flattened and concatenated."""
    return torch.cat([a[b][:, mask[b].bool()][:, :, mask[b].bool()].flatten() for b in range(len(a))])


def grads(out: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, inputs))


def all_close(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> bool:
    return all(rel_err(a, b) <= RTOL for a, b in zip(ours, ref, strict=True))


def logits_pair(seed: int, n: int = N, c: int = 4, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * scale, torch.randn(n, c, generator=g) * scale, torch.randint(0, c, (n,), generator=g)


def tiny_bert(hidden: int, layers: int, heads: int = 2, num_classes: int = 3, length: int = 10) -> HFClassifier:
    from transformers import BertConfig

    config = BertConfig(vocab_size=40, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=2 * hidden, max_position_embeddings=16, pad_token_id=0)
    return HFClassifier(config, num_classes, (length,))


def token_ids(lengths: list[int], length: int = 10, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(1, 40, (len(lengths), length), generator=torch.Generator().manual_seed(seed))
    return ids.masked_fill(torch.arange(length)[None] >= torch.tensor(lengths)[:, None], 0)


# --- the cases the references ran on (benchmarks/reference_figures.py builds its inputs with these) ---

SCALES = [1.0, 1e3, 1e-3]
KD_TEMPS = [1.0, 2.0, 20.0]
LAYER_CASES = [(12, 4), (12, 6), (4, 2)]  # (teacher layers, student layers)
# DistilBERT's KD term on logits_pair(seed, scale=scale) at T: (seed, scale, T)
KD_CASES = [(4, 8.0, temp) for temp in KD_TEMPS] + [(7, 3.0, 2.0), (20, 8.0, 1.0), (20, 8.0, 20.0), (24, 3.0, 2.0)]


@functools.cache
def cos_cases() -> dict[str, tuple[TextFeatures, TextFeatures]]:
    """(student, teacher) features of the cosine checks, by case."""
    cases = {f"{lid},scale={scale}": (features(0, 2, 16, lengths, scale), features(1, 4, 16, lengths, scale))
             for lid, lengths in LENGTHS.items() for scale in SCALES}
    s, t = features(2, 1, 8, FULL), features(3, 1, 8, FULL)
    s.hidden[-1][0, :3] *= 1e-7  # three near-zero student rows
    cases["near-zero rows"] = (s, t)
    cases["kd+cos"] = (features(5, 2, 16, PADDED), features(6, 4, 16, PADDED))
    cases["weights"] = (features(8, 2, 16, PADDED), features(9, 4, 16, PADDED))
    cases["explicit weights"] = (features(25, 2, 16, PADDED), features(26, 2, 16, PADDED))
    return cases


def projection(hs: int, ht: int, seed: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """A projection's weight and bias, normal(0, 0.02) like TinyBERT's init (the bias too, so it counts)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(ht, hs, generator=g) * 0.02, torch.randn(ht, generator=g) * 0.02


@functools.cache
def tinybert_cases() -> dict[str, tuple[TextFeatures, TextFeatures, torch.Tensor, torch.Tensor, bool]]:
    """(student, teacher, projection weight, bias, padded) of the TinyBERT checks, by case."""
    cases = {f"t={t_layers},s={s_layers},scale={scale}": (features(10, s_layers, 8, [6] * 4, scale),
                                                          features(11, t_layers, 16, [6] * 4, scale), *projection(8, 16), False)
             for t_layers, s_layers in LAYER_CASES for scale in (1.0, 1e3)}
    cases.update({f"padded,scale={scale}": (features(12, 2, 8, PADDED, scale), features(13, 4, 16, PADDED, scale), *projection(8, 16), True)
                  for scale in (1.0, 1e3)})
    return cases


@functools.cache
def attention_cases() -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(student map, teacher map, mask) of the TextBrewer attention checks."""
    cases = {}
    for lid, lengths in LENGTHS.items():
        s, t = features(16, 1, 8, lengths), features(17, 1, 8, lengths)
        cases[lid] = (s.attentions[0], t.attentions[0], s.mask)
    s, t = features(18, 2, 8, PADDED), features(19, 4, 16, PADDED)
    cases["layer map"] = (s.attentions[1], t.attentions[2], s.mask)
    return cases


@functools.cache
def hidden_cases() -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(student hidden state, teacher hidden state, mask) of the TextBrewer hidden-state checks."""
    cases = {}
    for lid, lengths in LENGTHS.items():
        s, t = features(16, 1, 8, lengths), features(17, 1, 8, lengths)
        cases[lid] = (s.hidden[1], t.hidden[1], s.mask)
    return cases


def kd_figure(seed: int, scale: float, temp: float) -> dict[str, torch.Tensor]:
    """DistilBERT's KD term (Distiller.step, alpha_ce 1) on logits_pair(seed, scale=scale)."""
    s_logits, t_logits, _ = logits_pair(seed, scale=scale)
    return figure("distilbert", case_key("kd", seed=seed, scale=scale, T=temp), s_logits, t_logits)


def cos_figure(name: str, case: str) -> dict[str, torch.Tensor]:
    """DistilBERT's cosine term (Distiller.step, alpha_cos 1) or TextBrewer's cos_loss on cos_cases()[case]."""
    s, t = cos_cases()[case]
    return figure(name, case_key("cos", case=case), s.hidden[-1], t.hidden[-1], s.mask)


# --- our float64 derivations -----------------------------------------------------------------------


def my_cos(hs: torch.Tensor, ht: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """DistilBERT's cosine term (Sanh et al., 2019): the mean over real tokens of 1 - cos(h_s, h_t), the
    cosine as CosineEmbeddingLoss takes it, 1e-12 added to each squared norm: <a, b> / sqrt((|a|^2 + eps)(|b|^2 + eps))."""
    m = mask.bool()
    a, b = hs.double()[m], ht.double()[m]
    cos = (a * b).sum(-1) / (((a * a).sum(-1) + 1e-12) * ((b * b).sum(-1) + 1e-12)).sqrt()
    return (1 - cos).mean()


def my_hidden_mse(hs: torch.Tensor, ht: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean squared difference over the real tokens' (token, dim) entries."""
    m = mask.bool()
    return (hs.double()[m] - ht.double()[m]).pow(2).mean()


def my_attention_mse(a_s: torch.Tensor, a_t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean squared difference over the (head, query, key) entries whose query and key are both real."""
    sq = (a_s.double() - a_t.double()).pow(2)
    return torch.cat([sq[b][:, m][:, :, m].flatten() for b, m in enumerate(mask.bool())]).mean()


def my_tinybert(s_hidden, s_atts, t: TextFeatures, w, b, pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """TinyBERT's intermediate terms (Jiao et al., 2020): sum over the layer map's pairs of
    MSE(h_s W^T + b, h_t) and, for the pairs of layers (not embeddings), MSE(A_s, A_t)."""
    hidden = sum(my_hidden_mse(s_hidden[i].double() @ w.double().T + b.double(), t.hidden[j], t.mask) for i, j in pairs)
    attention = sum(my_attention_mse(s_atts[i - 1], t.attentions[j - 1], t.mask) for i, j in pairs if i > 0 and j > 0)
    return hidden, attention


# --- cosine (DistilBERT) ---------------------------------------------------------------------------


@pytest.mark.parametrize("lid", LENGTHS)
@pytest.mark.parametrize("scale", SCALES)
def test_cosine_term_matches_distilbert(lid, scale):
    case = f"{lid},scale={scale}"
    s, t = leaves(cos_cases()[case][0]), cos_cases()[case][1]
    loss = LOSSES.get("cosine")(alpha=1.0, logit_weight=0.0)
    ours = loss.distill(*UNUSED, s, t)
    (g,) = grads(ours, [s.hidden[-1]])
    fig = cos_figure("distilbert", case)
    assert rel_err(ours, fig["value"]) <= RTOL and rel_err(g, fig["grad"]) <= RTOL
    mine, (g_mine,) = value_and_grad(lambda h: my_cos(h, t.hidden[-1], s.mask), s.hidden[-1].double())
    assert rel_err(ours, mine) <= RTOL and rel_err(g, g_mine) <= RTOL
    assert rel_err(mine, fig["value"]) <= RTOL and rel_err(g_mine, fig["grad"]) <= RTOL
    tb = cos_figure("textbrewer", case)  # TextBrewer's cos_loss: the same form
    assert rel_err(ours, tb["value"]) <= RTOL and rel_err(g, tb["grad"]) <= RTOL


def test_cosine_near_zero_vectors_use_distilberts_epsilon():
    """CosineEmbeddingLoss adds 1e-12 to each squared norm (F.cosine_similarity would clamp the norms
    at 1e-8 instead): a near-zero student row keeps the reference's value."""
    s, t = leaves(cos_cases()["near-zero rows"][0]), cos_cases()["near-zero rows"][1]
    assert s.hidden[-1][0, :3].abs().max() < 1e-6
    ours = LOSSES.get("cosine")(alpha=1.0, logit_weight=0.0).distill(*UNUSED, s, t)
    (g,) = grads(ours, [s.hidden[-1]])
    fig = cos_figure("distilbert", "near-zero rows")
    assert rel_err(ours, fig["value"]) <= RTOL and rel_err(g, fig["grad"]) <= RTOL
    mine, (g_mine,) = value_and_grad(lambda h: my_cos(h, t.hidden[-1], s.mask), s.hidden[-1].double())
    assert rel_err(ours, mine) <= RTOL and rel_err(g, g_mine) <= RTOL
    assert rel_err(mine, fig["value"]) <= RTOL and rel_err(g_mine, fig["grad"]) <= RTOL


@pytest.mark.parametrize("temp", KD_TEMPS)
def test_cosine_total_is_distilberts_kd_plus_cos(temp):
    """logit_weight 5, cos_weight 1 = DistilBERT's alpha_ce 5, alpha_cos 1 (its loss without MLM)."""
    s_logits, t_logits, y = logits_pair(4, scale=8.0)
    s_logits.requires_grad_(True)
    s, t = leaves(cos_cases()["kd+cos"][0]), cos_cases()["kd+cos"][1]
    loss = LOSSES.get("cosine")(alpha=1.0, temperature=temp, logit_weight=5.0, cos_weight=1.0)
    ours = loss.distill(s_logits, t_logits, y, s, t)
    g = grads(ours, [s_logits, s.hidden[-1]])
    kd, cos = kd_figure(4, 8.0, temp), cos_figure("distilbert", "kd+cos")
    assert rel_err(ours, 5.0 * kd["value"] + cos["value"]) <= RTOL
    assert all_close(g, [5.0 * kd["grad"], cos["grad"]])
    mine, g_mine = value_and_grad(lambda z, h: 5.0 * ref_kd(z, t_logits, temp) + my_cos(h, t.hidden[-1], s.mask),
                                  s_logits.double(), s.hidden[-1].double())
    assert rel_err(ours, mine) <= RTOL and all_close(g, g_mine)
    assert rel_err(mine, 5.0 * kd["value"] + cos["value"]) <= RTOL and all_close(g_mine, [5.0 * kd["grad"], cos["grad"]])


def test_cosine_weights_scale_with_alpha_and_log_each_term():
    s_logits, t_logits, y = logits_pair(7)
    s, t = cos_cases()["weights"]
    loss = LOSSES.get("cosine")(alpha=0.3, temperature=2.0, cos_weight=0.5)
    total, parts = loss(s_logits, t_logits, y, s, t)
    kd, cos = kd_figure(7, 3.0, 2.0)["value"], cos_figure("distilbert", "weights")["value"]
    assert rel_err(total, 0.7 * F.cross_entropy(s_logits, y) + 0.3 * (kd + 0.5 * cos)) <= RTOL
    assert rel_err(parts["logits"], kd) <= RTOL and rel_err(parts["cos"], cos) <= RTOL
    assert rel_err(parts["kd"], kd + 0.5 * cos) <= RTOL
    assert rel_err(ref_kd(s_logits, t_logits, 2.0), kd) <= RTOL and rel_err(my_cos(s.hidden[-1], t.hidden[-1], s.mask), cos) <= RTOL


# --- tinybert --------------------------------------------------------------------------------------


def _tinybert(s_layers: int, t_layers: int, hs: int, ht: int, **kw) -> tinybert:
    return LOSSES.get("tinybert")(alpha=1.0, logit_weight=0.0, s_shapes=TextShape(s_layers, hs, HEADS),
                                  t_shapes=TextShape(t_layers, ht, HEADS), **kw)


def _check_tinybert(case: str, s_layers: int, t_layers: int) -> None:
    """Ours against the loop's figures (the loss, rep_loss, att_loss; gradients w.r.t. every student
    hidden state and map and the projection) and against my_tinybert."""
    s0, t, w, b, _ = tinybert_cases()[case]
    s = leaves(s0)
    loss = _tinybert(s_layers, t_layers, 8, 16)
    with torch.no_grad():
        loss.projection.weight.copy_(w)
        loss.projection.bias.copy_(b)
    ours = loss.distill(*UNUSED, s, t)
    inputs = [*s.hidden, *s.attentions, loss.projection.weight, loss.projection.bias]
    g = grads(ours, inputs)
    fig = figure("tinybert", case_key("loop", case=case), *s0.hidden, *s0.attentions, *t.hidden, *t.attentions, w, b)
    names = [f"grad:hidden.{i}" for i in range(len(s.hidden))] + [f"grad:attention.{i}" for i in range(len(s.attentions))]
    fig_g = [fig[k] for k in names] + [fig["grad:weight"], fig["grad:bias"]]
    assert rel_err(loss.terms["hidden"], fig["rep_loss"]) <= RTOL and rel_err(loss.terms["attention"], fig["att_loss"]) <= RTOL
    assert rel_err(ours, fig["loss"]) <= RTOL and all_close(g, fig_g)  # task_distill.py: loss = rep_loss + att_loss
    n_h = len(s.hidden)

    def mine_fn(*xs):
        hidden, attention = my_tinybert(xs[:n_h], xs[n_h:-2], t, xs[-2], xs[-1], loss.hidden_pairs)
        return hidden + attention

    mine, g_mine = value_and_grad(mine_fn, *(x.double() for x in inputs))
    assert rel_err(ours, mine) <= RTOL and all_close(g, g_mine)
    assert rel_err(mine, fig["loss"]) <= RTOL and all_close(g_mine, fig_g)


@pytest.mark.parametrize("t_layers,s_layers", LAYER_CASES)
def test_default_layer_maps_are_tinyberts(t_layers, s_layers):
    fig = figure("tinybert", case_key("maps", t=t_layers, s=s_layers))  # the teacher entries task_distill.py's loop pairs
    atts, reps = fig["attentions"].tolist(), fig["hidden"].tolist()
    loss = _tinybert(s_layers, t_layers, 8, 16)
    assert loss.hidden_pairs == list(enumerate(reps))
    assert loss.attention_pairs == list(enumerate(atts))
    assert uniform_layer_map(s_layers, t_layers) == list(enumerate(reps))


@pytest.mark.parametrize("t_layers,s_layers", LAYER_CASES)
@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_tinybert_matches_reference_without_padding(t_layers, s_layers, scale):
    _check_tinybert(f"t={t_layers},s={s_layers},scale={scale}", s_layers, t_layers)


@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_tinybert_with_padding_is_the_reference_on_real_tokens(scale):
    _check_tinybert(f"padded,scale={scale}", 2, 4)


def test_padding_neither_counts_nor_gets_gradient():
    s, t = leaves(features(14, 2, 8, PADDED)), features(15, 4, 16, PADDED)
    loss = _tinybert(2, 4, 8, 16)
    before = loss.distill(*UNUSED, s, t)
    g = grads(before, [*s.hidden, *s.attentions])
    pad = ~s.mask.bool()
    assert all(x[pad].abs().max() == 0 for x in g[: len(s.hidden)])
    assert all(x.permute(0, 2, 1, 3)[pad].abs().max() == 0 and x.permute(0, 3, 1, 2)[pad].abs().max() == 0 for x in g[len(s.hidden):])
    noisy = TextFeatures(tuple(h.detach().masked_fill(pad[..., None], 1e4) for h in t.hidden), t.attentions, t.mask)
    assert torch.equal(loss.distill(*UNUSED, s, noisy), before)


@pytest.mark.parametrize("lid", LENGTHS)
def test_attention_mse_matches_textbrewer(lid):
    """TextBrewer's masked att_mse_loss is our convention (query and key both real, / heads * sum len^2),
    on the padded tensors themselves; unmasked on an unpadded batch it is TinyBERT's mean. Its hid_mse_loss
    with the mask is our hidden term (after the projection)."""
    a_s0, a_t, m = attention_cases()[lid]
    a_s = a_s0.clone().requires_grad_(True)
    ours = masked_attention_mse(a_s, a_t, m)
    (g,) = grads(ours, [a_s])
    fig = figure("textbrewer", case_key("att", case=lid), a_s0, a_t, m)
    assert rel_err(ours, fig["value"]) <= RTOL and rel_err(g, fig["grad"]) <= RTOL
    mine, (g_mine,) = value_and_grad(lambda a: my_attention_mse(a, a_t, m), a_s0.double())
    assert rel_err(ours, mine) <= RTOL and rel_err(g, g_mine) <= RTOL
    assert rel_err(mine, fig["value"]) <= RTOL and rel_err(g_mine, fig["grad"]) <= RTOL
    if lid == "full":  # unpadded: the unmasked mean (probabilities: its -1e-3 clamp is a no-op)
        plain = figure("textbrewer", case_key("att", case="full, no mask"), a_s0, a_t)
        assert rel_err(ours, plain["value"]) <= RTOL and rel_err(g, plain["grad"]) <= RTOL
    h_s0, h_t, m = hidden_cases()[lid]
    h_s = h_s0.clone().requires_grad_(True)
    ours_h = masked_hidden_mse(h_s, h_t, m)
    (g_h,) = grads(ours_h, [h_s])
    fig_h = figure("textbrewer", case_key("hid", case=lid), h_s0, h_t, m)
    assert rel_err(ours_h, fig_h["value"]) <= RTOL and rel_err(g_h, fig_h["grad"]) <= RTOL
    mine_h, (g_mine_h,) = value_and_grad(lambda h: my_hidden_mse(h, h_t, m), h_s0.double())
    assert rel_err(ours_h, mine_h) <= RTOL and rel_err(g_h, g_mine_h) <= RTOL
    assert rel_err(mine_h, fig_h["value"]) <= RTOL and rel_err(g_mine_h, fig_h["grad"]) <= RTOL


def test_layer_map_override_pairs_hidden_states_and_their_layers_attention():
    s, t = leaves(features(18, 2, 8, PADDED)), features(19, 4, 16, PADDED)
    loss = _tinybert(2, 4, 8, 16, layer_map=[[0, 0], [2, 3]], hidden_weight=2.0, attention_weight=0.5)
    assert loss.hidden_pairs == [(0, 0), (2, 3)] and loss.attention_pairs == [(1, 2)]
    ours = loss.distill(*UNUSED, s, t)
    p, m = loss.projection, s.mask
    a_s, a_t, _ = attention_cases()["layer map"]
    att = figure("textbrewer", case_key("att", case="layer map"), a_s, a_t, m)["value"]  # att_mse_loss(student map 1, teacher map 2)
    assert rel_err(my_attention_mse(a_s, a_t, m), att) <= RTOL
    expected = (2.0 * (masked_hidden_mse(p(s.hidden[0]), t.hidden[0], m) + masked_hidden_mse(p(s.hidden[2]), t.hidden[3], m))
                + 0.5 * att)
    assert rel_err(ours, expected) <= RTOL


@pytest.mark.parametrize("temp", [1.0, 20.0])
def test_tinybert_logit_term_is_kd(temp):
    s_logits, t_logits, y = logits_pair(20, scale=8.0)
    s, t = features(21, 2, 8, PADDED), features(22, 4, 16, PADDED)
    loss = LOSSES.get("tinybert")(alpha=1.0, temperature=temp, hidden_weight=0.0, attention_weight=0.0)
    assert loss.projection is None and not loss.uses_attentions
    ours = loss.distill(s_logits, t_logits, y, s, t)
    kd = kd_figure(20, 8.0, temp)["value"]  # DistilBERT's KD term
    assert rel_err(ours, kd) <= RTOL and rel_err(ref_kd(s_logits, t_logits, temp), kd) <= RTOL


# --- alpha = 0, the weights, errors ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["cosine", "tinybert"])
def test_alpha_zero_is_exactly_cross_entropy_without_a_teacher(name):
    s_logits, _, y = logits_pair(23)
    loss = LOSSES.get(name)(alpha=0.0)  # no sizes needed: a control has no teacher
    total, parts = loss(s_logits, None, y, None, None)
    assert torch.equal(total, F.cross_entropy(s_logits, y)) and parts["kd"].item() == 0.0
    assert not list(loss.parameters())


def test_explicit_weights_form():
    s_logits, t_logits, y = logits_pair(24)
    s, t = cos_cases()["explicit weights"]
    loss = LOSSES.get("cosine")(ce_weight=2.0, distill_weight=1.0, temperature=2.0, logit_weight=5.0, cos_weight=1.0)
    kd, cos = kd_figure(24, 3.0, 2.0)["value"], cos_figure("distilbert", "explicit weights")["value"]
    expected = 2.0 * F.cross_entropy(s_logits, y) + 5.0 * kd + cos
    assert rel_err(loss(s_logits, t_logits, y, s, t)[0], expected) <= RTOL


@pytest.mark.parametrize("kw,field", [
    ({"s_shapes": TextShape(2, 8, 2), "t_shapes": TextShape(4, 8, 4)}, "loss.attention_weight: 0"),
    ({"s_shapes": TextShape(2, 8, 2), "t_shapes": TextShape(4, 8, 2), "layer_map": [[0, 5]]}, "loss.layer_map"),
    ({"s_shapes": TextShape(6, 8, 2), "t_shapes": TextShape(4, 8, 2)}, "loss.layer_map"),
    ({}, "build_loss"),
    ({"s_shapes": TextShape(2, 8, 2), "t_shapes": TextShape(4, 8, 2), "hidden_weight": -1.0}, "loss.hidden_weight"),
])
def test_tinybert_config_errors_are_one_line(kw, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as e:
        LOSSES.get("tinybert")(alpha=0.5, **kw)
    assert "\n" not in str(e.value)


def test_heads_may_differ_without_the_attention_term():
    loss = LOSSES.get("tinybert")(alpha=0.5, attention_weight=0.0, s_shapes=TextShape(2, 8, 2), t_shapes=TextShape(4, 16, 4))
    assert loss.attention_pairs == [] and loss.projection is not None


# --- real Hugging Face models through build_loss ----------------------------------------------------


def _step(loss, student, teacher, x, y):
    teacher.eval()
    with torch.no_grad():
        t_logits, t_feats = teacher(x, with_features=True)
    s_logits, s_feats = student(x, with_features=True)
    total, parts = loss(s_logits, t_logits, y, s_feats, t_feats)
    total.backward()
    return total, parts, s_feats


def test_tinybert_on_hf_models_through_build_loss():
    torch.manual_seed(0)
    student, teacher = tiny_bert(16, 2), tiny_bert(32, 4)
    loss = build_loss("tinybert", {"alpha": 0.5}, student, teacher, (10,))
    assert student.attentions and teacher.attentions  # want_attentions() called on both
    assert (loss.s_shape, loss.t_shape) == (TextShape(2, 16, 2), TextShape(4, 32, 2))
    x, y = token_ids([10, 4, 2, 7]), torch.tensor([0, 1, 2, 1])
    total, parts, s_feats = _step(loss, student, teacher, x, y)
    assert len(s_feats.attentions) == 2 and len(s_feats.hidden) == 3 and torch.equal(s_feats.mask, (x != 0).long())
    assert torch.isfinite(total) and {"kd", "ce", "logits", "hidden", "attention"} <= set(parts)
    assert loss.projection.weight.grad.abs().sum() > 0 and loss.projection.bias.grad.abs().sum() > 0
    assert student.net.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_cosine_on_hf_models_through_build_loss():
    torch.manual_seed(0)
    student, teacher = tiny_bert(32, 2), tiny_bert(32, 4)
    loss = build_loss("cosine", {"alpha": 0.5}, student, teacher, (10,))
    assert not student.attentions  # no maps needed: the fused attention stays
    total, parts, _ = _step(loss, student, teacher, token_ids([10, 3, 5]), torch.tensor([0, 1, 2]))
    assert torch.isfinite(total) and "cos" in parts
    assert student.net.bert.encoder.layer[-1].output.dense.weight.grad.abs().sum() > 0


def test_hf_control_needs_no_teacher_and_keeps_fused_attention():
    student = tiny_bert(16, 2)
    loss = build_loss("tinybert", {"alpha": 0.0}, student, None, (10,))
    assert not student.attentions and not list(loss.parameters())
    x, y = token_ids([10, 3]), torch.tensor([0, 2])
    s_logits = student(x)
    assert torch.equal(loss(s_logits, None, y)[0], F.cross_entropy(s_logits, y))


@pytest.mark.parametrize("name,params,match", [
    ("cosine", {"alpha": 0.5}, "loss.name=tinybert"),
    ("tinybert", {"alpha": 0.5, "layer_map": [[3, 0]]}, "loss.layer_map"),
])
def test_build_loss_errors_on_hf_models_are_one_line(name, params, match):
    student, teacher = tiny_bert(16, 2), tiny_bert(32, 4)
    with pytest.raises(ConfigError, match=match.replace(".", r"\.")) as e:
        build_loss(name, params, student, teacher, (10,))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["at", "hint"])
def test_stage_losses_are_refused_for_text_by_the_one_rule_driver_and_trial_call(name):
    from trainables.losses import check_fits
    from trainables.tasks import task_for

    task = task_for("text")
    with pytest.raises(ConfigError, match=f"`loss.name` {name} distils convolutional stage features, which the models of text "
                                          "classification lack: use cosine or tinybert \\(or a logit loss: dist, dkd, kd\\)"):
        check_fits(name, task.features, "text classification")
    check_fits("tinybert", task.features, "text classification")  # fits: no error


def test_transformer_losses_refuse_image_models():
    student, teacher = create_model("cnn_tiny", 3, (1, 8, 8)), create_model("cnn_small", 3, (1, 8, 8))
    for name in ("tinybert", "cosine"):
        with pytest.raises(ConfigError, match="use hf models"):
            build_loss(name, {"alpha": 0.5}, student, teacher, (1, 8, 8))
