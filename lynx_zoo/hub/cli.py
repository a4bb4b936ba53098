"""Commands of pretrained variants: ``export``, ``predict``/``chat`` (a question about an image or video),
``variants``, ``cards``, ``convert-lynx``.

``python -m lynx_zoo predict`` is this module's command when it is given ``--image`` or ``--video`` (a question
about a file); without them it is LightningCLI's ``predict`` (a DataModule's predict loop).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO

from lynx_zoo.fusion.base import LynxModel
from lynx_zoo.resources import config_path, shipped

HUB_COMMANDS = ("export", "chat", "variants", "cards", "convert-lynx")
PREDICT_FLAGS = ("--image", "--video")


def is_hub_command(argv: list[str]) -> bool:
    """Whether ``argv`` is one of these commands (``predict`` only with ``--image``/``--video``)."""
    if not argv:
        return False
    if argv[0] == "predict":
        return any(arg.split("=", 1)[0] in PREDICT_FLAGS for arg in argv[1:])
    return argv[0] in HUB_COMMANDS


def _model_args(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--variant", help="a variant name (lynx_zoo.list_variants()), folder, or hf://org/repo")
    source.add_argument("--ckpt", type=Path, help="a Lightning checkpoint of a lynx_zoo run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="the LLM's weight dtype (e.g. bfloat16); default as saved")
    parser.add_argument(
        "--preset", default="lynx", help="generation preset: lynx (the release: 5-beam sampling), lynx-beam, greedy"
    )
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampling (default: the preset's)")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--min-new-tokens", type=int, default=None)
    parser.add_argument("--num-beams", type=int, default=None)


def _media_args(parser: argparse.ArgumentParser, required: bool) -> None:
    media = parser.add_mutually_exclusive_group(required=required)
    media.add_argument("--image", type=Path, help="an image file")
    media.add_argument("--video", type=Path, help="a video file (any container PyAV reads)")


def _load(args: argparse.Namespace) -> LynxModel:
    if args.variant:
        from lynx_zoo.hub.variants import load_pretrained

        return load_pretrained(args.variant, device=args.device, dtype=args.dtype)
    from lynx_zoo.evaluation.runner import load_variant

    return load_variant(args.ckpt, args.device)


def _generation(args: argparse.Namespace) -> dict[str, Any]:
    settings: dict[str, Any] = {"preset": args.preset}
    if args.max_new_tokens is not None:
        settings["max_new_tokens"] = args.max_new_tokens
    if args.min_new_tokens is not None:
        settings["min_new_tokens"] = args.min_new_tokens
    if args.num_beams is not None:
        settings["num_beams"] = args.num_beams
    if args.seed is not None:
        settings["seed"] = args.seed
    return settings


def answer(model: LynxModel, question: str, image: Path | None, video: Path | None, settings: dict[str, Any]) -> str:
    """The model's answer to one question about an image file, a video file, or nothing."""
    if video is not None:
        return model.generate(videos=[video], prompts=[question], **settings)[0]
    return model.generate(images=None if image is None else [image], prompts=[question], **settings)[0]


def chat(model: LynxModel, image: Path | None, video: Path | None, settings: dict[str, Any], lines: TextIO) -> None:
    """Answer questions read line by line; ``/image PATH``, ``/video PATH`` and ``/text`` switch what they are
    about, ``/quit`` (or the end of input) ends."""
    interactive = lines.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = lines.readline()
        if not line or line.strip() == "/quit":
            return
        line = line.strip()
        if not line:
            continue
        command, _, rest = line.partition(" ")
        if command in ("/image", "/video", "/text"):
            image = Path(rest.strip()) if command == "/image" else None
            video = Path(rest.strip()) if command == "/video" else None
            print(f"[now about {image or video or 'no media'}]", file=sys.stderr)
            continue
        try:
            print(answer(model, line, image, video, settings), flush=True)
        except OSError as err:  # an unreadable file: say so and keep chatting
            print(f"error: {err}", file=sys.stderr, flush=True)


def run_command(argv: list[str]) -> Any:
    """Run one of these commands (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m lynx_zoo")
    commands = parser.add_subparsers(dest="command", required=True)

    export = commands.add_parser("export", help="export a run's checkpoint as a variant folder")
    export.add_argument("--ckpt", type=Path, required=True, help="the Lightning checkpoint (RUN.ckpt)")
    export.add_argument("--out", type=Path, required=True, help="the variant folder to write")
    export.add_argument("--name", help="the variant's name (default: the folder name)")
    export.add_argument("--model-class", help="for checkpoints that record no model class (e.g. PrefixLynx)")
    export.add_argument("--register", action="store_true", help="register it locally under its name")

    predict = commands.add_parser("predict", help="answer a question about an image or video file")
    _model_args(predict)
    _media_args(predict, required=True)
    predict.add_argument("--question", "-q", required=True)

    chat_parser = commands.add_parser("chat", help="answer questions read from stdin, one a line")
    _model_args(chat_parser)
    _media_args(chat_parser, required=False)

    commands.add_parser("variants", help="list the released and locally registered variants")

    cards = commands.add_parser("cards", help="generate model_cards/<variant>.md from the configs")
    cards.add_argument("--out", type=Path, default=shipped("model_cards"), help="default: the shipped model_cards/")
    cards.add_argument("--check", action="store_true", help="write nothing; fail if a card is missing or stale")
    cards.add_argument("ids", nargs="*", help="only these variants (default: all)")

    convert = commands.add_parser("convert-lynx", help="convert an original Lynx checkpoint into a variant")
    convert.add_argument("--ckpt", type=Path, required=True, help="finetune_lynx.pt / pretrain_lynx.pt")
    convert.add_argument("--out", type=Path, required=True)
    convert.add_argument(
        "--config",
        type=config_path,
        action="append",
        help="lynx_zoo config(s): zoo:NAME or a path (default: the real Lynx)",
    )
    convert.add_argument("--name", help="the variant's name (default: the folder name)")
    convert.add_argument("--register", action="store_true", help="register it locally under its name")

    args = parser.parse_args(argv)
    if args.command == "export":
        from lynx_zoo.hub.export import export_checkpoint

        folder = export_checkpoint(args.ckpt, args.out, name=args.name, model_class=args.model_class)
        return _done(folder, args.name, args.register)
    if args.command == "convert-lynx":
        from lynx_zoo.hub.convert_lynx import convert_lynx

        folder = convert_lynx(args.ckpt, args.out, configs=args.config, name=args.name)
        return _done(folder, args.name, args.register)
    if args.command == "variants":
        from lynx_zoo.hub.variants import list_variants

        for row in list_variants():
            print(f"{row.id:<42} {'present' if row.available else 'absent ':<8} {row.location}")
        return None
    if args.command == "cards":
        from lynx_zoo.hub.cards import stale_cards, write_cards

        if args.check:
            stale = stale_cards(args.out)
            if stale:
                sys.exit(f"lynx_zoo: stale or missing model cards: {stale}; run python -m lynx_zoo cards")
            return None
        for path in write_cards(args.out, args.ids or None):
            print(path)
        return None
    model = _load(args)
    settings = _generation(args)
    if args.command == "predict":
        print(answer(model, args.question, args.image, args.video, settings))
        return None
    chat(model, args.image, args.video, settings, sys.stdin)
    return None


def _done(folder: Path, name: str | None, register: bool) -> Path:
    if register:
        from lynx_zoo.hub.variants import register_local

        register_local(name or folder.name, folder)
    print(f"wrote {folder}")
    return folder
