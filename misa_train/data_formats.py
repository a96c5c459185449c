"""Where training records come from, and chat records in one shape.

Containers (:func:`read_records`), each giving ``(where, record)`` pairs, ``where`` naming file and row for
error messages:

* ``.jsonl`` - one JSON object per line;
* ``.json`` - a JSON array of objects (a ``.json`` file holding JSON lines is read as JSONL);
* ``.parquet`` - one record per row (pyarrow);
* a folder written by ``datasets.save_to_disk`` - a ``Dataset``, or the ``train`` split of a ``DatasetDict``;
* a Hugging Face Hub dataset id, downloaded (``split="train"``) only when the caller allows it (``data_hub``).

Chats (:func:`chat_turns`) become a list of ``(role, content)`` pairs with roles ``system``, ``user``,
``assistant`` (others kept as given): OpenAI-style ``messages`` (``{"role", "content"}``) and ShareGPT
``conversations`` (``{"from", "value"}``, with ``human``/``gpt`` mapped to ``user``/``assistant``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant",
                  "system": "system", "tool": "tool", "function": "tool", "observation": "tool"}
DATASET_SUFFIXES = (".jsonl", ".json", ".parquet")
_DISK_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")


def is_dataset_source(source: str | Path) -> bool:
    """True for a record container (JSONL, JSON, parquet, a ``save_to_disk`` folder); False for plain text."""
    p = Path(source)
    return p.suffix in DATASET_SUFFIXES or p.is_dir() or not p.exists()


def read_records(source: str | Path, allow_hub: bool = False) -> list[tuple[str, dict]]:
    """Every record of ``source`` as ``(where, dict)``, where = ``"<file>:<line>"`` or ``"<file>: row <n>"``.

    Raises ValueError (one line, naming the file) for an unreadable file, a record that is not an object, a
    folder that is no saved dataset, or a name that is not local when ``allow_hub`` is False."""
    p = Path(source).expanduser()
    if p.is_dir():
        return _read_saved_dataset(p)
    if p.suffix == ".parquet":
        return _read_parquet(p)
    if p.suffix == ".json":
        return _read_json(p)
    if p.is_file():
        return _read_jsonl(p)
    if allow_hub:
        return _read_hub(str(source))
    raise ValueError(f"{source}: no such file or folder (a Hugging Face Hub dataset needs data_hub=true)")


def _checked(where: str, rec: Any) -> tuple[str, dict]:
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    return where, rec


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """Read a JSONL file into ``(line_number, record)`` pairs (1-based lines; blank lines skipped).

    Raises ``ValueError("<path>:<line>: ...")`` on malformed JSON or a line that is not a JSON object.
    """
    out = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            out.append((lineno, _checked(f"{path}:{lineno}", rec)[1]))
    return out


def _read_jsonl(path: Path) -> list[tuple[str, dict]]:
    return [(f"{path}:{lineno}", rec) for lineno, rec in read_jsonl(path)]


def _read_json(path: Path) -> list[tuple[str, dict]]:
    """A JSON array of objects; JSON lines saved under a ``.json`` name are read as JSONL."""
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several top-level values: JSON lines
            return _read_jsonl(path)
        raise ValueError(f"{path}: malformed JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if isinstance(data, dict):
        return [_checked(f"{path}", data)]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
    return [_checked(f"{path}: item {i + 1}", rec) for i, rec in enumerate(data)]


def _read_parquet(path: Path) -> list[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a file that is not parquet
        raise ValueError(f"{path}: not a readable parquet file ({type(e).__name__})") from None
    return [(f"{path}: row {i + 1}", rec) for i, rec in enumerate(rows)]


def _rows(dataset: Any, where: str) -> list[tuple[str, dict]]:
    """Rows of a ``datasets.Dataset`` or of the ``train`` split of a ``DatasetDict``."""
    import datasets

    if isinstance(dataset, (datasets.DatasetDict, dict)):
        splits = list(dataset.keys())
        if "train" not in splits:
            raise ValueError(f"{where}: dataset has no 'train' split (splits: {', '.join(splits)})")
        dataset = dataset["train"]
    return [(f"{where}: row {i + 1}", rec) for i, rec in enumerate(dataset.to_list())]


def _read_saved_dataset(path: Path) -> list[tuple[str, dict]]:
    if not any((path / m).is_file() for m in _DISK_MARKERS):
        raise ValueError(f"{path}: a folder must be a dataset written by datasets' save_to_disk")
    import datasets

    return _rows(datasets.load_from_disk(str(path)), str(path))


def _read_hub(name: str) -> list[tuple[str, dict]]:
    import datasets

    try:
        return _rows(datasets.load_dataset(name, split="train"), name)
    except (OSError, ValueError, ConnectionError) as e:  # unknown id, no network, no train split
        line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{name}: cannot load this Hub dataset ({line})") from None


# ---------------------------------------------------------------------- chats
def _turn(item: Any, role_key: str, content_key: str, where: str, field: str) -> tuple[str, str]:
    if not isinstance(item, dict) or not isinstance(item.get(content_key), str) \
            or not isinstance(item.get(role_key), str):
        raise ValueError(f"{where}: field '{field}' must be a list of {{'{role_key}', '{content_key}'}} "
                         f"string objects")
    role = item[role_key]
    if role_key == "from":
        role = SHAREGPT_ROLES.get(role.lower(), role)
    return role, item[content_key]


def chat_turns(value: Any, where: str, field: str) -> list[tuple[str, str]]:
    """``(role, content)`` turns of a ``messages`` list (``role``/``content``) or a ShareGPT
    ``conversations`` list (``from``/``value``); ValueError naming ``where`` and ``field`` otherwise."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: field '{field}' must be a non-empty list of turns")
    keys = ("from", "value") if isinstance(value[0], dict) and "from" in value[0] else ("role", "content")
    return [_turn(item, *keys, where, field) for item in value]
