"""benchmarks/stream_bound.py: the stream-only kernel reads the listed blocks
(GPU interpreter on the CPU), and the block lists it is timed over."""

from absl import flags
from absl.testing import flagsaver
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import stream_bound


@pytest.mark.parametrize('stages, splits, counts', [
    (1, 2, [[5, 1], [8, 3]]),     # odd counts, a one-block row (one slice empty)
    (2, 4, [[8, 6], [4, 7]]),
    (3, 1, [[2, 8], [8, 5]]),
])
def test_stream_reads_each_slices_blocks(stages, splits, counts):
  b, hkv, s, d, block_k = 2, 2, 512, 64, 64
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  kc = jax.random.normal(keys[0], (b, s, hkv, d), jnp.bfloat16)
  vc = jax.random.normal(keys[1], (b, s, hkv, d), jnp.bfloat16)
  ids = jax.vmap(jax.vmap(lambda k: jax.random.permutation(k, s // block_k)))(
      jax.random.split(keys[2], b * hkv).reshape(b, hkv, 2))
  count = jnp.asarray(counts, jnp.int32)
  want = stream_bound.stream_reference(kc, vc, ids, count, block_k=block_k, splits=splits)
  # without and with the pooled keys' load first (8 blocks: half a slot)
  pooled = kc.reshape(b, s // block_k, block_k, hkv, d).max(axis=2)
  for extra in ((), (pooled,)):
    got = np.asarray(stream_bound.stream(kc, vc, ids, count, *extra, block_k=block_k,
                                         stages=stages, splits=splits, interpret=True),
                     np.float32)
    filled = stream_bound.filled_slices(count, splits)
    np.testing.assert_array_equal(got[filled], want[filled])


def test_pooled_keys_over_two_slots():
  """24 blocks of 16 keys: the pooled keys fill the K slot and half the V slot."""
  b, hkv, s, d, block_k = 1, 2, 384, 64, 16
  keys = jax.random.split(jax.random.PRNGKey(1), 2)
  kc = jax.random.normal(keys[0], (b, s, hkv, d), jnp.bfloat16)
  ids = jnp.broadcast_to(jnp.arange(24, dtype=jnp.int32)[::-1], (b, hkv, 24))
  count = jnp.asarray([[24, 9]], jnp.int32)
  pooled = kc.reshape(b, s // block_k, block_k, hkv, d).max(axis=2)
  got = stream_bound.stream(kc, kc, ids, count, pooled, block_k=block_k, splits=2,
                            interpret=True)
  want = stream_bound.stream_reference(kc, kc, ids, count, block_k=block_k, splits=2)
  np.testing.assert_array_equal(np.asarray(got, np.float32), want)


def test_filled_slices():
  # 5 entries in 2 slices: 2 + 3; 1 entry: the second slice; none: neither
  assert stream_bound.filled_slices(np.array([[5, 1, 0]]), 2).tolist() == [
      [[True, True], [False, True], [False, False]]]


def test_block_lists_hold_the_same_blocks():
  ranked = np.array([[[7, 0, 3, 9, 9], [2, 5, 1, 9, 9]]])     # 3 kept a row, padding 9
  lists = stream_bound.block_lists(ranked, np.array([[3, 3]]), n_k=10)
  ids, count = (np.asarray(x) for x in lists['sorted'])
  assert ids[0, 0, :3].tolist() == [0, 3, 7] and ids[0, 1, :3].tolist() == [1, 2, 5]
  assert count.tolist() == [[3, 3]]
  assert np.asarray(lists['contiguous'][0])[0, 1, :3].tolist() == [0, 1, 2]
  ids, count = (np.asarray(x) for x in lists['all'])
  assert ids.shape == (1, 2, 10) and count.tolist() == [[10, 10]]
  assert np.asarray(lists['ranked'][0]).max() <= 9


def test_bad_shapes_are_named():
  kc = jnp.zeros((1, 500, 2, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match='multiple of block_k=64'):
    stream_bound.stream(kc, kc, jnp.zeros((1, 2, 4), jnp.int32), jnp.ones((1, 2), jnp.int32),
                        block_k=64, interpret=True)
  with pytest.raises(ValueError, match='with at most 2 x block_k=64 blocks'):
    stream_bound.stream(kc[:, :256], kc[:, :256], jnp.zeros((1, 2, 4), jnp.int32),
                        jnp.ones((1, 2), jnp.int32), jnp.zeros((1, 3, 2, 64), jnp.bfloat16),
                        block_k=64, interpret=True)
  with pytest.raises(ValueError, match='stages=8 of K and V blocks'):
    stream_bound.stream(kc[:, :256], kc[:, :256], jnp.zeros((1, 2, 2), jnp.int32),
                        jnp.ones((1, 2), jnp.int32), block_k=128, stages=8, interpret=True)


def test_smoke_run_checks_every_path():
  """bench on the CPU: the checks run (nothing is timed there)."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(heads=8, kv_heads=2, head_dim=64, repeats=1, traced=1,
                           streams=['1x8', '2x4p'], decodes=['1x8'], decode_block_k=64,
                           select_method=['ranked']):
    row = stream_bound.bench(2, 512, 0.5)
  assert set(row['errors']) == {f'stream_{s}_{n}' for s in ('1x8', '2x4p') for n in
                                ('ranked', 'sorted', 'contiguous', 'all')} | {'decode_1x8_sorted'}
  assert row['budget'] == 4 and row['paths']['decode_1x8_ranked']['bytes'] == 2 * 2 * 4 * 16384
  assert row['paths']['stream_1x8_all']['bytes'] == 2 * 2 * 8 * 2 * 64 * 64 * 2
  table = stream_bound.markdown([row], dict(device='cpu', jax='x', date='today'))
  assert '| 2 x 512 | 0.5 | stream_2x4p_sorted |' in table
