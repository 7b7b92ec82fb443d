"""Train a face-recognition-style model end to end with a margin loss (ArcFace by default): a DDP backbone,
the model-parallel margin head, a verification evaluation on held-out identities, checkpoints that resume at
any world size, and a comparison of the losses on the same task.

    python examples/train_arcface.py --steps 200 --plot runs/curves.png        # one process
    torchrun --standalone --nproc_per_node 2 examples/train_arcface.py --checkpoint runs/ckpt
    python examples/train_arcface.py --steps 900 --checkpoint runs/ckpt --resume   # continue on 1 process
    python examples/train_arcface.py --compare-losses --seeds 3 --jobs 2 --out runs/compare_losses

Under torchrun each process is one rank: NCCL with one GPU per rank when CUDA is available, else gloo on CPU.
Without torchrun the script is a world of one process (no process group). Output files go where the options
say (``runs/`` in the commands above: ignored by git); the folders are created.

The data are made on the fly, nothing is downloaded: an identity is a point on the unit sphere of a
``--signal-dim`` space; a sample of it is that point plus Gaussian noise (``--noise``) projected back onto
the sphere, next to ``--nuisance-dim`` coordinates of noise, all mixed by one fixed random rotation. The
nuisance carries a recording condition too (one of ``--conditions`` offsets): in training a share
``--condition-bias`` of an identity's samples come under its own condition, so the condition partly predicts
the training label, while held-out samples draw it uniformly, so a model that learnt it as identity is fooled.
With 2000 identities crowded on a 12-dimensional sphere and that much noise, no loss saturates the held-out
verification (a random backbone verifies near chance; training has to learn which directions carry identity).
Training identities are ``0 .. --identities - 1``; the evaluation identities are drawn from another stream,
so the backbone never saw them.

Every step draws one global batch from (``--seed``, step) and each rank takes its slice, so a resumed run,
at any world size, continues the same data stream. The learning rate is a function of the step (cosine
decay from ``--lr``), so it needs no state of its own.

Evaluation (rank 0, on the backbone's embeddings of ``--eval-identities`` x ``--eval-samples`` held-out
samples, cosine similarity of every pair): 1:1 verification accuracy over balanced pairs (every genuine pair
and as many random impostor pairs), threshold chosen by 10-fold cross-validation as in the LFW protocol; and
TAR at FAR = 1e-3 and 1e-4 over every pair (the threshold is the impostor scores' 1 - FAR quantile).

Output: a progress bar on a terminal; without one (``> log``, nohup, SLURM, torchrun's redirected ranks) a
plain line every ``--log-every`` steps (step/total, loss, learning rate, steps/s, the latest evaluation).
``--compare-losses`` (examples/compare_losses.py) trains each loss of ``--losses`` for ``--seeds`` seeds and
writes a table (markdown, JSON) and a plot into ``--out``.

A checkpoint is a folder ``<dir>/step_<N>/``: the head's shards and its SGD momentum as resharding shard files
(``margin_kernels.distributed.save_sharded``; one file per rank, any world size loads them), and
``trainer.pt`` (backbone, its optimizer, the step, the metrics so far). ``<dir>/latest`` names the last complete
one, written after every rank finished, so a crash mid-save resumes from the previous checkpoint.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import margin_kernels as mk
from margin_kernels.distributed import DistributedMarginHead, load_sharded, save_sharded
from margin_kernels.distributed.checkpoint import WEIGHT, reshard_state_dicts, shard_file_name

#: TAR is reported at these false accept rates (the papers' IJB-C tables: 1e-4, and 1e-3 next to it)
FAR = 1e-3
LOW_FAR = 1e-4
#: the LFW protocol's number of cross-validation folds for the accuracy threshold
FOLDS = 10
EVAL_STREAM = 1_000_003  # seeds the held-out identities apart from the training ones


# ---- the losses ---------------------------------------------------------------------------------------------
#: --loss name -> the margin loss, from the scale s and the margin m (None: the paper's); the scale-free ones
#: (softmax, sphereface: the feature norm is the scale; sphereface2: its own r = 40) ignore s
LOSSES = {
    "softmax": lambda s, m: mk.Softmax(),
    "normface": lambda s, m: mk.NormFace(s=s),
    "sphereface": lambda s, m: mk.SphereFace(m=4 if m is None else int(m)),
    "cosface": lambda s, m: mk.CosFace(s=s, m=0.35 if m is None else m),
    "arcface": lambda s, m: mk.ArcFace(s=s, m=0.5 if m is None else m),
    "curricularface": lambda s, m: mk.CurricularFace(s=s, m=0.5 if m is None else m),
    "adaface": lambda s, m: mk.AdaFace(s=s, m=0.4 if m is None else m),
    "subcenter-arcface": lambda s, m: mk.SubCenterArcFace(s=s, m=0.5 if m is None else m, sub_centers=3),
    "sphereface2": lambda s, m: mk.SphereFace2(m=0.4 if m is None else m),
}
#: how the table and the logs name them
LOSS_TITLES = {"softmax": "Softmax", "normface": "NormFace", "sphereface": "SphereFace", "cosface": "CosFace",
               "arcface": "ArcFace", "curricularface": "CurricularFace", "adaface": "AdaFace",
               "subcenter-arcface": "Sub-center ArcFace (K=3)", "sphereface2": "SphereFace2"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = p.add_argument_group("synthetic identities")
    data.add_argument("--identities", type=int, default=2000, help="training identities (classes of the head)")
    data.add_argument("--signal-dim", type=int, default=12, help="dimension of the identity sphere")
    data.add_argument("--nuisance-dim", type=int, default=48, help="coordinates of pure noise next to it")
    data.add_argument("--noise", type=float, default=0.5, help="per-sample noise around an identity's point")
    data.add_argument("--nuisance-std", type=float, default=0.3, help="std of the nuisance coordinates")
    data.add_argument("--conditions", type=int, default=8, help="recording conditions (nuisance offsets)")
    data.add_argument("--condition-strength", type=float, default=1.0, help="norm of a condition's offset")
    data.add_argument("--condition-bias", type=float, default=0.8,
                      help="share of a training identity's samples under its own condition (0: no bias)")
    data.add_argument("--eval-identities", type=int, default=300, help="held-out identities for verification")
    data.add_argument("--eval-samples", type=int, default=8, help="samples per held-out identity")
    model = p.add_argument_group("model and training")
    model.add_argument("--hidden", type=int, default=256, help="backbone width")
    model.add_argument("--embedding-dim", type=int, default=64)
    model.add_argument("--loss", default="arcface", choices=sorted(LOSSES), help="the head's margin loss")
    # s = 64 is for 10^5+ classes; with a few thousand, s = 64 (or 32) saturates the softmax from the first step
    # and training stalls (AdaCos's rule of thumb: s ~ sqrt(2) ln(C - 1), about 11 for C = 2000)
    model.add_argument("--s", type=float, default=16.0, help="scale of the normalised losses (not softmax, "
                       "sphereface, sphereface2: those keep their papers' own)")
    model.add_argument("--m", type=float, default=None, help="margin (default: the loss's paper value)")
    model.add_argument("--sample-rate", type=float, default=1.0, help="Partial FC sample rate of the head")
    model.add_argument("--backend", default="auto", help="margin_kernels backend of the head")
    model.add_argument("--batch-size", type=int, default=256, help="global batch (split over the ranks)")
    model.add_argument("--steps", type=int, default=600, help="total steps (a resumed run stops here too)")
    model.add_argument("--lr", type=float, default=0.01, help="peak SGD learning rate (cosine decay to 0)")
    model.add_argument("--momentum", type=float, default=0.9)
    model.add_argument("--weight-decay", type=float, default=5e-4)
    model.add_argument("--seed", type=int, default=0)
    run = p.add_argument_group("evaluation, checkpoints, output")
    run.add_argument("--eval-every", type=int, default=100, help="also evaluate before the first step and at the end")
    run.add_argument("--checkpoint", metavar="DIR", help="save checkpoints into DIR")
    run.add_argument("--checkpoint-every", type=int, default=0, help="0: only at the end")
    run.add_argument("--resume", action="store_true", help="continue from DIR/latest when there is one")
    run.add_argument("--metrics", metavar="JSON", help="write the loss and evaluation history here (rank 0)")
    run.add_argument("--plot", metavar="PNG", help="loss and verification accuracy against the step (matplotlib)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--log-every", type=int, default=20, metavar="N", help="print a plain progress line every N "
                     "steps when there is no progress bar (output not a terminal, or --no-progress); 0: never")
    compare = p.add_argument_group("loss comparison (one process, no torchrun)")
    compare.add_argument("--compare-losses", action="store_true", help="train every loss of --losses for "
                         "--seeds seeds each (same backbone, data, steps) and write a table and a plot to --out")
    compare.add_argument("--losses", default=",".join(LOSSES), help="comma-separated, for --compare-losses")
    compare.add_argument("--seeds", type=int, default=3, help="seeds per loss (--seed, --seed + 1, ...)")
    compare.add_argument("--out", metavar="DIR", default=os.path.join("runs", "compare_losses"),
                         help="output folder of --compare-losses (created)")
    compare.add_argument("--jobs", type=int, default=1, help="runs in parallel (one CPU thread each)")
    run.add_argument("--threads", type=int, default=None, help="CPU threads per process")
    args = p.parse_args(argv)
    for name in ("identities", "signal_dim", "conditions", "eval_identities", "batch_size", "steps", "hidden", "embedding_dim"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.eval_samples < 2:
        p.error("--eval-samples must be >= 2 (a genuine pair needs two samples of an identity)")
    if args.resume and not args.checkpoint:
        p.error("--resume needs --checkpoint DIR")
    if args.log_every < 0:
        p.error("--log-every must be >= 0")
    if args.compare_losses:
        unknown = [name for name in args.losses.split(",") if name not in LOSSES]
        if unknown or not args.losses:
            p.error(f"--losses: unknown {unknown} (known: {', '.join(LOSSES)})")
        if args.seeds < 1 or args.jobs < 1:
            p.error("--seeds and --jobs must be >= 1")
        if args.checkpoint or "RANK" in os.environ:
            p.error("--compare-losses runs in one process, without --checkpoint (and not under torchrun)")
    if args.plot:  # checked before training, so a long run never ends in an import error
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("--plot needs matplotlib: pip install matplotlib")
    for path in (args.metrics, args.plot):  # made before training: a long run never ends in a missing folder
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return args


# ---- the process group --------------------------------------------------------------------------------------
@dataclass
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()


#: seconds a finished run waits for gloo's teardown before it exits without it
TEARDOWN_TIMEOUT_S = 60


def close_world() -> None:
    """destroy_process_group, bounded: everything is written by now (checkpoints, metrics, the plot), and a gloo
    teardown has still hung once in a while in this project's CI after the barrier (a resumed 2-rank run: the
    training finished and printed its summary, then a rank never left destroy_process_group). A finished run
    must not hang its job scheduler: after TEARDOWN_TIMEOUT_S the process says so and exits with success."""
    done = threading.Event()
    threading.Thread(target=lambda: (dist.destroy_process_group(), done.set()), daemon=True).start()
    if not done.wait(TEARDOWN_TIMEOUT_S):
        print(f"rank {os.environ.get('RANK', '?')}: the process group's teardown did not finish in "
              f"{TEARDOWN_TIMEOUT_S} s; the run is complete, exiting without it", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(0)


def start_world() -> World:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK: one rank per process, NCCL on GPUs, else gloo."""
    if "RANK" not in os.environ:
        return World(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        device = torch.device("cuda", local_rank)
    else:
        dist.init_process_group("gloo")
        device = torch.device("cpu")
    return World(dist.get_rank(), dist.get_world_size(), device)


# ---- synthetic identities -----------------------------------------------------------------------------------
class SyntheticIdentities:
    """Samples of identities that live on a sphere, hidden among nuisance coordinates (see the module doc)."""

    def __init__(self, args, device):
        self.args, self.device = args, device
        g = torch.Generator().manual_seed(args.seed)
        self.input_dim = args.signal_dim + args.nuisance_dim
        self.rotation, _ = torch.linalg.qr(torch.randn(self.input_dim, self.input_dim, generator=g))
        self.train_centres = self.centres(args.identities, args.seed)
        # the recording conditions (think camera, lighting): an offset of the nuisance coordinates each
        self.conditions = args.condition_strength * F.normalize(
            torch.randn(args.conditions, args.nuisance_dim, generator=g, dtype=torch.float64), dim=1)

    def centres(self, count: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return F.normalize(torch.randn(count, self.args.signal_dim, generator=g, dtype=torch.float64), dim=1)

    def samples(self, centres: torch.Tensor, ids: torch.Tensor, g: torch.Generator, bias: float) -> torch.Tensor:
        """Samples of identities ``ids``; a share ``bias`` of them under their identity's own condition (id mod
        the number of conditions), the others under a uniformly drawn one."""
        a = self.args
        signal = F.normalize(centres[ids] + a.noise / math.sqrt(a.signal_dim)
                             * torch.randn(len(ids), a.signal_dim, generator=g, dtype=torch.float64), dim=1)
        nuisance = a.nuisance_std * torch.randn(len(ids), a.nuisance_dim, generator=g, dtype=torch.float64)
        own = torch.rand(len(ids), generator=g) < bias
        condition = torch.where(own, ids % a.conditions, torch.randint(0, a.conditions, (len(ids),), generator=g))
        nuisance = nuisance + self.conditions[condition]
        return (torch.cat([signal, nuisance], dim=1) @ self.rotation.double()).float()

    def batch(self, step: int, world: World):
        """This rank's slice of the global batch of ``step``: identical for any world size."""
        g = torch.Generator().manual_seed(self.args.seed * 1_000_003 + step)
        ids = torch.randint(0, self.args.identities, (self.args.batch_size,), generator=g)
        x = self.samples(self.train_centres, ids, g, self.args.condition_bias)
        per_rank = self.args.batch_size // world.size
        lo, hi = world.rank * per_rank, (world.rank + 1) * per_rank
        return x[lo:hi].to(world.device), ids[lo:hi].to(world.device)

    def evaluation_set(self):
        a = self.args
        g = torch.Generator().manual_seed(a.seed + EVAL_STREAM)
        ids = torch.arange(a.eval_identities).repeat_interleave(a.eval_samples)
        # held out: the condition says nothing about the identity, a model that learnt it as one is fooled
        return self.samples(self.centres(a.eval_identities, a.seed + EVAL_STREAM), ids, g, 0.0), ids


# ---- verification --------------------------------------------------------------------------------------------
def best_threshold_accuracy(scores: torch.Tensor, same: torch.Tensor) -> tuple[float, float]:
    """(threshold, accuracy) of the best threshold 'same identity iff score > threshold'."""
    order = torch.argsort(scores)
    s, y = scores[order], same[order].double()
    # predicting "same" for every pair past position i: correct = impostors at or below i + genuines above i
    impostors_below = torch.cumsum(1 - y, 0)
    genuines_above = y.sum() - torch.cumsum(y, 0)
    correct = torch.cat([y.sum().view(1), impostors_below + genuines_above])
    best = int(torch.argmax(correct))
    threshold = s[best - 1].item() if best > 0 else s[0].item() - 1.0
    return threshold, correct[best].item() / len(s)


def verification(embeddings: torch.Tensor, ids: torch.Tensor, seed: int) -> dict:
    e = F.normalize(embeddings.double(), dim=1)
    scores = e @ e.T
    i, j = torch.triu_indices(len(ids), len(ids), offset=1)
    pair_scores, same = scores[i, j], ids[i] == ids[j]
    genuine, impostor = pair_scores[same], pair_scores[~same]
    # TAR at FAR: the threshold lets through a FAR share of every impostor pair
    ordered = torch.sort(impostor).values
    tar = {far: (genuine > ordered[int((1.0 - far) * (impostor.numel() - 1))]).double().mean().item()
           for far in (FAR, LOW_FAR)}
    # 1:1 accuracy on balanced pairs, threshold from the other folds (LFW's 10-fold protocol)
    g = torch.Generator().manual_seed(seed)
    chosen = impostor[torch.randperm(impostor.numel(), generator=g)[:genuine.numel()]]
    balanced = torch.cat([genuine, chosen])
    labels = torch.cat([torch.ones_like(genuine, dtype=torch.bool), torch.zeros_like(chosen, dtype=torch.bool)])
    fold_of = torch.randperm(balanced.numel(), generator=g) % FOLDS
    correct = 0
    for fold in range(FOLDS):
        test = fold_of == fold
        threshold_fold, _ = best_threshold_accuracy(balanced[~test], labels[~test])
        correct += int(((balanced[test] > threshold_fold) == labels[test]).sum())
    return {"accuracy": correct / balanced.numel(), "tar_at_far": tar[FAR], "far": FAR,
            "tar_at_low_far": tar[LOW_FAR], "low_far": LOW_FAR,
            "genuine_pairs": genuine.numel(), "impostor_pairs": impostor.numel()}


@torch.no_grad()
def evaluate(backbone: nn.Module, eval_x: torch.Tensor, eval_ids: torch.Tensor, world: World, seed: int) -> dict:
    module = unwrap(backbone)
    was_training = module.training
    module.eval()
    embeddings = module(eval_x.to(world.device)).float().cpu()
    module.train(was_training)
    return verification(embeddings, eval_ids, seed)


# ---- model --------------------------------------------------------------------------------------------------
def unwrap(backbone: nn.Module) -> nn.Module:
    """The backbone itself, without its DDP wrapper (for evaluation and checkpoints)."""
    return backbone.module if isinstance(backbone, nn.parallel.DistributedDataParallel) else backbone


def make_backbone(input_dim: int, args) -> nn.Module:
    torch.manual_seed(args.seed)  # the same initial backbone on every rank and at every world size
    return nn.Sequential(nn.Linear(input_dim, args.hidden), nn.LayerNorm(args.hidden), nn.ReLU(),
                         nn.Linear(args.hidden, args.hidden), nn.LayerNorm(args.hidden), nn.ReLU(),
                         nn.Linear(args.hidden, args.embedding_dim))


def learning_rate(step: int, args) -> float:
    return 0.5 * args.lr * (1.0 + math.cos(math.pi * min(step, args.steps) / args.steps))


# ---- checkpoints --------------------------------------------------------------------------------------------
def save_momentum(head: DistributedMarginHead, optimizer: torch.optim.Optimizer, directory: str) -> None:
    """The head's SGD momentum in the head's own shard format (the buffer in place of the weight), so that
    ``reshard_state_dicts`` reassembles it for any other sharding, like the weight itself."""
    os.makedirs(directory, exist_ok=True)
    state = {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in head.state_dict().items()}
    buffer = optimizer.state.get(head.weight, {}).get("momentum_buffer")
    state[WEIGHT] = (torch.zeros_like(head.weight) if buffer is None else buffer).detach().cpu()
    torch.save(state, os.path.join(directory, shard_file_name(*head.shard_range)))


def momentum_files(directory: str) -> list:
    """(first class, end, path) of the momentum shards ``save_momentum`` wrote, one per saving rank."""
    found = []
    for name in os.listdir(directory):
        match = re.fullmatch(r"classes_(\d+)_(\d+)(?:\.g\d+)?\.pt", name)
        if match:
            found.append((int(match[1]), int(match[2]), os.path.join(directory, name)))
    return sorted(found)


def load_momentum(head: DistributedMarginHead, optimizer: torch.optim.Optimizer, directory: str) -> None:
    start, stop = head.shard_range
    pieces = [torch.load(path, map_location="cpu", weights_only=True)
              for lo, hi, path in momentum_files(directory) if lo < stop and hi > start]
    buffer = reshard_state_dicts(pieces, head.shard_range)[WEIGHT].to(head.weight.device, head.weight.dtype)
    optimizer.state[head.weight]["momentum_buffer"] = buffer


def save_checkpoint(root: str, step: int, backbone, head, optimizers, history, world: World) -> str:
    folder = os.path.join(root, f"step_{step:07d}")
    save_sharded(head, os.path.join(folder, "head"))  # collective: returns when every rank's file is complete
    save_momentum(head, optimizers["head"], os.path.join(folder, "head_momentum"))
    if world.is_main:
        module = unwrap(backbone)
        trainer = {"step": step, "backbone": module.state_dict(),
                   "backbone_optimizer": optimizers["backbone"].state_dict(), "history": history,
                   "world_size": world.size}
        torch.save(trainer, os.path.join(folder, "trainer.pt.partial"))
        os.replace(os.path.join(folder, "trainer.pt.partial"), os.path.join(folder, "trainer.pt"))
    world.barrier()  # every rank's momentum file is written
    if world.is_main:
        with open(os.path.join(root, "latest.partial"), "w") as f:
            f.write(os.path.basename(folder) + "\n")
        os.replace(os.path.join(root, "latest.partial"), os.path.join(root, "latest"))
    world.barrier()
    return folder


def load_checkpoint(root: str, backbone, head, optimizers, world: World):
    """(step, history) of ``root/latest``, or None when there is no checkpoint yet."""
    latest = os.path.join(root, "latest")
    if not os.path.isfile(latest):
        return None
    with open(latest) as f:
        folder = os.path.join(root, f.read().strip())
    trainer = torch.load(os.path.join(folder, "trainer.pt"), map_location="cpu", weights_only=True)
    module = unwrap(backbone)
    module.load_state_dict(trainer["backbone"])
    optimizers["backbone"].load_state_dict(trainer["backbone_optimizer"])
    load_sharded(head, os.path.join(folder, "head"))
    load_momentum(head, optimizers["head"], os.path.join(folder, "head_momentum"))
    history = trainer["history"]
    history.setdefault("resumed", []).append({"step": trainer["step"], "saved_at_world_size": trainer["world_size"],
                                              "world_size": world.size})
    return trainer["step"], history


# ---- output -------------------------------------------------------------------------------------------------
def write_plot(history: dict, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([p["step"] for p in history["loss"]], [p["loss"] for p in history["loss"]], lw=1)
    ax_loss.set(xlabel="step", ylabel="loss (global batch mean)")
    steps = [p["step"] for p in history["eval"]]
    ax_acc.plot(steps, [p["accuracy"] for p in history["eval"]], marker="o", label="1:1 accuracy (10-fold)")
    ax_acc.plot(steps, [p["tar_at_far"] for p in history["eval"]], marker="s", label=f"TAR at FAR={FAR:g}")
    ax_acc.axhline(0.5, color="gray", ls=":", label="chance (accuracy)")
    ax_acc.set(xlabel="step", ylabel="held-out verification", ylim=(0, 1.02))
    for resume in history.get("resumed", []):
        for ax in (ax_loss, ax_acc):
            ax.axvline(resume["step"], color="gray", ls="--", lw=0.8,
                       label=f"resumed: {resume['saved_at_world_size']} -> {resume['world_size']} rank(s)")
    ax_acc.legend(fontsize=8)
    if history.get("resumed"):
        ax_loss.legend(fontsize=8)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def progress_bar(enabled: bool, console=None):
    """The terminal's bar. Its columns fit 80 characters with the step counter visible: the counter and the time
    left come before the metrics, and only the metrics are cut short in a narrower terminal."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    return Progress(BarColumn(bar_width=16), MofNCompleteColumn(), TimeRemainingColumn(),
                    TextColumn("{task.description}"), disable=not enabled, transient=False, console=console)


def bar_text(loss: float, last: dict) -> str:
    """The bar's metrics: loss and the latest held-out evaluation (40 characters at most, see progress_bar)."""
    return f"loss {loss:.3f} acc {last['accuracy']:.3f} TAR@1e-3 {last['tar_at_far']:.3f}"


def log_line(step: int, total: int, loss: float, lr: float, rate: float, last: dict) -> str:
    """The plain progress line of a run without a terminal (a redirected stdout, nohup, SLURM, torchrun)."""
    return (f"step {step}/{total}  loss {loss:.4f}  lr {lr:.3g}  {rate:.1f} steps/s  held-out (step "
            f"{last['step']}): acc {last['accuracy']:.3f}  TAR@FAR={FAR:g} {last['tar_at_far']:.3f}  "
            f"TAR@FAR={LOW_FAR:g} {last['tar_at_low_far']:.3f}")


# ---- the loop -----------------------------------------------------------------------------------------------
def train(args, world: World | None = None) -> dict:
    """One training run; ``world`` None: start the process group torchrun asks for (or a world of one)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    world = world or start_world()
    if args.batch_size % world.size:
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of the world size {world.size}")
    data = SyntheticIdentities(args, world.device)
    eval_x, eval_ids = data.evaluation_set()

    backbone = make_backbone(data.input_dim, args).to(world.device)
    if world.size > 1:
        backbone = nn.parallel.DistributedDataParallel(backbone)
    # the same class weight at every world size for a given seed; ddp_backbone: DDP averages the backbone's
    # gradients over ranks while the head's loss is already the global mean, so the head scales them back
    head = DistributedMarginHead(args.identities, args.embedding_dim, LOSSES[args.loss](args.s, args.m),
                                 sample_rate=args.sample_rate, seed=args.seed, backend=args.backend,
                                 device=world.device, ddp_backbone=world.size > 1)
    optimizers = {
        "backbone": torch.optim.SGD(backbone.parameters(), lr=args.lr, momentum=args.momentum,
                                    weight_decay=args.weight_decay),
        "head": torch.optim.SGD(head.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay),
    }
    step, history = 0, {"loss": [], "eval": [], "world_size": world.size, "loss_name": args.loss}
    if args.resume:
        restored = load_checkpoint(args.checkpoint, backbone, head, optimizers, world)
        if restored is not None:
            step, history = restored
            if world.is_main:
                print(f"resumed from {args.checkpoint} at step {step} (saved on "
                      f"{history['resumed'][-1]['saved_at_world_size']} ranks, now {world.size})", flush=True)
    if step == 0:
        history["eval"].append({"step": 0, **evaluate(backbone, eval_x, eval_ids, world, args.seed)})

    started = time.perf_counter()
    # a bar only on a terminal: redirected (nohup, SLURM, torchrun's ranks) rich would print nothing until the
    # end, so plain lines every --log-every steps take its place there (and with --no-progress)
    show = world.is_main and not args.no_progress and sys.stdout.isatty()
    log_every = args.log_every if world.is_main and not show else 0
    window = (step, started)  # the step rate of a log line is over the steps since the previous line
    with progress_bar(show) as bar:
        task = bar.add_task("", total=args.steps, completed=step)
        while step < args.steps:
            lr = learning_rate(step, args)
            for optimizer in optimizers.values():
                for group in optimizer.param_groups:
                    group["lr"] = lr
            x, labels = data.batch(step, world)
            loss = head(backbone(x), labels)  # every rank returns the same global loss
            for optimizer in optimizers.values():
                optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for optimizer in optimizers.values():
                optimizer.step()
            step += 1
            history["loss"].append({"step": step, "loss": loss.item()})
            if step % args.eval_every == 0 or step == args.steps:
                history["eval"].append({"step": step, **evaluate(backbone, eval_x, eval_ids, world, args.seed)})
            last = history["eval"][-1]
            bar.update(task, completed=step, description=bar_text(loss.item(), last))
            if log_every and (step % log_every == 0 or step == args.steps):
                now = time.perf_counter()
                print(log_line(step, args.steps, loss.item(), lr, (step - window[0]) / max(now - window[1], 1e-9),
                               last), flush=True)
                window = (step, now)
            periodic = args.checkpoint_every and step % args.checkpoint_every == 0
            if args.checkpoint and (step == args.steps or periodic):
                save_checkpoint(args.checkpoint, step, backbone, head, optimizers, history, world)
    history["seconds"] = time.perf_counter() - started

    if world.is_main and not getattr(args, "quiet", False):  # --compare-losses prints its own line per run
        first, last = history["eval"][0], history["eval"][-1]
        print(f"step {step}: {LOSS_TITLES[args.loss]}, held-out 1:1 accuracy {first['accuracy']:.3f} -> "
              f"{last['accuracy']:.3f}, TAR at FAR={FAR:g} {first['tar_at_far']:.3f} -> {last['tar_at_far']:.3f}, "
              f"at FAR={LOW_FAR:g} {first['tar_at_low_far']:.3f} -> {last['tar_at_low_far']:.3f} (steps "
              f"{first['step']} -> {last['step']}, {world.size} rank(s), backend {head.resolved_backend})",
              flush=True)
        if args.metrics:
            with open(args.metrics, "w") as f:
                json.dump(history, f, indent=1)
        if args.plot:
            write_plot(history, args.plot, f"{LOSS_TITLES[args.loss]} on {args.identities} synthetic identities, "
                       f"global batch {args.batch_size}, {world.size} rank(s)")
    if dist.is_initialized():
        # every rank reaches the teardown together: rank 0 writes the metrics and the plot first, and a gloo
        # group destroyed while another rank is still busy can hang that rank's destroy (seen once in a
        # fresh-clone CI run here: rank 1 of a resumed 2-rank run waited in destroy_process_group after rank 0
        # had exited; a barrier first is PyTorch's advice, pytorch/pytorch#75097)
        world.barrier()
        close_world()
    return history


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.compare_losses:
        from compare_losses import compare  # examples/compare_losses.py, next to this file
        compare(args)
    else:
        train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
