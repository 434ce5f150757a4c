from dataclasses import dataclass, field

import pytest

from aligntok.config import apply_overrides, from_dict, load_json, save_json, to_dict


@dataclass(kw_only=True)
class Inner:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    name: str | None = None


@dataclass(kw_only=True)
class Outer:
    steps: int = 10
    bf16: bool = False
    inner: Inner = field(default_factory=Inner)


def test_overrides_parse_and_coerce() -> None:
    cfg = apply_overrides(Outer(), ["steps=20", "inner.lr=3e-4", "inner.betas=[0.9,0.95]", "bf16=true"])
    assert cfg.steps == 20 and cfg.bf16 is True
    assert cfg.inner.lr == pytest.approx(3e-4) and cfg.inner.betas == (0.9, 0.95)
    assert apply_overrides(Outer(), ["inner.name=dinov2"]).inner.name == "dinov2"
    assert apply_overrides(Outer(), ["inner.lr=1"]).inner.lr == 1.0  # int widened to float


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stepz=1", "no field 'stepz'"),
        ("steps=abc", "expected int"),
        ("steps", "key.path=value"),
        ("bf16=1", "true/false"),
        ("steps.x=1", "not a config section"),
    ],
)
def test_bad_overrides_name_the_problem(override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        apply_overrides(Outer(), [override])


@dataclass(kw_only=True)
class WithSections:
    stages: tuple[Inner, ...] = (Inner(), Inner(lr=2.0))


def test_sequence_of_sections_by_index() -> None:
    cfg = apply_overrides(WithSections(), ["stages.1.lr=3.0", "stages.0.name=a"])
    assert cfg.stages[1].lr == 3.0 and cfg.stages[0].name == "a" and isinstance(cfg.stages, tuple)
    with pytest.raises(ValueError, match="not an index"):
        apply_overrides(WithSections(), ["stages.2.lr=1"])
    with pytest.raises(ValueError, match="set a field of item"):
        apply_overrides(WithSections(), ["stages.0=1"])


def test_json_round_trip(tmp_path) -> None:
    cfg = apply_overrides(Outer(), ["inner.betas=[0.5,0.6]", "steps=3"])
    save_json(cfg, tmp_path / "c.json")
    assert load_json(Outer, tmp_path / "c.json") == cfg
    with pytest.raises(ValueError, match="unknown Outer field"):
        from_dict(Outer, {**to_dict(cfg), "extra": 1})
