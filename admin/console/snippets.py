"""Copy-ready client code for a new wallet token: each SDK pointed at the gateway, with the
token where the SDK puts its key. Pure: the token page renders what this returns.

The base URLs are the ones the README's "The gateway" section documents and tests/test_sdks.py
drives with the real SDKs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

# A request worth trying first, per built-in service (a path on the gateway after the slug).
TRY_PATHS: Final = {
    "openai": "/v1/models",
    "stripe": "/v1/customers",
    "googlemaps": "/maps/api/geocode/json?address=Paris",
    "openweather": "/data/2.5/weather?q=Paris",
}


@dataclass(frozen=True)
class Snippet:
    id: str  # the element id on the page, e.g. "snippet-openai"
    label: str
    code: str


def openai(gateway: str, token: str) -> str:
    return (
        "from openai import OpenAI\n\n"
        f'client = OpenAI(base_url="{gateway}/openai/v1", api_key="{token}")\n'
        "client.models.list()"
    )


def stripe(gateway: str, token: str) -> str:
    return (
        "import stripe\n\n"
        "client = stripe.StripeClient(\n"
        f'    "{token}", base_addresses={{"api": "{gateway}/stripe"}}\n'
        ")\n"
        "client.customers.list()"
    )


def googlemaps(gateway: str, token: str) -> str:
    return (
        "import googlemaps\n\n"
        f'gmaps = googlemaps.Client(key="{token}", base_url="{gateway}/googlemaps")\n'
        'gmaps.geocode("1600 Amphitheatre Parkway")'
    )


def curl(gateway: str, token: str, services: Sequence[str]) -> str:
    """One request per service in the token's scope, the token in `X-Wallet-Token` (which
    every service accepts, whatever its own key slot)."""
    return "\n".join(
        f'curl "{gateway}/{slug}{TRY_PATHS.get(slug, "/")}" -H "X-Wallet-Token: {token}"'
        for slug in services
    )


def for_token(gateway_url: str, token: str, services: Sequence[str]) -> list[Snippet]:
    """The snippets for the SDKs of the services the token may use, and always curl."""
    gateway = gateway_url.rstrip("/")
    found = []
    if "openai" in services:
        found.append(Snippet("snippet-openai", "OpenAI (Python SDK)", openai(gateway, token)))
    if "stripe" in services:
        found.append(Snippet("snippet-stripe", "Stripe (Python SDK)", stripe(gateway, token)))
    if "googlemaps" in services:
        found.append(
            Snippet("snippet-googlemaps", "Google Maps (Python SDK)", googlemaps(gateway, token))
        )
    found.append(Snippet("snippet-curl", "curl", curl(gateway, token, services)))
    return found
