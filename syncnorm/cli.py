"""The ``syncnorm`` command line (also ``python -m syncnorm``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from syncnorm.train.config import NORMS


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        message = f"expected comma-separated integers like 8,24, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None
    if min(sizes) < 0:
        raise argparse.ArgumentTypeError(f"batch sizes cannot be negative, got {text!r}")
    return sizes


def _rank_shift(text: str) -> tuple[int, float]:
    rank, _, shift = text.partition(":")
    try:
        return int(rank), float(shift)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected RANK:SHIFT like 0:1.5, got {text!r}") from None


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="syncnorm", description="Exact synchronized batch norm.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo", help="train digits on 4 local workers with SyncBN, local BN and one process, and compare"
    )
    demo.add_argument("--batch-sizes", type=_batch_sizes, default=(2, 4, 6, 20), help="one per worker")
    demo.add_argument("--epochs", type=_positive_int, default=3)

    train = commands.add_parser(
        "train",
        help="train a small BN CNN on scikit-learn's digits (one process, or under torchrun)",
        description="Under torchrun (torchrun --nproc-per-node N -m syncnorm train ...) every process is "
        "one worker; run directly it is one process.",
    )
    train.add_argument(
        "--batch-sizes", type=_batch_sizes, default=(32,), help="one per worker, or one for all (default 32)"
    )
    train.add_argument("--epochs", type=_positive_int, default=5)
    train.add_argument("--lr", type=_positive_float, default=0.05)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--norm", choices=NORMS, default="sync",
                       help="sync: SyncBatchNorm; local: per-worker BatchNorm; switchable, batch-instance: "
                            "synchronized batch branch; group, layer: batch-independent")  # fmt: skip
    train.add_argument("--checkpoint", help="rank 0 saves the state_dict here")
    train.add_argument("--precise-bn", type=int, default=0, metavar="BATCHES",
                       help="recompute running stats exactly over this many batches per worker")  # fmt: skip
    train.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    train.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    train.add_argument("--coordinator", metavar="HOST:PORT", help="syncnorm coordinator to report to")
    train.add_argument("--report-every", type=_positive_int, default=10, metavar="K")
    train.add_argument("--run-id", default="syncnorm")
    train.add_argument("--coordinator-token-file", help="bearer token for the coordinator")
    train.add_argument("--coordinator-ca", help="PEM certificate authority of a TLS coordinator")
    train.add_argument("--input-shift", type=_rank_shift, metavar="RANK:SHIFT",
                       help="worker RANK adds SHIFT to its input pixels (in [0, 1]): a planted data problem "
                       "that the coordinator's drift metric and alert should catch")  # fmt: skip
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    coordinator = commands.add_parser(
        "coordinator", help="serve the coordinator: gRPC for workers, /metrics for Prometheus"
    )
    coordinator.add_argument("--host", default="0.0.0.0", help="address to bind (default all interfaces)")
    coordinator.add_argument("--grpc-port", type=int, default=50051)
    coordinator.add_argument("--metrics-port", type=int, default=9400)
    coordinator.add_argument("--momentum", type=float, default=0.1, help="EMA momentum of global statistics")
    coordinator.add_argument("--stale-after", type=_positive_float, default=60.0, metavar="SECONDS")
    coordinator.add_argument("--token-file", help="require this bearer token (file holds it)")
    coordinator.add_argument("--tls-cert", help="PEM certificate chain: serve gRPC over TLS (with --tls-key)")
    coordinator.add_argument("--tls-key", help="PEM private key for --tls-cert")
    coordinator.add_argument("--state-dir", help="keep state here (SQLite) across restarts (default: memory)")

    status = commands.add_parser("status", help="a coordinator's table of a run's workers")
    status.add_argument("--coordinator", required=True, metavar="HOST:PORT")
    status.add_argument("--run", default="syncnorm", help="run id (default: syncnorm, train's default)")
    status.add_argument("--token-file", help="bearer token for a coordinator that wants one")
    status.add_argument("--ca", help="PEM certificate authority of a TLS coordinator")

    ray = train.add_argument_group("Ray", "run under Ray Train instead of torchrun")
    ray.add_argument("--ray", action="store_true", help="train on Ray Train workers")
    ray.add_argument("--num-workers", type=_positive_int, default=2, help="Ray workers (default 2)")
    ray.add_argument("--address", help="an existing Ray cluster (default: start a local one here)")
    ray.add_argument(
        "--transport", choices=("torch", "actor"), default="torch",
        help="SyncBN statistics over Ray's process group (torch) or through a Ray actor (actor)",
    )  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from syncnorm.demo import DemoConfig, run_demo

        if len(args.batch_sizes) < 2 or sum(args.batch_sizes) < 2:
            parser.error("--batch-sizes: the demo needs at least two workers and two images in all")
        print(run_demo(DemoConfig(batch_sizes=args.batch_sizes, epochs=args.epochs)))
        return 0
    if args.command == "coordinator":
        return _coordinator(parser, args)
    if args.command == "status":
        import grpc

        from syncnorm.coordinator.client import status_table
        from syncnorm.coordinator.security import read_bytes, read_token

        try:
            print(status_table(args.coordinator, args.run, token=read_token(args.token_file),
                               root_certificates=read_bytes(args.ca)))  # fmt: skip
        except grpc.RpcError as error:
            print(f"syncnorm status: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
        return 0
    return _train(parser, args)


def _coordinator(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import signal
    import threading

    from syncnorm.coordinator.security import read_bytes, read_token
    from syncnorm.coordinator.server import start_coordinator
    from syncnorm.coordinator.service import Coordinator

    if not 0 < args.momentum <= 1:
        parser.error(f"--momentum must be in (0, 1], got {args.momentum}")
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    tls = (read_bytes(args.tls_cert), read_bytes(args.tls_key)) if args.tls_cert else None
    from syncnorm.coordinator.store import StateStore

    store = StateStore(args.state_dir) if args.state_dir else None
    running = start_coordinator(
        args.host, args.grpc_port, args.metrics_port, Coordinator(args.momentum, args.stale_after, store),
        token=read_token(args.token_file), tls_cert_and_key=tls,  # type: ignore[arg-type]
    )  # fmt: skip
    print(
        f"syncnorm coordinator: gRPC on {args.host}:{running.grpc_port}, "
        f"metrics on http://{args.host}:{running.metrics_port}/metrics",
        flush=True,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # containers stop with SIGTERM, people with Ctrl-C
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    running.stop()
    return 0


def _check_sizes(parser: argparse.ArgumentParser, config: object, world_size: int) -> None:
    try:
        config.sizes_for(world_size)  # type: ignore[attr-defined]
    except ValueError as error:
        parser.error(str(error))


def _train(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from syncnorm.train import TrainConfig, train_worker
    from syncnorm.train.launch_env import init_from_env

    config = TrainConfig(
        batch_sizes=args.batch_sizes, epochs=args.epochs, lr=args.lr, seed=args.seed, norm=args.norm,
        checkpoint=args.checkpoint, precise_bn_batches=args.precise_bn, coordinator=args.coordinator,
        report_every=args.report_every, run_id=args.run_id, device=args.device, dtype=args.dtype,
        coordinator_token_file=args.coordinator_token_file, coordinator_ca=args.coordinator_ca,
        input_shift=args.input_shift, progress=not args.no_progress,
    )  # fmt: skip
    if args.ray:
        from syncnorm.train.on_ray import train_on_ray

        rank, world_size = 0, args.num_workers
        _check_sizes(parser, config, world_size)
        result = train_on_ray(config, args.num_workers, args.transport, args.address)
    else:
        if args.transport != "torch" or args.address:
            parser.error("--transport and --address go with --ray")
        rank, world_size = init_from_env(args.device)
        _check_sizes(parser, config, world_size)
        result = train_worker(config, rank, world_size)
    if rank == 0:
        print(
            f"workers: {world_size}, batch sizes: {','.join(map(str, result.batch_sizes))}, "
            f"norm: {result.norm}, steps: {result.steps}, time: {result.seconds:.1f} s"
        )
        print(f"test accuracy: {result.test_accuracy:.3f}")
    return 0
