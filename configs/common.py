"""Shared config pieces: argument parsing, the size table and the base config.

A config file's `get_config(arg)` takes "VARIANT[,key=value,...]", e.g.
`configs/flash.py:tiny` or `configs/flash.py:small,runlocal`. Anything else on
the command line goes through ml_collections overrides
(`--config.train.total_steps=200`), which reject unknown keys.
"""

import ml_collections

# Width, depth and heads of each named size, per model family. The Pro teacher
# is larger than the Flash student at every size.
#   vision: (width, depth, heads, mlp_dim, patch)
#   lm:     (width, depth, heads, kv_heads, head_dim, mlp_dim)
SIZES = {
    'flash': {
        'tiny': dict(vision=(64, 2, 2, 128, 8), lm=(128, 2, 4, 2, 32, 256)),
        'small': dict(vision=(256, 4, 4, 1024, 8), lm=(384, 6, 6, 2, 64, 1536)),
        'base': dict(vision=(768, 12, 12, 3072, 16), lm=(1024, 16, 16, 4, 64, 4096)),
        '7b': dict(vision=(1024, 24, 16, 4096, 14), lm=(4096, 32, 32, 8, 128, 13312)),
    },
    'pro': {
        'tiny': dict(vision=(96, 2, 2, 192, 8), lm=(192, 3, 6, 2, 32, 384)),
        'small': dict(vision=(384, 6, 6, 1536, 8), lm=(640, 8, 10, 2, 64, 2560)),
        'base': dict(vision=(1024, 16, 16, 4096, 16), lm=(1536, 20, 24, 8, 64, 6144)),
        '7b': dict(vision=(1280, 32, 16, 5120, 14), lm=(5120, 40, 40, 8, 128, 17920)),
    },
}

# Input resolution, text budget and batch per size. Image tokens = (image/patch)^2.
SIZE_DATA = {
    'tiny': dict(image_size=32, max_text_len=48, batch_size=32, vocab_size=1024),
    'small': dict(image_size=64, max_text_len=48, batch_size=256, vocab_size=1024),
    'base': dict(image_size=224, max_text_len=64, batch_size=256, vocab_size=1024),
    # A 7B-class shape for systems benchmarks (random weights): a realistic vocab.
    '7b': dict(image_size=224, max_text_len=64, batch_size=64, vocab_size=32000),
}

# Logical axis -> mesh axis. Layers only name logical axes; another sharding
# scheme is another table, not a code change.
LOGICAL_AXIS_RULES = (
    ('batch', ('data', 'fsdp')),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('head_dim', None),
    ('vocab', 'tensor'),
    ('patch', None),
    ('length', None),
)


def parse_arg(arg, valid_variants, **defaults):
  """Parses "variant,key=value,flag" into a ConfigDict of typed fields."""
  fields = dict(defaults)
  parts = [p for p in (arg or '').split(',') if p]
  if not parts:
    raise ValueError(f'Config needs a variant, one of {sorted(valid_variants)}; '
                     'e.g. configs/flash.py:tiny')
  variant, *rest = parts
  if variant not in valid_variants:
    raise ValueError(f'Unknown variant {variant!r}; valid: {sorted(valid_variants)}')
  fields['variant'] = variant
  for item in rest:
    key, _, value = item.partition('=')
    if key not in defaults:
      raise ValueError(f'Unknown config argument {key!r} in {arg!r}; '
                       f'valid: {sorted(defaults)}')
    kind = type(defaults[key])
    if kind is bool:
      fields[key] = value.lower() in ('', '1', 'true', 'yes')
    else:
      fields[key] = kind(value)
  return ml_collections.ConfigDict(fields)


