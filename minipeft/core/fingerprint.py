"""A short fingerprint of a base model, so an adapter is never silently loaded into another base.

`mp.apply` records it in `model.peft_config["base_fingerprint"]` before the method changes anything;
saving writes it into the adapter's config and checkpoints, and loading or resuming compares it with
the model at hand. It hashes the architecture (family, sizes, and any switch set unlike the family's row)
and a strided sample of 256 rows of the token embedding, which no PEFT method changes before apply()
records it. The sample is taken in the precision the weights were loaded in: a model cast to bf16 or
fp16 (precision.set_precision) keeps an fp32 copy of those rows first, so an adapter trained in one
precision loads into a base held in another.
"""
import hashlib


def embedding_sample(model):
    """The rows of the token embedding the fingerprint hashes: every (vocab_size // 256)-th."""
    return model.tok_emb.weight.detach()[:: max(1, model.cfg.vocab_size // 256)]


def base_fingerprint(model) -> str:
    """16 hex digits of sha256 over the config's shape and a sample of the token embedding."""
    cfg = model.cfg
    digest = hashlib.sha256()
    shape = (cfg.flavor, cfg.vocab_size, cfg.d_model, cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.d_ff)
    digest.update(repr(shape).encode())
    if changed := cfg.switches_changed():  # a family's own row adds nothing: older fingerprints still hold
        digest.update(repr(sorted(changed.items())).encode())
    sample = getattr(model, "base_sample", None)  # kept by precision.set_precision before rounding
    if sample is None:
        sample = embedding_sample(model)
    if not sample.is_meta:  # a model built on the meta device (for counting) has no values yet
        digest.update(sample.float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
