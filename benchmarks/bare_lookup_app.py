"""The floor /recommend is measured against: a bare FastAPI + uvicorn app that answers each
asked user's nightly tag row from a dict in memory (no model, no window, no checks).

    .venv/bin/python benchmarks/bare_lookup_app.py TAGS.parquet PORT
"""

from __future__ import annotations

import json
import sys

import pandas as pd
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response


def main() -> None:
    tags = pd.read_parquet(sys.argv[1])
    rows = {}
    for r in tags.to_dict("records"):
        probs = r["slot_open_probs"]
        rows[r["user_id"]] = {"user_id": r["user_id"],
                              "slot_open_probs": None if probs is None else [round(float(p), 6) for p in probs],
                              "best_slot": None if pd.isna(r["best_slot"]) else int(r["best_slot"]),
                              "churn_prob": None if pd.isna(r["churn_prob"]) else float(r["churn_prob"]),
                              "churn_tier": r["churn_tier"], "cold_start": bool(r["cold_start"])}
    app = FastAPI()

    @app.post("/recommend")
    async def recommend(request: Request) -> Response:
        body = await request.json()
        out = [rows.get(u, {"user_id": u}) for u in body["user_ids"]]
        return Response(json.dumps({"results": out}, separators=(",", ":")), media_type="application/json")

    @app.get("/livez")
    async def livez() -> Response:
        return Response("ok")

    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
