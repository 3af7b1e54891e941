"""The report of a curriculum run (`<output_dir>/report/`): `results.md` / `results.json` (val metrics of the
baseline, each teacher, the student after each stage, direct; adaptation costs; wall time of each phase),
`loss.png`, `ap.png` and `ap_vs_latency.png`, `student.pt` (the final student as a plain zoo checkpoint) and, with the
export extra, `student.onnx`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from curriculum.config import RunJobConfig
from curriculum.files import atomic_save, atomic_write_json
from curriculum.plan import Stage, stage_borders, total_epochs

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def metrics_row(metrics: dict[str, Any]) -> dict[str, float]:
    """The report's metrics of one evaluation (-1: undefined); a Mask R-CNN's mask AP as ``mask_AP``, ``mask_AP50``."""
    row = {k: float(metrics.get(k, -1.0)) for k in METRICS}
    for k in ("AP", "AP50"):
        if "segm" in metrics:
            row[f"mask_{k}"] = float(metrics["segm"].get(k, -1.0))
    return row



def _fmt(v: float) -> str:
    return "-" if v is None or v < 0 else f"{100 * v:.2f}"


def write_report(job: RunJobConfig, out: Path, stages: list[Stage], summaries: list[dict], results: list[dict],
                 teacher_evals: dict[str, dict], order: list[str], costs: dict | None, others: dict,
                 final: Path, inherited: int, phases: Any, wall: float, latency: dict[str, Any] | None = None,
                 export_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """`latency`: {"baseline" | "teacher <name>" | "student": `curriculum.latency.measure` row}; `export_size`: the
    input size of `student.onnx`, written when the export extra is installed."""
    rep = out / "report"
    rep.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    if "baseline" in others:
        rows.append({"name": f"baseline {job.student.name} (no distillation)", "role": "baseline",
                     "epochs": total_epochs(stages), "val": others["baseline"]["val"]})
    for name in order:
        rows.append({"name": f"teacher {name}", "role": "teacher", "val": metrics_row(teacher_evals[name])})
    rows += results
    if "direct" in others:
        rows.append({"name": f"direct from {others['direct']['teacher']} only", "role": "direct",
                     "epochs": total_epochs(stages), "val": others["direct"]["val"]})
    latency = latency or {}
    final_row = [r for r in rows if r["role"] == "stage"][-1:]
    for r in rows:
        key = "student" if r in final_row else {"baseline": "baseline", "teacher": r["name"]}.get(r["role"])
        if key in latency:
            r["latency"] = latency[key]
    # Curriculum history on one epoch axis, stage-end val from the driver's evaluation.
    history, offset = [], 0
    for st, summ, res in zip(stages, summaries, results):
        for h in summ["history"]:
            rec = {k: v for k, v in h.items() if k not in ("stage",)}
            rec["epoch"] = offset + h["epoch"]
            history.append(rec)
        if history:
            history[-1]["val"] = res["val"]
        offset += st.epochs
    student_ckpt = torch.load(final, map_location="cpu", weights_only=True)
    student_ckpt["curriculum"] = {"teachers": order, "stages": [s.name for s in stages],
                                  "config": str(out / "config.yaml")}
    atomic_save(student_ckpt, rep / "student.pt")
    exported = _export_student(rep, export_size)
    _plot(rep, history, others, stages,
          {name: teacher_evals[name]["AP"] for name in order if "AP" in teacher_evals[name]})
    lines = [
        f"# Curriculum run: {job.student.name} <- {' -> '.join(order)}",
        "",
        f"Order: {job.order}" + (" (adaptation cost: held-out 1 - R^2 of a fitted 1x1 map from student to teacher "
                                 "FPN features; closest first)" if costs else "") + f". Decay: {job.decay.kind}, "
        f"{'restarting every stage' if job.decay.restart else 'over the whole curriculum'}. Losses: "
        f"{', '.join(sorted({e['name'] for s in stages for e in s.losses}))}"
        + (f", feature terms calibrated at each stage start to {job.kd_ratio} x the detector loss of the student "
           + ("the run starts from" if job.kd_reference == "run" else "the stage starts from") if job.kd_ratio else "")
        + f". Inherited neck/head tensors from the first teacher: {inherited}.",
        "",
        "Val COCO box metrics x100" + (f" on the first {job.eval.max_images} val images" if job.eval.max_images else "")
        + ":",
        "",
    ]
    cols = METRICS + (("mask_AP", "mask_AP50") if any("mask_AP" in r["val"] for r in rows) else ())
    lines += ["| model | epochs | " + " | ".join(c.replace("_", " ") for c in cols) + " | ms/img eager | "
              "ms/img onnxruntime |", "|---|---:|" + "---:|" * len(cols) + "---:|---:|"]
    for r in rows:
        lat = r.get("latency") or {}
        ms = [f"{lat[k]['median']:.1f}" if k in lat else "-" for k in ("eager_ms", "onnxruntime_ms")]
        lines.append(f"| {r['name']} | {r.get('epochs', '-')} | "
                     + " | ".join(_fmt(r["val"].get(k, -1.0)) for k in cols) + f" | {ms[0]} | {ms[1]} |")
    if latency:
        some = next(iter(latency.values()))
        lines += ["", f"Latency: median ms per image over {some['eager_ms']['runs']} runs after warm-up, batch 1, "
                  f"input {'x'.join(map(str, some['input'][2:]))}, CPU, {some['threads']} thread(s) "
                  "(`curriculum latency` measures any checkpoint); `ap_vs_latency.png` plots AP against it."]
        _plot_ap_vs_latency(rep, rows)
    if exported:
        lines += ["", f"`student.onnx`: the final student with post-processing in the graph, input "
                  f"{exported['input']} (checked by onnxruntime: boxes within {exported['check_max_box_px']:.2g} px)."]
    if costs:
        lines += ["", "Adaptation costs (lower = closer; per level in brackets):", ""]
        for n in order:
            c = costs[n]
            lines.append(f"- {n}: {c['cost']:.4f} (" + ", ".join(f"{l} {v:.3f}" for l, v in c["levels"].items()) + ")")
    lines += ["", "Wall time per phase (this invocation; and when it was computed, possibly by an earlier one):", "",
              "| phase | seconds now | computed in (s) |", "|---|---:|---:|"]
    for p in phases.rows:
        c = p.get("computed_s")
        lines.append(f"| {p['phase']} | {p['seconds']:.1f}{' (reused)' if p['reused'] else ''} | "
                     f"{'-' if c is None else f'{c:.1f}'} |")
    lines += ["", f"Total wall time of this invocation: {wall:.1f} s. Final student: `{rep / 'student.pt'}` "
              "(plain zoo checkpoint: `teachers.zoo.load_detector`)."]
    md = "\n".join(lines)
    (rep / "results.md").write_text(md + "\n")
    report = {"student": job.student.name, "order": order, "order_mode": job.order, "adaptation_costs": costs,
              "rows": rows, "phases": phases.rows, "wall_s": round(wall, 1), "inherited_tensors": inherited,
              "student_checkpoint": str(rep / "student.pt"), "history": history, "export": exported,
              "baseline_history": others.get("baseline", {}).get("summary", {}).get("history"),
              "direct_history": others.get("direct", {}).get("summary", {}).get("history")}
    atomic_write_json(report, rep / "results.json")
    report["markdown"] = md
    return report


def _export_student(rep: Path, size: tuple[int, int] | None) -> dict[str, Any] | None:
    """`student.onnx` beside `student.pt` when the export extra is installed (else nothing, said in the log)."""
    import logging

    from curriculum.latency import has_onnxruntime

    if size is None:
        return None
    if not has_onnxruntime():
        logging.getLogger(__name__).info("no student.onnx: `pip install -e .[export]` adds onnx and onnxruntime")
        return None
    from curriculum.export import export_detector
    from teachers.zoo import load_detector

    return export_detector(load_detector(rep / "student.pt"), "onnx", rep / "student.onnx", size)


def ap_vs_latency_figure(rows: list[dict[str, Any]]) -> Any:
    """AP against eager CPU latency, one point per model; the student's gain an arrow from the baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    points = {}
    for r in rows:
        lat = (r.get("latency") or {}).get("eager_ms")
        if lat is None or r["val"]["AP"] < 0:
            continue
        x, y = lat["median"], 100 * r["val"]["AP"]
        role = r["role"] if r["role"] != "stage" else "student"
        points[role if role in ("baseline", "student") else r["name"]] = (x, y)
        ax.scatter([x], [y], s=40, marker={"teacher": "s", "baseline": "o"}.get(r["role"], "*"),
                   label=r["name"], zorder=3)
    if "baseline" in points and "student" in points:
        (x0, y0), (x1, y1) = points["baseline"], points["student"]
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=dict(arrowstyle="->", color="black", lw=1.5))
        ax.text((x0 + x1) / 2, (y0 + y1) / 2, f" {y1 - y0:+.1f} AP", va="bottom")
    ax.set_xscale("log")
    from matplotlib.ticker import FormatStrFormatter

    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.set_xlabel("ms per image (CPU, batch 1, eager)")
    ax.set_ylabel("val AP")
    ax.set_title("accuracy for latency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def _plot_ap_vs_latency(rep: Path, rows: list[dict[str, Any]]) -> None:
    import matplotlib.pyplot as plt

    fig = ap_vs_latency_figure(rows)
    fig.savefig(rep / "ap_vs_latency.png", dpi=120)
    plt.close(fig)


def _plot(rep: Path, history: list[dict], others: dict, stages: list[Stage], teacher_ap: dict[str, float]) -> None:
    """loss.png and ap.png (`ap_figure`)."""
    import matplotlib.pyplot as plt

    from trainers.train import plot_history

    plot_history([{k: v for k, v in h.items() if k != "decay"} for h in history], rep, stage_borders(stages))
    fig = ap_figure(history, others, stages, teacher_ap)
    fig.savefig(rep / "ap.png", dpi=100)
    plt.close(fig)


def ap_figure(history: list[dict], others: dict, stages: list[Stage], teacher_ap: dict[str, float]) -> Any:
    """The student's val AP per epoch through the stages (each named over its span, borders dashed), the
    baseline and direct arms, and each teacher's AP as a reference line: did the student reach its teachers?"""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ev = [h for h in history if "val" in h]
    ax.plot([h["epoch"] for h in ev], [100 * h["val"]["AP"] for h in ev], marker="o", label="curriculum AP")
    ax.plot([h["epoch"] for h in ev], [100 * h["val"]["AP50"] for h in ev], marker="o", ls=":", label="curriculum AP50")
    for key in ("baseline", "direct"):
        if key in others:
            hist = others[key]["summary"]["history"]
            pts = [(h["epoch"], 100 * h["val"]["AP"]) for h in hist if "val" in h][:-1]
            pts.append((hist[-1]["epoch"] if hist else 0, 100 * others[key]["val"]["AP"]))
            ax.plot(*zip(*pts), marker="s", label=f"{key} AP")
    for i, (name, ap) in enumerate(teacher_ap.items()):
        ax.axhline(100 * ap, color=f"C{4 + i}", ls="-.", lw=1, label=f"teacher {name} ({100 * ap:.1f} AP)")
    for b in stage_borders(stages):
        ax.axvline(b + 0.5, color="grey", ls="--")
    start = 0
    for st in stages:
        ax.text(start + 0.5 + st.epochs / 2, 1.01, f"stage {st.index + 1}\n{st.teacher or 'no teacher'}",
                transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=7)
        start += st.epochs
    ax.set_xlim(0.5, max(start, 1) + 0.5)
    ax.set_xlabel("epoch"), ax.set_ylabel("val AP (%)"), ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


__all__ = ["METRICS", "ap_figure", "metrics_row", "write_report"]
