"""Training data: reading files, formatting prompts, tokenising with label masks, and resumable batches.

Pipeline for supervised fine-tuning (task ``sft``)::

    examples = load_examples("train.jsonl")                  # or default_examples(n, seed)
    train, val = split_examples(examples, val_fraction=0.1, seed=0)
    enc = encode_sft(tokenizer, train, max_seq_len=256)      # [{"input_ids": [...], "labels": [...]}, ...]
    batches = Batches(enc, batch_size=4, seed=0, pad_token_id=tokenizer.pad_token_id)
    batch = next(batches)                                    # input_ids / attention_mask / labels, [B, L]

``labels`` are aligned with ``input_ids`` (the model shifts them: token ``t`` is predicted from ``< t``) and are
``-100`` on prompt and padding positions, so the loss is the mean NLL of the response tokens only.

Pre-training (task ``pretrain``): ``encode_pretrain`` tokenises the whole text and cuts it into blocks of
exactly ``max_seq_len`` tokens with every position labelled.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from misa_train.data_formats import chat_turns, is_dataset_source, read_jsonl, read_records  # noqa: F401 - read_jsonl re-exported

IGNORE_INDEX = -100
_SCHEMAS = ("question/answer, prompt/completion (or response; strings or chat turns), "
            "instruction/input/output (alpaca), messages, conversations (ShareGPT), text (task pretrain)")


@dataclass(frozen=True)
class Example:
    """One supervised item: the model sees ``prompt`` (after earlier ``context`` turns) and learns ``response``.

    context: earlier chat turns as ``(role, content)`` pairs (from chat records).
    train_context: the loss also covers the assistant turns inside ``context`` (multi-turn ``messages`` and
        ``conversations`` records: every assistant turn is trained).
    """

    prompt: str
    response: str
    context: tuple[tuple[str, str], ...] = field(default=())
    train_context: bool = False


# ----------------------------------------------------------------------------------------------- reading


def _text(rec: dict, key: str, where: str) -> str:
    v = rec[key]
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    if not isinstance(v, str):
        raise ValueError(f"{where}: field '{key}' must be a string, got {type(v).__name__}")
    return v


def _from_turns(turns: list[tuple[str, str]], where: str, field: str, train_context: bool) -> Example:
    """The last assistant turn is the response, the user turn before it the prompt, the rest context."""
    if len(turns) < 2 or turns[-1][0] != "assistant" or turns[-2][0] != "user":
        raise ValueError(f"{where}: '{field}' must end with a user turn followed by an assistant turn")
    context = tuple(turns[:-2])
    trained = train_context and any(role == "assistant" for role, _ in context)
    return Example(turns[-2][1], turns[-1][1], context, trained)


def _prompt_completion(rec: dict, resp_key: str, where: str) -> Example:
    """prompt/completion as strings, or as chat turns (then the completion is one assistant turn)."""
    if not isinstance(rec["prompt"], list) and not isinstance(rec[resp_key], list):
        return Example(_text(rec, "prompt", where), _text(rec, resp_key, where))
    def turns(key: str, role: str) -> list[tuple[str, str]]:
        return chat_turns(rec[key], where, key) if isinstance(rec[key], list) else [(role, _text(rec, key, where))]

    turns_p, turns_c = turns("prompt", "user"), turns(resp_key, "assistant")
    if len(turns_c) != 1 or turns_c[0][0] != "assistant":
        raise ValueError(f"{where}: field '{resp_key}' must be one assistant turn")
    return _from_turns(turns_p + turns_c, where, "prompt", train_context=False)


def record_to_example(rec: dict, where: str = "record") -> Example:
    """Map one record of a known schema to an ``Example``; ``ValueError`` naming the keys otherwise.

    Schemas: ``question``/``answer`` (GSM8K); ``prompt`` with ``completion`` or ``response``, each a string
    or chat turns (conversational prompt/completion: the loss is on the completion only);
    ``instruction``/``output`` with optional ``input`` (alpaca: prompt = instruction + blank line + input);
    chat ``messages`` (``{"role", "content"}``) or ShareGPT ``conversations`` (``{"from", "value"}``)
    ending with an assistant turn that follows a user turn, with the loss on every assistant turn.
    """
    keys = set(rec)
    if {"question", "answer"} <= keys:
        return Example(_text(rec, "question", where), _text(rec, "answer", where))
    if "prompt" in keys and ({"response", "completion"} & keys):
        return _prompt_completion(rec, "completion" if "completion" in keys else "response", where)
    if {"instruction", "output"} <= keys:
        prompt = _text(rec, "instruction", where)
        extra = _text(rec, "input", where) if rec.get("input") else ""
        if extra.strip():
            prompt = f"{prompt}\n\n{extra}"
        return Example(prompt, _text(rec, "output", where))
    for key in ("messages", "conversations"):
        if key in keys:
            return _from_turns(chat_turns(rec[key], where, key), where, key, train_context=True)
    if "text" in keys:
        raise ValueError(f"{where}: field 'text' is pre-training text; use task pretrain, or records with "
                         f"one of {_SCHEMAS}")
    raise ValueError(f"{where}: unknown record schema, keys found: {sorted(keys)}; expected one of {_SCHEMAS}")


def load_examples(path: str | Path, allow_hub: bool = False) -> list[Example]:
    """Supervised records of any container of ``data_formats.read_records`` (any schema of
    ``record_to_example``) as ``Example`` s."""
    return [record_to_example(rec, where) for where, rec in read_records(path, allow_hub)]


def load_text(path: str | Path, allow_hub: bool = False) -> str:
    """Plain text for pre-training: a text file as is, or the ``text`` fields of a record container
    (JSONL, JSON array, parquet, saved dataset) joined by blank lines."""
    if is_text_file(path):
        return Path(path).read_text(encoding="utf-8")
    parts = []
    for where, rec in read_records(path, allow_hub):
        if "text" not in rec:
            raise ValueError(f"{where}: pretraining needs a 'text' field, keys found: {sorted(rec)}")
        parts.append(_text(rec, "text", where))
    return "\n\n".join(parts)


def is_text_file(path: str | Path) -> bool:
    """True for plain-text pre-training files (an existing file that is no record container)."""
    return not is_dataset_source(path)


# ----------------------------------------------------------------------------------------------- default set


def _stepwise(expression: str) -> tuple[list[str], int] | None:
    """Evaluate ``a op b op c`` (integers, + - *) with precedence, returning the worked steps and the value."""
    toks = expression.split()
    if len(toks) % 2 == 0 or not all(re.fullmatch(r"-?\d+", t) for t in toks[::2]):
        return None
    nums = [int(t) for t in toks[::2]]
    ops = toks[1::2]
    if any(op not in "+-*" for op in ops):
        return None
    steps: list[str] = []
    # Multiplications first (left to right), then additions/subtractions, as a pupil would write them.
    i = 0
    while i < len(ops):
        if ops[i] == "*":
            val = nums[i] * nums[i + 1]
            steps.append(f"{nums[i]} * {nums[i + 1]} = {val}")
            nums[i : i + 2] = [val]
            del ops[i]
        else:
            i += 1
    acc = nums[0]
    for op, n in zip(ops, nums[1:], strict=True):
        new = acc + n if op == "+" else acc - n
        steps.append(f"{acc} {op} {n} = {new}")
        acc = new
    return steps, acc


def default_examples(n: int, seed: int = 0, reasoning: bool = True) -> list[Example]:
    """``n`` short arithmetic problems generated offline with reasoning-gym (``basic_arithmetic``).

    Two or three terms of at most two digits with ``+ - *`` (no division, so answers are integers). With
    ``reasoning`` the response shows each step and ends ``#### <answer>`` (e.g. ``'4 * 5 = 20. 3 + 20 = 23.
    #### 23'``), else it is the bare number. Short enough that SmolLM2-135M learns it on CPU in minutes.
    Deterministic in ``(n, seed)``.
    """
    import reasoning_gym

    if n <= 0:
        return []
    out: list[Example] = []
    size = 2 * n + 16
    while len(out) < n:
        ds = reasoning_gym.create_dataset(
            "basic_arithmetic",
            size=size,
            seed=seed,
            min_terms=2,
            max_terms=3,
            min_digits=1,
            max_digits=2,
            operators=("+", "-", "*"),
            allow_parentheses=False,
            allow_negation=False,
            format_style="natural",
        )
        out = []
        for item in ds:
            answer = str(item["answer"]).strip()
            worked = _stepwise(item.get("metadata", {}).get("expression", ""))
            # reasoning-gym sometimes scores mixed "+ *" expressions left to right (3 + 2 * 3 -> 15);
            # such items would teach wrong arithmetic, so only items whose answer obeys precedence are kept.
            if worked is None or str(worked[1]) != answer:
                continue
            response = ". ".join(worked[0]) + f". #### {answer}" if reasoning else answer
            out.append(Example(item["question"], response))
            if len(out) == n:
                break
        size *= 2
    return out


def split_examples(
    items: list, val_fraction: float, seed: int = 0, n_train: int | None = None, n_val: int | None = None
) -> tuple[list, list]:
    """Split by a seeded permutation: the first ``round(val_fraction * N)`` permuted items are validation.

    At least one validation item when ``val_fraction > 0`` and ``N >= 2``. ``n_train``/``n_val`` (None or
    <= 0 = no cap) then truncate each side. Order within each side follows the permutation.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(items)
    perm = np.random.default_rng(seed).permutation(n)
    k = int(round(val_fraction * n))
    if val_fraction > 0 and n >= 2:
        k = min(max(k, 1), n - 1)
    val = [items[i] for i in perm[:k]]
    train = [items[i] for i in perm[k:]]
    if n_train is not None and n_train > 0:
        train = train[:n_train]
    if n_val is not None and n_val > 0:
        val = val[:n_val]
    return train, val


