"""Whole-model cost of syncnorm: one training step of a ResNet-18-style CNN.

The model (defined here) has batch norm after every convolution: a 3x3 stem conv +
BN, four stages of two BasicBlocks (widths w, 2w, 4w, 8w; strides 1, 2, 2, 2) with
a 1x1 conv + BN shortcut where the shape changes -- L = 20 BN layers -- then global
average pooling and a linear classifier.  Data are synthetic: a fixed random batch
(``--batch``, 3, ``--image-size``, ``--image-size``) per rank with random labels
out of 10.

For each world size, one run measures interleaved, round by round (every case
once per round, ``--repeats`` steps each, medians over ``--rounds``):

* a step (forward, cross-entropy backward, SGD with momentum step) of the model
  with local ``torch.nn.BatchNorm2d``,
* the same step of a copy converted with ``syncnorm.convert_sync_batchnorm`` (on
  CPU: the shared-memory all-gather, all ranks being on one host), and on CPU of
  one forced onto Gloo's all_gather (what ranks on several hosts use),
* on CUDA only, a copy converted with ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``,
* the L bare all_gathers, and the L bare all_reduces, of 2 C_l + 1 fp32 values
  (one per BN layer, back to back),

and prints ``(syncnorm - local) / floor`` with floor = 2 x the L bare collectives
of the backend's fastest collective (one forward and one backward per layer).
There is no gradient all-reduce (no DDP): both models take the same local SGD
step, so their difference is the batch norm synchronization alone.

Peak memory: for one step of each model, the peak of live tensor memory above what
was live when the step began -- activations saved for backward, temporaries,
gradients (freed at the end of the step) and communication buffers; parameters,
optimizer state and the input exist before and are not counted.  On CPU it comes
from ``torch.profiler`` with ``profile_memory=True``: every allocation and free of
the CPU allocator, with size and time, summed in time order (read from the
profiler's raw Kineto events, ``prof.profiler.kineto_results``); on CUDA from
``torch.cuda.max_memory_allocated`` after ``torch.cuda.reset_peak_memory_stats``.
The profiler slows the step it watches, so memory is measured apart from timing.

CPU runs use a Gloo group of local processes, one thread each.  ``--device cuda``
runs one process per GPU on an NCCL group (by default as many as are visible; a
1-rank group is allowed: syncnorm still runs its collectives, nn.SyncBatchNorm
falls back to plain batch norm).  The CUDA path has not yet been run on a GPU.

    python -m benchmarks.whole_model [--world-sizes 2,4] [--width 16] [--batch 8]
                                     [--rounds 10] [--repeats 2] [--device cpu|cuda] [--json]
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

from benchmarks.overhead import (
    Placement,
    environment_line,
    interleaved_medians,
    place,
    syncnorm_reducer,
    world_sizes_for,
)
from syncnorm import convert_sync_batchnorm
from syncnorm.launch import run_local_group
from syncnorm.transports.torch_distributed import FASTEST_PRIMITIVE, TorchDistributedReducer, all_gather_into

CLASSES = 10


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN, the second added to the (projected where needed) input."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 layout for small images: 3x3 stem, stages of widths w..8w, 20 BN layers."""

    def __init__(self, width: int = 16, classes: int = CLASSES) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        blocks: list[nn.Module] = []
        channels = width
        for stage, stride in enumerate((1, 2, 2, 2)):
            out = width * 2**stage
            blocks += [BasicBlock(channels, out, stride), BasicBlock(out, out, 1)]
            channels = out
        self.stages = nn.Sequential(*blocks)
        self.head = nn.Linear(channels, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.adaptive_avg_pool2d(self.stages(self.stem(x)), 1).flatten(1))


