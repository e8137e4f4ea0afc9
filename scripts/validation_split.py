"""distillery's validation split, read from a token cache, for the scripts that check exported
files against `distillery eval`."""

import json
import math
from pathlib import Path

import numpy as np


def validation_windows(tokens_path, validation_fraction, seq_len):
    """The validation tail of a token cache (`.tokens` with its `.tokens.json` header) and how
    many non-overlapping windows of `seq_len` predicted tokens it holds."""
    header = json.loads(Path(str(tokens_path) + ".json").read_text())
    dtype = {2: "<u2", 4: "<u4"}[header["id_bytes"]]
    tokens = np.fromfile(tokens_path, dtype=dtype).astype(np.int64)
    assert len(tokens) == header["num_tokens"], "the token cache does not match its header"
    # Rust's f64::round rounds halves away from zero.
    validation_len = int(math.floor(len(tokens) * validation_fraction + 0.5))
    validation = tokens[len(tokens) - validation_len:]
    return validation, (len(validation) - 1) // seq_len
