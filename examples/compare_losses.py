"""``python examples/train_arcface.py --compare-losses``: the same training (backbone, data, steps, learning
rate) with each loss of ``--losses``, for ``--seeds`` seeds each, then a table of the held-out verification
(TAR at FAR = 1e-3 and 1e-4, 1:1 accuracy; mean and spread over the seeds), the way papers compare losses on
LFW and IJB-C.

A seed fixes the identities, the data stream, the evaluation set and the initial backbone: every loss sees the
same ones for a given seed, so the spread over seeds is what the task and the initialisation leave to chance.
Runs are independent processes of one CPU thread each (``--jobs`` of them at a time) in a world of one process.

Writes ``<out>/loss_comparison.json`` (every run, the summary, the settings, the machine), ``.md`` (the
table) and ``.png`` (the same as bars; needs matplotlib, skipped with a note without it).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch

from train_arcface import FAR, LOSS_TITLES, LOW_FAR, World, train

#: (JSON key, table heading) of the compared metrics, at the last evaluation of each run
METRICS = (("tar_at_low_far", f"TAR @ FAR={LOW_FAR:g}"), ("tar_at_far", f"TAR @ FAR={FAR:g}"),
           ("accuracy", "1:1 accuracy"))
#: the settings that define the task and the training, recorded with the table
SETTINGS = ("identities", "signal_dim", "nuisance_dim", "noise", "nuisance_std", "conditions", "condition_strength",
            "condition_bias", "eval_identities", "eval_samples",
            "hidden", "embedding_dim", "s", "m", "batch_size", "steps", "lr", "momentum", "weight_decay", "backend")


def run_one(settings: dict) -> dict:
    """One (loss, seed) run, in a worker process: its last evaluation and its time."""
    import argparse
    args = argparse.Namespace(**settings)
    torch.set_num_threads(1)
    history = train(args, World())
    last = history["eval"][-1]
    return {"loss": args.loss, "seed": args.seed, "seconds": round(history["seconds"], 2),
            "final_train_loss": history["loss"][-1]["loss"], "eval_step": last["step"],
            **{key: last[key] for key, _ in METRICS}}


def summarise(runs: list, losses: list) -> list:
    """Per loss: mean, sample standard deviation (0 for one seed), min and max of each metric over the seeds."""
    rows = []
    for loss in losses:
        mine = [r for r in runs if r["loss"] == loss]
        row = {"loss": loss, "title": LOSS_TITLES[loss], "seeds": len(mine)}
        for key, _ in METRICS:
            values = [r[key] for r in mine]
            row[key] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                        "min": min(values), "max": max(values)}
        rows.append(row)
    order = sorted(rows, key=lambda r: -r["tar_at_low_far"]["mean"])
    for rank, row in enumerate(order, 1):
        row["rank"] = rank  # by mean TAR at the lower FAR, the papers' headline number
    return rows


def machine() -> dict:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": model, "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"# Loss comparison: {s['identities']} synthetic identities, {s['steps']} steps, "
             f"{report['seeds']} seed(s) per loss", "",
             f"Held-out verification ({s['eval_identities']} unseen identities x {s['eval_samples']} samples, every "
             f"pair) after the last step; mean ± sample standard deviation over the seeds, [min, max] below. Rank: "
             f"by mean TAR at FAR = {LOW_FAR:g}.", "",
             "| loss | " + " | ".join(title for _, title in METRICS) + " | rank |",
             "|---|" + "---|" * len(METRICS) + "---|"]
    for row in report["summary"]:
        cells = [f"{row[key]['mean']:.3f} ± {row[key]['std']:.3f}<br>[{row[key]['min']:.3f}, {row[key]['max']:.3f}]"
                 for key, _ in METRICS]
        lines.append(f"| {row['title']} | " + " | ".join(cells) + f" | {row['rank']} |")
    m = report["machine"]
    lines += ["", f"Settings: {', '.join(f'{k}={v}' for k, v in s.items())}.",
              f"Machine: {m['cpu']} ({m['cpu_count']} cores), torch {m['torch']}, Python {m['python']}; "
              f"{report['jobs']} run(s) at a time, 1 thread each; {report['seconds'] / 60:.1f} min in all.",
              f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def plot(report: dict, path: str) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = report["summary"]
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / len(METRICS)
    for i, (key, title) in enumerate(METRICS):
        ax.bar([j + i * width for j in range(len(rows))], [r[key]["mean"] for r in rows], width,
               yerr=[r[key]["std"] for r in rows], capsize=2, label=title)
    ax.set_xticks([j + width * (len(METRICS) - 1) / 2 for j in range(len(rows))], [r["title"] for r in rows],
                  rotation=20, ha="right", fontsize=8)
    ax.set(ylabel="held-out verification", ylim=(0, 1.02))
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"{report['settings']['identities']} synthetic identities, {report['settings']['steps']} steps, "
                 f"mean ± std over {report['seeds']} seed(s)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def compare(args) -> dict:
    import sys
    losses = args.losses.split(",")
    os.makedirs(args.out, exist_ok=True)
    base = {**vars(args), "compare_losses": False, "no_progress": True, "log_every": 0, "threads": 1, "quiet": True,
            "metrics": None, "plot": None, "checkpoint": None, "resume": False, "eval_every": args.steps}
    jobs = [{**base, "loss": loss, "seed": args.seed + k} for k in range(args.seeds) for loss in losses]
    started = time.perf_counter()
    runs = []

    def done(result: dict) -> None:
        runs.append(result)
        print(f"[{len(runs)}/{len(jobs)}] {LOSS_TITLES[result['loss']]}, seed {result['seed']}: TAR@FAR={LOW_FAR:g} "
              f"{result['tar_at_low_far']:.3f}, TAR@FAR={FAR:g} {result['tar_at_far']:.3f}, accuracy "
              f"{result['accuracy']:.3f} ({result['seconds']:.0f} s)", flush=True)

    if args.jobs == 1:
        for job in jobs:
            done(run_one(job))
    else:  # spawn: a fresh interpreter per worker, no forked torch thread pools
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            for result in pool.map(run_one, jobs):
                done(result)
    runs.sort(key=lambda r: (losses.index(r["loss"]), r["seed"]))
    report = {"settings": {k: getattr(args, k) for k in SETTINGS}, "losses": losses, "seeds": args.seeds,
              "first_seed": args.seed, "jobs": args.jobs, "seconds": round(time.perf_counter() - started, 1),
              "machine": machine(), "command": "python examples/train_arcface.py " + " ".join(sys.argv[1:]),
              "summary": summarise(runs, losses), "runs": runs}
    stem = os.path.join(args.out, "loss_comparison")
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(report))
    print(markdown(report))
    print(f"wrote {stem}.json, {stem}.md" + (f", {stem}.png" if plot(report, stem + ".png") else
                                              " (no plot: matplotlib is not installed)"), flush=True)
    return report
