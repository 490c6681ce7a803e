"""Calibration text and the token windows the methods observe.

Sources: "default" (the Python documentation every interpreter ships, ``pydoc_data.topics``,
so calibration works offline), a local .txt / .jsonl / .parquet file, or a dataset name that
``datasets`` can load (needs a network). Windows are drawn deterministically from a seed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch


class CalibrationError(ValueError):
    """Calibration data that cannot be read or is too short; the message names the source."""


def load_calibration_texts(source: str = "default") -> list[str]:
    """The documents of a calibration source (see the module docstring)."""
    if source == "default":
        from pydoc_data.topics import topics
        return [topics[k] for k in sorted(topics)]
    path = Path(source).expanduser()
    if path.exists():
        return _read_file(path)
    if "/" in source or "." in source:
        try:
            import datasets
            ds = datasets.load_dataset(source, split="train", streaming=True)
            return [row["text"] for row, _ in zip(ds, range(2000)) if row.get("text")]
        except Exception as e:  # noqa: BLE001 - any hub/network failure means "cannot use it"
            raise CalibrationError(f"calibration source {source!r}: not a local file, and the "
                                   f"datasets hub could not provide it ({e})") from e
    raise CalibrationError(f"calibration source {source!r}: no such file (use 'default', a "
                           ".txt/.jsonl/.parquet path, or a hub dataset name)")


def _read_file(path: Path) -> list[str]:
    if path.suffix == ".txt":
        return [t for t in path.read_text(encoding="utf-8").split("\n\n") if t.strip()]
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CalibrationError(f"{path}:{n}: invalid JSON ({e})") from e
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise CalibrationError(f"{path}:{n}: each line needs a string 'text' field")
            texts.append(row["text"])
        return texts
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise CalibrationError(f"{path}: no 'text' column (has {table.column_names})")
        return [t for t in table.column("text").to_pylist() if t]
    raise CalibrationError(f"{path}: calibration files must be .txt, .jsonl or .parquet")


def sample_windows(token_ids: list[int], num_samples: int, seqlen: int, seed: int = 0
                   ) -> torch.Tensor:
    """``num_samples`` random windows of ``seqlen`` tokens from one token stream: int64
    [num_samples, seqlen]. The same seed always gives the same windows."""
    if len(token_ids) <= seqlen:
        raise CalibrationError(f"calibration text has {len(token_ids)} tokens; need more than "
                               f"--calib-seqlen {seqlen}")
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(token_ids) - seqlen) for _ in range(num_samples)]
    ids = torch.tensor(token_ids, dtype=torch.int64)
    return torch.stack([ids[s:s + seqlen] for s in starts])


def calibration_windows(tokenizer, source: str, num_samples: int, seqlen: int,
                        seed: int = 0) -> torch.Tensor:
    """Tokenize a source's documents into one stream (joined by blank lines) and sample."""
    text = "\n\n".join(load_calibration_texts(source))
    return sample_windows(tokenizer.encode(text, add_special_tokens=False), num_samples,
                          seqlen, seed)
