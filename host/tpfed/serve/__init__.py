"""``tpfed serve`` and ``tpfed chat``: an OpenAI-compatible server that keeps its fleet (peers
connected, planned and holding their shares across requests), Prometheus metrics, a live
dashboard, and the MQTT fleet bus and model registry.

Modules: :mod:`.text` (chat templates, stop sequences, incremental decoding), :mod:`.metrics`,
:mod:`.engine` (served models and the generation loop), :mod:`.bus` (MQTT), :mod:`.registry`
(models announced on the bus), :mod:`.app` (the HTTP API and the dashboard).
"""
