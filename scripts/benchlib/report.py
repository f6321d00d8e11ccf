"""Output: the terminal table, the JSON file, docs/benchmarks.md and its plot.

Every figure printed or written here comes from the Rows of the current run.
"""

import dataclasses
import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

from .results import fmt_number, fmt_ratio, fmt_value

HEADER = ["measurement", "cowfs", "baseline", "cowfs vs baseline", "target", "result"]


def machine_info(workdir):
    def cmd(*argv):
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
            return out.strip().splitlines()[0] if out.strip() else "?"
        except OSError:
            return "?"

    cpu, memory = "?", "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), "?")
        with open("/proc/meminfo") as f:
            kib = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
            memory = f"{kib / (1 << 20):.1f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "kernel": platform.release(),
        "cpu": f"{cpu} ({os.cpu_count()} CPUs)",
        "memory": memory,
        "python": platform.python_version(),
        "git": cmd("git", "--version"),
        "mkfs.xfs": cmd("mkfs.xfs", "-V"),
        "image host filesystem": cmd("stat", "-f", "-c", "%T", str(workdir)),
    }


# --------------------------------------------------------------------------
# cells


def cells(row, width=None):
    """The table cells of a row; ``width`` cuts error texts (full in the details)."""
    def value(v):
        text = fmt_value(v)
        if width and v.error and len(text) > width:
            return text[:width - 1] + "…"
        return text

    several = len(row.baselines) > 1
    baselines = "; ".join(value(b) if b.label == "native" else f"{b.label} {value(b)}"
                          for b in row.baselines) or "—"
    ratios = row.ratio_note or "; ".join(
        (f"{b.label}: " if several else "") + fmt_ratio(row.ratio(b))
        for b in row.baselines if row.ratio(b) is not None) or "—"
    return [row.title, value(row.cowfs), baselines, ratios, row.target, row.verdict]


def text_table(rows):
    table = [HEADER] + [cells(r, width=40) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADER))]
    out = []
    for n, line in enumerate(table):
        out.append("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def markdown_table(rows):
    def esc(text):
        return text.replace("|", "\\|")
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in rows:
        lines.append("| " + " | ".join(esc(c) for c in cells(r)) + " |")
    return "\n".join(lines)


def detail_lines(rows):
    """Notes, then errors in full (the table cuts them), each error once."""
    out, errors = [], {}
    for r in rows:
        for key, value in r.notes.items():
            shown = fmt_number(value) if isinstance(value, (int, float)) else str(value)
            out.append(f"{r.key}: {key}: {shown}")
        for v in [r.cowfs] + r.baselines:
            if v.error:
                errors.setdefault((v.label, v.error), []).append(r.key)
    for (label, error), keys in errors.items():
        out.append(f"{', '.join(keys)}: {label}: {error}")
    return out


# --------------------------------------------------------------------------
# files


def write_json(path, meta, rows):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"meta": meta, "rows": [r.to_json() for r in rows]}
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def plot(path, rows):
    """Write the PNG; return None, or why there is no plot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib not available ({e})"
    fig, (ax_a, ax_c) = plt.subplots(1, 2, figsize=(12, 4.5))
    _plot_checkpoints(ax_a, [r for r in rows if r.key.startswith("A/")])
    _plot_ratios(ax_c, [r for r in rows if r.key.startswith("C/") and r.baselines])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _plot_checkpoints(ax, rows):
    ax.set_title("A: checkpoint after a 10-file turn")
    series = {}
    for r in rows:
        files = int(r.key.split("/")[1])
        for v in [r.cowfs] + r.baselines:
            if v.ok:
                series.setdefault(v.label, []).append((files, v.median))
    for label, points in series.items():
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", label=label)
    ax.axhline(5, color="grey", linestyle="--", linewidth=1, label="target (cowfs)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("files in the tree")
    ax.set_ylabel("ms (median)")
    ax.legend(fontsize="small")


def _plot_ratios(ax, rows):
    ax.set_title("C: agent work, cowfs ÷ native (median)")
    points = [(r.key.split("/", 1)[1], r.ratio(r.baselines[0])) for r in rows]
    points = [(name, ratio) for name, ratio in points if ratio is not None]
    if not points:
        ax.text(0.5, 0.5, "no cowfs figures in this run", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
        return
    names, ratios = zip(*points)
    ax.bar(names, ratios)
    ax.axhline(3, color="grey", linestyle="--", linewidth=1, label="geometric-mean target")
    ax.axhline(5, color="red", linestyle=":", linewidth=1, label="per-operation limit")
    ax.set_ylabel("× native")
    ax.tick_params(axis="x", labelrotation=30)
    ax.legend(fontsize="small")


MEASURED = """\
- **A** — `cowfs checkpoint` timed as a whole process, after a turn that rewrote 10 files
  of a tree of 10 KB files (100 per directory). Baselines: a shadow git repository
  (GIT_DIR outside the tree, `git add -A` + `git commit -q`, the incremental commit of the
  same 10-file turn; the first commit is only a note) and `cp -r --reflink=always` of the
  whole tree. The `python -c pass` time is noted: no Python CLI can be faster.
