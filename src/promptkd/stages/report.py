"""`promptkd report`: aggregate distillation runs over seeds into the paper's tables.

Base-to-novel rows are mean +- std of base and novel accuracy over seeds, with HM taken of the
seed means; the Average row is the HM of the average base and average novel accuracy (how the
paper computes 83.73 from 86.96 / 80.73), not the mean of per-dataset HMs. Cross-dataset and DG
averages are plain means over the targets (ImageNet, the source, is listed but not averaged).
The std is the population std over seeds, as Dassl's parse_test_res.py prints it.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

from promptkd.artifacts import METRICS_FILE, atomic_open, read_json, write_json
from promptkd.errors import PromptKDError

# Table order of the paper.
PAPER_ORDER = ["ImageNet", "Caltech101", "OxfordPets", "StanfordCars", "OxfordFlowers", "Food101", "FGVCAircraft",
               "SUN397", "DescribableTextures", "EuroSAT", "UCF101", "ImageNetV2", "ImageNetSketch", "ImageNetA",
               "ImageNetR"]
SOURCE = "ImageNet"
TITLES = {"base2novel": "Base-to-novel generalisation", "cross": "Cross-dataset transfer",
          "dg": "Domain generalisation"}
SELECTIONS = ("last", "best_val", "official_best_on_test")


def _is_distill_metrics(path: Path) -> bool:
    try:
        return read_json(path).get("kind") == "distill_metrics"
    except (PromptKDError, AttributeError):
        return False


def find_runs(paths) -> list[Path]:
    """Distillation metrics.json files: given directly, in the given run folders, or anywhere below
    them. Below a folder, other metrics files (a teacher run's, as in runs/pets/{teacher,student})
    are passed over; a file or run folder named directly must be a distillation's."""
    found = []
    for p in map(Path, paths):
        if p.is_file():
            found.append(p)
        elif (p / METRICS_FILE).is_file():
            found.append(p / METRICS_FILE)
        elif p.is_dir():
            found.extend(f for f in sorted(p.rglob(METRICS_FILE)) if _is_distill_metrics(f))
        else:
            raise PromptKDError(f"{p}: no such run folder")
    if not found:
        raise PromptKDError(f"no distillation runs (metrics.json of `promptkd distill`) under {', '.join(map(str, paths))}")
    return found


def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def _check_metrics(source: str, m: dict) -> None:
    """The fields aggregate() reads must have the types distill writes (a hand-edited file says which)."""
    for key, kind in (("protocol", str), ("dataset", str), ("seed", int), ("results", dict)):
        if not isinstance(m.get(key), kind) or isinstance(m.get(key), bool):
            raise PromptKDError(f"{source}: '{key}' must be a {kind.__name__}, got {m.get(key)!r}")
    for name, result in m["results"].items():
        if not isinstance(result, dict):
            raise PromptKDError(f"{source}: results.{name} must be an object")
        for k in ("base", "novel", "accuracy"):
            v = result.get(k)
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)):
                raise PromptKDError(f"{source}: results.{name}.{k} must be a number, got {v!r}")


def aggregate(metrics: list[tuple[str, dict]], select: str = "last") -> dict[str, dict]:
    """{protocol: {"rows": [...], "average": {...}}} from (source, metrics.json content) pairs."""
    from promptkd.metrics import harmonic_mean

    if select not in SELECTIONS:
        raise PromptKDError(f"select must be one of {SELECTIONS}")
    groups: dict[tuple[str, str], dict[int, dict]] = defaultdict(dict)
    for source, m in metrics:
        if not isinstance(m, dict) or m.get("kind") != "distill_metrics":
            raise PromptKDError(f"{source}: not a distillation metrics file")
        _check_metrics(source, m)
        result = m["results"].get(select)
        if result is None:
            raise PromptKDError(f"{source}: has no '{select}' result (runs: {sorted(m.get('results') or {})})")
        key = (m["protocol"], m["dataset"])
        if m["seed"] in groups[key]:
            raise PromptKDError(f"{source}: seed {m['seed']} of {key[1]} ({key[0]}) appears twice")
        groups[key][m["seed"]] = result
    order = {d: i for i, d in enumerate(PAPER_ORDER)}
    tables: dict[str, dict] = {}
    for (protocol, dataset), by_seed in sorted(groups.items(), key=lambda kv: (order.get(kv[0][1], 99), kv[0][1])):
        seeds = sorted(by_seed)
        row: dict = {"dataset": dataset, "seeds": seeds}
        metric_names = ("base", "novel") if protocol == "base2novel" else ("accuracy",)
        for name in metric_names:
            values = [by_seed[s].get(name) for s in seeds]
            if any(v is None for v in values):
                raise PromptKDError(f"{dataset} ({protocol}): some seeds lack '{name}' accuracy")
            row[name], row[f"{name}_std"] = _mean_std(values)
        if protocol == "base2novel":
            row["hm"] = harmonic_mean(row["base"], row["novel"])
        tables.setdefault(protocol, {"rows": []})["rows"].append(row)
    for protocol, table in tables.items():
        rows = table["rows"]
        if protocol == "base2novel":
            b = sum(r["base"] for r in rows) / len(rows)
            n = sum(r["novel"] for r in rows) / len(rows)
            table["average"] = {"base": b, "novel": n, "hm": harmonic_mean(b, n), "datasets": len(rows)}
        else:
            targets = [r for r in rows if r["dataset"] != SOURCE] or rows
            table["average"] = {"accuracy": sum(r["accuracy"] for r in targets) / len(targets),
                                "datasets": len(targets)}
    return tables