# ----------------------------------------------------------------------------------------------- formatting


def has_chat_template(tokenizer) -> bool:
    """Whether the tokenizer carries a chat template (then prompts are rendered through it)."""
    return bool(getattr(tokenizer, "chat_template", None))


def _messages(ex: Example) -> list[dict]:
    return [{"role": r, "content": c} for r, c in ex.context] + [{"role": "user", "content": ex.prompt}]


def format_prompt(tokenizer, ex: Example) -> str:
    """The text the model is conditioned on, identical in training and in generation.

    With a chat template: the context and the prompt as a user turn plus the generation prompt (assistant
    header). Without: ``"Question: <prompt>\\nAnswer:"`` (earlier turns as ``"<Role>: <content>\\n"``).
    """
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(_messages(ex), tokenize=False, add_generation_prompt=True)
    ctx = "".join(f"{r.capitalize()}: {c}\n" for r, c in ex.context)
    return f"{ctx}Question: {ex.prompt}\nAnswer:"


def format_response(tokenizer, ex: Example, prompt_text: str | None = None) -> str:
    """The text the loss is computed on: the response followed by the end-of-turn marker.

    With a chat template this is exactly what the template appends after the generation prompt (e.g.
    ``"<answer><|im_end|>\\n"``); otherwise ``" <answer>" + eos``.
    """
    if has_chat_template(tokenizer):
        prompt_text = prompt_text if prompt_text is not None else format_prompt(tokenizer, ex)
        full = tokenizer.apply_chat_template(
            _messages(ex) + [{"role": "assistant", "content": ex.response}], tokenize=False
        )
        if full.startswith(prompt_text):
            return full[len(prompt_text) :]
        # Templates that rewrite earlier turns (e.g. strip reasoning) break the prefix property.
        return ex.response + (tokenizer.eos_token or "")
    return " " + ex.response + (tokenizer.eos_token or "")


