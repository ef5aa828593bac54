"""Example tools for `voxserve talk --tools examples/tools.py`: a clock and a unit converter.

Every public function here becomes a tool the model may call; its docstring says what it does and
its type hints give the arguments' JSON schema. The client runs the call and sends the result back.
"""

from __future__ import annotations

import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

#: Factors to a base unit per kind of quantity (length: metre, mass: kilogram, volume: litre).
_UNITS = {
    "meter": 1.0, "metre": 1.0, "kilometer": 1000.0, "kilometre": 1000.0, "centimeter": 0.01, "mile": 1609.344,
    "foot": 0.3048, "feet": 0.3048, "inch": 0.0254, "yard": 0.9144,
    "kilogram": 1.0, "gram": 0.001, "pound": 0.45359237, "ounce": 0.028349523125,
    "liter": 1.0, "litre": 1.0, "milliliter": 0.001, "gallon": 3.785411784, "cup": 0.2365882365,
}
_KINDS = {**dict.fromkeys(("meter", "metre", "kilometer", "kilometre", "centimeter", "mile", "foot", "feet",
                           "inch", "yard"), "length"),
          **dict.fromkeys(("kilogram", "gram", "pound", "ounce"), "mass"),
          **dict.fromkeys(("liter", "litre", "milliliter", "gallon", "cup"), "volume")}


def get_time(timezone: str = "UTC") -> dict[str, str]:
    """The current date and time in a time zone (an IANA name such as Europe/Paris; default UTC)."""
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        return {"error": f"unknown time zone {timezone!r}; use an IANA name such as Europe/Paris"}
    now = datetime.datetime.now(zone)
    return {"timezone": timezone, "time": now.strftime("%H:%M"), "date": now.strftime("%A %d %B %Y")}


def convert_units(value: float, from_unit: str, to_unit: str) -> dict[str, object]:
    """Convert a quantity between units of length, mass, volume or temperature (celsius, fahrenheit, kelvin)."""
    a, b = _unit(from_unit), _unit(to_unit)
    temps = {"celsius", "fahrenheit", "kelvin"}
    if a in temps and b in temps:
        celsius = {"celsius": value, "fahrenheit": (value - 32) * 5 / 9, "kelvin": value - 273.15}[a]
        result = {"celsius": celsius, "fahrenheit": celsius * 9 / 5 + 32, "kelvin": celsius + 273.15}[b]
    elif a in _UNITS and b in _UNITS and _KINDS[a] == _KINDS[b]:
        result = value * _UNITS[a] / _UNITS[b]
    else:
        return {"error": f"cannot convert {from_unit} to {to_unit}"}
    return {"value": value, "from_unit": from_unit, "to_unit": to_unit, "result": round(result, 4)}


def _unit(name: str) -> str:
    """A unit's canonical name: lower case, singular, abbreviations spelled out."""
    n = name.strip().lower().rstrip(".")
    n = {"km": "kilometer", "m": "meter", "cm": "centimeter", "mi": "mile", "ft": "foot", "in": "inch",
         "inches": "inch", "kg": "kilogram", "g": "gram", "lb": "pound", "lbs": "pound", "oz": "ounce", "l": "liter",
         "ml": "milliliter", "c": "celsius", "f": "fahrenheit", "k": "kelvin",
         "degrees celsius": "celsius", "degrees fahrenheit": "fahrenheit"}.get(n, n)
    return n[:-1] if n.endswith("s") and n[:-1] in _UNITS else n
