"""``defect-serve``: run the service with uvicorn (one worker process per container).

Scale out with more containers/processes rather than uvicorn workers: each process holds its
own model and sizes its onnxruntime threads to the CPUs it is given, so one process per CPU
budget avoids oversubscription.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import uvicorn

from app.settings import Settings


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="defect-serve",
        description="Serve the defect-inspection model over HTTP. Every option can also be set "
        "with a DEFECT_* environment variable (see the README); flags win.",
    )
    parser.add_argument("--host", help="bind address (DEFECT_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (DEFECT_PORT, default 8000)")
    parser.add_argument("--model-dir", help="model folder (DEFECT_MODEL_DIR)")
    parser.add_argument("--provider", choices=["auto", "cpu", "cuda"], help="DEFECT_PROVIDER")
    parser.add_argument(
        "--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="DEFECT_LOG_LEVEL"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    overrides = {
        "DEFECT_HOST": args.host,
        "DEFECT_PORT": None if args.port is None else str(args.port),
        "DEFECT_MODEL_DIR": args.model_dir,
        "DEFECT_PROVIDER": args.provider,
        "DEFECT_LOG_LEVEL": args.log_level,
    }
    for name, value in overrides.items():
        if value is not None:
            os.environ[name] = value
    settings = Settings()  # validates the environment before uvicorn starts
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=1,
        access_log=False,  # the service writes its own JSON access line per request
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=10,
    )


if __name__ == "__main__":
    main()
