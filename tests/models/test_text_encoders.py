"""Text encoders: the MiniLM asset and local transformers folders (BERT through AutoModel, T5, CLIP text)
behind one interface: shapes, pooling, padding, truncation, the null prompt, identity, refusals."""

from __future__ import annotations

import shutil
import string
import warnings
from pathlib import Path

import pytest
import torch

from aligntok import assets
from aligntok.models.text import (
    PromptsTruncated,
    TextEncoder,
    build_text_encoder,
    text_encoder_identity,
)
from conftest import slow_fixture

# A WordPiece vocabulary that spells any lowercase ASCII text letter by letter: prompt lengths are easy
# to reason about ("[CLS] r ##e ##d [SEP]").
VOCAB = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    *string.ascii_lowercase,
    *[f"##{c}" for c in string.ascii_lowercase],
    *string.digits,
    *string.punctuation,
]
SEP = VOCAB.index("[SEP]")
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)


def tiny_text_folder(root: Path, family: str, *, seed: int = 0) -> Path:
    """A random tiny transformers checkpoint of `family` (bert, t5, clip) with a WordPiece tokenizer, as
    `save_pretrained` writes it. BERT is saved with a masked-LM head (no pooler: AutoModel must cope), T5
    and CLIP as full models (the encoder / text tower is taken out of them)."""
    import transformers as T

    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tokenizer = T.BertTokenizer(str(root / "vocab.txt"))  # positional: vocab_file in 4.x, vocab in 5.x
    (root / "vocab.txt").unlink()
    torch.manual_seed(seed)
    if family == "bert":
        model = T.BertForMaskedLM(T.BertConfig(vocab_size=len(VOCAB), max_position_embeddings=64, **SMALL))
    elif family == "t5":
        cfg = T.T5Config(vocab_size=len(VOCAB), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
        model = T.T5Model(cfg)
    else:
        text = dict(vocab_size=len(VOCAB), max_position_embeddings=24, eos_token_id=SEP, **SMALL)
        vision = dict(image_size=16, patch_size=8, **SMALL)
        model = T.CLIPModel(T.CLIPConfig(text_config=text, vision_config=vision))
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("text")
    return {f: tiny_text_folder(base / f, f) for f in ("bert", "t5", "clip")}


@slow_fixture(scope="module")
def minilm() -> TextEncoder:
    if not assets.is_present("minilm"):
        pytest.skip("asset minilm not fetched; run `aligntok assets fetch minilm`")
    return build_text_encoder("minilm")


def _masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.float()[..., None]
    return (tokens * m).sum(1) / m.sum(1)


# ---------------------------------------------------------------------------------------------------------
# The MiniLM asset


def test_minilm_encodes_with_mean_pooling_and_its_own_limit(minilm) -> None:
    assert (minilm.dim, minilm.max_length, minilm.pooling) == (384, 256, "mean")
    cond = minilm.encode(["a red square", "grinning face with smiling eyes", ""])
    b, n = 3, int(cond["mask"].sum(1).max())
    assert cond["tokens"].shape == (b, n, 384) and cond["mask"].shape == (b, n)
    assert cond["pooled"].shape == (b, 384) and cond["null"].tolist() == [False, False, True]
    assert all(t.dtype == torch.float32 for t in (cond["tokens"], cond["pooled"]))
    assert cond["mask"].dtype == torch.bool and cond["null"].dtype == torch.bool
    torch.testing.assert_close(cond["pooled"], _masked_mean(cond["tokens"], cond["mask"]))
    assert cond["tokens"][~cond["mask"]].abs().max() == 0  # padding is zero
    # The same prompt alone (no padding) gives the same features: the mask is honoured.
    alone = minilm.encode(["a red square"])
    torch.testing.assert_close(alone["pooled"][0], cond["pooled"][0], atol=1e-5, rtol=1e-5)
    ident = minilm.identity()
    assert ident["name"] == "minilm" and (ident["dim"], ident["max_length"], ident["pooling"]) == (
        384,
        256,
        "mean",
    )
    assert ident["weights"] == assets.sha256_file(assets.require("minilm") / "model.safetensors")
    assert text_encoder_identity("minilm") == ident


def test_minilm_weights_are_pretrained(minilm) -> None:
    # Sentence similarity only a trained encoder gets right (random weights give near-equal cosines).
    p = torch.nn.functional.normalize(minilm.encode(["a dog", "a puppy", "a car engine"])["pooled"], dim=-1)
    assert p[0] @ p[1] > p[0] @ p[2] + 0.2


def test_minilm_truncates_a_long_prompt_with_one_warning(minilm) -> None:
    with pytest.warns(PromptsTruncated, match=r"1 of 2 prompts .* 256 tokens") as caught:
        cond = minilm.encode(["word " * 300, "hi"])
    assert len(caught) == 1 and cond["tokens"].shape[1] == 256 and bool(cond["mask"][0].all())


# ---------------------------------------------------------------------------------------------------------
# Local folders: the three families


@pytest.mark.parametrize(
    "family,model_class,pooling,limit",
    [
        ("bert", "BertModel", "mean", 64),
        ("t5", "T5EncoderModel", "mean", 512),
        ("clip", "CLIPTextModel", "eos", 24),
    ],
)
def test_families_load_from_a_local_folder(folders, family, model_class, pooling, limit) -> None:
    enc = build_text_encoder(str(folders[family]))
    assert type(enc.model).__name__ == model_class and (enc.dim, enc.pooling, enc.max_length) == (
        32,
        pooling,
        limit,
    )
    enc.train()
    assert not enc.training and not enc.model.training
    assert not any(p.requires_grad for p in enc.parameters())
    prompts = ["red", "a blue disc on white", ""]
    cond = enc.encode(prompts)
    lengths = [len(r) for r in enc.token_ids(prompts)[0]]
    assert cond["mask"].sum(1).tolist() == lengths and cond["tokens"].shape == (3, max(lengths), 32)
    assert cond["null"].tolist() == [False, False, True] and bool(cond["mask"].any(1).all())
    if pooling == "eos":  # CLIP pools its EOS token ([SEP] here): the last real token
        last = torch.tensor(lengths) - 1
        torch.testing.assert_close(cond["pooled"], cond["tokens"][torch.arange(3), last])
    else:
        torch.testing.assert_close(cond["pooled"], _masked_mean(cond["tokens"], cond["mask"]))
    # Batch-independent: a prompt's features do not depend on the longer prompts beside it.
    alone = enc.encode(prompts[:1])
    torch.testing.assert_close(alone["tokens"][0], cond["tokens"][0, : lengths[0]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone["pooled"][0], cond["pooled"][0], atol=1e-5, rtol=1e-5)


def test_weights_are_the_folders_not_random(folders) -> None:
    import transformers as T

    ref = T.BertForMaskedLM.from_pretrained(folders["bert"]).bert.eval()
    enc = build_text_encoder(str(folders["bert"]))
    ids, _ = enc.token_ids(["red"])
    want = ref(input_ids=torch.tensor(ids)).last_hidden_state
    torch.testing.assert_close(enc.encode(["red"])["tokens"], want)


def test_pad_to_pads_with_zeros_and_masked_positions(folders) -> None:
    enc = build_text_encoder(str(folders["t5"]))
    short, padded = enc.encode(["red", "blue"]), enc.encode(["red", "blue"], pad_to=12)
    n = short["tokens"].shape[1]
    assert padded["tokens"].shape == (2, 12, 32) and padded["mask"].shape == (2, 12)
    assert padded["tokens"][:, n:].abs().max() == 0 and not padded["mask"][:, n:].any()
    torch.testing.assert_close(padded["pooled"], short["pooled"])
    with pytest.raises(ValueError, match="pad_to=2 is shorter than the longest prompt"):
        enc.encode(["red", "blue"], pad_to=2)


def test_truncation_warns_once_per_call_and_keeps_the_end_token(folders) -> None:
    enc = build_text_encoder(str(folders["bert"]), max_length=6)
    exact = "abcd"  # [CLS] a ##b ##c ##d [SEP]: exactly 6 tokens, not cut
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert enc.encode([exact])["mask"].sum() == 6
    with pytest.warns(
        PromptsTruncated, match=r"2 of 3 prompts are longer than the text encoder's 6 tokens"
    ) as w:
        cond = enc.encode(["abcdefgh", exact, "a long prompt indeed"])
    assert len(w) == 1 and cond["tokens"].shape == (3, 6, 32)
    ids, cut = enc.token_ids(["abcdefgh"])
    assert cut == 1 and len(ids[0]) == 6 and ids[0][-1] == SEP


def test_empty_and_blank_prompts_are_the_null_text(folders) -> None:
    enc = build_text_encoder(str(folders["clip"]))
    cond = enc.encode(["", "   ", "a", " a "])
    assert cond["null"].tolist() == [True, True, False, False]
    assert bool(cond["mask"].any(1).all())


def test_identity_follows_weights_and_settings(folders, tmp_path) -> None:
    ident = build_text_encoder(str(folders["bert"])).identity()
    assert set(ident) == {"name", "weights", "tokenizer", "max_length", "dim", "pooling"}
    assert ident == text_encoder_identity(str(folders["bert"]))  # without loading the weights
    assert text_encoder_identity(str(folders["bert"]), max_length=8)["max_length"] == 8
    other = tiny_text_folder(tmp_path / "bert", "bert", seed=1)
    assert text_encoder_identity(str(other))["weights"] != ident["weights"]
    assert text_encoder_identity(str(other))["tokenizer"] == ident["tokenizer"]


# ---------------------------------------------------------------------------------------------------------
# Refusals


def test_a_folder_without_weights_is_refused(folders, tmp_path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(folders["bert"], bare)
    (bare / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"no weights file .*pass 'minilm'"):
        build_text_encoder(str(bare))
    with pytest.raises(ValueError, match="no weights file"):
        text_encoder_identity(str(bare))


def test_weights_that_lack_tensors_are_refused(folders, tmp_path) -> None:
    import json

    deeper = tmp_path / "deeper"
    shutil.copytree(folders["t5"], deeper)
    config = json.loads((deeper / "config.json").read_text())
    (deeper / "config.json").write_text(json.dumps({**config, "num_layers": 2}))
    with pytest.raises(ValueError, match=r"its weights lack \d+ tensors"):
        build_text_encoder(str(deeper))


def test_unknown_specs_and_other_folders_are_refused(folders, tmp_path) -> None:
    import transformers as T

    with pytest.raises(ValueError, match=r"'bert-base': not a known name and no such folder; pass 'minilm'"):
        build_text_encoder("bert-base")
    with pytest.raises(ValueError, match=r"config\.json is missing"):
        build_text_encoder(str(tmp_path))
    vit = tmp_path / "vit"
    T.ViTModel(T.ViTConfig(image_size=16, patch_size=8, **SMALL)).save_pretrained(vit)
    with pytest.raises(ValueError, match="model_type 'vit' is not a text model"):
        build_text_encoder(str(vit))
    untokenized = tmp_path / "untokenized"
    shutil.copytree(folders["bert"], untokenized)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (untokenized / f).unlink()
    with pytest.raises(ValueError, match="it holds no tokenizer vocabulary"):
        build_text_encoder(str(untokenized))
    with pytest.raises(ValueError, match="exceeds its 24 position embeddings; pass max_length <= 24"):
        build_text_encoder(str(folders["clip"]), max_length=30)
    with pytest.raises(ValueError, match="leaves no room beside its 2 special tokens"):
        build_text_encoder(str(folders["bert"]), max_length=2)
