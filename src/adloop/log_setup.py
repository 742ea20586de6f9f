"""Structured logging: one line per event, ``key=value`` fields (or JSON lines)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class KeyValueFormatter(logging.Formatter):
    def __init__(self, as_json: bool = False) -> None:
        super().__init__()
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        fields = {k: v for k, v in vars(record).items() if k not in _STANDARD}
        base = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            base["exc"] = self.formatException(record.exc_info)
        if self.as_json:
            return json.dumps({**base, **fields}, default=str)
        extra = " ".join(f"{k}={json.dumps(v, default=str)}" for k, v in fields.items())
        line = f"{base['ts']} {base['level']:<7} {base['logger']} [{base['pid']}] {base['msg']}"
        line = f"{line} {extra}" if extra else line
        return f"{line}\n{base['exc']}" if "exc" in base else line


def configure_logging(level: str | None = None) -> None:
    """Configure the root logger once; ADLOOP_LOG_LEVEL / ADLOOP_LOG_JSON=1 adjust it."""
    level = (level or os.environ.get("ADLOOP_LOG_LEVEL") or "INFO").upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter(as_json=os.environ.get("ADLOOP_LOG_JSON") == "1"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Client libraries are chatty at INFO about every (re)connection.
    for noisy in ("aiokafka", "kafka", "faust", "mode", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
