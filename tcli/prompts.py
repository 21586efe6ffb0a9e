"""Prompt records: validation, templates and tokenisation (shared by sample-tree, eval and loop)."""

from __future__ import annotations

import re

from tcli.errors import DataError, UsageError

BOXED = "{prompt}\nLet's think step by step and output the final answer within \\boxed{}."
CHOICE = ("{prompt}\n\n{choices}\n\nThink step by step, then give the letter of the correct option "
          "as <answer>X</answer>.")
PROMPT_TEMPLATES = {"boxed": BOXED, "choice": CHOICE, "plain": "{prompt}"}
_PLACEHOLDER = re.compile(r"\{(prompt|choices)\}")



def map_fields(rec: dict, fields=None, standard: bool = False) -> dict:
    """The record with ``id``/``prompt``/``answer`` taken from the fields ``fields`` (a
    PromptOptions) names, for data sets with another schema; errors name the source field.
    A named field the record lacks is an error, never a fall-back to the default name (a misspelt
    ``--answer-field`` would grade against another field); a chat record needs no prompt field.
    ``standard``: a record without the named field that has the standard one keeps it (the loop's
    eval data, which may be a benchmark in the standard schema while the train data is not)."""
    if fields is None or not isinstance(rec, dict):
        return rec
    pairs = [(key, src) for key, src in (("id", fields.id_field), ("prompt", fields.prompt_field),
                                         ("answer", fields.answer_field)) if src != key]
    if not pairs:
        return rec
    taken = {}
    for key, src in pairs:
        if src in rec:
            taken[key] = rec[src]
        elif standard and key in rec:
            taken[key] = rec[key]
        elif not (key == "prompt" and "messages" in rec and "prompt" not in rec):
            raise DataError(f"missing (named by {fields.label(key + '_field')}; the record has: "
                            f"{_fields_of(rec)})", field=key)
    out = {k: v for k, v in rec.items() if k not in {src for _, src in pairs}}
    out.update(taken)
    return out


CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


def _check_messages(v) -> None:
    """A chat list a template renders as meant: a chat template renders (or drops) a misspelt
    role without complaint, and a conversation without a user turn has no prompt to record."""
    if not isinstance(v, list) or not v:
        raise DataError("must be a non-empty list of {role, content} objects with string values",
                        field="messages")
    for i, m in enumerate(v):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            raise DataError(f"message {i} must be a {{role, content}} object with string values, "
                            f"got {m!r:.60}", field="messages")
        if m["role"] not in CHAT_ROLES:
            raise DataError(f"message {i} has unknown role {m['role'][:40]!r} (roles: "
                            f"{', '.join(CHAT_ROLES)})", field="messages")
    if not any(m["role"] == "user" for m in v):
        raise DataError("has no user turn", field="messages")


def missing(rec: dict, key: str) -> DataError:
    """A missing id/prompt/answer, with the record's own fields and the flag that maps one."""
    return DataError(f"missing required field (the record has: {_fields_of(rec)}; --{key}-field "
                     "NAME reads it from another field)", field=key)


def _fields_of(rec: dict) -> str:
    return ", ".join(list(rec)[:8]) + (", ..." if len(rec) > 8 else "") if rec else "none"


def check_prompt_record(rec: dict) -> None:
    """Raise DataError naming the field when a prompt record lacks ``id`` or a prompt (a
    ``prompt`` string, or chat ``messages`` passed to the chat template as they are)."""
    if not isinstance(rec, dict):
        raise DataError(f"record must be an object, got {type(rec).__name__}")
    if "id" not in rec:
        raise missing(rec, "id")
    pid = rec["id"]
    if isinstance(pid, bool) or not isinstance(pid, (str, int)):
        raise DataError(f"must be a string or integer, got {type(pid).__name__}", field="id")
    if "prompt" not in rec and "messages" in rec:
        _check_messages(rec["messages"])
        return
    if "prompt" not in rec:
        raise missing(rec, "prompt")
    if not isinstance(rec["prompt"], str):
        raise DataError(f"must be a string, got {type(rec['prompt']).__name__}", field="prompt")


def prompt_text(rec: dict) -> str:
    """The prompt as rollouts record it (for chat records: the last user turn)."""
    if "prompt" in rec:
        return rec["prompt"]
    return next((m["content"] for m in reversed(rec["messages"]) if m["role"] == "user"), "")


def resolve_template(template: str | None) -> str:
    """A preset name or a custom template; a custom one must contain ``{prompt}``."""
    if template in (None, "auto"):
        return "auto"
    if template in PROMPT_TEMPLATES:
        return PROMPT_TEMPLATES[template]
    if "{prompt}" not in template:
        raise UsageError(f"--prompt-template must be one of auto, {', '.join(PROMPT_TEMPLATES)} "
                         "or contain the placeholder {prompt}")
    return template


def choice_options(v) -> dict[str, str] | None:
    """A record's ``choices`` as letter -> text, for the prompt and the verifier alike: an object
    as it is, a list as A, B, C, ...; anything else is bad data."""
    if v is None:
        return None
    if isinstance(v, list):
        if len(v) > 26:
            raise DataError("a list of choices has at most 26 options", field="choices")
        v = {chr(65 + i): x for i, x in enumerate(v)}
    if not isinstance(v, dict) or not all(
            isinstance(x, (str, int, float)) and not isinstance(x, bool) for x in v.values()):
        raise DataError("must be an object mapping letters to option texts (or a list of option "
                        "texts)", field="choices")
    return {str(k): str(x) for k, x in v.items()}


