"""The transformer losses (trainables.losses.text) against their authors' code, copied verbatim
below and run on the same tensors: values and gradients (w.r.t. the student's hidden states and
attention maps, and the projection), extreme cases included (large hidden values, T=1 and T=20,
heavy padding, near-zero hidden vectors).

- DistilBERT: huggingface/transformers-research-projects @ fccd0cdab03c1407bb7def05e1b48528fc817078,
  distillation/distiller.py (Distiller.__init__ lines 111-116, step() lines 409-415 and 436-447).
- TinyBERT: huawei-noah/Pretrained-Language-Model @ 0598f02d7fc4eaa7b4cbc1e9d7ab18bc875c24f9,
  TinyBERT/task_distill.py (lines 903, 941-962) and TinyBERT/transformer/modeling.py (lines 1126, 1137-1141).
- TextBrewer: airaria/TextBrewer @ 2c105fa664bbc10669cd2888bd846d2c9b8afca8, src/textbrewer/losses.py
  (att_mse_loss, hid_mse_loss, cos_loss) and compatibility.py (mask_dtype).

The references' inline code (DistilBERT's step, TinyBERT's training loop) is wrapped in functions:
the body lines are verbatim, re-indented; the wrapper's arguments and `self` carry what they read.

Padding. The references' MSEs are plain means over every element (TinyBERT has no mask, and its
-1e2 clamp only zeroes padded *keys* of pre-softmax scores; on transformers' probabilities it is a
no-op, padded keys being exactly 0 already). Ours count real tokens only, so with padding ours equals
the reference applied to the real tokens alone: each example cut to its tokens (hidden: its token
rows; attention: its len x len block), concatenated, then the reference's mean. That weights every
real element equally, as the reference does on an unpadded batch. TextBrewer's masked losses are
that convention already (equal on the padded tensors themselves).

Tolerance: 1e-5 relative, float32 both sides.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn import MSELoss

from tests.test_losses_reference import RTOL, rel_err
from trainables.losses import LOSSES, build_loss
from trainables.losses.text import TextShape, masked_attention_mse, masked_hidden_mse, tinybert, uniform_layer_map
from trainables.models import create_model
from trainables.models.hf import HFClassifier, TextFeatures
from trainables.registry import ConfigError

mask_dtype = torch.bool  # TextBrewer compatibility.py on torch >= 1.2

# --- DistilBERT: transformers-research-projects distillation/distiller.py @ fccd0cd, verbatim -------


class Distiller(SimpleNamespace):
    """The attributes step() reads (__init__ lines 111-116)."""

    def __init__(self, temperature: float, alpha_cos: float = 1.0) -> None:
        super().__init__(temperature=temperature, alpha_cos=alpha_cos)
        self.ce_loss_fct = nn.KLDivLoss(reduction="batchmean")
        self.cosine_loss_fct = nn.CosineEmbeddingLoss(reduction="mean")

    def kd(self, s_logits_slct, t_logits_slct):
        # step() lines 409-415 (sentence logits: no token positions to select)
        loss_ce = (
            self.ce_loss_fct(
                nn.functional.log_softmax(s_logits_slct / self.temperature, dim=-1),
                nn.functional.softmax(t_logits_slct / self.temperature, dim=-1),
            )
            * (self.temperature) ** 2
        )
        return loss_ce

    def cos(self, s_hidden_states, t_hidden_states, attention_mask):
        # step() lines 436-447
        s_hidden_states = s_hidden_states[-1]  # (bs, seq_length, dim)
        t_hidden_states = t_hidden_states[-1]  # (bs, seq_length, dim)
        mask = attention_mask.unsqueeze(-1).expand_as(s_hidden_states)  # (bs, seq_length, dim)
        assert s_hidden_states.size() == t_hidden_states.size()
        dim = s_hidden_states.size(-1)

        s_hidden_states_slct = torch.masked_select(s_hidden_states, mask)  # (bs * seq_length * dim)
        s_hidden_states_slct = s_hidden_states_slct.view(-1, dim)  # (bs * seq_length, dim)
        t_hidden_states_slct = torch.masked_select(t_hidden_states, mask)  # (bs * seq_length * dim)
        t_hidden_states_slct = t_hidden_states_slct.view(-1, dim)  # (bs * seq_length, dim)

        target = s_hidden_states_slct.new(s_hidden_states_slct.size(0)).fill_(1)  # (bs * seq_length,)
        loss_cos = self.cosine_loss_fct(s_hidden_states_slct, t_hidden_states_slct, target)
        return loss_cos


# --- TinyBERT: Pretrained-Language-Model TinyBERT/ @ 0598f02, verbatim ----------------------------


def fit_student_reps(self, sequence_output, is_student=True):
    # transformer/modeling.py lines 1137-1141 (TinyBertForSequenceClassification.forward; self.fit_dense, line 1126)
    tmp = []
    if is_student:
        for s_id, sequence_layer in enumerate(sequence_output):
            tmp.append(self.fit_dense(sequence_layer))
        sequence_output = tmp
    return sequence_output


def tinybert_intermediate(student_atts, teacher_atts, student_reps, teacher_reps, device="cpu"):
    loss_mse = MSELoss()  # task_distill.py line 903
    att_loss = 0.
    rep_loss = 0.
    # task_distill.py lines 941-962
    teacher_layer_num = len(teacher_atts)
    student_layer_num = len(student_atts)
    assert teacher_layer_num % student_layer_num == 0
    layers_per_block = int(teacher_layer_num / student_layer_num)
    new_teacher_atts = [teacher_atts[i * layers_per_block + layers_per_block - 1]
                        for i in range(student_layer_num)]

    for student_att, teacher_att in zip(student_atts, new_teacher_atts):
        student_att = torch.where(student_att <= -1e2, torch.zeros_like(student_att).to(device),
                                  student_att)
        teacher_att = torch.where(teacher_att <= -1e2, torch.zeros_like(teacher_att).to(device),
                                  teacher_att)

        tmp_loss = loss_mse(student_att, teacher_att)
        att_loss += tmp_loss

    new_teacher_reps = [teacher_reps[i * layers_per_block] for i in range(student_layer_num + 1)]
    new_student_reps = student_reps
    for student_rep, teacher_rep in zip(new_student_reps, new_teacher_reps):
        tmp_loss = loss_mse(student_rep, teacher_rep)
        rep_loss += tmp_loss
    return att_loss, rep_loss


def tinybert_layer_maps(teacher_atts, student_atts, teacher_reps):
    # task_distill.py lines 942-947 and 958: which teacher entries the loop pairs
    teacher_layer_num = len(teacher_atts)
    student_layer_num = len(student_atts)
    assert teacher_layer_num % student_layer_num == 0
    layers_per_block = int(teacher_layer_num / student_layer_num)
    new_teacher_atts = [teacher_atts[i * layers_per_block + layers_per_block - 1]
                        for i in range(student_layer_num)]
    new_teacher_reps = [teacher_reps[i * layers_per_block] for i in range(student_layer_num + 1)]
    return new_teacher_atts, new_teacher_reps


# --- TextBrewer: src/textbrewer/losses.py @ 2c105fa, verbatim -------------------------------------


def att_mse_loss(attention_S, attention_T, mask=None):
    '''
    * Calculates the mse loss between `attention_S` and `attention_T`.
    * If the `inputs_mask` is given, masks the positions where ``input_mask==0``.

    :param torch.Tensor logits_S: tensor of shape  (*batch_size*, *num_heads*, *length*, *length*)
    :param torch.Tensor logits_T: tensor of shape  (*batch_size*, *num_heads*, *length*, *length*)
    :param torch.Tensor mask: tensor of shape  (*batch_size*, *length*)
    '''
    if mask is None:
        attention_S_select = torch.where(attention_S <= -1e-3, torch.zeros_like(attention_S), attention_S)
        attention_T_select = torch.where(attention_T <= -1e-3, torch.zeros_like(attention_T), attention_T)
        loss = F.mse_loss(attention_S_select, attention_T_select)
    else:
        mask = mask.to(attention_S).unsqueeze(1).expand(-1, attention_S.size(1), -1) # (bs, num_of_heads, len)
        valid_count = torch.pow(mask.sum(dim=2),2).sum()
        loss = (F.mse_loss(attention_S, attention_T, reduction='none') * mask.unsqueeze(-1) * mask.unsqueeze(2)).sum() / valid_count
    return loss


def hid_mse_loss(state_S, state_T, mask=None):
    '''
    * Calculates the mse loss between `state_S` and `state_T`, which are the hidden state of the models.
    * If the `inputs_mask` is given, masks the positions where ``input_mask==0``.
    * If the hidden sizes of student and teacher are different, 'proj' option is required in `inetermediate_matches` to match the dimensions.

    :param torch.Tensor state_S: tensor of shape  (*batch_size*, *length*, *hidden_size*)
    :param torch.Tensor state_T: tensor of shape  (*batch_size*, *length*, *hidden_size*)
    :param torch.Tensor mask:    tensor of shape  (*batch_size*, *length*)
    '''
    if mask is None:
        loss = F.mse_loss(state_S, state_T)
    else:
        mask = mask.to(state_S)
        valid_count = mask.sum() * state_S.size(-1)
        loss = (F.mse_loss(state_S, state_T, reduction='none') * mask.unsqueeze(-1)).sum() / valid_count
    return loss


def cos_loss(state_S, state_T, mask=None):
    '''
    * Computes the cosine similarity loss between the inputs. This is the loss used in DistilBERT, see `DistilBERT <https://arxiv.org/abs/1910.01108>`_
    * If the `inputs_mask` is given, masks the positions where ``input_mask==0``.
    * If the hidden sizes of student and teacher are different, 'proj' option is required in `inetermediate_matches` to match the dimensions.

    :param torch.Tensor state_S: tensor of shape  (*batch_size*, *length*, *hidden_size*)
    :param torch.Tensor state_T: tensor of shape  (*batch_size*, *length*, *hidden_size*)
    :param torch.Tensor mask:    tensor of shape  (*batch_size*, *length*)
    '''
    if mask is  None:
        state_S = state_S.view(-1,state_S.size(-1))
        state_T = state_T.view(-1,state_T.size(-1))
    else:
        mask = mask.to(state_S).unsqueeze(-1).expand_as(state_S).to(mask_dtype) #(bs,len,dim)
        state_S = torch.masked_select(state_S, mask).view(-1, mask.size(-1))  #(bs * select, dim)
        state_T = torch.masked_select(state_T, mask).view(-1, mask.size(-1))  # (bs * select, dim)

    target = state_S.new(state_S.size(0)).fill_(1)
    loss = F.cosine_embedding_loss(state_S, state_T, target, reduction='mean')
    return loss


# --- helpers ---------------------------------------------------------------------------------------

N, L, HEADS = 5, 12, 2
FULL = [L] * N
PADDED = [12, 1, 2, 3, 7]  # heavy padding: most rows mostly padding
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


# --- cosine (DistilBERT) ---------------------------------------------------------------------------


@pytest.mark.parametrize("lengths", [FULL, PADDED], ids=["full", "padded"])
@pytest.mark.parametrize("scale", [1.0, 1e3, 1e-3])
def test_cosine_term_matches_distilbert(lengths, scale):
    s, t = leaves(features(0, 2, 16, lengths, scale)), features(1, 4, 16, lengths, scale)
    loss = LOSSES.get("cosine")(alpha=1.0, logit_weight=0.0)
    ours = loss.distill(*UNUSED, s, t)
    ref = Distiller(4.0).cos(s.hidden, t.hidden, s.mask.bool())
    assert rel_err(ours, ref) <= RTOL
    assert all_close(grads(ours, [s.hidden[-1]]), grads(ref, [s.hidden[-1]]))
    assert rel_err(ours, cos_loss(s.hidden[-1], t.hidden[-1], s.mask)) <= RTOL  # TextBrewer's cos_loss: the same form


def test_cosine_near_zero_vectors_use_distilberts_epsilon():
    """CosineEmbeddingLoss adds 1e-12 to each squared norm (F.cosine_similarity would clamp the norms
    at 1e-8 instead): a near-zero student row keeps the reference's value."""
    s, t = leaves(features(2, 1, 8, FULL)), features(3, 1, 8, FULL)
    with torch.no_grad():
        s.hidden[-1][0, :3] *= 1e-7
    ours = LOSSES.get("cosine")(alpha=1.0, logit_weight=0.0).distill(*UNUSED, s, t)
    ref = Distiller(1.0).cos(s.hidden, t.hidden, s.mask.bool())
    assert rel_err(ours, ref) <= RTOL and all_close(grads(ours, [s.hidden[-1]]), grads(ref, [s.hidden[-1]]))


