"""Human-readable terminal renderings of command results (rich tables)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

console = Console()


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
    console.print(f"{r['n_images']} images of {r['n_patients']} patients/groups; "
                  f"{r['patients_with_several_images']} patients have several images "
                  f"(up to {r['max_images_per_patient']})")
    for label, d in r["dropped"].items():
        console.print(f"[yellow]dropped[/] {d['count']} {label}: {d['reason']}")
    for path in r["unreadable"]:
        console.print(f"[red]unreadable[/] {path}: {r['unreadable_reasons'][path]}")
    console.print(f"{len(r['duplicate_groups'])} near-duplicate groups, "
                  f"[{'red' if r['cross_split_duplicates'] else 'green'}]"
                  f"{len(r['cross_split_duplicates'])} crossing splits (leakage)[/]")
    for g in r["cross_split_duplicates"][:10]:
        console.print("  " + "  ==  ".join(g))
    console.print(f"split file: {r['split_file']}")


def render_prepared(r: dict[str, Any]) -> None:
    console.print(f"{r['n_images']} images of {r['source']} ({r['root']}), task {r['task']}: "
                  f"{r['split_counts']}")
    console.print(f"cache: {r['cache']} ({r['image_size']} px, fingerprint {r['fingerprint']})")
    console.print(f"split: {r['split_file']}")
    if r["skipped"]:
        console.print(f"[yellow]skipped {len(r['skipped'])} unreadable image(s)[/]")


def render_search(r: dict[str, Any]) -> None:
    table = Table(title=f"search {r['name']}: top trials by {r['metric']} ({r['mode']})")
    for col in ("trial", "status", "epochs", r["metric"], "config"):
        table.add_column(col)
    for t in r["top_trials"]:
        best = "-" if t["best"] is None else f"{t['best']:.4f}"
        config = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["config"].items())
        table.add_row(str(t["trial_id"]), t["status"], str(t["epochs"]), best, config)
    console.print(table)
    console.print(f"{r['n_trials']} trials, {r['n_failed']} failed; best trial {r['best_trial']} "
                  f"({r['metric']} {r['best_val']:.4f})")
    console.print("best config: " + ", ".join(f"{k}={v}" for k, v in r["best_config"].items()))
    test = r["test_metrics"]
    shown = [k for k in ("test/accuracy", "test/balanced_accuracy", "test/f1_macro", "test/f1_weighted",
                         "test/roc_auc_macro", "test/binary/accuracy", "test/binary/f1_weighted") if k in test]
    console.print("held-out test: " + ", ".join(f"{k} {test[k]:.4f}" for k in shown))
    console.print(f"confusion (rows true {r['classes']}): {r['confusion']}")
    if r["mlflow_skipped_calls"]:
        console.print(f"[yellow]{r['mlflow_skipped_calls']} MLflow calls were not logged (tracking unreachable)[/]")
    console.print(f"review every trial: {r['mlflow_ui']}")
    console.print(f"Tune results: {r['experiment_dir']}")
