"""Step 7: serve fine-tuned models behind an OpenAI-compatible API and collect feedback on them.

batcher.py  dynamic batching: requests that wait together decode together (tailor/models/decode.py)
models.py   base models and runs by name; LoRA adapters share one copy of the base
app.py      the HTTP API (FastAPI): chat and text completions, streaming, feedback, metrics
metrics.py  Prometheus counters and histograms
server.py   `tailor serve`: settings, safety checks, uvicorn
export.py   `tailor export`: a merged standalone model folder and the parity check
"""
