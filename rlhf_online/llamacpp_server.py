"""llama.cpp's OpenAI-compatible HTTP server from the xllamacpp wheel (no compiler), for `--engine openai`.

    python -m rlhf_online.llamacpp_server --port 8080 --lora adapters/v0007/adapter_model.gguf [--lora ...]
    python app.py --engine openai --engine-url http://127.0.0.1:8080

The same server as `llama-server -m MODEL --lora-init-without-apply --lora FILE ...`: the embedded GGUF (or
`--model FILE.gguf`), `--slots` requests decoded at once, the given adapters loaded at start with scale 0 so
each request picks its own. It serves until interrupted.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading

from rlhf_online.models import embedded_gguf_path


def build_server(model: str, loras: list[str], port: int, host: str = "127.0.0.1", slots: int = 4,
                 ctx_per_slot: int = 2048, threads: int = 0, api_key: str = ""):
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = model
    params.hostnames = [host]
    params.port = port
    params.n_parallel = slots
    params.n_ctx = slots * ctx_per_slot
    params.cpuparams.n_threads = threads or os.cpu_count() or 1
    params.cpuparams_batch.n_threads = params.cpuparams.n_threads
    params.warmup = False
    params.verbosity = -1
    if api_key:
        params.api_keys = [api_key]
    params.lora_adapters = [xllamacpp.CommonAdapterLoraInfo(path, 0.0) for path in loras]
    params.lora_init_without_apply = True
    server = xllamacpp.Server(params)
    server.handle_completions({"prompt": [0], "n_predict": 1})  # see llamacpp_engine: avoids a destructor hang
    return server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="", help="GGUF model file (default: the embedded SmolLM2 GGUF)")
    parser.add_argument("--lora", action="append", default=[], help="GGUF LoRA adapter file (repeatable)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    server = build_server(args.model or str(embedded_gguf_path()), args.lora, args.port, args.host, args.slots,
                          threads=args.threads, api_key=os.environ.get("LLAMA_API_KEY", ""))
    print(f"serving on {server.listening_address}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
