"""Text encoders for captions: a frozen `transformers` model and its tokenizer behind one interface.

    enc = build_text_encoder("minilm")            # the offline asset (all-MiniLM-L6-v2, 384-d)
    enc = build_text_encoder("/path/to/t5-folder")  # a local folder: T5 encoder, CLIP text, or AutoModel
    cond = enc.encode(["a red square", ""])       # TextCond: tokens, mask, pooled, null

Weights come only from local files (the `minilm` asset or a `save_pretrained` folder) and a folder
without weights is refused, never run with a random initialisation. Features are returned in float32
whatever the checkpoint's dtype; padded positions of `tokens` are zero, so a caption's features do not
depend on the batch it was encoded in.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aligntok.assets import require, sha256_file

# {"tokens": (B, L, D) float32, zero where padded; "mask": (B, L) bool, True = real token (at least one a
#  row); "pooled": (B, D) float32; "null": (B,) bool, True = the empty prompt (the model's null text)}
TextCond = dict[str, torch.Tensor]

MINILM = "minilm"
# model_type -> (transformers class name, pooling); any other text model_type goes through AutoModel.
_FAMILIES = {
    "t5": ("T5EncoderModel", "mean"),
    "mt5": ("MT5EncoderModel", "mean"),
    "umt5": ("UMT5EncoderModel", "mean"),
    "clip": ("CLIPTextModel", "eos"),
    "clip_text_model": ("CLIPTextModel", "eos"),
}
# Files that hold a tokenizer's vocabulary: a folder needs one (transformers 5 would otherwise build a
# tokenizer that knows only its special tokens, and every word would become [UNK]).
_VOCAB_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)
# Files that decide how text becomes token ids (hashed into the identity beside the weights).
_TOKENIZER_FILES = (
    *_VOCAB_FILES,
    "merges.txt",
    "added_tokens.json",
    "special_tokens_map.json",
    "tokenizer_config.json",
)
# A tokenizer's model_max_length above this is transformers' "no limit" placeholder.
_NO_LIMIT = 1_000_000


class PromptsTruncated(UserWarning):
    """Some prompts were longer than the text encoder's token limit and lost their ends."""


def _bad_spec(spec: str, why: str) -> ValueError:
    return ValueError(
        f"text encoder {spec}: {why}; pass 'minilm' (the offline asset) or a local transformers text-model "
        "folder holding config.json, its weights and its tokenizer files (e.g. from `save_pretrained`)"
    )


def resolve_text_encoder(spec: str) -> str | Path:
    """`MINILM`, or the absolute path of the local folder `spec` names; ValueError for anything else."""
    if spec == MINILM:
        return MINILM
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise _bad_spec(repr(spec), "not a known name and no such folder")
    return folder.resolve()


@dataclass(frozen=True, kw_only=True)
class _Source:
    """Everything about a text encoder that its config and tokenizer files say, before weights load."""

    name: str
    folder: Path
    model_class: str  # a transformers class name
    config: Any
    tokenizer: Any
    pooling: str  # mean (masked mean), cls (first token) or eos (the model's pooler_output)
    max_length: int
    dim: int

    def weight_files(self) -> list[Path]:
        """The weight files transformers reads: safetensors when there are any, else pickled .bin."""
        return sorted(self.folder.glob("*.safetensors")) or sorted(self.folder.glob("*.bin"))

    def identity(self) -> dict[str, Any]:
        tokenizer_files = [self.folder / f for f in _TOKENIZER_FILES if (self.folder / f).is_file()]
        return {
            "name": self.name,
            "weights": sha256_file(*self.weight_files()),
            "tokenizer": sha256_file(*tokenizer_files),
            "max_length": self.max_length,
            "dim": self.dim,
            "pooling": self.pooling,
        }