def encode_prompt(tokenizer, ex: Example) -> list[int]:
    """Token ids of ``format_prompt`` (the same ids ``encode_sft`` puts before the response)."""
    # A chat template writes its own special tokens; plain prompts get the tokenizer's (e.g. BOS).
    add_special = not has_chat_template(tokenizer)
    return tokenizer(format_prompt(tokenizer, ex), add_special_tokens=add_special)["input_ids"]


def _context_pieces(tokenizer, ex: Example, prompt_text: str) -> list[tuple[str, bool]]:
    """``format_prompt(ex)`` cut into (text, trained) pieces, the context's assistant turns trained.

    With a chat template each assistant turn is what the template adds after the generation prompt of the
    turns before it; a template that rewrites earlier turns breaks that prefix property, and then the whole
    prompt is one untrained piece (loss on the final response only)."""
    if not has_chat_template(tokenizer):
        return _plain_context_pieces(ex)
    msgs, pieces, done = _messages(ex), [], ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        head = tokenizer.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)
        turn = tokenizer.apply_chat_template(msgs[: i + 1], tokenize=False)
        if not (head.startswith(done) and turn.startswith(head) and prompt_text.startswith(turn)):
            return [(prompt_text, False)]
        pieces += [(head[len(done):], False), (turn[len(head):], True)]
        done = turn
    return pieces + [(prompt_text[len(done):], False)]


