"""The FlashMM model: ViT + projector + prefix-LM decoder, and greedy decoding."""

from flashmm_jax.models.decode import generate
from flashmm_jax.models.decode import init_cache
from flashmm_jax.models.multimodal import FlashMM
from flashmm_jax.models.multimodal import num_image_tokens
