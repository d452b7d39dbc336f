"""One shared test suite for every block-sparse attention kernel.

A backend's test class subclasses `SparseAttentionTestBase`, names its kernel
and its constraints, and inherits every test (tokamax `attention/test_base.py`
style):

  class TestTritonInterpret(SparseAttentionTestBase):
    kernel = staticmethod(functools.partial(triton.sparse_attention, interpret=True))
    dtypes = ('float32', 'bfloat16')

The kernel contract the base calls:

  kernel(q, k, v, tables, kv_len, prefix_len, *, block_sizes) -> out
    q [B, T, Hq, D]; k, v [B, S, Hkv, D]; tables a BlockTables whose head axis
    is Hkv (block_tables.build_block_tables); kv_len, prefix_len int32 [B];
    block_sizes a BlockSizes. out [B, T, Hq, D] in q.dtype, with the semantics
    of reference.py (rows with no visible key are exactly 0). If the class sets
    supports_grad, jax.grad must reach q, k and v.

Cases are named data (`CASES`) run once per supported dtype; shapes are counted
in blocks (`seq_blocks`), so a slow interpreter and a real GPU run the same
cases at different sizes. Knobs on the class: block_sizes, dtypes, head_dims,
tolerances / grad_tolerances per dtype, supports_grad, seq_blocks, max_cases,
skip_cases, and grad_case(case_id) to thin out gradient cases. Test ids read
'<case>-<dtype>[-d<head_dim>|-bq<block_q>bk<block_k>]'. Not a test module
itself (no `test_` prefix).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.sparse_attention import (
    BlockSizes, BlockTables, build_block_tables, reference_sparse_attention)
from pallas_kernels.sparse_attention.reference import (
    element_mask, expand_block_mask)


@dataclasses.dataclass(frozen=True)
class Case:
  """One named configuration. Lengths are fractions, so they scale with S.

  kv_len[b] = round(kv_frac[b] * S); prefix_len[b] = round(prefix_frac[b] * kv_len[b])
  (so prefix_frac 1.0 means prefix_len == kv_len: a fully bidirectional row).
  """
  name: str
  mask: str                          # a key of MASK_KINDS
  heads: tuple[int, int] = (2, 2)    # (Hq, Hkv); Hq / Hkv is the GQA ratio
  kv_frac: tuple[float, float] = (1.0, 1.0)
  prefix_frac: tuple[float, float] = (0.0, 0.0)
  kv_blocks_ratio: int = 1           # S = ratio * T
  seed: int = 0


CASES = (
    Case('all_blocks_mha', 'all'),
    Case('all_blocks_ragged_gqa4', 'all', (8, 2), (1.0, 0.64), (0.0, 0.3)),
    Case('random_ragged_gqa4', 'random', (4, 1), (0.86, 0.58), (0.5, 0.1), seed=1),
    Case('random_gqa8_prefix_eq_kv_len', 'random', (8, 1), (1.0, 0.7), (1.0, 0.0),
         seed=2),
    Case('one_block_per_row_gqa4', 'one_per_row', (4, 1), (1.0, 0.8), (0.2, 0.0),
         seed=3),
    Case('diagonal_only', 'diagonal', (2, 2), (0.8, 1.0), (0.0, 0.4), seed=4),
    Case('empty_rows', 'empty_rows', (4, 2), (1.0, 0.7), (0.6, 0.0), seed=5),
    Case('kv_len_zero_row', 'random', (2, 1), (0.0, 0.55), (0.0, 1.0), seed=6),
    Case('kv_longer_than_q', 'random', (4, 2), (0.9, 1.0), (0.5, 0.1),
         kv_blocks_ratio=2, seed=7),
)


# ------------------------------------------------------------ block masks ---

def diagonal_blocks(n_q, n_k, bs: BlockSizes) -> np.ndarray:
  """bool [nQ, nK]: key blocks that hold some key j <= i for a query i of the
  block and j >= the block's first query (the causal diagonal)."""
  q0 = np.arange(n_q)[:, None] * bs.block_q
  k0 = np.arange(n_k)[None, :] * bs.block_k
  return (k0 < q0 + bs.block_q) & (k0 + bs.block_k > q0)


def _random(rng, shape, diag):
  return (rng.random(shape) < 0.4) | diag


def _one_per_row(rng, shape, diag):
  """One random key block per row, at or below the diagonal (so it is seen)."""
  last = np.max(np.where(diag, np.arange(shape[-1]), -1), axis=-1)  # [nQ]
  pick = rng.integers(0, last + 1, size=shape[:-1])
  return pick[..., None] == np.arange(shape[-1])


def _empty_rows(rng, shape, diag):
  """Random, then a few rows select nothing (kv_count == 0)."""
  m = _random(rng, shape, diag)
  m[0, 0, 0] = m[-1, :, -1] = False
  return m


