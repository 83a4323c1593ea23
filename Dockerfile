# The Shardwright image: Ray plus the `shardwright` package. The Helm chart's default image is this
# build: `image.repository` shardwright/shardwright, tag = the chart's appVersion (helm/shardwright).
# The Ray head, the Ray workers and the gRPC server all run it (Ray needs one Ray and Python version
# across a cluster), so RAY_VERSION must equal the chart's `ray.version`.
#
# CPU build (the default; runs the demo and CPU workers):
#   docker build -t shardwright/shardwright:0.1.0 .
# CUDA build (GPU workers): a CUDA Ray base image and the matching PyTorch wheel index:
#   docker build --build-arg RAY_VARIANT=cu124 --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 \
#     -t shardwright/shardwright:0.1.0-cu124 .
# then set `image.tag: 0.1.0-cu124` (and `image.repository` to your registry) in the chart's values.
#
# Check an image: docker run --rm shardwright/shardwright:0.1.0 shardwright demo

ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
ARG RAY_VARIANT=cpu
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${RAY_VARIANT}

ARG RAY_VERSION
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

WORKDIR /home/ray/shardwright
# torch first, from the index that matches the variant; then the package, keeping the base image's Ray.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch>=2.4"
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users shardwright ./shardwright
COPY --chown=ray:users examples ./examples
RUN pip install --no-cache-dir "ray[default]==${RAY_VERSION}" . && shardwright --help > /dev/null

# `shardwright serve` listens on 50051 by default; the chart passes --host/--port/--health-port.
EXPOSE 50051
CMD ["shardwright", "serve", "--host", "127.0.0.1"]
