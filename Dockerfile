# syntax=docker/dockerfile:1
# The image that the manifests in k8s/ and cluster/aws-gpu.yaml run: `make image` builds it as
# ghcr.io/posefr/posefr-dist:<version in pyproject.toml> (BuildKit, the default builder of Docker
# 23 and newer).
#
# - Ray 2.60.0's GPU image as the base: Python 3.11 in /home/ray/anaconda3 (on PATH), Ray already
#   installed there, user `ray` = uid 1000 (group users, gid 100).
# - scripts/install.sh --cuda, the script `make setup` runs with --cpu, installs into that Python
#   the CUDA build of torch 2.13.0 (PyTorch's cu128 index; --build-arg TORCH_INDEX_URL=... for
#   another) and this project, not editable, without test extras.
# - the repository (less .dockerignore) at /app, the working directory: the manifests run
#   `python /app/jobs/...` with configs from /app/jobs/configs/.
# - runs as uid 1000, like the pods' securityContext (runAsUser: 1000).
#
# Nothing here installs a compiler or compiles anything: every dependency comes as a wheel, except
# DeepSpeed, whose source build is pure Python (its C++/CUDA ops are not pre-built and this project
# uses none of them). The g++ and CUDA toolkit that are on PATH come with the base image (Ray's GPU
# images are built on NVIDIA's CUDA devel images and keep them).
ARG BASE_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${BASE_IMAGE}

# PyTorch wheel index for the CUDA build of torch; empty: the script's default (cu128)
ARG TORCH_INDEX_URL=

# Runtime libraries that open3d's wheel links against (libGL, libEGL, libX11, libudev, libidn2,
# libusb) and that the CUDA base image lacks; no build tools. Then /app for the ray user, and
# ~/.cache (where the pip cache below is mounted) so that it stays the ray user's.
USER root
RUN apt-get update -q \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        libgl1 libegl1 libx11-6 libudev1 libidn2-0 libusb-1.0-0 \
    && rm -rf /var/lib/apt/lists/* \
    && install -d -o 1000 -g 100 /app /home/ray/.cache

USER 1000
WORKDIR /app

# torch and the project's dependencies: this large layer changes only with pyproject.toml or the
# script (pip's cache stays in a build cache, out of the image)
COPY --chown=1000:100 pyproject.toml /app/
COPY --chown=1000:100 scripts/install.sh /app/scripts/
RUN --mount=type=cache,target=/home/ray/.cache/pip,uid=1000,gid=100 \
    scripts/install.sh --cuda --deps-only /home/ray/anaconda3/bin/python /home/ray/anaconda3

# the project itself, then a check that what the jobs import loads (open3d with its libraries)
COPY --chown=1000:100 . /app
RUN --mount=type=cache,target=/home/ray/.cache/pip,uid=1000,gid=100 \
    scripts/install.sh --cuda /home/ray/anaconda3/bin/python /home/ray/anaconda3 \
    && rm -rf build posefr_dist.egg-info \
    && python -I -c "import torch, ray, posefr_dist; from posefr_dist.data.o3d import open3d; open3d(); \
assert torch.__version__.startswith('2.13.0') and torch.version.cuda, torch.__version__; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'ray', ray.__version__)"

USER 1000
