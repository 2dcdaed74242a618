# One image for every exitflow stage (device, edge, cloud workers, replay, monitor).
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 EXITFLOW_HOME=/var/lib/exitflow EXITFLOW_DATA=/data
WORKDIR /app
# torch pinned (an unpinned torch pulls a multi-GB CUDA build); pass PIP_EXTRA_INDEX_URL as a build
# arg to take the CPU-only wheel from your mirror.
ARG PIP_EXTRA_INDEX_URL=""
RUN pip install torch==2.13.0
COPY pyproject.toml README.md ./
COPY stream stream
COPY producers producers
COPY consumers consumers
COPY policies policies
COPY monitoring monitoring
RUN pip install .
RUN useradd --create-home --uid 10001 exitflow && mkdir -p /var/lib/exitflow && chown exitflow /var/lib/exitflow
USER exitflow
ENTRYPOINT ["exitflow"]
CMD ["--help"]
