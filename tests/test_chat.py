"""minisink.text.chat against transformers' apply_chat_template, on real chat templates (tests/data/chat_templates.json
says where each comes from), and the per-turn feeding of a whole-conversation template."""
import json
from pathlib import Path

import pytest

from conftest import ASSETS, need_assets
from minisink.text.chat import ChatTemplate, ChatTemplateError, TemplateTurns, encode_rendered, read_chat_template

CASES = json.loads((Path(__file__).parent / "data" / "chat_templates.json").read_text(encoding="utf-8"))["templates"]
NAMES = [c["name"] for c in CASES]
SYSTEM = {"role": "system", "content": "You are terse.  "}
TALK = [{"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "  What is 2+2? Ünïcode ✓ <b>&  "},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "Thanks."}]
CONVERSATIONS = {"one turn": TALK[:1], "three turns": TALK[:3], "ends with a reply": TALK[:4], "five": TALK}


@pytest.fixture(scope="module")
def hf_tokenizer():
    """transformers' tokenizer object, only for its apply_chat_template (the vocabulary does not matter)."""
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(need_assets(ASSETS / "tokenizers" / "llama3" / "tokenizer.json")))


def apply_chat_template(tok, case, messages, **kwargs):
    tok.bos_token, tok.eos_token = case["bos_token"], case["eos_token"]
    return tok.apply_chat_template(messages, chat_template=case["template"], tokenize=False, **kwargs)


def ours(case) -> ChatTemplate:
    return ChatTemplate(case["template"], {"bos_token": case["bos_token"], "eos_token": case["eos_token"]})


def test_at_least_five_real_templates():
    assert len(CASES) >= 5 and all(c["source"] for c in CASES)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("system", [False, True])
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_renders_as_transformers_does(hf_tokenizer, name, conversation, system, generation_prompt):
    case = CASES[NAMES.index(name)]
    messages = ([SYSTEM] if system else []) + CONVERSATIONS[conversation]
    extra = {"date_string": "26 Jul 2024"} if "llama-3" in name else {}  # else: today's date
    if system and not case["system"]:  # the template refuses it, with the same message
        with pytest.raises(Exception) as theirs:
            apply_chat_template(hf_tokenizer, case, messages, add_generation_prompt=generation_prompt, **extra)
        with pytest.raises(ChatTemplateError) as mine:
            ours(case).render(messages, add_generation_prompt=generation_prompt, **extra)
        assert str(mine.value).endswith(str(theirs.value)) and "must alternate" in str(mine.value)
        return
    want = apply_chat_template(hf_tokenizer, case, messages, add_generation_prompt=generation_prompt, **extra)
    assert ours(case).render(messages, add_generation_prompt=generation_prompt, **extra) == want


def test_strftime_now_and_tojson(hf_tokenizer):
    """Llama 3.2 dates its system header with strftime_now; tools go through tojson (no HTML escaping)."""
    case = CASES[NAMES.index("llama-3.2-instruct")]
    tools = [{"type": "function", "function": {"name": "add", "description": "a < b & c",
                                               "parameters": {"type": "object", "properties": {}}}}]
    want = apply_chat_template(hf_tokenizer, case, TALK[:1], add_generation_prompt=True, tools=tools)
    assert ours(case).render(TALK[:1], add_generation_prompt=True, tools=tools) == want
    assert "a < b & c" in want and "Today Date: " in want


def test_roles_must_alternate():
    case = CASES[NAMES.index("llama-2-chat")]
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate"):
        ours(case).render([TALK[0], TALK[0]])


def test_the_sandbox_refuses_python_internals():
    template = ChatTemplate("{{ messages.__class__.__mro__ }}", {})
    with pytest.raises(Exception, match="unsafe|access to attribute"):
        template.render([])


# --------------------------------------------------------------------------------- reading it from a folder

def test_read_from_tokenizer_config_string_list_and_jinja_file(tmp_path):
    assert read_chat_template(tmp_path) is None
    config = {"bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>", "chat_template": "A{{ bos_token }}"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert read_chat_template(tmp_path).render([]) == "A<s>"
    config["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ eos_token }}"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert read_chat_template(tmp_path).render([]) == "D</s>"
    (tmp_path / "chat_template.jinja").write_text("J")
    assert read_chat_template(tmp_path).render([]) == "J"


def test_unreadable_templates_are_named(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "rag", "template": "R"}]}))
    with pytest.raises(ChatTemplateError, match="lists \\['rag'\\] but no 'default'"):
        read_chat_template(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{% if %}")
    with pytest.raises(ChatTemplateError, match="chat_template.jinja: not a valid Jinja template"):
        read_chat_template(tmp_path)


# --------------------------------------------------------------------------------- turn by turn

# These write a reply with a space before it (Llama-2 strips it and adds " " either side), which a
# model says as part of its first token: the text differs, the tokens fed are what the model said.
SPACED_REPLIES = {"llama-2-chat", "mistral-instruct-v1-system"}


@pytest.mark.parametrize("name", [n for n in NAMES if n not in SPACED_REPLIES])
def test_turns_fed_one_by_one_are_the_whole_conversation(name):
    """A model that answers exactly what the conversation says, then its stop token: what the stream
    was fed, turn by turn, is the template's rendering of the whole conversation."""
    case = CASES[NAMES.index(name)]
    template = ours(case)
    extra = {"date_string": "26 Jul 2024"} if "llama-3" in name else {}
    template.render = lambda messages, add_generation_prompt=False, r=template.render: r(messages, add_generation_prompt, **extra)
    turns, fed = TemplateTurns(template), ""
    for user, reply in [(TALK[0], TALK[1]), (TALK[2], TALK[3])]:
        fed += turns.turn_text(user["content"])
        stop = case["eos_token"]
        fed += reply["content"] + stop + turns.replied(reply["content"], stop)
    fed += turns.turn_text(TALK[4]["content"])
    assert fed == template.render(TALK, add_generation_prompt=True)


def test_llama2_turns_and_a_reply_cut_short():
    case = CASES[NAMES.index("llama-2-chat")]
    turns = TemplateTurns(ours(case))
    assert turns.turn_text("Hi") == "<s>[INST] Hi [/INST]"
    assert turns.replied(" Hello", None) == "</s>"  # cut off by --max-new-tokens: close the exchange
    assert turns.turn_text("Again") == "<s>[INST] Again [/INST]"


def test_encode_rendered_makes_bos_and_eos_tokens():
    tok = pytest.importorskip("minisink.text.tokenizer").load_tokenizer(need_assets(ASSETS / "tokenizers" / "llama2"))
    assert encode_rendered(tok, "<s>[INST] Hi [/INST] Yo</s>") == [1, *tok.encode("[INST] Hi [/INST] Yo"), 2]
    assert tok.encode("<s>") != [1]  # typed by a user it stays text
