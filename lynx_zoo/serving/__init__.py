"""Serving a variant: an OpenAI-compatible server (FastAPI + uvicorn) with continuous batching and a chat page.

``python -m lynx_zoo serve --variant lynx-demo`` (docs/serving.md). From Python,
:func:`lynx_zoo.serving.app.create_app` builds the application of a loaded model and
:func:`lynx_zoo.serving.server.background_server` runs it in a thread. The web parts come with
``pip install 'lynx-zoo[serve]'``.
"""

from lynx_zoo.serving.cli import main
from lynx_zoo.serving.settings import ServeSettings

__all__ = ["ServeSettings", "main"]