def _plain_context_pieces(ex: Example) -> list[tuple[str, bool]]:
    """The "Role: content" lines of ``format_prompt`` without a template, assistant contents trained."""
    pieces: list[tuple[str, bool]] = []
    for role, content in ex.context:
        if role == "assistant":
            pieces += [("Assistant:", False), (f" {content}", True), ("\n", False)]
        else:
            pieces.append((f"{role.capitalize()}: {content}\n", False))
    return pieces + [(f"Question: {ex.prompt}\nAnswer:", False)]


def conversation_pieces(tokenizer, ex: Example) -> list[tuple[str, bool]]:
    """(text, trained) pieces whose concatenation is ``format_prompt(ex) + format_response(ex)``.

    One untrained prompt piece and the trained response, or, with ``ex.train_context``, every assistant
    turn of the context trained as well."""
    prompt_text = format_prompt(tokenizer, ex)
    head = _context_pieces(tokenizer, ex, prompt_text) if ex.train_context else [(prompt_text, False)]
    return head + [(format_response(tokenizer, ex, prompt_text), True)]


def encode_example(tokenizer, ex: Example) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one example: each piece of :func:`conversation_pieces` tokenised on its own
    (so a single-turn prompt's ids are exactly ``encode_prompt``'s), labels -100 on untrained pieces."""
    ids: list[int] = []
    labels: list[int] = []
    for i, (text, trained) in enumerate(conversation_pieces(tokenizer, ex)):
        # a chat template writes its own special tokens; plain prompts get the tokenizer's (e.g. BOS)
        add_special = i == 0 and not has_chat_template(tokenizer)
        piece = tokenizer(text, add_special_tokens=add_special)["input_ids"]
        ids += piece
        labels += list(piece) if trained else [IGNORE_INDEX] * len(piece)
    return ids, labels


def encode_sft(
    tokenizer, examples: list[Example], max_seq_len: int, stats: dict | None = None
) -> list[dict[str, list[int]]]:
    """Tokenise ``prompt + response`` with labels ``-100`` on the prompt (:func:`encode_example`).

    For a single-turn example: ``input_ids = p + r`` (``p`` = prompt ids, ``r`` = response ids, tokenised
    separately so the prompt ids match generation exactly) and ``labels = [-100] * len(p) + r``; multi-turn
    chats also label their earlier assistant turns.
    Sequences over ``max_seq_len`` are cut from the right; an example with no response token left is dropped.
    One warning reports the counts; ``stats`` (if given) receives ``truncated``, ``dropped``, ``kept``.
    """
    out: list[dict[str, list[int]]] = []
    truncated = dropped = 0
    for ex in examples:
        ids, labels = encode_example(tokenizer, ex)
        if len(ids) > max_seq_len:
            truncated += 1
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            # Position 0 is never predicted (labels shift by one), so it cannot carry the loss alone.
            if all(x == IGNORE_INDEX for x in labels[1:]):
                dropped += 1
                continue
        out.append({"input_ids": ids, "labels": labels})
    if truncated:
        warnings.warn(
            f"{truncated} of {len(examples)} examples longer than max_seq_len={max_seq_len} were truncated"
            + (f"; {dropped} dropped (no answer tokens left)" if dropped else ""),
            stacklevel=2,
        )
    if stats is not None:
        stats.update(truncated=truncated, dropped=dropped, kept=len(out))
    return out


def encode_pretrain(tokenizer, text: str, max_seq_len: int, chunk_chars: int = 1 << 16) -> list[dict]:
    """Tokenise ``text`` and cut it into ``floor(N / max_seq_len)`` blocks of exactly ``max_seq_len`` tokens.

    Every position is labelled (``labels == input_ids``); the tail shorter than a block is dropped. The text
    is tokenised in paragraph-aligned chunks of about ``chunk_chars`` characters, which keeps the tokenizer
    fast and quiet about long inputs (tokens never straddle a blank line anyway).
    """
    pieces: list[str] = []
    start = 0
    while start < len(text):
        end = min(len(text), start + chunk_chars)
        if end < len(text):
            cut = text.rfind("\n\n", start, end)
            end = cut + 2 if cut > start else end
        pieces.append(text[start:end])
        start = end
    ids: list[int] = []
    if pieces:
        for chunk in tokenizer(pieces, add_special_tokens=False, verbose=False)["input_ids"]:
            ids.extend(chunk)
    n_blocks = len(ids) // max_seq_len
    return [
        {"input_ids": ids[i * max_seq_len : (i + 1) * max_seq_len],
         "labels": ids[i * max_seq_len : (i + 1) * max_seq_len]}
        for i in range(n_blocks)
    ]


def pack_examples(encoded: list[dict], max_seq_len: int) -> list[dict]:
    """Greedy packing: concatenate consecutive encoded examples into rows of at most ``max_seq_len`` tokens.

    Label masks are kept per example. Attention is *not* blocked between packed examples (a plain causal mask
    is used), which is the usual cheap approximation; a row holds whole examples only.
    """
    rows: list[dict] = []
    cur_ids: list[int] = []
    cur_labels: list[int] = []
    for e in encoded:
        if cur_ids and len(cur_ids) + len(e["input_ids"]) > max_seq_len:
            rows.append({"input_ids": cur_ids, "labels": cur_labels})
            cur_ids, cur_labels = [], []
        cur_ids = cur_ids + list(e["input_ids"])
        # The first token of a packed example is predicted from the previous example: never a target.
        cur_labels = cur_labels + [IGNORE_INDEX] + list(e["labels"][1:]) if cur_labels else list(e["labels"])
    if cur_ids:
        rows.append({"input_ids": cur_ids, "labels": cur_labels})
    return rows


def max_positions(config) -> int | None:
    """The longest sequence a model config supports (``max_position_embeddings`` / ``n_positions``)."""
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(config, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def check_seq_len(max_seq_len: int, config) -> None:
    """``ValueError`` when ``max_seq_len`` exceeds the model's position limit (no check if it has none)."""
    limit = max_positions(getattr(config, "config", config))
    if limit is not None and max_seq_len > limit:
        raise ValueError(f"max_seq_len={max_seq_len} is longer than the model supports ({limit} positions)")


