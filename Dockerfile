# devstack router/controller image: slim Python, non-root, installed from this source tree.
# Stage 1 builds a wheel with the router's hot path compiled by mypyc (needs a C compiler);
# stage 2 installs that wheel into a slim image without one.
#
# Both stages use one base image pinned by digest, not only by tag. The tag is rebuilt in place
# (Python patch releases, Debian updates), so by tag two builds of the same commit can get
# different images, and whatever is pushed under it next flows into ours unreviewed; the digest
# makes the build reproducible and every base image change a visible diff. The tag stays in the
# reference for readers (Docker ignores it once a digest is given). This digest is the
# multi-platform index (amd64, arm64, armv7, 386, ppc64le) of Python 3.11.16 on Debian bookworm,
# built 2026-08-25, as recorded in docker-library/repo-info (repos/python/remote/3.11-slim-bookworm.md).
# To move to a newer build (do, regularly, for security fixes), run
#   docker buildx imagetools inspect python:3.11-slim-bookworm
# and put the "Digest:" it prints in both FROM lines.
FROM python:3.11-slim-bookworm@sha256:0bee7276f83efd4a1ee05bbbf4281d95ed28e079220a9457f25a93e3f1e3c31b AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml setup.py README.md LICENSE ./
COPY devstack ./devstack
COPY router ./router
COPY controller ./controller
COPY propagation ./propagation
COPY examples ./examples
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && python -c "import sys, zipfile, glob; names = zipfile.ZipFile(glob.glob('/wheels/*.whl')[0]).namelist(); sys.exit('router/_compiled.json' not in names)"

FROM python:3.11-slim-bookworm@sha256:0bee7276f83efd4a1ee05bbbf4281d95ed28e079220a9457f25a93e3f1e3c31b

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir "$(find /wheels -name '*.whl')[router,kubernetes]" \
    && rm -rf /wheels \
    && useradd --system --uid 10001 --no-create-home devstack

WORKDIR /
USER 10001:10001

# 8080: proxy listener; 9901: router admin; 9902: controller feed.
EXPOSE 8080 9901 9902
# One health check for whichever command the image runs: the router answers GET /healthz on its
# admin port (9901), the controller on its feed port (9902). It passes when any port of
# DEVSTACK_HEALTHCHECK_PORTS (space-separated) answers 200 on loopback; set it when --admin or
# --listen moves to another port. Plain Python (urllib): no curl in a slim image; it ignores
# HTTP_PROXY, which must not capture a loopback check.
ENV DEVSTACK_HEALTHCHECK_PORTS="9901 9902"
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request as r\nopener = r.build_opener(r.ProxyHandler({}))\nfor port in os.environ.get('DEVSTACK_HEALTHCHECK_PORTS', '9901 9902').split():\n    try:\n        if opener.open(f'http://127.0.0.1:{port}/healthz', timeout=1).status == 200:\n            sys.exit(0)\n    except Exception:\n        pass\nsys.exit(1)"]
ENTRYPOINT ["devstack"]
CMD ["router", "--routes", "/etc/devstack/routes.yaml", "--listen", "0.0.0.0:8080", "--admin", "0.0.0.0:9901"]
