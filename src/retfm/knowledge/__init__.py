"""The disease knowledge base: conditions, their signs per modality, label maps and the texts made from them
(zero-shot prompts, image-text captions, generator prompts)."""
