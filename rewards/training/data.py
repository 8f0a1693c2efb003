"""Preference examples, the split by prompt, and the one text format + truncation used to train and score."""
from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

Messages = list[dict[str, str]]

TEMPLATE_CHAT = "chat"
TEMPLATE_PLAIN = "plain"
TEMPLATES = (TEMPLATE_CHAT, TEMPLATE_PLAIN)
# What happens to a text longer than max_length: the prompt loses tokens from its start, so the end of the
# dialogue and the whole response survive; a response longer than max_length by itself keeps its beginning.
TRUNCATION = "prompt_left"
RESPONSE_OVERFLOW = "response_keep_start"


@dataclass(frozen=True)
class PreferenceExample:
    prompt: str | Messages
    chosen: str
    rejected: str
    margin: float | None = None


def prompt_key(prompt: str | Messages) -> str:
    """The identity of a prompt for splitting and grouping: the canonical JSON of what a model sees. A string is
    one user message (see prompt_messages), so a one-turn user conversation has the key of its text, and keys
    other than role and content are left out."""
    try:
        messages = prompt_messages(prompt)
    except ValueError:
        messages = None
    if messages is not None:
        single = len(messages) == 1 and messages[0]["role"] == "user"
        prompt = messages[0]["content"] if single else messages
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def split_by_prompt(examples: Sequence[PreferenceExample], *, eval_fraction: float,
                    seed: int) -> tuple[list[PreferenceExample], list[PreferenceExample]]:
    """Splits into (train, eval) so that all pairs of one prompt fall on the same side.

    About `eval_fraction` of the pairs go to eval. The assignment depends only on the prompts and the seed,
    not on the order of `examples`; each side keeps the input order.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError("eval_fraction must be at least 0 and below 1.")
    sizes: dict[str, int] = {}
    for example in examples:
        key = prompt_key(example.prompt)
        sizes[key] = sizes.get(key, 0) + 1
    keys = sorted(sizes, key=lambda k: hashlib.sha256(k.encode("utf-8")).hexdigest())
    random.Random(seed).shuffle(keys)
    target = round(eval_fraction * len(examples))
    if eval_fraction > 0 and len(keys) >= 2:
        target = max(target, 1)
    eval_keys: set[str] = set()
    eval_size = 0
    # The last prompt always stays in train so neither side is empty when there are two prompts or more.
    for key in keys[:-1]:
        if eval_size >= target:
            break
        eval_keys.add(key)
        eval_size += sizes[key]
    train = [e for e in examples if prompt_key(e.prompt) not in eval_keys]
    evaluation = [e for e in examples if prompt_key(e.prompt) in eval_keys]
    return train, evaluation


def chat_template_apply(tokenizer: Any, messages: Messages, **options: Any) -> Any:
    """The tokenizer's chat template applied to `messages`. Many templates refuse some conversations themselves
    (a system turn, roles that do not alternate) by raising jinja2's TemplateError, which is not a ValueError;
    it is raised as one here, so that callers treat it as the bad input it is."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, **options)
    except TemplateError as exc:
        raise ValueError(f"the model's chat template refuses this conversation: {exc}") from exc


def common_prefix_length(first: str, second: str) -> int:
    for index, (a, b) in enumerate(zip(first, second, strict=False)):
        if a != b:
            return index
    return min(len(first), len(second))


