# devstack router/controller image: slim Python, non-root, installed from this source tree.
# Stage 1 builds a wheel with the router's hot path compiled by mypyc (needs a C compiler);
# stage 2 installs that wheel into a slim image without one.
FROM python:3.11-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY devstack ./devstack
COPY router ./router
COPY controller ./controller
COPY propagation ./propagation
COPY examples ./examples
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && python -c "import sys, zipfile, glob; names = zipfile.ZipFile(glob.glob('/wheels/*.whl')[0]).namelist(); sys.exit('router/_compiled.json' not in names)"

FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl \
    && rm -rf /wheels \
    && useradd --system --uid 10001 --no-create-home devstack

WORKDIR /
USER 10001:10001

# 8080: proxy listener; 9901: router admin; 9902: controller feed.
EXPOSE 8080 9901 9902
HEALTHCHECK --interval=10s --timeout=2s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9901/healthz', timeout=1).status == 200 else 1)"]
ENTRYPOINT ["devstack"]
CMD ["router", "--routes", "/etc/devstack/routes.yaml", "--listen", "0.0.0.0:8080", "--admin", "0.0.0.0:9901"]