# ----------------------------------------------------------------------------------------------- batching


def collate(
    items: list[dict], pad_token_id: int, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Pad a list of encoded examples to ``[B, L]`` tensors, ``L`` = longest item.

    ``attention_mask`` is 1 on real tokens; ``labels`` are ``-100`` on padding (and wherever the item had
    -100). ``padding_side`` "right" for training, "left" for generation.
    """
    L = max(len(e["input_ids"]) for e in items)
    B = len(items)
    ids = torch.full((B, L), pad_token_id, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(items):
        n = len(e["input_ids"])
        sl = slice(0, n) if padding_side == "right" else slice(L - n, L)
        ids[i, sl] = torch.tensor(e["input_ids"], dtype=torch.long)
        mask[i, sl] = 1
        labels[i, sl] = torch.tensor(e.get("labels", e["input_ids"]), dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class Batches:
    """Deterministic, resumable stream of padded batches over encoded examples.

    Epoch ``e`` visits every example once, in an order that depends only on ``(seed, e)``: a permutation from
    ``numpy.random.default_rng([seed, e])`` (identity when ``shuffle=False``); with ``bucket`` the permuted
    list is cut into mega-batches of ``batch_size * mega_batches`` items, each sorted by length (longest
    first) before being cut into batches, and the batches are then shuffled, so padding is small and the
    order still random. ``len(self)`` = ``ceil(N / batch_size)`` batches per epoch.

    ``next(b)`` is an endless stream across epochs; ``state_dict() = {"epoch", "position"}`` (position =
    batches already taken in that epoch) restores it exactly. ``iter(b)`` is that same stream when
    ``repeat`` is True, and a fresh single pass over epoch 0 when ``repeat`` is False (for evaluation).
    """

    def __init__(
        self,
        examples: list[dict],
        batch_size: int,
        seed: int = 0,
        pad_token_id: int = 0,
        shuffle: bool = True,
        bucket: bool = True,
        mega_batches: int = 50,
        repeat: bool = True,
        padding_side: str = "right",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not examples:
            raise ValueError("Batches needs at least one example")
        self.examples = examples
        self.batch_size = batch_size
        self.seed = seed
        self.pad_token_id = pad_token_id
        self.shuffle = shuffle
        self.bucket = bucket
        self.mega_batches = mega_batches
        self.repeat = repeat
        self.padding_side = padding_side
        self.epoch = 0
        self.position = 0
        self._order_cache: tuple[int, list[list[int]]] | None = None

    def __len__(self) -> int:
        return -(-len(self.examples) // self.batch_size)

    def epoch_order(self, epoch: int) -> list[list[int]]:
        """The example indices of every batch of ``epoch``, in visiting order."""
        if self._order_cache is not None and self._order_cache[0] == epoch:
            return self._order_cache[1]
        n = len(self.examples)
        rng = np.random.default_rng([self.seed, epoch])
        idx = rng.permutation(n).tolist() if self.shuffle else list(range(n))
        bs = self.batch_size
        if self.bucket:
            mega = bs * max(1, self.mega_batches)
            batches: list[list[int]] = []
            for s in range(0, n, mega):
                chunk = sorted(idx[s : s + mega], key=lambda i: -len(self.examples[i]["input_ids"]))
                batches += [chunk[j : j + bs] for j in range(0, len(chunk), bs)]
            if self.shuffle:
                batches = [batches[i] for i in rng.permutation(len(batches))]
        else:
            batches = [idx[j : j + bs] for j in range(0, n, bs)]
        self._order_cache = (epoch, batches)
        return batches

    def _collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return collate([self.examples[i] for i in indices], self.pad_token_id, self.padding_side)

    def __next__(self) -> dict[str, torch.Tensor]:
        order = self.epoch_order(self.epoch)
        if self.position >= len(order):
            self.epoch += 1
            self.position = 0
            order = self.epoch_order(self.epoch)
        batch = self._collate(order[self.position])
        self.position += 1
        return batch

    def __iter__(self):
        if self.repeat:
            return self
        return (self._collate(b) for b in self.epoch_order(0))

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "position", "seed"}``: JSON-serialisable."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``(epoch, position)``; the next batch equals the one the saved stream would give."""
        if "seed" in state and int(state["seed"]) != self.seed:
            raise ValueError(f"data seed mismatch: saved {state['seed']}, this stream uses {self.seed}")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])