@pytest.mark.parametrize("temp", [1.0, 2.0, 20.0])
def test_cosine_total_is_distilberts_kd_plus_cos(temp):
    """logit_weight 5, cos_weight 1 = DistilBERT's alpha_ce 5, alpha_cos 1 (its loss without MLM)."""
    s_logits, t_logits, y = logits_pair(4, scale=8.0)
    s_logits.requires_grad_(True)
    s, t = leaves(features(5, 2, 16, PADDED)), features(6, 4, 16, PADDED)
    loss = LOSSES.get("cosine")(alpha=1.0, temperature=temp, logit_weight=5.0, cos_weight=1.0)
    ours = loss.distill(s_logits, t_logits, y, s, t)
    d = Distiller(temp, alpha_cos=1.0)
    ref = 5.0 * d.kd(s_logits, t_logits) + d.alpha_cos * d.cos(s.hidden, t.hidden, s.mask.bool())
    assert rel_err(ours, ref) <= RTOL
    assert all_close(grads(ours, [s_logits, s.hidden[-1]]), grads(ref, [s_logits, s.hidden[-1]]))


def test_cosine_weights_scale_with_alpha_and_log_each_term():
    s_logits, t_logits, y = logits_pair(7)
    s, t = features(8, 2, 16, PADDED), features(9, 4, 16, PADDED)
    loss = LOSSES.get("cosine")(alpha=0.3, temperature=2.0, cos_weight=0.5)
    total, parts = loss(s_logits, t_logits, y, s, t)
    d = Distiller(2.0)
    kd, cos = d.kd(s_logits, t_logits), d.cos(s.hidden, t.hidden, s.mask.bool())
    assert rel_err(total, 0.7 * F.cross_entropy(s_logits, y) + 0.3 * (kd + 0.5 * cos)) <= RTOL
    assert rel_err(parts["logits"], kd) <= RTOL and rel_err(parts["cos"], cos) <= RTOL
    assert rel_err(parts["kd"], kd + 0.5 * cos) <= RTOL


