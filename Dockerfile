# The syncnorm image of docker-compose.yml and deploy/k8s: the coordinator and the CPU
# training workers.  Build from the repository root:  docker build -t syncnorm:0.1.0 .
FROM python:3.11-slim-bookworm

# torch first, the CPU build from PyTorch's own index: installed as a dependency of
# syncnorm it would come from PyPI as the CUDA build (gigabytes).  Same version as
# scripts/install.sh; for GPU workers start from a CUDA base and install a CUDA build.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /opt/syncnorm
COPY pyproject.toml README.md ./
COPY syncnorm ./syncnorm
RUN pip install --no-cache-dir . \
    && useradd --create-home --uid 1000 syncnorm \
    && mkdir /data && chown syncnorm /data

# /data: the coordinator's --state-dir (a new named volume takes this owner).
USER syncnorm
WORKDIR /home/syncnorm
CMD ["syncnorm", "--help"]
