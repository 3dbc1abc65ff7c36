"""Build-time check of the GPU image: torch's CUDA build is the base image's CUDA (major.minor), so the base image's
NVIDIA_REQUIRE_CUDA is the driver range torch needs and the NVIDIA container toolkit refuses a too-old driver."""

import os
import sys

import torch

base = ".".join(os.environ["CUDA_VERSION"].split(".")[:2])
if torch.version.cuda != base:
    sys.exit(f"torch {torch.__version__} is built for CUDA {torch.version.cuda}, the base image has {base}: "
             "move Dockerfile.gpu's FROM to that CUDA")
print(f"torch {torch.__version__}: CUDA {base}, as the base image")