MASK_KINDS = {
    'all': lambda rng, shape, diag: np.ones(shape, bool),
    'random': _random,
    'diagonal': lambda rng, shape, diag: np.broadcast_to(diag, shape),
    'one_per_row': _one_per_row,
    'empty_rows': _empty_rows,
}


def random_block_mask(kind, rng, shape, bs: BlockSizes) -> np.ndarray:
  """bool [B, Hkv, nQ, nK] of the named kind; 'random' always keeps the diagonal."""
  return MASK_KINDS[kind](rng, shape, diagonal_blocks(*shape[-2:], bs))


# ----------------------------------------------------------------- inputs ---

@dataclasses.dataclass(frozen=True)
class Inputs:
  q: jax.Array
  k: jax.Array
  v: jax.Array
  block_mask: jax.Array
  tables: BlockTables
  kv_len: jax.Array
  prefix_len: jax.Array
  block_sizes: BlockSizes


def make_inputs(case: Case, dtype, head_dim, bs: BlockSizes, seq_blocks,
                batch=2) -> Inputs:
  """Random q, k, v (normal), the case's block mask, tables and lengths.

  numpy draws the data: eager jax.random would compile each small op per shape.
  """
  hq, hkv = case.heads
  t = seq_blocks * bs.block_q
  s = case.kv_blocks_ratio * t
  if s % bs.block_k:
    raise ValueError(f'kv length {s=} must be a multiple of block_k={bs.block_k}')
  rng = np.random.default_rng(case.seed)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
  q, k, v = (normal(batch, t, hq, head_dim), normal(batch, s, hkv, head_dim),
             normal(batch, s, hkv, head_dim))
  mask = jnp.asarray(random_block_mask(
      case.mask, rng, (batch, hkv, t // bs.block_q, s // bs.block_k), bs))
  kv_len = [round(f * s) for f in case.kv_frac[:batch]]
  prefix = [round(p * n) for p, n in zip(case.prefix_frac, kv_len)]
  return Inputs(q, k, v, mask, _build_tables(mask), jnp.array(kv_len, jnp.int32),
                jnp.array(prefix, jnp.int32), bs)


_build_tables = jax.jit(build_block_tables)


def reference(x: Inputs, q=None, k=None, v=None):
  """reference.py on x (or on replacement q, k, v, for gradients), in f32."""
  q, k, v = (x.q if q is None else q), (x.k if k is None else k), (x.v if v is None else v)
  f32 = lambda a: a.astype(jnp.float32)
  return _reference_jit(f32(q), f32(k), f32(v), x.block_mask, x.kv_len,
                        x.prefix_len, block_sizes=x.block_sizes)


# Jitted once per shape: op-by-op dispatch of the dense reference is slower.
_reference_jit = jax.jit(reference_sparse_attention, static_argnames='block_sizes')


def dense_prefix_lm(q, k, v, kv_len, prefix_len):
  """Independent float64 numpy attention: causal + prefix + kv_len, no blocks."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  logits = np.einsum('bthd,bshd->bhts', q, k) / np.sqrt(q.shape[-1])
  i = np.arange(q.shape[1])[:, None]
  j = np.arange(k.shape[1])[None, :]
  col = lambda a: np.asarray(a)[:, None, None, None]
  visible = (j < col(kv_len)) & ((j < col(prefix_len)) | (j <= i))
  logits = np.where(visible, logits, -np.inf)
  top = logits.max(-1, keepdims=True)
  p = np.exp(logits - np.where(np.isfinite(top), top, 0.0))   # 0 where masked
  p /= np.maximum(p.sum(-1, keepdims=True), 1e-300)
  return np.einsum('bhts,bshd->bthd', p, v)


def rows_without_keys(x: Inputs) -> np.ndarray:
  """bool [B, T, Hq]: query rows with no visible key (must output exactly 0)."""
  return np.asarray(_keyless(x.block_mask, x.kv_len, x.prefix_len, x.block_sizes,
                             x.q.shape[1], x.q.shape[2], x.k.shape[1]))


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6))
def _keyless(block_mask, kv_len, prefix_len, bs, t, hq, s):
  visible = (expand_block_mask(block_mask, hq, bs)
             & element_mask(t, s, kv_len, prefix_len)[:, None])
  return jnp.swapaxes(~visible.any(-1), 1, 2)


def assert_close(actual, expected, tol, what):
  atol, rtol = tol
  np.testing.assert_allclose(np.asarray(actual, np.float32),
                             np.asarray(expected, np.float32),
                             atol=atol, rtol=rtol, err_msg=what)


# ------------------------------------------------------------------- base ---

class SparseAttentionTestBase:
  """Subclass, set `kernel` and the constraints below; pytest collects the
  subclass (name it Test...), not this class."""

  kernel = None                                 # see the module docstring
  block_sizes = (BlockSizes(32, 32),)           # first one runs every case
  dtypes = ('float32', 'bfloat16')
  head_dims = (32,)                             # first one runs every case
  tolerances = {'float32': (2e-5, 2e-5), 'bfloat16': (2e-2, 2e-2)}
  grad_tolerances = {'float32': (1e-4, 1e-4), 'bfloat16': (6e-2, 3e-2)}
  supports_grad = True
  seq_blocks = 2            # query blocks per sequence: raise it on hardware
  max_cases = None          # cap on cases per test (slow interpreters)
  skip_cases = ()           # case names this kernel does not support

  def grad_case(self, case_id) -> bool:
    """Whether test_grad runs on this case id (e.g. 'empty_rows-bfloat16');
    override to thin out slow interpreters."""
    return self.supports_grad

  # ---- case generation

  def cases(self):
    """(id, Case, dtype, head_dim, block_sizes) the subclass supports."""
    bs0, d0 = self.block_sizes[0], self.head_dims[0]
    out = []
    for case in CASES:
      if case.name in self.skip_cases:
        continue
      out += [(f'{case.name}-{dt}', case, dt, d0, bs0) for dt in self.dtypes]
    # Other head dims and block sizes: on the first two cases, first dtype.
    for case in CASES[:2]:
      out += [(f'{case.name}-{self.dtypes[0]}-d{d}', case, self.dtypes[0], d, bs0)
              for d in self.head_dims[1:]]
      out += [(f'{case.name}-{self.dtypes[0]}-bq{bs.block_q}bk{bs.block_k}', case,
               self.dtypes[0], d0, bs) for bs in self.block_sizes[1:]]
    return out[:self.max_cases]

  def pytest_generate_tests(self, metafunc):
    if 'case' not in metafunc.fixturenames:
      return
    keep = getattr(metafunc.function, 'case_filter', lambda self, case_id, c: True)
    cases = [c for c in self.cases() if keep(self, c[0], c[1])]
    metafunc.parametrize('case', [c[1:] for c in cases], ids=[c[0] for c in cases])

  def inputs(self, case):
    c, dtype, head_dim, bs = case
    return make_inputs(c, jnp.dtype(dtype), head_dim, bs, self.seq_blocks)

  def run_kernel(self, x: Inputs, q=None, k=None, v=None):
    q, k, v = (x.q if q is None else q), (x.k if k is None else k), (x.v if v is None else v)
    return type(self).kernel(q, k, v, x.tables, x.kv_len, x.prefix_len,
                             block_sizes=x.block_sizes)

  # ---- tests

  def test_forward_matches_reference(self, case):
    x = self.inputs(case)
    out = self.run_kernel(x)
    assert out.shape == x.q.shape and out.dtype == x.q.dtype
    out = np.asarray(out, np.float32)
    assert np.all(np.isfinite(out))
    assert_close(out, reference(x), self.tolerances[case[1]], 'out')
    # Rows that see no key (kv_count 0, kv_len 0, masked tiles) are exactly 0.
    empty = rows_without_keys(x)
    assert not np.any(out[empty]), f'{empty.sum()} keyless rows are not 0'

  def test_all_blocks_is_dense_attention(self, case):
    x = self.inputs(case)
    out = self.run_kernel(x)
    dense = dense_prefix_lm(x.q, x.k, x.v, x.kv_len, x.prefix_len)
    assert_close(out, dense, self.tolerances[case[1]], 'out vs dense formula')

  test_all_blocks_is_dense_attention.case_filter = (
      lambda self, case_id, c: c.mask == 'all')

  def test_grad_matches_reference(self, case):
    x = self.inputs(case)
    w = jax.random.normal(jax.random.PRNGKey(99), x.q.shape, jnp.float32)
    def loss(fn):  # a random projection of the output, summed in f32
      return lambda q, k, v: jnp.sum(fn(x, q, k, v).astype(jnp.float32) * w)
    got = jax.grad(loss(self.run_kernel), argnums=(0, 1, 2))(x.q, x.k, x.v)
    want = jax.grad(loss(reference), argnums=(0, 1, 2))(
        *(a.astype(jnp.float32) for a in (x.q, x.k, x.v)))
    for name, g, r, a in zip('qkv', got, want, (x.q, x.k, x.v)):
      assert g.shape == a.shape and g.dtype == a.dtype, name
      assert np.all(np.isfinite(np.asarray(g, np.float32))), f'd{name} not finite'
      assert_close(g, r, self.grad_tolerances[case[1]], f'd{name}')

  test_grad_matches_reference.case_filter = (
      lambda self, case_id, c: self.grad_case(case_id))
