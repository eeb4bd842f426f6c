"""Prompts, tokenizers and rewards of asyncrl.rollout.tasks."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncrl.config import TaskConfig
from asyncrl.rollout.tasks import CharTokenizer, HFTokenizer, Prompt, build_task
from asyncrl.rollout.tasks.dataset import DatasetTask, load_rows
from asyncrl.rollout.tasks.digits import AddModTask, RepeatTask, ReverseTask
from asyncrl.rollout.tasks.rewards import exact_match_reward, extract_final_number, gsm8k_reward
from asyncrl.rollout.tasks.tokenizer import CHAR_VOCAB

SAMPLE = Path(__file__).parent / "data" / "gsm8k_sample.jsonl"
EOS = CharTokenizer.eos_token_id
TOK = CharTokenizer()


def digit_prompt(digits: str, reference: str) -> Prompt:
    return Prompt(tokens=[TOK.bos_token_id, *TOK.encode(digits + "=")], text=digits + "=", reference=reference)


def ids(text: str, eos: bool = True) -> list[int]:
    return TOK.encode(text) + ([EOS] if eos else [])


# --- CharTokenizer ---------------------------------------------------------------------------


def test_char_tokenizer_ids_are_fixed():
    assert (TOK.pad_token_id, TOK.bos_token_id, TOK.eos_token_id) == (0, 1, 2)
    assert TOK.encode("0123456789+= ") == list(range(3, 16))
    assert TOK.vocab_size == len(CHAR_VOCAB) == 16


def test_char_tokenizer_fits_the_default_model_vocabulary():
    from asyncrl.config import ModelConfig

    assert TOK.vocab_size <= ModelConfig().vocab_size


def test_char_tokenizer_round_trips_text():
    text = "12+34= 46"
    assert TOK.decode(TOK.encode(text)) == text


def test_char_tokenizer_decode_leaves_out_special_tokens():
    assert TOK.decode([1, *TOK.encode("42"), 2, 0]) == "42"


def test_char_tokenizer_decode_marks_ids_beyond_its_vocabulary():
    assert TOK.decode([TOK.vocab_size, 31, *TOK.encode("7")]) == "\ufffd\ufffd7"


def test_char_tokenizer_rejects_an_unknown_character_by_name():
    with pytest.raises(ValueError, match="'x'"):
        TOK.encode("1x2")


# --- digit tasks -----------------------------------------------------------------------------


def test_digit_prompt_is_bos_digits_equals():
    task = RepeatTask(num_digits=4)
    prompt = task.sample_prompt(random.Random(0))
    assert prompt.tokens[0] == TOK.bos_token_id
    assert prompt.tokens[-1] == TOK.encode("=")[0]
    assert len(prompt.tokens) == 4 + 2
    assert prompt.text == TOK.decode(prompt.tokens) and prompt.text.endswith("=")


def test_digit_prompts_are_deterministic_for_a_seed():
    task = build_task(TaskConfig(name="reverse", num_digits=5))
    first = [task.sample_prompt(random.Random(7)) for _ in range(3)]
    again = [task.sample_prompt(random.Random(7)) for _ in range(3)]
    rng_a, rng_b = random.Random(11), random.Random(11)
    assert first == again
    assert [task.sample_prompt(rng_a) for _ in range(20)] == [task.sample_prompt(rng_b) for _ in range(20)]


def test_digit_prompts_differ_across_seeds():
    task = RepeatTask(num_digits=6)
    assert task.sample_prompt(random.Random(1)) != task.sample_prompt(random.Random(2))


def test_digit_task_references():
    assert RepeatTask(3).answer("123") == "123"
    assert ReverseTask(3).answer("123") == "321"
    assert AddModTask(3).answer("789") == "4"


def test_repeat_perfect_response_scores_one():
    assert RepeatTask(3).reward(digit_prompt("123", "123"), ids("123")) == 1.0


def test_repeat_partial_response_scores_correct_positions_over_k_plus_one():
    assert RepeatTask(3).reward(digit_prompt("123", "123"), ids("193")) == pytest.approx(3 / 4)


def test_repeat_wrong_digits_with_eos_score_only_the_eos():
    assert RepeatTask(3).reward(digit_prompt("123", "123"), ids("999")) == pytest.approx(1 / 4)


def test_repeat_missing_eos_loses_one_share():
    assert RepeatTask(3).reward(digit_prompt("123", "123"), ids("123", eos=False)) == pytest.approx(3 / 4)


def test_empty_response_scores_zero():
    for task, ref in ((RepeatTask(3), "123"), (ReverseTask(3), "321"), (AddModTask(3), "6")):
        assert task.reward(digit_prompt("123", ref), []) == 0.0


def test_response_longer_than_target_gets_no_eos_credit():
    assert RepeatTask(3).reward(digit_prompt("123", "123"), ids("1234")) == pytest.approx(3 / 4)


def test_tokens_after_the_first_eos_are_ignored():
    assert RepeatTask(3).reward(digit_prompt("123", "123"), [*ids("1"), *ids("23")]) == pytest.approx(1 / 4)


def test_early_eos_scores_the_digits_before_it():
    assert RepeatTask(3).reward(digit_prompt("123", "123"), ids("12")) == pytest.approx(2 / 4)


def test_reverse_scores_against_the_reversed_digits():
    task = ReverseTask(3)
    prompt = digit_prompt("123", "321")
    assert task.reward(prompt, ids("321")) == 1.0
    assert task.reward(prompt, ids("123")) == pytest.approx(2 / 4)


def test_add_mod_perfect_response_scores_one():
    assert AddModTask(3).reward(digit_prompt("789", "4"), ids("4")) == 1.0


def test_add_mod_right_digit_without_eos_scores_half():
    assert AddModTask(3).reward(digit_prompt("789", "4"), ids("4", eos=False)) == 0.5


def test_add_mod_wrong_digit_then_eos_scores_half():
    assert AddModTask(3).reward(digit_prompt("789", "4"), ids("5")) == 0.5


def test_add_mod_wrong_digit_then_more_digits_scores_zero():
    assert AddModTask(3).reward(digit_prompt("789", "4"), ids("54")) == 0.0


@pytest.mark.parametrize("name", ["repeat", "reverse", "add_mod"])
@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    num_digits=st.integers(1, 8),
    response=st.lists(st.integers(0, 31), max_size=20),
)
def test_digit_reward_is_always_within_zero_and_one(name, seed, num_digits, response):
    task = build_task(TaskConfig(name=name, num_digits=num_digits))
    reward = task.reward(task.sample_prompt(random.Random(seed)), response)
    assert 0.0 <= reward <= 1.0


def test_random_responses_get_a_small_nonzero_mean_reward():
    task = RepeatTask(3)
    rng = random.Random(0)
    rewards = [
        task.reward(task.sample_prompt(rng), [rng.randrange(32) for _ in range(4)]) for _ in range(2000)
    ]
    mean = sum(rewards) / len(rewards)
    assert 0.0 < mean < 0.2


# --- GSM8K and exact-match rewards -----------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is 1,234.", "1234"),
        ("#### 72", "72"),
        ("$5.00", "5"),
        ("It costs 42.0 dollars", "42"),
        ("first 3 then 0.50", "0.5"),
        ("She had 5 apples.\n#### -3", "-3"),
        ("Steps with 12 and 7 first.\n#### 19 apples, not 25", "19"),
        ("no number at all", None),
        ("12 then #### nothing", None),
    ],
)
def test_extract_final_number(text, expected):
    assert extract_final_number(text) == expected


def test_gsm8k_reward_matches_the_final_number():
    assert gsm8k_reward("So she pays $60.00.", "3 * 20 = 60\n#### 60") == 1.0


def test_gsm8k_reward_ignores_thousands_commas():
    assert gsm8k_reward("The answer is 5,000.", "#### 5000") == 1.0


def test_gsm8k_reward_wrong_number_scores_zero():
    assert gsm8k_reward("The answer is 61", "#### 60") == 0.0


def test_gsm8k_reward_without_a_number_scores_zero():
    assert gsm8k_reward("I do not know", "#### 60") == 0.0


def test_gsm8k_reward_of_empty_response_is_zero():
    assert gsm8k_reward("", "#### 0") == 0.0


def test_gsm8k_reward_does_not_confuse_long_numbers():
    assert gsm8k_reward("12345678901234567890123456789012", "#### 12345678901234567890123456789013") == 0.0


@settings(max_examples=200, deadline=None)
@given(response=st.text(max_size=60))
def test_gsm8k_reward_is_always_zero_or_one(response):
    assert gsm8k_reward(response, "#### 42") in (0.0, 1.0)


def test_exact_match_reward_ignores_surrounding_whitespace():
    assert exact_match_reward("  Paris\n", "Paris") == 1.0


def test_exact_match_reward_wrong_answer_scores_zero():
    assert exact_match_reward("Paris, France", "Paris") == 0.0


# --- HFTokenizer (a tiny tokenizer built here; nothing is downloaded) ------------------------


CHAT_TEMPLATE = (
    "{% for message in messages %}<bos>user: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def save_tiny_tokenizer(directory: Path, chat_template: str | None = None, pad: bool = True) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<bos>", "<eos>"] if pad else ["<bos>", "<eos>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(SAMPLE.read_text().splitlines(), trainer=trainer)
    kwargs = {"pad_token": "<pad>"} if pad else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", **kwargs)
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    return save_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def chat_tokenizer_dir(tmp_path_factory) -> Path:
    return save_tiny_tokenizer(tmp_path_factory.mktemp("chat_tok"), chat_template=CHAT_TEMPLATE)


def test_hf_tokenizer_round_trips_text(tiny_tokenizer_dir):
    tok = HFTokenizer(str(tiny_tokenizer_dir))
    text = "A baker makes 24 muffins, then sells $1,250.75 worth!"
    assert tok.decode(tok.encode(text)) == text


def test_hf_tokenizer_exposes_special_ids(tiny_tokenizer_dir):
    tok = HFTokenizer(str(tiny_tokenizer_dir))
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert 3 < tok.vocab_size <= 400


def test_hf_tokenizer_pad_falls_back_to_eos(tmp_path):
    tok = HFTokenizer(str(save_tiny_tokenizer(tmp_path, pad=False)))
    assert tok.pad_token_id == tok.eos_token_id


def test_hf_tokenizer_decode_leaves_out_eos(tiny_tokenizer_dir):
    tok = HFTokenizer(str(tiny_tokenizer_dir))
    assert tok.decode(tok.encode("#### 72") + [tok.eos_token_id]) == "#### 72"


def test_hf_tokenizer_prompt_applies_the_chat_template(chat_tokenizer_dir):
    tok = HFTokenizer(str(chat_tokenizer_dir))
    ids = tok.encode_prompt("How many apples?")
    assert ids[0] == tok.bos_token_id
    assert ids == tok.encode("<bos>user: How many apples?\nassistant:")


def test_hf_tokenizer_prompt_without_template_is_the_plain_text(tiny_tokenizer_dir):
    tok = HFTokenizer(str(tiny_tokenizer_dir))
    assert tok.encode_prompt("How many apples?") == tok.encode("How many apples?")


def test_hf_tokenizer_missing_directory_names_the_path(tmp_path):
    missing = tmp_path / "no_model"
    with pytest.raises(ValueError, match="no_model"):
        HFTokenizer(str(missing))


# --- dataset task ----------------------------------------------------------------------------


def write_parquet(rows: list[dict], path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def sample_rows() -> list[dict]:
    return [json.loads(line) for line in SAMPLE.read_text().splitlines() if line.strip()]


def test_load_rows_reads_the_jsonl_sample():
    rows = load_rows(str(SAMPLE), "question", "answer")
    assert len(rows) == len(sample_rows()) >= 8
    assert rows[0][0].startswith("A baker") and rows[0][1].endswith("#### 12")


def test_load_rows_reads_parquet_like_jsonl(tmp_path):
    path = write_parquet(sample_rows(), tmp_path / "sample.parquet")
    assert load_rows(str(path), "question", "answer") == load_rows(str(SAMPLE), "question", "answer")


def test_load_rows_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_rows(str(missing), "question", "answer")


def test_load_rows_missing_column_names_it_and_lists_the_columns():
    with pytest.raises(ValueError, match=r"'problem'.*task\.prompt_key.*\['question', 'answer'\]"):
        load_rows(str(SAMPLE), "problem", "answer")


def test_load_rows_missing_parquet_column_names_it_and_lists_the_columns(tmp_path):
    path = write_parquet(sample_rows(), tmp_path / "sample.parquet")
    with pytest.raises(ValueError, match=r"'solution'.*task\.answer_key.*\['question', 'answer'\]"):
        load_rows(str(path), "question", "solution")


def test_load_rows_empty_file_is_an_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no rows"):
        load_rows(str(empty), "question", "answer")


def test_load_rows_bad_json_names_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "1"}\n{oops\n')
    with pytest.raises(ValueError, match="line 2"):
        load_rows(str(bad), "question", "answer")


def test_load_rows_unsupported_extension_lists_the_supported(tmp_path):
    csv = tmp_path / "data.csv"
    csv.write_text("question,answer\n")
    with pytest.raises(ValueError, match=r"\.jsonl.*\.parquet"):
        load_rows(str(csv), "question", "answer")


def test_dataset_task_prompts_are_deterministic_for_a_seed(tiny_tokenizer_dir):
    task = build_task(TaskConfig(name="dataset", path=str(SAMPLE)), model_path=str(tiny_tokenizer_dir))
    rng_a, rng_b = random.Random(3), random.Random(3)
    assert [task.sample_prompt(rng_a) for _ in range(10)] == [task.sample_prompt(rng_b) for _ in range(10)]


def test_dataset_task_prompt_carries_text_tokens_and_reference(tiny_tokenizer_dir):
    task = build_task(TaskConfig(name="dataset", path=str(SAMPLE)), model_path=str(tiny_tokenizer_dir))
    prompt = task.sample_prompt(random.Random(0))
    assert (prompt.text, prompt.reference) in load_rows(str(SAMPLE), "question", "answer")
    assert task.tokenizer.decode(prompt.tokens) == prompt.text


def test_dataset_task_gsm8k_reward_decodes_the_response(tiny_tokenizer_dir):
    task = build_task(TaskConfig(name="dataset", path=str(SAMPLE)), model_path=str(tiny_tokenizer_dir))
    prompt = task.sample_prompt(random.Random(0))
    answer = extract_final_number(prompt.reference)
    right = task.tokenizer.encode(f"So the answer is {answer}.") + [task.tokenizer.eos_token_id]
    wrong = task.tokenizer.encode(f"So the answer is {answer}1.") + [task.tokenizer.eos_token_id]
    assert task.reward(prompt, right) == 1.0
    assert task.reward(prompt, wrong) == 0.0


def test_dataset_task_ignores_tokens_after_eos(tiny_tokenizer_dir):
    task = build_task(TaskConfig(name="dataset", path=str(SAMPLE)), model_path=str(tiny_tokenizer_dir))
    prompt = Prompt(tokens=[], text="q", reference="#### 7")
    eos = task.tokenizer.eos_token_id
    assert task.reward(prompt, task.tokenizer.encode("7") + [eos] + task.tokenizer.encode(" 8")) == 1.0


def test_dataset_task_exact_reward(tmp_path, tiny_tokenizer_dir):
    path = tmp_path / "capitals.jsonl"
    path.write_text(json.dumps({"q": "Capital of France?", "a": "Paris"}) + "\n")
    cfg = TaskConfig(name="dataset", path=str(path), prompt_key="q", answer_key="a", reward="exact")
    task = build_task(cfg, model_path=str(tiny_tokenizer_dir))
    prompt = task.sample_prompt(random.Random(0))
    assert task.reward(prompt, task.tokenizer.encode(" Paris")) == 1.0
    assert task.reward(prompt, task.tokenizer.encode("Lyon")) == 0.0


def test_dataset_task_gsm8k_rejects_a_reference_without_a_number(tmp_path, tiny_tokenizer_dir):
    path = tmp_path / "words.jsonl"
    path.write_text(json.dumps({"question": "Capital of France?", "answer": "Paris"}) + "\n")
    with pytest.raises(ValueError, match="row 0.*no final number"):
        DatasetTask(TaskConfig(name="dataset", path=str(path)), HFTokenizer(str(tiny_tokenizer_dir)))


# --- build_task ------------------------------------------------------------------------------


def test_build_task_builds_each_builtin_with_the_char_tokenizer():
    for name in ("repeat", "reverse", "add_mod"):
        task = build_task(TaskConfig(name=name, num_digits=4))
        assert task.name == name and isinstance(task.tokenizer, CharTokenizer)


def test_build_task_unknown_name_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"'sort'.*\['repeat', 'reverse', 'add_mod', 'longtail', 'dataset'\]"):
        build_task(TaskConfig(name="sort"))


def test_build_task_dataset_without_model_path_says_to_set_model_path():
    with pytest.raises(ValueError, match="model.path"):
        build_task(TaskConfig(name="dataset", path=str(SAMPLE)))


def test_build_task_dataset_without_path_says_to_set_task_path(tiny_tokenizer_dir):
    with pytest.raises(ValueError, match="task.path"):
        build_task(TaskConfig(name="dataset"), model_path=str(tiny_tokenizer_dir))
