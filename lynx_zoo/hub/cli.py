"""The model commands of ``python -m lynx_zoo``: ``ask`` and ``chat`` (questions about an image or video file),
``export``, ``variants``, ``cards``, ``convert-lynx`` and ``configs``. Each is a function of its arguments."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from lynx_zoo.resources import config_path, shipped, shipped_configs

if TYPE_CHECKING:  # the model is imported when one is loaded, so each command's --help answers at once
    from lynx_zoo.fusion.base import LynxModel

PROG = "python -m lynx_zoo"


def _parser(command: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"{PROG} {command}", description=description)


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--variant",
        "--model",
        "--ckpt",
        dest="source",
        required=True,
        help="a variant name (lynx_zoo.list_variants()), a variant folder, hf://org/repo, or a Lightning checkpoint",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtype", default=None, help="the LLM's weight dtype (e.g. bfloat16, float32); default as saved"
    )
    parser.add_argument(
        "--preset",
        default=None,
        help="generation preset over the model's own settings: lynx (the release: 5-beam sampling), lynx-beam, greedy "
        "(default: none, the model's eval_generation)",
    )
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampling")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--min-new-tokens", type=int, default=None)
    parser.add_argument("--num-beams", type=int, default=None)


def _media_args(parser: argparse.ArgumentParser, required: bool) -> None:
    media = parser.add_mutually_exclusive_group(required=required)
    media.add_argument("--image", type=Path, help="an image file")
    media.add_argument("--video", type=Path, help="a video file (any container PyAV reads)")


def _load(args: argparse.Namespace) -> LynxModel:
    from lynx_zoo.hub.loading import load_model

    return load_model(args.source, device=args.device, dtype=args.dtype)


def generation_options(args: argparse.Namespace) -> dict[str, Any]:
    """``generate`` keyword arguments from the command's options: only those given (the model's own settings
    fill the rest)."""
    options = {
        "preset": args.preset,
        "max_new_tokens": args.max_new_tokens,
        "min_new_tokens": args.min_new_tokens,
        "num_beams": args.num_beams,
        "seed": args.seed,
    }
    return {k: v for k, v in options.items() if v is not None}


def answer(model: LynxModel, question: str, image: Path | None, video: Path | None, settings: dict[str, Any]) -> str:
    """The model's answer to one question about an image file, a video file, or nothing."""
    if video is not None:
        return model.generate(videos=[video], prompts=[question], **settings)[0]
    return model.generate(images=None if image is None else [image], prompts=[question], **settings)[0]


def ask_main(argv: list[str]) -> str:
    """``ask``: one question about an image or video file; prints and returns the answer."""
    parser = _parser("ask", "Answer a question about an image or video file with a variant or checkpoint.")
    _model_args(parser)
    _media_args(parser, required=True)
    parser.add_argument("--question", "-q", required=True)
    args = parser.parse_args(argv)
    reply = answer(_load(args), args.question, args.image, args.video, generation_options(args))
    print(reply)
    return reply


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


def chat_main(argv: list[str]) -> None:
    """``chat``: questions read from stdin, one a line."""
    parser = _parser("chat", "Answer questions read from stdin, one a line (/image PATH, /video PATH, /text, /quit).")
    _model_args(parser)
    _media_args(parser, required=False)
    args = parser.parse_args(argv)
    chat(_load(args), args.image, args.video, generation_options(args), sys.stdin)


