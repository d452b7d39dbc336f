"""XLA flags for the tests' CPU processes, the pytest workers' and the training
and eval processes some tests start.

XLA's CPU backend without LLVM's costly optimisations: the tests compile many
programs and run each a few times (the tiny model's init: 9.1 -> 4.0 s to
compile). Checks compare values within tolerances, or two runs under the same
flags bit for bit, so they hold at either level.
"""

FAST_COMPILE = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'
