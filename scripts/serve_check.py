"""`make serve-check`: the demo's export and adapter served by vLLM's OpenAI server, answers compared with training's.

    python scripts/serve_check.py [DEMO_DIR]     # with the vLLM venv's Python (make serve-check builds it)

After `make demo` and `make export`. For each route, the serve command that `export` printed in
DEMO_DIR/out/merged/export_report.json (`serve`: `vllm_merged`, the merged model; `vllm_adapter`, the base model +
the adapter as a LoRA module) runs as it is, with this interpreter as `python` and only where to listen and how much
memory to take added (CHECK_ARGS, CHECK_ENV: settings of the CPU build on a small machine, not of the model). Every
row of the demo's eval split is then sent as a user sends it: the OpenAI chat API, the image as a PNG data URL, the
system prompt of the report and the user text as docs/export.md ("Serving recipes") writes it, and no sampling
setting at all (no temperature, no max_tokens). The answers must equal the run's post-eval
(DEMO_DIR/out/eval/post_predictions.jsonl) on every row, for both routes.

Prints one line per route (rows identical, load time, vLLM version) and writes DEMO_DIR/out/serve_check.json.
Exit 0: every row identical on both routes; 1: a route differs or its server failed (its log is printed);
2: the demo's outputs are missing. Standard library only.
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

# Listen on loopback only; the CPU build's KV cache (GiB) and batch kept small for a 2-core machine.
CHECK_ARGS = ["--host", "127.0.0.1", "--max-num-seqs", "4"]
CHECK_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
LOAD_TIMEOUT_S = float(os.environ.get("SERVE_CHECK_LOAD_TIMEOUT_S", "1800"))  # model load + CPU kernel warm-up
REQUEST_TIMEOUT_S = 600.0
POLL_S = 0.5  # failsafe: the server says it is up only by answering /health


class Missing(Exception):
    """The demo's outputs are not there (exit 2)."""


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise Missing(f"{path} is missing: run `make demo` and `make export` first")
    return json.loads(path.read_text())


def eval_rows(out: Path, data: Path) -> list[dict]:
    """The rows of the run's post-eval, in its order, each with its source row (row ids are `FILE:LINE`)."""
    path = out / "eval" / "post_predictions.jsonl"
    if not path.is_file():
        raise Missing(f"{path} is missing: run `make demo` first")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    files: dict[str, list[str]] = {}
    rows = []
    for record in records:
        name, _, line = record["row_id"].rpartition(":")
        lines = files.setdefault(name, (data / name).read_text().splitlines())
        rows.append({**record, "source": json.loads(lines[int(line) - 1])})
    return rows


def user_text(row: dict) -> str:
    """docs/export.md's recipe: the query, stripped, then the caption on a new line when there is one."""
    caption = str(row.get("caption") or "").strip()
    return str(row["query"]).strip() + (f"\nCAPTION: {caption}" if caption else "")


def request_body(model: str, system: str | None, row: dict, data: Path) -> dict:
    image = base64.b64encode((data / row["image"]).read_bytes()).decode()
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
        {"type": "text", "text": user_text(row)}]})
    return {"model": model, "messages": messages}  # no temperature, no max_tokens: the server's defaults


def _http(url: str, body: dict | None = None, timeout: float = REQUEST_TIMEOUT_S) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        text = response.read().decode()
    return json.loads(text) if text else {}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_argv(command: str, port: int) -> list[str]:
    """The report's command with this interpreter as `python`, then where to listen."""
    argv = shlex.split(command)
    if argv[0] != "python":
        raise ValueError(f"not a `python -m ...` command: {command}")
    return [sys.executable, *argv[1:], *CHECK_ARGS, "--port", str(port)]


def wait_healthy(process: subprocess.Popen, base: str) -> None:
    """Until /health answers 200; the server exiting or LOAD_TIMEOUT_S passing is a failure."""
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} before it was up")
        try:
            _http(f"{base}/health", timeout=10)
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(POLL_S)  # failsafe
    raise RuntimeError(f"the server was not up after {LOAD_TIMEOUT_S:.0f} s (SERVE_CHECK_LOAD_TIMEOUT_S)")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (its engine core is a child), SIGKILL after 60 s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def check_route(route: str, command: str, model: str, system: str | None, rows: list[dict], data: Path,
                log: Path) -> dict:
    """Serve, send every row, compare; the server is stopped whatever happens."""
    port = free_port()
    argv = server_argv(command, port)
    base = f"http://127.0.0.1:{port}"
    result: dict = {"route": route, "command": command, "ran": shlex.join(argv), "env": CHECK_ENV, "rows": len(rows),
                    "identical": 0, "mismatches": [], "load_s": None, "vllm_version": None, "error": None}
    started = time.monotonic()
    with log.open("w") as handle:
        process = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, **CHECK_ENV},
                                   start_new_session=True)
    try:
        wait_healthy(process, base)
        result["load_s"] = round(time.monotonic() - started, 1)
        result["vllm_version"] = _http(f"{base}/version", timeout=30).get("version")
        answered = time.monotonic()
        for row in rows:
            reply = _http(f"{base}/v1/chat/completions", request_body(model, system, row["source"], data))
            answer = reply["choices"][0]["message"]["content"]
            if answer == row["prediction"]:
                result["identical"] += 1
            else:
                result["mismatches"].append({"row_id": row["row_id"], "served": answer, "trained": row["prediction"]})
        result["answer_s"] = round(time.monotonic() - answered, 1)
    except (RuntimeError, OSError, KeyError, ValueError) as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        stop(process)
    return result


def summary_line(result: dict) -> str:
    verdict = "ok" if result["error"] is None and result["identical"] == result["rows"] else "FAILED"
    return (f"serve-check {result['route']}: {result['identical']}/{result['rows']} rows identical to the post-eval, "
            f"load {result['load_s']} s, answers {result.get('answer_s')} s, vLLM {result['vllm_version']}: {verdict}"
            + (f" ({result['error']})" if result["error"] else ""))


def main(demo_dir: Path) -> int:
    out, data = demo_dir / "out", demo_dir / "data"
    try:
        report = _read_json(out / "merged" / "export_report.json")
        rows = eval_rows(out, data)
    except Missing as exc:
        print(f"serve-check: {exc}", file=sys.stderr)
        return 2
    serve, system, model = report.get("serve") or {}, (report.get("prompt") or {}).get("system"), report["run_id"]
    logs = Path(tempfile.mkdtemp(prefix="serve-check-"))
    results = []
    for route in ("vllm_merged", "vllm_adapter"):
        if route not in serve:
            print(f"serve-check: export_report.json has no serve.{route}: run `make export` again", file=sys.stderr)
            return 2
        result = check_route(route, serve[route], model, system, rows, data, logs / f"{route}.log")
        print(summary_line(result), flush=True)
        if result["error"] or result["mismatches"]:
            print((logs / f"{route}.log").read_text()[-6000:], file=sys.stderr)
            for mismatch in result["mismatches"][:5]:
                print(f"  {json.dumps(mismatch, ensure_ascii=False)}", file=sys.stderr)
        results.append(result)
    (out / "serve_check.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(f"serve-check: {out / 'serve_check.json'} (server logs in {logs})", flush=True)
    return 0 if all(r["error"] is None and not r["mismatches"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else ".cache/demo")))
