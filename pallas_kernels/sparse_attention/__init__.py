"""Block-sparse attention: block tables, plain-jnp references, Pallas Triton
forward/backward and decode kernels."""

from pallas_kernels.sparse_attention.block_tables import (
    BlockSizes, BlockTables, block_mask_from_tables, build_block_tables)
from pallas_kernels.sparse_attention.decode import (
    sparse_decode, sparse_decode_reference, sparse_decode_scored,
    sparse_decode_scored_reference)
from pallas_kernels.sparse_attention.reference import reference_sparse_attention
from pallas_kernels.sparse_attention.triton import sparse_attention

__all__ = ["BlockSizes", "BlockTables", "block_mask_from_tables",
           "build_block_tables", "reference_sparse_attention", "sparse_attention",
           "sparse_decode", "sparse_decode_reference", "sparse_decode_scored",
           "sparse_decode_scored_reference"]
