"""Reading, checking, splitting and tokenizing pair files; the tokenized cache on disk."""

from __future__ import annotations

import re

import numpy as np
import pytest

import critic.data
from critic.config import DataConfig
from critic.data import DataError, load_pair_set, load_trial_data, read_pairs, split_by_prompt
from tests.helpers import write_pairs

ROWS = [
    ("What is 2 + 3?", "2 + 3 = 5. The answer is 5.", "The answer is 6."),
    ("What is 4 + 4?", "4 + 4 = 8. The answer is 8.", "I am not sure, maybe 9?"),
    ("What is 7 + 1?", "7 + 1 = 8. The answer is 8.", "7 + 1 = 8. The answer is 8."),  # identical
]


def data_config(path, tmp_path, **kwargs) -> DataConfig:
    return DataConfig(train_path=str(path), cache_dir=str(tmp_path / "cache"), **kwargs)


# --- bad files: a clear error, or a counted drop ----------------------------------------------------------

def test_missing_file_shows_the_resolved_path(tmp_path, tiny_tokenizer):
    cfg = data_config(tmp_path / "nope.parquet", tmp_path)
    with pytest.raises(DataError, match=rf"data file not found: {re.escape(str(tmp_path / 'nope.parquet'))}"):
        load_pair_set(cfg.train_path, cfg, tiny_tokenizer, "tiny", "train")


def test_missing_column_lists_the_columns_the_file_has(tmp_path):
    path = write_pairs(tmp_path / "pairs.parquet", [("q", "a", "b")], columns=["content", "answer", "student_response"])
    with pytest.raises(DataError, match=r"missing column\(s\) \['teacher_response'\]; "
                                        r"the file has \['content', 'answer', 'student_response'\]\. "
                                        r"Set data\.prompt_key / data\.teacher_key"):
        read_pairs(path, data_config(path, tmp_path))


def test_custom_column_names_are_used(tmp_path):
    path = write_pairs(tmp_path / "pairs.parquet", [("q", "a", "b")], columns=["prompt", "chosen", "rejected"])
    frame, _ = read_pairs(path, data_config(path, tmp_path, prompt_key="prompt", teacher_key="chosen",
                                            student_key="rejected"))
    assert frame.to_dict("records") == [{"prompt": "q", "chosen": "a", "rejected": "b"}]


def test_file_without_rows_is_an_error(tmp_path):
    path = write_pairs(tmp_path / "empty.parquet", [])
    with pytest.raises(DataError, match=r"empty\.parquet: the file has no rows"):
        read_pairs(path, data_config(path, tmp_path))


def test_empty_or_garbage_file_is_not_parquet(tmp_path):
    path = tmp_path / "pairs.parquet"
    path.write_bytes(b"")
    with pytest.raises(DataError, match=r"pairs\.parquet: cannot read as parquet"):
        read_pairs(path, data_config(path, tmp_path))


def test_null_and_empty_responses_are_dropped_and_counted(tmp_path, tiny_tokenizer, capsys):
    rows = ROWS + [
        ("What is 1 + 1?", None, "2."),          # null teacher
        ("What is 1 + 2?", "3.", ""),            # empty student
        ("What is 1 + 3?", "   \n", "4."),       # whitespace-only teacher
        (None, "5.", "6."),                      # null prompt
    ]
    path = write_pairs(tmp_path / "pairs.parquet", rows)
    frame, stats = read_pairs(path, data_config(path, tmp_path))
    assert frame["content"].tolist() == [r[0] for r in ROWS]
    assert stats == {"rows": 7.0, "dropped_rows": 4.0, "dropped_null": 2.0, "dropped_non_string": 0.0,
                     "dropped_empty": 2.0}
    pairs = load_pair_set(str(path), data_config(path, tmp_path), tiny_tokenizer, "tiny", "train")
    assert len(pairs) == 3 and pairs.stats["dropped_rows"] == 4.0 and pairs.stats["rows"] == 7.0
    assert "3 pairs kept, 4 dropped (2 null, 2 empty)" in capsys.readouterr().err


