"""Similar-case search: a FAISS index over embeddings, queried with embeddings, images or text."""
