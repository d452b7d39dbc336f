"""Test-wide setup: 8 virtual CPU devices (for the sharding tests), XLA flags that
compile fast (cpu_flags), a shared compilation cache, and the repo on sys.path."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
from tests import cpu_flags  # noqa: E402

# Must be set before JAX initialises its backends.
os.environ['XLA_FLAGS'] = ' '.join([os.environ.get('XLA_FLAGS', ''), cpu_flags.FAST_COMPILE,
                                    '--xla_force_host_platform_device_count=8']).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# A persistent compilation cache shared by the xdist workers: many tests compile
# the same programs (a trainer's step, a model's forward), and a hit skips XLA's
# compile. Measured on the 2-core CI machine: tests/training/test_trainer.py
# 161 -> 121 s from a cold cache. Executables with host callbacks (the Pallas
# interpreters) are not cached; nothing else changes.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(ROOT, '.jax_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