def test_non_string_responses_leave_nothing_and_say_so(tmp_path):
    # A parquet column has one type, so non-string responses fill a whole column.
    path = write_pairs(tmp_path / "pairs.parquet", [("q1", 1, "a"), ("q2", 2, "b")])
    with pytest.raises(DataError, match=r"all 2 rows have a null, non-string or empty prompt/response; "
                                        r"nothing is left to train on"):
        read_pairs(path, data_config(path, tmp_path))


def test_all_rows_empty_is_an_error(tmp_path):
    path = write_pairs(tmp_path / "pairs.parquet", [("q1", "", "a"), ("q2", "b", None)])
    with pytest.raises(DataError, match=r"nothing is left to train on"):
        read_pairs(path, data_config(path, tmp_path))


# --- prompts, truncation, EOS ---------------------------------------------------------------------------------

def test_verl_chat_list_prompt_tokenizes_like_the_same_string(tmp_path, tiny_tokenizer):
    as_chat = [([{"role": "user", "content": r[0]}], r[1], r[2]) for r in ROWS]
    chat = load_pair_set(str(write_pairs(tmp_path / "chat.parquet", as_chat)),
                         data_config(tmp_path / "chat.parquet", tmp_path), tiny_tokenizer, "tiny", "train")
    plain = load_pair_set(str(write_pairs(tmp_path / "plain.parquet", ROWS)),
                          data_config(tmp_path / "plain.parquet", tmp_path), tiny_tokenizer, "tiny", "train")
    assert chat.prompt_text == plain.prompt_text == [r[0] for r in ROWS]
    assert all(np.array_equal(a, b) for a, b in zip(chat.prompt_ids, plain.prompt_ids))


def test_multi_message_chat_prompt_keeps_every_role(tmp_path, tiny_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]
    path = write_pairs(tmp_path / "chat.parquet", [(messages, "5.", "6.")])
    pairs = load_pair_set(str(path), data_config(path, tmp_path), tiny_tokenizer, "tiny", "train")
    assert pairs.prompt_text == ["Be brief.\nWhat is 2 + 3?"]
    expected = tiny_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert pairs.prompt_ids[0].tolist() == list(expected)
    assert tiny_tokenizer.decode(pairs.prompt_ids[0]).startswith("<|im_start|>system\nBe brief.")


def test_responses_end_with_eos_unless_cut_and_prompts_keep_their_end(tmp_path, tiny_tokenizer):
    long_answer = "Step 1: 7 packs of 12 is 7 * 12 = 84. Step 2: add the 30 coins: 30 + 84 = 114. The answer is 114."
    path = write_pairs(tmp_path / "pairs.parquet", [("What is 2 + 3? " * 10, "5.", long_answer)])
    cfg = data_config(path, tmp_path, max_prompt_length=8, max_response_length=6)
    pairs = load_pair_set(str(path), cfg, tiny_tokenizer, "tiny", "train")
    eos = tiny_tokenizer.eos_token_id
    short_ids = tiny_tokenizer("5.", add_special_tokens=False)["input_ids"]
    long_ids = tiny_tokenizer(long_answer, add_special_tokens=False)["input_ids"]
    assert pairs.teacher_ids[0].tolist() == short_ids + [eos] and pairs.teacher_ends_eos.tolist() == [True]
    assert pairs.student_ids[0].tolist() == long_ids[:6] and pairs.student_ends_eos.tolist() == [False]
    full_prompt = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3? " * 10}],
                                                     add_generation_prompt=True, tokenize=True)["input_ids"]
    assert pairs.prompt_ids[0].tolist() == list(full_prompt)[-8:]  # the end: the question and the assistant tag
    assert pairs.stats["truncated_prompts"] == 1.0 and pairs.stats["truncated_responses"] == 1.0


def test_identical_pairs_are_counted(tmp_path, tiny_tokenizer):
    path = write_pairs(tmp_path / "pairs.parquet", ROWS)
    pairs = load_pair_set(str(path), data_config(path, tmp_path), tiny_tokenizer, "tiny", "train")
    assert pairs.stats["identical_pairs"] == 1.0


# --- split by prompt ------------------------------------------------------------------------------------------

