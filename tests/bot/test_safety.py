"""The prompt filter: tricks are caught, innocent words pass, the allow list wins, nothing raises."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.config import SafetyConfig
from bot.safety import (
    REFUSAL,
    PromptFilter,
    build_prompt_filter,
    check_prompt,
    default_lists,
    fold,
    load_word_list,
    nsfw_hold_reason,
    parse_term,
)
from inference.shapes.grammar import all_words, sample_prompt


@pytest.fixture(scope="module")
def pf() -> PromptFilter:
    return PromptFilter((), ())


CAUGHT = [
    "a nude woman on a beach",
    "NUDE",
    "Nüde portrait",  # accents
    "(nude)!!!",  # punctuation at the edges
    "porno star",  # prefix entry porn*
    "pornography",
    # leetspeak
    "s3x", "a s3xy lady", "$lut", "a$$", "p0rn", "s1ut", "n4ked", "h3nt4i", "b00bs", "t!ts",
    # spacing and punctuation inside the word
    "n u d e", "n.u.d.e", "n-u-d-e", "n_u_d_e", "n . u . d . e", "draw a n u d e woman", "s 3 x", "nu-de", "na.ked",
    "p o r n o g r a p h y",
    # stretched
    "nuuude", "nuude", "boooobs", "seeexy", "n u u d e",
    # zero-width, soft hyphen, bidi, invisible fillers
    "nu\u200bde", "n\u200cu\u200dd\u2060e", "nu\u00adde", "\u202enude\u202c", "nu\ufeffde", "nu\u3164de",
    # homoglyphs: Cyrillic, Greek, Armenian, small capitals, full-width, maths, enclosed
    "nаked", "nakеd", "ѕех", "ΝAKED", "NАKЕD", "nսde", "ᴘᴏʀɴ", "ｎｕｄｅ", "𝐧𝐮𝐝𝐞", "𝓷𝓾𝓭𝓮", "ⓝⓤⓓⓔ", "🅽🆄🅳🅴", "NUDE\u0301",
    # multi-word phrases, also across punctuation
    "a woman with no clothes", "blow job", "blow-job", "blowjob", "rule 34 of anything", "Rule34",
    # slurs
    "n1gger", "f@ggot",
]


@pytest.mark.parametrize("text", CAUGHT)
def test_tricks_are_caught(pf: PromptFilter, text: str) -> None:
    r = pf.check(text)
    assert not r.allowed, f"{text!r} passed"
    assert r.reason == REFUSAL and r.matched


INNOCENT = [
    # the Scunthorpe problem: a listed word inside an innocent one
    "Scunthorpe", "Sussex", "Essex", "Middlesex", "a cocktail party", "an assassin in the night", "therapist",
    "grape", "analysis", "classic bass guitar", "passage", "Penistone", "arsenal", "cumulus clouds", "hancock",
    "Dickens", "title", "tilts", "shitake mushrooms", "class", "assessment", "specialist", "pussywillow",
    "raccoon", "skunk", "manuscript", "document", "Matsushita", "butter", "hello", "Spice Girls",
    # allow-list phrases that contain a listed word
    "magna cum laude", "a blue tit on a branch", "great tits in the snow", "a pussy cat", "cock-a-doodle-doo",
    "Moby Dick", "a chink in the armour", "paint stripper", "kaffir lime leaves",
    # ordinary prompts, numbers, other scripts
    "an astronaut riding a horse on the moon, 4k, trending on artstation", "a 3d render of a cat", "1984",
    "455 bus to London", "the number 69", "日本語のプロンプト", "кошка на луне", "a red circle on the left",
    "", "!!!", "a b c d e f g",
]


@pytest.mark.parametrize("text", INNOCENT)
def test_innocent_prompts_pass(pf: PromptFilter, text: str) -> None:
    r = pf.check(text)
    assert r.allowed, f"{text!r} refused (matched {r.matched!r})"


def test_every_shapes_world_word_and_prompt_passes(pf: PromptFilter) -> None:
    assert [w for w in all_words() if not pf.check(w).allowed] == []
    rng = np.random.default_rng(0)
    prompts = [sample_prompt(rng, held_out="include") for _ in range(300)]
    assert [p for p in prompts if not pf.check(p).allowed] == []


def test_allow_list_wins_over_deny_list() -> None:
    f = PromptFilter(deny=["ass*", "sexy"], allow=["assassin", "sexy"], use_default_list=False)
    assert f.check("an assassin").allowed  # the allow entry covers the word the prefix matched
    assert not f.check("assorted").allowed  # the prefix still works elsewhere
    assert f.check("a sexy car").allowed  # an operator can lift a default-style entry
    assert f.check("s e x y").allowed  # also when spelled out
    # a phrase allows only where it covers the match
    g = PromptFilter(deny=["cum"], allow=["magna cum laude"], use_default_list=False)
    assert g.check("graduated magna cum laude").allowed
    assert not g.check("cum laude magna cum").allowed


def test_configured_lists_and_defaults() -> None:
    only_mine = PromptFilter(deny=["zorblax", "evil clown*"], use_default_list=False)
    assert not only_mine.check("a Z0RBLAX on a hill").allowed
    assert not only_mine.check("evil clowns at a party").allowed
    assert only_mine.check("a nude statue").allowed  # the default list is off
    with_defaults = PromptFilter(deny=["zorblax"])
    assert not with_defaults.check("nude").allowed and not with_defaults.check("zorblax").allowed


def test_refusal_is_polite_and_does_not_echo_the_word(pf: PromptFilter) -> None:
    r = pf.check("a naked man")
    assert r.matched == "naked"
    assert "naked" not in r.reason.lower() and r.reason.startswith("Sorry")
    assert check_prompt(pf, "a naked man") == REFUSAL
    assert check_prompt(pf, "a red circle") is None
    assert check_prompt(None, "a naked man") is None  # filtering switched off


def test_build_from_config() -> None:
    assert build_prompt_filter(SafetyConfig(prompt_filter=False)) is None
    f = build_prompt_filter(SafetyConfig(deny=("zorblax",), allow=("sexy",)))
    assert f is not None and not f.check("zorblax").allowed and f.check("sexy").allowed
    assert not f.check("porn").allowed
    bare = build_prompt_filter(SafetyConfig(use_default_list=False))
    assert bare is not None and bare.check("porn").allowed


def test_shipped_lists_parse() -> None:
    deny, allow = default_lists()
    assert len(deny) > 100 and len(allow) > 10
    for entry in (*deny, *allow):
        assert parse_term(entry) is not None, entry
    assert "nude" in deny and "magna cum laude" in allow


def test_word_list_file_format(tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "list.txt"
    p.write_text("# a comment\n\nfoo   # trailing comment\n  bar baz  \n", encoding="utf-8")
    assert load_word_list(p) == ["foo", "bar baz"]


def test_fold() -> None:
    assert fold("ＮＵ\u200bÐÉ") == "nuðe"  # full width, zero width, accent
    assert fold("Ѕех") == "sex"
    assert fold("a\tb\nc") == "a b c"


def test_nsfw_hold_reason_is_a_pure_policy() -> None:
    assert nsfw_hold_reason([], 0.8) is None
    assert nsfw_hold_reason([0.1, 0.79], 0.8) is None
    assert nsfw_hold_reason([0.1, 0.8], 0.8) == "NSFW score 0.80 >= threshold 0.80"
    assert nsfw_hold_reason([0.95], 0.2) == "NSFW score 0.95 >= threshold 0.20"
    # a classifier that returns nan (max() keeps a leading nan, and nan >= t is false) holds
    for scores in ([float("nan"), 0.99], [0.1, float("nan")], [float("inf")]):
        assert nsfw_hold_reason(scores, 0.8) is not None, scores


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_random_text_never_raises(text: str) -> None:
    f = _FILTER
    r = f.check(text)
    assert r.allowed or (r.reason == REFUSAL and r.matched)
    assert f.check(text) == r  # deterministic


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["nude", "porn", "naked", "hentai"]),
       st.lists(st.sampled_from(["\u200b", "\u200c", "\u2060", "\u00ad", "\ufeff"]), min_size=1, max_size=6),
       st.randoms(use_true_random=False))
def test_invisible_characters_anywhere_are_still_caught(word: str, junk: list[str], rnd) -> None:  # type: ignore[no-untyped-def]
    chars = list(word)
    for j in junk:
        chars.insert(rnd.randrange(len(chars) + 1), j)
    assert not _FILTER.check("a " + "".join(chars) + " picture").allowed


_FILTER = PromptFilter()
