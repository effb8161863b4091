"""Serving a model over HTTP as the field's tools expect: OpenAI's API, a tokenizer, a chat page.

config.py (what ``python -m nanogpt.serve`` takes), protocol.py (OpenAI's request
bodies, their checks and error bodies), answers.py (how a request becomes
generations of nanogpt/generation/batching.py's Engine and goes back, streamed
or whole), app.py (the routes), server.py (socket, uvicorn, stop signals) and
chat.html (the page at /, one static file: no build step, nothing fetched from
elsewhere). docs/serving.md is the manual.
"""