def repeated_prompts(n_distinct: int) -> list[str]:
    """Each prompt appears 1 to 3 times, in an interleaved order."""
    return [f"prompt {i}" for copies in (1, 2, 3) for i in range(n_distinct) if i % 3 < copies]


def test_split_puts_each_prompt_on_one_side_only():
    prompts = repeated_prompts(300)
    train, val, confirm = split_by_prompt(prompts, 0.2, seed=0)
    assert len(confirm) == 0  # no confirm_fraction: the two-way split
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(len(prompts)))
    assert not {prompts[i] for i in train} & {prompts[i] for i in val}


def test_confirmation_split_shares_no_prompt_with_training_or_selection_data():
    prompts = repeated_prompts(600)
    train, val, confirm = split_by_prompt(prompts, 0.2, seed=0, confirm_fraction=0.15)
    assert sorted(np.concatenate([train, val, confirm]).tolist()) == list(range(len(prompts)))
    parts = [{prompts[i] for i in part} for part in (train, val, confirm)]
    assert not parts[0] & parts[1] and not parts[0] & parts[2] and not parts[1] & parts[2]
    assert abs(len(parts[2]) / 600 - 0.15) < 0.06  # binomial sd 0.015 over 600 distinct prompts
    # Carving it leaves val as it was; the confirmation prompts come out of training.
    old_train, old_val, _ = split_by_prompt(prompts, 0.2, seed=0)
    assert np.array_equal(val, old_val) and sorted(np.concatenate([train, confirm])) == sorted(old_train)


def test_split_is_deterministic_for_a_seed_and_changes_with_it():
    prompts = repeated_prompts(300)
    first, again = split_by_prompt(prompts, 0.2, seed=3), split_by_prompt(prompts, 0.2, seed=3)
    assert np.array_equal(split_by_prompt(prompts, 0.2, 3, 0.1)[2], split_by_prompt(prompts, 0.2, 3, 0.1)[2])
    assert np.array_equal(first[1], again[1]) and np.array_equal(first[0], again[0])
    assert not np.array_equal(split_by_prompt(prompts, 0.2, seed=4)[1], first[1])


def test_split_does_not_depend_on_row_order():
    prompts = [f"prompt {i}" for i in range(200)]
    val = {prompts[i] for i in split_by_prompt(prompts, 0.3, seed=0)[1]}
    reversed_prompts = prompts[::-1]
    assert {reversed_prompts[i] for i in split_by_prompt(reversed_prompts, 0.3, seed=0)[1]} == val


@pytest.mark.parametrize("val_fraction", [0.05, 0.2, 0.5])
def test_split_holds_out_roughly_val_fraction_of_prompts(val_fraction):
    prompts = [f"prompt {i}" for i in range(4000)]
    _, val, _ = split_by_prompt(prompts, val_fraction, seed=0)
    assert abs(len(val) / len(prompts) - val_fraction) < 0.03  # binomial sd is at most 0.008 here


def test_trial_data_splits_by_prompt_and_reports_counts(tmp_path, tiny_tokenizer):
    rows = [(f"What is {i} + {i}?", f"{i} + {i} = {2 * i}.", f"Maybe {i}?") for i in range(40)]
    rows += rows[:10]  # ten prompts twice
    path = write_pairs(tmp_path / "pairs.parquet", rows)
    data = load_trial_data(data_config(path, tmp_path, val_fraction=0.3, confirm_fraction=0.3), tiny_tokenizer,
                           "tiny")
    train, val, confirm = data.train, data.eval_sets["val"], data.confirm
    assert list(data.eval_sets) == ["val"]  # what a search trial scores: the confirmation split is apart
    assert list(data.heldout(confirm_split=True)) == ["val", "confirm"]
    assert data.heldout(confirm_split=True)["confirm"] is confirm and confirm.name == "confirm"
    texts = [set(part.prompt_text) for part in (train, val, confirm)]
    assert not texts[0] & texts[1] and not texts[0] & texts[2] and not texts[1] & texts[2]
    assert len(train) + len(val) + len(confirm) == 50 and min(len(train), len(val), len(confirm)) > 0
    assert data.stats["data/train_pairs"] == len(train)
    assert data.stats["data/val_pairs"] == len(val) and data.stats["data/confirm_pairs"] == len(confirm)
    assert data.stats["data/train_rows"] == 50.0 and data.stats["data/train_dropped_rows"] == 0.0


