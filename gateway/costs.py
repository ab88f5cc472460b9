"""Cost models: what a request to a service costs, known before it is sent (a price per
call) or after its answer (token prices by model, from the response's `usage`).

A service's `cost_model` (admin API, `PUT /services/{slug}`):

    {"per_call": "0.002"}
    {"per_call": "0", "per_million_tokens": {"gpt-4o-mini": {"input": "0.15", "output": "0.60"},
                                             "*": {"input": "2.50", "output": "10.00"}},
     "hold": "0.05"}

Amounts are decimal strings (numbers are accepted) in the wallet's one currency. `hold` is
what a request is charged against budgets before its answer is known; the charge is then
settled to the real cost. No cost model: requests cost nothing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Final, NamedTuple

from gateway.errors import ValidationFailed

MAX_AMOUNT: Final = Decimal("1000000")
MAX_MODELS: Final = 200
MAX_MODEL_CHARS: Final = 128
PLACES: Final = 9  # nano-units: budgets are counted in integers of 1e-9


def money(amount: Decimal) -> str:
    """An amount as plain decimal text, without exponent or trailing zeros: "0.002", "100"."""
    text = format(amount.normalize(), "f")
    return text if text != "-0" else "0"


def amount(field: str, value: object, maximum: Decimal = MAX_AMOUNT) -> Decimal:
    """A money amount from JSON (a decimal string or a number): 0 to `maximum`, at most
    PLACES decimal places (the precision amounts are stored and counted with)."""
    message = 'must be a decimal amount such as "0.002"'
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValidationFailed(field, message)
    try:
        parsed = Decimal(str(value).strip())
    except InvalidOperation:
        raise ValidationFailed(field, message) from None
    if not parsed.is_finite() or not 0 <= parsed <= maximum:
        raise ValidationFailed(field, f"must be between 0 and {money(maximum)}")
    if parsed and parsed.normalize().as_tuple().exponent < -PLACES:  # type: ignore[operator]
        raise ValidationFailed(field, f"must have at most {PLACES} decimal places")
    return parsed


def validate_cost_model(value: object) -> dict[str, Any] | None:
    """A cost model as stored (amounts as canonical decimal strings), or None for none."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValidationFailed("cost_model", "must be an object or null")
    unknown = set(value) - {"per_call", "per_million_tokens", "hold"}
    if unknown:
        raise ValidationFailed("cost_model", f"unknown field {sorted(unknown)[0]!r}")
    model: dict[str, Any] = {}
    if "per_call" in value:
        model["per_call"] = money(amount("cost_model.per_call", value["per_call"]))
    tokens = value.get("per_million_tokens")
    if tokens is not None:
        if not isinstance(tokens, dict) or len(tokens) > MAX_MODELS:
            raise ValidationFailed(
                "cost_model.per_million_tokens",
                f"must be an object of at most {MAX_MODELS} models",
            )
        prices: dict[str, dict[str, str]] = {}
        for name, price in tokens.items():
            field = f"cost_model.per_million_tokens.{name}"[:200]
            if not name or len(name) > MAX_MODEL_CHARS:
                raise ValidationFailed("cost_model.per_million_tokens", "bad model name")
            if not isinstance(price, dict) or set(price) - {"input", "output"}:
                raise ValidationFailed(field, 'must be {"input": amount, "output": amount}')
            prices[name] = {
                part: money(amount(f"{field}.{part}", price.get(part, 0)))
                for part in ("input", "output")
            }
        model["per_million_tokens"] = prices
    if "hold" in value:
        model["hold"] = money(amount("cost_model.hold", value["hold"]))
    return model or None


HEAD_BYTES: Final = 4096  # the model's name comes early in OpenAI's bodies and events
TAIL_BYTES: Final = 64 * 1024  # `usage` comes last: in the body, or the final event
MODEL: Final = re.compile(rb'"model"\s*:\s*"([^"\\]{1,128})"')
USAGE: Final = re.compile(rb'"usage"\s*:\s*\{')
INPUT: Final = re.compile(rb'"(?:prompt_tokens|input_tokens)"\s*:\s*(\d{1,12})')
USAGE_BYTES: Final = 1024
OUTPUT: Final = re.compile(rb'"(?:completion_tokens|output_tokens)"\s*:\s*(\d{1,12})')


