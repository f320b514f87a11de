# speech-serve image: `python -m service` on the bundled model, as a non-root user.
#
#   docker build -t speech-serve:cpu .                              # CPU torch (the default)
#   docker build --build-arg TORCH_VARIANT=cuda -t speech-serve:cuda .  # CUDA torch, for GPUs
#   docker run -p 8000:8000 speech-serve:cpu
#   docker run -p 8000:8000 -v "$PWD/runs/mine-ft/final:/models/mine:ro" \
#       -e STT_MODEL_DIR=/models/mine speech-serve:cpu               # your own checkpoint
#
# Stages: `base` (interpreter and environment), `deps` (a virtualenv with torch and the
# dependencies of pyproject.toml: cached until those change), `build` (the source, installed
# editable into that virtualenv), `runtime` (virtualenv and source only, no pip cache).

FROM python:3.11.14-slim-bookworm AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH="/opt/venv/bin:$PATH"


FROM base AS deps
# cpu: the CPU wheel from PyTorch's index (no CUDA libraries, about a tenth of the size);
# cuda: PyPI's Linux wheel, which is the CUDA build (run with the NVIDIA container toolkit);
# cuXYZ (e.g. cu128): that CUDA version's wheel from PyTorch's index, to match an older driver.
ARG TORCH_VARIANT=cpu
RUN python -m venv "$VIRTUAL_ENV" \
    && case "$TORCH_VARIANT" in \
        cpu) index=https://download.pytorch.org/whl/cpu ;; \
        cuda) index=https://pypi.org/simple ;; \
        cu[0-9]*) index="https://download.pytorch.org/whl/$TORCH_VARIANT" ;; \
        *) echo "TORCH_VARIANT must be cpu, cuda or cuXYZ, not '$TORCH_VARIANT'" >&2; exit 1 ;; \
    esac \
    && pip install --index-url "$index" torch==2.13.0
# Only pyproject.toml: editing the source does not reinstall the dependencies.
COPY pyproject.toml /tmp/pyproject.toml
# EXTRAS=ray adds the `ray` extra (python -m service.scale; docker-compose's `ray` profile)
ARG EXTRAS=""
RUN python -c "import os, tomllib; p = tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + [d for e in os.environ['EXTRAS'].split(',') if e for d in p['optional-dependencies'][e]]))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt


FROM deps AS build
WORKDIR /app
COPY pyproject.toml README.md ./
COPY model_store/ model_store/
COPY service/ service/
# Editable, so the code and the bundled model exist once, under /app, where the service's
# default STT_MODEL_DIR (model_store/w2v2-bert-commands-en beside service/) points.
RUN pip install --no-deps --editable . \
    && python -m compileall -q service model_store


FROM base AS runtime
LABEL org.opencontainers.image.title="speech-serve" \
      org.opencontainers.image.description="OpenAI-compatible speech-to-text service"
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-log-init --create-home --home-dir /home/app app
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
WORKDIR /app
USER 10001:10001
# Listen on every interface (the settings' default, 127.0.0.1, is unreachable from outside a
# container); the service only reads local checkpoint folders, never the Hugging Face hub.
ENV STT_HOST=0.0.0.0 \
    HF_HUB_OFFLINE=1
EXPOSE 8000
# Liveness (slim images have no curl); STT_PORT, if set, moves the port and this check with it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/health' % os.environ.get('STT_PORT', '8000'), timeout=4)"]
CMD ["python", "-m", "service"]
