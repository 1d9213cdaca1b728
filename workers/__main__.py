"""`python -m workers worker --model NAME [--gpu N] ...`, `python -m workers beat`, `python -m workers reconcile`."""

from __future__ import annotations

import argparse
import json


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _gpu_list(text: str) -> tuple[int, ...]:
    from workers.gpus import parse_gpus

    try:
        return parse_gpus(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workers")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker", help="serve one model on one device")
    w.add_argument("--model", required=True, help="served model name (its queue and card name)")
    w.add_argument("--gpu", type=int, default=None, help="CUDA device index to pin this worker to")
    w.add_argument("--gpus", type=_gpu_list, default=None, help="spread the model over these CUDA devices (0,1,...)")
    w.add_argument("--model-path", default=None, help="load the weights from here (a local HF folder or hub id)")
    w.add_argument("--device", default=None, help="cpu, cuda:0 ... (default: cuda:0 with --gpu, else cpu)")
    w.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: the dtype the model was added with (selfie models add), else float32")
    w.add_argument("--concurrency", type=int, default=1)
    w.add_argument("--batch-size", type=_at_least_one, default=None,
                   help="rows per engine batch (default: engine's choice)")
    w.add_argument("--hostname", default=None, help="Celery node name")
    w.add_argument("--loglevel", default="INFO")
    w.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="CUDA: replay the engine's decode steps as CUDA graphs (no effect on the CPU)")
    w.add_argument("--decode-attention", default="sdpa", choices=["sdpa", "triton"],
                   help="how those steps attend: the model's SDPA attention or the engine's Triton kernel")
    w.add_argument("--rms-norm", default="model", choices=["model", "triton"],
                   help="RMSNorm through the model's own modules or the engine's Triton kernel")
    w.add_argument("--threads", type=_at_least_one, default=None,
                   help="torch CPU threads (default: selfie_core.threads.default_threads())")
    w.add_argument("--inject-fault", default=None, help=argparse.SUPPRESS)  # fault tests only (workers.faults)
    b = sub.add_parser("beat", help="the scheduler (reconcile, audits)")
    b.add_argument("--loglevel", default="INFO")
    b.add_argument("--schedule", default=None)
    sub.add_parser("reconcile", help="re-send lost chunks once and print what was done")
    args = parser.parse_args(argv)

    if args.command == "worker":
        from workers.launch import run_worker

        if args.gpu is not None and args.gpus:
            parser.error("give --gpu N or --gpus N,M,..., not both")
        run_worker(args.model, args.gpu, gpus=args.gpus, model_path=args.model_path, device=args.device, dtype=args.dtype,
                   concurrency=args.concurrency, batch_size=args.batch_size, hostname=args.hostname,
                   loglevel=args.loglevel, inject_fault=args.inject_fault, cuda_graphs=args.cuda_graphs,
                   decode_attention=args.decode_attention, rms_norm=args.rms_norm, threads=args.threads)
    elif args.command == "beat":
        from workers.launch import run_beat

        run_beat(loglevel=args.loglevel, schedule_file=args.schedule)
    else:
        from selfie_jobs.db import get_sessionmaker
        from selfie_jobs.settings import get_settings
        from workers.celery_app import create_celery_app
        from workers.tasks import reconcile_once

        settings = get_settings()
        app = create_celery_app(settings, register=False)
        print(json.dumps(reconcile_once(settings, get_sessionmaker(settings.resolved_database_url()), app)))


if __name__ == "__main__":
    main()
