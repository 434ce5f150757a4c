"""Tokenizer: preset shapes, export round trip, strict loading, latent statistics, gradients."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from aligntok import assets
from aligntok.checkpoint import export_hash, load_export, save_export
from aligntok.config import apply_overrides
from aligntok.models.decoder import Decoder, DecoderConfig
from aligntok.models.encoders import EncoderConfig
from aligntok.models.tokenizer import Tokenizer, TokenizerConfig
from aligntok.recipes.tokenizer import TOKENIZER_PRESETS, tokenizer_preset

TINY_DINOV2 = {
    "model_type": "dinov2",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "mlp_ratio": 2,
    "patch_size": 14,
    "image_size": 224,
}


def small_config(name: str, pretrained: bool = False) -> TokenizerConfig:
    """The preset with a tiny random ViT for `paper` (and a narrow decoder of the same shape), else as is;
    `pretrained` applies to the CNN presets (the paper preset has no weights folder here)."""
    cfg = tokenizer_preset(name)
    enc = dataclasses.replace(cfg.encoder, pretrained=pretrained)
    if name == "paper":
        enc = dataclasses.replace(enc, hf_config=dict(TINY_DINOV2))
        dec = dataclasses.replace(cfg.decoder, ch=32, num_res_blocks=1)
        cfg = dataclasses.replace(cfg, adapter_hidden=16, decoder=dec)
    return dataclasses.replace(cfg, encoder=enc)


def images(cfg: TokenizerConfig, n: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, cfg.image_size, cfg.image_size, generator=g)


def test_paper_decoder_has_about_42m_parameters():
    cfg = tokenizer_preset("paper")
    with torch.device("meta"):
        decoder = Decoder(cfg.decoder, latent_size=16, latent_channels=cfg.latent_channels)
    n = sum(p.numel() for p in decoder.parameters())
    assert 40e6 <= n <= 45e6, n
    assert decoder.output_size == 256 and decoder.last_layer is decoder.conv_out.weight


@pytest.mark.parametrize("name", sorted(TOKENIZER_PRESETS))
def test_preset_shapes(name):
    cfg = small_config(name)
    tok = Tokenizer(cfg).eval()
    x = images(cfg, n=1 if name == "paper" else 2)  # 256 px decoding is the slow part
    with torch.no_grad():
        z = tok.encode(x)
        recon = tok.decode(z)
    C, h, w = tok.latent_shape
    assert z.shape == (len(x), C, h, w) and cfg.latent_channels == C
    assert h * 2 ** (len(cfg.decoder.ch_mult) - 1) == cfg.image_size
    assert recon.shape == x.shape
    assert torch.isfinite(recon).all()


def test_preset_latent_grids():
    expected = {
        "paper": (32, 16, 16),
        "emoji": (16, 8, 8),
        "fashion": (8, 8, 8),
        "emoji32": (8, 8, 8),
        "debug": (4, 4, 4),
    }
    assert set(expected) == set(TOKENIZER_PRESETS)
    for name, shape in expected.items():
        with torch.device("meta"):
            tok = Tokenizer(small_config(name))
        assert tok.latent_shape == shape, name


def test_paper_preset_without_weights_folder_names_both_fixes():
    # No silent random ViT: the preset asks for DINOv2-L weights and there is no folder to read them from.
    with pytest.raises(ValueError) as info:
        Tokenizer(tokenizer_preset("paper"))
    message = str(info.value)
    assert "\n" not in message
    assert "--set encoder.path=/local/transformers/folder" in message
    assert "--set encoder.pretrained=false" in message
    random_init = apply_overrides(tokenizer_preset("paper"), ["encoder.pretrained=false"])
    assert random_init.encoder.hf_config == tokenizer_preset("paper").encoder.hf_config


def test_unknown_preset_lists_names():
    with pytest.raises(ValueError, match=r"unknown tokenizer preset 'nope'.*debug.*emoji.*fashion.*paper"):
        tokenizer_preset("nope")


def _perturb_encoder(tok: Tokenizer) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in tok.param_groups()["encoder"]:
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize(("name", "pretrained"), [("debug", True), ("paper", False)])
def test_save_load_round_trip_is_exact(tmp_path, name, pretrained):
    cfg = small_config(name, pretrained=pretrained)
    tok = Tokenizer(cfg).eval()
    x = images(cfg, n=2 if name == "debug" else 1)
    with torch.no_grad():
        z_before = tok.encode(x)
        _perturb_encoder(tok)  # stands in for stage 2 fine-tuning: the export must carry the encoder
        z = tok.encode(x)
        assert not torch.equal(z, z_before)
        tok.set_latent_stats(z.mean(dim=(0, 2, 3)), z.std(dim=(0, 2, 3)))
        recon = tok.decode(z)

    tok.save_pretrained(tmp_path / "a")
    assert tok.config == cfg  # saving does not touch the in-memory config
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["config.json", "model.safetensors"]
    loaded = Tokenizer.from_pretrained(tmp_path / "a").eval()
    assert loaded.config == tok.export_config()
    assert loaded.config.encoder.pretrained is False
    assert dataclasses.replace(loaded.config, encoder=cfg.encoder) == cfg  # only the encoder is resolved
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), z)
        assert torch.equal(loaded.decode(z), recon)
    assert torch.equal(loaded.latent_mean, tok.latent_mean) and torch.equal(loaded.latent_std, tok.latent_std)
    assert not torch.equal(loaded.latent_std, torch.ones_like(loaded.latent_std))

    # The same weights and config give the same bytes, hence the same hash; other stats another hash.
    loaded.save_pretrained(tmp_path / "b")
    assert export_hash(tmp_path / "a") == export_hash(tmp_path / "b")
    loaded.set_latent_stats(loaded.latent_mean + 1, loaded.latent_std)
    loaded.save_pretrained(tmp_path / "b")
    assert export_hash(tmp_path / "a") != export_hash(tmp_path / "b")


def test_loading_reads_no_asset(tmp_path, monkeypatch):
    if not assets.is_present("efficientnet-lite0"):
        pytest.skip("asset efficientnet-lite0 not fetched; run `aligntok assets fetch efficientnet-lite0`")
    cfg = small_config("debug", pretrained=True)
    tok = Tokenizer(cfg).eval()
    tok.save_pretrained(tmp_path / "t")
    new = json.loads((tmp_path / "t" / "config.json").read_text())
    assert new["config"]["encoder"]["pretrained"] is False
    # An export written before exports were resolved said pretrained=True: it must load all the same.
    old = json.loads(json.dumps(new))
    old["config"]["encoder"]["pretrained"] = True
    monkeypatch.setenv("ALIGNTOK_HOME", str(tmp_path / "empty-cache"))
    assert not assets.is_present("efficientnet-lite0")
    x = images(cfg)
    for doc in (new, old):
        (tmp_path / "t" / "config.json").write_text(json.dumps(doc))
        loaded = Tokenizer.from_pretrained(tmp_path / "t").eval()
        with torch.no_grad():
            assert torch.equal(loaded.encode(x), tok.encode(x))


# A checkpoint preprocessing unlike every family default: mean/std, and 32 px where the model was made at 64.
PREPROCESSOR = {
    "image_mean": [0.2, 0.3, 0.4],
    "image_std": [0.3, 0.35, 0.4],
    "size": {"height": 32, "width": 32},
    "do_center_crop": False,
}


@pytest.mark.parametrize("family", ["dinov2", "clip"])
def test_export_of_a_folder_encoder_is_self_contained(tmp_path, family):
    import transformers as T

    vit = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=8)
    torch.manual_seed(0)
    if family == "dinov2":
        model = T.Dinov2Model(T.Dinov2Config(**vit, image_size=64))
    else:
        model = T.CLIPVisionModel(T.CLIPVisionConfig(**vit, image_size=64))
    folder = tmp_path / "weights"
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    cfg = TokenizerConfig(
        image_size=16,  # fed to the encoder at 32 px: a 4x4 grid, decoded x4
        encoder=EncoderConfig(name=family, path=str(folder)),
        adapter_hidden=16,
        latent_channels=4,
        decoder=DecoderConfig(ch=32, ch_mult=(1, 1, 1), num_res_blocks=1),
    )
    tok = Tokenizer(cfg).eval()
    assert tok.encoder.input_size == 32 and list(tok.encoder.mean) == PREPROCESSOR["image_mean"]
    _perturb_encoder(tok)  # a stage-2 fine-tuned encoder: the export's weights, not the folder's, count
    x = images(cfg)
    with torch.no_grad():
        z = tok.encode(x)
        recon = tok.decode(z)
    tok.save_pretrained(tmp_path / "a")
    assert tok.config == cfg
    shutil.rmtree(folder)

    enc = json.loads((tmp_path / "a" / "config.json").read_text())["config"]["encoder"]
    assert enc["path"] is None and enc["pretrained"] is False and enc["input_size"] == 32
    assert enc["mean"] == PREPROCESSOR["image_mean"] and enc["std"] == PREPROCESSOR["image_std"]
    loaded = Tokenizer.from_pretrained(tmp_path / "a").eval()
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), z)
        assert torch.equal(loaded.decode(z), recon)
    loaded.save_pretrained(tmp_path / "b")  # the resolved config resolves to itself
    assert export_hash(tmp_path / "a") == export_hash(tmp_path / "b")


def test_export_config_document(tmp_path):
    tok = Tokenizer(small_config("debug"))
    tok.save_pretrained(tmp_path, extra_meta={"stage": 3})
    doc = json.loads((tmp_path / "config.json").read_text())
    assert doc["kind"] == "tokenizer" and doc["latent_shape"] == [4, 4, 4]
    assert doc["meta"]["stage"] == 3 and "aligntok_version" in doc["meta"]
    assert doc["config"]["decoder"]["ch_mult"] == [1, 1, 2, 2]
    state, doc2 = load_export(tmp_path)
    assert doc2 == doc
    assert set(state) == set(tok.state_dict())
    assert {"latent_mean", "latent_std"} <= set(state)


def test_generic_export_refuses_meta_key(tmp_path):
    with pytest.raises(ValueError, match="'meta'"):
        save_export(tmp_path, torch.nn.Linear(2, 2), {"kind": "x", "meta": {}})


def _edit_weights(directory, edit) -> None:
    path = directory / "model.safetensors"
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop("decoder.conv_out.bias"), r"missing keys: decoder\.conv_out\.bias"),
        (lambda s: s.update(extra=torch.zeros(1)), r"unexpected keys: extra"),
        (lambda s: s.update(latent_mean=torch.zeros(5)), r"wrong shapes: latent_mean \(5,\) vs model \(4,\)"),
    ],
)
def test_strict_load_refuses_mismatched_weights(tmp_path, edit, message):
    Tokenizer(small_config("debug")).save_pretrained(tmp_path)
    _edit_weights(tmp_path, edit)
    with pytest.raises(ValueError, match=message) as info:
        Tokenizer.from_pretrained(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_bad_export_dirs_raise_clear_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match=r"nope: no such directory.*model\.safetensors \+ config\.json"):
        Tokenizer.from_pretrained(missing)
    Tokenizer(small_config("debug")).save_pretrained(tmp_path / "t")
    (tmp_path / "t" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        Tokenizer.from_pretrained(tmp_path / "t")
    (tmp_path / "t" / "config.json").write_text(json.dumps({"kind": "dit", "config": {}}))
    with pytest.raises(ValueError, match=r"kind='dit', not 'tokenizer'"):
        Tokenizer.from_pretrained(tmp_path / "t")
    (tmp_path / "t" / "model.safetensors").write_bytes(b"garbage bytes")
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file"):
        Tokenizer.from_pretrained(tmp_path / "t")
    (tmp_path / "t" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"model\.safetensors is missing"):
        Tokenizer.from_pretrained(tmp_path / "t")


def test_config_validation():
    cfg = small_config("debug")
    bad_dec = dataclasses.replace(cfg.decoder, ch_mult=(1, 2, 2))  # x4 from 4x4 gives 16 px, not 32
    with pytest.raises(ValueError, match=r"4x4 grid at image_size=32.*x4 to 16 px.*use 4 decoder\.ch_mult"):
        Tokenizer(dataclasses.replace(cfg, decoder=bad_dec))
    # The decoder's input width is latent_channels: one field, no second copy to keep equal.
    with pytest.raises(ValueError, match=r"DecoderConfig has no field 'z_channels'"):
        apply_overrides(cfg, ["decoder.z_channels=8"])
    tok = Tokenizer(apply_overrides(cfg, ["latent_channels=8"]))
    assert tok.latent_shape == (8, 4, 4) and tok.decoder.conv_in.in_channels == 8
    with pytest.raises(ValueError, match=r"adapter_act='tanh'"):
        dataclasses.replace(cfg, adapter_act="tanh")
    with pytest.raises(ValueError, match=r"multiples of 32"):
        DecoderConfig(ch=48, ch_mult=(1,), num_res_blocks=1)
    tok = Tokenizer(cfg)
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\).*got \(1, 3, 64, 64\)"):
        tok.encode(torch.rand(1, 3, 64, 64))


def test_normalize_standardises_and_inverts():
    tok = Tokenizer(small_config("debug"))
    g = torch.Generator().manual_seed(0)
    scale, shift = torch.rand(4, generator=g) * 3 + 0.5, torch.randn(4, generator=g) * 2
    z = torch.randn(64, 4, 4, 4, generator=g) * scale[:, None, None] + shift[:, None, None]
    tok.set_latent_stats(z.mean(dim=(0, 2, 3)), z.std(dim=(0, 2, 3)))
    n = tok.normalize(z)
    torch.testing.assert_close(n.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(n.std(dim=(0, 2, 3)), torch.ones(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(tok.denormalize(n), z, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        tok.set_latent_stats(torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="std > 0"):
        tok.set_latent_stats(torch.zeros(4), torch.zeros(4))


def test_gradients_and_param_groups():
    tok = Tokenizer(small_config("debug")).train()
    groups = tok.param_groups()
    ids = [id(p) for g in groups.values() for p in g]
    assert len(ids) == len(set(ids))  # disjoint
    assert set(ids) <= {id(p) for p in tok.parameters()}
    assert {id(p) for p in groups["adapter"]} == {id(p) for p in tok.adapter.parameters()}
    # The encoder group is what the block-4 features use: block 4 in, the later blocks and head out.
    names = {id(p): n for n, p in tok.encoder.named_parameters()}
    in_group = {names[id(p)] for p in groups["encoder"]}
    assert any(n.startswith("net._blocks.4.") for n in in_group)
    assert not any(n.startswith(("net._blocks.5.", "net._conv_head", "net._fc")) for n in in_group)

    tok.set_trainable(encoder=False, adapter=True, decoder=True)  # stage 1
    recon, _ = tok(images(tok.config))
    recon.square().mean().backward()
    for part in ("adapter", "decoder"):
        for p in groups[part]:
            assert p.grad is not None and p.grad.abs().sum() > 0, part
    assert all(p.grad is None for p in groups["encoder"])

    tok.zero_grad(set_to_none=True)
    tok.set_trainable(encoder=True, adapter=True, decoder=False)  # encoder gradients flow when unfrozen
    z = tok.encode(images(tok.config))
    z.square().mean().backward()
    assert all(p.grad is not None for p in groups["encoder"])
    assert all(p.grad is None for p in groups["decoder"])


def test_decode_maps_to_unit_scale_without_clamping():
    tok = Tokenizer(small_config("debug")).eval()
    z = torch.randn(1, *tok.latent_shape)
    with torch.no_grad():
        tok.decoder.conv_out.bias.fill_(10.0)  # pushes the [-1, 1]-scale output far above 1
        raw = tok.decoder(z)
        recon = tok.decode(z)
    torch.testing.assert_close(recon, (raw + 1) / 2)
    assert recon.min() > 1.0  # a clamp would cut this to 1 and hide the error from the losses


# ---------------------------------------------------------------------------------------------------------
# Gaussian posterior (the VAE baselines), here on the from-scratch CNN encoder they use


def gaussian_config() -> TokenizerConfig:
    """Debug decoder; a 3-level CNN encoder (stride 8: a 4x4 grid at 32 px) with a Gaussian posterior."""
    arch = {"ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [4], "out_dim": 32}
    encoder = EncoderConfig(name="cnn", arch=arch, input_size=32, pretrained=False)
    return dataclasses.replace(small_config("debug"), encoder=encoder, posterior="gaussian")


def test_gaussian_posterior_encode_is_the_mean():
    torch.manual_seed(0)
    cfg = gaussian_config()
    tok = Tokenizer(cfg).eval()
    C = cfg.latent_channels
    assert tok.adapter.fc2.out_features == 2 * C and tok.latent_shape == (C, 4, 4)
    x = images(cfg)
    with torch.no_grad():
        mean, logvar = tok.encode_posterior(x)
        raw = tok.adapter(tok.encoder.features(x))  # (B, 2C, h, w): mean channels first, then logvar
        assert mean.shape == logvar.shape == (2, C, 4, 4)
        assert torch.equal(tok.encode(x), mean) and torch.equal(mean, raw[:, :C])
        assert torch.equal(logvar, raw[:, C:]) and not torch.equal(mean, logvar)
        tok.adapter.fc2.bias[C:] += 1e3  # the log-variance is clamped to LDM's [-30, 20]
        assert (tok.encode_posterior(x)[1] == 20.0).all()
        tok.adapter.fc2.bias[C:] -= 2e3
        assert (tok.encode_posterior(x)[1] == -30.0).all()
    with pytest.raises(ValueError, match=r"posterior=.gaussian.*deterministic"):
        Tokenizer(small_config("debug")).encode_posterior(x)
    with pytest.raises(ValueError, match="posterior='vq'"):
        dataclasses.replace(cfg, posterior="vq")


def test_gaussian_tokenizer_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    cfg = gaussian_config()
    tok = Tokenizer(cfg).eval()
    x = images(cfg)
    with torch.no_grad():
        mean, logvar = tok.encode_posterior(x)
        recon = tok.decode(mean)
    tok.save_pretrained(tmp_path / "a")
    doc = json.loads((tmp_path / "a" / "config.json").read_text())
    assert doc["config"]["posterior"] == "gaussian" and doc["latent_shape"] == [4, 4, 4]
    loaded = Tokenizer.from_pretrained(tmp_path / "a").eval()
    assert loaded.config == tok.export_config() and loaded.config.posterior == "gaussian"
    with torch.no_grad():
        m2, lv2 = loaded.encode_posterior(x)
        assert torch.equal(m2, mean) and torch.equal(lv2, logvar)
        assert torch.equal(loaded.decode(m2), recon)
    loaded.save_pretrained(tmp_path / "b")
    assert export_hash(tmp_path / "a") == export_hash(tmp_path / "b")


def test_exports_without_a_posterior_field_load_as_deterministic(tmp_path):
    tok = Tokenizer(small_config("debug")).eval()
    tok.save_pretrained(tmp_path)
    doc = json.loads((tmp_path / "config.json").read_text())
    assert doc["config"].pop("posterior") == "deterministic"  # exports written before the field existed
    (tmp_path / "config.json").write_text(json.dumps(doc))
    loaded = Tokenizer.from_pretrained(tmp_path)
    assert loaded.config.posterior == "deterministic" and loaded.adapter.fc2.out_features == 4


def test_exports_with_decoder_z_channels_load_when_it_equals_latent_channels(tmp_path):
    tok = Tokenizer(small_config("debug")).eval()
    tok.save_pretrained(tmp_path)
    doc = json.loads((tmp_path / "config.json").read_text())
    assert "z_channels" not in doc["config"]["decoder"]
    doc["config"]["decoder"]["z_channels"] = 4  # exports written when the decoder had its own copy
    (tmp_path / "config.json").write_text(json.dumps(doc))
    loaded = Tokenizer.from_pretrained(tmp_path).eval()
    x = images(loaded.config)
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], tok(x)[0])
    assert loaded.export_config() == tok.export_config()
    doc["config"]["decoder"]["z_channels"] = 8
    (tmp_path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"decoder\.z_channels=8 differs from latent_channels=4"):
        Tokenizer.from_pretrained(tmp_path)


def test_gaussian_tokenizer_gradients_reach_encoder_adapter_decoder():
    torch.manual_seed(0)
    tok = Tokenizer(gaussian_config()).train()
    tok.set_trainable(encoder=True, adapter=True, decoder=True)
    mean, logvar = tok.encode_posterior(images(tok.config))
    z = mean + torch.randn(mean.shape) * (0.5 * logvar).exp()
    tok.decode(z).square().mean().backward()
    for part, params in tok.param_groups().items():
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params), part