def prompt_messages(prompt: str | Messages) -> Messages:
    """A prompt as chat messages: a plain string is one user message."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise ValueError("A prompt is a string or a non-empty list of {role, content} messages.")
    for index, message in enumerate(prompt):
        if (not isinstance(message, dict) or not isinstance(message.get("role"), str)
                or not isinstance(message.get("content"), str)):
            raise ValueError(f"Prompt message {index} needs a string 'role' and a string 'content'.")
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


@dataclass(frozen=True)
class RewardFormat:
    """How a (prompt, response) becomes model input; saved with every model so scoring matches training."""

    max_length: int
    template: str

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}, not {self.template!r}.")
        if not isinstance(self.max_length, int) or self.max_length < 8:
            raise ValueError("max_length must be an integer of at least 8.")

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, *, max_length: int) -> RewardFormat:
        return cls(max_length=max_length, template=TEMPLATE_CHAT if tokenizer.chat_template else TEMPLATE_PLAIN)

    @classmethod
    def from_dict(cls, data: dict) -> RewardFormat:
        return cls(max_length=int(data["max_length"]), template=data["template"])

    def as_dict(self) -> dict:
        return {"max_length": self.max_length, "template": self.template, "truncation": TRUNCATION,
                "response_overflow": RESPONSE_OVERFLOW}


@dataclass(frozen=True)
class EncodedText:
    input_ids: list[int]
    prompt_tokens: int      # tokens of the rendered prompt before truncation
    response_tokens: int    # tokens of the rendered response (with the template's end of turn)
    prompt_cut: int = 0     # tokens removed from the start of the prompt
    response_cut: int = 0   # tokens removed from the end of the response (when it alone is too long)

    @property
    def shortened(self) -> bool:
        return bool(self.prompt_cut or self.response_cut)


class RewardEncoder:
    """Renders and tokenizes (prompt, response) for a reward model, truncating from the left of the prompt.

    Chat template (when the format says so): the dialogue plus the response as the assistant's turn, tokenized
    without added special tokens, as TRL does for conversations. Plain: "role: content" turns joined by blank
    lines, then "assistant: " and the response, wrapped in the tokenizer's own special tokens ([CLS] ... [SEP]
    for BERT); a tokenizer that adds no end token gets its EOS appended, as TRL does. Those special tokens are
    never cut.
    """

    def __init__(self, tokenizer: Any, fmt: RewardFormat) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("Reward models need a fast tokenizer (tokenizer.json): truncation uses its offsets.")
        if fmt.template == TEMPLATE_CHAT and not tokenizer.chat_template:
            raise ValueError("The format asks for the chat template but the tokenizer has none.")
        self.tokenizer = tokenizer
        self.format = fmt
        self.head, self.tail = self._special_frame()
        if fmt.max_length <= len(self.head) + len(self.tail):
            raise ValueError(f"max_length {fmt.max_length} leaves no room for text.")

    def _special_frame(self) -> tuple[list[int], list[int]]:
        if self.format.template == TEMPLATE_CHAT:
            return [], []
        bare = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        framed = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        start = next((i for i in range(len(framed) - len(bare) + 1) if framed[i:i + len(bare)] == bare), 0)
        head, tail = framed[:start], framed[start + len(bare):]
        eos = self.tokenizer.eos_token_id
        if not tail and eos is not None:
            tail = [eos]
        return head, tail

    def render(self, prompt: str | Messages, response: str) -> tuple[str, int]:
        """The text and the character offset where the response part begins."""
        messages = prompt_messages(prompt)
        if self.format.template == TEMPLATE_CHAT:
            head = chat_template_apply(self.tokenizer, messages, tokenize=False, add_generation_prompt=True)
            full = chat_template_apply(self.tokenizer, [*messages, {"role": "assistant", "content": response}],
                                       tokenize=False)
            return full, common_prefix_length(head, full)
        head = "\n\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\n\nassistant: "
        return head + response, len(head)

    def encode(self, prompt: str | Messages, response: str) -> EncodedText:
        text, boundary = self.render(prompt, response)
        # The whole text first, cut to max_length below: verbose=False keeps the tokenizer from warning, once per
        # process, that a sequence this long would break the model ("indexing errors"), which read as a failure.
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
        # A token that straddles the boundary carries the start of the response, so it counts as response.
        split = next((i for i, (_, end) in enumerate(offsets) if end > boundary), len(ids))
        prompt_ids, response_ids = ids[:split], ids[split:]
        budget = self.format.max_length - len(self.head) - len(self.tail)
        prompt_cut = response_cut = 0
        if len(ids) > budget:
            if len(response_ids) >= budget:
                prompt_cut, response_cut = len(prompt_ids), len(response_ids) - budget
                prompt_ids, response_ids = [], response_ids[:budget]
            else:
                keep = budget - len(response_ids)
                prompt_cut = len(prompt_ids) - keep
                prompt_ids = prompt_ids[prompt_cut:]
        return EncodedText(
            input_ids=[*self.head, *prompt_ids, *response_ids, *self.tail],
            prompt_tokens=split, response_tokens=len(ids) - split, prompt_cut=prompt_cut, response_cut=response_cut,
        )

    def encode_pair(self, example: PreferenceExample) -> tuple[EncodedText, EncodedText]:
        return self.encode(example.prompt, example.chosen), self.encode(example.prompt, example.rejected)


# --- reading preference files ------------------------------------------------------------------------------


def read_preference_file(lines: Iterable[bytes | str], *, file_format: str,
                         limit: int | None = None) -> tuple[list[PreferenceExample], list[dict]]:
    """Parses JSONL lines in 'hh' or 'trl' format into examples and a list of {line, error} for bad lines.

    The line parsers are the importer's (labeling.imports), so a file evaluates exactly as it would import;
    that module needs Django configured.
    """
    from labeling.imports import BadLine, parse_hh, parse_trl

    parsers = {"hh": parse_hh, "trl": parse_trl}
    if file_format not in parsers:
        raise ValueError(f"Unknown format {file_format!r}; use one of {', '.join(sorted(parsers))}.")
    parse = parsers[file_format]
    examples: list[PreferenceExample] = []
    errors: list[dict] = []
    for number, line in enumerate(lines, start=1):
        if limit is not None and len(examples) >= limit:
            break
        try:
            text = line.decode("utf-8-sig" if number == 1 else "utf-8") if isinstance(line, bytes) else line
        except UnicodeDecodeError as exc:
            errors.append({"line": number, "error": f"invalid UTF-8 at byte offset {exc.start}"})
            continue
        if not text.strip():
            continue
        try:
            row = json.loads(text)
            if not isinstance(row, dict):
                raise BadLine("expected a JSON object")
            parsed = parse(row, number)
        except (BadLine, ValueError) as exc:  # json.JSONDecodeError is a ValueError
            errors.append({"line": number, "error": str(exc)})
            continue
        chosen, rejected = parsed.responses[0].text, parsed.responses[1].text
        examples.append(PreferenceExample(prompt=parsed.prompt, chosen=chosen, rejected=rejected,
                                          margin=parsed.margin))
    return examples, errors
