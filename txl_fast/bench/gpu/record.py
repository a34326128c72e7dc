"""The GPU check's records and its clock: ``Run`` writes DIR/gpu_check.json after every record (a
killed run keeps what it measured) and bounds the time, a budget per stage and a deadline for the
run; ``print_table`` prints the records last.

    run = Run(out, "gpu", budgets={"environment": 40, ...}, total_s=470)
    run.stage("environment", fatal=True)     # a record that raises ends the run (re-raised)
    run.record("versions", environment, device, smoke)
    run.stage("correctness")
    run.record("attention odd 37x53 D48 float32", check_attention, case, "float32", device, smoke)

A record is a function returning a dict: recorded as ``status: ok`` with its seconds, ``error`` with
its one-line error (the run goes on, except in a fatal stage), or ``skipped`` without running once
its stage's budget or the run's deadline (``total_s`` after the start) is spent.
"""
from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path

from txl_fast.bench.machine import time_call


class Run:
    def __init__(self, out: Path, mode: str, budgets: dict, total_s: float):
        self.path = out / "gpu_check.json"
        self.doc = {"mode": mode, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "records": []}
        self.budgets, self.deadline = budgets, time.perf_counter() + total_s
        self.name, self.fatal, self.stage_end = None, False, self.deadline
        out.mkdir(parents=True, exist_ok=True)
        self.save()

    def stage(self, name: str, fatal: bool = False) -> None:
        """Start stage ``name``: its budget (``budgets[name]`` seconds) counts from now."""
        self.name, self.fatal = name, fatal
        self.stage_end = min(self.deadline, time.perf_counter() + self.budgets[name])

    def left(self) -> float:
        """Seconds left: of the stage's budget, and before the run's deadline."""
        return self.stage_end - time.perf_counter()

    def add(self, record: dict) -> dict:
        self.doc["records"].append(record)
        self.save()
        return record

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1, default=str))
        os.replace(tmp, self.path)

    def record(self, name: str, fn, *args, **kwargs) -> dict:
        base = {"stage": self.name, "name": name}
        if self.left() <= 0:
            return self.add({**base, "status": "skipped",
                             "why": f"stage budget {self.budgets[self.name]} s or the run's deadline spent"})
        try:
            seconds, result = time_call(lambda: fn(*args, **kwargs))
        except Exception as exc:                           # noqa: BLE001 (one record fails, the rest runs)
            line = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            record = self.add({**base, "status": "error", "error": line,
                               "where": traceback.format_exc().strip().splitlines()[-3][:200]})
            if self.fatal:
                raise
            return record
        return self.add({**base, "status": "ok", **result, "seconds": round(seconds, 3)})

    def failed(self) -> list:
        """The records that raised or whose check failed."""
        return [r for r in self.doc["records"] if r["status"] == "error" or r.get("status_check") == "fail"]


def print_table(records: list) -> None:
    print(f"{'stage':<12} {'record':<46} {'status':<8} summary")
    for r in records:
        status = r.get("status_check", r["status"]) if r["status"] == "ok" else r["status"]
        if r["status"] == "error":
            summary = r["error"][:70]
        elif "errors" in r:
            summary = f"worst err {max(r['errors'].values()):.1e}" + (f"; {r['failures'][0]}" if r.get("failures") else "")
        elif "worst_error" in r:
            summary = f"err {r['worst_error']:.1e}, compile {r['compile_s']} s"
        else:
            summary = ", ".join(f"{k}={_short(v)}" for k, v in r.items()
                                if k not in ("stage", "name", "status", "seconds", "values", "floor_model")
                                and not isinstance(v, (list, dict)))[:90]
            summary += "".join(f" {k}={v['ms']}ms({v['of_floor']})" for k, v in r.items()
                               if isinstance(v, dict) and "ms" in v)[:120]
        print(f"{r['stage']:<12} {r['name'][:46]:<46} {status:<8} {summary}")


def _short(v):
    return f"{v:.3g}" if isinstance(v, float) else v