# --- tinybert --------------------------------------------------------------------------------------


def _tinybert(s_layers: int, t_layers: int, hs: int, ht: int, **kw) -> tinybert:
    return LOSSES.get("tinybert")(alpha=1.0, logit_weight=0.0, s_shapes=TextShape(s_layers, hs, HEADS),
                                  t_shapes=TextShape(t_layers, ht, HEADS), **kw)


def _reference_fit(loss: tinybert, hs: int, ht: int) -> SimpleNamespace:
    fit_dense = nn.Linear(hs, ht)
    with torch.no_grad():
        fit_dense.weight.copy_(loss.projection.weight)
        fit_dense.bias.copy_(loss.projection.bias)
    return SimpleNamespace(fit_dense=fit_dense)


@pytest.mark.parametrize("t_layers,s_layers", [(12, 4), (12, 6), (4, 2)])
def test_default_layer_maps_are_tinyberts(t_layers, s_layers):
    atts, reps = tinybert_layer_maps(list(range(t_layers)), list(range(s_layers)), list(range(t_layers + 1)))
    loss = _tinybert(s_layers, t_layers, 8, 16)
    assert loss.hidden_pairs == list(enumerate(reps))
    assert loss.attention_pairs == list(enumerate(atts))
    assert uniform_layer_map(s_layers, t_layers) == list(enumerate(reps))