def test_an_empty_confirmation_split_is_an_error_that_names_the_fix(tmp_path, tiny_tokenizer):
    rows = [(f"prompt {i}", f"answer {i}", f"other {i}") for i in range(6)]
    path = write_pairs(tmp_path / "pairs.parquet", rows)
    train, val, confirm = split_by_prompt([r[0] for r in rows], 0.5, 0, confirm_fraction=0.01)
    assert len(train) and len(val) and not len(confirm)  # six prompts: none lands in a 1% slice
    with pytest.raises(DataError, match=r"confirm_fraction=0\.01 of 6 pairs leaves the confirmation split empty;"
                                        r".*or set it to 0"):
        load_trial_data(data_config(path, tmp_path, val_fraction=0.5, confirm_fraction=0.01), tiny_tokenizer, "tiny")
    no_split = load_trial_data(data_config(path, tmp_path, val_fraction=0.5, confirm_fraction=0.0), tiny_tokenizer,
                               "tiny")
    assert no_split.confirm is None and no_split.stats["data/confirm_pairs"] == 0.0


def test_too_few_prompts_to_split_is_an_error(tmp_path, tiny_tokenizer):
    path = write_pairs(tmp_path / "pairs.parquet", [("the only prompt", f"answer {i}", f"other {i}") for i in range(5)])
    with pytest.raises(DataError, match=r"splitting 5 pairs by prompt with val_fraction=0\.1 leaves an empty side"):
        load_trial_data(data_config(path, tmp_path), tiny_tokenizer, "tiny")


# --- the tokenized cache on disk ------------------------------------------------------------------------------

class RefusingTokenizer:
    """Stands in for the tokenizer where a load must come from the cache: any tokenization fails the test."""
    chat_template = "unused"
    eos_token_id = 0

    def __call__(self, *args, **kwargs):
        raise AssertionError("re-tokenized instead of reading the cache")

    apply_chat_template = __call__


def as_lists(pairs) -> list:
    return [[x.tolist() for x in pairs.prompt_ids], [x.tolist() for x in pairs.teacher_ids],
            [x.tolist() for x in pairs.student_ids], pairs.prompt_text, pairs.teacher_ends_eos.tolist(),
            pairs.student_ends_eos.tolist()]


def test_tokenized_cache_on_disk_is_reused(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(critic.data, "_MEMORY", {})  # start as a fresh process would
    path = write_pairs(tmp_path / "pairs.parquet", ROWS + [("What is 1 + 1?", None, "2.")])
    cfg = data_config(path, tmp_path)
    first = load_pair_set(str(path), cfg, tiny_tokenizer, "tok-a", "train")
    cache_files = sorted((tmp_path / "cache" / "tokenized").iterdir())
    assert [f.suffix for f in cache_files] == [".json", ".parquet"]  # stats + pairs, no temp files left
    written = {f: f.stat().st_mtime_ns for f in cache_files}

    monkeypatch.setattr(critic.data, "_MEMORY", {})  # a new process: only the disk cache is left
    second = load_pair_set(str(path), cfg, RefusingTokenizer(), "tok-a", "val")
    assert as_lists(second) == as_lists(first)
    assert second.stats == first.stats and second.stats["dropped_rows"] == 1.0
    assert second.name == "val" and second.digest == first.digest
    assert {f: f.stat().st_mtime_ns for f in cache_files} == written  # read, not rewritten

    # Another tokenizer, other options or edited data are other cache entries.
    other_options = data_config(path, tmp_path, max_response_length=8)
    for other_tokenizer_id, other_cfg in [("tok-b", cfg), ("tok-a", other_options)]:
        monkeypatch.setattr(critic.data, "_MEMORY", {})
        with pytest.raises(AssertionError, match="re-tokenized"):
            load_pair_set(str(path), other_cfg, RefusingTokenizer(), other_tokenizer_id, "train")
    write_pairs(path, ROWS[:2])
    edited = load_pair_set(str(path), cfg, tiny_tokenizer, "tok-a", "train")
    assert len(edited) == 2 and edited.digest != first.digest