- **B** — open `O_WRONLY`, `pwrite` of 1 byte in the middle, close, on a non-sparse file, as
  the first change of a fresh turn, through the mount vs directly on XFS. Store growth is the
  XFS image's used blocks (`statvfs`, shared extents counted once) before vs after, the
  checkpoint that seals the write included.
- **C** — agent-like work, each variant on its own fresh directory of the same XFS image,
  repetitions interleaved: untar of the running interpreter's standard library (no
  site-packages, no `__pycache__`), `grep -r -F`, `find -type f | wc -l`, `git status` in a
  synthetic repository (second run timed), `python -m compileall -q`, re-reading every file
  (second pass timed), `rm -rf`. The geometric mean leaves out re-read, which has its own target.
- **D** — the daemon's VmRSS (`/proc/PID/status`, PID from `cowfs status --json`) after a
  `find -printf` (lookup + stat) of the tree and that many one-file turns checkpointed.
- **E** — `cowfs rollback` to the turn sealed just before a change of that many files (80 %
  rewritten, 10 % deleted, 10 % created) vs `git checkout -- . && git clean -fdq` in a
  shadow git repository. Both are checked to have restored the files.
- **X** — `cowfs export-git` of that many turns vs committing each turn into a shadow git
  repository (issue 4); skipped while the command does not exist.
"""


def write_docs(docs_dir, meta, rows, config):
    docs_dir = Path(docs_dir)
    docs_dir.mkdir(parents=True, exist_ok=True)
    png = docs_dir / "benchmarks.png"
    no_plot = plot(png, rows)
    if no_plot and png.exists():
        png.unlink()  # a plot from an older run would contradict the table
    machine = meta["machine"]
    lines = [
        "# cowfs benchmarks",
        "",
        "<!-- Generated by scripts/bench. Do not edit: rerun the script. -->",
        "",
        f"Generated by `{meta['command']}` on {machine['date']}"
        f" in {meta['duration_s'] / 60:.1f} min.",
        "",
        "| machine | |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in machine.items() if k != "date"]
    lines += [
        "",
        "## Results",
        "",
        "Medians of the repetitions of this run; a ratio compares cowfs with the baseline"
        " measured in the same run on the same XFS image (loop device, `reflink=1`).",
        "",
        markdown_table(rows),
        "",
        "![benchmark plot](benchmarks.png)" if not no_plot else f"(No plot: {no_plot}.)",
        "",
        "## What is measured",
        "",
        MEASURED,
        "## Parameters",
        "",
        "```",
        json.dumps(dataclasses.asdict(config), indent=None),
        "```",
        "",
        "## Notes and errors from this run",
        "",
    ]
    lines += [f"- {line}" for line in detail_lines(rows)] or ["- none"]
    (docs_dir / "benchmarks.md").write_text("\n".join(lines) + "\n")
    return docs_dir / "benchmarks.md", no_plot
