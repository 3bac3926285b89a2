"""`segpipe`: run, demo, convert, models.

Exit codes, one rule (README "Exit codes"): 0 done (per-image errors within max_error_fraction);
2 anything found wrong before the first image is segmented (usage, config, input and labels
locations, model name, checkpoint, a rerun that would change a run's results, an optional package
not installed: pipeline.extras), one line naming the field or the extra; 1 a run that started and
failed, one line; 130 interrupted (Ctrl-C), 143 stopped by SIGTERM (Kubernetes, KubeRay), 128 + the
signal's number. Never a traceback (SEGPIPE_DEBUG=1 shows one).
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.extras import MissingPackageError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def exit_interrupted(signum: int) -> int:
    """The exit code of a run stopped by a signal, as a shell reports one: 128 + its number (130 Ctrl-C, 143 SIGTERM)."""
    return 128 + signum


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own exit code is 2 already; keep its message short
        self.print_usage(sys.stderr)
        print(f"segpipe: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="segpipe", description="Bulk segmentation of image archives with transformer models on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser(
        "run",
        help="run a segmentation job",
        description="Run a segmentation job, or resume it: the same config and run_id again segments what is missing "
        "(and retries images that failed) and never rewrites a committed result.",
    )
    run.add_argument("config", help="YAML job config")
    run.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY.SUB=VALUE", help="override a config field (repeatable)"
    )
    run.add_argument(
        "--no-retry-errors",
        dest="retry_errors",
        action="store_false",
        help="on a rerun, keep images that failed as failed instead of trying them again",
    )
    run.add_argument(
        "--incremental",
        action="store_true",
        help="a new run of the config's job (`job`, default the config file's name) that segments only the images "
        "no committed run of the job under output.uri holds",
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="list the input and read image headers only: print and write plan.json (images, pixels, windows, an "
        "estimate of the run's time); no masks, metrics or errors",
    )
    run.add_argument("--verbose", action="store_true", help="show Ray's own log lines too (also SEGPIPE_VERBOSE=1)")

    summary = sub.add_parser(
        "summary",
        help="roll a job's runs up into one summary",
        description="Every run of a job under OUTPUT_URI rolled up: each image once, metrics recomputed from the summed "
        "areas (never averaged over runs). Prints the table and writes <OUTPUT_URI>/<job>.summary.json.",
    )
    summary.add_argument("output_uri", help="the output.uri the job's runs were written under")
    summary.add_argument("--job", required=True, help="the job's name (its config's `job`, or its file name)")

    compare = sub.add_parser(
        "compare",
        help="compare runs over the same images: table, paired bootstrap intervals, an HTML report",
        description="Join runs (<output.uri>/<run_id> directories) on image_id and write comparison.parquet, "
        "per_image.parquet, pairs.parquet (A - B with 95%% paired bootstrap intervals) and a self-contained report.html to --out.",
    )
    compare.add_argument("runs", nargs="+", metavar="RUN", help="a run directory, <output.uri>/<run_id> (local path or URI)")
    compare.add_argument("--out", required=True, help="where the comparison is written (local path or URI)")
    compare.add_argument("--intersect", action="store_true", help="runs over different image sets: compare the images they share")
    compare.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    compare.add_argument("--seed", type=int, default=0, help="seed of the bootstrap's draws (default 0)")
    compare.add_argument(
        "--receptive-field",
        type=int,
        nargs="?",
        const=8,
        default=0,
        metavar="IMAGES",
        help="also each model's effective receptive field on IMAGES of the compared images (default 8)",
    )

    export = sub.add_parser(
        "export",
        help="write a run's results as PNG label maps, tiled TIFFs or COCO JSON",
        description="Export a run directory's committed results to DIR: png (one label map per image, up to 50 "
        "megapixels), tiff (one tiled, deflate-compressed TIFF per image, any size) or coco (COCO JSON: semantic "
        "annotations, instance results or panoptic PNGs and JSON, by the run's task).",
    )
    export.add_argument("run", metavar="RUN", help="a run directory, <output.uri>/<run_id> (local path or URI)")
    export.add_argument("--to", required=True, metavar="DIR", help="where the files go (local path or URI)")
    export.add_argument(
        "--format",
        required=True,
        choices=["png", "tiff", "coco", "geotiff", "cog", "geoparquet", "gpkg", "geojson", "qupath", "ytvis"],
        help="png | tiff | coco | geotiff | cog | geoparquet | gpkg | geojson | qupath | ytvis",
    )
    export.add_argument(
        "--simplify",
        type=float,
        default=None,
        metavar="TOLERANCE",
        help="geoparquet | gpkg | geojson: simplify each polygon with this tolerance in map units (topology kept)",
    )
    export.add_argument(
        "--storage-option",
        dest="storage_options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an fsspec option for RUN and DIR (repeatable; the value is read as YAML, KEY.SUB nests)",
    )

    demo = sub.add_parser("demo", help="segment a small synthetic archive with the bundled model")
    demo.add_argument("--out", default="./demo-out", help="where the archive and the run go")
    demo.add_argument("--verbose", action="store_true", help="show Ray's own log lines too")
    demo.add_argument(
        "--task",
        choices=["semantic", "camouflage"],
        default="semantic",
        help="semantic: shapes of four classes; camouflage: objects whose texture matches the background, a binary "
        "model, and the camouflaged-object measures",
    )

    convert = sub.add_parser(
        "convert",
        help="turn an HF or mmseg checkpoint into a native .safetensors one",
        description="Load a checkpoint (a Hugging Face directory, an mmsegmentation .pth, or a native .safetensors) "
        "and write it as one native .safetensors file whose metadata names the model, its classes and normalization.",
    )
    convert.add_argument("source", help="HF checkpoint directory, mmseg .pth, or native .safetensors (local path or URI)")
    convert.add_argument("dest", help="the .safetensors file to write")
    convert.add_argument("--name", default=None, help="registered model name (`segpipe models`); needed for mmseg checkpoints")
    convert.add_argument("--num-classes", type=int, default=None, help="number of classes; checked against the checkpoint")

    sub.add_parser(
        "models", help="list the registered model names", description="List the model names that model.name and `convert --name` accept."
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """The `segpipe` program (argv None: sys.argv), or a call with its arguments (a test, a script).
    Only the program starts its local Ray early and shuts it down at the end (pipeline.local_ray):
    a call leaves Ray to its process, as runs always did."""
    program = argv is None
    args = build_parser().parse_args(argv)
    _log_to_stderr()
    code = _command(args, program)
    if program:
        _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    """End the program as soon as its work is done: the exit hooks run (logging's flush, Ray's),
    then the process ends without Python's teardown of every module, 0.4-0.8 s with torch and
    Ray imported, spent after the last line. Only when no other thread of ours still runs (an
    executor's worker, a write in flight): then Python's own exit waits for it, as always."""
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.current_thread()):
        return
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:  # None: started without it
                stream.flush()
        except (OSError, ValueError):  # a reader that went away (a closed pipe): nothing more to tell it
            pass
    os._exit(code)


def _command(args: argparse.Namespace, program: bool) -> int:
    try:
        if args.command == "models":
            from models import list_models

            print("\n".join(list_models()))
            return EXIT_OK
        if args.command == "convert":
            return _convert(args)
        if args.command == "run":
            from pipeline.config import load_config

            cfg = load_config(args.config, args.overrides)
            if args.dry_run:
                return _dry_run(cfg, incremental=args.incremental, verbose=args.verbose)
            return _run(cfg, retry_errors=args.retry_errors, incremental=args.incremental, verbose=args.verbose, program=program)
        if args.command == "compare":
            return _compare(args)
        if args.command == "export":
            return _export(args)
        if args.command == "summary":
            return _summary(args.output_uri, args.job)
        if args.command == "demo":
            from jobs.demo import demo_config

            return _run(demo_config(Path(args.out), task=args.task), verbose=args.verbose, program=program)
    except _usage_errors() as exc:  # an optional package missing: one line naming its extra
        return _fail(exc, EXIT_USAGE)
    except KeyboardInterrupt as exc:  # pipeline.plan.Stopped carries the signal: Ctrl-C or SIGTERM
        signum = getattr(exc, "signum", signal.SIGINT)
        print(f"segpipe: interrupted ({signal.Signals(signum).name}) before anything was written", file=sys.stderr)
        return exit_interrupted(signum)
    except OSError as exc:  # an unreachable store while setting up: nothing was segmented
        return _fail(exc, EXIT_USAGE)
    return EXIT_USAGE


def _usage_errors() -> tuple[type[Exception], ...]:
    """The errors that are exit 2. models.ModelError only where models is imported (whatever raised
    one did): importing it imports torch, which `segpipe run` imports while its Ray starts."""
    base = sys.modules.get("models.base")
    return (ConfigError, MissingPackageError, base.ModelError) if base is not None else (ConfigError, MissingPackageError)


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (a test's capture, the terminal), never to a
    stream that an earlier in-process call had and that is closed since."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _log_to_stderr() -> None:
    root = logging.getLogger()
    if not any(isinstance(h, _CurrentStderr) for h in root.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.WARNING)


def _fail(exc: BaseException, code: int) -> int:
    if os.environ.get("SEGPIPE_DEBUG") == "1":
        logging.exception("segpipe")
    print(f"segpipe: {' '.join(str(exc).split())}", file=sys.stderr)
    return code


def _run(cfg, retry_errors: bool = True, incremental: bool = False, verbose: bool = False, program: bool = False) -> int:
    from pipeline import local_ray

    if program:  # a local Ray starts while the driver imports, lists and loads
        local_ray.start_in_background(verbose or _verbose_env())
    from pipeline.plan import run_job
    from pipeline.results.summary_table import format_summary

    try:
        result = run_job(cfg, retry_errors=retry_errors, incremental=incremental, verbose=verbose or _verbose_env())
        if result.status == "nothing_new":
            print(f"segpipe: run {result.run_id}: {result.message}")
            return EXIT_OK
        print(format_summary(result.summary, result.run_dir))
        if result.status == "interrupted":
            print(f"segpipe: {result.message}", file=sys.stderr)
            return exit_interrupted(result.signum or signal.SIGINT)
        if result.status != "succeeded":
            print(f"segpipe: run failed: {result.message}", file=sys.stderr)
            return EXIT_FAILED
        return EXIT_OK
    finally:
        sys.stdout.flush()
        local_ray.stop()


def _verbose_env() -> bool:
    return os.environ.get("SEGPIPE_VERBOSE", "0") == "1"


def _summary(output_uri: str, job: str) -> int:
    from pipeline.results.runstore import job_summary, write_job_summary
    from pipeline.results.summary_table import format_summary

    summary = job_summary(output_uri, {}, job)
    where = write_job_summary(output_uri, {}, job, summary)
    print(f"job {job}: {len(summary['runs'])} runs")
    if summary.get("identity"):
        print(f"  each made with {identity_line(summary['identity'])}")
    for r in summary["runs"]:
        print(f"  {r['run_id']:<32} {r['status'] or '?':<12} {r['images']:>8} images {r['errors']:>6} errors")
    print(format_summary(summary))
    print(f"summary: {where}")
    return EXIT_OK


def identity_line(identity: dict) -> str:
    """A run's identity (pipeline.results.runstore.run_identity) on one line; the weights' hash shortened."""
    shown = {k: (v[:12] if k == "model.weights_sha256" and isinstance(v, str) else v) for k, v in identity.items()}
    return ", ".join(f"{k}={v}" for k, v in shown.items())


def _compare(args) -> int:
    from pipeline.analysis.compare import CompareError, compare_runs, format_comparison

    try:
        result = compare_runs(
            args.runs, args.out, intersect=args.intersect, resamples=args.resamples, seed=args.seed, receptive_field=args.receptive_field
        )
    except CompareError as exc:
        return _fail(exc, EXIT_USAGE)
    print(format_comparison(result))
    return EXIT_OK


def _export(args) -> int:
    import yaml

    from pipeline.analysis.export import ExportError, export_run

    options: dict = {}
    for item in args.storage_options:
        key, sep, value = item.partition("=")
        if not sep or not key:
            return _fail(ValueError(f"--storage-option {item!r}: expected KEY=VALUE"), EXIT_USAGE)
        *parents, leaf = key.split(".")
        node = options
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = yaml.safe_load(value)
    try:
        result = export_run(args.run, args.to, args.format, options, simplify=args.simplify)
    except ExportError as exc:
        return _fail(exc, EXIT_USAGE)
    except ValueError as exc:  # a mask whose chunks do not fit together: the run directory is damaged
        return _fail(exc, EXIT_FAILED)
    for line in result.skipped:
        print(f"segpipe: skipped {line}", file=sys.stderr)
    print(f"{result.out}: {len(result.written)} files ({result.format}), {len(result.skipped)} images skipped")
    return EXIT_OK


def _dry_run(cfg, incremental: bool = False, verbose: bool = False) -> int:
    from pipeline.estimate import dry_run, format_plan

    plan = dry_run(cfg, incremental=incremental, verbose=verbose or _verbose_env())
    print(format_plan(plan))
    return EXIT_OK


def _convert(args) -> int:
    from pydantic import ValidationError

    from models import save_native
    from pipeline.config import ConfigError, ModelConfig, format_validation_error
    from pipeline.predict.job_model import load_job_model

    # as a job loads it: a checkpoint in a store is fetched through pipeline.io.storage
    try:
        config = ModelConfig(checkpoint=str(args.source), name=args.name, num_classes=args.num_classes)
    except ValidationError as err:  # --num-classes 0, say: one line, exit 2, as a job's config
        raise ConfigError(format_validation_error(err).replace("invalid config: ", "convert: ")) from None
    model = load_job_model(config)
    save_native(model, args.dest, source=str(args.source))
    print(
        f"{args.dest}: {model.name or model.family}, {model.num_classes} classes, {sum(p.numel() for p in model.parameters()):,} parameters"
    )
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