def export_main(argv: list[str]) -> Path:
    """``export``: a run's checkpoint as a variant folder."""
    parser = _parser("export", "Export a run's Lightning checkpoint as a variant folder (safetensors, config, card).")
    parser.add_argument("--ckpt", type=Path, required=True, help="the Lightning checkpoint (RUN.ckpt)")
    parser.add_argument("--model-class", help="for checkpoints that record no class: a registered one (PrefixLynx)")
    parser.add_argument(
        "--merge-lora",
        type=Path,
        metavar="LLM_DIR",
        help="merge the LoRA updates into a copy of the base LLM written to LLM_DIR; the variant loads it (serving)",
    )
    parser.add_argument(
        "--format",
        choices=("variant", "transformers-llava"),
        default="variant",
        help="variant: a lynx_zoo variant folder; transformers-llava: transformers' LlavaForConditionalGeneration "
        "layout (vLLM, SGLang, lmms-eval's llava_hf; docs/export.md), LoRA merged",
    )
    _variant_out_args(parser)
    args = parser.parse_args(argv)
    if args.format == "transformers-llava":
        return _export_llava(args)
    from lynx_zoo.hub.export import export_checkpoint

    folder = export_checkpoint(
        args.ckpt, args.out, name=args.name, model_class=args.model_class, merge_lora=args.merge_lora
    )
    return _done(folder, args.name, args.register)


def _export_llava(args: argparse.Namespace) -> Path:
    if args.merge_lora or args.register or args.name:
        sys.exit(f"{PROG} export: --format transformers-llava takes no --merge-lora, --name or --register")
    from lynx_zoo.hub.llava_format import export_llava
    from lynx_zoo.hub.loading import load_checkpoint

    folder = export_llava(
        load_checkpoint(args.ckpt, "cpu", args.model_class), args.out, source=str(args.ckpt.resolve())
    )
    print(f"wrote {folder}")
    return folder


def convert_main(argv: list[str]) -> Path:
    """``convert-lynx``: an original Lynx release checkpoint as a variant folder."""
    parser = _parser("convert-lynx", "Convert a checkpoint of the original Lynx release into a variant folder.")
    parser.add_argument("--ckpt", type=Path, required=True, help="finetune_lynx.pt / pretrain_lynx.pt")
    parser.add_argument(
        "--config", type=config_path, action="append", help="lynx_zoo config(s): zoo:NAME or a path (default: Lynx)"
    )
    _variant_out_args(parser)
    args = parser.parse_args(argv)
    from lynx_zoo.hub.convert_lynx import convert_lynx

    folder = convert_lynx(args.ckpt, args.out, configs=args.config, name=args.name)
    return _done(folder, args.name, args.register)


def variants_main(argv: list[str]) -> None:
    """``variants``: the released and locally registered variants, and where their weights are."""
    _parser("variants", "List the released and locally registered variants and where their weights are.").parse_args(
        argv
    )
    from lynx_zoo.hub.variants import list_variants

    for row in list_variants():
        print(f"{row.id:<42} {'present' if row.available else 'absent ':<8} {row.location}")


def cards_main(argv: list[str]) -> int:
    """``cards``: generate (or check) the model cards of the released variants from their configs."""
    parser = _parser("cards", "Generate model_cards/<variant>.md from the configs (or check them).")
    parser.add_argument("--out", type=Path, default=shipped("model_cards"), help="default: the shipped model_cards/")
    parser.add_argument("--check", action="store_true", help="write nothing; fail if a card is missing or stale")
    parser.add_argument("ids", nargs="*", help="only these variants (default: all)")
    args = parser.parse_args(argv)
    from lynx_zoo.hub.cards import stale_cards, write_cards

    if args.check:
        stale = stale_cards(args.out)
        if stale:
            sys.exit(f"lynx_zoo cards: stale or missing model cards: {stale}; run python -m lynx_zoo cards")
        return 0
    for path in write_cards(args.out, args.ids or None):
        print(path)
    return 0


def configs_main(argv: list[str]) -> None:
    """``configs``: the configs shipped with the package, as ``--config`` takes them."""
    _parser("configs", "List the shipped configs (use them as --config zoo:NAME).").parse_args(argv)
    print("\n".join(shipped_configs()))


def _variant_out_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="the variant folder to write")
    parser.add_argument("--name", help="the variant's name (default: the folder name)")
    parser.add_argument("--register", action="store_true", help="register it locally under its name")


def _done(folder: Path, name: str | None, register: bool) -> Path:
    if register:
        from lynx_zoo.hub.variants import register_local

        register_local(name or folder.name, folder)
    print(f"wrote {folder}")
    return folder