# ----------------------------------------------------------------------------------------------- one call


@dataclass
class DataBundle:
    """Everything the trainer needs: encoded train/val sets and the raw validation items for generation."""

    train: list[dict]
    val: list[dict]
    val_examples: list[Example]
    task: str
    stats: dict = field(default_factory=dict)


def prepare_data(
    data: str | None,
    tokenizer,
    task: str = "sft",
    max_seq_len: int = 256,
    val_fraction: float = 0.1,
    seed: int = 0,
    n_train: int = 320,
    n_val: int = 64,
    model_config=None,
    pack: bool = False,
    allow_hub: bool = False,
) -> DataBundle:
    """Load, split and encode a data source.

    data None: ``n_train + n_val`` generated arithmetic items (``default_examples``; seed ``seed``), split
    exactly into those sizes. A record container (JSONL, JSON array, parquet, saved dataset, or a Hub
    dataset with ``allow_hub``; ``misa_train.data_formats``): split by ``val_fraction`` (``n_train``/``n_val``
    do not cap it). ``task="pretrain"``: text (a text file or the ``text`` field of records) cut into
    blocks, blocks split by ``val_fraction``; ``val_examples`` is then empty. ``model_config`` enables the
    position-limit check.
    """
    if model_config is not None:
        check_seq_len(max_seq_len, model_config)
    stats: dict = {}
    if task == "pretrain":
        if data is None:
            raise ValueError("task 'pretrain' needs a data file (plain text, or records with 'text')")
        blocks = encode_pretrain(tokenizer, load_text(data, allow_hub), max_seq_len)
        if len(blocks) < 2:
            raise ValueError(f"{data}: too little text for two blocks of max_seq_len={max_seq_len} tokens")
        train, val = split_examples(blocks, val_fraction, seed)
        stats.update(blocks=len(blocks))
        return DataBundle(train, val, [], task, stats)
    if task != "sft":
        raise ValueError(f"task must be 'sft' or 'pretrain', got {task!r}")
    if data is None:
        examples = default_examples(n_train + n_val, seed)
        val_ex, train_ex = examples[:n_val], examples[n_val:]
    else:
        if is_text_file(data):
            raise ValueError(f"{data}: task 'sft' needs records (.jsonl, .json, .parquet or a saved dataset) "
                             f"with {_SCHEMAS}; use task 'pretrain' for plain text")
        train_ex, val_ex = split_examples(load_examples(data, allow_hub), val_fraction, seed)
    train = encode_sft(tokenizer, train_ex, max_seq_len, stats)
    val = encode_sft(tokenizer, val_ex, max_seq_len)
    if pack:
        train = pack_examples(train, max_seq_len)
    if not train:
        raise ValueError("no training examples left after encoding")
    return DataBundle(train, val, val_ex, task, stats)
