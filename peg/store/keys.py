"""Store-wide key prefixes: the parts of a store's key space that no single run owns.

Every other key lives under `<run name>/<stage>/`; the embedding cache (`peg.runtime.embeddings`)
lives under `EMBEDDING_CACHE/<kind>-<key>/`, with no run name, so every run in the store shares it,
and the pipeline lets the stages that declare it as `shared` write there.
"""

EMBEDDING_CACHE = "encode"
