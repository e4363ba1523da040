"""Hub-side helpers of the loki project: a small Hugging Face Hub-compatible test server (`hub.server`).

The model card template that `loki.hub.push_delta` renders ships inside the library (`loki/templates/model_card.md`),
so that an installed `loki` can use it.
"""
