"""The Megatron indexed-dataset format (``.idx`` header and dtype codes), as megatron-core 0.16.1's
``indexed_dataset`` writes it: one definition for the writer (data_tools/indexed.py) and the training-side
validator (loopmoe/data/indexed.py). numpy only, no torch, so data_tools can import it.

    .idx = b"MMIDIDX\\x00\\x00" | version <Q (1) | dtype code <B | S <Q (sequences) | D <Q (documents + 1)
           | sequence lengths int32[S] | sequence byte offsets int64[S] | document indices int64[D]
"""
from __future__ import annotations

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"  # magic
INDEX_VERSION = 1
HEADER_BYTES = len(INDEX_HEADER) + 8 + 1 + 8 + 8  # 34: magic, version, dtype code, S, D
# megatron-core's DType enum: numpy dtype -> code
DTYPE_CODES: dict[type[np.number], int] = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5,
                                           np.float64: 6, np.float32: 7, np.uint16: 8}
CODE_DTYPES: dict[int, type[np.number]] = {v: k for k, v in DTYPE_CODES.items()}


def optimal_dtype(vocab_size: int) -> type[np.integer]:
    """megatron-core's DType.optimal_dtype: uint16 below 65,500 ids, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32
