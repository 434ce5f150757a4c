"""The command line: one-line errors that name the fix, and the diffusion commands end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from aligntok.cli import main
from aligntok.models.tokenizer import Tokenizer
from aligntok.recipes.tokenizer import tokenizer_preset


def _error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, f"expected one line, got: {err}"
    return err


def test_errors_are_one_line_and_name_the_fix(capsys, tmp_path) -> None:
    assert "known" in _error(capsys, ["data", "fetch", "imagenet"])
    assert "known" in _error(capsys, ["assets", "fetch", "no-such-asset"])
    assert "model.safetensors" in _error(
        capsys,
        ["latents", "cache", "--tokenizer", str(tmp_path), "--data", "emoji", "--out", str(tmp_path / "c")],
    )
    tok = Tokenizer(tokenizer_preset("debug")).save_pretrained(tmp_path / "tok")
    assert "neither a dataset name" in _error(
        capsys,
        [
            "latents",
            "cache",
            "--tokenizer",
            str(tok),
            "--data",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "c"),
        ],
    )
    assert "model.safetensors" in _error(
        capsys, ["sample", "--dit", str(tmp_path / "missing"), "--num", "1", "--out", str(tmp_path / "s")]
    )
    assert "unknown DiT recipe" in _error(
        capsys, ["dit", "train", "--recipe", "huge", "--latents", str(tmp_path), "--out", str(tmp_path / "r")]
    )
    assert "--set" in _error(
        capsys,
        [
            "dit",
            "train",
            "--recipe",
            "debug",
            "--set",
            "stepz=3",
            "--latents",
            str(tmp_path),
            "--out",
            str(tmp_path / "r"),
        ],
    )


def test_unknown_encoder_name_is_one_line(capsys, tmp_path) -> None:
    tok = Tokenizer(tokenizer_preset("debug")).save_pretrained(tmp_path / "tok")
    doc = json.loads((tok / "config.json").read_text())
    doc["config"]["encoder"]["name"] = "resnet-9000"
    (tok / "config.json").write_text(json.dumps(doc))
    err = _error(
        capsys, ["latents", "cache", "--tokenizer", str(tok), "--data", "emoji", "--out", str(tmp_path / "c")]
    )
    assert "resnet-9000" in err and "efficientnet-lite0" in err


def test_assets_list_shows_every_asset(capsys) -> None:
    from aligntok.assets import ASSETS

    main(["assets", "list"])
    out = capsys.readouterr().out
    assert all(name in out for name in ASSETS)


def test_cache_train_sample_from_the_command_line(tmp_path, capsys, image_folder, debug_tokenizer) -> None:
    tok = debug_tokenizer
    main(
        [
            "latents",
            "cache",
            "--tokenizer",
            str(tok),
            "--data",
            str(image_folder),
            "--out",
            str(tmp_path / "lat"),
            "--flip",
        ]
    )
    main(
        [
            "dit",
            "train",
            "--recipe",
            "debug",
            "--latents",
            str(tmp_path / "lat"),
            "--out",
            str(tmp_path / "run"),
            "--set",
            "steps=6",
            "--set",
            "batch_size=4",
        ]
    )
    main(
        [
            "sample",
            "--dit",
            str(tmp_path / "run" / "export"),
            "--num",
            "4",
            "--steps",
            "2",
            "--cfg",
            "1.5",
            "--interval",
            "0",
            "0.9",
            "--sampler",
            "heun",
            "--out",
            str(tmp_path / "s"),
        ]
    )
    arr = np.load(tmp_path / "s" / "samples.npz")["arr_0"]
    assert arr.shape == (4, 32, 32, 3)
    assert json.loads((tmp_path / "s" / "sampling.json").read_text())["interval"] == [0.0, 0.9]
    assert "samples written to" in capsys.readouterr().out