class Meter:
    """Watches a response body go by (whole or streamed, Server-Sent Events included) and
    keeps only its head and tail: enough to find the model and the last `usage` object
    without holding a long answer in memory."""

    __slots__ = ("_head", "_tail")

    def __init__(self) -> None:
        self._head = bytearray()
        self._tail = bytearray()

    def feed(self, chunk: bytes) -> None:
        if len(self._head) < HEAD_BYTES:
            self._head += chunk[: HEAD_BYTES - len(self._head)]
        self._tail += chunk
        if len(self._tail) > 2 * TAIL_BYTES:
            del self._tail[:-TAIL_BYTES]

    def usage(self) -> Usage | None:
        """The tokens the answer reports (its last `usage` object), or None without one."""
        tail = bytes(self._tail[-TAIL_BYTES:])
        starts = [m.end() for m in USAGE.finditer(tail)]
        ends = [*starts[1:], len(tail)]
        # The last usage that carries counts (a streamed answer's earlier events say `null`);
        # its counts sit within its first USAGE_BYTES (details objects nest inside it).
        for start, end in reversed(list(zip(starts, ends[: len(starts)], strict=True))):
            block = tail[start : min(end, start + USAGE_BYTES)]
            tokens_in, tokens_out = INPUT.search(block), OUTPUT.search(block)
            if tokens_in is None and tokens_out is None:
                continue
            model = MODEL.search(bytes(self._head)) or MODEL.search(tail)
            return Usage(
                model.group(1).decode("utf-8", "replace") if model else "",
                int(tokens_in.group(1)) if tokens_in else 0,
                int(tokens_out.group(1)) if tokens_out else 0,
            )
        return None


class Usage(NamedTuple):
    model: str
    input_tokens: int
    output_tokens: int


MILLION: Final = Decimal(1_000_000)
ANY_MODEL: Final = "*"
SUCCESS_BELOW: Final = 400  # an answer with an error status costs nothing


@dataclass(frozen=True)
class CostModel:
    per_call: Decimal
    per_million_tokens: Mapping[str, tuple[Decimal, Decimal]]  # model: (input, output)
    hold: Decimal  # charged to budgets at admission, settled to the real cost afterwards

    @classmethod
    def from_json(cls, value: Mapping[str, Any] | None) -> CostModel | None:
        if not value:
            return None
        per_call = Decimal(str(value.get("per_call", "0")))
        tokens = {
            name: (Decimal(str(price["input"])), Decimal(str(price["output"])))
            for name, price in (value.get("per_million_tokens") or {}).items()
        }
        hold = Decimal(str(value["hold"])) if "hold" in value else per_call
        return cls(per_call, tokens, hold)

    @property
    def metered(self) -> bool:
        """Whether the cost depends on the answer (token prices): the body is watched."""
        return bool(self.per_million_tokens)

    def prices(self, model: str) -> tuple[Decimal, Decimal] | None:
        """Token prices for `model`: its own, else the longest configured prefix of it
        (`gpt-4o-mini` prices `gpt-4o-mini-2024-07-18`), else `*`."""
        exact = self.per_million_tokens.get(model)
        if exact is not None:
            return exact
        prefixes = [name for name in self.per_million_tokens if model.startswith(name)]
        if prefixes:
            return self.per_million_tokens[max(prefixes, key=len)]
        return self.per_million_tokens.get(ANY_MODEL)

    @property
    def unknown(self) -> Decimal:
        """What a token-priced answer that reports no `usage` is taken to cost: its hold."""
        return max(self.hold, self.per_call)

    def cost(self, usage: Usage | None) -> Decimal:
        """What a successful answer costs."""
        total = self.per_call
        if usage is not None:
            prices = self.prices(usage.model)
            if prices is not None:
                total += (
                    usage.input_tokens * prices[0] + usage.output_tokens * prices[1]
                ) / MILLION
        return total


_PARSED: dict[str, tuple[object, CostModel | None]] = {}


def model_of(slug: str, value: Mapping[str, Any] | None) -> CostModel | None:
    """The parsed cost model of a service, parsed once per catalog version."""
    cached = _PARSED.get(slug)
    if cached is not None and cached[0] is value:
        return cached[1]
    model = CostModel.from_json(value)
    _PARSED[slug] = (value, model)
    return model
