"""Hugging Face transformers as models over token ids: the task decides the head
(`head="classify"`: AutoModelForSequenceClassification; `head="causal_lm"`: AutoModelForCausalLM),
as `AutoModelFor<Task>` does.

    hf                      a checkpoint's architecture: arch_kwargs {"config": DIR or config dict}
                            (a teacher from `teacher.weights: DIR`, a saved teacher's card)
    hf.bert-L4-H256-A4      a family (any `model_type` transformers knows) built from its config
                            class with sizes from the name: L layers, H hidden size, A heads,
                            I intermediate size (4 H when H is given alone); arch_kwargs
                            {"tokenizer": DIR} gives the vocabulary and pad id

Every model takes int token ids (N, L) right-padded with the tokenizer's pad id; the attention
mask is `ids != pad_id`. A classifier gives (N, classes) logits, a causal LM (N, L, vocabulary). Nothing is downloaded (`local_files_only`), weights are read from
safetensors only, and remote code never runs.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn
from torch import Tensor

from trainables.hf_files import quiet
from trainables.models import MODELS, FeatureTaps, Zoo
from trainables.registry import ConfigError

PREFIX = "hf."
NAME = re.compile(r"^hf\.(?P<family>[a-z][a-z0-9_]*)(?P<sizes>(?:-[LHAI]\d+)*)$")
SIZES = {"L": "num_hidden_layers", "H": "hidden_size", "A": "num_attention_heads", "I": "intermediate_size"}
LAYER = re.compile(r"^(?P<head>.*\.(?:layers?|h)\.)(?P<i>\d+)(?P<tail>\..*)$")  # BERT's layer.i, Llama's layers.i, GPT-2's h.i
#: the heads a task asks for (Task.model_kwargs: "head"), as AutoModelFor<Task> names them
HEADS = ("classify", "causal_lm")


def parse_name(name: str) -> tuple[str, dict[str, int]]:
    """(model_type, config overrides) of `hf.<family>[-L#][-H#][-A#][-I#]`; ValueError if it is not one."""
    m = NAME.match(name)
    if not m:
        raise ValueError(f"must look like hf.<family>[-L<layers>][-H<hidden>][-A<heads>][-I<intermediate>] (e.g. hf.bert-L4-H256-A4), "
                         f"but got {name!r}")
    from transformers import CONFIG_MAPPING

    family = m["family"]
    if family not in CONFIG_MAPPING:
        raise ValueError(f"names no transformers model type {family!r} (e.g. bert, distilbert, roberta), in {name!r}")
    sizes = {SIZES[part[0]]: int(part[1:]) for part in m["sizes"].split("-")[1:]}
    return family, sizes


def check_checkpoint(path: str) -> str:
    """ValueError (for pydantic, which names the field) unless `path` is a Hugging Face checkpoint
    folder with safetensors weights; returns it absolute."""
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise ValueError(f"{path!r} is a folder without config.json: point at a Hugging Face checkpoint folder (save_pretrained(DIR))")
    if not any(p.glob("*.safetensors")):
        if any(p.glob("*.bin")) or any(p.glob("*.pt*")):
            raise ValueError(f"{path!r} holds pickle weights only (pytorch_model.bin), which are never unpickled here: "
                             "save it again with save_pretrained(DIR) (safetensors is the default)")
        raise ValueError(f"{path!r} holds no weights (*.safetensors): save the model with save_pretrained(DIR)")
    return str(p.resolve())


def model_config(config: dict[str, Any] | str):
    """A transformers config from a checkpoint folder or from its recorded dict (a teacher card's)."""
    from transformers import AutoConfig

    if isinstance(config, dict):
        kw = dict(config)
        return AutoConfig.for_model(kw.pop("model_type"), **kw)
    return AutoConfig.from_pretrained(config, local_files_only=True, trust_remote_code=False)


def config_dict(path: str) -> dict[str, Any]:
    """A checkpoint folder's config as plain data (what a teacher card records)."""
    cfg = model_config(path)
    out = cfg.to_dict()
    for k in ("transformers_version", "_name_or_path", "architectures", "id2label", "label2id", "torch_dtype", "dtype"):
        out.pop(k, None)
    return out


class TextFeatures(NamedTuple):
    """What a transformer gives the transformer losses (trainables.losses.text) with `with_features=True`."""

    hidden: tuple[Tensor, ...]  # (N, L, H) each: the embeddings' output first, then every layer's (transformers' hidden_states)
    attentions: tuple[Tensor, ...]  # (N, heads, L, L) each layer's attention probabilities; () unless want_attentions()
    mask: Tensor  # (N, L) 1 for a token, 0 for padding


def check_inputs(config, input_shape: tuple[int, ...], dataset: str) -> None:
    """Token ids (N, L) with L within the model's positions, or a one-line ConfigError naming `dataset`, the data it takes."""
    if len(input_shape) != 1:
        raise ConfigError(f"`students`/`teacher.arch` hf models take token ids, but the dataset gives {tuple(input_shape)} inputs: use {dataset}")
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and input_shape[0] > positions:
        raise ConfigError(f"`dataset.max_length` {input_shape[0]} is more than the model's {positions} positions: "
                          f"set dataset.max_length <= {positions}")


class HFClassifier(FeatureTaps, nn.Module):
    """AutoModelForSequenceClassification on token ids. Features (`with_features=True`): a
    TextFeatures; or, with layer names (set_feature_layers: the transformers model's own), those
    layers' outputs."""

    def __init__(self, config, num_classes: int, input_shape: tuple[int, ...]) -> None:
        from transformers import AutoModelForSequenceClassification

        quiet()
        super().__init__()
        check_inputs(config, input_shape, "a text dataset (dataset.name: text)")
        if config.pad_token_id is None:
            raise ConfigError(f"`teacher.arch` hf model config ({config.model_type}) has no pad_token_id: set it in its config.json")
        config.num_labels = num_classes
        config.id2label = {i: str(i) for i in range(num_classes)}
        config.label2id = {str(i): i for i in range(num_classes)}
        self.net = AutoModelForSequenceClassification.from_config(config)
        self.pad_id = int(config.pad_token_id)
        self.attentions = False

    def want_attentions(self) -> None:
        """Return attention maps with the features: transformers' eager attention (its fused
        kernels compute no maps), for the losses that distil them."""
        self.net.set_attn_implementation("eager")
        self.attentions = True

    @property
    def config(self):
        return self.net.config

    def tap_root(self) -> nn.Module:
        return self.net

    def _trimmed(self, x: Tensor) -> Tensor:
        """The ids without the padding columns every row of the batch has (right-padded: the
        outputs at the real tokens are the same; batches of similar lengths then skip most
        padding). Reads the batch's longest length: a host sync on CUDA, one per forward."""
        ids = x.long()
        width = int((ids != self.pad_id).sum(1).max()) if len(ids) else ids.shape[1]
        return ids[:, : max(width, 1)]

    def _logits(self, x: Tensor) -> Tensor:
        ids = self._trimmed(x)
        return self.net(input_ids=ids, attention_mask=(ids != self.pad_id).long()).logits

    def forward(self, x: Tensor, with_features: bool = False):
        if not with_features:
            return self._logits(x)
        if self.feature_layers:
            return self.tapped(x, self._logits)
        ids = self._trimmed(x)
        mask = (ids != self.pad_id).long()
        out = self.net(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=self.attentions)
        return out.logits, TextFeatures(tuple(out.hidden_states), tuple(out.attentions or ()), mask)


class HFCausalLM(FeatureTaps, nn.Module):
    """AutoModelForCausalLM on token ids: (N, L, vocabulary) next-token logits at every position.

    Right padding needs no attention mask in a causal model (no real token attends to a later
    position), so the ids go in as they are: a pad id that is also the end-of-text token (GPT-2's
    habit) inside packed text is read as text. The labels (-100 on padding) decide what is scored."""

    def __init__(self, config, input_shape: tuple[int, ...]) -> None:
        from transformers import AutoModelForCausalLM

        quiet()
        super().__init__()
        check_inputs(config, input_shape, "a language-model dataset (dataset.name: lm_text)")
        self.net = AutoModelForCausalLM.from_config(config)
        self.pad_id = int(config.pad_token_id) if config.pad_token_id is not None else 0

    @property
    def config(self):
        return self.net.config

    def tap_root(self) -> nn.Module:
        return self.net

    def _logits(self, x: Tensor) -> Tensor:
        return self.net(input_ids=x.long()).logits

    def forward(self, x: Tensor, with_features: bool = False):
        if not with_features:
            return self._logits(x)
        if self.feature_layers:
            return self.tapped(x, self._logits)
        out = self.net(input_ids=x.long(), output_hidden_states=True)
        return out.logits, TextFeatures(tuple(out.hidden_states), (), torch.ones_like(x, dtype=torch.long))


def with_head(config, num_classes: int, input_shape: tuple[int, ...], head: str) -> nn.Module:
    """The model `head` asks for on `config`: a classifier of `num_classes`, or a causal LM (whose
    outputs are the config's vocabulary)."""
    if head == "causal_lm":
        return HFCausalLM(config, input_shape)
    if head != "classify":
        raise ConfigError(f"`head` must be one of {list(HEADS)}, but got {head!r}")
    return HFClassifier(config, num_classes, input_shape)


@MODELS.register(name="hf")
def from_checkpoint_config(num_classes: int, input_shape: tuple[int, ...], config: dict[str, Any] | str, head: str = "classify") -> nn.Module:
    """`hf`: the architecture a checkpoint folder (or its recorded config) describes, with the task's head."""
    return with_head(model_config(config), num_classes, input_shape, head)


def family_config(name: str, tokenizer: str | None, **overrides):
    """The config of `hf.<family>-L..-H..`: the family's defaults, sized by the name and
    `overrides`, with the vocabulary and pad id of `tokenizer` (the data's)."""
    from transformers import AutoConfig

    from trainables.hf_files import tokenizer_info

    family, sizes = parse_name(name)
    if not tokenizer:
        raise ConfigError(f"`students` {name} needs the data's tokenizer (dataset.tokenizer): use a text dataset")
    sizes = {**sizes, **overrides}
    if "hidden_size" in sizes and "intermediate_size" not in sizes:
        sizes["intermediate_size"] = 4 * sizes["hidden_size"]
    config = AutoConfig.for_model(family, **tokenizer_info(tokenizer))
    for key, value in sizes.items():
        if key == "intermediate_size" and not hasattr(config, key) and hasattr(config, "hidden_dim"):
            key = "hidden_dim"  # DistilBERT's name for it
        if key == "intermediate_size" and hasattr(config, "n_inner"):
            key = "n_inner"  # GPT-2's
        setattr(config, key, value)
    heads, width = config.num_attention_heads, config.hidden_size
    if width % heads:
        raise ConfigError(f"`students` {name}: hidden size {width} is not a multiple of {heads} heads: change H or A")
    if getattr(config, "num_key_value_heads", None) is not None and "num_key_value_heads" not in sizes:
        config.num_key_value_heads = heads  # grouped-query families (llama, qwen2): one key/value head per head unless asked
    if getattr(config, "head_dim", None) is not None and "head_dim" not in sizes:
        config.head_dim = width // heads  # set from the defaults' sizes when the config was made
    return config


def from_family(name: str, num_classes: int, input_shape: tuple[int, ...], tokenizer: str | None = None, head: str = "classify",
                **overrides) -> nn.Module:
    """`hf.<family>-L..-H..` built for the data (family_config), with the task's head."""
    return with_head(family_config(name, tokenizer, **overrides), num_classes, input_shape, head)


def check_fit(config, field: str, max_length: int, vocab: int) -> None:
    """A model's config against the data, before anything is built: every token id must have an
    embedding and every position one."""
    if config.vocab_size < vocab:
        raise ConfigError(f"`{field}` has {config.vocab_size} token embeddings but the tokenizer (dataset.tokenizer) has {vocab} tokens: "
                          "use the tokenizer the model was trained with")
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and max_length > positions:
        raise ConfigError(f"`dataset.max_length` {max_length} is more than {field}'s {positions} positions: set dataset.max_length <= {positions}")


def card_config(arch: str, arch_kwargs: dict[str, Any]):
    """The transformers config a teacher card describes: `hf` records the config, hf.<family> the tokenizer."""
    return model_config(arch_kwargs["config"]) if arch == "hf" else family_config(arch, **arch_kwargs)


def check_layers_fit(student, teacher, name: str) -> None:
    """`student_weights: teacher` possible from the two configs alone (init_from_teacher's needs)."""
    same = ("model_type", "hidden_size", "num_attention_heads", "intermediate_size")
    if any(getattr(student, k, None) != getattr(teacher, k, None) for k in same) or student.num_hidden_layers > teacher.num_hidden_layers:
        want = f"hf.{teacher.model_type}-L<n>-H{teacher.hidden_size}-A{teacher.num_attention_heads}-I{getattr(teacher, 'intermediate_size', 0)}"
        raise ConfigError(f"`student_weights.{name}: teacher` copies the teacher's layers, so the student needs the teacher's model type "
                          f"and sizes but depth (n <= {teacher.num_hidden_layers}): use {want}")


def load_checkpoint(model: nn.Module, path: str | Path, field: str, new_head_ok: bool) -> bool:
    """A checkpoint folder's weights into an `hf` model (transformers' own loading: a base model's
    folder, or a classifier's of another class count, leaves the head new). Returns whether it did."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    quiet()
    if not isinstance(model, (HFClassifier, HFCausalLM)):
        raise ConfigError(f"`{field}` {str(path)!r} is a Hugging Face checkpoint folder: use it with an hf model (teacher.arch: hf)")
    target = model.net
    auto = AutoModelForCausalLM if isinstance(model, HFCausalLM) else AutoModelForSequenceClassification
    try:
        loaded, info = auto.from_pretrained(
            str(path), config=target.config, local_files_only=True, trust_remote_code=False, use_safetensors=True,
            ignore_mismatched_sizes=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise ConfigError(f"`{field}` {str(path)!r} cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    head = {k for k in target.state_dict() if k.startswith(("classifier.", "score.", "logits_proj"))}
    new = {k for k in info["missing_keys"]} | {m[0] if isinstance(m, tuple) else m for m in info["mismatched_keys"]}
    if new - head:
        raise ConfigError(f"`{field}` {str(path)!r} does not fit this architecture (missing {sorted(new - head)[:4]}): "
                          "use a checkpoint of the same model type and size")
    if new and not new_head_ok:
        raise ConfigError(f"`{field}` {str(path)!r} has no classifier head for this dataset's class count")
    target.load_state_dict(loaded.state_dict())
    return bool(new)


def check_copies_teacher(student: str, teacher: str | None) -> None:
    """`student_weights.<student>: teacher` takes an hf student and one hf teacher (`teacher` is
    its arch: `hf`, hf.<family>, `ensemble`, None when there is none). The driver asks before Ray
    starts, the trial before it copies: one rule."""
    if not (student.startswith(PREFIX) and teacher is not None and (teacher == "hf" or teacher.startswith(PREFIX))):
        raise ConfigError(f"`student_weights.{student}: teacher` copies a Hugging Face teacher's layers into an hf student, but the "
                          f"student is {student} and the teacher {teacher or 'none'}: use hf.<family> students with one hf teacher, "
                          "or drop the entry")


def init_from_teacher(student: nn.Module, teacher: nn.Module) -> list[int]:
    """DistilBERT's initialisation: the student's embeddings, head and every other layer copied
    from the teacher (teacher layer i * (teacher layers // student layers) for student layer i).
    Same model type and width required (check_copies_teacher and check_layers_fit say so from the
    configs). Returns the teacher layers taken."""
    s, t = student.config, teacher.config
    if s.model_type != t.model_type or s.hidden_size != t.hidden_size:
        raise ConfigError(f"`student_weights: teacher` needs the teacher's model type and width, but the student is {s.model_type} "
                          f"H{s.hidden_size} and the teacher {t.model_type} H{t.hidden_size}: use hf.{t.model_type}-L<n>-H{t.hidden_size}")
    ls, lt = s.num_hidden_layers, t.num_hidden_layers
    if ls > lt:
        raise ConfigError(f"`student_weights: teacher` needs a student no deeper than the teacher ({ls} > {lt} layers)")
    taken = [i * (lt // ls) for i in range(ls)]
    own, theirs = student.net.state_dict(), teacher.net.state_dict()
    out, bad = {}, []
    for key, value in own.items():
        m = LAYER.match(key)
        src = theirs.get(f"{m['head']}{taken[int(m['i'])]}{m['tail']}" if m else key)
        if src is not None and src.shape == value.shape:
            out[key] = src
        elif src is not None and "position_embeddings" in key and src.shape[1:] == value.shape[1:]:
            n = min(len(src), len(value))  # positions past dataset.max_length are never used: the rows both have
            out[key] = torch.cat([src[:n], value[n:]])
        elif not key.startswith(("classifier.", "score.")):
            bad.append(key)
    if bad:
        name = f"hf.{t.model_type}-L{ls}-H{t.hidden_size}-A{t.num_attention_heads}-I{getattr(t, 'intermediate_size', 4 * t.hidden_size)}"
        raise ConfigError(f"`student_weights: teacher` finds no teacher tensor of the same shape for {bad[:2]}: a student that takes "
                          f"the teacher's layers has the teacher's sizes but depth, e.g. {name}")
    with torch.no_grad():
        student.net.load_state_dict(out, strict=False)
    return taken


HF = Zoo(prefix=PREFIX, package="transformers", extra="text", what="transformers families", examples=("bert-L4-H256-A4", "distilbert-L2"),
         build=lambda name, num_classes, input_shape, **kw: from_family(PREFIX + name, num_classes, input_shape, **kw),
         check=lambda name: parse_name(PREFIX + name))
