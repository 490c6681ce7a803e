r"""Evaluation data: perplexity text (WikiText-2 the GPTQ way, or a file) and task files.

Task files are read in the forms kept under ``../shared/data/eval`` (see its README) and turned
into lm-evaluation-harness requests: each item is one (context, continuation) pair per choice,
with lm-eval's prompts (continuations start with a space):

- ARC: ``Question: {question}\nAnswer:`` + `` {choice}``; acc, acc_norm.
- PIQA: ``Question: {goal}\nAnswer:`` + `` {sol}``; acc, acc_norm.
- HellaSwag: ``{activity_label}: {ctx}`` + `` {ending}``, both cleaned as lm-eval does; acc,
  acc_norm.
- BoolQ: ``{passage}\nQuestion: {question}?\nAnswer:`` + `` no`` / `` yes``; acc.
- WinoGrande: the sentence up to the blank with each option filled in + `` {rest}``; acc.
- LAMBADA: the text but its last word + `` {last word}``; acc is an exact greedy match.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

WIKITEXT2_GPTQ_SHA256 = "696cca6b65a171b0a358a4be6732cdfdf2dd6164a32e20fd70e3c13fc4dfae83"


def shared_data_dir() -> Path:
    """``<repo>/../shared/data``, where the project's data files live beside the checkout."""
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def wikitext2_gptq_text(raw: str) -> str:
    """The GPTQ/AWQ perplexity text: ``"\\n\\n".join(rows)`` of the Hugging Face rows, i.e. the
    lines of ``wiki.test.raw`` (newline kept) with each blank ``" \\n"`` line turned into ``""``."""
    parts = raw.split("\n")
    lines = [p + "\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
    return "\n\n".join("" if line == " \n" else line for line in lines)


def load_wikitext2(data_dir: Path | None = None) -> str:
    """WikiText-2's test split joined the GPTQ way, checked against its known sha256."""
    path = _require((data_dir or shared_data_dir()) / "wikitext-2-raw" / "wiki.test.raw",
                    "WikiText-2 test file")
    text = wikitext2_gptq_text(path.read_text(encoding="utf-8"))
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if digest != WIKITEXT2_GPTQ_SHA256:
        raise ValueError(f"{path}: the GPTQ-joined text has sha256 {digest}, expected "
                         f"{WIKITEXT2_GPTQ_SHA256}; the file is not the canonical wiki.test.raw")
    return text


def load_text(data: str) -> str:
    """Perplexity text: ``wikitext2``, a raw ``.txt`` file, or a ``.jsonl`` of ``{"text"}`` rows
    joined by blank lines."""
    if data == "wikitext2":
        return load_wikitext2()
    path = _require(Path(data).expanduser(), "data file")
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip()]
        if not all(isinstance(r, dict) and isinstance(r.get("text"), str) for r in rows):
            raise ValueError(f"{path}: every JSON line needs a string \"text\" field")
        return "\n\n".join(r["text"] for r in rows)
    return path.read_text(encoding="utf-8")


# -- tasks ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskItem:
    """One question: a (context, continuation) pair per choice and the gold choice."""

    pairs: list[tuple[str, str]]
    gold: int
    choice_lengths: list[int] | None = None  # characters, for acc_norm; None: no acc_norm


@dataclass(frozen=True)
class Task:
    name: str
    path: str
    greedy: bool  # acc is "every continuation token is the argmax" (LAMBADA), not argmax choice
    items: list[TaskItem]


def load_task(path: str | Path, limit: int | None = None) -> Task:
    """Read a task file, detecting its format from the name and the first row."""
    path = _require(Path(path).expanduser(), "task file")
    lower = path.name.lower()
    if lower.endswith((".txt", ".txt.bz2")):
        name, greedy, items = "hellaswag", False, _hellaswag(path, limit)
    elif lower.endswith(".jsonl"):
        rows = _read_jsonl(path, limit)
        name, greedy, items = _jsonl_task(path, rows)
    else:
        raise ValueError(f"{path}: unknown task file type (expected .jsonl, .txt or .txt.bz2)")
    if not items:
        raise ValueError(f"{path}: no items")
    return Task(name, str(path), greedy, items)


def _read_jsonl(path: Path, limit: int | None) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(rows) >= limit:
                break
            if line.strip():
                rows.append(json.loads(line))
    if not rows or not isinstance(rows[0], dict):
        raise ValueError(f"{path}: expected JSON objects, one per line")
    return rows


