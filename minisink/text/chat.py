"""The checkpoint's own chat template, rendered as transformers' apply_chat_template renders it.

Chat checkpoints ship a Jinja template that turns a whole conversation into the text the model was
fine-tuned on: `chat_template` in tokenizer_config.json (a string, or a list of {"name", "template"}),
or a chat_template.jinja file beside it. It is rendered here with jinja2's sandbox (a template from
the hub is untrusted code) and the same environment transformers gives it: trim_blocks,
lstrip_blocks, the loop controls, `raise_exception`, `strftime_now`, a `tojson` that does not escape
HTML, and the variables messages, add_generation_prompt, bos_token, eos_token (and the other special
tokens that tokenizer_config.json names).

    template = read_chat_template(folder)           # None when the checkpoint has none
    text = template.render(messages, add_generation_prompt=True)

A template describes a whole conversation; a stream feeds each turn once (the cache keeps the rest),
so `TemplateTurns` turns one into the other, see its docstring.
"""
import json
import re
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """A chat template that cannot be read or rendered; the message names the file and the problem."""


class _Generation(jinja2.ext.Extension):
    """{% generation %}...{% endgeneration %} marks the assistant's text for training masks in
    transformers; when rendering it is just its content."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_content"), [], [], body).set_lineno(lineno)

    def _content(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja2's own tojson escapes <, >, & and ' for HTML, which would change the prompt
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    return env


class ChatTemplate:
    """One Jinja chat template and the special tokens it is given."""

    def __init__(self, source: str, special_tokens: dict[str, str], where: str = "chat template"):
        self.source, self.special_tokens, self.where = source, special_tokens, where
        try:
            self._template = environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"{where}: not a valid Jinja template (line {e.lineno}: {e.message})") from None

    def writes_bos(self) -> bool:
        """Does a conversation start with the BOS text? (Llama, Mistral: then the stream must not add one.)"""
        bos = self.special_tokens.get("bos_token")
        return bool(bos) and self.render([{"role": "user", "content": "x"}], add_generation_prompt=True).startswith(bos)

    def render(self, messages: list[dict], add_generation_prompt: bool = False, **extra) -> str:
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self.special_tokens, **extra)
        except jinja2.TemplateError as e:  # raise_exception(...) in the template, or a bad expression
            raise ChatTemplateError(f"{self.where}: {e}") from None


def read_chat_template(folder) -> ChatTemplate | None:
    """The chat template a model folder ships, or None.

    chat_template.jinja wins over tokenizer_config.json's `chat_template` (transformers saves it
    there since v4.50). Of a list of named templates, the one named "default" is the chat template.
    """
    folder = Path(folder)
    config_path = folder / "tokenizer_config.json"
    config = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ChatTemplateError(f"{config_path}: not valid JSON ({e})") from None
    special = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        token = config.get(name)
        if isinstance(token, dict):  # a serialized AddedToken: {"content": "<s>", ...}
            token = token.get("content")
        if isinstance(token, str):
            special[name] = token
    jinja_path = folder / "chat_template.jinja"
    if jinja_path.is_file():
        return ChatTemplate(jinja_path.read_text(encoding="utf-8"), special, str(jinja_path))
    source = config.get("chat_template")
    if isinstance(source, list):  # [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        if "default" not in named:
            raise ChatTemplateError(f"{config_path}: chat_template lists {sorted(map(str, named))} but no 'default'")
        source = named["default"]
    if source is None:
        return None
    if not isinstance(source, str):
        raise ChatTemplateError(f"{config_path}: chat_template is neither a string nor a list of named templates")
    return ChatTemplate(source, special, f"{config_path} chat_template")


def encode_rendered(tokenizer, text: str) -> list[int]:
    """Ids of text that a template rendered, as transformers tokenizes it (add_special_tokens=False):
    the BOS and EOS strings the template wrote ("<s>", "</s>") become those tokens. minisink's
    SentencePiece encode reads them as plain characters, on purpose, for text a user types; here the
    template put them. (The BPE tokenizer finds its added tokens, <|im_start|> etc., by itself.)"""
    specials = {tokenizer.id_to_piece(i): i for i in (tokenizer.bos_id, tokenizer.eos_id) if i is not None}
    if not specials:
        return tokenizer.encode(text)
    pattern = "(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")"
    ids = []
    for i, piece in enumerate(re.split(pattern, text)):
        if i % 2:  # a separator: one of the special strings
            ids.append(specials[piece])
        elif piece:
            ids += tokenizer.encode(piece)
    return ids


class TemplateTurns:
    """A whole-conversation template, fed one turn at a time into a stream whose cache persists.

    Each turn feeds the difference between two renderings: the conversation so far (its last
    assistant message included, no generation prompt) and the conversation with the new user message
    and the generation prompt. What the model said in between is in the cache already, as it said it.

    The template's own version of a reply may carry more than the model generated: after the stop
    token, ChatML writes "\\n" and Zephyr (TinyLlama-Chat) "\\n" too. `replied` returns that rest,
    found after the stop token's text in the rendered reply, to be fed at once; and when the reply
    was cut off before the model stopped, the stop token as well. Templates whose earlier rendering
    is not a prefix of the later one (a template that rewrites the past) are refused: a stream
    cannot take tokens back.
    """

    stop = ()  # the replies end at the tokenizer's EOS, which the template names itself

    def __init__(self, template: ChatTemplate):
        self.template = template
        self.messages: list[dict] = []
        self.rendered = ""  # the conversation so far, as the template writes it
        self.prompt = ""    # the rendering that ends with this turn's generation prompt

    def turn_text(self, user: str) -> str:
        """The text to feed for a new user message."""
        self.messages.append({"role": "user", "content": user})
        self.prompt = self.template.render(self.messages, add_generation_prompt=True)
        if not self.prompt.startswith(self.rendered):
            raise ChatTemplateError(f"{self.template.where}: rendering the conversation with a new turn changes "
                                    "its earlier text, which a stream cannot take back: pass --template NAME")
        return self.prompt[len(self.rendered):]

    def turn_ids(self, tokenizer, user: str, first: bool = False) -> list[int]:
        return encode_rendered(tokenizer, self.turn_text(user))

    def replied(self, reply: str, stop_text: str | None, eos_text: str | None = None) -> str:
        """Record the model's reply; returns the text the template puts after it that was not fed
        yet. `stop_text`: the text of the stop token the reply ended with (None: it was cut off, and
        the template's EOS closes it; `eos_text`, the tokenizer's, when tokenizer_config names none)."""
        self.messages.append({"role": "assistant", "content": reply})
        rendered = self.template.render(self.messages)
        closing = rendered[len(self.prompt):] if rendered.startswith(self.prompt) else ""
        self.rendered = rendered
        marker = stop_text or self.template.special_tokens.get("eos_token") or eos_text
        if not marker or marker not in closing:
            return ""
        rest = closing[closing.index(marker) + len(marker):]
        return rest if stop_text else marker + rest
