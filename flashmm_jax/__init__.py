"""flashmm_jax: a JAX/Flax NNX framework for fast vision+language models."""

from flashmm_jax.models import FlashMM
from flashmm_jax.models import generate
from flashmm_jax.models import num_image_tokens