def format_choices(choices) -> str:
    """The options as the {choices} placeholder shows them, one ``A. text`` line each."""
    options = choice_options(choices)
    if not options:
        raise DataError("missing: the template shows {choices}", field="choices")
    return "\n".join(f"{k}. {v}" for k, v in options.items())


def template_name(rec: dict, template: str) -> str:
    """What rollouts record as ``prompt_template``: a preset's name (auto resolved per record)
    or the custom template itself, so that ``verify --task auto`` knows what was asked for."""
    if template in (None, "auto"):
        return "choice" if rec.get("choices") else "boxed"
    return template


def render_prompt(rec: dict, template: str) -> str:
    """Fill a resolved template; plain replacement, so braces elsewhere (``\\boxed{}``) stay as is."""
    if template == "auto":
        template = CHOICE if rec.get("choices") else BOXED
    if "{choices}" in template:
        choices = format_choices(rec.get("choices"))
    else:
        check_choices_shown(rec, template)
        choices = ""
    return _PLACEHOLDER.sub(lambda m: rec["prompt"] if m.group(1) == "prompt" else choices, template)


def check_choices_shown(rec: dict, template: str) -> None:
    """A multiple-choice record whose options the prompt never shows is answered blind and scored
    as if it were not (a checkpoint trained with ``boxed`` evaluated on medqa): refused, unless
    the prompt text already holds every option."""
    choices = choice_options(rec.get("choices"))
    if not choices or all(v in rec["prompt"] for v in choices.values()):
        return
    name = next((k for k, v in PROMPT_TEMPLATES.items() if v == template), "custom")
    raise UsageError(f"prompt {rec.get('id')!r} has choices, but the prompt template ({name}) "
                     "does not show them: give --prompt-template choice (or auto), or a template "
                     "with {choices}")


def prompt_messages(rec: dict, template: str) -> list[dict]:
    """The chat turns: a record's own ``messages`` as they are, else one user turn holding the
    prompt filled into the template."""
    if "prompt" not in rec:
        return rec["messages"]
    return [{"role": "user", "content": render_prompt(rec, template)}]


def encode_prompt(tokenizer, messages: list[dict], chat_template: bool | None = None) -> list[int]:
    """Token ids of the prompt, through the tokenizer's chat template when it has one (or forced);
    without a chat template only a single user turn can be encoded."""
    has = getattr(tokenizer, "chat_template", None) is not None
    if chat_template is None:
        chat_template = has
    if chat_template:
        if not has:
            raise UsageError("--chat-template: the tokenizer has no chat template")
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=False)
        return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    if len(messages) != 1 or messages[0]["role"] != "user":
        raise DataError("a conversation needs a chat template (this tokenizer has none, or "
                        "--no-chat-template was given)", field="messages")
    return list(tokenizer(messages[0]["content"], add_special_tokens=True)["input_ids"])



def source_field(e: DataError, fields=None) -> DataError:
    """Name the user's field in an error about a mapped one (``--prompt-field question``)."""
    if fields is not None and e.field in ("id", "prompt", "answer"):
        e.field = getattr(fields, f"{e.field}_field")
    return e


def spread(n: int, limit: int | None) -> list[int]:
    """The rows ``--limit`` keeps of ``n``: ``limit`` evenly spaced ones, row ``i * n // limit``
    for i = 0 .. limit-1 (the first row always), so that a file sorted by subject or difficulty
    is sampled across it, the same rows on every run and every seed; all rows when ``limit`` is
    None or at least ``n``."""
    if not limit or limit >= n:
        return list(range(n))
    return [i * n // limit for i in range(limit)]


def read_prompts(path: str, limit: int | None = None, fields=None,
                 origin: dict | None = None, standard: bool = False) -> list[dict]:
    """Prompt records with answers, validated here so later stages never see a bad one: every
    error names this file and line (missing/ill-typed id, prompt or answer, a repeated id).
    ``path`` may name a shipped benchmark; ``limit`` keeps that many rows spread over the file
    (:func:`spread`; every row is still read and checked); ``fields`` (PromptOptions) maps another
    schema's field names (``standard``: see :func:`map_fields`); ``origin`` gets ``id(record)``
    -> (file, line), for errors found later."""
    from tcli.io import RecordReader, SeenKeys, resolve_data

    if not path:
        raise UsageError("no prompt file given (train_data / eval_data)")
    read = []
    seen = SeenKeys()
    reader = RecordReader(resolve_data(path))
    for line, rec in reader:
        try:
            rec = map_fields(rec, fields, standard)
            check_prompt_record(rec)
            if "answer" not in rec:
                raise missing(rec, "answer")
            if isinstance(rec["answer"], bool) or not isinstance(rec["answer"], (str, int, float)):
                raise DataError(f"must be a string or number, got {type(rec['answer']).__name__}",
                                field="answer")
            if not seen.add(rec["id"]):
                raise DataError(f"prompt id {rec['id']!r} appears twice", field="id")
        except DataError as e:
            raise source_field(e, fields).located(reader.name, line) from None
        read.append((line, rec))
    if not read:
        raise DataError("holds no records: no prompts to sample", file=reader.name)
    out = []
    for line, rec in (read[i] for i in spread(len(read), limit)):
        out.append(rec)
        if origin is not None:
            origin[id(rec)] = (reader.name, line)
    return out
