"""rlhf_online: chat, vote between two answers, and watch a LoRA-PPO policy learn from the votes.

    python app.py [--model embedded|HF_ID|FOLDER] [--port 7860] [--data-dir ./data] [--no-train]

Every flag is also an environment variable (see --help). This file only composes the package's parts.
"""

from __future__ import annotations

import logging
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from rlhf_online.config import load_config  # noqa: E402
from rlhf_online.engine import EngineUnavailableError  # noqa: E402
from rlhf_online.lifecycle import ShutdownSignals  # noqa: E402
from rlhf_online.limits import server_middleware  # noqa: E402
from rlhf_online.services import build_services  # noqa: E402
from rlhf_online.ui import PAGE_CSS, PAGE_HEAD, build_app  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = load_config(argv)
    shutdown = ShutdownSignals(cfg.shutdown_timeout_s).install()  # SIGTERM/SIGINT: close everything below, bounded
    try:
        services = build_services(cfg)
    except EngineUnavailableError as exc:  # a missing package or a wrong flag: say which flag, no traceback
        raise SystemExit(f"cannot start: {exc}") from None
    demo = build_app(services)
    try:
        demo.queue(default_concurrency_limit=cfg.limits.queue_concurrency, max_size=cfg.limits.queue_max_size).launch(
            server_name=cfg.host, server_port=cfg.port, show_error=True, css=PAGE_CSS, head=PAGE_HEAD,
            app_kwargs={"middleware": server_middleware(cfg.limits)})  # e.g. oversized bodies refused unread
    finally:
        services.close()
        shutdown.done()
        logging.getLogger("app").info("shut down cleanly")


if __name__ == "__main__":
    main()
