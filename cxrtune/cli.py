"""The `cxrtune` command line: parse, load config, call one library function, show the result."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from .config import DataConfig, from_dict
from .errors import CxrtuneError, SearchFailed, SearchInterrupted


def _flags_without_type(self: Any, ctx: Any) -> Optional[str]:
    """typer 0.29 labels on/off flags ``<bool>`` in --help, as if they took a value."""
    return None if getattr(self, "is_flag", False) else _option_type(self, ctx)


_option_type = typer.core.TyperOption.display_type_rich
typer.core.TyperOption.display_type_rich = _flags_without_type

app = typer.Typer(help="Hyperparameter search for chest X-ray classification.", no_args_is_help=True,
                  rich_markup_mode="markdown",  # paragraphs re-flow to the terminal width
                  pretty_exceptions_enable=False)
data_app = typer.Typer(help="Datasets: generate, inspect, split and cache.", no_args_is_help=True)
app.add_typer(data_app, name="data")

log = logging.getLogger("cxrtune")

# Options shared by every data command; None means "use the DataConfig default".
SOURCE = typer.Option(None, "--source", "-s", help="Dataset source (see `cxrtune data sources`); default: synthetic.")
ROOT = typer.Option(None, "--root", "-r", help="Folder the dataset unpacked to (a CSV file for --source csv).")
TASK = typer.Option(None, "--task", "-t", help="binary | three_class | four_class | multi_to_binary.")
SIZE = typer.Option(None, "--image-size", help="Side of the cached square images (default 224).")
SEED = typer.Option(None, "--split-seed", help="Seed of the train/val (and drawn test) split.")
RESPLIT = typer.Option(None, "--resplit-test/--official-test", help="Draw a new test split instead of the source's official one.")
BAD = typer.Option(None, "--on-bad-image", help="error | skip.")
CACHE = typer.Option(None, "--cache-dir", help="Where caches and splits live (default cxrtune_data/cache).")
WORKERS = typer.Option(None, "--workers", help="Decoding processes (0 = all cores).")
VAL_FRACTION = typer.Option(None, "--val-fraction", help="Share of train+val drawn as val, by whole patients (default 0.2).")
TEST_FRACTION = typer.Option(None, "--test-fraction", help="Share drawn as test when there is no official test split, or with --resplit-test (default 0.2).")
MIN_COUNT = typer.Option(None, "--min-class-count", help="A task class with fewer images is an error "
                         "(default 3); lower it to train on a rare class anyway.")
JSON = typer.Option(False, "--json", help="Print one JSON object (for scripts) instead of a table.")


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v",
                                      help="Debug logging, and Ray's, Optuna's and MLflow's messages.")) -> None:
    from .logs import configure

    configure(verbose)


def run(fn, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn``; a user-input error becomes a one-paragraph message and exit code 2, a
    search whose every trial failed (or that was interrupted) a message and exit code 1."""
    try:
        return fn(*args, **kwargs)
    except CxrtuneError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except (SearchFailed, SearchInterrupted) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def run_trial(fn, *args: Any, **kwargs: Any) -> Any:
    """``run`` for a command that trains in this process: a diverged run is one line and
    exit code 2 too (a traceback would not help to fix a config); bugs keep theirs."""
    from .engine import TrainingDiverged

    try:
        return run(fn, *args, **kwargs)
    except TrainingDiverged as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def data_config(**options: Any) -> DataConfig:
    given = {k: v for k, v in options.items() if v is not None}
    cfg = run(from_dict, DataConfig, given, "data", "command line")
    run(cfg.validate)
    return cfg


def emit(result: dict[str, Any], as_json: bool, render) -> None:
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
    else:
        render(result)


@data_app.command("sources")
def data_sources(as_json: bool = JSON) -> None:
    """List the dataset sources and tasks cxrtune knows."""
    from .data.labels import SCHEMES
    from .data.sources import SOURCES

    result = {"sources": ["synthetic", *SOURCES.names()],
              "tasks": {n: list(SCHEMES.get(n).classes) for n in SCHEMES.names()}}
    emit(result, as_json, lambda r: typer.echo(
        "sources: " + ", ".join(r["sources"]) + "\ntasks:\n"
        + "\n".join(f"  {t}: {' / '.join(c)}" for t, c in r["tasks"].items())))


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write the synthetic dataset to."),
    n: int = typer.Option(600, "--n", help="Number of images."),
    layout: str = typer.Option("coronahack", "--layout", help="coronahack | kermany | imagefolder."),
    seed: int = typer.Option(0, "--seed"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a dataset already in --out."),
    as_json: bool = JSON,
) -> None:
    """Write SYNTHETIC chest-X-ray-like images in a real dataset's layout (for demos and tests)."""
    from .data.synthetic import write_synthetic

    summary = run(write_synthetic, out, n=n, layout=layout, seed=seed, overwrite=overwrite)
    emit(summary, as_json, lambda s: typer.echo(json.dumps(s, indent=2, default=str)))


