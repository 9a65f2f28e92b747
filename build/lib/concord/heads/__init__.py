"""One MLP head per task and the task losses (``heads``); mixture-of-experts bottoms (``experts``)."""
