"""Which report bundle ``cxrtune report SEARCH_OR_RUN`` means: a folder, a search of a
space (its latest one, as ``--resume`` takes), a search's own name (``demo-2``), or an
MLflow run id (the bundle is read back from the run's ``report/`` artifacts)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from ..errors import ConfigError
from .build import REPORT_FILE

RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def find_bundle(target: str, storage: str, tracking_uri: str, download_to: Path) -> tuple[Path, str]:
    """(the bundle's folder, what it was found as). Runs are downloaded into ``download_to``."""
    path = Path(target)
    for candidate in (path, path / "report"):
        if (candidate / REPORT_FILE).is_file():
            return candidate, f"the report folder {candidate}"
    if RUN_ID.match(target):
        return _from_run(target, tracking_uri, download_to)
    for bundle in _search_bundles(target, storage):
        if (bundle / REPORT_FILE).is_file():
            return bundle, f"search {bundle.parent.name!r} in {bundle.parent.parent}"
    raise ConfigError(_not_found(target, storage))


def _search_bundles(target: str, storage: str) -> list[Path]:
    """The bundles ``target`` may mean, latest first: a space's searches in its own results
    folder (demo-3, demo-2, demo), or the search of that name in ``storage``."""
    from ..space import load_spec, resolve_space_path

    try:
        spec = load_spec(resolve_space_path(target)[0])
    except ConfigError:
        return [Path(storage) / target / "report"]
    where = Path(spec.storage.resolved())
    numbered = [(int(m.group(1)), p) for p in where.glob(f"{spec.name}-*")
                if (m := re.fullmatch(rf"{re.escape(spec.name)}-(\d+)", p.name))]
    return [p / "report" for _, p in sorted(numbered, reverse=True)] + [where / spec.name / "report"]


def _from_run(run_id: str, tracking_uri: str, download_to: Path) -> tuple[Path, str]:
    """A run's bundle from MLflow: the parent run's, also when a trial's run id is given."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise ConfigError(f"MLflow run {run_id} not found at {tracking_uri} ({exc.error_code}); give the "
                          "search's parent run id (the search prints it), its name, or --tracking-uri") from None
    parent = run.data.tags.get("mlflow.parentRunId") or run_id
    try:
        local = Path(client.download_artifacts(parent, "report", str(download_to)))
    except (MlflowException, OSError) as exc:
        raise ConfigError(f"MLflow run {parent} has no report/ artifacts ({type(exc).__name__}); its search "
                          "ended before a report was written or with an older cxrtune") from None
    if not (local / REPORT_FILE).is_file():
        raise ConfigError(f"MLflow run {parent}: report/ holds no {REPORT_FILE}")
    return local, f"MLflow run {parent} at {tracking_uri}"


def _not_found(target: str, storage: str) -> str:
    found = sorted(p.parent.parent.name for p in Path(storage).glob(f"*/report/{REPORT_FILE}"))
    listing = ", ".join(found) if found else "none"
    return (f"no search report {target!r}: not a report folder, a search in {storage} or an MLflow run id. "
            f"Searches with a report there: {listing}. Give one of them, a space file or name (its latest "
            "search), a run id with --tracking-uri, or --storage for another results folder")


def default_storage() -> str:
    """The results folder a space uses unless it says otherwise."""
    from ..space.spec import StorageConfig

    return StorageConfig().resolved()


def default_tracking_uri() -> Optional[str]:
    from ..space.spec import TrackingConfig

    return TrackingConfig().resolved_uri()
