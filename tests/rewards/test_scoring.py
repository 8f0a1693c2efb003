"""Tests of the text format and truncation, the split by prompt, scoring and the evaluation command."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from transformers import AutoTokenizer

from rewards.embedded import minilm_path, smollm2_tokenizer_path
from rewards.scoring import RewardScorer, evaluate_preferences, forward_batches_plan, length_bucket
from rewards.training.data import PreferenceExample, RewardEncoder, RewardFormat, split_by_prompt
from tests.rewards.tiny import tiny_reward_model

DIALOGUE = [
    {"role": "user", "content": "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima"},
    {"role": "assistant", "content": "mike november"},
    {"role": "user", "content": "what comes after oscar?"},
]


@pytest.fixture(scope="module")
def bert_tokenizer():
    return AutoTokenizer.from_pretrained(minilm_path())


@pytest.fixture(scope="module")
def chat_tokenizer():
    return AutoTokenizer.from_pretrained(smollm2_tokenizer_path())


# --- formatting and truncation ----------------------------------------------------------------------------


def test_short_plain_text_is_the_tokenizers_own_encoding(bert_tokenizer):
    encoder = RewardEncoder(bert_tokenizer, RewardFormat.for_tokenizer(bert_tokenizer, max_length=256))
    assert encoder.format.template == "plain"
    text, boundary = encoder.render(DIALOGUE, "papa")
    assert text == ("user: alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima\n\n"
                    "assistant: mike november\n\nuser: what comes after oscar?\n\nassistant: papa")
    assert text[boundary:] == "papa"
    encoded = encoder.encode(DIALOGUE, "papa")
    assert encoded.input_ids == bert_tokenizer(text)["input_ids"]
    assert not encoded.shortened and encoded.response_tokens == 1


def test_a_text_past_the_models_positions_is_cut_without_the_tokenizers_warning(monkeypatch):
    """The encoder reads the whole text and cuts it itself; the tokenizer's "indexing errors" warning about the
    uncut text, printed during every first training run, read as a failure."""
    import transformers.tokenization_utils_base as tokenization

    warned = []
    monkeypatch.setattr(tokenization.logger, "warning", lambda message, *args, **kwargs: warned.append(message))
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())  # its own: the warning is given once per tokenizer
    encoder = RewardEncoder(tokenizer, RewardFormat.for_tokenizer(tokenizer, max_length=256))
    encoded = encoder.encode("word " * 600, "reply")
    assert len(encoded.input_ids) == 256 and encoded.shortened
    assert warned == []
    tokenizer("word " * 600)  # the same text through the tokenizer's own call does warn
    assert len(warned) == 1 and "longer than the specified maximum" in warned[0]


def test_a_string_prompt_is_one_user_message(bert_tokenizer):
    encoder = RewardEncoder(bert_tokenizer, RewardFormat(max_length=64, template="plain"))
    assert encoder.encode("hello there", "hi") == encoder.encode([{"role": "user", "content": "hello there"}], "hi")


def test_long_prompt_loses_its_start_and_keeps_the_end_of_the_dialogue(bert_tokenizer):
    encoder = RewardEncoder(bert_tokenizer, RewardFormat(max_length=24, template="plain"))
    encoded = encoder.encode(DIALOGUE, "papa quebec")
    assert len(encoded.input_ids) == 24 and encoded.shortened and encoded.response_cut == 0
    assert encoded.prompt_cut == encoded.prompt_tokens + encoded.response_tokens + 2 - 24
    assert encoded.input_ids[0] == bert_tokenizer.cls_token_id and encoded.input_ids[-1] == bert_tokenizer.sep_token_id
    text = bert_tokenizer.decode(encoded.input_ids[1:-1])
    assert text.endswith("user : what comes after oscar? assistant : papa quebec")
    assert "alpha" not in text


def test_response_longer_than_max_length_keeps_its_beginning(bert_tokenizer):
    encoder = RewardEncoder(bert_tokenizer, RewardFormat(max_length=12, template="plain"))
    response = " ".join(f"word{i}" for i in range(40))
    encoded = encoder.encode(DIALOGUE, response)
    assert len(encoded.input_ids) == 12 and encoded.prompt_cut == encoded.prompt_tokens
    assert encoded.response_cut == encoded.response_tokens - 10
    assert encoded.input_ids[1:-1] == bert_tokenizer(response, add_special_tokens=False)["input_ids"][:10]


def test_chat_template_renders_the_response_as_the_assistant_turn(chat_tokenizer):
    encoder = RewardEncoder(chat_tokenizer, RewardFormat.for_tokenizer(chat_tokenizer, max_length=512))
    assert encoder.format.template == "chat"
    text, boundary = encoder.render(DIALOGUE, "papa")
    assert text == chat_tokenizer.apply_chat_template([*DIALOGUE, {"role": "assistant", "content": "papa"}],
                                                      tokenize=False)
    assert text[boundary:] == "papa<|im_end|>\n"
    encoded = encoder.encode(DIALOGUE, "papa")
    assert not encoded.shortened
    assert encoded.input_ids == chat_tokenizer(text, add_special_tokens=False)["input_ids"]

    short = RewardEncoder(chat_tokenizer, RewardFormat(max_length=20, template="chat")).encode(DIALOGUE, "papa")
    assert len(short.input_ids) == 20 and short.prompt_cut > 0
    assert chat_tokenizer.decode(short.input_ids).endswith(
        "what comes after oscar?<|im_end|>\n<|im_start|>assistant\npapa<|im_end|>\n")


def test_plain_format_can_be_forced_on_a_tokenizer_with_a_chat_template(chat_tokenizer, bert_tokenizer):
    encoder = RewardEncoder(chat_tokenizer, RewardFormat(max_length=64, template="plain"))
    assert encoder.render("hi", "yo")[0] == "user: hi\n\nassistant: yo"
    assert encoder.tail == [chat_tokenizer.eos_token_id]  # TRL appends EOS to plain text too
    with pytest.raises(ValueError, match="chat template"):
        RewardEncoder(bert_tokenizer, RewardFormat(max_length=64, template="chat"))


def test_bad_prompts_and_formats_are_refused(bert_tokenizer):
    encoder = RewardEncoder(bert_tokenizer, RewardFormat(max_length=64, template="plain"))
    with pytest.raises(ValueError, match="message 1"):
        encoder.encode([{"role": "user", "content": "a"}, {"role": "user"}], "b")
    with pytest.raises(ValueError, match="template"):
        RewardFormat(max_length=64, template="fancy")
    assert RewardFormat.from_dict(RewardFormat(max_length=99, template="plain").as_dict()) == RewardFormat(
        max_length=99, template="plain")


# --- split ------------------------------------------------------------------------------------------------


def test_split_by_prompt_keeps_each_prompt_on_one_side_and_is_order_independent():
    examples = [PreferenceExample(prompt=f"prompt {i % 20}", chosen=f"good {i}", rejected=f"bad {i}")
                for i in range(100)]
    examples.append(PreferenceExample(prompt=[{"role": "user", "content": "chat"}], chosen="a", rejected="b"))
    train, evaluation = split_by_prompt(examples, eval_fraction=0.2, seed=3)
    assert len(train) + len(evaluation) == len(examples)
    train_prompts = {json.dumps(e.prompt) for e in train}
    assert not train_prompts & {json.dumps(e.prompt) for e in evaluation}
    assert 15 <= len(evaluation) <= 25
    again = split_by_prompt(list(reversed(examples)), eval_fraction=0.2, seed=3)
    assert {id(e) for e in again[1]} == {id(e) for e in evaluation}
    other = split_by_prompt(examples, eval_fraction=0.2, seed=4)[1]
    assert {id(e) for e in other} != {id(e) for e in evaluation}


def test_a_string_and_the_user_message_it_stands_for_fall_on_the_same_side(bert_tokenizer):
    # The same questions imported once as text and once as a one-turn conversation render alike for the model,
    # so one of each on both sides of the split would test the model on prompts it was trained on.
    examples = []
    for i in range(20):
        examples.append(PreferenceExample(prompt=f"question {i}", chosen="good", rejected="bad"))
        examples.append(PreferenceExample(prompt=[{"role": "user", "content": f"question {i}"}], chosen="fine",
                                          rejected="poor"))
    encoder = RewardEncoder(bert_tokenizer, RewardFormat(max_length=64, template="plain"))
    train, evaluation = split_by_prompt(examples, eval_fraction=0.25, seed=0)
    assert evaluation
    rendered = {side: {encoder.render(e.prompt, "")[0] for e in part}
                for side, part in (("train", train), ("eval", evaluation))}
    assert not rendered["train"] & rendered["eval"]
    assert len(evaluation) % 2 == 0


def test_split_edge_cases():
    two = [PreferenceExample(prompt="a", chosen="x", rejected="y"), PreferenceExample(prompt="b", chosen="x",
                                                                                       rejected="y")]
    train, evaluation = split_by_prompt(two, eval_fraction=0.1, seed=0)
    assert len(train) == 1 and len(evaluation) == 1
    assert split_by_prompt(two, eval_fraction=0.0, seed=0) == (two, [])
    with pytest.raises(ValueError, match="eval_fraction"):
        split_by_prompt(two, eval_fraction=1.0, seed=0)


# --- scoring ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_scorer(tmp_path_factory):
    return RewardScorer.load(tiny_reward_model(tmp_path_factory.mktemp("tiny")), device="cpu")


def test_folder_without_manifest_scores_with_defaults(tiny_scorer):
    assert tiny_scorer.format == RewardFormat(max_length=512, template="plain")


def test_batched_scores_equal_one_by_one_scores(tiny_scorer):
    candidates = ["yes", "a much longer answer with many more words in it than the others", "no thanks", "ok"]
    batched = tiny_scorer.score(DIALOGUE, candidates, batch_size=4)
    single = [tiny_scorer.score(DIALOGUE, [candidate])[0] for candidate in candidates]
    assert batched == pytest.approx(single, abs=1e-5)
    assert len(set(batched)) == 4
    assert tiny_scorer.score(DIALOGUE, []) == []


def test_scoring_from_several_threads_gives_the_same_scores(tiny_scorer):
    candidates = [f"answer number {i} " * (i + 1) for i in range(6)]
    expected = tiny_scorer.score("hello", candidates, batch_size=2)
    results: list[list[float]] = []
    errors: list[BaseException] = []

    def work():
        try:
            for _ in range(5):
                results.append(tiny_scorer.score("hello", candidates, batch_size=2))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(results) == 20 and all(r == pytest.approx(expected, abs=1e-5) for r in results)


def _plan_cost(lengths, plan, overhead):
    return sum(overhead + (end - start) * lengths[end - 1] for start, end in plan)


def _partitions(count, max_batch):
    """Every split of range(count) into contiguous batches of at most max_batch."""
    if count == 0:
        yield []
        return
    for size in range(1, min(max_batch, count) + 1):
        for rest in _partitions(count - size, max_batch):
            yield [(0, size), *[(start + size, end + size) for start, end in rest]]


@pytest.mark.parametrize("seed", range(6))
def test_the_forward_plan_is_the_cheapest_split(seed):
    import random

    rng = random.Random(seed)
    lengths = sorted(rng.randint(3, 300) for _ in range(8))
    for max_batch, overhead in ((3, 0), (4, 64), (8, 1024)):
        plan = forward_batches_plan(lengths, max_batch=max_batch, overhead_tokens=overhead)
        assert [start for start, _ in plan] == [0, *[end for _, end in plan[:-1]]] and plan[-1][1] == len(lengths)
        assert all(end - start <= max_batch for start, end in plan)
        cheapest = min(_plan_cost(lengths, p, overhead) for p in _partitions(len(lengths), max_batch))
        assert _plan_cost(lengths, plan, overhead) == cheapest


def test_the_forward_plan_separates_short_and_long_sequences_unless_a_pass_is_dear():
    lengths = [10, 11, 12, 12, 240, 250]
    assert forward_batches_plan(lengths, max_batch=16, overhead_tokens=64) == [(0, 4), (4, 6)]
    assert forward_batches_plan(lengths, max_batch=16, overhead_tokens=10**6) == [(0, 6)]
    assert forward_batches_plan([], max_batch=4, overhead_tokens=0) == []
    with pytest.raises(ValueError, match="sorted"):
        forward_batches_plan([5, 3], max_batch=4, overhead_tokens=0)


def test_score_ids_runs_the_planned_batches_and_answers_in_the_given_order(tiny_scorer, monkeypatch):
    sequences = [tiny_scorer.encode("hello", "word " * n).input_ids for n in (40, 1, 38, 2, 39, 3)]
    expected = [tiny_scorer.score_ids([ids])[0] for ids in sequences]
    shapes = []
    forward = tiny_scorer.model.forward

    def recording_forward(*args, **kwargs):
        shapes.append(tuple(kwargs["input_ids"].shape))
        return forward(*args, **kwargs)

    monkeypatch.setattr(tiny_scorer.model, "forward", recording_forward)
    scores = tiny_scorer.score_ids(sequences, batch_size=16, overhead_tokens=8)
    assert scores == pytest.approx(expected, abs=1e-5)
    lengths = sorted(len(ids) for ids in sequences)
    # Three short and three long sequences: two passes, each as wide as its own longest sequence.
    assert shapes == [(3, lengths[2]), (3, lengths[5])]
    shapes.clear()
    tiny_scorer.score_ids(sequences, batch_size=16, overhead_tokens=10**6)
    assert shapes == [(6, lengths[5])]


def test_a_sequence_given_twice_gets_one_score(tiny_scorer):
    # Eight answers and the same eight with the first made long: the copies of the other seven fall into
    # differently shaped batches, which moves float32 logits in their last bits.
    answers = [" ".join(["word"] * (n + 1)) for n in range(8)]
    sequences = [tiny_scorer.encode(f"question {n}?", answer).input_ids for n, answer in enumerate(answers)]
    long = tiny_scorer.encode("question 0?", " ".join(["other"] * 60)).input_ids
    scores = tiny_scorer.score_ids([long, *sequences[1:], *sequences])
    assert scores[1:8] == scores[9:]
    assert scores[0] != scores[8]


class LengthScorer:
    """A stand-in reward: the number of tokens, so the expected evaluation can be worked out by hand."""

    def __init__(self, tokenizer):
        self.encoder = RewardEncoder(tokenizer, RewardFormat(max_length=512, template="plain"))

    def encode(self, prompt, response):
        return self.encoder.encode(prompt, response)

    def score_ids(self, sequences, *, batch_size=16):
        return [float(len(ids)) for ids in sequences]


def test_evaluate_preferences_on_a_constructed_case(bert_tokenizer):
    long_prompt = " ".join(["word"] * 100)
    examples = [
        PreferenceExample(prompt="hi", chosen="one two three", rejected="one"),         # +2, right
        PreferenceExample(prompt="hi", chosen="one two", rejected="one"),               # +1, right
        PreferenceExample(prompt="hi", chosen="one", rejected="one two three four"),    # -3, wrong
        PreferenceExample(prompt=long_prompt, chosen="one two", rejected="one"),        # +1, right
    ]
    report = evaluate_preferences(LengthScorer(bert_tokenizer), examples, batch_size=3)
    assert report["pairs"] == 4
    assert report["accuracy"] == 0.75
    assert report["mean_margin"] == pytest.approx((2 + 1 - 3 + 1) / 4)
    assert report["by_length"] == {"0-63": {"pairs": 3, "accuracy": 2 / 3}, "64-127": {"pairs": 1, "accuracy": 1.0}}
    assert report["shortened_pairs"] == 0 and report["seconds"] >= 0
    empty = evaluate_preferences(LengthScorer(bert_tokenizer), [])
    assert empty["pairs"] == 0 and empty["accuracy"] is None


def test_length_buckets():
    assert [length_bucket(n) for n in (0, 63, 64, 255, 256, 511, 512, 9000)] == [
        "0-63", "0-63", "64-127", "128-255", "256-511", "256-511", "512+", "512+"]


# --- evaluate_reward_model command ------------------------------------------------------------------------


def hh_line(prompt: str, chosen: str, rejected: str) -> str:
    return json.dumps({"chosen": f"\n\nHuman: {prompt}\n\nAssistant: {chosen}",
                       "rejected": f"\n\nHuman: {prompt}\n\nAssistant: {rejected}"})


def test_evaluate_command_prints_one_json_report_and_lists_bad_lines(tmp_path, capsys):
    model = tiny_reward_model(tmp_path)
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join([
        hh_line("how are you?", "fine, thanks", "go away"),
        "{not json",
        hh_line("and you?", "great", "bad"),
        json.dumps({"chosen": "no turns"}),
        hh_line("third?", "yes", "no"),
    ]) + "\n")

    call_command("evaluate_reward_model", str(model), str(data), "--format", "hh", "--batch-size", "2",
                 "--device", "cpu")
    captured = capsys.readouterr()
    report = json.loads(captured.out.strip().splitlines()[-1])
    assert report["pairs"] == 3 and report["bad_lines"] == 2
    assert [error["line"] for error in report["errors"]] == [2, 4]
    assert 0.0 <= report["accuracy"] <= 1.0 and report["template"] == "plain"
    assert "line 2:" in captured.err

    call_command("evaluate_reward_model", str(model), str(data), "--format", "hh", "--limit", "1", "--device", "cpu")
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["pairs"] == 1


def test_evaluate_command_reads_trl_rows(tmp_path, capsys):
    model = tiny_reward_model(tmp_path)
    data = tmp_path / "pairs.jsonl"
    user = {"role": "user", "content": "hi"}
    rows = [{"prompt": "2+2?", "chosen": "4", "rejected": "5", "margin": 1.0},
            {"chosen": [user, {"role": "assistant", "content": "hello"}],
             "rejected": [user, {"role": "assistant", "content": "go"}]}]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    call_command("evaluate_reward_model", str(model), str(data), "--format", "trl", "--device", "cpu")
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["pairs"] == 2


def test_evaluate_command_errors(tmp_path):
    model = tiny_reward_model(tmp_path)
    with pytest.raises(CommandError, match=r"No folder at .*nope\.$"):
        call_command("evaluate_reward_model", str(tmp_path / "nope"), str(tmp_path / "x.jsonl"), "--format", "hh")
    with pytest.raises(CommandError, match=r"no config\.json"):
        call_command("evaluate_reward_model", str(tmp_path), str(tmp_path / "x.jsonl"), "--format", "hh")
    with pytest.raises(CommandError, match="does not exist"):
        call_command("evaluate_reward_model", str(model), str(tmp_path / "x.jsonl"), "--format", "hh")
    empty = Path(tmp_path / "bad.jsonl")
    empty.write_text("[1, 2]\n")
    with pytest.raises(CommandError, match="No usable pairs"):
        call_command("evaluate_reward_model", str(model), str(empty), "--format", "hh")
