#!/usr/bin/env bash
# Source on a GPU machine without network: installs the carried wheels (git-ignored .whl/, made
# with `pip download --no-deps` for cp312 manylinux) that its image lacks, into /tmp/site.
# The jax 0.11.2 image lacked: ml-collections==1.1.0 grain==0.2.18 array-record==0.8.6
# tensorboardX==2.6.5 portpicker==1.6.0 (2026-11-25).
#   source benchmarks/device_prelude.sh && bash benchmarks/spine_gpu.sh ...
need=""
for pair in ml_collections:ml_collections grain:grain array_record:array_record tensorboardX:tensorboardx portpicker:portpicker cloudpickle:cloudpickle etils:etils yaml:pyyaml google.protobuf:protobuf tqdm:tqdm; do
  mod=${pair%%:*}; whl=${pair##*:}
  python -c "import $mod" 2>/dev/null || need="$need $(ls .whl/${whl}-*.whl)"
done
echo "installing:$need"
[ -n "$need" ] && python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $need
export PYTHONPATH=/tmp/site
