# One Dockerfile, one image per service: build a stage's image with its target, e.g.
#   docker build --target encryptor -t dicomflow-encryptor:0.1.0 .
# Targets: scp-gateway, encryptor, store-writer, scu-gateway. Each runs one stage as the
# non-root user 10001 on a read-only root filesystem (writable: /tmp and the spool folder,
# mounted as emptyDir volumes by deploy/k8s).

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
RUN python -m venv /opt/dicomflow
COPY requirements.lock pyproject.toml README.md ./
COPY src ./src
COPY shared ./shared
COPY services ./services
# The runtime lock only (requirements-test.lock is not copied), then dicomflow itself.
RUN /opt/dicomflow/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/dicomflow/bin/pip install --no-cache-dir -r requirements.lock \
 && /opt/dicomflow/bin/pip install --no-cache-dir --no-deps .

FROM python:3.11-slim-bookworm AS runtime
COPY --from=build /opt/dicomflow /opt/dicomflow
RUN groupadd --gid 10001 dicomflow \
 && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin dicomflow \
 && install -d -o 10001 -g 10001 /var/spool/dicomflow
ENV PATH=/opt/dicomflow/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 10001:10001
EXPOSE 9090
ENTRYPOINT ["dicomflow"]

FROM runtime AS scp-gateway
EXPOSE 11112
CMD ["scp-gateway"]

FROM runtime AS encryptor
CMD ["encryptor"]

FROM runtime AS store-writer
CMD ["store-writer"]

FROM runtime AS scu-gateway
CMD ["scu-gateway"]
