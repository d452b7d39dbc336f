"""The two seams that kernels plug into: attention and matmul."""

from flashmm_jax.ops import attention
from flashmm_jax.ops import matmul
from flashmm_jax.ops import sparse_attention
