"""`segpipe`: run, demo, convert, models.

Exit codes: 0 done (per-image errors within max_error_fraction); 1 the run failed; 2 bad usage or
an invalid config (a one-line message naming the field, no traceback).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from models.base import CheckpointError
from pipeline.config import ConfigError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own exit code is 2 already; keep its message short
        self.print_usage(sys.stderr)
        print(f"segpipe: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="segpipe", description="Bulk segmentation of image archives with transformer models on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run a segmentation job")
    run.add_argument("config", help="YAML job config")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.SUB=VALUE", help="override a config field (repeatable)")

    demo = sub.add_parser("demo", help="segment a small synthetic archive with the bundled model")
    demo.add_argument("--out", default="./demo-out", help="where the archive and the run go")

    convert = sub.add_parser("convert", help="turn an HF or mmseg checkpoint into a native .safetensors one")
    convert.add_argument("source")
    convert.add_argument("dest")
    convert.add_argument("--name", default=None, help="model name (needed for mmseg checkpoints)")
    convert.add_argument("--num-classes", type=int, default=None)

    sub.add_parser("models", help="list the registered model names")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "models":
            from models import list_models

            print("\n".join(list_models()))
            return EXIT_OK
        if args.command == "convert":
            return _convert(args)
        if args.command == "run":
            from pipeline.config import load_config

            return _run(load_config(args.config, args.overrides))
        if args.command == "demo":
            from jobs.demo import demo_config

            return _run(demo_config(Path(args.out)))
    except ConfigError as exc:
        print(f"segpipe: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (CheckpointError, OSError) as exc:  # OSError: a missing input, an unreachable store
        print(f"segpipe: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_USAGE


def _run(cfg) -> int:
    from pipeline.plan import run_job
    from pipeline.report import format_summary

    result = run_job(cfg)
    print(format_summary(result.summary, result.run_dir))
    if result.status != "succeeded":
        print(f"segpipe: run failed: {result.message}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _convert(args) -> int:
    from models import load_model, save_native

    model = load_model(args.source, name=args.name, num_classes=args.num_classes)
    save_native(model, args.dest, source=str(args.source))
    print(f"{args.dest}: {model.name or model.family}, {model.num_classes} classes, {sum(p.numel() for p in model.parameters()):,} parameters")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