def _read_json(path: Path, spec: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise _bad_spec(spec, f"cannot read {path.name} ({e.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise _bad_spec(spec, f"{path.name} is not a JSON object")
    return data


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' load reports and progress bars off for the block (aligntok reports problems itself)."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _sentence_transformers(folder: Path, spec: str) -> tuple[str | None, int | None]:
    """Pooling and token limit of a sentence-transformers folder (None, None for a plain one). A Normalize
    module after the pooling (MiniLM has one) is not applied: `pooled` keeps its norm, and whoever
    consumes it (a projection, a LayerNorm) scales it as it needs."""
    pooling, limit = None, None
    pool_file = folder / "1_Pooling" / "config.json"
    if pool_file.is_file():
        pool = _read_json(pool_file, spec)
        modes = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
        chosen = [mode for key, mode in modes.items() if pool.get(key)]
        others = [k for k, v in pool.items() if k.startswith("pooling_mode") and v and k not in modes]
        if len(chosen) != 1 or others:
            raise _bad_spec(spec, "its 1_Pooling/config.json asks for a pooling other than mean or cls alone")
        pooling = chosen[0]
    st_file = folder / "sentence_bert_config.json"
    if st_file.is_file():
        limit = _read_json(st_file, spec).get("max_seq_length")
    return pooling, int(limit) if limit else None


def _text_config(folder: Path, model_type: str, spec: str) -> Any:
    """The text model's config; refuses folders that hold no text encoder."""
    import transformers as T

    with _quiet_transformers():
        try:
            if model_type in _FAMILIES:
                cls = getattr(T, _FAMILIES[model_type][0])
                return cls.config_class.from_pretrained(str(folder), local_files_only=True)
            config = T.AutoConfig.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:  # a user's files: any failure to read them becomes one clear line
            raise _bad_spec(spec, f"transformers cannot read its config ({type(e).__name__})") from None
    vision = any(hasattr(config, k) for k in ("vision_config", "image_size", "num_channels"))
    if vision or not hasattr(config, "vocab_size") or not hasattr(config, "hidden_size"):
        raise _bad_spec(spec, f"model_type {model_type!r} is not a text model")
    if getattr(config, "is_encoder_decoder", False):
        raise _bad_spec(spec, f"model_type {model_type!r} is an encoder-decoder other than T5")
    return config


def _max_length(
    config: Any, tokenizer: Any, sentence_limit: int | None, wanted: int | None, spec: str
) -> int:
    """The token limit: `wanted`, else the sentence-transformers one, else the tokenizer's or positions'."""
    positions = getattr(config, "max_position_embeddings", None)
    limits = [n for n in (tokenizer.model_max_length, positions) if isinstance(n, int) and n < _NO_LIMIT]
    length = wanted or sentence_limit or min(limits, default=512)
    specials = tokenizer.num_special_tokens_to_add()
    if length <= specials:
        raise ValueError(
            f"text encoder {spec}: max_length {length} leaves no room beside its {specials} "
            f"special tokens; pass max_length > {specials}"
        )
    if isinstance(positions, int) and length > positions:
        raise ValueError(
            f"text encoder {spec}: max_length {length} exceeds its {positions} position "
            f"embeddings; pass max_length <= {positions}"
        )
    return length


def _resolve(spec: str, max_length: int | None) -> _Source:
    """Read a text encoder's config and tokenizer and check that its weights are there."""
    from transformers import AutoTokenizer

    where = resolve_text_encoder(spec)
    folder, name = (require(MINILM), MINILM) if where == MINILM else (Path(where), Path(where).name)
    shown = MINILM if where == MINILM else str(folder)
    if not (folder / "config.json").is_file():
        raise _bad_spec(shown, "config.json is missing (not a transformers folder)")
    model_type = str(_read_json(folder / "config.json", shown).get("model_type"))
    config = _text_config(folder, model_type, shown)
    if not (any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))):
        raise _bad_spec(shown, "no weights file (*.safetensors or *.bin) is there")
    if not any((folder / f).is_file() for f in _VOCAB_FILES):
        raise _bad_spec(shown, f"it holds no tokenizer vocabulary (one of {', '.join(_VOCAB_FILES)})")
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # no tokenizer files, or unreadable ones
        raise _bad_spec(shown, f"its tokenizer does not load ({type(e).__name__})") from None
    if max_length is not None and max_length < 1:
        raise ValueError(f"text encoder {shown}: max_length must be positive, got {max_length}")
    sentence_pooling, sentence_limit = _sentence_transformers(folder, shown)
    model_class, pooling = _FAMILIES.get(model_type, ("AutoModel", "mean"))
    return _Source(
        name=name,
        folder=folder,
        model_class=model_class,
        config=config,
        tokenizer=tokenizer,
        pooling=sentence_pooling or pooling,
        max_length=_max_length(config, tokenizer, sentence_limit, max_length, shown),
        dim=int(config.hidden_size),
    )


def _load_model(source: _Source) -> nn.Module:
    """The model with the folder's weights in float32; refuses weights that leave tensors uninitialised."""
    import transformers as T

    cls = getattr(T, source.model_class)
    try:
        with _quiet_transformers():
            model, info = cls.from_pretrained(
                str(source.folder), local_files_only=True, output_loading_info=True, dtype=torch.float32
            )
    except Exception as e:  # a user's files: any failure to read them becomes one clear line
        first = (str(e).strip().splitlines() or [""])[0]
        raise _bad_spec(
            str(source.folder), f"transformers cannot load it ({type(e).__name__}: {first})"
        ) from None
    # BERT-like checkpoints saved from a task head carry no pooler; the pooler is never used here.
    missing = sorted(k for k in info.get("missing_keys", []) if not k.startswith("pooler."))
    if missing:  # transformers would keep these randomly initialised, with only a logged warning
        raise _bad_spec(str(source.folder), f"its weights lack {len(missing)} tensors (e.g. {missing[0]})")
    return model


