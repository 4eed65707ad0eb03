# Defect-inspection service images.
#
#   docker build -t defect-inspection .                                   # serving, CPU (default target)
#   docker build --build-arg ORT_PACKAGE=onnxruntime-gpu -t defect-inspection:gpu .   # serving, CUDA
#   docker build --target train -t defect-inspection:train .              # training (TensorFlow)
#
# Where builds have no egress of their own (see README), add `--network host`.
# Every pip install is pinned by constraints.txt. The serving stages never install TensorFlow.
# No `# syntax=` line on purpose: it would make BuildKit pull a frontend image from a registry.

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------
# deps: a venv with the serving dependencies only (cached until pyproject/constraints change).
FROM ${PYTHON_IMAGE} AS deps
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# onnxruntime (CPU) or onnxruntime-gpu (installed with its [cuda,cudnn] extras: CUDA and cuDNN
# come as pip wheels, so the base image needs no CUDA toolkit; the host needs the NVIDIA driver
# and the NVIDIA container toolkit).
ARG ORT_PACKAGE=onnxruntime
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml constraints.txt ./
# The serving requirements are read from pyproject.toml, with onnxruntime swapped for the
# package the build asks for: onnxruntime and onnxruntime-gpu share one module name, and
# installing both breaks it.
RUN set -eu; \
    case "$ORT_PACKAGE" in \
      onnxruntime) ort="onnxruntime" ;; \
      onnxruntime-gpu) ort="onnxruntime-gpu[cuda,cudnn]" ;; \
      *) echo "ORT_PACKAGE must be onnxruntime or onnxruntime-gpu, not '$ORT_PACKAGE'" >&2; exit 2 ;; \
    esac; \
    python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(d for d in deps if not d.startswith('onnxruntime')))" > requirements-serve.txt; \
    echo "$ort" >> requirements-serve.txt; \
    python -m venv /opt/venv; \
    /opt/venv/bin/python -m pip install --quiet --upgrade -c constraints.txt pip; \
    /opt/venv/bin/python -m pip install --quiet -c constraints.txt -r requirements-serve.txt

# ---------------------------------------------------------------------------------------------
# builder: the project's own wheel, installed without dependencies (they are all pinned above).
FROM deps AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY README.md LICENSE ./
COPY app/ app/
COPY training/ training/
RUN set -eu; \
    /opt/venv/bin/python -m pip wheel --quiet --no-deps --wheel-dir /tmp/wheels .; \
    /opt/venv/bin/python -m pip install --quiet --no-deps /tmp/wheels/*.whl; \
    /opt/venv/bin/python -m pip uninstall --quiet --yes pip setuptools wheel 2>/dev/null || true; \
    site=$(/opt/venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"); \
    # Not needed to serve (about 27 MB): NumPy's test suites and onnxruntime's offline tools. \
    find "$site/numpy" -type d -name tests -prune -exec rm -rf {} +; \
    rm -rf "$site/onnxruntime/transformers" "$site/onnxruntime/quantization" "$site/onnxruntime/tools"; \
    # onnxruntime-gpu: CUDA/cuDNN come as nvidia-* wheels whose lib folders the dynamic loader \
    # does not search; list them for ldconfig in the runtime stage (empty for the CPU build). \
    if [ -d "$site/nvidia" ]; then find "$site/nvidia" -mindepth 2 -maxdepth 2 -type d -name lib | sort; fi > /opt/venv/ld.so.conf; \
    /opt/venv/bin/python -c "import fastapi, numpy, onnxruntime, uvicorn, app.main; print('onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())"

# ---------------------------------------------------------------------------------------------
# train-builder / train: the same venv plus the `train` extra (TensorFlow, tf2onnx, ...).
# Used by `docker compose --profile train run --rm train`; never part of the serving image.
FROM deps AS train-builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The heavy layer first, so that code changes do not reinstall TensorFlow.
RUN set -eu; \
    python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['optional-dependencies']['train']))" > requirements-train.txt; \
    /opt/venv/bin/python -m pip install --quiet -c constraints.txt -r requirements-train.txt
COPY README.md LICENSE ./
COPY app/ app/
COPY training/ training/
RUN set -eu; \
    /opt/venv/bin/python -m pip wheel --quiet --no-deps --wheel-dir /tmp/wheels .; \
    /opt/venv/bin/python -m pip install --quiet --no-deps /tmp/wheels/*.whl; \
    /opt/venv/bin/python -m pip uninstall --quiet --yes pip setuptools wheel 2>/dev/null || true; \
    /opt/venv/bin/python -c "import tensorflow, tf2onnx, training.cli; print('tensorflow', tensorflow.__version__)"

FROM ${PYTHON_IMAGE} AS train
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    KERAS_HOME=/tmp/.keras \
    MPLCONFIGDIR=/tmp/matplotlib \
    TF_CPP_MIN_LOG_LEVEL=2
RUN groupadd --system --gid 10001 defect \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin defect
COPY --from=train-builder /opt/venv /opt/venv
WORKDIR /app
USER 10001:10001
ENTRYPOINT ["python", "-m", "training"]
CMD ["--help"]

# ---------------------------------------------------------------------------------------------
# runtime (default target): python:3.11-slim + the serving venv + the shipped model. No compiler,
# no pip, no TensorFlow; runs as an unprivileged user and works with a read-only root filesystem.
FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
RUN groupadd --system --gid 10001 defect \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin defect
COPY --from=builder /opt/venv /opt/venv
RUN if [ -s /opt/venv/ld.so.conf ]; then \
      cp /opt/venv/ld.so.conf /etc/ld.so.conf.d/onnxruntime-gpu-wheels.conf && ldconfig; \
    fi
WORKDIR /app
# The shipped default model, so the image serves out of the box (owned by root: read-only to
# the service). Mount another folder over /app/models to serve a different model.
COPY models/ /app/models/
USER 10001:10001
EXPOSE 8000
# Liveness only (process up and answering); readiness is GET /ready (compose waits on that).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"]
# `defect-serve` = uvicorn with the app factory (app.main:create_app), one worker process (scale
# with containers, not workers: the model's thread pool is sized for this container's CPUs) and
# no uvicorn access log (the service writes one JSON line per request itself).
CMD ["defect-serve", "--host", "0.0.0.0", "--port", "8000"]
