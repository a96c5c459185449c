"""Every data format the trainer reads, from small files made here: containers (JSONL, JSON array, parquet,
save_to_disk folders, Hub behind a flag) and schemas (prompt/completion, multi-turn messages with the loss on
every assistant turn, ShareGPT, alpaca, text). Bad input: one line naming the file and the field."""

from __future__ import annotations

import json

import pytest

from misa_train.config import ConfigError, TrainConfig
from misa_train.data import IGNORE_INDEX, Example, encode_sft, load_examples, load_text, prepare_data
from tests.helpers_tiny import make_tokenizer

datasets = pytest.importorskip("datasets")

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"}]
SHAREGPT = [{"from": "system", "value": "be brief"}, {"from": "human", "value": "q1"},
            {"from": "gpt", "value": "a1"}, {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]
MULTI = Example("q2", "a2", (("system", "be brief"), ("user", "q1"), ("assistant", "a1")), True)


def _trained_text(tok, ex):
    (enc,) = encode_sft(tok, [ex], max_seq_len=256)
    runs, cur = [], []
    for i, lab in zip(enc["input_ids"], enc["labels"], strict=True):
        if lab == IGNORE_INDEX:
            if cur:
                runs.append(tok.decode(cur))
            cur = []
        else:
            assert lab == i
            cur.append(i)
    return runs + ([tok.decode(cur)] if cur else [])


def test_json_array_and_json_lines_named_json(tmp_path):
    recs = [{"instruction": "Add.", "input": "3 and 4", "output": "7"}, {"instruction": "Hi.", "output": "hi"}]
    (tmp_path / "a.json").write_text(json.dumps(recs))
    (tmp_path / "l.json").write_text("\n".join(json.dumps(r) for r in recs))
    want = [Example("Add.\n\n3 and 4", "7"), Example("Hi.", "hi")]
    assert load_examples(tmp_path / "a.json") == want == load_examples(tmp_path / "l.json")
    (tmp_path / "b.json").write_text(json.dumps([recs[0], {"instruction": "x"}]))
    with pytest.raises(ValueError, match=r"b\.json: item 2: unknown record schema, keys found: \['instruction'\]"):
        load_examples(tmp_path / "b.json")


def test_parquet_prompt_completion_and_text(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "completion": "c"}, {"prompt": "p2", "completion": "c2"}]),
                   tmp_path / "pc.parquet")
    assert load_examples(tmp_path / "pc.parquet") == [Example("p", "c"), Example("p2", "c2")]
    pq.write_table(pa.Table.from_pylist([{"text": "one"}, {"text": "two"}]), tmp_path / "t.parquet")
    assert load_text(tmp_path / "t.parquet") == "one\n\ntwo"
    with pytest.raises(ValueError, match=r"t\.parquet: row 1: field 'text' is pre-training text; use task pretrain"):
        load_examples(tmp_path / "t.parquet")
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match=r"bad\.parquet: not a readable parquet file"):
        load_examples(tmp_path / "bad.parquet")


def test_saved_dataset_and_dataset_dict(tmp_path):
    ds = datasets.Dataset.from_list([{"messages": CHAT}])
    ds.save_to_disk(str(tmp_path / "one"))
    assert load_examples(tmp_path / "one") == [MULTI]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list([{"conversations": SHAREGPT}]),
                               "test": datasets.Dataset.from_list([{"conversations": SHAREGPT}])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_examples(tmp_path / "dd") == [MULTI]
    datasets.DatasetDict({"test": dd["test"]}).save_to_disk(str(tmp_path / "notrain"))
    with pytest.raises(ValueError, match=r"notrain: dataset has no 'train' split \(splits: test\)"):
        load_examples(tmp_path / "notrain")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match=r"plain: a folder must be a dataset written by datasets' save_to_disk"):
        load_examples(tmp_path / "plain")


def test_multi_turn_loss_on_every_assistant_turn():
    tok = make_tokenizer()
    assert _trained_text(tok, MULTI) == ["a1<|end|>\n", "a2<|end|>\n"]
    plain = make_tokenizer(chat_template=False)
    assert _trained_text(plain, MULTI) == [" a1", " a2<|end|>"]
    single = Example("q2", "a2", MULTI.context)  # train_context off: the final answer only
    assert _trained_text(tok, single) == ["a2<|end|>\n"]
    (enc,) = encode_sft(tok, [MULTI], 256)
    (enc1,) = encode_sft(tok, [single], 256)
    assert enc["input_ids"] == enc1["input_ids"]  # the same text, only the labels differ


def test_sharegpt_equals_messages_and_bad_turns_name_the_field(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"conversations": SHAREGPT}) + "\n" + json.dumps({"messages": CHAT}) + "\n")
    assert load_examples(path) == [MULTI, MULTI]
    path.write_text(json.dumps({"conversations": [{"from": "human", "text": "q"}]}) + "\n")
    with pytest.raises(ValueError, match=r"c\.jsonl:1: field 'conversations' must be a list of \{'from', 'value'\}"):
        load_examples(path)
    path.write_text(json.dumps({"messages": CHAT[:2]}) + "\n")
    with pytest.raises(ValueError, match=r"c\.jsonl:1: 'messages' must end with a user turn followed by an assistant"):
        load_examples(path)


def test_conversational_prompt_completion_trains_the_completion_only(tmp_path):
    path = tmp_path / "pc.jsonl"
    rec = {"prompt": CHAT[:4], "completion": [CHAT[4]]}
    path.write_text(json.dumps(rec) + "\n")
    (ex,) = load_examples(path)
    assert ex == Example("q2", "a2", (("system", "be brief"), ("user", "q1"), ("assistant", "a1")), False)
    assert _trained_text(make_tokenizer(), ex) == ["a2<|end|>\n"]
    path.write_text(json.dumps({"prompt": CHAT[:2], "completion": CHAT[2:]}) + "\n")
    with pytest.raises(ValueError, match=r"pc\.jsonl:1: field 'completion' must be one assistant turn"):
        load_examples(path)


def test_hub_only_behind_the_flag(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"org/set: no such file or folder \(a Hugging Face Hub dataset needs"):
        load_examples("org/set")
    with pytest.raises(ConfigError, match="^data: file does not exist"):
        TrainConfig(data="org/set").validate()
    TrainConfig(data="org/set", data_hub=True).validate()
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list([{"question": "q", "answer": "a"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_examples("org/set", allow_hub=True) == [Example("q", "a")]
    assert calls == [("org/set", "train")]


def test_prepare_data_reads_a_saved_dataset_end_to_end(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(8)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    bundle = prepare_data(str(tmp_path / "ds"), make_tokenizer(), val_fraction=0.25, max_seq_len=64)
    assert (len(bundle.train), len(bundle.val)) == (6, 2)
    assert all(ex.response.startswith("a") for ex in bundle.val_examples)
