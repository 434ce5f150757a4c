"""Text-to-image end to end on the debug recipes: captions -> caption features -> MMDiT training ->
sampling from prompts, and the contracts of the text condition (dropout trains the null text, the empty
prompt is the unconditional model, guidance scale 1 is the conditional model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from aligntok import dit_eval, flow, sampling
from aligntok.assets import is_present
from aligntok.cli import main
from aligntok.config import apply_overrides
from aligntok.data.captions import CaptionCache, caption_cache_dir
from aligntok.data.latents import LatentCache, build_cache
from aligntok.exports import load_dit
from aligntok.generate import encode_prompts, generate, null_condition, sample_latents
from aligntok.models.mmdit import MMDiT
from aligntok.recipes.dit import dit_train_recipe
from aligntok.sampling import SampleConfig
from aligntok.train.dit import Conditions, draw_step_noise, flow_matching_loss, train_dit
from conftest import make_image_folder, slow_fixture

pytestmark = pytest.mark.skipif(
    not is_present("minilm"), reason="the minilm asset is not fetched (aligntok assets fetch minilm)"
)

CAPTIONS = {"red": "a red square on white", "blue": "a blue disc on white"}


def _t2i_cfg(**kw):
    sets = {"steps": 12, "batch_size": 8, "log_every": 4, **kw}
    return apply_overrides(dit_train_recipe("t2i-debug"), [f"{k}={json.dumps(v)}" for k, v in sets.items()])


@slow_fixture(scope="module")
def t2i(tmp_path_factory, debug_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("t2i")
    data = make_image_folder(root / "images", per_class=4)
    lines = [
        {"file": f"{cls}/{i}.png", "caption": f"{CAPTIONS[cls]}, number {i}"}
        for cls in CAPTIONS
        for i in range(4)
    ]
    (data / "captions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    cache = build_cache(
        tokenizer_dir=debug_tokenizer, data=str(data), out=root / "cache", flip=True, shard_size=5
    )
    export = train_dit(_t2i_cfg(), latents=cache, out=root / "dit")
    return {"root": root, "cache": cache, "export": export, "data": data}


def test_text_run_records_its_encoder_and_trains_an_mmdit(t2i) -> None:
    dit = load_dit(t2i["export"])
    assert isinstance(dit.model, MMDiT)
    assert dit.text["encoder"] == "minilm" and dit.text["identity"]["dim"] == dit.model.config.text_dim
    captions = CaptionCache.load(caption_cache_dir(t2i["cache"], "minilm"))
    assert dit.text["identity"] == captions.identity["text_encoder"]
    # The mirrored copy of an image is conditioned on the same caption as the image itself.
    cache_captions = LatentCache.load(t2i["cache"]).captions
    assert len(set(cache_captions)) == 8 and len(cache_captions) == 16


def test_sample_from_prompts_writes_one_png_per_prompt(t2i, tmp_path) -> None:
    prompts = ["a red square on white", "a blue disc on white", ""]
    out = generate(
        dit_dir=t2i["export"], num=1, prompts=prompts, out=tmp_path / "s", sample=SampleConfig(steps=3)
    )
    rows = [json.loads(x) for x in (out / "prompts.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == prompts
    assert all((out / r["file"]).is_file() for r in rows)
    assert np.load(out / "samples.npz")["arr_0"].shape[0] == 3
    assert json.loads((out / "sampling.json").read_text())["prompts"] == prompts


def test_sample_cli_reads_prompt_files_and_refuses_the_wrong_condition(t2i, tmp_path, capsys) -> None:
    (tmp_path / "p.txt").write_text("a red square on white\n\na blue disc on white\n")
    out = tmp_path / "cli"
    main(["sample", "--dit", str(t2i["export"]), "--prompts", str(tmp_path / "p.txt"), "--num", "2",
          "--steps", "2", "--cfg", "2", "--out", str(out)])  # fmt: skip
    assert len(list((out / "images").glob("*.png"))) == 4
    with pytest.raises(SystemExit):
        main(["sample", "--dit", str(t2i["export"]), "--out", str(tmp_path / "none"), "--steps", "2"])
    assert "text-conditioned" in capsys.readouterr().err


def _shape(model: MMDiT) -> tuple[int, int, int]:
    return model.config.in_channels, model.config.input_size, model.config.input_size


def _cond(t2i, prompts: list[str]) -> dict[str, torch.Tensor]:
    return encode_prompts(load_dit(t2i["export"]), prompts, torch.device("cpu"))


def test_empty_prompt_is_the_unconditional_model(t2i) -> None:
    dit = load_dit(t2i["export"])
    torch.manual_seed(0)
    for p in dit.model.parameters():  # trained for a few steps only: make every weight matter
        p.data.add_(0.05 * torch.randn_like(p))
    empty, other = _cond(t2i, [""]), _cond(t2i, ["a red square on white"])
    z, t = torch.randn(1, *_shape(dit.model)), torch.tensor([0.5])
    v_empty = dit.model(z, t, empty)
    torch.testing.assert_close(v_empty, dit.model(z, t, null_condition(dit, other)))
    assert not torch.allclose(v_empty, dit.model(z, t, other))


def test_guidance_scale_1_is_the_conditional_model(t2i) -> None:
    dit = load_dit(t2i["export"])
    cond = _cond(t2i, ["a red square on white", "a blue disc on white"])
    s = SampleConfig(steps=3, cfg_scale=1.0)
    guided = sample_latents(dit, cond, s, generator=torch.Generator().manual_seed(3))
    z1 = torch.randn((2, *_shape(dit.model)), generator=torch.Generator().manual_seed(3))
    plain = sampling.euler(lambda z, t: dit.model(z, t, cond), z1, flow.timesteps(3))
    torch.testing.assert_close(guided, plain * dit.std.view(1, -1, 1, 1) + dit.mean.view(1, -1, 1, 1))
    strong = sample_latents(
        dit, cond, SampleConfig(steps=3, cfg_scale=4.0), generator=torch.Generator().manual_seed(3)
    )
    assert not torch.allclose(guided, strong)


def test_caption_dropout_trains_the_learned_null_text(t2i) -> None:
    """A dropped caption's loss is the null text's, whatever the caption was, and its gradient reaches
    the null text's parameters; a kept caption's gradient does not."""
    cfg = _t2i_cfg()
    cond_obj = Conditions(cfg, LatentCache.load(t2i["cache"]))
    model = load_dit(t2i["export"]).model.train()
    idx_a, idx_b = torch.tensor([0, 1]), torch.tensor([6, 9])
    z0 = torch.randn(2, *_shape(model))
    _, t, eps = draw_step_noise(torch.Generator().manual_seed(0), cfg, tuple(z0.shape), torch.device("cpu"))

    def loss(idx: torch.Tensor, drop: bool) -> torch.Tensor:
        model.zero_grad()
        noise = (torch.full((2,), drop), t, eps)
        value = flow_matching_loss(
            model, z0, cond_obj.batch(idx, torch.device("cpu")), noise, cfg, null_class=0
        )
        value.backward()
        return value.detach()

    dropped_a, dropped_b = loss(idx_a, True), loss(idx_b, True)
    assert dropped_a == dropped_b
    assert model.null_tokens.grad is not None and model.null_tokens.grad.abs().sum() > 0
    kept = loss(idx_a, False)
    assert kept != dropped_a
    assert model.null_tokens.grad is None or model.null_tokens.grad.abs().sum() == 0


def test_resume_refuses_other_captions(t2i, tmp_path) -> None:
    run = tmp_path / "run"
    train_dit(_t2i_cfg(steps=4, ckpt_every=2), latents=t2i["cache"], out=run)
    with pytest.raises(ValueError, match="differs"):
        train_dit(
            _t2i_cfg(steps=6, ckpt_every=2, text_max_length=4), latents=t2i["cache"], out=run, resume=True
        )


@pytest.mark.skipif(not is_present("efficientnet-lite0"), reason="needs the efficientnet-lite0 asset")
def test_dit_eval_scores_samples_beside_real_validation_images(
    t2i, tmp_path, monkeypatch, stub_inception
) -> None:
    """`aligntok dit eval` on a text DiT: FID and both adherence measures of the samples, and the same
    measures on the real images (the ceilings; the real images retrieve their own captions best)."""
    monkeypatch.setattr(dit_eval, "adherence_dir", lambda: tmp_path / "adherence")
    monkeypatch.setattr(dit_eval, "CONTRASTIVE", {**dit_eval.CONTRASTIVE, "steps": 200})
    out = tmp_path / "eval"
    args = ["--dit", str(t2i["export"]), "--data", str(t2i["data"]), "--steps", "2", "--cfg", "2"]
    main(["dit", "eval", *args, "--out", str(out)])
    result = json.loads((out / "eval.json").read_text())
    samples, real = result["samples"], result["ceilings"]
    assert samples["num"] == real["num"] == 8  # the folder serves every split: 8 captioned images
    for key in ("fid", "category_accuracy", "retrieval_top1", "retrieval_top5"):
        assert np.isfinite(samples[key]) and np.isfinite(real[key] if key != "fid" else real["fid_floor"])
    assert real["category_accuracy"] == 1.0  # red squares and blue discs: the classifier separates them
    assert real["retrieval_top5"] >= real["retrieval_top1"] > 1 / 8  # above chance among the 8 captions
    assert samples["models"]["contrastive"]["data"]["text_encoder"]["name"] == "minilm"
    assert len(list((tmp_path / "adherence").iterdir())) == 2  # the two models, cached