@data_app.command("inspect")
def data_inspect(source: Optional[str] = SOURCE, root: Optional[str] = ROOT, task: Optional[str] = TASK,
                 image_size: Optional[int] = SIZE, split_seed: Optional[int] = SEED,
                 resplit_test: Optional[bool] = RESPLIT, min_class_count: Optional[int] = MIN_COUNT,
                 val_fraction: Optional[float] = VAL_FRACTION, test_fraction: Optional[float] = TEST_FRACTION,
                 cache_dir: Optional[str] = CACHE, workers: Optional[int] = WORKERS,
                 min_similarity: float = typer.Option(0.99, "--min-similarity", help="Near-duplicate threshold: cosine similarity of perceptual signatures."),
                 write_exclusions: Optional[Path] = typer.Option(
                     None, "--write-exclusions", metavar="FILE",
                     help="Write the images that look off (tinted, extreme aspect ratio, near-blank) "
                          "to FILE, a list data.exclude reads: they are then kept out of training only."),
                 as_json: bool = JSON) -> None:
    """Audit a dataset: class counts per split, patients, fine labels, what the task drops and
    why, image sizes, unreadable files, near-duplicates (and what data.dedupe does with them),
    images that look off, and the problems that would stop or bias training. Builds no image
    cache.

    Exit codes: 0 report printed; 1 report printed and leakage found (one file in two splits,
    classes or patients, or near-duplicates across splits); 2 bad arguments or no dataset.
    """
    from .data.inspect import inspect_data, write_looks_off
    from .report_text import render_inspect

    cfg = data_config(source=source, root=root, task=task, image_size=image_size, split_seed=split_seed,
                      resplit_test=resplit_test, min_class_count=min_class_count, cache_dir=cache_dir,
                      workers=workers, val_fraction=val_fraction, test_fraction=test_fraction)
    result = run(inspect_data, cfg, min_similarity=min_similarity, progress=not as_json)
    if write_exclusions is not None:
        result["exclusions_file"] = str(run(write_looks_off, result, write_exclusions))
    emit(result, as_json, render_inspect)
    if result["leakage"]:
        raise typer.Exit(1)


@data_app.command("cache")
def data_cache(source: Optional[str] = SOURCE, root: Optional[str] = ROOT, task: Optional[str] = TASK,
               image_size: Optional[int] = SIZE, split_seed: Optional[int] = SEED,
               resplit_test: Optional[bool] = RESPLIT, on_bad_image: Optional[str] = BAD,
               min_class_count: Optional[int] = MIN_COUNT,
               val_fraction: Optional[float] = VAL_FRACTION, test_fraction: Optional[float] = TEST_FRACTION,
               cache_dir: Optional[str] = CACHE, workers: Optional[int] = WORKERS,
               as_json: bool = JSON) -> None:
    """Build the image cache and the split ahead of a search (the synthetic default if no --source)."""
    from .data.pipeline import prepare_data
    from .report_text import render_prepared

    cfg = data_config(source=source, root=root, task=task, image_size=image_size, split_seed=split_seed,
                      resplit_test=resplit_test, on_bad_image=on_bad_image, cache_dir=cache_dir,
                      workers=workers, min_class_count=min_class_count, val_fraction=val_fraction,
                      test_fraction=test_fraction)
    data = run(prepare_data, cfg, progress=not as_json)
    result = {
        "source": cfg.source, "root": str(cfg.resolved_root()), "task": cfg.task,
        "n_images": len(data.split), "cache": str(data.cache.directory),
        "fingerprint": data.cache.fingerprint, "image_size": data.cache.size,
        "split_file": str(data.split_path),
        "split_counts": {s: int(n) for s, n in data.split["split"].value_counts().items()},
        "skipped": [b.path for b in data.skipped],
    }
    emit(result, as_json, render_prepared)


