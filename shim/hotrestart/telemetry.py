"""OpenTelemetry spans for checkpoint and restore phases.

Tracing is on only when the shim's environment configures an OTLP exporter (any
`OTEL_EXPORTER_OTLP_*` variable) and `OTEL_SDK_DISABLED` is not true; otherwise spans cost
a no-op context manager and the SDK is never imported (it is not light).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

_tracer: Any = None
_configured = False


def enabled() -> bool:
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return any(key.startswith("OTEL_EXPORTER_OTLP_") for key in os.environ)


def _get_tracer() -> Any:
    global _tracer, _configured
    if _configured:
        return _tracer
    _configured = True
    if not enabled():
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        return None
    service = os.environ.get("OTEL_SERVICE_NAME", "containerd-shim-hotrestart-v2")
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    _tracer = provider.get_tracer("hotrestart")
    return _tracer


class _Span:
    """What callers get: attributes set on the real span when there is one."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.attributes: dict[str, Any] = {}

    def set(self, key: str, value: Any) -> None:
        self.attributes[key] = value
        if self._real is not None:
            self._real.set_attribute(f"hotrestart.{key}", value)


@contextlib.contextmanager
def span(name: str, **attributes: Any) -> Iterator[_Span]:
    tracer = _get_tracer()
    if tracer is None:
        s = _Span(None)
        for k, v in attributes.items():
            s.set(k, v)
        yield s
        return
    with tracer.start_as_current_span(name) as real:
        s = _Span(real)
        for k, v in attributes.items():
            s.set(k, v)
        try:
            yield s
        except BaseException as exc:
            real.record_exception(exc)
            real.set_attribute("hotrestart.outcome", "error")
            raise


def shutdown() -> None:
    """Flush spans before the shim exits."""
    if _tracer is not None:
        from opentelemetry import trace

        provider = trace.get_tracer_provider()
        with contextlib.suppress(Exception):
            provider.shutdown()  # type: ignore[attr-defined]
