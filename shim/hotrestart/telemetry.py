"""OpenTelemetry spans for checkpoint and restore phases.

Tracing is on only when the shim's environment configures an OTLP exporter (any
`OTEL_EXPORTER_OTLP_*` variable) and `OTEL_SDK_DISABLED` is not true; otherwise spans cost
a no-op context manager and the SDK is never imported (it is not light).

Spans are exported in batches from a background thread, so whatever is still queued is
lost unless `shutdown` runs before the process ends. A normal interpreter exit runs it
(atexit); a shim forked from the zygote leaves by `os._exit` and must call it itself.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

_tracer: Any = None
_provider: Any = None
_configured = False

# The longest an exiting shim waits for its last spans to reach the collector.
SHUTDOWN_TIMEOUT = 5.0


def enabled() -> bool:
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return any(key.startswith("OTEL_EXPORTER_OTLP_") for key in os.environ)


def _get_tracer() -> Any:
    global _tracer, _provider, _configured
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
    # The SDK's own exit hook waits up to 30 s per processor; ours is bounded.
    provider = TracerProvider(resource=Resource.create({"service.name": service}), shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    atexit.register(shutdown)
    _provider = provider
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


def shutdown(timeout: float = SHUTDOWN_TIMEOUT) -> None:
    """Export the spans still queued and stop the exporter, waiting at most `timeout` s.

    Costs nothing when tracing never started. Safe to call more than once."""
    global _provider
    provider, _provider = _provider, None
    if provider is None:
        return

    def stop() -> None:
        with contextlib.suppress(Exception):
            provider.shutdown()

    # On a thread so a collector that does not answer cannot hold the exit beyond `timeout`.
    worker = threading.Thread(target=stop, name="telemetry-shutdown", daemon=True)
    worker.start()
    worker.join(timeout)
