#!/usr/bin/env bash
# Source on a GPU machine without network: installs the carried wheels (git-ignored .whl/, made
# with `pip download --no-deps` for cp312 manylinux) that its image lacks, into /tmp/site.
# The jax 0.11.2 image (2026-11-25) lacked: ml-collections==1.1.0 grain==0.2.18
# array-record==0.8.6 tensorboardX==2.6.5 portpicker==1.6.0, and for tokamax==0.0.17:
# einshape==1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
# typing-inspection==0.4.5 qwix==0.1.8 immutabledict==4.3.1.
#   source benchmarks/device_prelude.sh && bash benchmarks/spine_gpu.sh ...
# The H200 image has python3 (its JAX interpreter) and may lack a plain `python`.
command -v python >/dev/null || { mkdir -p /tmp/bin && ln -sf "$(command -v python3)" /tmp/bin/python \
  && export PATH=/tmp/bin:$PATH; }
python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
# tokamax imports xprof (a profiler UI, ~89 MB with its dependencies) only for its own
# benchmarking helpers, which we do not use: a stub module keeps `import tokamax` working.
if [ -n "$(ls .whl/tokamax-*.whl 2>/dev/null)" ] && ! python -c "import xprof" 2>/dev/null; then
  mkdir -p /tmp/site/xprof/cli
  touch /tmp/site/xprof/__init__.py /tmp/site/xprof/cli/__init__.py
  printf 'def get_kernel_stats_tool(*a, **k):\n  raise RuntimeError("xprof stub: not installed")\n' \
      > /tmp/site/xprof/cli/tools.py
fi
export PYTHONPATH=/tmp/site:$PWD
# The lent multi-GPU hosts keep NVLink multicast off (it can take the shared GPUs out of
# service): keep it off for every process started from here, whatever its environment.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