def model_config(family, size):
  """The model section for a family ('flash' or 'pro') at a named size."""
  if size not in SIZES[family]:
    raise ValueError(f'Unknown size {size!r} for {family}; valid: {sorted(SIZES[family])}')
  s = SIZES[family][size]
  vw, vd, vh, vm, patch = s['vision']
  w, d, h, kv, hd, m = s['lm']
  c = ml_collections.ConfigDict()
  c.family = family
  c.size = size
  # 'conv': stride-2 convolutions down to the patch grid (sees small shapes
  # better, trains faster); 'patch': the linear ViT embedding (any patch size).
  stem = 'conv' if patch & (patch - 1) == 0 else 'patch'
  c.vision = dict(width=vw, depth=vd, num_heads=vh, mlp_dim=vm, patch_size=patch, stem=stem)
  c.lm = dict(width=w, depth=d, num_heads=h, num_kv_heads=kv, head_dim=hd, mlp_dim=m,
              vocab_size=SIZE_DATA[size]['vocab_size'], rope_base=10_000.0)
  # The two seams later kernels plug into. attention: 'xla' | 'cudnn' | 'auto'
  # ('auto' = cudnn on GPU, xla elsewhere). matmul: 'xla' (bf16/f32 dot).
  c.attention = 'auto'
  c.matmul = 'xla'
  c.dtype = 'bfloat16'        # compute dtype
  c.param_dtype = 'float32'
  c.remat = 'none'            # 'none' | 'full' | 'dots' | 'dots_no_batch'
  c.share_vision_lm_mlp = False  # the article's cross-modal weight sharing
  # Dynamic block-sparse attention (issue #10) in the LM layers: a learned
  # gate picks, per query block and kv head, the key blocks to compute.
  #   kernel: the sparse seam's implementation ('auto' | 'reference' | kernels).
  #   threshold: keep key blocks with gate probability >= threshold x the best
  #     one of the query block (0 keeps every visible block).
  #   top_k: at most this many key blocks per query block besides the always
  #     kept first and diagonal ones (0 = no budget); combines with threshold.
  #   coverage: keep the fewest key blocks, first and diagonal ones first, whose
  #     gate probabilities sum to coverage (top-p; 0 = off); combines too.
  #   target: the gate's distillation target, 'peak' (block max-pooled
  #     attention probability, SeerAttention) or 'mass' (the block's share
  #     of each row's attention, max over the rows of the query block).
  #   gate_dim: width of the gate's per-head projections (even: rotary).
  #   min_kv_blocks: shorter sequences take the dense path.
  #   decode: decode steps against the KV cache are sparse too (the gate scores
  #     the new token against per-block key statistics kept in the cache);
  #     off by default: the measured recipes decode densely.
  #   dense_text: the query tiles holding text (prompt and answer, after the image
  #     tokens) keep every key block; only the image's rows are pruned.
  c.sparse = dict(enabled=False, kernel='auto', block_q=128, block_k=64, threshold=0.3,
                  top_k=0, coverage=0.0, target='peak', gate_dim=64, min_kv_blocks=2,
                  decode=False, dense_text=False)
  return c


# Sparse tiles per size: several key blocks in each size's LM sequence
# (image tokens + max_text_len: tiny 64, small 112, base 260, 7b 320).
SPARSE_BLOCKS = {'tiny': (16, 16), 'small': (32, 16), 'base': (64, 32), '7b': (64, 32)}


def use_sparse_gate(c, size, joint=False):
  """The gate fine-tuning recipes: sparse LM attention from a dense checkpoint
  (--config.train.init_from=DENSE_WORKDIR).

  Stage 1 (`sparse`): only the gate trains, toward the dense attention.
  Stage 2 (`sparse,joint`, init_from the stage-1 workdir): the whole model
  trains through the sparse kernels at a lower rate, so the LM adapts to the
  blocks it no longer sees, while the gate keeps following its attention.
  """
  c.model.sparse.enabled = True
  c.model.sparse.block_q, c.model.sparse.block_k = SPARSE_BLOCKS[size]
  # Measured on small at 128 px (H100, 2026-11-25, docs/results.md): a 'mass'
  # gate with coverage 0.5 kept 78.4% accuracy at 66.5% sparsity after the
  # gate stage, a 'peak' gate with threshold 0.3 70.4% at 61.7% (dense 83.3%).
  c.model.sparse.update(target='mass', threshold=0.0, coverage=0.5)
  c.train.gate_loss_weight = 1.0
  c.train.warmup_steps = 50
  if joint:
    c.train.trainable = 'all'
    c.train.total_steps = 600
    c.train.lr = 2e-4
    # Measured on small at 256 px (H200, 2026-11-29, docs/results.md, fifth run):
    # with the text's query tiles dense, 600 steps at coverage 0.6 came within 0.3
    # points of the dense model given the same 600 steps, at 64.6% sparsity; the
    # image's rows alone pruned, 1.7 points behind at 67.6%.
    c.model.sparse.update(coverage=0.6, dense_text=True)
  else:
    c.train.trainable = 'gate'
    c.train.total_steps = 500
    c.train.lr = 1e-3


