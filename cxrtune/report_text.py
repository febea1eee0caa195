"""Human-readable terminal renderings of command results (rich tables)."""

from __future__ import annotations

import sys
from typing import Any, Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

# Into a file or pipe (a log), lines are not wrapped: commands and paths stay copy-pasteable.
console = Console() if sys.stdout.isatty() else Console(width=200, soft_wrap=True)


def render_inspect(r: dict[str, Any]) -> None:
    classes = r["classes"]
    table = Table(title=f"{r['source']} ({r['root']}), task {r['task']}")
    table.add_column("split")
    for c in classes:
        table.add_column(c, justify="right")
    table.add_column("total", justify="right")
    for split, counts in r["split_counts"].items():
        table.add_row(split, *(str(counts[c]) for c in classes), str(sum(counts.values())))
    table.add_row("all", *(str(r["class_counts"][c]) for c in classes), str(r["n_images"]))
    console.print(table)
    size = r["image_size"]
    if size:
        console.print(f"image width {size['width']['min']}..{size['width']['max']} (median "
                      f"{size['width']['median']:.0f}), height {size['height']['min']}.."
                      f"{size['height']['max']}; pixel formats {size['pixel_formats']}")
    if r["smaller_than_image_size"]:
        console.print(f"[yellow]{r['smaller_than_image_size']} images are smaller than the image "
                      f"size and would be upscaled[/]")
    console.print(f"{r['n_images']} images of {r['n_patients']} patients/groups "
                  f"({r['images_without_patient_id']} images without a patient id); "
                  f"{r['patients_with_several_images']} patients have several images "
                  f"(up to {r['max_images_per_patient']})")
    console.print("fine labels: " + ", ".join(f"{k} {v}" for k, v in r["fine_label_counts"].items()))
    for label, d in r["dropped"].items():
        console.print(f"[yellow]dropped[/] {d['count']} {label}: {d['reason']}")
    for path in r["unreadable"]:
        console.print(f"[red]unreadable[/] {path}: {r['unreadable_reasons'][path]}")
    if r["repeated_rows"]:
        console.print(f"[yellow]{len(r['repeated_rows'])} exact duplicate rows, first kept[/]")
    console.print(f"{len(r['duplicate_groups'])} near-duplicate groups, "
                  f"[{'red' if r['cross_split_duplicates'] else 'green'}]"
                  f"{len(r['cross_split_duplicates'])} crossing splits (leakage)[/] "
                  f"(signatures from {r['signatures_from']})")
    for g in r["cross_split_duplicates"][:10]:
        console.print("  " + "  ==  ".join(g), markup=False)
    plan = r.get("dedupe")
    if plan and r["duplicate_groups"]:
        console.print(f"before training, data.dedupe={plan['mode']} moves {plan['moved']} and removes "
                      f"{plan['removed']} of these images (data.dedupe: off | within_split | "
                      "across_splits | all)", markup=False)
    _render_looks_off(r)
    if r["problems"]:
        console.print(f"[red]{len(r['problems'])} problem(s):[/]")
        for problem in r["problems"]:
            console.print(f"  - {problem}", markup=False)
    else:
        console.print("[green]no problems found[/]")


_LOOKS_OFF_TITLES = {"tinted": "tinted (colour channels differ)", "extreme_aspect": "extreme aspect ratio",
                     "near_blank": "near-blank"}


def _render_looks_off(r: dict[str, Any]) -> None:
    """`data inspect`: the images that look off, by kind, and how to keep them out of training."""
    found = r.get("looks_off") or {}
    total = sum(len(v) for v in found.values())
    if not total:
        console.print("[green]no image looks off[/] (tint, aspect ratio, blank)")
    else:
        console.print(f"[yellow]{total} finding(s) of images that look off:[/] " + ", ".join(
            f"{_LOOKS_OFF_TITLES[k]} {len(v)}" for k, v in found.items() if v))
        for kind, items in found.items():
            for item in items[:10]:
                console.print(f"  {_LOOKS_OFF_TITLES[kind]}: {item['name']}", markup=False)
            if len(items) > 10:
                console.print(f"  ... and {len(items) - 10} more {_LOOKS_OFF_TITLES[kind]}", markup=False)
    if r.get("exclusions_file"):
        console.print(f"exclusion list written to {r['exclusions_file']}: set data.exclude to it to keep "
                      "these images out of training (val and test keep them)", markup=False, soft_wrap=True)
    elif total:
        console.print("  --write-exclusions FILE writes them as a list for data.exclude (training only)",
                      markup=False)


def render_prepared(r: dict[str, Any]) -> None:
    console.print(f"{r['n_images']} images of {r['source']} ({r['root']}), task {r['task']}: "
                  f"{r['split_counts']}")
    console.print(f"cache: {r['cache']} ({r['image_size']} px, fingerprint {r['fingerprint']})")
    console.print(f"split: {r['split_file']}")
    if r["skipped"]:
        console.print(f"[yellow]skipped {len(r['skipped'])} unreadable image(s)[/]")


TOP_TRIALS = 20  # trials listed in the search summary (all of them when there are fewer)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _config_text(config: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in config.items())


def _interval_text(interval: Any) -> str:
    if not interval or any(v is None for v in interval):
        return ""
    return f" [{interval[0]:.4f}, {interval[1]:.4f}]"