@app.command("train")
def train_cmd(
    config: Optional[Path] = typer.Argument(None, help="Trial config YAML (default: the built-in baseline)."),
    debug: bool = typer.Option(False, "--debug", help="A few batches of 1-2 epochs, full tracebacks."),
    overrides: list[str] = typer.Option([], "--set", help="Override a config value: --set optimizer.lr=0.01"),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Output folder (config output_dir)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Checkpoint folder to continue from."),
    resume_with_changes: bool = typer.Option(
        False, "--resume-with-changes",
        help="Resume although the config differs from the checkpoint's (lr, rho, ...); "
             "epochs, output, batch caps, workers and device may always differ."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier run in the output folder."),
    as_json: bool = JSON,
) -> None:
    """Train one trial in-process, without Ray (the local single-GPU / CPU debug mode).
    --debug writes to <output>-debug."""
    from .config import load_trial_config
    from .train import train

    sets = list(overrides) + ([f"output_dir={output}"] if output else [])
    cfg = run(load_trial_config, config, sets)
    if debug:  # full tracebacks for bugs: the point of --debug is to see where it breaks
        logging.getLogger("cxrtune").setLevel(logging.DEBUG)
    summary = run_trial(train, cfg, debug=debug, resume=resume, overwrite=overwrite,
                        resume_with_changes=resume_with_changes)
    emit(summary, as_json, lambda r: typer.echo(
        f"{r['epochs']} epochs; best {r['select_metric']} {r['best']:.4f} at epoch {r['best_epoch']}; "
        f"results in {r['output_dir']}"))


def _load_space(space: str, overrides: list[str]):
    from .space import load_spec, resolve_space_path

    path, found = run(resolve_space_path, space)
    log.info("search space: %s", found)
    return run(load_spec, path, overrides)


@app.command("validate")
def validate_cmd(
    space: str = typer.Argument(..., help="Search-space YAML, or a bundled space's name (e.g. demo, cxrnorm)."),
    overrides: list[str] = typer.Option([], "--set", help="Override a value: --set search.num_samples=4"),
    as_json: bool = JSON,
) -> None:
    """Validate a search-space YAML (every problem at once) without starting anything.

    Also checks what it names on this machine: the dataset root and its images, and the
    pretrained weights files."""
    from .space import check_inputs

    spec = _load_space(space, overrides)
    run(check_inputs, spec)
    result = {"name": spec.name, "file": spec.file, "valid": True, "params": [p.name for p in spec.params],
              "algorithm": spec.search.algorithm, "scheduler": spec.search.scheduler.name,
              "metric": spec.metric, "mode": spec.mode, "max_epochs": spec.max_epochs}
    emit(result, as_json, lambda r: typer.echo(
        f"{r['file']}: valid; {len(r['params'])} searched parameters ({', '.join(r['params'])}); "
        f"{r['algorithm']} + {r['scheduler']} on {r['metric']} ({r['mode']}), up to {r['max_epochs']} epochs"))


@app.command("search")
def search_cmd(
    space: str = typer.Argument(..., help="Search-space YAML, or a bundled space's name (e.g. demo, cxrnorm)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster to join (auto, ray://host:10001, host:6379); default: RAY_ADDRESS or a local Ray."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted search; finished trials are not re-run."),
    test_front: bool = typer.Option(False, "--test-front", help="With several search.objectives: score every "
                                                                "Pareto-front trial on the test split too."),
    debug: bool = typer.Option(False, "--debug", help="Run one trial of the space in-process, without Ray."),
    overrides: list[str] = typer.Option([], "--set", help="Override a value: --set search.num_samples=4 --set fixed.loop.epochs=3"),
    as_json: bool = JSON,
) -> None:
    """Search a space with Ray Tune, Optuna TPE and ASHA; track it in MLflow.

    Every trial is logged to MLflow; the best trial (by validation) is then scored once
    on the held-out test split and its model registered. Exit codes: 0 done, 1 every
    trial failed or the search was interrupted (resume it with --resume), 2 bad input."""
    from .report_text import render_search
    from .search import debug_trial, run_search

    spec = _load_space(space, overrides)
    if debug:
        logging.getLogger("cxrtune").setLevel(logging.DEBUG)
        summary = run_trial(debug_trial, spec)
        emit(summary, as_json, lambda r: typer.echo(
            f"debug trial at {r['point']}: {r['epochs']} epochs, {r['select_metric']} {r['best']:.4f}; "
            f"results in {r['output_dir']}"))
        return
    summary = run(run_search, spec, address=address, resume=resume, test_front=test_front)
    emit(summary, as_json, render_search)


@app.command("report")
def report_cmd(
    target: str = typer.Argument(..., help="A search: its name (demo-2), its space (demo: that space's latest "
                                           "search), its results or report folder, or its MLflow parent run id."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="The HTML file (default: <search>-report.html here)."),
    storage: Optional[str] = typer.Option(None, "--storage", help="The results folder a search named by its name is "
                                                                  "in (default: cxrtune_runs/ray_results)."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="The MLflow a run id is read from "
                                                                            "(default: sqlite:///mlflow.db here)."),
    as_json: bool = JSON,
) -> None:
    """One self-contained HTML report of a finished search (opens offline).

    Data and split, the search's settings, its top trials, the best config, test metrics
    with 95 % bootstrap intervals over patients, every figure (test curves, learning
    curves, Optuna's plots, Grad-CAM, occlusion, t-SNE) and the shortcut check."""
    from .report.html import report_for

    result = run(report_for, target, out, storage, tracking_uri)
    emit(result, as_json, lambda r: typer.echo(f"report of {r['name']} ({r['found']}): {r['html']}"))


@app.command("predict")
def predict_cmd(
    images: list[Path] = typer.Argument(..., help="Image files (PNG, JPEG, TIFF, DICOM, ...) and folders (walked "
                                                  "for images)."),
    model: str = typer.Option(..., "--model", "-m", help="models:/NAME/VERSION (a search registers "
                                                         "cxrtune-best), runs:/RUN_ID/model, or a model folder."),
    cam: Optional[Path] = typer.Option(None, "--cam", help="Write a Grad-CAM overlay PNG per image into this "
                                                           "folder."),
    batch: Optional[int] = typer.Option(None, "--batch", help="Images per forward pass (default: the model's "
                                                              "test evaluation's)."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="The MLflow a models:/ or runs:/ URI "
                                                                            "is read from (default: "
                                                                            "sqlite:///mlflow.db here)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per image and line, instead of a table."),
) -> None:
    """Class probabilities and the predicted class of each image, by a model a search logged.

    The model carries the preprocessing its trial trained and was tested with (decode,
    square crop, CXR-Norm, normalisation) and applies it. Exit codes: 0 every image
    predicted, 1 some image could not be read (each named; the others are predicted),
    2 bad input (a model that does not exist, no images)."""
    from .report_text import render_predictions
    from .serving.predict import predict_images

    predictions = run(predict_images, model, images, tracking_uri=tracking_uri, batch_size=batch, cam_dir=cam)
    rows, failed = [], 0
    for result in predictions.results:
        if result.error:
            failed += 1
            typer.echo(f"error: {result.image}: {result.error}", err=True)
        if as_json:
            typer.echo(json.dumps(result.to_dict()))
        else:
            rows.append(result.to_dict())
    if not as_json:
        render_predictions(predictions.model, predictions.classes, rows)
    if failed:
        typer.echo(f"{failed} image(s) could not be read (named above); the others were predicted", err=True)
        raise typer.Exit(1)


@app.command("serve")
def serve_cmd(
    model: str = typer.Option(..., "--model", "-m", help="models:/NAME/VERSION (a search registers "
                                                         "cxrtune-best), runs:/RUN_ID/model, or a model folder."),
    host: str = typer.Option("127.0.0.1", "--host", help="The address to listen on (127.0.0.1: this machine only)."),
    port: int = typer.Option(8000, "--port", help="The port (0: a free one, shown in the log)."),
    max_upload_mb: float = typer.Option(64.0, "--max-upload-mb", help="The largest upload accepted, in MB per "
                                                                     "request."),
    cams: bool = typer.Option(True, "--cam/--no-cam", help="Show a Grad-CAM overlay beside each prediction."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="The MLflow a models:/ or runs:/ URI "
                                                                            "is read from (default: "
                                                                            "sqlite:///mlflow.db here)."),
) -> None:
    """A web page where you upload chest X-rays (PNG, JPEG, DICOM) and see each one's class
    probabilities and Grad-CAM overlay, by a model a search logged (a research tool, not a
    diagnostic device). Also POST /api/predict (JSON) and GET /health."""
    from .serving.web import ServeConfig, serve

    run(serve, ServeConfig(model=model, host=host, port=port, max_upload_mb=max_upload_mb, cams=cams,
                           tracking_uri=tracking_uri))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