def bn_channels(model: nn.Module) -> list[int]:
    """C_l of every batch norm layer, in module order."""
    return [m.num_features for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def training_step(model: nn.Module, x: Tensor, labels: Tensor) -> Callable[[], None]:
    """Forward, backward and SGD (momentum) step; gradients are freed at the end."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        F.cross_entropy(model(x), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def peak_step_bytes(step: Callable[[], None], where: Placement) -> int:
    """Peak live tensor memory during one ``step`` above what was live before it."""
    if where.device.type == "cuda":
        torch.cuda.synchronize(where.device)
        before = torch.cuda.memory_allocated(where.device)
        torch.cuda.reset_peak_memory_stats(where.device)
        step()
        torch.cuda.synchronize(where.device)
        return torch.cuda.max_memory_allocated(where.device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]  # type: ignore[union-attr]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()  # negative for a free
        peak = max(peak, live)
    return peak


def _measure(
    rank: int, world_size: int, width: int, batch: int, image_size: int, rounds: int, repeats: int,
    device_type: str,
) -> dict:  # fmt: skip
    where = place(rank, device_type)
    device, group = where.device, where.group
    torch.manual_seed(0)  # the same initial model on every rank
    local = ResNet18(width).to(device)
    torch.manual_seed(1 + rank)  # each rank its own batch
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    labels = torch.randint(0, CLASSES, (batch,), device=device)
    reducer = syncnorm_reducer(group)
    models = {
        "local_bn": local,
        "syncnorm": convert_sync_batchnorm(copy.deepcopy(local), process_group=group, reducer=reducer),
    }
    if device.type == "cpu":
        gloo = TorchDistributedReducer(group, primitive="all_gather")
        models["syncnorm_gloo"] = convert_sync_batchnorm(
            copy.deepcopy(local), process_group=group, reducer=gloo
        )
    if device.type == "cuda":
        models["torch_syncbn"] = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(local), group)
    steps = {name: training_step(model, x, labels) for name, model in models.items()}

    channels = bn_channels(local)
    payloads = [torch.randn(2 * c + 1, device=device) for c in channels]
    gathered = [p.new_empty(world_size * p.numel()) for p in payloads]

    def all_gathers() -> None:
        for out, payload in zip(gathered, payloads, strict=True):
            all_gather_into(out, payload, group)

    def all_reduces() -> None:
        for payload in payloads:
            dist.all_reduce(payload, group=group)

    medians = interleaved_medians(
        {**steps, "all_gather_layers": all_gathers, "all_reduce_layers": all_reduces}, rounds, repeats, where
    )
    floor_primitive = FASTEST_PRIMITIVE[str(dist.get_backend(group)).lower()]
    floor = 2 * medians[f"{floor_primitive}_layers"]
    peaks = {name: peak_step_bytes(step, where) for name, step in steps.items()}
    row: dict = {
        "world_size": world_size,
        "device": device.type,
        "width": width,
        "batch_per_rank": batch,
        "image_size": image_size,
        "parameters": sum(p.numel() for p in local.parameters()),
        "bn_layers": len(channels),
        "bn_channels": channels,
        **{f"{k}_ms": round(v, 3) for k, v in medians.items()},
        "primitive": reducer.primitive,
        "floor_primitive": floor_primitive,
        "floor_ms": round(floor, 3),
        "overhead_over_floor": round((medians["syncnorm"] - medians["local_bn"]) / floor, 3),
        **{f"{k}_peak_mib": round(v / 2**20, 3) for k, v in peaks.items()},
        "peak_ratio": round(peaks["syncnorm"] / peaks["local_bn"], 3),
    }
    if "syncnorm_gloo" in models:
        row["syncnorm_gloo_over_floor"] = round((medians["syncnorm_gloo"] - medians["local_bn"]) / floor, 3)
        row["syncnorm_gloo_peak_ratio"] = round(peaks["syncnorm_gloo"] / peaks["local_bn"], 3)
    if "torch_syncbn" in models:
        row["torch_syncbn_over_floor"] = round((medians["torch_syncbn"] - medians["local_bn"]) / floor, 3)
        row["torch_syncbn_peak_ratio"] = round(peaks["torch_syncbn"] / peaks["local_bn"], 3)
    return row


def print_tables(rows: list[dict], rounds: int, repeats: int, device_type: str) -> None:
    first = rows[0]
    print(
        f"# {environment_line(device_type)}, median of {rounds} rounds x {repeats} steps; "
        f"ResNet-18-style CNN, width {first['width']}, {first['parameters']} parameters, "
        f"{first['bn_layers']} BN layers (C = {', '.join(map(str, first['bn_channels']))}), "
        f"input ({first['batch_per_rank']}, 3, {first['image_size']}, {first['image_size']}) fp32 per rank; "
        "step = forward + backward + SGD"
    )
    # (title, key) of the synchronized models besides syncnorm's default
    others = (
        [("nn.SyncBatchNorm", "torch_syncbn")]
        if device_type == "cuda"
        else [("syncnorm over Gloo", "syncnorm_gloo")]
    )
    print()
    print(
        f"Step time, ms (syncnorm: {first['primitive']}; "
        "floor = 2 x the backend's fastest bare collective, one per BN layer)"
    )
    print()
    head = ["ranks", "local BN", "syncnorm", *(t for t, _ in others), "all_gather x L", "all_reduce x L",
            "floor", "(syncnorm - local) / floor"]  # fmt: skip
    head += [f"({t} - local) / floor" for t, _ in others]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [f"{r[f'{k}_ms']:.2f}" for k in ["local_bn", "syncnorm", *(k for _, k in others)]]
        cells += [f"{r['all_gather_layers_ms']:.2f}", f"{r['all_reduce_layers_ms']:.2f}"]
        cells += [f"{r['floor_ms']:.2f} (2 x {r['floor_primitive']})", f"{r['overhead_over_floor']:.2f}"]
        cells += [f"{r[f'{k}_over_floor']:.2f}" for _, k in others]
        print(f"| {r['world_size']} | " + " | ".join(cells) + " |")
    print()
    print("Peak tensor memory of one step above the memory live before it, MiB")
    print()
    head = ["ranks", "local BN", "syncnorm", "syncnorm / local BN"]
    head += [x for t, _ in others for x in (t, f"{t} / local BN")]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [f"{r['local_bn_peak_mib']:.2f}", f"{r['syncnorm_peak_mib']:.2f}", f"{r['peak_ratio']:.3f}"]
        cells += [x for _, k in others for x in (f"{r[f'{k}_peak_mib']:.2f}", f"{r[f'{k}_peak_ratio']:.3f}")]
        print(f"| {r['world_size']} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world-sizes", help="comma-separated (default: 2,4 on CPU, all GPUs on CUDA)")
    parser.add_argument("--width", type=int, default=16, help="channels of the first stage (ResNet-18: 64)")
    parser.add_argument("--batch", type=int, default=8, help="images per rank")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=10, help="rounds per case; medians are over rounds")
    parser.add_argument("--repeats", type=int, default=2, help="steps per case per round")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of tables")
    args = parser.parse_args()
    rows = []
    for world in world_sizes_for(args.world_sizes, args.device):
        rows += run_local_group(
            _measure, world, args.width, args.batch, args.image_size, args.rounds, args.repeats, args.device
        )[:1]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_tables(rows, args.rounds, args.repeats, args.device)


if __name__ == "__main__":
    main()
