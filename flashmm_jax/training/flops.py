"""Analytic FLOPs of one training example, for throughput and MFU reports.

Counts matmul FLOPs as XLA's dense path computes them (the full S x S score
matrix, masked or not); backward = 2x forward.
"""

from flashmm_jax.models import vision


def _transformer_forward(tokens, width, depth, q_dim, kv_dim, mlp_params, attn_width):
  proj = 2 * tokens * width * (2 * q_dim + 2 * kv_dim)  # q, k, v, o
  mlp = 2 * tokens * mlp_params
  scores = 2 * 2 * tokens * tokens * attn_width          # q.k and p.v
  return depth * (proj + mlp + scores)


def _stem_flops(v, num_image_tokens):
  if v.get('stem', 'patch') == 'patch':
    return 2 * num_image_tokens * (v.patch_size ** 2 * 3) * v.width
  # conv stem: 3x3 stride-2 convs, then a linear map to the width.
  channels = vision.conv_stem_channels(v.patch_size, v.width)
  steps = len(channels) - 1
  pixels = [num_image_tokens * 4 ** (steps - i) for i in range(1, steps + 1)]
  convs = sum(2 * p * 9 * a * b for p, a, b in zip(pixels, channels[:-1], channels[1:]))
  return convs + 2 * num_image_tokens * channels[-1] * v.width


def forward_flops_per_example(config, num_image_tokens):
  m, v = config.model.lm, config.model.vision
  tokens = num_image_tokens + config.data.max_text_len
  q_dim, kv_dim = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
  lm = _transformer_forward(tokens, m.width, m.depth, q_dim, kv_dim,
                            3 * m.width * m.mlp_dim, q_dim)
  lm += 2 * config.data.max_text_len * m.width * m.vocab_size  # logits on text positions
  vision = _transformer_forward(num_image_tokens, v.width, v.depth, v.width, v.width,
                                2 * v.width * v.mlp_dim, v.width)
  projector = 2 * num_image_tokens * (v.width * m.width + m.width * m.width)
  return lm + vision + _stem_flops(v, num_image_tokens) + projector


def train_flops_per_example(config, num_image_tokens):
  return 3 * forward_flops_per_example(config, num_image_tokens)