@pytest.mark.parametrize("t_layers,s_layers", [(12, 4), (12, 6), (4, 2)])
@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_tinybert_matches_reference_without_padding(t_layers, s_layers, scale):
    hs, ht = 8, 16
    s, t = leaves(features(10, s_layers, hs, [6] * 4, scale)), features(11, t_layers, ht, [6] * 4, scale)
    loss = _tinybert(s_layers, t_layers, hs, ht)
    ours = loss.distill(*UNUSED, s, t)
    fit = _reference_fit(loss, hs, ht)
    att, rep = tinybert_intermediate(list(s.attentions), list(t.attentions), fit_student_reps(fit, list(s.hidden)), list(t.hidden))
    ref = rep + att  # task_distill.py: loss = rep_loss + att_loss
    assert rel_err(loss.terms["hidden"], rep) <= RTOL and rel_err(loss.terms["attention"], att) <= RTOL
    ours_inputs = [*s.hidden, *s.attentions, loss.projection.weight, loss.projection.bias]
    ref_inputs = [*s.hidden, *s.attentions, fit.fit_dense.weight, fit.fit_dense.bias]
    assert rel_err(ours, ref) <= RTOL and all_close(grads(ours, ours_inputs), grads(ref, ref_inputs))


@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_tinybert_with_padding_is_the_reference_on_real_tokens(scale):
    hs, ht, s_layers, t_layers = 8, 16, 2, 4
    s, t = leaves(features(12, s_layers, hs, PADDED, scale)), features(13, t_layers, ht, PADDED, scale)
    loss = _tinybert(s_layers, t_layers, hs, ht)
    ours = loss.distill(*UNUSED, s, t)
    fit = _reference_fit(loss, hs, ht)
    m = s.mask
    att, rep = tinybert_intermediate([real_blocks(a, m) for a in s.attentions], [real_blocks(a, m) for a in t.attentions],
                                     fit_student_reps(fit, [real_rows(h, m) for h in s.hidden]), [real_rows(h, m) for h in t.hidden])
    ref = rep + att
    ours_inputs = [*s.hidden, *s.attentions, loss.projection.weight, loss.projection.bias]
    ref_inputs = [*s.hidden, *s.attentions, fit.fit_dense.weight, fit.fit_dense.bias]
    assert rel_err(ours, ref) <= RTOL and all_close(grads(ours, ours_inputs), grads(ref, ref_inputs))


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


