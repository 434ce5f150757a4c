"""The one console entry point, `aligntok`. Parsing lives here; every subcommand calls a plain function."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable


def _assets_fetch(args: argparse.Namespace) -> None:
    from aligntok import assets

    names = assets.ASSETS if args.names == ["all"] or not args.names else args.names
    for name in names:
        path = assets.fetch(name, force=args.force)
        print(f"{name}: {path}")


def _assets_list(args: argparse.Namespace) -> None:
    from aligntok import assets

    for name, asset in assets.ASSETS.items():
        present = assets.is_present(name)
        where = assets.asset_dir(name) if present else "missing (aligntok assets fetch " + name + ")"
        print(f"{name:18s} {'yes' if present else 'no ':3s}  {asset.description}  [{where}]")


def _data_fetch(args: argparse.Namespace) -> None:
    from aligntok import data

    for name in args.names:
        print(f"{name}: {data.fetch_dataset(name, force=args.force)}")


def _data_shards(args: argparse.Namespace) -> None:
    from aligntok.data import write_shards

    write_shards(args.images, args.out, shard_size=args.shard_size)


def _tokenizer_train(args: argparse.Namespace) -> None:
    from aligntok.config import apply_overrides
    from aligntok.recipes.tokenizer import tokenizer_train_recipe
    from aligntok.train.tokenizer import train_tokenizer

    cfg = apply_overrides(tokenizer_train_recipe(args.recipe), args.set)
    train_tokenizer(cfg, out=args.out, stage=args.stage, resume=args.resume)


def _tokenizer_eval(args: argparse.Namespace) -> None:
    from aligntok.tokenizer_eval import evaluate_tokenizer

    evaluate_tokenizer(
        args.tokenizer,
        args.data,
        split=args.split,
        num=args.num,
        probe=not args.no_probe,
        batch_size=args.batch_size,
        bf16=args.bf16,
        out=args.out,
    )


def _tokenizer_score(args: argparse.Namespace) -> None:
    from aligntok.score import score_tokenizer

    score_tokenizer(args.tokenizer, args.data, out=args.out, budget=args.budget, seed=args.seed)


def _eval(args: argparse.Namespace) -> None:
    from aligntok.evaluate import evaluate

    evaluate(
        args.samples,
        args.ref,
        num=args.num,
        batch_size=args.batch_size,
        bf16=args.bf16,
        out=args.out,
        ref_split=args.ref_split,
    )


def _latents_cache(args: argparse.Namespace) -> None:
    from aligntok.data.latents import build_cache

    build_cache(
        tokenizer_dir=args.tokenizer,
        data=args.data,
        out=args.out,
        split=args.split,
        flip=args.flip,
        batch_size=args.batch_size,
        bf16=args.bf16,
    )


def _dit_train(args: argparse.Namespace) -> None:
    from aligntok.config import apply_overrides
    from aligntok.recipes.dit import dit_train_recipe
    from aligntok.train.dit import train_dit

    cfg = apply_overrides(dit_train_recipe(args.recipe), args.set)
    train_dit(cfg, latents=args.latents, out=args.out, resume=args.resume)


def _latents_captions(args: argparse.Namespace) -> None:
    from aligntok.data.captions import build_caption_cache

    path = build_caption_cache(args.latents, text_encoder=args.text_encoder, max_length=args.max_length)
    print(f"caption features at {path}")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    """The flags of a `SampleConfig` (`_sample_config` reads them back)."""
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--cfg", type=float, default=1.0, help="guidance scale (1 = no guidance)")
    p.add_argument(
        "--interval",
        type=float,
        nargs=2,
        default=[0.0, 1.0],
        metavar=("T_LO", "T_HI"),
        help="guidance acts for t in [T_LO, T_HI] (noise at t = 1)",
    )
    p.add_argument("--sampler", choices=["euler", "heun", "sde"], default="euler")
    p.add_argument("--shift", type=float, default=1.0, help="timestep shift (>1: more steps near noise)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true")


def _sample_config(args: argparse.Namespace):  # -> SampleConfig (imported lazily, as every command does)
    from aligntok.sampling import SampleConfig

    return SampleConfig(
        steps=args.steps,
        sampler=args.sampler,
        cfg_scale=args.cfg,
        interval=tuple(args.interval),
        shift=args.shift,
        seed=args.seed,
        bf16=args.bf16,
    )


def _dit_eval(args: argparse.Namespace) -> None:
    from aligntok.dit_eval import evaluate_dit

    evaluate_dit(args.dit, args.data, out=args.out, sample=_sample_config(args), num=args.num)


def _sample(args: argparse.Namespace) -> None:
    from aligntok.generate import generate

    sample = _sample_config(args)
    prompts = list(args.prompt)
    if args.prompts:
        prompts += _read_prompts(args.prompts)
    generate(
        dit_dir=args.dit,
        num=args.num,
        out=args.out,
        sample=sample,
        class_id=args.class_id,
        prompts=prompts or None,
        tokenizer_dir=args.tokenizer,
        batch_size=args.batch_size,
        guide_dir=args.guide,
    )


def _read_prompts(path: str) -> list[str]:
    """One prompt per line of a text file; blank lines are skipped (an empty prompt is --prompt "")."""
    with open(path, encoding="utf-8") as f:
        prompts = [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {path} holds no prompt; write one per line")
    return prompts


def _demo(args: argparse.Namespace) -> None:
    from aligntok.demo import run_demo

    run_demo(args.preset, args.out or f"runs/demo-{args.preset}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aligntok",
        description=__doc__,
        epilog="--debug (anywhere on the line, or ALIGNTOK_DEBUG=1) shows the traceback of an error",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    assets_p = sub.add_parser("assets", help="offline weights: fetch, verify, list")
    assets_sub = assets_p.add_subparsers(dest="action", required=True)
    p = assets_sub.add_parser("fetch", help="fetch and verify assets (default: all)")
    p.add_argument("names", nargs="*", default=["all"], metavar="NAME")
    p.add_argument("--force", action="store_true", help="fetch again even if present")
    p.set_defaults(func=_assets_fetch)
    p = assets_sub.add_parser("list", help="show which assets are present")
    p.set_defaults(func=_assets_list)

    data_p = sub.add_parser("data", help="datasets: fetch and prepare, write shards")
    data_sub = data_p.add_subparsers(dest="action", required=True)
    p = data_sub.add_parser("fetch", help="fetch and prepare a dataset")
    p.add_argument("names", nargs="+", metavar="NAME", help="emoji | fashion-mnist")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=_data_fetch)
    p = data_sub.add_parser(
        "shards", help="write an image folder as WebDataset shards (image, caption, label)"
    )
    p.add_argument(
        "--images", required=True, help="an image folder (one subfolder per class, captions.jsonl)"
    )
    p.add_argument("--out", required=True, help="the shard folder to write (use it wherever a dataset goes)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    p.set_defaults(func=_data_shards)

    p = sub.add_parser("tokenizer", help="train, evaluate and score tokenizers")
    tok_sub = p.add_subparsers(dest="action", required=True)
    p = tok_sub.add_parser("train", help="three-stage alignment training (or a baseline recipe)")
    p.add_argument(
        "--recipe",
        required=True,
        help="<base>[-<variant>]: base debug|emoji|emoji32|fashion|paper, "
        "variant stage1|wsp0|vae|vavae (default: the AlignTok three stages)",
    )
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--stage", default="all", help="a stage name of the recipe (1, 2, 3) or all")
    p.add_argument("--resume", action="store_true")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe field, e.g. batch_size=8, stages.1.sp_weight=3, data=/path/to/images",
    )
    p.set_defaults(func=_tokenizer_train)
    p = tok_sub.add_parser("eval", help="rFID, PSNR, SSIM, LPIPS, linear probe, k-NN, CKNNA -> JSON")
    p.add_argument("--tokenizer", required=True, help="a tokenizer export directory")
    p.add_argument("--data", required=True, help="emoji | fashion-mnist | an image folder")
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--num", type=int, default=None, help="cap on images per split (a seeded subset)")
    p.add_argument("--no-probe", action="store_true", help="reconstruction metrics only")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--out", default=None, help="JSON path (default: beside the tokenizer, report/)")
    p.set_defaults(func=_tokenizer_eval)
    p = tok_sub.add_parser(
        "score", help="cheap diffusability signal: probe + CKNNA + gFID of a small fixed DiT"
    )
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="work directory (resumable)")
    p.add_argument("--budget", choices=["small", "debug"], default="small")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_tokenizer_score)

    p = sub.add_parser("latents", help="latent cache of a dataset under a tokenizer")
    lat_sub = p.add_subparsers(dest="action", required=True)
    p = lat_sub.add_parser(
        "cache", help="encode a dataset into sharded safetensors (resumable, torchrun-aware)"
    )
    p.add_argument("--tokenizer", required=True, help="a tokenizer export directory")
    p.add_argument("--data", required=True, help="emoji | fashion-mnist | an image folder")
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="train", choices=["train", "val"])
    p.add_argument("--flip", action="store_true", help="also cache horizontally mirrored copies")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--bf16", action="store_true")
    p.set_defaults(func=_latents_cache)
    p = lat_sub.add_parser(
        "captions",
        help="encode a latent cache's captions with a text encoder (done by text DiT training too)",
    )
    p.add_argument("--latents", required=True, help="a latent cache directory")
    p.add_argument("--text-encoder", default="minilm", help="minilm | a local transformers text-model folder")
    p.add_argument("--max-length", type=int, default=None, help="token limit (default: the encoder's)")
    p.set_defaults(func=_latents_captions)

    p = sub.add_parser("dit", help="diffusion transformer on a latent cache")
    dit_sub = p.add_subparsers(dest="action", required=True)
    p = dit_sub.add_parser("train", help="flow-matching training (exact resume)")
    p.add_argument(
        "--recipe",
        required=True,
        help="debug | emoji | fashion | paper; text: t2i-debug | t2i-emoji | t2i-paper",
    )
    p.add_argument("--latents", required=True, help="a latent cache directory")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    p.set_defaults(func=_dit_train)
    p = dit_sub.add_parser(
        "eval", help="FID and adherence of a DiT's samples beside real validation images (docs/text.md)"
    )
    p.add_argument("--dit", required=True, help="a DiT export directory (class or text)")
    p.add_argument("--data", required=True, help="the dataset it was trained on (its val split is used)")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--num",
        type=int,
        default=None,
        help="text: val captions (default all); class: samples (default 1000)",
    )
    _sampling_args(p)
    p.set_defaults(func=_dit_eval)

    p = sub.add_parser("sample", help="sample images from a trained DiT")
    p.add_argument("--dit", required=True, help="a DiT export directory")
    p.add_argument(
        "--num", type=int, default=1, help="images (class DiT) or images per prompt (text DiT); default 1"
    )
    p.add_argument("--out", required=True)
    _sampling_args(p)
    p.add_argument("--class", dest="class_id", type=int, default=None, help="one class (default: balanced)")
    p.add_argument(
        "--prompt", action="append", default=[], help='text DiT: a prompt (repeatable; "" = unconditional)'
    )
    p.add_argument("--prompts", default=None, help="text DiT: a file of prompts, one per line")
    p.add_argument("--tokenizer", default=None, help="tokenizer export (default: the one the DiT recorded)")
    p.add_argument("--guide", default=None, help="autoguidance: a weaker DiT export guiding this one")
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(func=_sample)

    p = sub.add_parser("eval", help="FID, KID, IS, precision/recall of samples against a reference -> JSON")
    p.add_argument("--samples", required=True, help="a folder of images or an ADM-format .npz (arr_0)")
    p.add_argument("--ref", required=True, help="emoji | fashion-mnist | an image folder | a reference .npz")
    p.add_argument("--ref-split", default="train", choices=["train", "val"])
    p.add_argument(
        "--num", type=int, default=None, help="use the first N samples (the whole reference is used)"
    )
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument(
        "--bf16", action="store_true", help="bf16 Inception (see docs/metrics.md for its FID cost)"
    )
    p.add_argument("--out", default=None, help="JSON path (default: metrics.json beside the samples)")
    p.set_defaults(func=_eval)

    p = sub.add_parser("demo", help="the main job end to end, with a report")
    p.add_argument(
        "--preset",
        choices=["quick", "full", "debug", "t2i", "t2i-debug"],
        default="quick",
        help="quick: within 20 min on 2 CPU cores; full: about an hour; t2i: text-to-image on the quick "
        "tokenizer (docs/text.md); debug, t2i-debug: seconds (smoke tests)",
    )
    p.add_argument("--out", default=None, help="run directory (default: runs/demo-<preset>); reruns resume")
    p.set_defaults(func=_demo)
    return parser


def _one_line(e: BaseException) -> str:
    """An ordinary failure as the single line the user sees."""
    if isinstance(e, OSError) and e.strerror:
        where = f": {e.filename}" if e.filename else ""
        return f"{e.strerror}{where}"
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def main(argv: list[str] | None = None) -> None:
    # Offline by construction: no code path may reach a model hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or bool(os.environ.get("ALIGNTOK_DEBUG"))
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("aligntok: interrupted; rerun the same command to continue where it stopped", file=sys.stderr)
        sys.exit(130)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        # User errors end with one line naming the fix; internal bugs (asserts, TypeErrors) keep tracebacks.
        if debug:
            raise
        print(f"aligntok: error: {_one_line(e)}", file=sys.stderr)
        sys.exit(1)
    finally:
        # Under torchrun, leave the process group cleanly (NCCL warns about a group never destroyed).
        if "aligntok.distributed" in sys.modules:
            sys.modules["aligntok.distributed"].shutdown()
