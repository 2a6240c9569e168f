"""JSON for plugin processes without ``import json``.

``json.decoder`` compiles regular expressions at import, pulling in ``re`` and ``enum``: ~15 ms, more
than the rest of a host-local call. The C accelerator ``_json`` (which ``json`` itself uses) has the
whole scanner and encoder; these two functions drive it directly and fall back to the ``json``
package if the accelerator is missing. Output of :func:`dumps` equals ``json.dumps(obj)``.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_WS = " \t\n\r"

try:
    import _json as _c

    class _Ctx:
        # The attributes the C scanner reads from its json.JSONDecoder "context".
        strict = True
        object_hook = None
        object_pairs_hook = None
        parse_float = float
        parse_int = int
        memo: dict[Any, Any] = {}

        @staticmethod
        def parse_constant(name: str) -> float:
            return {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}[name]

    _scan = _c.make_scanner(_Ctx())

    def _default(o: Any) -> Any:
        raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")

    _encode = _c.make_encoder(None, _default, _c.encode_basestring_ascii, None, ": ", ", ", False, False, True)
except (ImportError, AttributeError, TypeError):  # pragma: no cover - CPython always has _json
    _c = None


def loads(data: bytes | str) -> Any:
    """Parse a JSON document; raises ValueError on malformed input, like ``json.loads``."""
    if _c is None:  # pragma: no cover
        import json

        return json.loads(data)
    s = data.decode("utf-8-sig") if isinstance(data, (bytes, bytearray)) else data
    s = s.strip(_WS)
    if not s:
        raise ValueError("Expecting value: empty document")
    try:
        obj, end = _scan(s, 0)
    except StopIteration as e:
        raise ValueError(f"Expecting value at char {e.value}") from None
    except Exception:
        # The C scanner builds its error from json.decoder, which it only finds if already imported
        # (otherwise: SystemError). Malformed input is the rare path: let the json package explain.
        import json

        return json.loads(s)
    if s[end:].strip(_WS):
        raise ValueError(f"Extra data at char {end}")
    return obj


def dumps(obj: Any) -> str:
    if _c is None:  # pragma: no cover
        import json

        return json.dumps(obj)
    return "".join(_encode(obj, 0))