def _jsonl_task(path: Path, rows: list[dict]) -> tuple[str, bool, list[TaskItem]]:
    keys, lower = set(rows[0]), path.name.lower()
    try:
        if {"question", "choices", "answerKey"} <= keys:
            name = ("arc_challenge" if "challenge" in lower else
                    "arc_easy" if "easy" in lower else "arc")
            return name, False, [_arc_item(r) for r in rows]
        if {"goal", "sol1", "sol2"} <= keys:
            return "piqa", False, _piqa_items(path, rows)
        if {"query", "choices", "gold"} <= keys:
            return "boolq", False, [_boolq_item(r) for r in rows]
        if {"context_options", "continuation", "gold"} <= keys:
            return "winogrande", False, [_winogrande_item(r) for r in rows]
        if keys == {"text"}:
            return "lambada_openai", True, [_lambada_item(r) for r in rows]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: malformed row ({type(e).__name__}: {e})") from e
    raise ValueError(f"{path}: unknown task format (first row has keys {sorted(keys)}); known: "
                     "ARC, PIQA, HellaSwag (.txt/.txt.bz2), BoolQ, WinoGrande, LAMBADA")


def _mc_item(context: str, choices: list[str], gold: int, norm: bool = True) -> TaskItem:
    if not 0 <= gold < len(choices):
        raise ValueError(f"gold {gold} out of range for {len(choices)} choices")
    return TaskItem([(context, " " + c) for c in choices], gold,
                    [len(c) for c in choices] if norm else None)


def _arc_item(row: dict) -> TaskItem:
    labels = list(row["choices"]["label"])
    return _mc_item(f"Question: {row['question']}\nAnswer:", list(row["choices"]["text"]),
                    labels.index(row["answerKey"]))


def _piqa_items(path: Path, rows: list[dict]) -> list[TaskItem]:
    labels_path = _require(path.with_name(path.name[:-len(".jsonl")] + "-labels.lst"),
                           "PIQA labels file")
    labels = [int(x) for x in labels_path.read_text().split()]
    if len(labels) < len(rows):
        raise ValueError(f"{labels_path}: {len(labels)} labels for {len(rows)} items")
    return [_mc_item(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], label)
            for r, label in zip(rows, labels)]


def _boolq_item(row: dict) -> TaskItem:
    # MosaicML's query is "Passage: {passage}\nQuestion: {question}?"; lm-eval's prompt has no
    # "Passage: " prefix and ends "\nAnswer:".
    query = row["query"].removeprefix("Passage: ")
    return _mc_item(query + "\nAnswer:", list(row["choices"]), int(row["gold"]), norm=False)


def _winogrande_item(row: dict) -> TaskItem:
    gold = int(row["gold"])
    options = list(row["context_options"])
    if not 0 <= gold < len(options):
        raise ValueError(f"gold {gold} out of range for {len(options)} options")
    return TaskItem([(c, " " + row["continuation"]) for c in options], gold)


def _lambada_item(row: dict) -> TaskItem:
    context, _, word = row["text"].rpartition(" ")
    if not context or not word:
        raise ValueError(f"text has no last word to predict: {row['text'][:60]!r}")
    return TaskItem([(context, " " + word)], 0)


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag clean-up (WikiHow bracket artifacts, double spaces)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(path: Path, limit: int | None) -> list[TaskItem]:
    """llama.cpp's --hellaswag text: 6 lines per task (context, gold 0-3, four endings)."""
    opener = bz2.open if path.name.lower().endswith(".bz2") else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6 or not lines:
        raise ValueError(f"{path}: unknown task format: HellaSwag text needs 6 lines per task "
                         f"(context, label, 4 endings), got {len(lines)} lines")
    items = []
    for i in range(0, len(lines), 6):
        if limit is not None and len(items) >= limit:
            break
        label = lines[i + 1].strip()
        if label not in ("0", "1", "2", "3"):
            raise ValueError(f"{path}: line {i + 2}: expected a label 0-3, got {label[:40]!r}")
        endings = [hellaswag_preprocess(e) for e in lines[i + 2:i + 6]]
        items.append(_mc_item(hellaswag_preprocess(lines[i]), endings, int(label)))
    return items
