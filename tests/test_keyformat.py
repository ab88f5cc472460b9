"""Key format detection (pure): which built-in service a pasted secret belongs to."""

from __future__ import annotations

import pytest

from gateway.keyformat import PATTERNS, candidates

STRIPE = [
    "sk_test_4eC39HqLyjWDarjtT1zdp7dc",
    "sk_live_51H8abcdefGHIJKLmnopQRstuv",
    "rk_test_51H8abcdefGHIJKL",
    "rk_live_0123456789",
]
OPENAI = [
    "sk-proj-" + "Ab3_-x" * 8,
    "sk-" + "T3BlbkFJ" * 6,
    "sk-svcacct-" + "abcDEF123_-" * 3,
    "sk-admin-" + "0123456789abcdef",
    "sk-" + "a" * 16,
]
GOOGLEMAPS = [
    "AIza" + "SyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY"[:35],
    "AIza" + "0" * 35,
    "AIza" + "_-Ab" * 8 + "xyz",
]
OPENWEATHER = ["0123456789abcdef0123456789abcdef", "f" * 32]


@pytest.mark.parametrize(
    ("secret", "service"),
    [(s, "stripe") for s in STRIPE]
    + [(s, "openai") for s in OPENAI]
    + [(s, "googlemaps") for s in GOOGLEMAPS]
    + [(s, "openweather") for s in OPENWEATHER],
)
def test_known_formats_have_exactly_one_candidate(secret: str, service: str) -> None:
    assert candidates(secret) == [service]


@pytest.mark.parametrize(
    "secret",
    [
        "",
        "hello",
        "not-a-key-at-all",
        # Anthropic keys look like OpenAI's but are not.
        "sk-ant-api03-" + "abcDEF123_-" * 8,
        "sk-ant-" + "a" * 40,
        # Stripe: publishable keys are not secrets; a body that is too short or has symbols.
        "pk_test_4eC39HqLyjWDarjtT1zdp7dc",
        "pk_live_4eC39HqLyjWDarjtT1zdp7dc",
        "sk_test_short",
        "sk_test_abc-def-ghij-klm",
        "sk_prod_4eC39HqLyjWDarjtT1zdp7dc",
        # OpenAI: too short, wrong separator.
        "sk-abc",
        "sk-" + "a" * 15,
        "sk:" + "a" * 40,
        # Google: one character short or long, wrong prefix case.
        "AIza" + "0" * 34,
        "AIza" + "0" * 36,
        "aiza" + "0" * 35,
        # OpenWeather: uppercase hex, 31 or 33 chars, non-hex.
        "0123456789ABCDEF0123456789ABCDEF",
        "f" * 31,
        "f" * 33,
        "g" * 32,
        # A key embedded in something else is not a key.
        "Bearer sk_test_4eC39HqLyjWDarjtT1zdp7dc",
        " sk_test_4eC39HqLyjWDarjtT1zdp7dc",
        "sk_test_4eC39HqLyjWDarjtT1zdp7dc extra",
        "xAIza" + "0" * 35,
        # `$` alone would accept a trailing newline.
        "sk_test_4eC39HqLyjWDarjtT1zdp7dc\n",
        "0123456789abcdef0123456789abcdef\n",
    ],
)
def test_unknown_strings_have_no_candidate(secret: str) -> None:
    assert candidates(secret) == []


def test_every_pattern_names_a_builtin_service() -> None:
    assert {service for _, service in PATTERNS} == {
        "stripe",
        "openai",
        "googlemaps",
        "openweather",
    }


def test_candidates_of_every_example_are_disjoint() -> None:
    examples = STRIPE + OPENAI + GOOGLEMAPS + OPENWEATHER
    assert all(len(candidates(e)) == 1 for e in examples)