def test_attention_mse_matches_textbrewer():
    """TextBrewer's masked att_mse_loss is our convention (query and key both real, / heads * sum len^2),
    on the padded tensors themselves; unmasked on an unpadded batch it is TinyBERT's mean. Its hid_mse_loss
    with the mask is our hidden term (after the projection)."""
    for lengths in (PADDED, FULL):
        s, t = leaves(features(16, 1, 8, lengths)), features(17, 1, 8, lengths)
        a_s, a_t, m = s.attentions[0], t.attentions[0], s.mask
        ours = masked_attention_mse(a_s, a_t, m)
        ref = att_mse_loss(a_s, a_t, m)
        assert rel_err(ours, ref) <= RTOL and all_close(grads(ours, [a_s]), grads(ref, [a_s]))
        ours_h, ref_h = masked_hidden_mse(s.hidden[1], t.hidden[1], m), hid_mse_loss(s.hidden[1], t.hidden[1], m)
        assert rel_err(ours_h, ref_h) <= RTOL and all_close(grads(ours_h, [s.hidden[1]]), grads(ref_h, [s.hidden[1]]))
    assert rel_err(ours, att_mse_loss(a_s, a_t)) <= RTOL  # unpadded: the unmasked mean (probabilities: its -1e-3 clamp is a no-op)


def test_layer_map_override_pairs_hidden_states_and_their_layers_attention():
    s, t = leaves(features(18, 2, 8, PADDED)), features(19, 4, 16, PADDED)
    loss = _tinybert(2, 4, 8, 16, layer_map=[[0, 0], [2, 3]], hidden_weight=2.0, attention_weight=0.5)
    assert loss.hidden_pairs == [(0, 0), (2, 3)] and loss.attention_pairs == [(1, 2)]
    ours = loss.distill(*UNUSED, s, t)
    p, m = loss.projection, s.mask
    expected = (2.0 * (masked_hidden_mse(p(s.hidden[0]), t.hidden[0], m) + masked_hidden_mse(p(s.hidden[2]), t.hidden[3], m))
                + 0.5 * att_mse_loss(s.attentions[1], t.attentions[2], m))
    assert rel_err(ours, expected) <= RTOL


@pytest.mark.parametrize("temp", [1.0, 20.0])
def test_tinybert_logit_term_is_kd(temp):
    s_logits, t_logits, y = logits_pair(20, scale=8.0)
    s, t = features(21, 2, 8, PADDED), features(22, 4, 16, PADDED)
    loss = LOSSES.get("tinybert")(alpha=1.0, temperature=temp, hidden_weight=0.0, attention_weight=0.0)
    assert loss.projection is None and not loss.uses_attentions
    assert rel_err(loss.distill(s_logits, t_logits, y, s, t), Distiller(temp).kd(s_logits, t_logits)) <= RTOL


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
    s, t = features(25, 2, 16, PADDED), features(26, 2, 16, PADDED)
    loss = LOSSES.get("cosine")(ce_weight=2.0, distill_weight=1.0, temperature=2.0, logit_weight=5.0, cos_weight=1.0)
    d = Distiller(2.0)
    expected = 2.0 * F.cross_entropy(s_logits, y) + 5.0 * d.kd(s_logits, t_logits) + d.cos(s.hidden, t.hidden, s.mask.bool())
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
    ("at", {"alpha": 0.5}, "loss.name=tinybert or cosine"),
    ("hint", {"alpha": 0.5}, "loss.name=tinybert or cosine"),
])
def test_build_loss_errors_on_hf_models_are_one_line(name, params, match):
    student, teacher = tiny_bert(16, 2), tiny_bert(32, 4)
    with pytest.raises(ConfigError, match=match.replace(".", r"\.")) as e:
        build_loss(name, params, student, teacher, (10,))
    assert "\n" not in str(e.value)


def test_transformer_losses_refuse_image_models():
    student, teacher = create_model("cnn_tiny", 3, (1, 8, 8)), create_model("cnn_small", 3, (1, 8, 8))
    for name in ("tinybert", "cosine"):
        with pytest.raises(ConfigError, match="use hf models"):
            build_loss(name, {"alpha": 0.5}, student, teacher, (1, 8, 8))