def base_config(family, size, runlocal=False, sparse=False, joint=False):
  """Everything a run needs; family files change what differs."""
  sd = SIZE_DATA[size]
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = model_config(family, size)

  c.data = ml_collections.ConfigDict()
  c.data.image_size = sd['image_size']
  c.data.max_text_len = sd['max_text_len']
  c.data.tasks = ()               # empty = all 12 tasks
  c.data.seed = 0
  c.data.eval_examples = 200      # per task, fixed split
  c.data.tokenizer = 'suite'      # 'suite' (shipped SentencePiece) | 'bytes' | a .model path
  c.data.num_workers = 0          # grain worker processes; 0 = in-process
  c.data.source = 'suite'         # 'suite' | 'vqa_json' | 'coco'
  c.data.path = ''                # for the real-format loaders

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = sd['batch_size']
  c.train.total_steps = 2000
  # Measured on small Pro (H100, 2026-11-25): lr 1e-3 stalls on the attribute-binding
  # tasks (vqa_shape alone 45% after 1600 steps); 5e-4 with b2 0.95 reaches 84% in 550.
  c.train.lr = 5e-4
  c.train.warmup_steps = 200
  c.train.min_lr_ratio = 0.05
  c.train.weight_decay = 0.05
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  c.train.grad_clip = 1.0
  c.train.label_smoothing = 0.0
  c.train.log_every = 50
  c.train.ckpt_every = 500
  c.train.keep_ckpts = 3
  c.train.eval_every = 0          # 0 = only at the end (eval.py does the full table)
  c.train.max_time_minutes = 0.0  # 0 = no wall-clock budget
  # Sparse attention gate (model.sparse.enabled): KL to its target (the block-pooled
  # dense attention, model.sparse.target), added to the loss with this weight
  # (0 = no target pass).
  c.train.gate_loss_weight = 1.0
  c.train.trainable = 'all'       # 'all' | 'gate' (everything else frozen)
  # A checkpoint (workdir or step dir) whose params start a fresh run (a workdir
  # with its own checkpoint resumes instead); params it lacks may only be the
  # sparse gate's, which keep their fresh init.
  c.train.init_from = ''

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 256
  c.eval.max_decode_len = 20     # answers are at most 16 suite tokens + eos
  c.eval.noise = ''               # 'NAME:SEVERITY', e.g. 'gaussian:3'

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                # -1: all devices not used by the other axes
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.logical_axis_rules = LOGICAL_AXIS_RULES

  if size == 'tiny':  # a CPU-sized run that still learns something
    c.model.dtype = 'float32'  # the CPU emulates bf16 slowly
    c.train.total_steps = 600
    c.train.lr = 1e-3
    c.train.warmup_steps = 50
    c.train.ckpt_every = 200
    c.eval.batch_size = 64
    c.data.eval_examples = 50

  if sparse or joint:
    use_sparse_gate(c, size, joint=joint)

  if runlocal:  # shrink anything to a smoke test
    c.train.total_steps = 20
    c.train.batch_size = 8
    c.train.log_every = 5
    c.train.ckpt_every = 10
    c.train.warmup_steps = 5
    c.data.eval_examples = 8
    c.eval.batch_size = 16
  return c