class TextEncoder(nn.Module):
    """A frozen text model: prompts -> per-token features, a padding mask, a pooled vector, a null flag.

    Always in eval mode (`train()` keeps it there) with requires_grad False. `encode` returns tensors on
    the model's device."""

    def __init__(self, source: _Source, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = source.tokenizer
        self.dim = source.dim
        self.max_length = source.max_length
        self.pooling = source.pooling
        self._source = source
        self._identity: dict[str, Any] | None = None

    def train(self, mode: bool = True) -> TextEncoder:
        return super().train(False)

    def identity(self) -> dict[str, Any]:
        """What caption features made by this encoder are bound to: name, sha256 of the weight files and
        of the tokenizer files, max_length, dim, pooling (hashed once)."""
        if self._identity is None:
            self._identity = self._source.identity()
        return dict(self._identity)

    def token_ids(self, prompts: Sequence[str]) -> tuple[list[list[int]], int]:
        """Token ids of each prompt (special tokens included), cut to max_length, and how many were cut."""
        prompts = list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be strings; got " + ", ".join({type(p).__name__ for p in prompts}))
        # One token over the limit tells a prompt that is cut from one that fits exactly.
        probe = self.tokenizer(prompts, truncation=True, max_length=self.max_length + 1)["input_ids"]
        cut = sum(len(ids) > self.max_length for ids in probe)
        if not cut:
            return probe, 0
        return self.tokenizer(prompts, truncation=True, max_length=self.max_length)["input_ids"], cut

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], *, pad_to: int | None = None) -> TextCond:
        """Encode `prompts`, padded to the longest in the batch or to `pad_to` (at least that long). Prompts
        over max_length tokens are cut, with one warning per call."""
        prompts = list(prompts)
        if not prompts:
            raise ValueError("encode needs at least one prompt (the empty string is the null text)")
        ids, cut = self.token_ids(prompts)
        if cut:
            warnings.warn(
                f"{cut} of {len(ids)} prompts are longer than the text encoder's {self.max_length} tokens "
                "and were truncated",
                PromptsTruncated,
                stacklevel=2,
            )
        lengths = [max(len(row), 1) for row in ids]  # a tokenizer may give "" no token: keep one pad
        longest = max(lengths, default=1)
        if pad_to is not None and pad_to < longest:
            raise ValueError(
                f"pad_to={pad_to} is shorter than the longest prompt ({longest} tokens); "
                f"pass pad_to >= {longest} or None"
            )
        device = next(self.model.parameters()).device
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(ids), longest), pad_id, dtype=torch.long)  # (B, L)
        mask = torch.zeros(len(ids), longest, dtype=torch.bool)  # (B, L)
        for i, (row, n) in enumerate(zip(ids, lengths)):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, :n] = True
        input_ids, mask = input_ids.to(device), mask.to(device)
        out = self.model(input_ids=input_ids, attention_mask=mask.long())
        tokens = out.last_hidden_state.float() * mask[..., None]  # (B, L, D), zero where padded
        if self.pooling == "eos":
            pooled = out.pooler_output.float()
        elif self.pooling == "cls":
            pooled = tokens[:, 0]
        else:
            pooled = tokens.sum(1) / mask.sum(1, keepdim=True)
        extra = (pad_to or longest) - longest
        if extra:
            tokens = nn.functional.pad(tokens, (0, 0, 0, extra))
            mask = nn.functional.pad(mask, (0, extra))
        null = torch.tensor([not p.strip() for p in prompts], dtype=torch.bool, device=device)
        return {"tokens": tokens, "mask": mask, "pooled": pooled, "null": null}


def text_encoder_identity(spec: str = MINILM, *, max_length: int | None = None) -> dict[str, Any]:
    """The identity `build_text_encoder(spec, max_length=...)` would report, without loading its weights."""
    return _resolve(spec, max_length).identity()


def build_text_encoder(spec: str = MINILM, *, max_length: int | None = None) -> TextEncoder:
    """The text encoder `spec` names: 'minilm' (the offline asset: BertModel, masked-mean pooling, 256
    tokens by its sentence-transformers config) or a local transformers folder (T5 / mT5 / UMT5 encoder
    and any AutoModel text model: masked mean; CLIP text: its pooler_output, the EOS token). `max_length`
    overrides the token limit (default: the folder's sentence-transformers limit, else the tokenizer's or
    the position embeddings', else 512)."""
    source = _resolve(spec, max_length)
    return TextEncoder(source, _load_model(source))