def render_search(r: dict[str, Any]) -> None:
    trials = r["trials"][:TOP_TRIALS]
    shown = "every trial" if len(trials) == len(r["trials"]) else f"top {len(trials)} of {len(r['trials'])} trials"
    table = Table(title=f"search {r['name']}: {shown} by {r['metric']} ({r['mode']}, best epoch)")
    pareto = r.get("pareto") or {}
    # the other objectives, then the metrics a select rule limits (a single objective may have limits)
    others = list(dict.fromkeys([o["metric"] for o in pareto.get("objectives", [])[1:]] + [*pareto.get("limits", {})]))
    chosen = ("front" if len(pareto.get("objectives", [])) > 1 else "chosen") if pareto else None
    for col in ("trial", "status", "epochs", r["metric"], *others, *([chosen] if chosen else []), "config / error"):
        table.add_column(col)
    for t in trials:
        best = "-" if t["best"] is None else f"{t['best']:.4f}"
        extra = [_number_text((t.get("values") or {}).get(m)) for m in others]
        if pareto:
            extra.append(" ".join(["*"] * (t["trial_id"] in pareto["front"])
                                  + ["tested"] * (t["trial_id"] == pareto["selected"])))
        table.add_row(str(t["trial_id"]), t["status"], str(t["epochs"]), best, *extra,
                      t["error"] or _config_text(t["config"]))
    console.print(table)
    if pareto:
        _render_front(pareto)
    c = r["counts"]
    console.print(f"{r['n_trials']} trials: {c['completed']} completed, {c['stopped_early']} stopped early by "
                  f"the scheduler, {c['failed']} failed" + (f", {c['not_started']} never started"
                                                           if c["not_started"] else ""))
    cv = r.get("cv")
    spread = (f" (mean of {cv['folds']} folds" + (f", sd {cv['std']:.4f})" if cv["std"] is not None else ")")
              if cv else "")
    # a rule (several objectives, limits) may test another trial than the best by the metric
    console.print(f"{'tested' if pareto else 'best'} trial {r['best_trial']}: {r['metric']} {r['best_val']:.4f}"
                  f"{spread} at epoch {r['best_epoch']}; config {_config_text(r['best_config'])}")
    if cv:
        console.print("tested as " + ("the ensemble of its fold models" if cv["test"] == "ensemble"
                                      else "one model refit on train+val for its best epoch count"))
    test = r["test_metrics"]
    keys = [k for k in ("test/accuracy", "test/balanced_accuracy", "test/f1_macro", "test/f1_weighted",
                        "test/roc_auc_macro", "test/binary/accuracy", "test/binary/f1_weighted") if k in test]
    intervals = r.get("test_intervals") or {}
    console.print("held-out test (95 % interval over patients): "
                  + ", ".join(f"{k} {test[k]:.4f}{_interval_text(intervals.get(k))}" for k in keys))
    console.print(f"confusion (rows true {r['classes']}): {r['confusion']}")
    if r.get("registered_model"):
        console.print(f"registered model: {r['registered_model']}")
    for label, kinds in r["mlflow_not_logged"].items():
        console.print(f"[yellow]not logged to MLflow[/]: {label}: "
                      + ", ".join(f"{n} {kind}" for kind, n in kinds.items()))
    disk = r["disk_bytes"]
    # soft_wrap: paths and commands stay on one line, copy-pasteable from a log file too
    console.print(f"MLflow parent run: {r['mlflow_parent_run']}; review every trial: {r['mlflow_ui']}",
                  soft_wrap=True)
    console.print(f"best checkpoint: {r['best_checkpoint']}", soft_wrap=True)
    if r.get("report"):
        console.print(f"report: {r['report']} (its figures are on the MLflow parent run under report/)",
                      soft_wrap=True)
    if r.get("optuna_dashboard"):
        console.print(f"the study in Optuna's dashboard: {r['optuna_dashboard']}", soft_wrap=True)
    # a summary saved by an older cxrtune (a resumed, finished search) has no checkpoint count
    kept = (f", of which {r['n_checkpoints']} checkpoints {_size(disk['checkpoints'])}"
            if "n_checkpoints" in r else "")
    console.print(f"Tune results: {r['experiment_dir']} ({_size(disk['results'])}{kept}; image cache and "
                  f"CXR-Norm memo {_size(disk['cache'])})", soft_wrap=True)


def _number_text(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}"


def _render_front(pareto: dict[str, Any]) -> None:
    """The Pareto front, the rule's choice and, after --test-front, each member's test scores."""
    names = ", ".join(f"{o['metric']} ({o['mode']})" for o in pareto["objectives"])
    front = (f"Pareto front on {names}: {len(pareto['front'])} trial(s) ({', '.join(pareto['front'])}); "
             if len(pareto["objectives"]) > 1 else "")
    console.print(f"{front}tested and registered: {pareto['selected']}, {pareto['reason']}")
    tests = pareto.get("front_test") or {}
    if len(tests) > 1:
        keys = [k for k in ("test/f1_macro", "test/accuracy", "test/roc_auc_macro") if k in next(iter(tests.values()))]
        for trial, metrics in tests.items():
            console.print(f"  front trial {trial}: " + ", ".join(f"{k} {metrics[k]:.4f}" for k in keys))


def render_predictions(model: str, classes: Sequence[str], rows: Sequence[dict[str, Any]]) -> None:
    """`cxrtune predict`: one row per image, its predicted class and each class's probability
    (the predicted one in bold); an unreadable image's row says so (its error is on stderr)."""
    table = Table(title=escape(f"{model}: {len(rows)} image(s)"))
    table.add_column("image", overflow="fold")
    table.add_column("predicted")
    for c in classes:
        table.add_column(c, justify="right")
    for r in rows:
        if r.get("error"):
            table.add_row(escape(r["image"]), "[red]unreadable[/]", *("-" for _ in classes))
            continue
        probs = r["probabilities"]
        table.add_row(escape(r["image"]), r["predicted"], *(f"[bold]{probs[c]:.4f}[/]" if c == r["predicted"]
                                                    else f"{probs[c]:.4f}" for c in classes))
    console.print(table)