def _pm(row: dict, name: str) -> str:
    return f"{row[name]:.2f} ± {row[name + '_std']:.2f}"


def markdown(tables: dict, select: str) -> str:
    label = {"last": "last epoch", "best_val": "best epoch on the val split",
             "official_best_on_test": "best epoch on TEST data (official selection; optimistic)"}[select]
    parts = []
    for protocol, table in tables.items():
        parts.append(f"## {TITLES.get(protocol, protocol)} ({label}; mean ± std over seeds)\n")
        if protocol == "base2novel":
            parts.append("| Dataset | Seeds | Base | Novel | HM |\n|---|---|---|---|---|")
            for r in table["rows"]:
                parts.append(f"| {r['dataset']} | {len(r['seeds'])} | {_pm(r, 'base')} | {_pm(r, 'novel')} | "
                             f"{r['hm']:.2f} |")
            a = table["average"]
            parts.append(f"| **Average** ({a['datasets']}) | | {a['base']:.2f} | {a['novel']:.2f} | {a['hm']:.2f} |")
        else:
            parts.append("| Dataset | Seeds | Accuracy |\n|---|---|---|")
            for r in table["rows"]:
                name = f"{r['dataset']} (source)" if r["dataset"] == SOURCE else r["dataset"]
                parts.append(f"| {name} | {len(r['seeds'])} | {_pm(r, 'accuracy')} |")
            a = table["average"]
            parts.append(f"| **Average** ({a['datasets']}) | | {a['accuracy']:.2f} |")
        parts.append("")
    return "\n".join(parts)


def write_csv(path: Path, protocol: str, table: dict) -> None:
    names = ["base", "novel"] if protocol == "base2novel" else ["accuracy"]
    header = ["dataset", "seeds"] + [f"{n}{s}" for n in names for s in ("", "_std")] + (
        ["hm"] if protocol == "base2novel" else [])
    with atomic_open(path, "w") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in table["rows"]:
            w.writerow([r["dataset"], " ".join(map(str, r["seeds"]))] +
                       [f"{r[h]:.4f}" for h in header[2:]])
        a = table["average"]
        w.writerow(["Average", ""] + [f"{a[h]:.4f}" if h in a else "" for h in header[2:]])


def short_label(dataset: str, width: int = 20) -> str:
    """A dataset's name as a plot label: `folder:/long/path/pets` -> `pets`, `split:.../x.json` -> `x`."""
    prefix, sep, rest = dataset.partition(":")
    if sep and prefix in ("folder", "images", "split"):
        dataset = Path(rest.rstrip("/\\")).stem or rest
    return dataset if len(dataset) <= width else dataset[: width - 1] + "…"


def figure(protocol: str, table: dict):
    """The bar chart of one protocol's table: short labels, error bars inside the axes, the legend
    above the plot (never over a bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table["rows"]
    labels = [short_label(r["dataset"]) for r in rows] + ["Average"]
    series = (["base", "novel", "hm"] if protocol == "base2novel" else ["accuracy"])
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(labels) + 2), 4.3))
    top = 100.0
    for i, name in enumerate(series):
        values = [r[name] for r in rows] + [table["average"][name]]
        # no bar for what has no spread (HM of the means, the Average): NaN draws nothing
        errs = [r.get(f"{name}_std", float("nan")) for r in rows] + [float("nan")]
        top = max([top, *(v + e for v, e in zip(values, errs) if e == e)])
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(labels))]
        ax.bar(xs, values, width, yerr=errs, label="HM" if name == "hm" else name.capitalize(), capsize=2)
    ax.set_xticks(range(len(labels)), labels, rotation=35 if len(labels) > 4 else 0,
                  ha="right" if len(labels) > 4 else "center")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, top * 1.04)  # a mean near 100 keeps its whole error bar
    if len(series) > 1:
        ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(series), frameon=False)
    ax.set_title(TITLES.get(protocol, protocol), pad=30 if len(series) > 1 else 6)
    fig.tight_layout()
    return fig


def plot(path: Path, protocol: str, table: dict) -> None:
    import matplotlib.pyplot as plt

    fig = figure(protocol, table)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def report(run_dirs, out_dir, select: str = "last", plots: bool = True) -> dict:
    """Write report.md, report.json, and <protocol>.csv / .png into `out_dir`; return the tables."""
    files = find_runs(run_dirs)
    tables = aggregate([(str(f), read_json(f)) for f in files], select)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(tables, select)
    with atomic_open(out_dir / "report.md", "w") as f:
        f.write(text)
    write_json(out_dir / "report.json", {"select": select, "runs": [str(f) for f in files], "tables": tables})
    for protocol, table in tables.items():
        write_csv(out_dir / f"{protocol}.csv", protocol, table)
        if plots:
            plot(out_dir / f"{protocol}.png", protocol, table)
    print(text)
    return tables


def register(sub) -> None:
    p = sub.add_parser("report", help="aggregate distillation runs over seeds into the paper's tables",
                       description="Reads RUN_DIRS/**/metrics.json; writes report.md, report.json, and a CSV "
                                   "and PNG per protocol.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--select", choices=SELECTIONS, default="last",
                   help="which result of each run: last epoch (default), best on val, or the official "
                        "best-on-test number (only with runs made with --official-best-on-test)")
    p.add_argument("--no-plot", action="store_true")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from promptkd.runs import check_apart

    for run in args.run_dirs:  # `report runs --out runs/report` is fine: out may lie inside a run folder
        check_apart(args.out, {}, roots={"run folder": run})
    report(args.run_dirs, args.out, args.select, not args.no_plot)
    return 0
