"""modules/sd_hijack.py: only the textual-inversion database extensions read (A1111 1.10).

``model_hijack.embedding_db.word_embeddings``: name -> Embedding, filled by the Web-UI from its
embeddings folder for the loaded model; ``Embedding.vec`` is [N, dim], or for SDXL a dict with
``clip_l`` and ``clip_g``."""


class Embedding:
    def __init__(self, vec, name, step=None):
        self.vec = vec
        self.name = name
        self.step = step
        self.filename = None
        self.vectors = (next(iter(vec.values())) if isinstance(vec, dict) else vec).shape[0]
        self.shape = None


class EmbeddingDatabase:
    def __init__(self):
        self.word_embeddings = {}  # name -> Embedding
        self.ids_lookup = {}
        self.skipped_embeddings = {}

    def register_embedding(self, embedding, model=None):
        self.word_embeddings[embedding.name] = embedding
        return embedding


class StableDiffusionModelHijack:
    def __init__(self):
        self.embedding_db = EmbeddingDatabase()


model_hijack = StableDiffusionModelHijack()
