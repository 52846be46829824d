"""experiments/streameval/run.py: the generator (lines, questions, answers), the scorer, and the loop,
on a tiny stream answered by fake models: one that remembers everything, one that is always wrong,
and one with a bounded memory (the last N characters), which must lose exactly the lines it evicted.
"""
import csv
import importlib.util
import re

import pytest

from conftest import REPO

spec = importlib.util.spec_from_file_location("streameval", REPO / "experiments" / "streameval" / "run.py")
se = importlib.util.module_from_spec(spec)
spec.loader.exec_module(se)


class FakeChat:
    """Characters stand in for tokens. It reads the question's name and looks the line up in the
    text it still remembers (everything, or the last `memory` characters); `wrong` adds one."""

    def __init__(self, memory=None, wrong=False):
        self.text, self.memory, self.wrong = "", memory, wrong

    def ask(self, user, marks):
        start = len(self.text)
        self.text += user
        seen = self.text if self.memory is None else self.text[-self.memory:]
        reply = "I do not know."
        asked = re.search(r"in line (\S+)\?", user)
        if asked:
            found = re.search(rf"line {re.escape(asked.group(1))}: REGISTER_CONTENT is <(\d+)>", seen)
            if found:
                reply = f"The <REGISTER_CONTENT> in line {asked.group(1)} is <{int(found.group(1)) + self.wrong}>."
        self.text += reply
        return reply, [start + m for m in marks], start + len(user)


def test_lines_are_deterministic_distinct_and_prefix_stable():
    a, b = se.make_lines(3, 40), se.make_lines(3, 90)
    assert a == b[:40] and se.make_lines(4, 40) != a
    assert len({line.name for line in b}) == 90
    assert all(10000 <= line.value <= 99999 and re.fullmatch(r"[a-z]+-[a-z]+", line.name) for line in b)
    assert a[0].text() == f"line {a[0].name}: REGISTER_CONTENT is <{a[0].value}>"


@pytest.mark.parametrize("distance, asked", [(0, [9, 19, 29]), (3, [6, 16, 26]), (10, [9, 19, 29]),
                                             (20, [9, 19, 29])])
def test_a_question_every_10_lines_a_fixed_distance_back(distance, asked):
    turns = se.schedule(distance, 3)
    assert [t.first for t in turns] == list(range(0, 10 * len(turns), 10))
    assert [t.asked for t in turns if t.asked is not None] == asked
    assert all(t.first + 9 - t.asked == distance for t in turns if t.asked is not None)
    assert len(turns) == 3 + distance // 10                     # the first turns have no line that far back
    lines = se.make_lines(0, 10 * len(turns))
    text, starts = se.user_message(lines, turns[-1])
    assert text.splitlines()[:10] == [lines[i].text() for i in range(turns[-1].first, turns[-1].first + 10)]
    assert text.endswith(f"line {lines[asked[-1]].name}? I need the number.")
    assert all(text[s:].startswith("line ") for s in starts) and len(starts) == 10


def test_scorer_is_exact_match_of_the_first_number():
    assert se.correct("The <REGISTER_CONTENT> in line a-b is <12345>.", 12345)
    assert se.correct("12345", 12345) and not se.correct("1234", 12345)
    assert not se.correct("It is 99999, or 12345.", 12345)        # the first number counts
    assert not se.correct("I do not know.", 12345)


@pytest.mark.parametrize("distance", [0, 3, 10])
def test_perfect_and_wrong_models(distance, tmp_path):
    turns = se.schedule(distance, 4)
    lines = se.make_lines(1, 10 * len(turns))
    right = se.evaluate(FakeChat(), lines, turns)
    wrong = se.evaluate(FakeChat(wrong=True), lines, turns)
    assert [r["correct"] for r in right] == [1] * 4 and [r["correct"] for r in wrong] == [0] * 4
    assert [r["answer"] for r in right] == [lines[t.asked].value for t in turns if t.asked is not None]
    for r in right:  # characters from the asked line to the end of the question: its own text at least
        assert r["distance_lines"] == distance and r["distance_tokens"] > len(lines[r["line"]].text())
    rows = [{"policy": "perfect", "cache": "all", **r} for r in right] + \
           [{"policy": "wrong", "cache": "all", **r} for r in wrong]
    se.write_results(tmp_path, rows, "CMD", "note")
    md = (tmp_path / "results.md").read_text()
    assert f"| {distance} |" in md and "| 100% | 0% |" in md
    assert len(list(csv.DictReader((tmp_path / "results.csv").open()))) == 8


def test_a_bounded_memory_loses_exactly_what_it_evicted():
    memory = 400   # characters: a few lines
    for distance in (0, 1, 3, 10):
        turns = se.schedule(distance, 5)
        rows = se.evaluate(FakeChat(memory=memory), se.make_lines(2, 10 * len(turns)), turns)
        for r in rows:   # the asked line is remembered iff all of it is within the last `memory` characters
            assert r["correct"] == int(r["distance_tokens"] <= memory), r
    near = se.evaluate(FakeChat(memory=memory), se.make_lines(2, 50), se.schedule(0, 5))
    far = se.evaluate(FakeChat(memory=memory), se.make_lines(2, 60), se.schedule(10, 5))
    assert all(r["correct"] for r in near) and not any(r["correct"] for r in far)


def test_policy_labels():
    assert se.parse_policy("sink 4+60") == ("sink 4+60", "sink", 4, 60)
    assert se.parse_policy(" window  64") == ("window 64", "window", 0, 64)
    assert se.parse_policy("dense")[1] == "dense" and se.cache_of("sink 4+252") == "256"
    with pytest.raises(ValueError):
        se.parse_policy("sink 4")


def test_lines_tokenized_piecewise_as_whole(smollm2):
    # ModelChat cuts each turn where its lines start, to know each line's first token; with the
    # byte-level BPE a cut just after a newline changes nothing
    from minisink.text.chat import TemplateTurns, encode_rendered, read_chat_template
    from minisink.text.tokenizer import load_tokenizer
    tok, turns = load_tokenizer(smollm2), TemplateTurns(read_chat_template(smollm2))
    lines = se.make_lines(0, 10)
    user, starts = se.user_message(lines, se.schedule(0, 1)[0])
    text = turns.turn_text(user)
    cuts = [0, *(text.index(user) + s for s in starts), len(text)]
    pieces = [i for a, b in zip(cuts, cuts[1:]) for i in encode_rendered(tok, text[a:b])]
    assert pieces == encode_rendered(tok, text)
